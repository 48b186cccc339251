"""Box-constrained L-BFGS for one flat problem, as a pure ask/tell state machine.

    state = init(x0, lower, upper, config)          # state.trial is the first point to evaluate
    while not state.done:
        value, grad = f(state.trial), ∇f(state.trial)
        state = tell(state, value, grad, lower, upper, config)
    state.x, state.x_value                          # the solution, always inside [lower, upper]

This is the pure core. Its public face is `jaxadv.optim.box_lbfgs`, the same
solver as an optax transformation on any pytree, which the attack's lane loop
(`jaxadv.attacks.lbfgs`) and `jaxadv.optim.minimize_box` drive.

The method is projected L-BFGS with an active set (Bertsekas' projected
quasi-Newton scheme): at x with gradient g, the variables held at a bound by
the gradient ("active": x at lower with g > 0, or at upper with g < 0) are
frozen, the L-BFGS direction d = -Z H Z g is computed (Z zeroes the active
components, before H as well as after: otherwise the active gradient leaks
into the free components through H's off-diagonal terms; on the attack's
problems that leak doubled the rejected line-search trials and stopped runs
at visibly higher objective values than scipy's), and the line search
backtracks along the projected arc P(x + t d) with the Armijo test
f(P(x + t d)) <= f(x) + armijo · g·(P(x + t d) - x).
If d is not a descent direction, it falls back to the projected steepest
descent. Every trial point is a projection, so every iterate is inside the box
by construction; the projection is the method, not a clip after the fact.

Each `tell` consumes exactly one function evaluation, so a batch of problems
runs in lock step under `jax.vmap` with one batched gradient per step and no
vmapped inner while-loop (see `jaxadv.attacks.lbfgs`).

Why not optax.scale_by_lbfgs for the quasi-Newton part. Its `update` always
writes the newest (s, y) pair and resets the H0 scaling from it, so it can
neither skip pairs that fail the curvature condition (needed once projections
and a non-convex loss enter) nor leave the memory untouched on a rejected
line-search trial without copying the whole memory through `jnp.where` under
vmap. Its two-loop recursion is also 2m dependent passes over the memory
(docs/benchmarks.md has the cost under vmap). We instead run the two-loop recursion in
coefficient space (the "vector-free" L-BFGS of Chen et al., NeurIPS 2014):
the direction is a combination of the 2m stored vectors and g, the product
runs on their m x m Gram matrices (in the compact form of Byrd, Nocedal and
Schnabel 1994: two small triangular solves instead of 2m dependent steps), and
the big vectors are touched twice per step (one matrix-vector product for the
new inner products, one for the combination). `tests/test_box_lbfgs.py` checks it against optax's recursion.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Status codes (BoxLBFGSState.status).
RUNNING, CONVERGED_GRADIENT, CONVERGED_DECREASE, MAX_ITERATIONS, LINE_SEARCH_FAILED = range(5)
STATUS_NAMES = ("running", "projected gradient below gtol", "relative decrease below ftol",
                "iteration cap", "line search failed")


class BoxLBFGSConfig(NamedTuple):
    """Settings of the box-constrained L-BFGS (static: hashable, used under jit).

    Tolerances follow scipy's L-BFGS-B: stop when the projected gradient's
    largest component is <= gtol, or when an accepted step decreases f by at
    most ftol · max(|f_old|, |f_new|, 1). The defaults are loose enough for
    float32 (about 1e-7 relative precision) to reach rather than stall.
    steepest_before_stop: after a small decrease on a quasi-Newton step, try
    a steepest-descent step before stopping (off: scipy's rule; on the
    attack's problems it cost 12% more evaluations for no smaller distortion
    once the direction masks the active gradient, see `tell`).
    """
    memory_size: int = 10
    max_iterations: int = 100
    max_line_search_steps: int = 20
    gtol: float = 1e-5
    ftol: float = 1e-6
    armijo: float = 1e-4
    steepest_before_stop: bool = False


class BoxLBFGSState(NamedTuple):
    """State of one problem (vmap adds a leading batch axis to every field).

    `s_memory[j]`, `y_memory[j]` are the j-th stored s and y (two arrays, not
    one: the attack moves every y to a new c in place, reading s); `rho[j]` is
    1/(s_j·y_j), 0 for an empty slot (an empty slot is a no-op in the two-loop
    recursion, so restarting only zeroes `rho`). `gram` holds the m x m inner
    products [s·s, s·y, y·y] of the stored vectors; slot `newest` holds the most
    recent pair and older pairs sit at newest-1, newest-2, ... (mod m).
    """
    x: jax.Array                 # [n] current iterate, in the box
    x_value: jax.Array           # f(x)   (x_: not at `trial`, so optax.value_and_grad_from_state finds no
    x_grad: jax.Array            # ∇f(x)   stale `value`/`grad` here and says so; see jaxadv.optim)
    trial: jax.Array             # [n] the point to evaluate next
    direction: jax.Array         # [n] search direction at x
    step: jax.Array              # current step length t along the projected arc
    line_search_steps: jax.Array  # backtracks so far at this iteration
    iterations: jax.Array        # accepted steps
    evaluations: jax.Array       # values consumed by tell
    has_value: jax.Array         # whether x, value, grad hold an evaluated point yet
    accepted: jax.Array          # whether the last tell moved x (or evaluated x0)
    steepest: jax.Array          # whether `direction` is the projected steepest descent
    done: jax.Array
    status: jax.Array
    s_memory: jax.Array          # [m, n]
    y_memory: jax.Array          # [m, n]
    rho: jax.Array               # [m]
    gram: jax.Array              # [3, m, m]: s_i·s_j, s_i·y_j, y_i·y_j
    y_shift: jax.Array           # μ: every stored y_j becomes y_j + μ s_j at the next tell (see `tell`)
    newest: jax.Array            # slot of the newest pair
    gamma: jax.Array             # H0 = gamma · I


def project(x, lower, upper):
    """x clipped into the box [lower, upper] (the Euclidean projection onto it)."""
    return jnp.minimum(jnp.maximum(x, lower), upper)


def projected_gradient_norm(x, grad, lower, upper):
    """max_i |P(x - g)_i - x_i|: zero exactly at a KKT point of the box problem."""
    return jnp.max(jnp.abs(project(x - grad, lower, upper) - x))


def init(x0: jax.Array, lower=0.0, upper=1.0, config: BoxLBFGSConfig = BoxLBFGSConfig()) -> BoxLBFGSState:
    """A fresh state whose first trial is x0 projected into the box."""
    x0 = jnp.asarray(x0)
    n, m, dtype = x0.shape[0], config.memory_size, x0.dtype
    zero, false = jnp.zeros((), jnp.int32), jnp.zeros((), bool)
    return BoxLBFGSState(
        x=x0, x_value=jnp.zeros((), dtype), x_grad=jnp.zeros_like(x0),
        trial=project(x0, lower, upper), direction=jnp.zeros_like(x0), step=jnp.ones((), dtype),
        line_search_steps=zero, iterations=zero, evaluations=zero, has_value=false, accepted=false,
        steepest=false, done=false, status=zero,
        s_memory=jnp.zeros((m, n), dtype), y_memory=jnp.zeros((m, n), dtype), rho=jnp.zeros((m,), dtype), gram=jnp.zeros((3, m, m), dtype),
        newest=jnp.asarray(m - 1, jnp.int32), gamma=jnp.ones((), dtype), y_shift=jnp.zeros((), dtype))


def restart(state: BoxLBFGSState, x0: jax.Array, lower=0.0, upper=1.0) -> BoxLBFGSState:
    """`init` without touching the big memory arrays: empty slots are marked by rho = 0.

    Cheap under a jnp.where mask (the attack restarts some problems of a batch
    while others run on).
    """
    zero, false = jnp.zeros_like(state.iterations), jnp.zeros_like(state.done)
    return state._replace(
        x=x0, trial=project(x0, lower, upper), step=jnp.ones_like(state.step),
        line_search_steps=zero, iterations=zero, evaluations=zero, has_value=false, accepted=false,
        steepest=false, done=false, status=zero, rho=jnp.zeros_like(state.rho), gamma=jnp.ones_like(state.gamma))


def _two_loop(g_dots, a_g, rho, gram, gamma, newest):
    """Coefficients (a_s, a_y, a_g') with H g = a_g' g + Σ a_s[j] s_j + Σ a_y[j] y_j.

    The L-BFGS product in the compact form of Byrd, Nocedal and Schnabel
    (1994), which equals the two-loop recursion but needs no loop over the
    memory: with p = S^T g, q = Y^T g, R the upper triangle of S^T Y (pairs
    ordered oldest to newest) and D its diagonal,
        u = R^{-1} p,   a_s = R^{-T}((D + γ Y^T Y) u − γ q),   a_y = −γ u,
    and H g = γ g + S a_s + Y a_y. Every inner product comes from the Gram
    matrices and `g_dots` = (s_j·g, y_j·g), so the big vectors are not touched
    here. Empty slots (rho = 0) get an identity row in R and contribute nothing.
    """
    m = rho.shape[0]
    order = (newest - jnp.arange(m - 1, -1, -1)) % m           # slots, oldest to newest
    position = (m - 1) - (newest - jnp.arange(m)) % m          # slot -> index in `order`
    valid = (rho != 0)[order]
    both = valid[:, None] & valid[None, :]
    sy = jnp.where(both, gram[1][order][:, order], 0.0)
    yy = jnp.where(both, gram[2][order][:, order], 0.0)
    r = jnp.where(jnp.eye(m, dtype=bool), jnp.where(valid, jnp.diagonal(sy), 1.0), jnp.triu(sy, 1))
    p = jnp.where(valid, g_dots[0][order], 0.0) * a_g
    q = jnp.where(valid, g_dots[1][order], 0.0) * a_g
    u = jax.scipy.linalg.solve_triangular(r, p, lower=False)
    # v = D u + γ (Y^T Y) u − γ q as ONE product [D | Y^T Y | −I] [u; γu; γq], not as elementwise
    # a·b + c: XLA:CPU lets LLVM contract such a pair into an FMA or not depending on how the
    # surrounding ops are fused, and a one-device program is fused differently from a
    # device-partitioned one, so the elementwise form cost `jaxadv.sharding.sharded` its bit-identity
    # across device counts (tests/test_sweep.py).
    diagonal = jnp.where(jnp.eye(m, dtype=bool), jnp.where(valid, jnp.diagonal(sy), 0.0)[:, None], 0.0)
    v = jnp.concatenate([diagonal, yy, -jnp.eye(m, dtype=yy.dtype)], axis=1) @ jnp.concatenate(
        [u, gamma * u, gamma * q])
    a_s = jax.scipy.linalg.solve_triangular(r, v, lower=False, trans="T")
    a_y = -gamma * u
    return a_s[position], a_y[position], gamma * a_g


def inverse_hessian_times(grad, s_memory, y_memory, rho, gram, gamma, newest):
    """H g for the L-BFGS inverse-Hessian approximation stored in the state (for tests and users)."""
    a_s, a_y, a_g = _two_loop((s_memory @ grad, y_memory @ grad), jnp.ones_like(gamma), rho, gram, gamma, newest)
    return a_g * grad + a_s @ s_memory + a_y @ y_memory


def tell(state: BoxLBFGSState, value, grad, lower=0.0, upper=1.0,
         config: BoxLBFGSConfig = BoxLBFGSConfig()) -> BoxLBFGSState:
    """Consume f and ∇f at `state.trial`; return the state with the next trial point.

    Pure and branch-free (everything is computed, then selected with
    jnp.where), so it vmaps over a batch of problems. A state that is done
    stays as it is. In four parts: accept the trial or backtrack, store the
    new curvature pair, test convergence, and choose the next direction.
    A pending `y_shift` μ (the objective's Hessian moved by μ·I since the
    last tell; the caller sets it with the Gram matrices) moves every stored
    y here, in the same pass that stores the new pair.
    """
    dtype = state.x.dtype
    value = jnp.asarray(value, dtype)
    grad = jnp.asarray(grad, dtype)
    trial = state.trial
    first = ~state.has_value

    # -- accept or backtrack --------------------------------------------------
    # The projection can bend a descent direction into an ascent step; such a trial is rejected
    # (a shorter step bends less) rather than accepted by an Armijo bound above f(x).
    predicted = jnp.vdot(state.x_grad, trial - state.x)
    armijo_ok = jnp.isfinite(value) & (predicted < 0) & (value <= state.x_value + config.armijo * predicted)
    accept = ~state.done & (first | armijo_ok)
    reject = ~state.done & ~accept

    memory, free_grad, g_col = _with_new_pair(state, grad, accept & ~first, lower, upper, config)
    s_memory, y_memory, rho, gram, newest, gamma = memory

    # -- the new point and its convergence tests ---------------------------
    x_new = jnp.where(accept, trial, state.x)
    value_new = jnp.where(accept, value, state.x_value)
    grad_new = jnp.where(accept, grad, state.x_grad)
    iterations = state.iterations + (accept & ~first)
    status, force_steepest, line_search_steps = _status(state, value, accept, reject, first, x_new, grad_new,
                                                        iterations, lower, upper, config)
    done = state.done | (status != RUNNING)

    direction, use_quasi_newton = _next_direction(x_new, grad_new, free_grad, g_col, memory, force_steepest,
                                                  lower, upper, config.memory_size)

    # -- the next trial: a fresh unit step after an accept, a backtrack after a reject
    new_direction = jnp.where(accept, direction, state.direction)
    step = jnp.where(accept, 1.0, _backtrack(state, value, trial)).astype(dtype)
    step = jnp.where(state.done, state.step, step)
    next_trial = jnp.where(done, x_new, project(x_new + step * new_direction, lower, upper))

    keep = state.done
    return BoxLBFGSState(
        x=x_new, x_value=value_new, x_grad=grad_new, trial=next_trial, direction=new_direction, step=step,
        line_search_steps=jnp.where(keep, state.line_search_steps, line_search_steps).astype(jnp.int32),
        iterations=iterations.astype(jnp.int32),
        evaluations=state.evaluations + (~keep).astype(jnp.int32),
        has_value=state.has_value | accept, accepted=accept,
        steepest=jnp.where(accept, ~use_quasi_newton, state.steepest), done=done, status=status,
        s_memory=s_memory, y_memory=y_memory, y_shift=jnp.zeros_like(state.y_shift), rho=rho, gram=gram, newest=newest.astype(jnp.int32), gamma=gamma)


def _with_new_pair(state: BoxLBFGSState, grad, accepted, lower, upper, config: BoxLBFGSConfig):
    """The memory with the pair (s, y) of an accepted step stored, if its curvature is positive.

    Returns ((s_memory, y_memory, rho, gram, newest, gamma), the gradient
    with its held components zeroed, and that gradient's inner products with
    every stored vector, s's then y's), all from one pass over the memory.
    """
    m, dtype, trial = config.memory_size, state.x.dtype, state.trial
    s = trial - state.x
    y = grad - state.x_grad
    s_dot_y = jnp.vdot(s, y)
    y_dot_y = jnp.vdot(y, y)
    store = accepted & (s_dot_y > jnp.finfo(dtype).eps * y_dot_y) & (y_dot_y > 0)
    slot = jnp.where(store, (state.newest + 1) % m, state.newest)
    # Written only where stored: a pair not stored goes to slot m, out of range, and is dropped (no read of
    # the old pair, no select over it).
    target = jnp.where(store, slot, m)
    s_memory = state.s_memory.at[target].set(s, mode="drop")
    # (the shift reads the s just written, so that XLA updates both arrays in place: the new pair's slot
    #  gets a shifted y that the new y then overwrites)
    y_memory = (state.y_memory + state.y_shift * s_memory).at[target].set(y, mode="drop")

    # One pass over the memory: inner products of every stored vector with s, y and the new g.
    # (Matrix-vector products: on XLA:CPU, under vmap, faster than one [2m, n] x [n, 3] product.)
    # H is applied to the gradient's free part only (d = -Z H Z g, Bertsekas): the active components
    # would otherwise leak into the free ones through H's off-diagonal terms and spoil the step.
    held = ((trial <= lower) & (grad > 0)) | ((trial >= upper) & (grad < 0))
    free_grad = jnp.where(held, 0.0, grad)
    s_col, y_col, g_col = (jnp.concatenate([s_memory @ v, y_memory @ v]) for v in (s, y, free_grad))
    onehot = jax.nn.one_hot(slot, m, dtype=dtype) * store
    ss = _set_row_col(state.gram[0], onehot, s_col[:m], s_col[:m])           # s_i·s_new
    sy = _set_row_col(state.gram[1], onehot, s_col[m:], y_col[:m])          # row: s_new·y_j, column: s_i·y_new
    yy = _set_row_col(state.gram[2], onehot, y_col[m:], y_col[m:])
    gram = jnp.stack([ss, sy, yy])
    rho = jnp.where(onehot > 0, 1.0 / jnp.where(store, s_dot_y, 1.0), state.rho)
    gamma = jnp.where(store, s_dot_y / jnp.where(store, y_dot_y, 1.0), state.gamma)
    return (s_memory, y_memory, rho, gram, slot, gamma), free_grad, g_col


def _status(state: BoxLBFGSState, value, accept, reject, first, x_new, grad_new, iterations, lower, upper,
            config: BoxLBFGSConfig):
    """(status, whether a stalled quasi-Newton step forces a steepest retry, backtracks at this iteration)."""
    pg_norm = projected_gradient_norm(x_new, grad_new, lower, upper)
    relative_decrease = (state.x_value - value) / jnp.maximum(jnp.maximum(jnp.abs(state.x_value), jnp.abs(value)), 1.0)
    # scipy's rule: stop on the first small decrease. Optionally (steepest_before_stop) a stalled
    # quasi-Newton step first gets a steepest-descent retry, and only a stalled steepest step stops.
    small_decrease = accept & ~first & (relative_decrease <= config.ftol)
    force_steepest = small_decrease & ~state.steepest & config.steepest_before_stop
    line_search_steps = jnp.where(accept, 0, state.line_search_steps + reject)
    status = jnp.where(pg_norm <= config.gtol, CONVERGED_GRADIENT,
             jnp.where(small_decrease & (state.steepest | (not config.steepest_before_stop)), CONVERGED_DECREASE,
             jnp.where(iterations >= config.max_iterations, MAX_ITERATIONS,
             jnp.where(line_search_steps >= config.max_line_search_steps, LINE_SEARCH_FAILED, RUNNING))))
    status = jnp.where(state.done, state.status, status).astype(jnp.int32)
    return status, force_steepest, line_search_steps


def _next_direction(x_new, grad_new, free_grad, g_col, memory, force_steepest, lower, upper, m: int):
    """(direction, whether it is the quasi-Newton one): L-BFGS on the free variables, else steepest descent."""
    s_memory, y_memory, rho, gram, newest, gamma = memory
    dtype = x_new.dtype
    at_lower = (x_new <= lower) & (grad_new > 0)
    at_upper = (x_new >= upper) & (grad_new < 0)
    free = ~(at_lower | at_upper)
    gamma0 = jnp.minimum(1.0, 1.0 / jnp.maximum(jnp.linalg.norm(grad_new), jnp.finfo(dtype).tiny))
    gamma_used = jnp.where(jnp.any(rho != 0), gamma, gamma0)
    a_s, a_y, a_g = _two_loop((g_col[:m], g_col[m:]), jnp.ones((), dtype), rho, gram, gamma_used, newest)
    h_grad = _combine(_combine(a_g * free_grad, a_s, s_memory), a_y, y_memory)
    quasi_newton = jnp.where(free, -h_grad, 0.0)
    steepest = jnp.where(free, -gamma_used * grad_new, 0.0)
    slope = jnp.vdot(grad_new, quasi_newton)
    use_quasi_newton = jnp.isfinite(slope) & (slope < 0) & ~force_steepest & jnp.any(rho != 0)
    return jnp.where(use_quasi_newton, quasi_newton, steepest), use_quasi_newton


def _combine(start, coefficients, vectors):
    """start + Σ_k coefficients[k] · vectors[k], unrolled: one fused elementwise pass over the memory."""
    out = start
    for k in range(vectors.shape[0]):
        out = out + coefficients[k] * vectors[k]
    return out


def _set_row_col(matrix, onehot, row, col):
    """matrix with row `slot` := row and column `slot` := col (onehot marks the slot; zero = unchanged)."""
    keep_row = 1 - onehot[:, None]
    keep_col = 1 - onehot[None, :]
    out = matrix * keep_row + onehot[:, None] * row[None, :]
    return out * keep_col + col[:, None] * onehot[None, :]


def _backtrack(state: BoxLBFGSState, value, trial):
    """Next step after a rejected trial: minimiser of the quadratic through f(x), its slope and f(trial), kept in [0.1t, 0.5t]."""
    t = state.step
    slope = jnp.vdot(state.x_grad, trial - state.x) / t         # directional derivative along the arc at t
    denominator = 2.0 * (value - state.x_value - slope * t)
    t_quadratic = jnp.where(jnp.isfinite(value) & (denominator > 0), -slope * t * t / denominator, 0.5 * t)
    return jnp.clip(t_quadratic, 0.1 * t, 0.5 * t)
