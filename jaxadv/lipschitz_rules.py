"""The Lipschitz analysis' rules: one per primitive, on values that carry an upper Lipschitz constant.

`RULES` maps a primitive's name to rule(walker, eqn, inputs) -> [outputs], as
`jaxadv.graph.Walker` calls it: inputs are constants or `Traced` values (each
an upper Lipschitz constant of input ↦ value), and a rule returns the traced
outputs, made with `unary` (one operator with its own bound: a row of Table 5)
or `merge` (branches that add or are concatenated). To add a primitive, add
its rule to `RULES`. The patterns (`jaxadv.patterns`) have been rewritten
before any rule runs: a convolution, however written, reaches `RULES["convolution"]`.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxadv import spectral
from jaxadv.graph import bind_with

__all__ = ["RULES", "Row", "Traced"]

# -- what the walk carries ------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Row:
    """An operator on the input's path: its own bound, and what the table shows of it."""
    kind: str
    primitive: str
    upper_bound: float
    name: str | None = None          # None: numbered at the end ("Conv. k", "FC. k")
    shape: list | None = None
    stride: Any = None
    silent: bool = False             # cannot move a bound (bias, slice, pad, ...): not listed
    operator: Callable | None = None           # the linear map as it appears in the trace, for power iteration
    operator_input: Any = None                  # its input's ShapeDtypeStruct
    head_matrix: np.ndarray | None = None       # a dense map [features, classes] that may be the output layer
    order: int = dataclasses.field(default_factory=itertools.count().__next__)


@dataclasses.dataclass(eq=False)
class Traced:
    """A value that depends on the input, and an upper Lipschitz constant of input ↦ value.

    `parents` are the values its bound was derived from: one, with the `row`
    that made it, or several for a merge (a sum, a concatenation of several
    values). A slice also records its `source`, how to recompute it from the
    source (`from_source`) and the slice (`part`), so that a concatenation of
    slices of one value is bounded by how often it copies each element.
    """
    aval: Any
    bound: float
    parents: tuple = ()
    row: Row | None = None
    source: "Traced | None" = None
    from_source: Callable | None = None
    part: tuple | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    @property
    def spec(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.aval.dtype)


def _traced_inputs(inputs) -> list[int]:
    return [i for i, value in enumerate(inputs) if isinstance(value, Traced)]


def _the_traced_input(eqn, inputs, what: str = "") -> tuple[int, Traced]:
    positions = _traced_inputs(inputs)
    if len(positions) != 1:
        raise ValueError(f"{eqn.primitive.name!r} of {len(positions)} input-dependent operands has no global "
                         f"Lipschitz bound{what}")
    return positions[0], inputs[positions[0]]


def _out_aval(eqn):
    return eqn.outvars[0].aval


def unary(eqn, x: Traced, factor: float, kind: str, name: str | None = None, *, silent: bool = False,
           operator: Callable | None = None, operator_input: Traced | None = None, primitive: str | None = None,
           **fields) -> Traced:
    """The output of a one-input operator with bound `factor` (an optional linear `operator` from `operator_input`)."""
    row_input = operator_input if operator_input is not None else x
    row = Row(kind, primitive or eqn.primitive.name, float(factor), name, silent=silent, operator=operator,
               operator_input=row_input.spec if operator is not None else None, **fields)
    return Traced(_out_aval(eqn), row_input.bound * float(factor), (row_input,), row)


def merge(eqn, parts: Sequence[Traced], bound: float) -> Traced:
    return Traced(_out_aval(eqn), float(bound), tuple(parts))


def _copies(x: Traced, eqn) -> int:
    """How many output elements each input element reaches by broadcasting (1 without)."""
    return math.prod(_out_aval(eqn).shape) // max(math.prod(x.shape), 1)


# -- rules: rearrangements ------------------------------------------------------------

def _rearrangement(kind: str):
    """Reshapes, transposes and the like: an isometry (a flatten gets a row, as in Table 5)."""
    def rule(walker, eqn, inputs):
        position, x = _the_traced_input(eqn, inputs)
        out_shape = _out_aval(eqn).shape
        if kind == "reshape" and len(out_shape) == 2 and len(x.shape) > 2 and out_shape[0] == x.shape[0]:
            return [unary(eqn, x, 1.0, "flatten", "Flatten")]
        return [unary(eqn, x, 1.0, kind, silent=True)]
    return rule


def _convert_element_type(walker, eqn, inputs):
    _, x = _the_traced_input(eqn, inputs)
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        raise ValueError(f"'convert_element_type' to {eqn.params['new_dtype']} on the input's path rounds: "
                         "no Lipschitz bound")
    return [unary(eqn, x, 1.0, "convert", silent=True)]


def _broadcast_in_dim(walker, eqn, inputs):
    position, x = _the_traced_input(eqn, inputs)
    copies = _copies(x, eqn)   # each element copied `copies` times: ‖Δy‖ = √copies ‖Δx‖ exactly
    return [unary(eqn, x, math.sqrt(copies), "broadcast", "Broadcast", silent=copies == 1,
                   operator=lambda v: bind_with(eqn, inputs, {position: v}))]


def _pad(walker, eqn, inputs):
    x, padding_value = inputs
    if isinstance(padding_value, Traced):
        raise ValueError("'pad' with an input-dependent padding value has no rule")
    return [unary(eqn, x, 1.0, "pad", silent=True)]   # a selection of the input's entries and constants


def _slice(walker, eqn, inputs):
    (x,) = inputs
    out = unary(eqn, x, 1.0, "slice", silent=True)
    strides = eqn.params["strides"] or (1,) * len(x.shape)
    out.source, out.from_source = x, lambda v: bind_with(eqn, inputs, {0: v})
    out.part = _Part(tuple(eqn.params["start_indices"]), tuple(eqn.params["limit_indices"]), tuple(strides))
    return [out]


def _dynamic_slice(walker, eqn, inputs):
    position, x = _the_traced_input(eqn, inputs, " (input-dependent indices)")
    if position != 0:
        raise ValueError(f"{eqn.primitive.name!r} with input-dependent indices has no Lipschitz bound")
    return [unary(eqn, x, 1.0, "slice", silent=True)]


class _Part(NamedTuple):
    start: tuple
    limit: tuple
    strides: tuple


def _as_part_of(value: Traced) -> tuple[Traced, _Part]:
    """(the value sliced, the slice) for a slice; (the value itself, all of it) otherwise."""
    if value.part is not None:
        return value.source, value.part
    return value, _Part((0,) * len(value.shape), value.shape, (1,) * len(value.shape))


def _concatenate(walker, eqn, inputs):
    positions = _traced_inputs(inputs)
    traced = [inputs[i] for i in positions]
    sources_and_parts = [_as_part_of(value) for value in traced]
    sources = {id(source): source for source, _ in sources_and_parts}
    if len(sources) > 1:   # several values side by side: ‖Δy‖² = Σ ‖Δx_i‖²
        return [merge(eqn, traced, math.sqrt(sum(value.bound ** 2 for value in traced)))]

    # Slices of one value: each of its elements appears `count` times, and the map is √max(count) exactly.
    (source,) = sources.values()
    parts = [part for _, part in sources_and_parts]
    counts = np.zeros(source.shape, np.int32)
    for part in parts:
        counts[tuple(slice(a, b, s) for a, b, s in zip(*part))] += 1
    factor = math.sqrt(int(counts.max()))

    def from_source(v):
        return bind_with(eqn, inputs, {i: v if value is source else value.from_source(v)
                                        for i, value in zip(positions, traced)})

    out = unary(eqn, source, factor, "copy", "Concatenate", silent=factor == 1.0,
                 operator=from_source, operator_input=source)
    return [out]


# -- rules: arithmetic -------------------------------------------------------------------

def _add(walker, eqn, inputs):
    positions = _traced_inputs(inputs)
    if len(positions) == 1:   # a bias (or any constant) added
        x = inputs[positions[0]]
        copies = _copies(x, eqn)
        return [unary(eqn, x, math.sqrt(copies), "bias" if copies == 1 else "broadcast",
                       None if copies == 1 else "Broadcast", silent=copies == 1)]
    parts = [inputs[i] for i in positions]   # branches that add: a residual connection
    return [merge(eqn, parts, sum(value.bound * math.sqrt(_copies(value, eqn)) for value in parts))]


def _negate(walker, eqn, inputs):
    _, x = _the_traced_input(eqn, inputs)
    return [unary(eqn, x, 1.0, "negate", silent=True)]


def _scale_bound(constant, x: Traced, out_shape) -> float:
    """Exact norm of x ↦ c·x with broadcasting: √(max over x's elements of Σ c² over the copies it reaches)."""
    squares = np.broadcast_to(np.abs(np.asarray(constant, np.float64)) ** 2, out_shape)
    x_shape = (1,) * (len(out_shape) - len(x.shape)) + x.shape
    broadcast_axes = tuple(a for a, (m, n) in enumerate(zip(x_shape, out_shape)) if m == 1 and n != 1)
    return float(np.sqrt(squares.sum(axis=broadcast_axes).max())) if squares.size else 0.0


def _scale_factor(eqn, inputs) -> tuple[int, Traced, float]:
    """(the traced input's position, it, the bound of x ↦ x·c or x / c) of a mul or div by a constant."""
    position, x = _the_traced_input(eqn, inputs, " (a product of input-dependent values)")
    constant = inputs[1 - position]
    if eqn.primitive.name == "div":
        if position != 0:
            raise ValueError("'div' by an input-dependent value has no global Lipschitz bound")
        if np.any(np.asarray(constant) == 0):
            raise ValueError("'div' on the input's path divides by a constant holding 0")
        constant = 1.0 / np.asarray(constant, np.float64)
    return position, x, _scale_bound(constant, x, _out_aval(eqn).shape)


def _mul(walker, eqn, inputs):
    position, x, factor = _scale_factor(eqn, inputs)

    def operator(v):
        return bind_with(eqn, inputs, {position: v})
    return [unary(eqn, x, factor, "scale", "Scale", silent=factor == 1.0, operator=operator)]


def _average(walker, eqn, inputs):
    """`jaxadv.patterns.AVERAGE`, a sum (pool) scaled by a constant: one average pool, or a mean."""
    pool, scale = eqn.params["jaxpr"].eqns
    (pooled,) = RULES[pool.primitive.name](walker, pool, inputs[:1])
    values = dict(zip(eqn.params["jaxpr"].invars[1:], inputs[1:]))
    scale_inputs = [pooled if var is pool.outvars[0] else var.val if isinstance(var, jex_core.Literal)
                    else values[var] for var in scale.invars]
    _, _, factor = _scale_factor(scale, scale_inputs)
    row = pooled.row
    return [unary(eqn, inputs[0], row.upper_bound * factor, "avgpool" if row.kind == "sumpool" else "mean",
                  "Avg-pool" if row.kind == "sumpool" else "Mean", shape=row.shape, stride=row.stride,
                  operator=lambda v: bind_with(eqn, inputs, {0: v}), primitive=f"{row.primitive}, {scale.primitive.name}")]


def _dot_general(walker, eqn, inputs):
    position, x = _the_traced_input(eqn, inputs, " (a product of input-dependent values)")
    w = jnp.asarray(inputs[1 - position])
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    x_contract, w_contract = (lhs_contract, rhs_contract) if position == 0 else (rhs_contract, lhs_contract)
    x_batch, w_batch = (lhs_batch, rhs_batch) if position == 0 else (rhs_batch, lhs_batch)

    def operator(v):
        return bind_with(eqn, inputs, {position: v})

    # y[b, f_x, f_w] = Σ_c x[b, f_x, c] W[b, c, f_w]: block-diagonal over (b, f_x), one block W_b per b.
    w_free = [a for a in range(w.ndim) if a not in w_contract and a not in w_batch]
    num_batch = math.prod(w.shape[a] for a in w_batch)
    num_contract = math.prod(w.shape[a] for a in w_contract)
    blocks = jnp.transpose(w, tuple(w_batch) + tuple(w_contract) + tuple(w_free)).reshape(num_batch, num_contract, -1)
    factor = spectral.dense_operator_norm(blocks[0]) if num_batch == 1 else spectral.largest_operator_norm(blocks)
    head = None
    if position == 0 and len(x.shape) == 2 and tuple(x_contract) == (1,) and not x_batch and w.ndim == 2:
        head = np.asarray(w if tuple(w_contract) == (0,) else w.T)
    shape = [num_contract, blocks.shape[-1]] if num_batch == 1 else [num_batch, num_contract, blocks.shape[-1]]
    return [unary(eqn, x, factor, "dense", shape=shape, operator=operator, head_matrix=head)]


# -- rules: convolutions -------------------------------------------------------------
# -- rules: convolutions -------------------------------------------------------------

def _conv_general_dilated(walker, eqn, inputs):
    """Reached only where `jaxadv.patterns.xla_convolutions` could not make it a `convolution`."""
    if isinstance(inputs[1], Traced):
        raise ValueError("'conv_general_dilated' with an input-dependent kernel has no global Lipschitz bound")
    raise ValueError(f"'conv_general_dilated' with batch_group_count {eqn.params['batch_group_count']} has no rule")


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


# -- rules: nonlinearities -------------------------------------------------------------------

def _slope(bound: float, name: str):
    """An elementwise function whose derivative never exceeds `bound` in absolute value."""
    def rule(walker, eqn, inputs):
        _, x = _the_traced_input(eqn, inputs)
        return [unary(eqn, x, bound, "nonlinearity", name)]
    return rule


def _extremum(walker, eqn, inputs):
    positions = _traced_inputs(inputs)
    maximum = eqn.primitive.name == "max"
    if len(positions) == 2:   # |max(a, b) − max(a', b')| ≤ max(|Δa|, |Δb|): ‖Δy‖² ≤ ‖Δa‖² + ‖Δb‖²
        return [merge(eqn, inputs, math.sqrt(sum((v.bound ** 2) * _copies(v, eqn) for v in inputs)))]
    x, constant = inputs[positions[0]], inputs[1 - positions[0]]
    relu = maximum and bool(np.all(np.asarray(constant) == 0))
    name = "ReLU" if relu else ("Max" if maximum else "Min")
    return [unary(eqn, x, math.sqrt(_copies(x, eqn)), "nonlinearity", name)]


def _clamp(walker, eqn, inputs):
    position, x = _the_traced_input(eqn, inputs)
    if position != 1:
        raise ValueError("'clamp' with input-dependent limits has no rule")
    return [unary(eqn, x, math.sqrt(_copies(x, eqn)), "nonlinearity", "Clip")]


def _select_n(walker, eqn, inputs):
    if isinstance(inputs[0], Traced):
        raise ValueError("'select_n' whose predicate depends on the input other than as the sign of a value "
                         "(jnp.where(x >= 0, a·x, b·x)) has no global Lipschitz bound")
    cases = [value for value in inputs[1:] if isinstance(value, Traced)]
    if len(cases) == 1:   # each output is the case's element or a constant
        return [unary(eqn, cases[0], math.sqrt(_copies(cases[0], eqn)), "select", silent=True)]
    return [merge(eqn, cases, math.sqrt(sum(v.bound ** 2 * _copies(v, eqn) for v in cases)))]


def _comparison(walker, eqn, inputs):
    raise ValueError(f"{eqn.primitive.name!r} of an input-dependent value has no Lipschitz rule: a comparison is "
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
        raise ValueError(f"{eqn.primitive.name!r} on the input's path has no global Lipschitz bound: {reason}")
    return rule
#: primitive name -> rule(walker, eqn, inputs) -> outputs. Inputs are constants or `Traced` values.
RULES: dict[str, Callable] = {
    **{name: _rearrangement(name) for name in ("reshape", "squeeze", "expand_dims", "transpose", "rev", "copy",
                                                "copy_p", "reduce_precision")},
    "convert_element_type": _convert_element_type,
    "broadcast_in_dim": _broadcast_in_dim,
    "pad": _pad,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "concatenate": _concatenate,
    "add": _add, "sub": _add, "add_any": _add,
    "neg": _negate,
    "mul": _mul, "div": _mul,
    "dot_general": _dot_general,
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

