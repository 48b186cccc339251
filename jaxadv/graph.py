"""The walk over a traced function's jaxpr that every bound analysis shares.

    closed = trace(logits_fn, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32), argument="model")
    outputs = Walker(RULES, is_traced=lambda v: isinstance(v, Node), analysis="linear-bound").run(
        closed.jaxpr, closed.consts, [input_node])

An analysis supplies values that stand for "depends on the input" and a dict of
rules keyed by the primitive's name, rule(walker, eqn, inputs) -> outputs. The
walker evaluates every equation that does not touch such a value (weights and
what the model computes from them; under `jax.jit` these are tracers, so new
parameters reuse a compilation), walks into calls (`jit`, `custom_jvp_call`
as in `jax.nn.relu`, `custom_vjp_call`, `checkpoint`), and hands every other
equation on the input's path to its rule. A primitive without a rule is
refused by name, with where to add one.

An analysis that wants patterns read as the operators they are first
flattens the trace (`flatten`: calls on the input's path inlined, so a pattern
split across `jit` boundaries is one run of equations) and rewrites it
(`simplify`, with `jaxadv.patterns.PATTERNS`), as jax_verify's simplifier
does: an im2col convolution becomes one `convolution` equation, a zero or wrap
padding before it is folded into it. A rewritten equation's primitive is a
`Synthetic` one, which holds the equations it replaced: an analysis with a rule
for it reads it whole, any other walks into those equations as into a call.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax.extend import core as jex_core

from jaxadv.functional import failed_call

__all__ = ["CALLS", "Walker", "evaluate", "bind_with", "trace", "Synthetic", "Equation", "FlatJaxpr", "flatten",
           "simplify", "depends_on_input"]

#: Call primitives the walker enters instead of asking a rule.
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                   "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint"})


def trace(fn: Callable, example: jax.ShapeDtypeStruct, *, argument: str):
    """`jax.make_jaxpr(fn)(example)`, a failing call named as `argument` with the usual fixes."""
    try:
        return jax.make_jaxpr(fn)(example)
    except Exception as error:    # noqa: BLE001 - the user's function: reported with the fix
        raise failed_call(argument, example.shape, error) from error


class NoRule(ValueError):
    """An analysis has no rule for an operator on the input's path (the message names it and where to add one)."""


class Walker:
    """Evaluates a jaxpr on constants and an analysis' traced values, with its `rules` for the traced equations.

    rules: primitive name -> rule(walker, eqn, inputs) -> list of outputs.
    is_traced: whether a value stands for something that depends on the input.
    analysis: the analysis' name, for the refusal of a primitive without a rule.
    registry: where that analysis' rules live (a dotted name), for the same message.
    """

    def __init__(self, rules: dict[str, Callable], is_traced: Callable[[Any], bool], analysis: str, registry: str):
        self.rules, self.is_traced, self.analysis, self.registry = rules, is_traced, analysis, registry
        self.calls: list[str] = []   # the enclosing calls, for error messages

    def run(self, jaxpr, consts: Sequence, args: Sequence) -> list:
        env = {}

        def read(var):
            return var.val if isinstance(var, jex_core.Literal) else env[var]

        for var, value in itertools.chain(zip(jaxpr.constvars, consts), zip(jaxpr.invars, args)):
            env[var] = value
        for eqn in jaxpr.eqns:
            inputs = [read(var) for var in eqn.invars]
            if not any(self.is_traced(value) for value in inputs):
                outputs = evaluate(eqn, inputs)   # input-independent: weights and what is computed from them
            elif is_call(eqn) and eqn.primitive.name not in self.rules:
                outputs = self.call(eqn, inputs)
            else:
                outputs = self.rule(eqn)(self, eqn, inputs)
            for var, value in zip(eqn.outvars, outputs):
                if not isinstance(var, jex_core.DropVar):
                    env[var] = value
        return [read(var) for var in jaxpr.outvars]

    def rule(self, eqn) -> Callable:
        rule = self.rules.get(eqn.primitive.name)
        if rule is None:
            calls = [*self.calls, *getattr(eqn, "calls", ())]
            where = f" (inside {' > '.join(calls)})" if calls else ""
            raise NoRule(f"no {self.analysis} rule for the primitive {eqn.primitive.name!r} on the input's "
                             f"path{where}; {self.registry} maps each primitive's name to its rule: add one there "
                             f"(its module's docstring says how) or keep {eqn.primitive.name!r} off the path from input to logits")
        return rule

    def call(self, eqn, inputs) -> list:
        """Walks the jaxpr a call primitive holds, with the call's inputs."""
        jaxpr, consts = called_jaxpr(eqn, len(inputs))
        self.calls.append(f"{eqn.primitive.name}({eqn.params.get('name', '')})")
        try:
            return self.run(jaxpr, consts, inputs)
        finally:
            self.calls.pop()


def evaluate(eqn, values) -> list:
    """The equation's outputs on concrete (or jit-traced) values (a synthetic one's: its equations, one by one)."""
    if isinstance(eqn.primitive, Synthetic):
        return Walker({}, lambda value: False, "evaluation", "").run(eqn.params["jaxpr"], (), values)
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(params, tuple):   # JAX before 0.7: (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def bind_with(eqn, inputs, replace: dict[int, Any]):
    """The equation's (first) output with the inputs at some positions replaced."""
    return evaluate(eqn, [replace.get(i, value) for i, value in enumerate(inputs)])[0]


def called_jaxpr(eqn, num_inputs: int):
    """(jaxpr, consts) that a call primitive (jit, custom_jvp/vjp, checkpoint) holds, checked against its inputs."""
    if isinstance(eqn.primitive, Synthetic):
        return eqn.params["jaxpr"], ()
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(name)
        if isinstance(inner, FlatJaxpr):
            jaxpr, consts = inner, ()
            break
        if isinstance(inner, jex_core.ClosedJaxpr):
            jaxpr, consts = inner.jaxpr, inner.consts
            break
        if isinstance(inner, jex_core.Jaxpr):
            jaxpr, consts = inner, ()
            break
    else:
        raise ValueError(f"{eqn.primitive.name!r}: no called jaxpr found among its parameters")
    if len(jaxpr.invars) != num_inputs:
        raise ValueError(f"{eqn.primitive.name!r}: the called jaxpr takes {len(jaxpr.invars)} arguments, "
                         f"the call passes {num_inputs}")
    return jaxpr, consts


def is_call(eqn) -> bool:
    """Whether the walker enters the equation (a call primitive, or a synthetic one) unless a rule reads it."""
    return eqn.primitive.name in CALLS or isinstance(eqn.primitive, Synthetic)


# -- the flat graph and its rewriting -------------------------------------------------

class Synthetic(NamedTuple):
    """The primitive of an equation that a pattern wrote in place of a run of equations.

    Its equation's params hold `jaxpr`, a `FlatJaxpr` of the equations it
    replaced (inputs: the equation's inputs), by which it is evaluated.
    """
    name: str
    multiple_results: bool = False


class Equation(NamedTuple):
    """An equation of a `FlatJaxpr`: read as a jaxpr's equation is (primitive, invars, outvars, params).

    `calls`: the calls it was inlined from, for error messages.
    """
    primitive: Any
    invars: list
    outvars: list
    params: dict
    calls: tuple = ()


class FlatJaxpr(NamedTuple):
    """A jaxpr's equations with the calls on the input's path inlined, as `Walker.run` reads a jaxpr."""
    constvars: list
    invars: list
    outvars: list
    eqns: list


class Var:
    """A variable made while inlining (a call's variables are renamed, since a jaxpr may be called twice)."""
    __slots__ = ("aval",)

    def __init__(self, aval):
        self.aval = aval


def flatten(closed) -> tuple[FlatJaxpr, list]:
    """(FlatJaxpr, consts) of a ClosedJaxpr of one input: every call that reads the input is inlined.

    Calls on weights alone stay whole, and are evaluated as before (XLA may
    round a compiled call otherwise than its equations one by one).
    """
    constvars, consts, eqns = list(closed.jaxpr.constvars), list(closed.consts), []
    depends = set(closed.jaxpr.invars)

    def inline(jaxpr, rename, calls=()):
        def name(var):
            return var if isinstance(var, jex_core.Literal) else rename[var]
        for eqn in jaxpr.eqns:
            invars = [name(var) for var in eqn.invars]
            reads_input = any(var in depends for var in invars if not isinstance(var, jex_core.Literal))
            if is_call(eqn) and reads_input:
                inner, values = called_jaxpr(eqn, len(invars))
                fresh = {}
                for var, value in zip(inner.constvars, values):
                    fresh[var] = Var(var.aval)
                    constvars.append(fresh[var])
                    consts.append(value)
                fresh.update(zip(inner.invars, invars))
                outs = inline(inner, fresh, (*calls, f"{eqn.primitive.name}({eqn.params.get('name', '')})"))
                for var, out in zip(eqn.outvars, outs):
                    rename[var] = out
                continue
            outvars = [var if isinstance(var, jex_core.DropVar) else Var(var.aval) for var in eqn.outvars]
            for var, new in zip(eqn.outvars, outvars):
                rename[var] = new
                if reads_input and not isinstance(var, jex_core.DropVar):
                    depends.add(new)
            eqns.append(Equation(eqn.primitive, invars, outvars, dict(eqn.params), calls))
        return [name(var) for var in jaxpr.outvars]

    outvars = inline(closed.jaxpr, {var: var for var in (*closed.jaxpr.constvars, *closed.jaxpr.invars)})
    return FlatJaxpr(constvars, list(closed.jaxpr.invars), outvars, eqns), consts


def depends_on_input(jaxpr: FlatJaxpr) -> set:
    """The variables of `jaxpr` whose values depend on its inputs."""
    depends = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(var in depends for var in eqn.invars if not isinstance(var, jex_core.Literal)):
            depends.update(var for var in eqn.outvars if not isinstance(var, jex_core.DropVar))
    return depends


def simplify(jaxpr: FlatJaxpr, consts: Sequence, patterns: Sequence[Callable]) -> FlatJaxpr:
    """`jaxpr` rewritten by each pattern in turn, then without the equations nothing reads any more.

    A pattern is pattern(jaxpr, consts) -> FlatJaxpr: it returns the jaxpr with
    some runs of equations replaced by `Synthetic` equations.
    """
    for pattern in patterns:
        jaxpr = _without_dead_equations(pattern(jaxpr, consts))
    return jaxpr


def _without_dead_equations(jaxpr: FlatJaxpr) -> FlatJaxpr:
    live = {var for var in jaxpr.outvars if not isinstance(var, jex_core.Literal)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if not eqn.outvars or any(var in live for var in eqn.outvars):   # no outputs: kept for its effect
            kept.append(eqn)
            live.update(var for var in eqn.invars if not isinstance(var, jex_core.Literal))
    return jaxpr._replace(eqns=kept[::-1])
