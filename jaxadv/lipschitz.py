"""Upper Lipschitz bounds of any JAX function, read from its jaxpr (the paper's §4.3).

    bounds = operator_bounds(jax.tree_util.Partial(module.apply, variables), images[:1])
    bounds.network_bound                       # ‖f(x + r) − f(x)‖₂ ≤ network_bound · ‖r‖₂ for all x, r
    [(row["layer"], row["upper_bound"]) for row in bounds.rows]   # ("Conv. 1", 0.61), ("ReLU", 1.0), ...
    bounds.pairwise_certified_radius(logits)   # L2 radii within which the prediction provably stays

The function is traced once with `jax.make_jaxpr`, as jax_verify's bound
propagation does: parameters closed over (`functools.partial(apply, params)`)
become constants of the trace, every equation that does not depend on the input
is evaluated concretely (so a kernel reshaped or scaled inside the model is an
ordinary constant), and calls (`jit`, `custom_jvp_call` as in `jax.nn.relu`,
`custom_vjp_call`, `checkpoint`) are walked into. Every traced value that
depends on the input carries an upper Lipschitz constant of input ↦ value:
an operator multiplies it by its own bound (so a chain gives Π_k L_k, the
paper's bound), branches that add give the sum of their bounds (a residual
block: L_f + L_skip), and a concatenation of several values gives the root of
the sum of their squares. The rules live in one dict, `RULES`, keyed by the
primitive's name; a primitive on the input's path without a rule (exp, a
product of two input-dependent values, ...) raises a ValueError naming it. The
norms themselves are `jaxadv.spectral`'s: the exact top singular value for
dense maps, the paper's Fourier method for convolutions, exact pooling norms.

Two patterns are read as the operator they are rather than op by op. A
convolution written as shifted slices, concatenated and multiplied by a
matrix (im2col: `jaxadv.models.conv2d`, which runs 10× faster on a CPU than
XLA's convolution) is a convolution: its bound is the Fourier method's, not
√(k·k)·‖W‖. And an input padded by wrapping (`jnp.pad(mode="wrap")`, flax's
`padding="CIRCULAR"`) before a VALID convolution is a circular convolution,
whose Fourier norm is exact. A zero `jnp.pad` before an im2col convolution is
folded into the layer, so its row is the real layer, as Table 5 lists it.

`rows` lists the operators on the input's path to the output, in trace order:
dense maps ("FC. k"), convolutions ("Conv. k"), nonlinearities ("ReLU",
"Sigmoid", "Tanh", ...), pooling, flatten, scalings; operators that cannot
move a bound (bias adds, slices, zero padding, transposes) are left out. With
`power_iterations` > 0 each linear row also gets a power-iteration estimate of
its norm, run on the real operator as it appears in the trace (bias left out)
and transposed with `jax.linear_transpose`: an independent check from below.
For a chain, `network_bound` is the product of the rows' `upper_bound`; it
equals the bound the layer list gave before the zoo moved to flax, to
float32 rounding (`tests/test_lipschitz.py` checks products, dense matrices
and power iteration; the README gives the before/after figures for Table 5).

The bounds are global: they hold for every input and every perturbation, not
only near `example_input`, whose shape and dtype alone are used (a batch of
one is enough and the cheapest for power iteration).

Cost: on Table 5's AlexNet-shaped net the trace takes 0.1 s and the walk
17.7 s, nearly all of it the norms' eigenvalues (FC. 1's 4096 × 4096 Gram
matrix, the convolutions' per-frequency ones), as the layer-list walk it
replaces took 18.1 s on the same machine.
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

from jaxadv import checks, spectral
from jaxadv.graph import bind_with, called_jaxpr, evaluate
from jaxadv.functional import failed_call

__all__ = ["LipschitzBounds", "operator_bounds", "network_bound", "estimate_by_power_iteration", "RULES"]


class LipschitzBounds(NamedTuple):
    """The bounds `operator_bounds` read from a function's trace.

    `rows`: one dict per operator on the input's path, in trace order, with
    `index`, `layer` (display name: "Conv. 1", "FC. 2", "ReLU", "Max-pool", ...),
    `kind` (conv, dense, nonlinearity, maxpool, avgpool, sumpool, sum, mean,
    flatten, scale, broadcast, copy), `primitive`, `shape` ([C, k, k, D] for a
    convolution as in Table 5, [in, out] for a dense map, the window for a pool,
    else None), `stride` (int, a list when axes differ, or None),
    `upper_bound` (the operator's own Lipschitz bound), `power_iteration`
    (float or None), and `lipschitz_in` / `lipschitz_out`: the upper Lipschitz
    constant of input ↦ the operator's input / output.
    `network_bound`: of input ↦ output. `head_weights` [F, K] and
    `features_bound`: when the output is a dense layer h(x) W + b, its W and
    an upper Lipschitz constant of x ↦ h(x) (else None), for
    `pairwise_certified_radius`. `linear_operators`: per row, (the linear map,
    its input's ShapeDtypeStruct) for power iteration, or None.
    """
    rows: tuple[dict, ...]
    network_bound: float
    head_weights: np.ndarray | None
    features_bound: float | None
    linear_operators: tuple

    def certified_radius(self, logits: jax.Array) -> jax.Array:
        """The paper's radius: top-two margin / (√2 · network_bound), per row of `logits` [B, K]."""
        return spectral.certified_radius(logits, self.network_bound)

    def pairwise_certified_radius(self, logits: jax.Array) -> jax.Array:
        """min_{j≠y} (z_y − z_j) / (‖w_y − w_j‖ · features_bound): at least `certified_radius`."""
        if self.head_weights is None:
            raise ValueError("the traced function does not end in a dense layer (dot_general with a constant "
                             "[features, classes] matrix, then bias adds), so there is no pairwise radius")
        return spectral.pairwise_certified_radius(logits, self.head_weights, self.features_bound)


def operator_bounds(logits_fn: Callable[[jax.Array], jax.Array], example_input, *, power_iterations: int = 0,
                    key: jax.Array | None = None, params=None) -> LipschitzBounds:
    """Per-operator and whole-network upper Lipschitz bounds (L2 → L2) of `logits_fn`, from its jaxpr.

    `logits_fn` is any pure function of one array, typically
    `jax.tree_util.Partial(module.apply, variables)`; `example_input` an array
    or `jax.ShapeDtypeStruct` of the shape it takes (only shape and dtype are
    used). `power_iterations` > 0 adds power-iteration estimates of every
    linear operator (needs `key`); see `estimate_by_power_iteration`. With
    `params`, `logits_fn` is a flax module (params: its variables) or a function
    apply(params, x), as everywhere (`jaxadv.functional.logits_function`).
    """
    logits_fn, _ = checks.model(logits_fn, params, name="logits_fn")

    if isinstance(power_iterations, bool) or not isinstance(power_iterations, (int, np.integer)) or power_iterations < 0:
        raise ValueError(f"power_iterations must be an integer >= 0, got {power_iterations!r}")
    if power_iterations and key is None:
        raise ValueError("key is required when power_iterations > 0")
    shape, dtype = getattr(example_input, "shape", None), getattr(example_input, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"example_input must be an array or jax.ShapeDtypeStruct, got {type(example_input).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"example_input must have a floating dtype, got {dtype}")

    try:
        closed = jax.make_jaxpr(logits_fn)(jax.ShapeDtypeStruct(tuple(shape), dtype))
    except Exception as error:    # noqa: BLE001 - the user's function: reported with the fix
        raise failed_call("logits_fn", shape, error) from error
    walker = _Walker()
    (output,) = _single_output(walker.run(closed.jaxpr, closed.consts, [_Traced(closed.jaxpr.invars[0].aval, 1.0)]))
    bounds = _collect(output)
    if power_iterations:
        bounds = estimate_by_power_iteration(bounds, key, power_iterations)
    return bounds


def network_bound(logits_fn: Callable[[jax.Array], jax.Array], example_input, *, params=None) -> float:
    """An upper Lipschitz constant (L2 → L2) of `logits_fn`: `operator_bounds(...).network_bound`."""
    return operator_bounds(logits_fn, example_input, params=params).network_bound


def estimate_by_power_iteration(bounds: LipschitzBounds, key: jax.Array, num_iterations: int = 100) -> LipschitzBounds:
    """`bounds` with `power_iteration` filled in for every linear row (`spectral.power_iteration_norm`)."""
    if not isinstance(bounds, LipschitzBounds):
        raise TypeError(f"bounds must be a LipschitzBounds, got {type(bounds).__name__}")
    rows = []
    for row, operator, row_key in zip(bounds.rows, bounds.linear_operators, jax.random.split(key, max(len(bounds.rows), 1))):
        row = dict(row)
        if operator is not None:
            fn, spec = operator
            row["power_iteration"] = float(spectral.power_iteration_norm(fn, spec.shape, row_key, num_iterations,
                                                                         dtype=spec.dtype))
        rows.append(row)
    return bounds._replace(rows=tuple(rows))


# -- what the walk carries ------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Row:
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
class _Traced:
    """A value that depends on the input, and an upper Lipschitz constant of input ↦ value.

    `parents` are the values its bound was derived from: one, with the `row`
    that made it, or several for a merge (a sum, a concatenation of several
    values). A fixed rearrangement of an earlier value (slice, zero pad,
    concatenation of slices of one value) also records that `source`, how to
    recompute it from the source (`from_source`) and its `structure`, so that
    a later operator can recognise a convolution written out as patches, or a
    circular padding.
    """
    aval: Any
    bound: float
    parents: tuple = ()
    row: _Row | None = None
    source: "_Traced | None" = None
    from_source: Callable | None = None
    structure: tuple | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.aval.shape)

    @property
    def spec(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.aval.dtype)


@dataclasses.dataclass(eq=False)
class _Sign(_Traced):
    """A comparison of a traced value `of` with 0, true where it is positive if `positive` (for jnp.where)."""
    of: _Traced | None = None
    positive: bool = True


#: Primitives a comparison marker may flow into: jnp.where's select_n and the calls around it.
_PASSES_SIGNS = frozenset({"select_n", "jit", "pjit", "closed_call", "core_call", "custom_jvp_call"})


class _Walker:
    """Evaluates a jaxpr on constants and `_Traced` values, with `RULES` for the traced equations."""

    def __init__(self):
        self.calls: list[str] = []   # the enclosing calls, for error messages

    def run(self, jaxpr, consts: Sequence, args: Sequence) -> list:
        env = {}

        def read(var):
            return var.val if isinstance(var, jex_core.Literal) else env[var]

        for var, value in itertools.chain(zip(jaxpr.constvars, consts), zip(jaxpr.invars, args)):
            env[var] = value
        for eqn in jaxpr.eqns:
            inputs = [read(var) for var in eqn.invars]
            if any(isinstance(value, _Sign) for value in inputs) and eqn.primitive.name not in _PASSES_SIGNS:
                raise ValueError(f"{eqn.primitive.name!r} of a comparison of an input-dependent value: only "
                                 "jnp.where(x >= 0, a·x, b·x) (select_n, a leaky ReLU) has a Lipschitz rule")
            if any(isinstance(value, _Traced) for value in inputs):
                rule = RULES.get(eqn.primitive.name)
                if rule is None:
                    where = f" (inside {' > '.join(self.calls)})" if self.calls else ""
                    raise ValueError(f"no Lipschitz rule for the primitive {eqn.primitive.name!r} on the input's "
                                     f"path{where}; jaxadv.lipschitz.RULES lists the primitives it knows")
                outputs = rule(self, eqn, inputs)
            else:   # input-independent (weights and what the model computes from them): evaluate it
                outputs = evaluate(eqn, inputs)
            for var, value in zip(eqn.outvars, outputs):
                if not isinstance(var, jex_core.DropVar):
                    env[var] = value
        return [read(var) for var in jaxpr.outvars]


def _single_output(outputs):
    if len(outputs) != 1:
        raise TypeError(f"logits_fn must return one array, got {len(outputs)} outputs")
    return outputs


def _traced_inputs(inputs) -> list[int]:
    return [i for i, value in enumerate(inputs) if isinstance(value, _Traced)]


def _the_traced_input(eqn, inputs, what: str = "") -> tuple[int, _Traced]:
    positions = _traced_inputs(inputs)
    if len(positions) != 1:
        raise ValueError(f"{eqn.primitive.name!r} of {len(positions)} input-dependent operands has no global "
                         f"Lipschitz bound{what}")
    return positions[0], inputs[positions[0]]


def _out_aval(eqn):
    return eqn.outvars[0].aval


def _unary(eqn, x: _Traced, factor: float, kind: str, name: str | None = None, *, silent: bool = False,
           operator: Callable | None = None, operator_input: _Traced | None = None, primitive: str | None = None,
           **fields) -> _Traced:
    """The output of a one-input operator with bound `factor` (an optional linear `operator` from `operator_input`)."""
    row_input = operator_input if operator_input is not None else x
    row = _Row(kind, primitive or eqn.primitive.name, float(factor), name, silent=silent, operator=operator,
               operator_input=row_input.spec if operator is not None else None, **fields)
    return _Traced(_out_aval(eqn), row_input.bound * float(factor), (row_input,), row)


def _merge(eqn, parts: Sequence[_Traced], bound: float) -> _Traced:
    return _Traced(_out_aval(eqn), float(bound), tuple(parts))


def _copies(x: _Traced, eqn) -> int:
    """How many output elements each input element reaches by broadcasting (1 without)."""
    return math.prod(_out_aval(eqn).shape) // max(math.prod(x.shape), 1)


# -- rules: rearrangements ------------------------------------------------------------

def _rearrangement(kind: str):
    """Reshapes, transposes and the like: an isometry (a flatten gets a row, as in Table 5)."""
    def rule(walker, eqn, inputs):
        position, x = _the_traced_input(eqn, inputs)
        out_shape = _out_aval(eqn).shape
        if kind == "reshape" and len(out_shape) == 2 and len(x.shape) > 2 and out_shape[0] == x.shape[0]:
            return [_unary(eqn, x, 1.0, "flatten", "Flatten")]
        return [_unary(eqn, x, 1.0, kind, silent=True)]
    return rule


def _convert_element_type(walker, eqn, inputs):
    _, x = _the_traced_input(eqn, inputs)
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        raise ValueError(f"'convert_element_type' to {eqn.params['new_dtype']} on the input's path rounds: "
                         "no Lipschitz bound")
    return [_unary(eqn, x, 1.0, "convert", silent=True)]


def _broadcast_in_dim(walker, eqn, inputs):
    position, x = _the_traced_input(eqn, inputs)
    copies = _copies(x, eqn)   # each element copied `copies` times: ‖Δy‖ = √copies ‖Δx‖ exactly
    return [_unary(eqn, x, math.sqrt(copies), "broadcast", "Broadcast", silent=copies == 1,
                   operator=lambda v: bind_with(eqn, inputs, {position: v}))]


def _pad(walker, eqn, inputs):
    x, padding_value = inputs
    if isinstance(padding_value, _Traced):
        raise ValueError("'pad' with an input-dependent padding value has no rule")
    out = _unary(eqn, x, 1.0, "pad", silent=True)   # a selection of the input's entries and constants
    out.source, out.from_source = x, lambda v: bind_with(eqn, inputs, {0: v})
    out.structure = ("pad", tuple(tuple(int(n) for n in c) for c in eqn.params["padding_config"]),
                     bool(np.all(np.asarray(padding_value) == 0)))
    return [out]


def _slice(walker, eqn, inputs):
    (x,) = inputs
    out = _unary(eqn, x, 1.0, "slice", silent=True)
    strides = eqn.params["strides"] or (1,) * len(x.shape)
    out.source, out.from_source = x, lambda v: bind_with(eqn, inputs, {0: v})
    out.structure = ("slice", tuple(eqn.params["start_indices"]), tuple(eqn.params["limit_indices"]), tuple(strides))
    return [out]


def _dynamic_slice(walker, eqn, inputs):
    position, x = _the_traced_input(eqn, inputs, " (input-dependent indices)")
    if position != 0:
        raise ValueError(f"{eqn.primitive.name!r} with input-dependent indices has no Lipschitz bound")
    return [_unary(eqn, x, 1.0, "slice", silent=True)]


class _Part(NamedTuple):
    start: tuple
    limit: tuple
    strides: tuple


def _as_part_of(value: _Traced) -> tuple[_Traced, _Part]:
    """(the value sliced, the slice) for a slice; (the value itself, all of it) otherwise."""
    if value.structure and value.structure[0] == "slice":
        return value.source, _Part(*value.structure[1:])
    return value, _Part((0,) * len(value.shape), value.shape, (1,) * len(value.shape))


def _concatenate(walker, eqn, inputs):
    axis = eqn.params["dimension"]
    positions = _traced_inputs(inputs)
    traced = [inputs[i] for i in positions]
    sources_and_parts = [_as_part_of(value) for value in traced]
    sources = {id(source): source for source, _ in sources_and_parts}
    if len(sources) > 1:   # several values side by side: ‖Δy‖² = Σ ‖Δx_i‖²
        return [_merge(eqn, traced, math.sqrt(sum(value.bound ** 2 for value in traced)))]

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

    out = _unary(eqn, source, factor, "copy", "Concatenate", silent=factor == 1.0,
                 operator=from_source, operator_input=source)
    out.source, out.from_source = source, from_source
    if len(traced) == len(inputs):
        out.structure = _wrap_structure(source, parts, axis) or ("patches", source, tuple(parts), axis)
    return [out]


def _wrap_structure(source: _Traced, parts: list[_Part], axis: int):
    """("wrap", base, {axis: (low, high)}) when the parts pad `source` circularly along `axis` (jnp.pad wrap)."""
    n, ndim = source.shape[axis], len(source.shape)

    def covers(part, low, high):
        return (part.start[axis] == low and part.limit[axis] == high and all(s == 1 for s in part.strides)
                and all(part.start[a] == 0 and part.limit[a] == source.shape[a] for a in range(ndim) if a != axis))

    middle = [i for i, part in enumerate(parts) if covers(part, 0, n)]
    if len(middle) != 1 or len(parts) > 3:
        return None
    before, after = parts[:middle[0]], parts[middle[0] + 1:]
    if len(before) > 1 or len(after) > 1:
        return None
    low = before[0].limit[axis] - before[0].start[axis] if before else 0
    high = after[0].limit[axis] - after[0].start[axis] if after else 0
    if (before and not covers(before[0], n - low, n)) or (after and not covers(after[0], 0, high)) or low + high == 0:
        return None
    base, pads = source, {}
    if source.structure and source.structure[0] == "wrap":
        base, pads = source.structure[1], dict(source.structure[2])
        if axis in pads:
            return None
    return ("wrap", base, {**pads, axis: (low, high)})


# -- rules: arithmetic -------------------------------------------------------------------

def _add(walker, eqn, inputs):
    positions = _traced_inputs(inputs)
    if len(positions) == 1:   # a bias (or any constant) added
        x = inputs[positions[0]]
        copies = _copies(x, eqn)
        return [_unary(eqn, x, math.sqrt(copies), "bias" if copies == 1 else "broadcast",
                       None if copies == 1 else "Broadcast", silent=copies == 1)]
    parts = [inputs[i] for i in positions]   # branches that add: a residual connection
    return [_merge(eqn, parts, sum(value.bound * math.sqrt(_copies(value, eqn)) for value in parts))]


def _negate(walker, eqn, inputs):
    _, x = _the_traced_input(eqn, inputs)
    return [_unary(eqn, x, 1.0, "negate", silent=True)]


def _scale_bound(constant, x: _Traced, out_shape) -> float:
    """Exact norm of x ↦ c·x with broadcasting: √(max over x's elements of Σ c² over the copies it reaches)."""
    squares = np.broadcast_to(np.abs(np.asarray(constant, np.float64)) ** 2, out_shape)
    x_shape = (1,) * (len(out_shape) - len(x.shape)) + x.shape
    broadcast_axes = tuple(a for a, (m, n) in enumerate(zip(x_shape, out_shape)) if m == 1 and n != 1)
    return float(np.sqrt(squares.sum(axis=broadcast_axes).max())) if squares.size else 0.0


def _mul(walker, eqn, inputs):
    position, x = _the_traced_input(eqn, inputs, " (a product of input-dependent values)")
    constant = inputs[1 - position]
    if eqn.primitive.name == "div":
        if position != 0:
            raise ValueError("'div' by an input-dependent value has no global Lipschitz bound")
        if np.any(np.asarray(constant) == 0):
            raise ValueError("'div' on the input's path divides by a constant holding 0")
        constant = 1.0 / np.asarray(constant, np.float64)
    factor = _scale_bound(constant, x, _out_aval(eqn).shape)
    operator = lambda v: bind_with(eqn, inputs, {position: v})
    pooled = x.row
    if pooled is not None and pooled.kind in ("sumpool", "sum") and x.parents:
        # A sum (pool) then a division by its count: one average pool, whose operator is both.
        source = x.parents[0]
        return [_unary(eqn, source, pooled.upper_bound * factor, "avgpool" if pooled.kind == "sumpool" else "mean",
                       "Avg-pool" if pooled.kind == "sumpool" else "Mean", shape=pooled.shape, stride=pooled.stride,
                       operator=lambda v: operator(pooled.operator(v)), operator_input=source,
                       primitive=f"{pooled.primitive}, {eqn.primitive.name}")]
    out = _unary(eqn, x, factor, "scale", "Scale", silent=factor == 1.0, operator=operator)
    if eqn.primitive.name == "mul" and np.ndim(constant) == 0:
        out.scale_of = (x, constant)     # a scalar multiple of x: a case of jnp.where (leaky ReLU)
    return [out]


def _dot_general(walker, eqn, inputs):
    position, x = _the_traced_input(eqn, inputs, " (a product of input-dependent values)")
    w = jnp.asarray(inputs[1 - position])
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    x_contract, w_contract = (lhs_contract, rhs_contract) if position == 0 else (rhs_contract, lhs_contract)
    x_batch, w_batch = (lhs_batch, rhs_batch) if position == 0 else (rhs_batch, lhs_batch)
    operator = lambda v: bind_with(eqn, inputs, {position: v})

    if (position == 0 and not x_batch and x.structure and x.structure[0] == "patches"
            and tuple(x_contract) == (x.structure[3],)):
        convolution = _patches_convolution(eqn, x, w, w_contract[0], operator)
        if convolution is not None:
            return [convolution]

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
    return [_unary(eqn, x, factor, "dense", shape=shape, operator=operator, head_matrix=head)]


# -- rules: convolutions -------------------------------------------------------------

def _conv_general_dilated(walker, eqn, inputs):
    lhs, rhs = inputs
    if isinstance(rhs, _Traced):
        raise ValueError("'conv_general_dilated' with an input-dependent kernel has no global Lipschitz bound")
    params = eqn.params
    if params["batch_group_count"] != 1:
        raise ValueError(f"'conv_general_dilated' with batch_group_count {params['batch_group_count']} has no rule")
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    # The kernel as [*spatial, C / groups, D], the layout of spectral's Fourier method.
    kernel = jnp.transpose(jnp.asarray(rhs), tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))
    out_shape = _out_aval(eqn).shape
    return [_convolution(eqn, lhs, kernel, tuple(lhs_spec[2:]), tuple(params["window_strides"]),
                         tuple(tuple(p) for p in params["padding"]), tuple(params["lhs_dilation"]),
                         tuple(params["rhs_dilation"]), params["feature_group_count"],
                         tuple(out_shape[a] for a in out_spec[2:]),
                         apply=lambda v: bind_with(eqn, inputs, {0: v}))]


def _patches_convolution(eqn, patches: _Traced, w, w_contract: int, apply: Callable) -> _Traced | None:
    """A dot_general of shifted slices of one value (im2col) as the convolution it is, or None."""
    _, source, parts, axis = patches.structure
    channels = source.shape[axis]
    if any(p.start[axis] != 0 or p.limit[axis] != channels or p.strides[axis] != 1 for p in parts):
        return None
    ndim = len(source.shape)
    spatial = tuple(a for a in range(ndim) if a != axis and any(
        p.start[a] != 0 or p.strides[a] != 1 or p.limit[a] != source.shape[a] for p in parts))
    strides = tuple(parts[0].strides[a] for a in spatial)
    if not spatial or any(tuple(p.strides[a] for a in spatial) != strides for p in parts):
        return None   # copies of one value side by side, or windows at different strides: not a convolution
    matrix = np.moveaxis(np.asarray(w), w_contract, 0)
    matrix = matrix.reshape(len(parts), channels, -1)
    extent = tuple(max(p.start[a] for p in parts) + 1 for a in spatial)
    kernel = np.zeros(extent + matrix.shape[1:], matrix.dtype)
    for part, taps in zip(parts, matrix):
        kernel[tuple(part.start[a] for a in spatial)] += taps
    out_extent = tuple(patches.shape[a] for a in spatial)
    n = len(spatial)
    return _convolution(eqn, source, jnp.asarray(kernel), spatial, strides, ((0, 0),) * n, (1,) * n, (1,) * n, 1,
                        out_extent, apply=lambda v: apply(patches.from_source(v)))


def _convolution(eqn, x: _Traced, kernel, spatial_axes, strides, padding, input_dilation, kernel_dilation,
                 groups: int, out_extent, apply: Callable) -> _Traced:
    """A convolution of `x` (over `spatial_axes`) bounded by the Fourier method on the right grid.

    A zero pad just before it is folded into its padding; a circular (wrap)
    padding just before it makes it a circular convolution of the unpadded
    value, whose Fourier norm is exact. `apply` is the linear map x ↦ output.
    """
    original_kernel_shape = kernel.shape
    kernel = spectral.dilate_kernel(kernel, kernel_dilation)
    extent = kernel.shape[:-2]
    row_input, sizes, circular = x, [x.shape[a] for a in spatial_axes], [False] * len(spatial_axes)
    padding = list(padding)
    plain = all(d == 1 for d in input_dilation)
    if plain and x.structure and x.structure[0] == "pad" and x.structure[2]:
        config = x.structure[1]
        if (all(low >= 0 and high >= 0 and interior == 0 for low, high, interior in config)
                and all(config[a][:2] == (0, 0) for a in range(len(config)) if a not in spatial_axes)):
            row_input = x.source
            padding = [(low + config[a][0], high + config[a][1]) for a, (low, high) in zip(spatial_axes, padding)]
            sizes = [row_input.shape[a] for a in spatial_axes]
    elif plain and x.structure and x.structure[0] == "wrap":
        base, wraps = x.structure[1], x.structure[2]
        index = {a: i for i, a in enumerate(spatial_axes)}
        # Output o reads base[(o·Δ + u − low) mod n]: a circular convolution, provided its outputs do not wrap too.
        if all(a in index and padding[index[a]] == (0, 0) and extent[index[a]] <= base.shape[a]
               and (out_extent[index[a]] - 1) * strides[index[a]] < base.shape[a] for a in wraps):
            row_input = base
            sizes = [base.shape[a] for a in spatial_axes]
            circular = [a in wraps for a in spatial_axes]
    grid, fourier_strides = [], []
    for i, size in enumerate(sizes):
        if circular[i]:
            grid.append(size)
            # Stride not dividing the grid: the stride-1 circular convolution, of which these outputs are a subset.
            fourier_strides.append(strides[i] if size % strides[i] == 0 else 1)
        else:
            grid += spectral.fourier_grid((size,), (extent[i],), strides[i], [padding[i]],
                                          input_dilation=input_dilation[i])
            fourier_strides.append(strides[i])
    factor = spectral.circular_conv_norm(kernel, tuple(grid), tuple(fourier_strides), groups)
    recipe = _recipe(x, row_input)
    shape = [int(original_kernel_shape[-2]), *(int(k) for k in original_kernel_shape[:-2]), int(original_kernel_shape[-1])]
    stride = strides[0] if len(set(strides)) == 1 else list(strides)
    return _unary(eqn, row_input, factor, "conv", shape=shape, stride=stride,
                  operator=lambda v: apply(recipe(v)), operator_input=row_input)


def _recipe(value: _Traced, base: _Traced) -> Callable:
    """base's array ↦ value's array, through the recorded rearrangements between them."""
    steps = []
    while value is not base:
        steps.append(value.from_source)
        value = value.source

    def apply(v):
        for step in reversed(steps):
            v = step(v)
        return v
    return apply


# -- rules: pooling and reductions ------------------------------------------------------------

def _window_matrices(eqn, x: _Traced) -> list[tuple[int, np.ndarray]]:
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
    return [_unary(eqn, x, factor, "sumpool", "Sum-pool", operator=lambda v: bind_with(eqn, inputs, {0: v}),
                   **_pool_fields(eqn, matrices))]


def _reduce_window_extremum(walker, eqn, inputs):
    (x,) = inputs
    matrices = _window_matrices(eqn, x)
    cover = math.prod(int(m.sum(axis=0).max()) for _, m in matrices)   # windows covering one input, at most
    name = "Max-pool" if eqn.primitive.name == "reduce_window_max" else "Min-pool"
    return [_unary(eqn, x, math.sqrt(cover), "maxpool", name, **_pool_fields(eqn, matrices))]


def _reduce_sum(walker, eqn, inputs):
    (x,) = inputs
    count = math.prod(x.shape[a] for a in eqn.params["axes"])   # Σ of n values: √n (Cauchy–Schwarz, reached)
    return [_unary(eqn, x, math.sqrt(count), "sum", "Sum", silent=count == 1,
                   operator=lambda v: bind_with(eqn, inputs, {0: v}))]


def _reduce_extremum(walker, eqn, inputs):
    (x,) = inputs   # disjoint sets: |max a − max b| ≤ max |a − b| per output
    return [_unary(eqn, x, 1.0, "maxpool", "Max-pool" if eqn.primitive.name == "reduce_max" else "Min-pool")]


# -- rules: nonlinearities -------------------------------------------------------------------

def _slope(bound: float, name: str):
    """An elementwise function whose derivative never exceeds `bound` in absolute value."""
    def rule(walker, eqn, inputs):
        _, x = _the_traced_input(eqn, inputs)
        return [_unary(eqn, x, bound, "nonlinearity", name)]
    return rule


def _extremum(walker, eqn, inputs):
    positions = _traced_inputs(inputs)
    maximum = eqn.primitive.name == "max"
    if len(positions) == 2:   # |max(a, b) − max(a', b')| ≤ max(|Δa|, |Δb|): ‖Δy‖² ≤ ‖Δa‖² + ‖Δb‖²
        return [_merge(eqn, inputs, math.sqrt(sum((v.bound ** 2) * _copies(v, eqn) for v in inputs)))]
    x, constant = inputs[positions[0]], inputs[1 - positions[0]]
    relu = maximum and bool(np.all(np.asarray(constant) == 0))
    name = "ReLU" if relu else ("Max" if maximum else "Min")
    return [_unary(eqn, x, math.sqrt(_copies(x, eqn)), "nonlinearity", name)]


def _clamp(walker, eqn, inputs):
    position, x = _the_traced_input(eqn, inputs)
    if position != 1:
        raise ValueError("'clamp' with input-dependent limits has no rule")
    return [_unary(eqn, x, math.sqrt(_copies(x, eqn)), "nonlinearity", "Clip")]


def _select_n(walker, eqn, inputs):
    if isinstance(inputs[0], _Sign) and len(inputs) == 3:
        return [_kinked(eqn, inputs)]
    if isinstance(inputs[0], _Traced):
        raise ValueError("'select_n' whose predicate depends on the input other than as the sign of a value "
                         "(jnp.where(x >= 0, a·x, b·x)) has no global Lipschitz bound")
    cases = [value for value in inputs[1:] if isinstance(value, _Traced)]
    if len(cases) == 1:   # each output is the case's element or a constant
        return [_unary(eqn, cases[0], math.sqrt(_copies(cases[0], eqn)), "select", silent=True)]
    return [_merge(eqn, cases, math.sqrt(sum(v.bound ** 2 * _copies(v, eqn) for v in cases)))]


def _comparison(walker, eqn, inputs):
    """x ≥ 0 and the like: a marker for jnp.where, which a leaky ReLU is written with."""
    position, x = _the_traced_input(eqn, inputs)
    constant = inputs[1 - position]
    if not np.all(np.asarray(constant) == 0):
        raise ValueError(f"{eqn.primitive.name!r} of an input-dependent value with a nonzero constant: only the "
                         "sign of a value (jnp.where(x >= 0, a·x, b·x)) has a Lipschitz rule")
    return [_Sign(_out_aval(eqn), math.inf, of=x, positive=(eqn.primitive.name in ("ge", "gt")) == (position == 0))]


def _kinked(eqn, inputs) -> _Traced:
    """jnp.where(x >= 0, a·x, b·x): continuous, piecewise linear, so its bound is max(|a|, |b|) (a leaky ReLU)."""
    sign = inputs[0]
    x = sign.of

    def slope(case):
        if case is x:
            return 1.0
        if isinstance(case, _Traced) and getattr(case, "scale_of", None) is not None and case.scale_of[0] is x:
            return float(np.max(np.abs(np.asarray(case.scale_of[1]))))
        if not isinstance(case, _Traced) and np.all(np.asarray(case) == 0):
            return 0.0
        raise ValueError("jnp.where on the sign of a value: each case must be that value times a constant, or 0 "
                         "(a leaky ReLU); other cases have no Lipschitz rule")
    factor = max(slope(inputs[1]), slope(inputs[2]))
    name = "ReLU" if min(slope(inputs[1]), slope(inputs[2])) == 0 else "Leaky ReLU"
    return _unary(eqn, x, factor, "nonlinearity", name)


def _no_global_bound(reason: str):
    def rule(walker, eqn, inputs):
        raise ValueError(f"{eqn.primitive.name!r} on the input's path has no global Lipschitz bound: {reason}")
    return rule


# -- rules: calls -------------------------------------------------------------------------------

def _call(walker, eqn, inputs):
    """jit, custom_jvp_call (jax.nn.relu), custom_vjp_call, checkpoint: walk the called jaxpr."""
    jaxpr, consts = called_jaxpr(eqn, len(inputs))
    walker.calls.append(f"{eqn.primitive.name}({eqn.params.get('name', '')})")
    try:
        return walker.run(jaxpr, consts, inputs)
    finally:
        walker.calls.pop()


#: primitive name -> rule(walker, eqn, inputs) -> outputs. Inputs are constants or `_Traced` values.
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
    "conv_general_dilated": _conv_general_dilated,
    "reduce_window_sum": _reduce_window_sum,
    "reduce_window_max": _reduce_window_extremum, "reduce_window_min": _reduce_window_extremum,
    "reduce_sum": _reduce_sum,
    "reduce_max": _reduce_extremum, "reduce_min": _reduce_extremum,
    "max": _extremum, "min": _extremum,
    "clamp": _clamp,
    "select_n": _select_n,
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
    **{name: _call for name in ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                                "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint")},
}


# -- the result ----------------------------------------------------------------------

def _collect(output) -> LipschitzBounds:
    """The rows on the path to `output` (in trace order, numbered), its bound, and its dense head."""
    if not isinstance(output, _Traced):   # the output does not depend on the input
        return LipschitzBounds((), 0.0, None, None, ())
    seen, stack, reached = set(), [output], []
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.row is not None and not value.row.silent:
            reached.append(value)
        stack.extend(value.parents)
    reached.sort(key=lambda value: value.row.order)
    counters = {"conv": 0, "dense": 0}
    rows, operators = [], []
    for index, value in enumerate(reached):
        row = value.row
        name = row.name
        if name is None:
            counters[row.kind] += 1
            name = f"{'Conv.' if row.kind == 'conv' else 'FC.'} {counters[row.kind]}"
        rows.append({"index": index, "layer": name, "kind": row.kind, "primitive": row.primitive,
                     "shape": row.shape, "stride": row.stride, "upper_bound": row.upper_bound,
                     "power_iteration": None, "lipschitz_in": value.parents[0].bound, "lipschitz_out": value.bound})
        operators.append((row.operator, row.operator_input) if row.operator is not None else None)
    head, features = output, None
    while head.row is not None and head.row.kind in ("bias", "convert"):
        head = head.parents[0]
    if head.row is not None and head.row.head_matrix is not None:
        features = head.parents[0].bound
    return LipschitzBounds(tuple(rows), float(output.bound), head.row.head_matrix if features is not None else None,
                           features, tuple(operators))
