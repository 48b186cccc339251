"""The paper's MNIST model zoo, written in flax linen the way a user writes a model.

    model = get_model("FC100-100-10")
    variables = model.init(jax.random.PRNGKey(0))   # {"params": {"layers_0": {"kernel", "bias"}, ...}}
    logits = model.module.apply(variables, images)  # images: [B, 28, 28, 1] in [0, 1]

Each network is an `nn.Sequential` of flax layers (`nn.Dense`, `nn.Conv`,
`nn.sigmoid`, `nn.relu`, a pooling function, `flatten`; a tuple of layers, so the
module hashes and a jit cache can key on it), and every analysis
reaches it as it reaches a user's model: `jaxadv.functional.logits_function(
model.module, variables)`. What is not part of the network — the paper's weight
decay, AE400-10's frozen encoder and its pretraining — is the zoo's training
recipe, kept beside the module in `ZooModel` and read by `jaxadv.train`.

Why linen, not NNX: linen is pure (`apply(variables, x)`), so a model is a
function and a pytree of parameters, exactly what jit, vmap and the attack's
`jax.tree_util.Partial(apply, variables)` want, and new parameters of one
architecture reuse one compilation. NNX objects are mutable and must be split
into that pair anyway (`nnx.split`) before they cross a jit boundary.

Why `nn.Sequential`: the paper's hidden layers φ(x) (§3) and its per-layer
adversarial pools (§4.2) need the network cut at a layer. A Sequential is cut
by slicing its layers (`jaxadv.functional.split_sequential`), and the same
cut serves any user's Sequential. Layer k of the network is `layers[k]` and
its parameters are `variables["params"]["layers_k"]`.

Models are registered under the paper's names (`ZOO` lists Table 1's in order).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MNIST_SHAPE = (28, 28, 1)

#: The initialisation the zoo was trained with before its port to flax (Glorot-uniform weights, zero biases).
KERNEL_INIT = nn.initializers.glorot_uniform()


# -- layers the zoo needs beyond flax's own -------------------------------------------------

def flatten(x: jax.Array) -> jax.Array:
    """[B, ...] -> [B, features]: the step from feature maps to a dense layer."""
    return x.reshape(x.shape[0], -1)


def max_pool(h: jax.Array, window: int, stride: int) -> jax.Array:
    """Max pooling of NHWC activations over window × window patches, VALID.

    Non-overlapping windows (window == stride) are a reshape and a max: the
    gradient of XLA's reduce_window max is a select-and-scatter, which XLA:CPU
    runs slowly (docs/benchmarks.md), while a reshape's max costs next to
    nothing. The values are the same; so are the gradients, except that a window
    whose maximum is tied splits it among the tied entries instead of giving
    it to the first (after a ReLU the tied entries are zeros, whose ReLU
    gradient is 0 either way).
    """
    if window == stride:
        n, height, width, channels = h.shape
        rows, cols = height // window, width // window
        patches = h[:, :rows * window, :cols * window].reshape(n, rows, window, cols, window, channels)
        return patches.max(axis=(2, 4))
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


def conv2d(h: jax.Array, kernel: jax.Array, stride: int, padding: str) -> jax.Array:
    """NHWC activations ⊛ an HWIO kernel, as lax.conv_general_dilated computes it, written as one matmul.

    The k × k shifted (and strided) views of the input are stacked along the
    channels, the k·k·C_in columns of each output pixel, and multiplied by the
    kernel reshaped to [k·k·C_in, C_out]. Its gradients are then matmuls too,
    which XLA:CPU runs well: a ConvNet training step is about 10× faster than
    with XLA's convolution (docs/benchmarks.md). The values equal lax.conv_general_dilated's
    up to float32 rounding (tests/test_models.py). SAME pads as XLA does:
    out = ceil(n / stride), the padding split with the odd pixel after.
    """
    size_h, size_w, _, features = kernel.shape
    height, width = h.shape[1], h.shape[2]
    if padding == "SAME":
        out_h, out_w = -(-height // stride), -(-width // stride)
        pad_h = max((out_h - 1) * stride + size_h - height, 0)
        pad_w = max((out_w - 1) * stride + size_w - width, 0)
        h = jnp.pad(h, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    elif padding == "VALID":
        out_h, out_w = (height - size_h) // stride + 1, (width - size_w) // stride + 1
    else:
        raise ValueError(f"padding: expected 'SAME' or 'VALID', got {padding!r}")
    views = [h[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
             for i in range(size_h) for j in range(size_w)]
    return jnp.concatenate(views, axis=-1) @ kernel.reshape(-1, features)


def conv_general_dilated_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`, computed by `conv2d`.

    Square strides, SAME or VALID padding, NHWC/HWIO, no dilation or groups (the zoo's
    convolutions) run as `conv2d`; anything else goes to lax.conv_general_dilated.
    """
    standard = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = (lhs.ndim == 4 and len(set(window_strides)) == 1 and padding in ("SAME", "VALID")
             and all(d == 1 for d in (lhs_dilation or (1,))) and all(d == 1 for d in (rhs_dilation or (1,)))
             and feature_group_count == 1 and not kwargs
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == standard)
    if not plain:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision, **kwargs)
    return conv2d(lhs, rhs, window_strides[0], padding)


# -- the zoo: modules plus their training recipe ----------------------------------------------

class ZooModel(NamedTuple):
    """A zoo network (`module`, a flax `nn.Sequential`) and the recipe `jaxadv.train` trains it with.

    `weight_decay[name]` is the paper's λ of the layer whose parameters are
    `params[name]` (see `weight_decay_penalty`); `frozen` names layers kept
    fixed in supervised training (AE400-10's encoder, learnt without labels
    first: `pretrain == "sparse_autoencoder"`).
    """
    name: str
    module: nn.Sequential
    weight_decay: Mapping[str, float]
    frozen: tuple[str, ...] = ()
    pretrain: str | None = None
    input_shape: tuple[int, ...] = MNIST_SHAPE
    description: str = ""

    def init(self, key: jax.Array) -> dict:
        """The module's variables, {"params": ...}: Glorot-uniform kernels, zero biases, float32.

        Each kernel is drawn from its own key of `jax.random.split(key, n)`, one key per layer as
        the zoo drew them before its port to flax (n counts the layers except a leading flatten:
        the zoo's layer lists before the port had none), so a model trained from the same key is the same
        model, bit for bit (FC123-456-10: 10.94% test error either way). `module.init(key, x)`
        draws the same distribution from flax's own keys: with them the zoo's test errors moved by
        up to 0.33 points (FC123-456-10, the same on three seeds).
        """
        shapes = jax.eval_shape(self.module.init, jax.random.PRNGKey(0),
                                jax.ShapeDtypeStruct((1,) + self.input_shape, jnp.float32))
        leading_flatten = int(self.module.layers[0] is flatten)
        keys = jax.random.split(key, len(self.module.layers) - leading_flatten)
        params = {}
        for name, layer in shapes["params"].items():
            kernel_key = keys[int(name.rsplit("_", 1)[1]) - leading_flatten]
            params[name] = {"kernel": KERNEL_INIT(kernel_key, layer["kernel"].shape, jnp.float32),
                            "bias": jnp.zeros(layer["bias"].shape, jnp.float32)}
        return {"params": params}

    @property
    def apply(self) -> Callable:
        """`module.apply`: (variables, images [B, *input_shape]) -> logits [B, 10]."""
        return self.module.apply

    def num_params(self) -> int:
        shapes = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def weight_decay_penalty(model: ZooModel, variables) -> jax.Array:
    """Σ_layers λ_l · Σ W_l² / k_l, with k_l the number of units of layer l.

    This is our reading of the paper's "λΣw²/k" (the reproductions divide λ by
    the layer's width); biases are not decayed, frozen layers neither.
    """
    params = variables["params"]
    total = jnp.zeros((), jax.tree.leaves(params)[0].dtype)
    for name, lam in model.weight_decay.items():
        if lam and name not in model.frozen:
            kernel = params[name]["kernel"]
            total = total + lam * jnp.sum(kernel ** 2) / kernel.shape[-1]
    return total


def _dense(features: int) -> nn.Dense:
    return nn.Dense(features, kernel_init=KERNEL_INIT)


def _softmax(lam: float) -> ZooModel:
    return ZooModel(f"FC10({_fmt(lam)})", nn.Sequential((flatten, _dense(10))), {"layers_1": lam},
                    description=f"Softmax with λ = {_fmt(lam)}")


def _sigmoid_mlp(widths: Sequence[int], lams=(1e-5, 1e-5, 1e-6)) -> ZooModel:
    layers = [flatten]
    for width in widths:
        layers += [_dense(width), nn.sigmoid]
    layers.append(_dense(10))
    dense_names = [f"layers_{i}" for i, layer in enumerate(layers) if isinstance(layer, nn.Dense)]
    return ZooModel("FC" + "-".join(str(w) for w in widths) + "-10", nn.Sequential(tuple(layers)),
                    dict(zip(dense_names, lams)), description="Sigmoid network λ = 1e-5, 1e-5, 1e-6")


def _autoencoder_softmax() -> ZooModel:
    return ZooModel("AE400-10", nn.Sequential((flatten, _dense(400), nn.sigmoid, _dense(10))),
                    {"layers_3": 1e-6}, frozen=("layers_1",), pretrain="sparse_autoencoder",
                    description="Sparse autoencoder (400 sigmoid units, frozen) with Softmax λ = 1e-6")


def _convnet() -> ZooModel:
    # The paper names no architecture for its MNIST convnet (§3); this is a small
    # LeNet-style net that trains in about two minutes on two CPU cores.
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME", kernel_init=KERNEL_INIT,
                             conv_general_dilated=conv_general_dilated_as_matmul)
    pool = functools.partial(max_pool, window=2, stride=2)
    module = nn.Sequential((conv(16), nn.relu, pool, conv(32), nn.relu, pool, flatten,
                            _dense(100), nn.relu, _dense(10)))
    return ZooModel("ConvNet", module, {"layers_0": 1e-5, "layers_3": 1e-5, "layers_7": 1e-5, "layers_9": 1e-6},
                    description="Conv 3x3x16 - pool - conv 3x3x32 - pool - FC100 (ReLU), λ = 1e-5, 1e-6")


def _fmt(lam: float) -> str:
    return "1" if lam == 1 else f"1e-{round(-math.log10(lam))}"


_REGISTRY: dict[str, Callable[[], ZooModel]] = {
    "FC10(1e-4)": lambda: _softmax(1e-4),
    "FC10(1e-2)": lambda: _softmax(1e-2),
    "FC10(1)": lambda: _softmax(1.0),
    "FC100-100-10": lambda: _sigmoid_mlp((100, 100)),
    "FC200-200-10": lambda: _sigmoid_mlp((200, 200)),
    "AE400-10": _autoencoder_softmax,
    "FC123-456-10": lambda: _sigmoid_mlp((123, 456)),
    "ConvNet": _convnet,
}

#: Table 1's models, in the paper's order.
ZOO = ("FC10(1e-4)", "FC10(1e-2)", "FC10(1)", "FC100-100-10", "FC200-200-10", "AE400-10")
#: Every model `train_zoo` trains: Table 1's, Table 3's extra net, and the §3 convnet.
ALL_MODELS = tuple(_REGISTRY)


@functools.cache
def get_model(name: str) -> ZooModel:
    """The model registered under `name` (the paper's names, e.g. "FC100-100-10").

    One object per name, so that `model.apply` is the same function on every call
    and compiled analyses are reused.
    """
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None
