"""Upper Lipschitz bounds of any JAX function, read from its jaxpr (the paper's §4.3).

    bounds = operator_bounds(jax.tree_util.Partial(module.apply, variables), images[:1])
    bounds.network_bound                       # ‖f(x + r) − f(x)‖₂ ≤ network_bound · ‖r‖₂ for all x, r
    [(row["layer"], row["upper_bound"]) for row in bounds.rows]   # ("Conv. 1", 0.61), ("ReLU", 1.0), ...
    bounds.pairwise_certified_radius(logits)   # L2 radii within which the prediction provably stays

The function is traced once with `jax.make_jaxpr` and read as jax_verify's
bound propagation does (`jaxadv.graph`): calls on the input's path (`jit`,
`custom_jvp_call` as in `jax.nn.relu`, `custom_vjp_call`, `checkpoint`) are
inlined, a pattern pass rewrites the graph (`jaxadv.patterns`), and
`graph.Walker` runs the rules. Parameters closed over
(`functools.partial(apply, params)`) become constants of the trace, and every
equation that does not depend on the input is evaluated concretely (so a
kernel reshaped or scaled inside the model is an ordinary constant). Every traced value that
depends on the input carries an upper Lipschitz constant of input ↦ value:
an operator multiplies it by its own bound (so a chain gives Π_k L_k, the
paper's bound), branches that add give the sum of their bounds (a residual
block: L_f + L_skip), and a concatenation of several values gives the root of
the sum of their squares. The rules live in one dict, `RULES`, keyed by the
primitive's name (`jaxadv.lipschitz_rules` for rearrangements and arithmetic,
`jaxadv.lipschitz_layers` for convolutions, pooling and nonlinearities); a
primitive on the input's path without a rule (exp, a product of two
input-dependent values, ...) raises a ValueError naming it. To add one, write
rule(walker, eqn, inputs) -> [outputs] on `lipschitz_rules.Traced` values with
`lipschitz_rules.unary` (or `merge`) and set `RULES[primitive name] = rule`. The
norms themselves are `jaxadv.spectral`'s: the exact top singular value for
dense maps, the paper's Fourier method for convolutions, exact pooling norms.

The patterns are read as the operator they are rather than op by op. A
convolution written as shifted slices, concatenated and multiplied by a
matrix (im2col: `jaxadv.models.conv2d`, faster on a CPU than XLA's
convolution) is a convolution: its bound is the Fourier method's, not
√(k·k)·‖W‖. An input padded by wrapping (`jnp.pad(mode="wrap")`, flax's
`padding="CIRCULAR"`) before a VALID convolution is a circular convolution,
whose Fourier norm is exact. A zero `jnp.pad` before a convolution is folded
into the layer, so its row is the real layer, as Table 5 lists it. A leaky
ReLU written with jnp.where is one row; so is a sum divided by its count
(an average pool, a mean).

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

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import checks, spectral
from jaxadv.graph import Walker, flatten, simplify, trace
from jaxadv import lipschitz_layers, lipschitz_rules
from jaxadv.lipschitz_rules import Traced
from jaxadv.patterns import PATTERNS

__all__ = ["LipschitzBounds", "operator_bounds", "network_bound", "estimate_by_power_iteration", "RULES"]


#: primitive name -> rule(walker, eqn, inputs) -> [outputs]: every primitive the Lipschitz analysis reads.
RULES: dict[str, Callable] = {**lipschitz_rules.RULES, **lipschitz_layers.RULES}


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

    def pairwise_certified_radius(self, logits: jax.Array, labels=None) -> jax.Array:
        """min_{j≠y} (z_y − z_j) / (‖w_y − w_j‖ · features_bound): at least `certified_radius`.

        labels: [B] the class y to keep (default the prediction); 0 where another class leads.
        """
        if self.head_weights is None:
            raise ValueError("the traced function does not end in a dense layer (dot_general with a constant "
                             "[features, classes] matrix, then bias adds), so there is no pairwise radius")
        return spectral.pairwise_certified_radius(logits, self.head_weights, self.features_bound, labels=labels)


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

    closed = trace(logits_fn, jax.ShapeDtypeStruct(tuple(shape), dtype), argument="logits_fn")
    jaxpr, consts = flatten(closed)
    walker = Walker(RULES, lambda value: isinstance(value, Traced), "Lipschitz", "jaxadv.lipschitz.RULES")
    outputs = walker.run(simplify(jaxpr, consts, PATTERNS), consts, [Traced(closed.jaxpr.invars[0].aval, 1.0)])
    if len(outputs) != 1:
        raise TypeError(f"logits_fn must return one array, got {len(outputs)} outputs")
    bounds = _collect(outputs[0])
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



# -- the result ----------------------------------------------------------------------

def _collect(output) -> LipschitzBounds:
    """The rows on the path to `output` (in trace order, numbered), its bound, and its dense head."""
    if not isinstance(output, Traced):   # the output does not depend on the input
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
