"""The Lipschitz analysis' rules for convolutions, pooling and nonlinearities (`RULES`).

Rules as in `jaxadv.lipschitz_rules`, on its `Traced` values. The patterns
(`jaxadv.patterns`) have rewritten the graph before any rule runs: a
convolution, however written, reaches the `convolution` rule; jnp.where on the
sign of a value, `leaky_relu`; a sum scaled by a constant, `average`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from jax.extend import core as jex_core

from jaxadv import spectral
from jaxadv.graph import NoRule, bind_with
from jaxadv.lipschitz_rules import Traced, copies_of, merge, scale_factor, the_traced_input, traced_inputs, unary

__all__ = ["RULES"]



def _conv_general_dilated(walker, eqn, inputs):
    """Reached only where `jaxadv.patterns.xla_convolutions` could not make it a `convolution`."""
    if isinstance(inputs[1], Traced):
        raise NoRule("'conv_general_dilated' with an input-dependent kernel has no global Lipschitz bound")
    raise NoRule(f"'conv_general_dilated' with batch_group_count {eqn.params['batch_group_count']} has no rule")


def _convolution(walker, eqn, inputs):
    """A convolution (`jaxadv.patterns.CONVOLUTION`) bounded by the Fourier method on the right grid.

    A zero padding folded in is part of its `padding`; along a `circular`
    axis it is a circular convolution of its input, whose Fourier norm is exact.
    """
    x, p = inputs[0], eqn.params
    original_kernel = p["kernel"](inputs[1])
    kernel = spectral.dilate_kernel(original_kernel, p["kernel_dilation"])
    extent = kernel.shape[:-2]
    grid, fourier_strides = [], []
    for i, axis in enumerate(p["spatial_axes"]):
        size, stride = x.shape[axis], p["strides"][i]
        if p["circular"][i]:
            grid.append(size)
            # Stride not dividing the grid: the stride-1 circular convolution, of which these outputs are a subset.
            fourier_strides.append(stride if size % stride == 0 else 1)
        else:
            grid += spectral.fourier_grid((size,), (extent[i],), stride, [p["padding"][i]],
                                          input_dilation=p["input_dilation"][i])
            fourier_strides.append(stride)
    factor = spectral.circular_conv_norm(kernel, tuple(grid), tuple(fourier_strides), p["groups"])
    shape = [int(original_kernel.shape[-2]), *(int(k) for k in original_kernel.shape[:-2]),
             int(original_kernel.shape[-1])]
    strides = p["strides"]
    stride = strides[0] if len(set(strides)) == 1 else list(strides)
    return [unary(eqn, x, factor, "conv", shape=shape, stride=stride, primitive=p["primitive"],
                  operator=lambda v: bind_with(eqn, inputs, {0: v}))]


# -- rules: pooling and reductions ------------------------------------------------------------

def _window_matrices(eqn, x: Traced) -> list[tuple[int, np.ndarray]]:
    """(axis, window matrix) for every axis the reduce_window actually pools."""
    p = eqn.params
    out = []
    for axis, (size, window, stride, pads, base, dilation) in enumerate(zip(
            x.shape, p["window_dimensions"], p["window_strides"], p["padding"], p["base_dilation"],
            p["window_dilation"])):
        if (window, stride, tuple(pads), base, dilation) != (1, 1, (0, 0), 1, 1):
            out.append((axis, spectral.window_matrix(size, window, stride, tuple(pads), input_dilation=base,
                                                     window_dilation=dilation)))
    return out


def _pool_fields(eqn, matrices) -> dict:
    axes = [axis for axis, _ in matrices]
    strides = [eqn.params["window_strides"][a] for a in axes]
    return {"shape": [int(eqn.params["window_dimensions"][a]) for a in axes],
            "stride": strides[0] if len(set(strides)) == 1 else strides}


def _reduce_window_sum(walker, eqn, inputs):
    (x,) = inputs
    matrices = _window_matrices(eqn, x)
    factor = math.prod(spectral._window_matrix_norm(m) for _, m in matrices)   # Kronecker product: exact
    return [unary(eqn, x, factor, "sumpool", "Sum-pool", operator=lambda v: bind_with(eqn, inputs, {0: v}),
                   **_pool_fields(eqn, matrices))]


def _reduce_window_extremum(walker, eqn, inputs):
    (x,) = inputs
    matrices = _window_matrices(eqn, x)
    cover = math.prod(int(m.sum(axis=0).max()) for _, m in matrices)   # windows covering one input, at most
    name = "Max-pool" if eqn.primitive.name == "reduce_window_max" else "Min-pool"
    return [unary(eqn, x, math.sqrt(cover), "maxpool", name, **_pool_fields(eqn, matrices))]


def _reduce_sum(walker, eqn, inputs):
    (x,) = inputs
    count = math.prod(x.shape[a] for a in eqn.params["axes"])   # Σ of n values: √n (Cauchy–Schwarz, reached)
    return [unary(eqn, x, math.sqrt(count), "sum", "Sum", silent=count == 1,
                   operator=lambda v: bind_with(eqn, inputs, {0: v}))]


def _reduce_extremum(walker, eqn, inputs):
    (x,) = inputs   # disjoint sets: |max a − max b| ≤ max |a − b| per output
    return [unary(eqn, x, 1.0, "maxpool", "Max-pool" if eqn.primitive.name == "reduce_max" else "Min-pool")]


#: The sums an `average` scales: primitive -> (its rule, the average's kind and name).
_SUMS = {"reduce_sum": (_reduce_sum, "mean", "Mean"), "reduce_window_sum": (_reduce_window_sum, "avgpool", "Avg-pool")}


def _average(walker, eqn, inputs):
    """`jaxadv.patterns.AVERAGE`, a sum (pool) scaled by a constant: one average pool, or a mean."""
    pool, scale = eqn.params["jaxpr"].eqns
    sum_rule, kind, name = _SUMS[pool.primitive.name]
    (pooled,) = sum_rule(walker, pool, inputs[:1])
    values = dict(zip(eqn.params["jaxpr"].invars[1:], inputs[1:]))
    scale_inputs = [pooled if var is pool.outvars[0] else var.val if isinstance(var, jex_core.Literal)
                    else values[var] for var in scale.invars]
    _, _, factor = scale_factor(scale, scale_inputs)
    row = pooled.row
    return [unary(eqn, inputs[0], row.upper_bound * factor, kind, name, shape=row.shape, stride=row.stride,
                  operator=lambda v: bind_with(eqn, inputs, {0: v}), primitive=f"{row.primitive}, {scale.primitive.name}")]


# -- rules: nonlinearities -------------------------------------------------------------------

def _slope(bound: float, name: str):
    """An elementwise function whose derivative never exceeds `bound` in absolute value."""
    def rule(walker, eqn, inputs):
        _, x = the_traced_input(eqn, inputs)
        return [unary(eqn, x, bound, "nonlinearity", name)]
    return rule


def _extremum(walker, eqn, inputs):
    positions = traced_inputs(inputs)
    maximum = eqn.primitive.name == "max"
    if len(positions) == 2:   # |max(a, b) − max(a', b')| ≤ max(|Δa|, |Δb|): ‖Δy‖² ≤ ‖Δa‖² + ‖Δb‖²
        return [merge(eqn, inputs, math.sqrt(sum((v.bound ** 2) * copies_of(v, eqn) for v in inputs)))]
    x, constant = inputs[positions[0]], inputs[1 - positions[0]]
    relu = maximum and bool(np.all(np.asarray(constant) == 0))
    name = "ReLU" if relu else ("Max" if maximum else "Min")
    return [unary(eqn, x, math.sqrt(copies_of(x, eqn)), "nonlinearity", name)]


def _clamp(walker, eqn, inputs):
    position, x = the_traced_input(eqn, inputs)
    if position != 1:
        raise NoRule("'clamp' with input-dependent limits has no rule")
    return [unary(eqn, x, math.sqrt(copies_of(x, eqn)), "nonlinearity", "Clip")]


def _select_n(walker, eqn, inputs):
    if isinstance(inputs[0], Traced):
        raise NoRule("'select_n' whose predicate depends on the input other than as the sign of a value "
                         "(jnp.where(x >= 0, a·x, b·x)) has no global Lipschitz bound")
    cases = [value for value in inputs[1:] if isinstance(value, Traced)]
    if len(cases) == 1:   # each output is the case's element or a constant
        return [unary(eqn, cases[0], math.sqrt(copies_of(cases[0], eqn)), "select", silent=True)]
    return [merge(eqn, cases, math.sqrt(sum(v.bound ** 2 * copies_of(v, eqn) for v in cases)))]


def _comparison(walker, eqn, inputs):
    raise NoRule(f"{eqn.primitive.name!r} of an input-dependent value has no Lipschitz rule: a comparison is "
                     "read only as the sign test of a leaky ReLU, jnp.where(x >= 0, a·x, b·x) with a and b scalars "
                     "or 0 (jaxadv.patterns.leaky_relus)")


def _leaky_relu(walker, eqn, inputs):
    """`jaxadv.patterns.LEAKY_RELU`, jnp.where(x >= 0, a·x, b·x): continuous, piecewise linear, so max(|a|, |b|)."""
    slopes = [float(np.max(np.abs(np.asarray(inputs[slope])))) if isinstance(slope, int) else slope
              for slope in eqn.params["slopes"]]
    name = "ReLU" if min(slopes) == 0 else "Leaky ReLU"
    return [unary(eqn, inputs[0], max(slopes), "nonlinearity", name, primitive="select_n")]


def _no_global_bound(reason: str):
    def rule(walker, eqn, inputs):
        raise NoRule(f"{eqn.primitive.name!r} on the input's path has no global Lipschitz bound: {reason}")
    return rule
#: primitive name -> rule(walker, eqn, inputs) -> outputs. Inputs are constants or `Traced` values.


#: primitive name -> rule(walker, eqn, inputs) -> outputs, for convolutions, pooling and nonlinearities.
RULES: dict[str, Callable] = {
    "convolution": _convolution,
    "conv_general_dilated": _conv_general_dilated,
    "reduce_window_sum": _reduce_window_sum,
    "reduce_window_max": _reduce_window_extremum, "reduce_window_min": _reduce_window_extremum,
    "reduce_sum": _reduce_sum,
    "reduce_max": _reduce_extremum, "reduce_min": _reduce_extremum,
    "max": _extremum, "min": _extremum,
    "clamp": _clamp,
    "select_n": _select_n,
    "leaky_relu": _leaky_relu,
    "average": _average,
    **{name: _comparison for name in ("ge", "gt", "le", "lt")},
    "integer_pow": _no_global_bound("x**n grows without bound for n > 1. GELU (jax.nn.gelu, whose tanh form "
                                    "has x**3) is globally 1.13-Lipschitz, but it is traced as a product of "
                                    "input-dependent values that no per-primitive rule bounds; use "
                                    "approximate=False with a rule for x·Φ(x), or another activation"),
    "erfc": _no_global_bound("it appears in exact GELU (jax.nn.gelu(approximate=False)) as a factor of x·Φ(x), "
                             "a product of input-dependent values that no per-primitive rule bounds"),
    "logistic": _slope(spectral.SIGMOID_BOUND, "Sigmoid"),
    "tanh": _slope(1.0, "Tanh"),
    "abs": _slope(1.0, "Abs"),
    "sin": _slope(1.0, "Sin"), "cos": _slope(1.0, "Cos"),
    "atan": _slope(1.0, "Arctan"), "asinh": _slope(1.0, "Arcsinh"),
    "erf": _slope(2 / math.sqrt(math.pi), "Erf"),
}

