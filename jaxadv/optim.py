"""Box-constrained L-BFGS as an optax transformation: ask/tell in optax's clothing.

    solver = box_lbfgs(lower=0.0, upper=1.0)
    state = solver.init(params)                      # params must lie inside the box
    while not state.done:
        value, grads = jax.value_and_grad(f)(params)
        updates, state = solver.update(grads, state, params, value=value)
        params = optax.apply_updates(params, updates)   # the next trial point, inside the box
    # params is now the best point found (`best_params(state, params)` at any time)

`update` consumes f and ∇f at `params` (the trial point the last update asked
for) and returns `updates` that take `params` to the next trial point. It is
`jaxadv.box_lbfgs.tell` on the raveled pytree (projected L-BFGS with an
active set; see that module for the method and its measurements), so there is
exactly one evaluation per update and no inner loop: a batch of problems runs in
lock step under `jax.vmap`, which is how the attack's lane loop
(`jaxadv.attacks.lbfgs`) drives it, one batched gradient per step.

Not `optax.lbfgs` plus `optax.projections.projection_box` after each step:
its zoom line search runs along the unprojected ray, so the projection moves
every step that meets a bound and the curvature pairs see steps the line
search never checked, and its inner while-loop makes a vmapped batch wait for
its slowest member at every step. On the attack's problems it found larger
distortions than ours and scipy's, and ran far slower (docs/benchmarks.md,
`scripts/bench_attack.py`).

`optax.value_and_grad_from_state` has nothing to reuse here: an update never
holds f at the next trial point (the solver's state keeps f and ∇f at its best
point x as `x_value` and `x_grad`, named so that `value_and_grad_from_state`
raises instead of returning those). Evaluate with `jax.value_and_grad`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxadv import checks
from jaxadv import box_lbfgs as core

BoxLBFGSState = core.BoxLBFGSState


def box_lbfgs(lower, upper, *, memory_size: int = 10, max_iterations: int = 100, max_line_search_steps: int = 20,
              gtol: float = 1e-5, ftol: float = 1e-6, armijo: float = 1e-4,
              steepest_before_stop: bool = False) -> optax.GradientTransformationExtraArgs:
    """Projected L-BFGS on the box lower <= params <= upper, as an optax transformation.

    lower, upper: scalars, or pytrees shaped like params whose leaves broadcast
      to the matching leaf (-inf / inf for an open side).
    The rest: `jaxadv.box_lbfgs.BoxLBFGSConfig` (scipy's L-BFGS-B
      stopping rules, with defaults float32 can meet).

    `update(grads, state, params, *, value)` needs f(params) as `value`. The
    state is a `BoxLBFGSState` on the raveled parameters: `state.done` says
    when to stop (`state.status`: why, see `STATUS_NAMES`), `state.x` is the
    point with the lowest value accepted so far (`best_params` unravels it);
    once done, `updates` take params there and then stay zero.

    The returned point `params + updates` lies inside the box even after the
    rounding of that addition: where it would round outside, the update is
    moved one ulp inward (one suffices: rounding is monotone; test_optim).
    params given to `init` must lie inside the box (checked when concrete).
    """
    config = core.BoxLBFGSConfig(memory_size=memory_size, max_iterations=max_iterations,
                                 max_line_search_steps=max_line_search_steps, gtol=gtol, ftol=ftol, armijo=armijo,
                                 steepest_before_stop=steepest_before_stop)
    _check_config(config)
    _check_bound(lower, "lower")
    _check_bound(upper, "upper")

    def init_fn(params):
        x, _ = _ravel(params, "params")
        lo, up = _flat_bound(lower, params, x.dtype, "lower")[0], _flat_bound(upper, params, x.dtype, "upper")[0]
        if not any(isinstance(a, jax.core.Tracer) for a in (x, lo, up)):
            x_np, lo_np, up_np = np.asarray(x), np.asarray(lo), np.asarray(up)
            if np.any(np.isnan(lo_np)) or np.any(np.isnan(up_np)) or np.any(lo_np > up_np):
                raise ValueError("lower, upper: need lower <= upper everywhere (and no NaN)")
            if not np.all((x_np >= lo_np) & (x_np <= up_np)):
                raise ValueError("params: must lie inside [lower, upper] (f is evaluated there first); project them "
                                 "first, e.g. with optax.projections.projection_box")
        return core.init(x, lo, up, config)

    def update_fn(grads, state, params=None, *, value=None, **extra_args):
        del extra_args   # what optax.chain passes to every member (value_fn, grad, ...)
        if params is None:
            raise ValueError("params: update needs the point where grads and value were evaluated")
        if value is None:
            raise TypeError("value: update needs f(params) as the keyword argument value=")
        if not isinstance(state, core.BoxLBFGSState):
            raise TypeError(f"state: expected a BoxLBFGSState from init, got {type(state).__name__}")
        x, unravel = _ravel(params, "params")
        g, _ = _ravel(grads, "grads", like=params)
        (lo, lo_leaves), (up, up_leaves) = (_flat_bound(lower, params, x.dtype, "lower"),
                                             _flat_bound(upper, params, x.dtype, "upper"))
        # The value belongs to `params`, the point actually evaluated; in the attack's loop that is
        # `state.trial` itself, so this leaves its arithmetic as it was.
        state = core.tell(state._replace(trial=x), value, g, lo, up, config)
        updates = unravel(_inward(x, state.trial - x, lo, up))
        if lo_leaves is not None:    # leaves narrower than the raveled dtype: params + updates rounds in theirs
            updates = jax.tree.map(_inward, params, updates, lo_leaves, up_leaves)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def best_params(state: BoxLBFGSState, params):
    """The state's best point (`state.x`) in the pytree structure of `params`."""
    return ravel_pytree(params)[1](state.x)


class MinimizeResult(NamedTuple):
    """What `minimize_box` returns: the best point, f there, and the solver's counts and status."""
    x: object                # the best point, with x0's pytree structure
    value: jax.Array
    iterations: jax.Array
    evaluations: jax.Array
    status: jax.Array        # index into STATUS_NAMES


STATUS_NAMES = core.STATUS_NAMES


def minimize_box(fun: Callable, x0, lower, upper, **options) -> MinimizeResult:
    """Minimise a scalar `fun(params)` over the box from x0 (any pytree): `box_lbfgs` in one lax.while_loop.

    options: those of `box_lbfgs`. jit it from outside when called repeatedly.
    """
    solver = box_lbfgs(lower, upper, **options)
    value_and_grad = jax.value_and_grad(fun)

    def body(carry):
        params, state = carry
        value, grads = value_and_grad(params)
        updates, state = solver.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    config = core.BoxLBFGSConfig(**options)
    cap = config.max_iterations * (config.max_line_search_steps + 1) + 1
    params, state = jax.lax.while_loop(lambda c: ~c[1].done & (c[1].evaluations < cap), body,
                                       (x0, solver.init(x0)))
    return MinimizeResult(best_params(state, x0), state.x_value, state.iterations, state.evaluations, state.status)


def _inward(x, step, lower, upper):
    """`step` such that x + step (as rounded) stays in [lower, upper] when x + step is meant to.

    x + (t − x) need not round to t: from x = −100 to t = 0.1 in float32 it can land
    ~4e-6 above. Rounding is monotone, so one ulp of `step` toward the inside brings
    the exact sum, and so the rounded one, back to the bound's side.
    """
    landed = x + step
    step = jnp.where(landed > upper, jnp.nextafter(step, jnp.asarray(-jnp.inf, step.dtype)), step)
    return jnp.where(landed < lower, jnp.nextafter(step, jnp.asarray(jnp.inf, step.dtype)), step)


def _ravel(tree, name, like=None):
    checks.pytree(tree, name)
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name}: an empty pytree has nothing to optimise")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"{name}: expected floating leaves, got dtype {jnp.result_type(leaf)}")
    if like is not None and jax.tree.structure(tree) != jax.tree.structure(like):
        raise ValueError(f"{name}: structure {jax.tree.structure(tree)} differs from params' "
                         f"{jax.tree.structure(like)}")
    return ravel_pytree(tree)


def _flat_bound(bound, params, dtype, side):
    """(flat, leaves): `bound` raveled like params in `dtype`, and per leaf in the leaf's own dtype (None when
    every leaf is of `dtype` and the bound a scalar: then `flat` is that scalar).

    A concrete bound is rounded inward in each leaf's dtype (`checks.round_inward`): a float16 leaf then
    stays inside [lower, upper] as given after its values are rounded to float16.
    """
    leaves = jax.tree.leaves(params)
    scalar = jax.tree_util.treedef_is_leaf(jax.tree.structure(bound)) and jnp.ndim(bound) == 0
    same = all(jnp.result_type(leaf) == dtype for leaf in leaves)
    typed = checks.is_traced(bound) or (isinstance(bound, (jax.Array, np.ndarray, np.generic))
                                         and jnp.result_type(bound) == dtype)
    if scalar and same and typed:
        return jnp.asarray(bound, dtype), None
    if scalar:
        bound = jax.tree.map(lambda _: bound, params)
    elif jax.tree.structure(bound) != jax.tree.structure(params):
        raise ValueError(f"{side}: a scalar or a pytree shaped like params; got structure "
                         f"{jax.tree.structure(bound)} for params' {jax.tree.structure(params)}")
    try:
        full = jax.tree.map(lambda b, p: jnp.broadcast_to(_round_inward(b, jnp.result_type(p), side), jnp.shape(p)),
                            bound, params)
    except ValueError:
        raise ValueError(f"{side}: a leaf does not broadcast to its params leaf's shape") from None
    return ravel_pytree(full)[0].astype(dtype), (None if same else full)


def _round_inward(bound, dtype, side):
    """`bound` in `dtype`, rounded toward the inside of the box where the nearest value lies outside."""
    if not checks.is_traced(bound):
        return jnp.asarray(checks.round_inward(np.asarray(bound), dtype, side))
    cast = bound.astype(dtype)
    outside = cast.astype(bound.dtype) < bound if side == "lower" else cast.astype(bound.dtype) > bound
    return jnp.where(outside, jnp.nextafter(cast, jnp.asarray(jnp.inf if side == "lower" else -jnp.inf, dtype)), cast)


def _check_bound(bound, name):
    for leaf in jax.tree.leaves(bound):
        if isinstance(leaf, jax.core.Tracer):
            continue
        kind = np.asarray(leaf).dtype
        if not (np.issubdtype(kind, np.floating) or np.issubdtype(kind, np.integer)) or np.issubdtype(kind, np.bool_):
            raise TypeError(f"{name}: expected real numbers, got dtype {kind}")
    if not jax.tree.leaves(bound):
        raise TypeError(f"{name}: expected a number or a pytree of arrays, got {bound!r}")


def _check_config(config: core.BoxLBFGSConfig):
    for name in ("memory_size", "max_iterations", "max_line_search_steps"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}: expected an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    for name in ("gtol", "ftol", "armijo"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name}: expected a number, got {value!r}")
        if not value >= 0 or (name == "armijo" and not 0 < value < 1):
            raise ValueError(f"{name}: must be >= 0{' and armijo in (0, 1)' if name == 'armijo' else ''}, got {value}")
    if not isinstance(config.steepest_before_stop, (bool, np.bool_)):
        raise TypeError(f"steepest_before_stop: expected a bool, got {config.steepest_before_stop!r}")
