"""Linear bound propagation (CROWN) over a traced function: its graph, its relaxations, its backward pass.

    graph = build_graph(logits_fn, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
    coefficients, offsets = crown(graph, x0, spec, input_bounds)   # spec·f(x) ≥ coefficients·x + offsets

The function, traced on one image, becomes a list of nodes in topological
order: the input, affine maps (every primitive that is affine in its
input-dependent operands: dense, convolutions written any way, pads
including wrap, slices, concatenations, reshapes, pooling sums, scalings,
residual adds, normalisation at inference), elementwise nonlinearities and
maxima. An affine node keeps the traced equation as a function, so its
transpose is `jax.vjp`'s: no convolution needs a special case, an im2col
convolution is transposed as the slices and matmul it is. `RULES` maps each
primitive's name to the rule that adds its node; an unknown primitive on the
input's path is refused by name (`jaxadv.graph.Walker`). To add one, write
rule(walker, eqn, inputs) -> [output] returning `walker.graph.add(Node(...))`
of an existing kind, and put it in `RULES` under the primitive's name.

Relaxations: `jaxadv.relaxations`.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.forward_bounds import forward_bounds, forward_supported
from jaxadv.graph import NoRule, Walker, bind_with, trace
from jaxadv.relaxations import output_bounds, relaxation

__all__ = ["Node", "Graph", "RULES", "build_graph", "crown", "relaxation", "affine_prefix", "backward"]

NONLINEAR = ("piecewise", "smooth", "max")


@dataclasses.dataclass(eq=False)
class Node:
    """One operator on the input's path.

    kind: "input", "affine" (fn(*inputs) affine), "piecewise" (params kink, value, below, above:
      y = value + below·min(x − kink, 0) + above·max(x − kink, 0)), "smooth" (params name: "logistic"
      or "tanh") or "max" (fn(v, fill) -> [K, *shape] the K candidates of each output, padding with fill).
    scale: for an affine node that multiplies its one input by a constant elementwise, that constant.
    monotone: an affine node whose linear part is nondecreasing in every input (it selects, copies or sums
      entries): bounds of its inputs map to bounds of its output through fn itself.
    absolute: for a linear node that multiplies its one input by a constant (dense, convolution, scaling),
      the same map with that constant's absolute value.
    """
    kind: str
    inputs: tuple
    shape: tuple
    dtype: Any
    fn: Callable | None = None
    params: dict = dataclasses.field(default_factory=dict)
    scale: Any = None
    monotone: bool = False
    absolute: Callable | None = None
    index: int = -1


@dataclasses.dataclass(eq=False)
class Graph:
    nodes: list
    output: int = -1

    def add(self, node: Node) -> "_Ref":
        node.index = len(self.nodes)
        self.nodes.append(node)
        return _Ref(node.index)


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A traced value: the node computing it."""
    index: int


@dataclasses.dataclass(frozen=True)
class _Sign:
    """A comparison of a traced value with 0: true where it is positive if `positive`, else where negative."""
    index: int
    positive: bool


def build_graph(fn: Callable, example: jax.ShapeDtypeStruct, *, argument: str = "model") -> Graph:
    """The graph of `fn` (a pure function of one array) traced on arrays like `example`."""
    closed = trace(fn, example, argument=argument)
    graph = Graph([])
    first = graph.add(Node("input", (), tuple(example.shape), example.dtype))
    walker = Walker(RULES, lambda v: isinstance(v, (_Ref, _Sign)), "linear-bound", "jaxadv.linear_bounds.RULES")
    walker.graph = graph
    outputs = walker.run(closed.jaxpr, closed.consts, [first])
    if len(outputs) != 1:
        raise TypeError(f"{argument} must return one array, got {len(outputs)} outputs")
    if not isinstance(outputs[0], _Ref):
        raise ValueError(f"{argument}: its output does not depend on its input, so there is nothing to certify")
    graph.output = outputs[0].index
    return graph


# -- rules ---------------------------------------------------------------------------

def _out(eqn):
    aval = eqn.outvars[0].aval
    return tuple(aval.shape), aval.dtype


def _traced(inputs) -> list[int]:
    for value in inputs:
        if isinstance(value, _Sign):
            raise NoRule("a comparison of an input-dependent value is used other than by jnp.where "
                             "(select_n); only jnp.where(x >= 0, a·x, b·x) has a linear-bound rule")
    return [i for i, value in enumerate(inputs) if isinstance(value, _Ref)]


def _linear(walker, eqn, inputs):
    """A primitive linear in all its input-dependent operands jointly (plus constants): one affine node."""
    positions = _traced(inputs)
    if eqn.primitive.name == "convert_element_type" and not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        raise NoRule(f"'convert_element_type' to {eqn.params['new_dtype']} on the input's path rounds: "
                         "no linear-bound rule")
    def fn(*values):
        return bind_with(eqn, inputs, dict(zip(positions, values)))
    shape, dtype = _out(eqn)
    neg = eqn.primitive.name == "neg"
    return [walker.graph.add(Node("affine", tuple(inputs[i].index for i in positions), shape, dtype, fn,
                                  scale=-1.0 if neg else None, monotone=_monotone(eqn.primitive.name, positions),
                                  absolute=(lambda v: v) if neg else None))]


def _monotone(name: str, positions) -> bool:
    return name in MONOTONE or (name == "sub" and list(positions) == [0])      # x − constant


def _bilinear(walker, eqn, inputs):
    """mul, div, dot_general, conv_general_dilated: affine when one operand (not a divisor or kernel) is traced."""
    positions = _traced(inputs)
    name = eqn.primitive.name
    if len(positions) != 1 or (name == "div" and positions[0] != 0) or (name == "conv_general_dilated"
                                                                           and positions[0] != 0):
        raise NoRule(f"{name!r} of input-dependent operands at positions {positions} is not affine in the "
                         "input (a product, a division by it or an input-dependent kernel): no linear-bound rule")
    [out] = _linear(walker, eqn, inputs)
    node = walker.graph.nodes[out.index]
    constant = 1 - positions[0]
    if name != "div":
        node.absolute = lambda v: bind_with(eqn, inputs, {positions[0]: v, constant: jnp.abs(inputs[constant])})
    if name == "mul" and np.ndim(inputs[1 - positions[0]]) <= len(node.shape):
        node.scale = inputs[1 - positions[0]]
    return [out]


def _concrete_zero(value) -> bool:
    try:
        return bool(np.all(np.asarray(value) == 0))
    except Exception:   # noqa: BLE001 - a tracer: not known to be 0
        return False


def _comparison(walker, eqn, inputs):
    positions = _traced(inputs)
    if len(positions) != 1 or not _concrete_zero(inputs[1 - positions[0]]):
        raise NoRule(f"{eqn.primitive.name!r} on the input's path: only a comparison of one value with 0 "
                         "(a leaky ReLU's jnp.where(x >= 0, ...)) has a linear-bound rule")
    greater = eqn.primitive.name in ("ge", "gt")
    return [_Sign(inputs[positions[0]].index, greater == (positions[0] == 0))]


def _slope(walker, case, x: int):
    """The constant s with case = s·x elementwise, or None."""
    if isinstance(case, _Ref):
        if case.index == x:
            return 1.0
        node = walker.graph.nodes[case.index]
        return node.scale if node.scale is not None and node.inputs == (x,) else None
    return 0.0 if _concrete_zero(case) else None


def _select_n(walker, eqn, inputs):
    predicate = inputs[0]
    if isinstance(predicate, _Ref):
        raise NoRule("'select_n' whose predicate is computed from the input other than by comparing a value "
                         "with 0 has no linear-bound rule")
    if not isinstance(predicate, _Sign):
        return _linear(walker, eqn, inputs)
    if len(inputs) != 3:
        raise NoRule("'select_n' of more than two cases on a comparison has no linear-bound rule")
    negative, positive = (inputs[1], inputs[2]) if predicate.positive else (inputs[2], inputs[1])
    below, above = _slope(walker, negative, predicate.index), _slope(walker, positive, predicate.index)
    if below is None or above is None:
        raise NoRule("jnp.where on the sign of a value: each case must be that value times a constant, or 0 "
                         "(a leaky ReLU); other cases have no linear-bound rule")
    return [_piecewise(walker, eqn, predicate.index, 0.0, 0.0, below, above)]


def _piecewise(walker, eqn, x: int, kink, value, below, above) -> _Ref:
    shape, dtype = _out(eqn)
    params = dict(kink=kink, value=value, below=below, above=above)
    return walker.graph.add(Node("piecewise", (x,), shape, dtype, params=params))


def _extremum(walker, eqn, inputs):
    """max(x, c) and min(x, c) are kinked units; max(a, b) = a + relu(b − a), min(a, b) = a + min(b − a, 0)."""
    positions = _traced(inputs)
    below, above = (0.0, 1.0) if eqn.primitive.name == "max" else (1.0, 0.0)
    if len(positions) == 1:
        constant = inputs[1 - positions[0]]
        return [_piecewise(walker, eqn, inputs[positions[0]].index, constant, constant, below, above)]
    a, b = inputs
    graph = walker.graph
    shape, dtype = _out(eqn)
    difference = graph.add(Node("affine", (a.index, b.index), shape, dtype, lambda u, v: v - u))
    kinked = _piecewise(walker, eqn, difference.index, 0.0, 0.0, below, above)
    return [graph.add(Node("affine", (a.index, kinked.index), shape, dtype, lambda u, v: u + v, monotone=True))]


def _smooth(walker, eqn, inputs):
    (position,) = _traced(inputs)
    shape, dtype = _out(eqn)
    return [walker.graph.add(Node("smooth", (inputs[position].index,), shape, dtype,
                                  params=dict(name=eqn.primitive.name)))]


def _reduce_max(walker, eqn, inputs):
    (x,) = inputs
    axes = tuple(eqn.params["axes"])
    maximum = eqn.primitive.name == "reduce_max"

    def candidates(v, fill):
        moved = jnp.moveaxis(v if maximum else -v, axes, tuple(range(len(axes))))
        return moved.reshape((-1,) + moved.shape[len(axes):])
    return [_max_node(walker, eqn, x, candidates, maximum)]


def _reduce_window_max(walker, eqn, inputs):
    (x,) = inputs
    p = eqn.params
    if any(d != 1 for d in p["base_dilation"]):
        raise NoRule(f"{eqn.primitive.name!r} with base dilation has no linear-bound rule")
    maximum = eqn.primitive.name == "reduce_window_max"
    out_shape, _ = _out(eqn)
    offsets = list(itertools.product(*(range(w) for w in p["window_dimensions"])))

    def candidates(v, fill):
        v = v if maximum else -v
        padded = jax.lax.pad(v, jnp.asarray(fill, v.dtype), [(lo, hi, 0) for lo, hi in p["padding"]])
        windows = []
        for offset in offsets:
            start = [o * d for o, d in zip(offset, p["window_dilation"])]
            limit = [s + (n - 1) * stride + 1 for s, n, stride in zip(start, out_shape, p["window_strides"])]
            windows.append(jax.lax.slice(padded, start, limit, p["window_strides"]))
        return jnp.stack(windows)
    return [_max_node(walker, eqn, x, candidates, maximum)]


def _max_node(walker, eqn, x: _Ref, candidates, maximum: bool) -> _Ref:
    shape, dtype = _out(eqn)
    graph = walker.graph
    node = graph.add(Node("max", (x.index,), shape, dtype, candidates))
    if maximum:
        return node
    return graph.add(Node("affine", (node.index,), shape, dtype, lambda v: -v, scale=-1.0,   # min = −max(−x)
                          absolute=lambda v: v))


#: Affine primitives that select, copy or sum entries (linear parts nondecreasing in every operand).
MONOTONE = frozenset((
    "add", "add_any", "reshape", "squeeze", "expand_dims", "transpose", "rev", "copy", "copy_p", "broadcast_in_dim",
    "convert_element_type", "reduce_precision", "pad", "slice", "dynamic_slice", "gather", "concatenate",
    "reduce_sum", "reduce_window_sum", "cumsum"))

#: primitive name -> rule(walker, eqn, inputs) -> [output]; see the module docstring to add one.
RULES: dict[str, Callable] = {
    **{name: _linear for name in (
        "add", "sub", "add_any", "neg", "reshape", "squeeze", "expand_dims", "transpose", "rev", "copy", "copy_p",
        "broadcast_in_dim", "convert_element_type", "reduce_precision", "pad", "slice", "dynamic_slice", "gather",
        "concatenate", "reduce_sum", "reduce_window_sum", "cumsum", "dynamic_update_slice")},
    **{name: _bilinear for name in ("mul", "div", "dot_general", "conv_general_dilated")},
    **{name: _comparison for name in ("ge", "gt", "le", "lt")},
    "select_n": _select_n,
    "max": _extremum, "min": _extremum,
    "logistic": _smooth, "tanh": _smooth,
    "reduce_max": _reduce_max, "reduce_min": _reduce_max,
    "reduce_window_max": _reduce_window_max, "reduce_window_min": _reduce_window_max,
}


# -- backward propagation --------------------------------------------------------------------

def _sum_rest(a):
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _step(graph: Graph, node: Node, relaxed, lam):
    """The coefficients on the node's inputs and the offset, for a lower bound of lam · node."""
    positive, negative = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
    if node.kind == "affine":
        zeros = [jnp.zeros(graph.nodes[i].shape, graph.nodes[i].dtype) for i in node.inputs]
        constant, pullback = jax.vjp(node.fn, *zeros)
        lam = lam.astype(constant.dtype)
        return jax.vmap(pullback)(lam), _sum_rest(lam * constant)
    if node.kind == "max":
        lower_choice, upper_choice, upper_constant = relaxed
        per_candidate = positive[:, None] * lower_choice + negative[:, None] * upper_choice
        x = graph.nodes[node.inputs[0]]
        _, pullback = jax.vjp(lambda v: node.fn(v, 0.0), jnp.zeros(x.shape, x.dtype))
        return jax.vmap(pullback)(per_candidate), _sum_rest(negative * upper_constant)
    alpha_l, beta_l, alpha_u, beta_u = relaxed
    return (positive * alpha_l + negative * alpha_u,), _sum_rest(positive * beta_l + negative * beta_u)


def backward(graph: Graph, relaxed: dict, start: int, lam, stop: int = 0):
    """(coefficients on node `stop` [S, *stop], offsets [S]): lam · node_start ≥ coefficients · node_stop + offsets.

    stop: the input (0), or a node every path from the input to `start` passes through.
    """
    pending, offsets = {start: lam}, jnp.zeros(lam.shape[0], lam.dtype)
    for index in range(start, stop, -1):
        lam = pending.pop(index, None)
        if lam is None:
            continue
        node = graph.nodes[index]
        coefficients, offset = _step(graph, node, relaxed.get(index), lam)
        offsets = offsets + offset
        for i, c in zip(node.inputs, coefficients):
            pending[i] = pending[i] + c if i in pending else c
    last = graph.nodes[stop]
    return pending.get(stop, jnp.zeros((lam.shape[0],) + last.shape, lam.dtype)), offsets


def affine_prefix(graph: Graph) -> int | None:
    """The node that feeds the first nonlinearity when only affine nodes lie before it and no later node reads
    them: every path from the input to a nonlinearity passes through it (a first dense or convolution layer)."""
    first = next((node for node in graph.nodes if node.kind in NONLINEAR), None)
    if first is None or first.inputs[0] == 0:
        return None
    prefix = first.inputs[0]
    if any(i < prefix for node in graph.nodes[prefix + 1:] for i in node.inputs):
        return None
    return prefix


def crown(graph: Graph, spec, input_bounds: Callable, minimum: Callable, max_rows: int = 512, prefix=None,
          known: dict | None = None):
    """Lower bounds of spec · output [S]: intermediate bounds by CROWN, node by node, then the spec's.

    input_bounds() -> (lower, upper) of the input; minimum(coefficients [S, n], offsets [S]) -> [S], the
    minimum of coefficients · x + offsets over the input set. An intermediate node's bounds are computed
    `max_rows` rows (units, each from below and from above) at a time, to bound the memory.
    prefix: None, or (index of an `affine_prefix`, minimum over the set of coefficients on that node
    [S, n_prefix] and offsets): the nodes past it are bounded from their coefficients on it.
    known: {node index: (lower, upper)} bounds the caller computed (sound over the same set).
    """
    bounds, relaxed = {0: input_bounds(), **(known or {})}, {}
    for node in graph.nodes:
        if node.kind not in NONLINEAR:
            continue
        source = node.inputs[0]
        if source not in bounds:
            bounds[source] = _source_bounds(graph, relaxed, bounds, source, minimum, spec.dtype, max_rows, prefix)
        relaxed[node.index] = relaxation(node, *bounds[source])
        bounds[node.index] = output_bounds(node, *bounds[source])   # what a backward pass from it would give, or better
    coefficients, offsets = backward(graph, relaxed, graph.output, spec)
    return coefficients, offsets


def _source_bounds(graph: Graph, relaxed: dict, bounds: dict, source: int, minimum: Callable, dtype,
                   max_rows: int, prefix):
    """(lower, upper) of the node feeding a nonlinearity: through a monotone node from its input's bounds
    (a reshape of a ReLU's output, exactly); carried forward from the input where the node has more units than
    half the input and no affine prefix's cheaper bound applies to it (`jaxadv.forward_bounds`); else backward."""
    node = graph.nodes[source]
    if node.kind == "affine" and node.monotone and len(node.inputs) == 1 and node.inputs[0] in bounds:
        return tuple(node.fn(b) for b in bounds[node.inputs[0]])
    if prefix is not None and source > prefix[0]:
        return _intermediate_bounds(graph, relaxed, source, prefix[0], prefix[1], dtype, max_rows)
    if 2 * np.prod(node.shape) > np.prod(graph.nodes[0].shape) and forward_supported(graph, source):
        return forward_bounds(graph, relaxed, source, minimum, dtype)
    return _intermediate_bounds(graph, relaxed, source, 0, minimum, dtype, max_rows)


def _intermediate_bounds(graph: Graph, relaxed: dict, source: int, stop: int, minimum: Callable, dtype,
                         max_rows: int):
    """(lower, upper) of a node's value over the input set: a backward pass from ± each of its units."""
    shape = graph.nodes[source].shape
    size = int(np.prod(shape))
    rows = 2 * size
    chunk = min(rows, max_rows)

    def bound(start):
        index = start + jnp.arange(chunk)                     # rows past the end repeat earlier ones: dropped
        unit = jax.nn.one_hot(index % size, size, dtype=dtype) * jnp.where(index % rows < size, 1, -1)[:, None]
        coefficients, offsets = backward(graph, relaxed, source, unit.reshape((chunk,) + shape), stop)
        return minimum(coefficients.reshape(chunk, -1), offsets)
    starts = jnp.arange(-(-rows // chunk)) * chunk
    low = jax.lax.map(bound, starts).reshape(-1)[:rows]
    return low[:size].reshape(shape), -low[size:].reshape(shape)
