"""An AlexNet-shaped network (Table 5's layer sizes and strides) at a stated random initialisation: the authors'
weights are not public, so Table 5's bounds are for these.

    logits_fn = jax.tree_util.Partial(AlexNetShaped().apply, alexnet_variables(seed=0))   # on [N, 227, 227, 3]
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

ALEXNET_INPUT = (227, 227, 3)   # 227 with VALID conv1 gives the 55-27-13-6 maps and 9216 = 6·6·256 features
ALEXNET_SEED = 0


class AlexNetShaped(nn.Module):
    """Single-tower AlexNet (Krizhevsky et al. 2012) on 227×227×3, as in Table 5's sizes.

    Local response normalisation is left out, as before the port to flax: the
    paper's Table 5 lists only the convolutional and dense layers.
    """
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x):
        pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2))
        x = pool(nn.relu(nn.Conv(96, (11, 11), strides=4, padding="VALID", name="conv1")(x)))
        x = pool(nn.relu(nn.Conv(256, (5, 5), padding="SAME", name="conv2")(x)))
        x = nn.relu(nn.Conv(384, (3, 3), padding="SAME", name="conv3")(x))
        x = nn.relu(nn.Conv(384, (3, 3), padding="SAME", name="conv4")(x))
        x = pool(nn.relu(nn.Conv(256, (3, 3), padding="SAME", name="conv5")(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(4096, name="fc1")(x))
        x = nn.relu(nn.Dense(4096, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


# Where each weighted layer sat in the 19-layer list the AlexNet-shaped net was drawn from before
# the port to flax (conv, relu, pool, conv, relu, pool, conv, relu, conv, relu, conv, relu, pool,
# flatten, dense, relu, dense, relu, dense): its weights came from key i of
# jax.random.split(PRNGKey(seed), 19), so the same draw keeps Table 5's bounds comparable.
ALEXNET_LAYER_INDEX = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10, "fc1": 14, "fc2": 16, "fc3": 18}
ALEXNET_NUM_LAYERS = 19


def alexnet_variables(seed: int = ALEXNET_SEED) -> dict:
    """`AlexNetShaped`'s variables: Glorot-uniform kernels, zero biases, the draw Table 5 always used (`seed`)."""
    shapes = jax.eval_shape(AlexNetShaped().init, jax.random.PRNGKey(0), jnp.zeros((1, *ALEXNET_INPUT)))["params"]
    keys = jax.random.split(jax.random.PRNGKey(seed), ALEXNET_NUM_LAYERS)
    glorot = jax.nn.initializers.glorot_uniform()
    return {"params": {name: {"kernel": glorot(keys[ALEXNET_LAYER_INDEX[name]], layer["kernel"].shape, jnp.float32),
                              "bias": jnp.zeros(layer["bias"].shape, jnp.float32)}
                       for name, layer in shapes.items()}}
