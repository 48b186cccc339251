"""The benches' models beyond the zoo: a ReLU CNN written with flax's own layers, and the adv_lib reference CNN.

    from scripts.bench_models import relu_cnn, trained_relu_cnn, reference_cnn
    module, variables = trained_relu_cnn(workdir, data_dir)     # trains 2 epochs once, then loads

Bench code (no torch here: the tests import it to rebuild the reference model).
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxadv.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from jaxadv.data import load_dataset
from jaxadv.models import conv_general_dilated_as_matmul, flatten, max_pool
from jaxadv.train import error_rate, fit

#: The second ReLU CNN's name in tables and under WORKDIR/models/.
RELU_CNN = "ReluCNN"
RELU_CNN_EPOCHS = 2


def relu_cnn(fast: bool = False) -> nn.Sequential:
    """Conv 5x5x16 - max pool - conv 5x5x32 - max pool - FC100 - 10, ReLU, VALID padding: flax's nn.Conv and nn.max_pool.

    Unlike the zoo ConvNet (3x3 SAME convolutions computed as matmuls, jaxadv's reshape max pool),
    it uses XLA's own convolution and reduce_window pooling, as a user's flax CNN would.
    fast: the same function with the same parameters, its convolutions and pooling computed as
    jaxadv's zoo computes them (matmuls, a reshape's max), which XLA:CPU trains about 10x faster.
    """
    if fast:
        conv = functools.partial(nn.Conv, padding="VALID", conv_general_dilated=conv_general_dilated_as_matmul)
        pool = functools.partial(max_pool, window=2, stride=2)
    else:
        conv = functools.partial(nn.Conv, padding="VALID")
        pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
    return nn.Sequential((conv(16, (5, 5)), nn.relu, pool, conv(32, (5, 5)), nn.relu, pool,
                          flatten, nn.Dense(100), nn.relu, nn.Dense(10)))


def reference_cnn() -> nn.Sequential:
    """Conv 3x3x8 - max pool - conv 3x3x16 - max pool - 10, ReLU: the small model adv_lib's reference figures are for.

    Its convolutions are the zoo's matmuls, which XLA:CPU runs several times faster than its own (the
    tests attack it for 1,000 steps per image). Its pooling is flax's nn.max_pool, whose gradient, like
    PyTorch's, goes to one entry of a window whose maximum is tied: jaxadv's reshape max pool splits it
    among them, and on flat backgrounds (equal positive activations) the two gradients differ.
    """
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME",
                             conv_general_dilated=conv_general_dilated_as_matmul)
    pool = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2))
    return nn.Sequential((conv(8), nn.relu, pool, conv(16), nn.relu, pool, flatten, nn.Dense(10)))


def train_cnn(module: nn.Sequential, images, labels, key: jax.Array, epochs: int, batch_size: int = 128,
              learning_rate: float = 2e-3, name: str = "cnn"):
    """The module's variables after `epochs` of Adam on softmax cross-entropy (`jaxadv.train.fit`)."""
    init_key, shuffle_key = jax.random.split(key)
    variables = module.init(init_key, jnp.zeros((1,) + images.shape[1:], jnp.float32))

    def loss_fn(variables, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(module.apply(variables, x), y).mean()

    steps = epochs * (len(labels) // batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    return fit(loss_fn, variables, (images, labels), shuffle_key, optimizer, epochs, batch_size, name=name)


def trained_relu_cnn(workdir: str | Path, data_dir: str | None = None, seed: int = 0):
    """(module, variables) of `relu_cnn` trained RELU_CNN_EPOCHS epochs on Fashion-MNIST; stored in WORKDIR/models/ReluCNN.

    Trains (a few minutes on two CPU cores, said on stderr) only when no checkpoint is stored, in
    the `fast` form of the same function: XLA:CPU's own convolution gradients made an epoch take
    over 20 minutes on a shared two-core machine.
    """
    module, directory = relu_cnn(), Path(workdir) / "models" / RELU_CNN
    like = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1), jnp.float32))
    if has_checkpoint(directory):
        return module, load_checkpoint(directory, like)[0]
    print(f"training {RELU_CNN} ({RELU_CNN_EPOCHS} epochs on Fashion-MNIST): no checkpoint in {directory}",
          file=sys.stderr, flush=True)
    train = load_dataset("fashion_mnist", "train", data_dir)
    start = time.perf_counter()
    variables = jax.block_until_ready(train_cnn(relu_cnn(fast=True), train.images, train.labels, jax.random.PRNGKey(seed),
                                                RELU_CNN_EPOCHS, name=RELU_CNN))
    meta = {"model": RELU_CNN, "dataset": "fashion_mnist", "seed": seed, "epochs": RELU_CNN_EPOCHS,
            "train_seconds": round(time.perf_counter() - start, 2),
            "train_error": error_rate(module, variables, train.images, train.labels)}
    save_checkpoint(directory, variables, meta)
    return module, variables


def correctly_classified(logits_fn, images: np.ndarray, labels: np.ndarray, num_images: int):
    """The first `num_images` of `images` that `logits_fn` classifies correctly, and their labels."""
    predicted = np.concatenate([np.argmax(np.asarray(logits_fn(jnp.asarray(images[i:i + 1000]))), -1)
                                for i in range(0, min(len(images), 4 * num_images + 1000), 1000)])
    index = np.where(predicted == labels[:len(predicted)])[0][:num_images]
    return images[index], labels[index]
