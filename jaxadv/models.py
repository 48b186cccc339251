"""The paper's MNIST model zoo as pure functions over explicit layer lists.

A model is a tuple of `Layer`s plus an input shape. Its parameters are a tuple
with one dict per layer (empty for parameter-free layers), so

    model = get_model("FC100-100-10")
    params = model.init(jax.random.PRNGKey(0))
    logits = model.apply(params, images)          # images: [B, 28, 28, 1] in [0, 1]

and `functools.partial(model.apply, params)` is the pure logits function that
the attacks take. Keeping the layers explicit (rather than hidden inside a
module) is what lets later code attack a hidden layer (`apply_from`), read
every layer's activations (`activations`) and walk the layers for Lipschitz
bounds (`jaxadv.spectral`).

Models are registered under the paper's names (`ZOO` lists Table 1's in order).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

Params = tuple  # one dict per layer: {"w": ..., "b": ...} or {}

MNIST_SHAPE = (28, 28, 1)


class Layer(NamedTuple):
    """One layer. `kind` is dense, conv, sigmoid, relu, maxpool or flatten.

    `weight_decay` is the paper's per-layer λ (see `weight_decay_penalty`).
    `trainable=False` freezes a layer during supervised training (AE400-10's
    encoder, which is trained without labels and then frozen).
    """
    kind: str
    features: int = 0          # dense / conv output units or channels
    kernel: int = 0            # conv kernel size, maxpool window
    stride: int = 1
    padding: str = "SAME"
    weight_decay: float = 0.0
    trainable: bool = True

    @property
    def has_params(self) -> bool:
        return self.kind in ("dense", "conv")


class Model(NamedTuple):
    name: str
    layers: tuple[Layer, ...]
    input_shape: tuple[int, ...] = MNIST_SHAPE
    description: str = ""
    pretrain: str | None = None   # "sparse_autoencoder": the first layer is learned without labels

    # -- pure functions ---------------------------------------------------
    def init(self, key: jax.Array) -> Params:
        """Glorot-uniform weights, zero biases, float32."""
        params, shape = [], self.input_shape
        for layer, k in zip(self.layers, jax.random.split(key, len(self.layers))):
            p, shape = _init_layer(layer, k, shape)
            params.append(p)
        return tuple(params)

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """Logits for a batch `x` of shape [B, *input_shape]."""
        return self.apply_from(params, x, 0)

    def apply_from(self, params: Params, h: jax.Array, start: int) -> jax.Array:
        """Run layers[start:] on `h`, the output of layer start-1 (or the input if start=0)."""
        for layer, p in zip(self.layers[start:], params[start:]):
            h = apply_layer(layer, p, h)
        return h

    def activations(self, params: Params, x: jax.Array) -> tuple[jax.Array, ...]:
        """The output of every layer, in order; the last one is the logits."""
        outs, h = [], x
        for layer, p in zip(self.layers, params):
            h = apply_layer(layer, p, h)
            outs.append(h)
        return tuple(outs)

    def output_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-layer output shape for one example (no batch axis)."""
        shapes, shape = [], self.input_shape
        for layer in self.layers:
            shape = _out_shape(layer, shape)
            shapes.append(shape)
        return tuple(shapes)

    def hidden_layers(self) -> tuple[int, ...]:
        """Indices of the hidden representations φ(x): outputs of hidden nonlinearities."""
        return tuple(i for i, l in enumerate(self.layers[:-1]) if l.kind in ("sigmoid", "relu", "maxpool"))

    def num_params(self) -> int:
        return sum(_layer_param_count(l, s) for l, s in zip(self.layers, (self.input_shape,) + self.output_shapes()[:-1]))


# -- layers -----------------------------------------------------------------

def apply_layer(layer: Layer, p: dict, h: jax.Array) -> jax.Array:
    kind = layer.kind
    if kind == "dense":
        return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]
    if kind == "conv":
        return conv2d(h, p["w"], layer.stride, layer.padding) + p["b"]
    if kind == "sigmoid":
        return jax.nn.sigmoid(h)
    if kind == "relu":
        return jax.nn.relu(h)
    if kind == "maxpool":
        return max_pool(h, layer.kernel, layer.stride)
    if kind == "flatten":
        return h.reshape(h.shape[0], -1)
    raise ValueError(f"unknown layer kind {kind!r}")


def conv2d(h: jax.Array, kernel: jax.Array, stride: int, padding: str) -> jax.Array:
    """NHWC activations ⊛ an HWIO kernel, as lax.conv_general_dilated computes it, written as one matmul.

    The k × k shifted (and strided) views of the input are stacked along the
    channels, the k·k·C_in columns of each output pixel, and multiplied by the
    kernel reshaped to [k·k·C_in, C_out]. Its gradients are then matmuls too,
    and XLA:CPU runs matmuls well: inside the training loop (a `lax.scan`, as
    `jaxadv.train.fit` runs it) a ConvNet step of 128 images took 334 ms with
    XLA's convolution and reduce_window pooling, and 34 ms with this form and
    `max_pool` (`scripts/bench_train.py`, 50 steps; in a trace, XLA's
    convolutions were nearly all of the 334). The values equal lax.conv_general_dilated's
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


def max_pool(h: jax.Array, window: int, stride: int) -> jax.Array:
    """Max pooling of NHWC activations over window × window patches, VALID.

    Non-overlapping windows (window == stride) are a reshape and a max. The
    gradient of XLA's reduce_window max (select-and-scatter, which XLA:CPU
    lowers to iotas, a reduce_window over pairs and a scatter) took two
    thirds of a ConvNet gradient computed on its own (one jitted forward and
    backward pass of 128 images, outside any loop, one CPU thread: 71 ms with
    reduce_window, 24 ms with the reshape); a reshape's max costs next to
    nothing.
    The values are the same; so are the gradients, except that a window
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


def _out_shape(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layer.kind == "dense":
        return (layer.features,)
    if layer.kind == "conv":
        h, w, _ = shape
        if layer.padding == "SAME":
            return (math.ceil(h / layer.stride), math.ceil(w / layer.stride), layer.features)
        return ((h - layer.kernel) // layer.stride + 1, (w - layer.kernel) // layer.stride + 1, layer.features)
    if layer.kind == "maxpool":
        h, w, c = shape
        return ((h - layer.kernel) // layer.stride + 1, (w - layer.kernel) // layer.stride + 1, c)
    if layer.kind == "flatten":
        return (math.prod(shape),)
    return shape


def _layer_param_count(layer: Layer, in_shape: tuple[int, ...]) -> int:
    if layer.kind == "dense":
        return math.prod(in_shape) * layer.features + layer.features
    if layer.kind == "conv":
        return layer.kernel * layer.kernel * in_shape[-1] * layer.features + layer.features
    return 0


def _init_layer(layer: Layer, key, in_shape):
    out_shape = _out_shape(layer, in_shape)
    if layer.kind == "dense":
        shape = (math.prod(in_shape), layer.features)
    elif layer.kind == "conv":
        shape = (layer.kernel, layer.kernel, in_shape[-1], layer.features)
    else:
        return {}, out_shape
    w = jax.nn.initializers.glorot_uniform()(key, shape, jnp.float32)
    return {"w": w, "b": jnp.zeros((layer.features,), jnp.float32)}, out_shape


# -- the paper's weight decay ---------------------------------------------

def weight_decay_penalty(model: Model, params: Params) -> jax.Array:
    """Σ_layers λ_l · Σ W_l² / k_l, with k_l the number of units of layer l.

    This is our reading of the paper's "λΣw²/k" (the reproductions divide λ by
    the layer's width); biases are not decayed.
    """
    total = jnp.float32(0.0)
    for layer, p in zip(model.layers, params):
        if layer.has_params and layer.weight_decay and layer.trainable:
            total = total + layer.weight_decay * jnp.sum(p["w"] ** 2) / layer.features
    return total


# -- the zoo ----------------------------------------------------------------

def _softmax(lam: float) -> Model:
    return Model(f"FC10({_fmt(lam)})", (Layer("dense", 10, weight_decay=lam),),
                 description=f"Softmax with λ = {_fmt(lam)}")


def _sigmoid_mlp(widths: Sequence[int], lams=(1e-5, 1e-5, 1e-6), name: str | None = None) -> Model:
    layers = []
    for width, lam in zip(widths, lams):
        layers += [Layer("dense", width, weight_decay=lam), Layer("sigmoid")]
    layers.append(Layer("dense", 10, weight_decay=lams[-1]))
    name = name or "FC" + "-".join(str(w) for w in widths) + "-10"
    return Model(name, tuple(layers), description="Sigmoid network λ = 1e-5, 1e-5, 1e-6")


def _autoencoder_softmax() -> Model:
    return Model("AE400-10",
                 (Layer("dense", 400, trainable=False), Layer("sigmoid"), Layer("dense", 10, weight_decay=1e-6)),
                 description="Sparse autoencoder (400 sigmoid units, frozen) with Softmax λ = 1e-6",
                 pretrain="sparse_autoencoder")


def _convnet() -> Model:
    # The paper names no architecture for its MNIST convnet (§3); this is a small
    # LeNet-style net that trains in about a minute on two CPU cores.
    return Model("ConvNet", (
        Layer("conv", 16, kernel=3, weight_decay=1e-5), Layer("relu"), Layer("maxpool", kernel=2, stride=2),
        Layer("conv", 32, kernel=3, weight_decay=1e-5), Layer("relu"), Layer("maxpool", kernel=2, stride=2),
        Layer("flatten"),
        Layer("dense", 100, weight_decay=1e-5), Layer("relu"),
        Layer("dense", 10, weight_decay=1e-6)),
        description="Conv 3x3x16 - pool - conv 3x3x32 - pool - FC100 (ReLU), λ = 1e-5, 1e-6")


def _fmt(lam: float) -> str:
    return "1" if lam == 1 else f"1e-{round(-math.log10(lam))}"


_REGISTRY: dict[str, Callable[[], Model]] = {
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


def get_model(name: str) -> Model:
    """The model registered under `name` (the paper's names, e.g. "FC100-100-10")."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None
