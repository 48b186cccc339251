"""The operator norms behind the paper's §4.3 upper Lipschitz bounds, and the radii they certify.

    spectral.dense_operator_norm(w)                                   # ‖W‖₂, exact
    spectral.conv_operator_norm(kernel, (27, 27), 1, "SAME")          # Fourier bound of a real conv layer
    spectral.max_pool_bound((55, 55), 3, 2)                           # √(largest cover) = 2
    spectral.certified_radius(logits, lipschitz)                      # margin / (√2 L)

`jaxadv.lipschitz.operator_bounds` reads a network's operators from its jaxpr
and calls these norms; this module knows nothing about models. For an input
perturbation of L2 norm 1, an operator can move its output by at most its
upper Lipschitz constant L_k, and a chain of them by at most Π_k L_k:

- dense layer: the operator norm of W, its largest singular value;
- convolution: the paper's Fourier method (its Eq. 1). A circular convolution is
  diagonalised by the DFT, so per frequency it is the D×C matrix of the
  kernels' DFTs; a stride Δ folds the frequencies that alias onto one
  frequency of the output grid into one D×(C·ΠΔ) matrix A(ξ). The operator norm
  is the largest singular value of A(ξ) over the output's frequency grid.
  A zero-padded layer is the circular one on a large enough grid restricted
  to some inputs and outputs (`fourier_grid`), so its norm can only be smaller;
  a dilated kernel is a kernel with zeros inserted; feature groups are blocks
  of a block-diagonal operator (the largest block's norm);
- max-pooling: 1 when windows do not overlap. Overlapping windows (AlexNet's
  3×3, stride 2) can all select the same input, so the bound is the square root
  of the largest number of windows that cover one input (2 for 3×3/2);
- sum- and average-pooling: linear, and separable over axes, so the exact norm
  is the product of the norms of one small 0/1 matrix per axis (`sum_pool_norm`);
- contrast normalisation x / (ε + ‖x‖²)^γ: ε^(−γ).

`power_iteration_norm` estimates an operator norm from the real linear map (its
own padding and stride, transposed with `jax.linear_transpose`): an independent
check from below, since a Rayleigh quotient never exceeds the largest singular value.

The logits move by at most L‖r‖, so the top-two margin m shrinks by at most
√2·L‖r‖ and no perturbation shorter than m / (√2 L) changes the prediction
(`certified_radius`, the paper's reading). With the last dense layer W (columns
w_j) kept apart, z_y − z_j moves by at most ‖w_y − w_j‖·L_below‖r‖, which gives
the tighter `pairwise_certified_radius`.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import checks

SIGMOID_BOUND = 0.25   # max of σ'(t) = σ(t)(1 − σ(t)), reached at t = 0
RELU_BOUND = 1.0       # max(0, ·) is 1-Lipschitz

CONV_PADDINGS = ("SAME", "VALID", "CIRCULAR")

#: Axes longer than this get the Schur bound in `sum_pool_norm` instead of an SVD of their window matrix.
EXACT_POOL_AXIS_LIMIT = 4096


# -- dense layers -------------------------------------------------------------

def dense_operator_norm(w: jax.Array) -> float:
    """Largest singular value of the matrix `w` (exact, up to float32 rounding): the square root of the largest
    eigenvalue of the Gram matrix of its smaller side (`_largest_eigenvalue`), as exact as an SVD and faster."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a matrix, got shape {w.shape}")
    return largest_operator_norm(w[None])


def largest_operator_norm(matrices: jax.Array) -> float:
    """max_i ‖A_i‖₂ over a batch of matrices [n, rows, columns]: the norm of their block-diagonal sum."""
    matrices = jnp.asarray(matrices)
    if matrices.ndim != 3:
        raise ValueError(f"matrices must be a batch of matrices [n, rows, columns], got shape {matrices.shape}")
    return math.sqrt(_largest_eigenvalue(_gram_of_smaller_side(matrices.astype(_working_dtype(matrices.dtype)))))


def _working_dtype(dtype) -> jnp.dtype:
    """float32, or the input's wider dtype (float64 under x64): half-precision Gram matrices lose the bound."""
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.promote_types(dtype, jnp.complex64)
    return jnp.promote_types(dtype, jnp.float32)


@jax.jit
def _gram_of_smaller_side(a: jax.Array) -> jax.Array:
    """AᴴA or AAᴴ, whichever is smaller, for a batch of matrices [..., m, n]."""
    a_h = jnp.conj(jnp.swapaxes(a, -1, -2))
    return a_h @ a if a.shape[-2] >= a.shape[-1] else a @ a_h


def _largest_eigenvalue(gram: jax.Array) -> float:
    """max over the batch of the top eigenvalue of Hermitian PSD matrices, by NumPy's LAPACK eigvalsh on the
    host (values only: `jnp.linalg.eigvalsh` also computes eigenvectors on CPU, several times slower)."""
    return max(float(np.linalg.eigvalsh(np.asarray(gram))[..., -1].max()), 0.0)


# -- convolutions: the Fourier method -----------------------------------------

def fourier_grid(spatial_shape: Sequence[int], kernel_shape: Sequence[int], stride=1, padding="SAME",
                 *, input_dilation=1) -> tuple[int, ...]:
    """The DFT grid on which the circular convolution bounds the real one.

    `spatial_shape` and `kernel_shape` (the dilated kernel's extent) have one
    entry per spatial axis; `stride` and `input_dilation` are an int or one per
    axis; `padding` is "CIRCULAR", "SAME", "VALID" (XLA's) or one (low, high)
    pair per axis (negative crops).

    CIRCULAR: the input size itself (the paper's setting: kernels zero-padded to
    the feature map). Otherwise: the zero-padded input (its zeros inserted by
    `input_dilation` too), at least the kernel, rounded up to a multiple of the
    stride. On that grid no output of the real layer wraps around, so the real
    layer is the circular one restricted to a subset of inputs (zero
    elsewhere) and outputs, and its norm can only be smaller.
    """
    spatial = _check_shape(spatial_shape, "spatial_shape")
    kernel = _check_shape(kernel_shape, "kernel_shape")
    if len(kernel) != len(spatial):
        raise ValueError(f"kernel_shape {tuple(kernel_shape)} needs one entry per axis of spatial_shape {spatial}")
    strides = _per_axis(stride, len(spatial), "stride")
    dilations = _per_axis(input_dilation, len(spatial), "input_dilation")
    if isinstance(padding, str):
        if padding not in CONV_PADDINGS:
            raise ValueError(f"padding must be one of {CONV_PADDINGS} or (low, high) pairs, got {padding!r}")
        if padding == "CIRCULAR":
            if any(d != 1 for d in dilations):
                raise ValueError(f"input_dilation must be 1 with circular padding, got {input_dilation}")
            if any(n % s for n, s in zip(spatial, strides)):
                raise ValueError(f"a circular convolution needs spatial_shape {spatial} divisible by the stride {stride}")
            if any(k > n for k, n in zip(kernel, spatial)):
                raise ValueError(f"kernel_shape {kernel} exceeds the circular grid {spatial}")
            return spatial
        dilated = [(n - 1) * d + 1 for n, d in zip(spatial, dilations)]
        pairs = jax.lax.padtype_to_pads(dilated, kernel, strides, padding)
    else:
        pairs = _check_pairs(padding, len(spatial))
    grid = []
    for n, k, s, d, (low, high) in zip(spatial, kernel, strides, dilations, pairs):
        padded = (n - 1) * d + 1 + low + high
        if padded < 1:
            raise ValueError(f"padding {tuple(pairs)} crops all of spatial_shape {spatial}")
        grid.append(-(-max(padded, k) // s) * s)
    return tuple(grid)


def conv_operator_norm(kernel: jax.Array, spatial_shape: Sequence[int], stride=1, padding="CIRCULAR", *,
                       dilation=1, feature_group_count: int = 1) -> float:
    """Operator norm bound of a multi-channel convolution by the Fourier method.

    `kernel` is [*spatial, C / groups, D] (HWIO for 2-D, as `nn.Conv` stores it),
    the input [*spatial_shape, C]; `stride` and `dilation` (of the kernel, XLA's
    rhs_dilation) are an int or one per axis; `padding` as in `fourier_grid`.
    With padding CIRCULAR the result is the exact norm of the strided circular
    convolution; otherwise an upper bound of the real zero-padded layer.
    """
    kernel = jnp.asarray(kernel)
    spatial = _check_shape(spatial_shape, "spatial_shape")
    if kernel.ndim != len(spatial) + 2:
        raise ValueError(f"kernel must be [*spatial, C, D] with {len(spatial)} spatial axes, got shape {kernel.shape}")
    kernel = dilate_kernel(kernel, dilation)
    grid = fourier_grid(spatial, kernel.shape[:-2], stride, padding)
    return circular_conv_norm(kernel, grid, stride, feature_group_count)


def dilate_kernel(kernel: jax.Array, dilation) -> jax.Array:
    """The kernel [*spatial, C, D] with dilation − 1 zeros between its taps (XLA's rhs_dilation, "atrous")."""
    kernel = jnp.asarray(kernel)
    dilations = _per_axis(dilation, kernel.ndim - 2, "dilation")
    if all(d == 1 for d in dilations):
        return kernel
    shape = tuple((k - 1) * d + 1 for k, d in zip(kernel.shape[:-2], dilations)) + kernel.shape[-2:]
    taps = tuple(slice(None, None, d) for d in dilations)
    return jnp.zeros(shape, kernel.dtype).at[taps].set(kernel)


def circular_conv_norm(kernel: jax.Array, grid: Sequence[int], stride=1, feature_group_count: int = 1) -> float:
    """Exact operator norm of the strided circular cross-correlation of `kernel` on `grid`.

    `kernel` [*spatial, C / groups, D]; `stride` an int or one per axis, each
    dividing its grid size. Output frequency η (on the grid of size N/Δ per axis)
    collects the input frequencies ξ = η + l·N/Δ, l ∈ Π[0, Δ); subsampling by Δ
    averages them, so with unitary DFTs z(η) = (ΠΔ)^(−1/2) Σ_l ŵ(ξ_l)ᵀ x(ξ_l), and
    the norm is (ΠΔ)^(−1/2) max_η σ_max of the D × (C·ΠΔ) matrix [ŵ_{c,d}(η + l·N/Δ)].
    (In 2-D with stride Δ that factor is Δ⁻¹; the paper writes Δ⁻² under its own DFT
    normalisation; ours is checked against dense matrices.) Feature groups make
    the operator block-diagonal: the largest block's norm.
    """
    kernel = jnp.asarray(kernel)
    grid = _check_shape(grid, "grid")
    if kernel.ndim != len(grid) + 2:
        raise ValueError(f"kernel must be [*spatial, C, D] with {len(grid)} spatial axes, got shape {kernel.shape}")
    strides = _per_axis(stride, len(grid), "stride")
    if any(g % s for g, s in zip(grid, strides)):
        raise ValueError(f"stride {stride} must divide every axis of the grid {grid}")
    if any(k > g for k, g in zip(kernel.shape, grid)):
        raise ValueError(f"kernel {kernel.shape[:-2]} exceeds the grid {grid}")
    _check_positive_int(feature_group_count, "feature_group_count")
    if kernel.shape[-1] % feature_group_count:
        raise ValueError(f"feature_group_count {feature_group_count} must divide the kernel's {kernel.shape[-1]} "
                         "output features")
    gram = _folded_gram(kernel, grid, strides, feature_group_count)
    return math.sqrt(_largest_eigenvalue(gram) / math.prod(strides))


@partial(jax.jit, static_argnames=("grid", "strides", "groups"))
def _folded_gram(kernel: jax.Array, grid: tuple[int, ...], strides: tuple[int, ...], groups: int) -> jax.Array:
    """The Gram matrices of A(η) for half the output frequencies η, every feature group."""
    n = len(grid)
    c, d = kernel.shape[-2:]
    # Groups first: [groups, *spatial, C/groups, D/groups], one block-diagonal block each.
    blocks = jnp.moveaxis(kernel.reshape(kernel.shape[:-1] + (groups, d // groups)), -2, 0)
    # Cross-correlation (what lax.conv computes) has the conjugate spectrum of
    # convolution; conjugation leaves singular values unchanged.
    spectrum = jnp.fft.fftn(blocks.astype(_working_dtype(kernel.dtype)), s=grid, axes=tuple(range(1, n + 1)))
    reduced = tuple(g // s for g, s in zip(grid, strides))
    # Split each frequency axis as ξ = l·m + η, then gather the aliases of η.
    split = spectrum.reshape((groups,) + sum(((s, m) for s, m in zip(strides, reduced)), ()) + (c, d // groups))
    eta_axes = tuple(2 + 2 * i for i in range(n))
    alias_axes = tuple(1 + 2 * i for i in range(n))
    folded = split.transpose((0,) + eta_axes + (2 * n + 2,) + alias_axes + (2 * n + 1,))
    # A real kernel has ŵ(−ξ) = conj ŵ(ξ), so A(−η) is A(η) conjugated with its
    # columns permuted: the same singular values. Half the η grid suffices.
    if n:
        folded = folded[(slice(None),) * n + (slice(0, reduced[-1] // 2 + 1),)]
    folded = folded.reshape(-1, d // groups, math.prod(strides) * c)
    return _gram_of_smaller_side(folded)


# -- power iteration on the real operator --------------------------------------

def power_iteration_norm(linear_fn: Callable[[jax.Array], jax.Array], input_shape: Sequence[int],
                         key: jax.Array, num_iterations: int = 100, *, dtype=jnp.float32) -> jax.Array:
    """‖J v‖ for the v that power iteration on JᵀJ reaches; `linear_fn` is J.

    Jᵀ comes from `jax.linear_transpose`, so any linear map (a layer with its own
    padding and stride, bias left out) works. The result is a Rayleigh-quotient
    estimate: never above the true norm, and converging to it from below.
    """
    _check_positive_int(num_iterations, "num_iterations")
    input_shape = tuple(int(n) for n in input_shape)
    transpose = jax.linear_transpose(linear_fn, jax.ShapeDtypeStruct(input_shape, dtype))
    v0 = jax.random.normal(key, input_shape, dtype)

    @jax.jit
    def iterate(v):
        def step(_, v):
            v = v / jnp.linalg.norm(v)
            return transpose(linear_fn(v))[0]
        v = jax.lax.fori_loop(0, num_iterations, step, v)
        return jnp.linalg.norm(linear_fn(v / jnp.linalg.norm(v)))

    return iterate(v0)


# -- pooling and normalisation -----------------------------------------------

def window_matrix(size: int, window: int, stride: int, padding: tuple[int, int] = (0, 0), *,
                  input_dilation: int = 1, window_dilation: int = 1) -> np.ndarray:
    """0/1 matrix [outputs, size] of one axis of a pooling: which inputs each window covers.

    XLA's reduce_window semantics: the inputs sit `input_dilation` apart on a
    grid padded by `padding` (low, high), and window o covers grid positions
    o·stride + u·window_dilation, u < window. Padded and dilated positions hold
    the reduction's neutral value, not inputs, so they have no column.
    """
    for value, name in ((size, "size"), (window, "window"), (stride, "stride"),
                        (input_dilation, "input_dilation"), (window_dilation, "window_dilation")):
        _check_positive_int(value, name)
    low, high = _check_pairs([padding], 1)[0]
    extent = (window - 1) * window_dilation + 1
    padded = (size - 1) * input_dilation + 1 + low + high
    outputs = (padded - extent) // stride + 1
    if padded < extent or outputs < 1:
        raise ValueError(f"pooling window {window} does not fit an axis of size {size} with padding {padding}")
    matrix = np.zeros((outputs, size))
    for o in range(outputs):
        for u in range(window):
            position = o * stride + u * window_dilation - low
            if position % input_dilation == 0 and 0 <= position // input_dilation < size:
                matrix[o, position // input_dilation] = 1.0
    return matrix


def max_pool_bound(spatial_shape: Sequence[int], window, stride, padding="VALID") -> float:
    """√(largest number of pooling windows covering one input).

    |max(a) − max(b)| ≤ max|a − b|, so ‖Δy‖² ≤ Σ_windows ‖Δx_window‖² ≤ cover·‖Δx‖².
    The bound is reached by moving one input that is the maximum of every
    window covering it. Non-overlapping windows give 1, the paper's value.
    `window` and `stride` are an int or one per axis; `padding` "VALID",
    "SAME" or (low, high) pairs.
    """
    return math.sqrt(math.prod(int(m.sum(axis=0).max()) for m in _pool_matrices(spatial_shape, window, stride, padding)))


def sum_pool_norm(spatial_shape: Sequence[int], window, stride, padding="VALID") -> float:
    """Exact operator norm of sum pooling (an average pool is this over the window size).

    The operator is the Kronecker product of one window matrix per axis
    (`window_matrix`), so its norm is the product of theirs. Non-overlapping
    windows give √(window size); in general it lies between that and the Schur
    bound √(window size · largest cover). An axis longer than
    EXACT_POOL_AXIS_LIMIT gets the Schur bound instead of an SVD.
    """
    return math.prod(_window_matrix_norm(m) for m in _pool_matrices(spatial_shape, window, stride, padding))


def _window_matrix_norm(matrix: np.ndarray) -> float:
    if max(matrix.shape) > EXACT_POOL_AXIS_LIMIT:
        return math.sqrt(matrix.sum(axis=1).max() * matrix.sum(axis=0).max())
    return float(np.linalg.norm(matrix, 2))


def _pool_matrices(spatial_shape, window, stride, padding) -> list[np.ndarray]:
    spatial = _check_shape(spatial_shape, "spatial_shape")
    windows = _per_axis(window, len(spatial), "window")
    strides = _per_axis(stride, len(spatial), "stride")
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME', 'VALID' or (low, high) pairs, got {padding!r}")
        pairs = jax.lax.padtype_to_pads(spatial, windows, strides, padding)
    else:
        pairs = _check_pairs(padding, len(spatial))
    return [window_matrix(n, k, s, p) for n, k, s, p in zip(spatial, windows, strides, pairs)]


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


# -- certified radii ------------------------------------------------------------

def certified_radius(logits: jax.Array, lipschitz: float | jax.Array) -> jax.Array:
    """L2 radius within which the predicted class provably cannot change (the paper's global bound).

    `logits` [B, K]; `lipschitz` bounds ‖z(x+r) − z(x)‖ / ‖r‖. Each z_y − z_j
    moves by at most √2·‖Δz‖, so the radius is (z_top − z_second) / (√2 L).
    """
    logits = _check_logits(logits)
    if jnp.ndim(lipschitz) != 0:
        raise ValueError(f"lipschitz must be a scalar, got shape {jnp.shape(lipschitz)}")
    lipschitz = jnp.asarray(lipschitz, logits.dtype)
    if not checks.is_traced(lipschitz) and not bool(lipschitz > 0):    # inf is a bound (radius 0); NaN, 0 are not
        raise ValueError(f"lipschitz must be > 0 (inf allowed), got {lipschitz}")
    top_two = jax.lax.top_k(logits, 2)[0]
    return (top_two[:, 0] - top_two[:, 1]) / (jnp.sqrt(jnp.asarray(2.0, logits.dtype)) * lipschitz)


def pairwise_certified_radius(logits: jax.Array, head_weights: jax.Array,
                              features_bound: float | jax.Array, labels=None) -> jax.Array:
    """min_{j≠y} (z_y − z_j) / (‖w_y − w_j‖ · L_below): the radius per logit difference.

    `logits` [B, K] = h(x) W + b with `head_weights` W [F, K] (columns w_j) and
    `features_bound` L_below an upper Lipschitz constant of x ↦ h(x). z_y − z_j
    = h·(w_y − w_j) + const moves by at most ‖w_y − w_j‖·L_below·‖r‖, so no
    class j overtakes the prediction y within that pair's radius; the minimum
    over j is certified. Since ‖w_y − w_j‖ ≤ √2‖W‖ and z_y − z_j ≥ the top-two
    margin, it is never below `certified_radius(logits, ‖W‖·L_below)`. For a
    linear model (L_below = 1) it is the exact distance to the nearest
    decision boundary. A pair with w_y = w_j never flips (infinite radius).
    labels: [B] the class y to keep (default the prediction); 0 where another class leads.
    """
    logits = _check_logits(logits)
    chosen = jnp.argmax(logits, axis=1) if labels is None else checks.labels(labels, logits.shape[0], logits.shape[1])
    head_weights = jnp.asarray(head_weights, logits.dtype)
    if head_weights.ndim != 2 or head_weights.shape[1] != logits.shape[1]:
        raise ValueError(f"head_weights must be [features, {logits.shape[1]}] for logits of shape {logits.shape}, "
                         f"got shape {head_weights.shape}")
    features_bound = jnp.asarray(features_bound, logits.dtype)
    if features_bound.ndim != 0:
        raise ValueError(f"features_bound must be a scalar, got shape {features_bound.shape}")
    # ‖w_i − w_j‖ for every pair, straight from the differences (a Gram matrix would cancel for close
    # columns), one class at a time: [K, K] without a [F, K, K] array (4·10⁹ for AlexNet's last layer).
    pair_table = jax.lax.map(lambda column: jnp.linalg.norm(head_weights - column[:, None], axis=0), head_weights.T)
    pair_norms = pair_table[chosen]                                                      # [B, K]
    margins = jnp.take_along_axis(logits, chosen[:, None], axis=1) - logits              # [B, K]
    radii = jnp.where(pair_norms > 0, margins / (jnp.where(pair_norms > 0, pair_norms, 1) * features_bound),
                      jnp.where(margins > 0, jnp.inf, 0.0))
    radii = jnp.min(jnp.where(jnp.arange(logits.shape[1]) == chosen[:, None], jnp.inf, radii), axis=1)
    return radii if labels is None else jnp.maximum(radii, 0)


# -- validation -----------------------------------------------------------------

def _check_logits(logits) -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [batch, classes >= 2], got shape {logits.shape}")
    if not checks.is_traced(logits) and not bool(jnp.all(jnp.isfinite(logits))):
        raise ValueError(f"logits: {int(jnp.sum(~jnp.all(jnp.isfinite(logits), axis=-1)))} rows hold NaN or "
                         "infinite values; a radius needs finite logits")
    # At least float32: a bound above 65504 would overflow in float16.
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_shape(shape, name: str) -> tuple[int, ...]:
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {shape!r}") from None
    if not shape:
        raise ValueError(f"{name} must have at least one axis, got {shape!r}")
    for n in shape:
        _check_positive_int(n, name)
    return tuple(int(n) for n in shape)


def _per_axis(value, num_axes: int, name: str) -> tuple[int, ...]:
    """An int for every axis, or one per axis."""
    values = (value,) * num_axes if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer or one per axis, got {value!r}") from None
    if len(values) != num_axes:
        raise ValueError(f"{name} must be a positive integer or {num_axes} of them, got {value!r}")
    for v in values:
        _check_positive_int(v, name)
    return tuple(int(v) for v in values)


def _check_pairs(padding, num_axes: int) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple((int(low), int(high)) for low, high in padding)
    except (TypeError, ValueError):
        raise ValueError(f"padding must be a string or (low, high) pairs, got {padding!r}") from None
    if len(pairs) != num_axes:
        raise ValueError(f"padding must have {num_axes} (low, high) pairs, got {padding!r}")
    return pairs
