"""What the Lipschitz analysis carries, and its rules for rearrangements and arithmetic.

A `Traced` value stands for something that depends on the input and carries an
upper Lipschitz constant of input ↦ value. A rule is rule(walker, eqn, inputs)
-> [outputs], as `jaxadv.graph.Walker` calls it: inputs are constants or
`Traced` values, and the rule returns the traced outputs, made with `unary`
(one operator with its own bound: a row of Table 5) or `merge` (branches that
add, or are concatenated). `jaxadv.lipschitz.RULES` joins `RULES` here and
`jaxadv.lipschitz_layers.RULES`; to add a primitive, add its rule there.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import spectral
from jaxadv.graph import NoRule, bind_with

__all__ = ["RULES", "Row", "Traced", "unary", "merge", "traced_inputs", "the_traced_input", "out_aval", "copies_of",
           "scale_factor"]

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


def traced_inputs(inputs) -> list[int]:
    """Positions of the operands that depend on the network's input (the others are constants)."""
    return [i for i, value in enumerate(inputs) if isinstance(value, Traced)]


def the_traced_input(eqn, inputs, what: str = "") -> tuple[int, Traced]:
    """(position, operand) of the one input-dependent operand of `eqn`; ValueError if not exactly one."""
    positions = traced_inputs(inputs)
    if len(positions) != 1:
        raise NoRule(f"{eqn.primitive.name!r} of {len(positions)} input-dependent operands has no global "
                         f"Lipschitz bound{what}")
    return positions[0], inputs[positions[0]]


def out_aval(eqn):
    """The abstract value (shape, dtype) of `eqn`'s first output."""
    return eqn.outvars[0].aval


def unary(eqn, x: Traced, factor: float, kind: str, name: str | None = None, *, silent: bool = False,
           operator: Callable | None = None, operator_input: Traced | None = None, primitive: str | None = None,
           **fields) -> Traced:
    """The output of a one-input operator with bound `factor` (an optional linear `operator` from `operator_input`)."""
    row_input = operator_input if operator_input is not None else x
    row = Row(kind, primitive or eqn.primitive.name, float(factor), name, silent=silent, operator=operator,
               operator_input=row_input.spec if operator is not None else None, **fields)
    return Traced(out_aval(eqn), row_input.bound * float(factor), (row_input,), row)


def merge(eqn, parts: Sequence[Traced], bound: float) -> Traced:
    """The output of an operator joining several input-dependent `parts`, with Lipschitz bound `bound`."""
    return Traced(out_aval(eqn), float(bound), tuple(parts))


def copies_of(x: Traced, eqn) -> int:
    """How many output elements each input element reaches by broadcasting (1 without)."""
    return math.prod(out_aval(eqn).shape) // max(math.prod(x.shape), 1)


# -- rules: rearrangements ------------------------------------------------------------

def _rearrangement(kind: str):
    """Reshapes, transposes and the like: an isometry (a flatten gets a row, as in Table 5)."""
    def rule(walker, eqn, inputs):
        position, x = the_traced_input(eqn, inputs)
        out_shape = out_aval(eqn).shape
        if kind == "reshape" and len(out_shape) == 2 and len(x.shape) > 2 and out_shape[0] == x.shape[0]:
            return [unary(eqn, x, 1.0, "flatten", "Flatten")]
        return [unary(eqn, x, 1.0, kind, silent=True)]
    return rule


def _convert_element_type(walker, eqn, inputs):
    _, x = the_traced_input(eqn, inputs)
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        raise NoRule(f"'convert_element_type' to {eqn.params['new_dtype']} on the input's path rounds: "
                         "no Lipschitz bound")
    return [unary(eqn, x, 1.0, "convert", silent=True)]


def _broadcast_in_dim(walker, eqn, inputs):
    position, x = the_traced_input(eqn, inputs)
    copies = copies_of(x, eqn)   # each element copied `copies` times: ‖Δy‖ = √copies ‖Δx‖ exactly
    return [unary(eqn, x, math.sqrt(copies), "broadcast", "Broadcast", silent=copies == 1,
                   operator=lambda v: bind_with(eqn, inputs, {position: v}))]


def _pad(walker, eqn, inputs):
    x, padding_value = inputs
    if isinstance(padding_value, Traced):
        raise NoRule("'pad' with an input-dependent padding value has no rule")
    return [unary(eqn, x, 1.0, "pad", silent=True)]   # a selection of the input's entries and constants


def _slice(walker, eqn, inputs):
    (x,) = inputs
    out = unary(eqn, x, 1.0, "slice", silent=True)
    strides = eqn.params["strides"] or (1,) * len(x.shape)
    out.source, out.from_source = x, lambda v: bind_with(eqn, inputs, {0: v})
    out.part = _Part(tuple(eqn.params["start_indices"]), tuple(eqn.params["limit_indices"]), tuple(strides))
    return [out]


def _dynamic_slice(walker, eqn, inputs):
    position, x = the_traced_input(eqn, inputs, " (input-dependent indices)")
    if position != 0:
        raise NoRule(f"{eqn.primitive.name!r} with input-dependent indices has no Lipschitz bound")
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
    positions = traced_inputs(inputs)
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
    positions = traced_inputs(inputs)
    if len(positions) == 1:   # a bias (or any constant) added
        x = inputs[positions[0]]
        copies = copies_of(x, eqn)
        return [unary(eqn, x, math.sqrt(copies), "bias" if copies == 1 else "broadcast",
                       None if copies == 1 else "Broadcast", silent=copies == 1)]
    parts = [inputs[i] for i in positions]   # branches that add: a residual connection
    return [merge(eqn, parts, sum(value.bound * math.sqrt(copies_of(value, eqn)) for value in parts))]


def _negate(walker, eqn, inputs):
    _, x = the_traced_input(eqn, inputs)
    return [unary(eqn, x, 1.0, "negate", silent=True)]


def _scale_bound(constant, x: Traced, out_shape) -> float:
    """Exact norm of x ↦ c·x with broadcasting: √(max over x's elements of Σ c² over the copies it reaches)."""
    squares = np.broadcast_to(np.abs(np.asarray(constant, np.float64)) ** 2, out_shape)
    x_shape = (1,) * (len(out_shape) - len(x.shape)) + x.shape
    broadcast_axes = tuple(a for a, (m, n) in enumerate(zip(x_shape, out_shape)) if m == 1 and n != 1)
    return float(np.sqrt(squares.sum(axis=broadcast_axes).max())) if squares.size else 0.0


def scale_factor(eqn, inputs) -> tuple[int, Traced, float]:
    """(the traced input's position, it, the bound of x ↦ x·c or x / c) of a mul or div by a constant."""
    position, x = the_traced_input(eqn, inputs, " (a product of input-dependent values)")
    constant = inputs[1 - position]
    if eqn.primitive.name == "div":
        if position != 0:
            raise NoRule("'div' by an input-dependent value has no global Lipschitz bound")
        if np.any(np.asarray(constant) == 0):
            raise NoRule("'div' on the input's path divides by a constant holding 0")
        constant = 1.0 / np.asarray(constant, np.float64)
    return position, x, _scale_bound(constant, x, out_aval(eqn).shape)


def _mul(walker, eqn, inputs):
    position, x, factor = scale_factor(eqn, inputs)

    def operator(v):
        return bind_with(eqn, inputs, {position: v})
    return [unary(eqn, x, factor, "scale", "Scale", silent=factor == 1.0, operator=operator)]


def _dot_general(walker, eqn, inputs):
    position, x = the_traced_input(eqn, inputs, " (a product of input-dependent values)")
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


#: primitive name -> rule(walker, eqn, inputs) -> outputs, for rearrangements and arithmetic.
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
}
