"""Upper Lipschitz bounds of each layer and of a whole network (the paper's §4.3).

For an input perturbation of L2 norm 1, a layer can move its output by at most
its upper Lipschitz constant L_k, and the network by at most Π_k L_k:

- dense layer: the operator norm of W, its largest singular value;
- convolution: the paper's Fourier method (its Eq. 1). A circular convolution is
  diagonalised by the 2-D DFT, so per frequency it is the D×C matrix of the
  kernels' DFTs; a stride Δ folds the Δ² frequencies that alias onto one
  frequency of the output grid into one D×(C·Δ²) matrix A(ξ). The operator norm
  is the largest singular value of A(ξ) over the output's frequency grid;
- ReLU and flatten: 1; sigmoid: 1/4 (the largest slope);
- max-pooling: 1 when windows do not overlap. Overlapping windows (AlexNet's
  3×3, stride 2) can all select the same input, so the bound is the square root
  of the largest number of windows that cover one input (2 for 3×3/2);
- contrast normalisation x / (ε + ‖x‖²)^γ: ε^(−γ).

`power_iteration_norm` estimates the same operator norms from the real layer
(its own padding and stride, transposed with `jax.vjp`): an independent check
from below, since a Rayleigh quotient never exceeds the largest singular value.

The logits move by at most L‖r‖, so the top-two margin m shrinks by at most
√2·L‖r‖ and no perturbation shorter than m / (√2 L) changes the prediction
(`certified_radius`).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.models import Layer, Model, Params, apply_layer

SIGMOID_BOUND = 0.25   # max of σ'(t) = σ(t)(1 − σ(t)), reached at t = 0
RELU_BOUND = 1.0       # max(0, ·) is 1-Lipschitz
FLATTEN_BOUND = 1.0    # a reshape is an isometry

CONV_PADDINGS = ("SAME", "VALID", "CIRCULAR")


# -- dense layers -------------------------------------------------------------

def dense_operator_norm(w: jax.Array) -> float:
    """Largest singular value of the matrix `w` (exact, up to float32 rounding).

    The square root of the largest eigenvalue of the Gram matrix of the smaller
    side (see `_largest_eigenvalue`): as exact as an SVD for the top singular
    value, and several times faster than `jnp.linalg.norm(w, 2)` on 9216×4096.
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a matrix, got shape {w.shape}")
    return math.sqrt(_largest_eigenvalue(_gram_of_smaller_side(w[None])))


@jax.jit
def _gram_of_smaller_side(a: jax.Array) -> jax.Array:
    """AᴴA or AAᴴ, whichever is smaller, for a batch of matrices [..., m, n]."""
    a_h = jnp.conj(jnp.swapaxes(a, -1, -2))
    return a_h @ a if a.shape[-2] >= a.shape[-1] else a @ a_h


def _largest_eigenvalue(gram: jax.Array) -> float:
    """max over the batch of the top eigenvalue of Hermitian PSD matrices.

    NumPy's LAPACK eigvalsh (values only) on the host: `jnp.linalg.eigvalsh`
    also computes eigenvectors on CPU and is several times slower.
    """
    return max(float(np.linalg.eigvalsh(np.asarray(gram))[..., -1].max()), 0.0)


# -- convolutions: the Fourier method -----------------------------------------

def fourier_grid(input_hw: Sequence[int], kernel_size: int, stride: int, padding: str) -> tuple[int, int]:
    """The DFT grid on which the circular convolution bounds the real one.

    CIRCULAR: the input size itself (the paper's setting: kernels zero-padded to
    the feature map). SAME / VALID: the zero-padded input, rounded up to a
    multiple of the stride. On that grid no output of the real layer wraps
    around, so the real layer is the circular one restricted to a subset of
    inputs (zero elsewhere) and outputs, and its norm can only be smaller.
    """
    h, w = _check_hw(input_hw)
    _check_positive_int(kernel_size, "kernel_size")
    _check_positive_int(stride, "stride")
    if padding not in CONV_PADDINGS:
        raise ValueError(f"padding must be one of {CONV_PADDINGS}, got {padding!r}")
    if padding == "CIRCULAR":
        if h % stride or w % stride:
            raise ValueError(f"a circular convolution needs input_hw {input_hw} divisible by the stride {stride}")
        if kernel_size > min(h, w):
            raise ValueError(f"kernel_size {kernel_size} exceeds the circular grid {input_hw}")
        return h, w
    grid = []
    for n in (h, w):
        padded = n
        if padding == "SAME":   # XLA's SAME: out = ceil(n / stride), padding split around the input
            out = -(-n // stride)
            padded = n + max((out - 1) * stride + kernel_size - n, 0)
        padded = max(padded, kernel_size)
        grid.append(-(-padded // stride) * stride)
    return grid[0], grid[1]


def conv_operator_norm(kernel: jax.Array, input_hw: Sequence[int], stride: int = 1,
                       padding: str = "CIRCULAR") -> float:
    """Operator norm bound of a multi-channel 2-D convolution by the Fourier method.

    `kernel` is HWIO [k, k, C, D] (as in `jax.lax.conv_general_dilated`), the
    input is [input_hw, C]. With padding CIRCULAR the result is the exact norm
    of the strided circular convolution; with SAME or VALID it is an upper bound
    of the real zero-padded layer (see `fourier_grid`).

    Output frequency η (on the grid of size N/Δ) collects the input frequencies
    ξ = η + l·N/Δ, l ∈ [0, Δ)²; subsampling by Δ averages them, so with unitary
    DFTs z(η) = Δ⁻¹ Σ_l ŵ(ξ_l)ᵀ x(ξ_l), and the norm is Δ⁻¹ max_η σ_max of the
    D × (C·Δ²) matrix [ŵ_{c,d}(η + l·N/Δ)]. (The paper writes the factor as Δ⁻²
    under its own DFT normalisation; ours is checked against dense matrices.)
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be HWIO [k, k, C, D], got shape {kernel.shape}")
    size, _, c, d = kernel.shape
    grid_h, grid_w = fourier_grid(input_hw, size, stride, padding)
    return _fourier_norm(kernel, grid_h, grid_w, stride)


def _fourier_norm(kernel: jax.Array, grid_h: int, grid_w: int, stride: int) -> float:
    return math.sqrt(_largest_eigenvalue(_folded_gram(kernel, grid_h, grid_w, stride))) / stride


@partial(jax.jit, static_argnames=("grid_h", "grid_w", "stride"))
def _folded_gram(kernel: jax.Array, grid_h: int, grid_w: int, stride: int) -> jax.Array:
    """The Gram matrices of A(η) for half the output frequencies η."""
    _, _, c, d = kernel.shape
    # Cross-correlation (what lax.conv computes) has the conjugate spectrum of
    # convolution; conjugation leaves singular values unchanged.
    spectrum = jnp.fft.fft2(kernel.astype(jnp.float32), s=(grid_h, grid_w), axes=(0, 1))
    mh, mw = grid_h // stride, grid_w // stride
    # Split each frequency axis as ξ = l·m + η, then gather the Δ² aliases of η.
    folded = spectrum.reshape(stride, mh, stride, mw, c, d).transpose(1, 3, 5, 0, 2, 4)
    # A real kernel has ŵ(−ξ) = conj ŵ(ξ), so A(−η) is A(η) conjugated with its
    # columns permuted: the same singular values. Half the η grid suffices.
    folded = folded[:, :mw // 2 + 1].reshape(-1, d, stride * stride * c)
    return _gram_of_smaller_side(folded)


# -- power iteration on the real operator --------------------------------------

def power_iteration_norm(linear_fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int],
                         key: jax.Array, num_iterations: int = 100) -> jax.Array:
    """‖J v‖ for the v that power iteration on JᵀJ reaches; `linear_fn` is J.

    Jᵀ comes from `jax.vjp`, so any linear map (a layer with its own padding and
    stride) works. The result is a Rayleigh-quotient estimate: never above the
    true norm, and converging to it from below.
    """
    _check_positive_int(num_iterations, "num_iterations")
    input_shape = tuple(int(n) for n in input_shape)
    v0 = jax.random.normal(key, input_shape, jnp.float32)
    v0 = v0 / jnp.linalg.norm(v0)
    _, pullback = jax.vjp(linear_fn, v0)   # J is linear: its transpose does not depend on v0

    def step(_, v):
        u = pullback(linear_fn(v))[0]
        return u / jnp.linalg.norm(u)

    v = jax.lax.fori_loop(0, num_iterations, step, v0)
    return jnp.linalg.norm(linear_fn(v))


def layer_power_iteration(layer: Layer, params: dict, input_shape: Sequence[int], key: jax.Array,
                          num_iterations: int = 100) -> jax.Array:
    """Power-iteration norm of a dense or conv layer's linear part (bias dropped)."""
    if not layer.has_params:
        raise ValueError(f"layer must be dense or conv, got {layer.kind!r}")
    linear_params = {"w": params["w"], "b": jnp.zeros_like(params["b"])}
    fn = jax.jit(lambda x: apply_layer(layer, linear_params, x))
    return power_iteration_norm(fn, (1, *input_shape), key, num_iterations)


# -- parameter-free layers ----------------------------------------------------

def max_pool_bound(input_hw: Sequence[int], window: int, stride: int) -> float:
    """√(largest number of VALID pooling windows covering one input).

    |max(a) − max(b)| ≤ max|a − b|, so ‖Δy‖² ≤ Σ_windows ‖Δx_window‖² ≤ cover·‖Δx‖².
    The bound is reached by moving one input that is the maximum of every
    window covering it. Non-overlapping windows give 1, the paper's value.
    """
    h, w = _check_hw(input_hw)
    _check_positive_int(window, "window")
    _check_positive_int(stride, "stride")

    def cover(n: int) -> int:
        outputs = (n - window) // stride + 1
        if outputs < 1:
            raise ValueError(f"pooling window {window} does not fit input_hw {input_hw}")
        counts = np.zeros(n, np.int64)
        for o in range(outputs):
            counts[o * stride:o * stride + window] += 1
        return int(counts.max())

    return math.sqrt(cover(h) * cover(w))


def contrast_normalization_bound(epsilon: float, gamma: float) -> float:
    """ε^(−γ), the Lipschitz bound of x ↦ x / (ε + ‖x‖²)^γ.

    The paper states it for γ ∈ [0.5, 1]. Its Jacobian has eigenvalues
    (ε+s)^(−γ) and (ε + (1−2γ)s)/(ε+s)^(1+γ) with s = ‖x‖², both at most
    (ε+s)^(−γ) ≤ ε^(−γ) in absolute value whenever 0 ≤ γ ≤ 1.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    return float(epsilon ** (-gamma))


# -- walking a model ------------------------------------------------------------

_DISPLAY = {"dense": "FC.", "conv": "Conv.", "sigmoid": "Sigmoid", "relu": "ReLU",
            "maxpool": "Max-pool", "flatten": "Flatten"}


def layer_bounds(model: Model, params: Params, *, power_iterations: int = 0,
                 key: jax.Array | None = None) -> list[dict]:
    """Every layer's upper Lipschitz bound, in order.

    Each entry: `index`, `layer` (the paper's style: "Conv. 1", "FC. 2", "ReLU"),
    `kind`, `shape` ([C, k, k, D] for conv as in Table 5, [in, out] for dense,
    None otherwise), `stride` (None for dense), `upper_bound` (float) and
    `power_iteration` (float for dense/conv when `power_iterations` > 0, else
    None). Convolutions use the Fourier method on the grid of `fourier_grid`
    for their own padding, so every value is a true upper bound.
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a jaxadv.models.Model, got {type(model).__name__}")
    if len(params) != len(model.layers):
        raise ValueError(f"params has {len(params)} entries for {len(model.layers)} layers")
    if power_iterations < 0:
        raise ValueError(f"power_iterations must be >= 0, got {power_iterations}")
    if power_iterations and key is None:
        raise ValueError("key is required when power_iterations > 0")

    in_shapes = (model.input_shape,) + model.output_shapes()[:-1]
    keys = jax.random.split(key, len(model.layers)) if power_iterations else [None] * len(model.layers)
    counts = {"dense": 0, "conv": 0}
    rows = []
    for index, (layer, p, in_shape, k) in enumerate(zip(model.layers, params, in_shapes, keys)):
        shape, stride, power = None, layer.stride, None
        name = _DISPLAY.get(layer.kind, layer.kind)
        if layer.kind == "dense":
            counts["dense"] += 1
            name, stride = f"FC. {counts['dense']}", None
            shape = [int(n) for n in p["w"].shape]
            bound = dense_operator_norm(p["w"])
        elif layer.kind == "conv":
            counts["conv"] += 1
            name = f"Conv. {counts['conv']}"
            size, _, c, d = p["w"].shape
            shape = [int(c), int(size), int(size), int(d)]
            bound = conv_operator_norm(p["w"], in_shape[:2], layer.stride, layer.padding)
        elif layer.kind == "sigmoid":
            bound = SIGMOID_BOUND
        elif layer.kind == "relu":
            bound = RELU_BOUND
        elif layer.kind == "flatten":
            bound, stride = FLATTEN_BOUND, None
        elif layer.kind == "maxpool":
            bound = max_pool_bound(in_shape[:2], layer.kernel, layer.stride)
        else:
            raise ValueError(f"no Lipschitz bound for layer kind {layer.kind!r} (layer {index})")
        if layer.has_params and power_iterations:
            power = float(layer_power_iteration(layer, p, in_shape, k, power_iterations))
        rows.append({"index": index, "layer": name, "kind": layer.kind, "shape": shape,
                     "stride": stride, "upper_bound": float(bound), "power_iteration": power})
    return rows


def network_bound(model: Model, params: Params) -> float:
    """Π_k L_k over all layers: an upper Lipschitz constant of input ↦ logits."""
    return math.prod(row["upper_bound"] for row in layer_bounds(model, params))


def certified_radius(logits: jax.Array, lipschitz: float | jax.Array) -> jax.Array:
    """L2 radius within which the predicted class provably cannot change.

    `logits` [B, K]; `lipschitz` bounds ‖z(x+r) − z(x)‖ / ‖r‖. Each z_y − z_j
    moves by at most √2·‖Δz‖, so the radius is (z_top − z_second) / (√2 L).
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [batch, classes >= 2], got shape {logits.shape}")
    lipschitz = jnp.asarray(lipschitz, jnp.float32)
    if lipschitz.ndim != 0:
        raise ValueError(f"lipschitz must be a scalar, got shape {lipschitz.shape}")
    top_two = jax.lax.top_k(logits, 2)[0]
    return (top_two[:, 0] - top_two[:, 1]) / (jnp.sqrt(2.0) * lipschitz)


# -- validation -----------------------------------------------------------------

def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_hw(input_hw) -> tuple[int, int]:
    if len(input_hw) != 2:
        raise ValueError(f"input_hw must be (height, width), got {input_hw!r}")
    for n in input_hw:
        _check_positive_int(n, "input_hw")
    return int(input_hw[0]), int(input_hw[1])
