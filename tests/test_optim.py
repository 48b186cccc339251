"""jaxadv.optim.box_lbfgs, the box-constrained L-BFGS as an optax transformation.

References: scipy's L-BFGS-B (float64) on bounded quadratics, a batch of them
under jit(vmap), and a Rosenbrock on pytree parameters with per-leaf bounds
(the attack's own objective at a fixed c runs through this transformation in
tests/test_attacks.py::test_fixed_c_objective_matches_scipy_lbfgsb); the
transformation alone for optax.chain with a pass-through member; the float32
rounding of params + updates for the box.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

from jaxadv.optim import STATUS_NAMES, best_params, box_lbfgs, minimize_box


def _scipy(fun, x0, bounds):
    value_and_grad = jax.jit(jax.value_and_grad(fun))

    def f(x):
        v, g = value_and_grad(jnp.asarray(x))
        return float(v), np.asarray(g, np.float64)

    return scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                                   options=dict(ftol=0.0, gtol=1e-12, maxiter=5000, maxcor=10))


def _quadratic(seed, n=12):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    return a @ a.T / n + 0.05 * np.eye(n), 2.0 * rng.normal(size=n), rng.uniform(0, 1, size=n)


def test_batch_of_bounded_quadratics_under_jit_vmap_matches_scipy():
    """Five problems in one jit(vmap(while_loop)) of the plain optax loop; each equals scipy's minimiser."""
    problems = [_quadratic(seed) for seed in range(5)]
    h, b, x0 = (np.stack(p) for p in zip(*problems))
    solver = box_lbfgs(0.0, 1.0, max_iterations=1000, gtol=1e-10, ftol=0.0)

    def solve(h, b, x0):
        f = lambda x: 0.5 * x @ (h @ x) - b @ x

        def step(carry):
            params, state = carry
            value, grads = jax.value_and_grad(f)(params)
            updates, state = solver.update(grads, state, params, value=value)
            return optax.apply_updates(params, updates), state

        params, state = jax.lax.while_loop(lambda c: ~c[1].done, step, (x0, solver.init(x0)))
        return params, state

    with jax.enable_x64(True):
        params, state = jax.jit(jax.vmap(solve))(jnp.asarray(h), jnp.asarray(b), jnp.asarray(x0))
        params, x = np.asarray(params), np.asarray(state.x)
        assert np.all(np.asarray(state.done))
        for i, (hi, bi, x0i) in enumerate(problems):
            reference = _scipy(lambda z: 0.5 * z @ (jnp.asarray(hi) @ z) - jnp.asarray(bi) @ z, x0i, [(0.0, 1.0)] * 12)
            np.testing.assert_allclose(x[i], reference.x, atol=1e-6)
    np.testing.assert_array_equal(params, x)                   # done: the last update lands on the best point
    assert np.all((x >= 0) & (x <= 1)) and np.sum((x == 0) | (x == 1)) > 0   # bounds active, and held


def test_rosenbrock_on_pytree_params_with_per_leaf_bounds_matches_scipy():
    n = 8
    lower = {"head": -2.0 * np.ones(3), "tail": np.full((5,), -1.5)}
    upper = {"head": 0.8, "tail": np.array([0.9, 0.8, 0.7, 2.0, 2.0])}   # scalar and array leaves
    x0 = {"head": np.full(3, -0.5), "tail": np.full(5, -0.5)}

    def rosenbrock_flat(x):
        return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

    with jax.enable_x64(True):
        fun = lambda p: rosenbrock_flat(jnp.concatenate([p["head"], p["tail"]]))
        ours = jax.jit(lambda p: minimize_box(fun, p, lower, upper, max_iterations=3000, gtol=1e-9, ftol=0.0))(
            jax.tree.map(jnp.asarray, x0))
        flat_bounds = list(zip(np.r_[lower["head"], lower["tail"]], np.r_[np.full(3, 0.8), upper["tail"]]))
        reference = _scipy(rosenbrock_flat, np.full(n, -0.5), flat_bounds)
    assert set(ours.x) == {"head", "tail"} and ours.x["tail"].shape == (5,)
    x = np.r_[ours.x["head"], ours.x["tail"]]
    assert np.all(x <= np.r_[np.full(3, 0.8), upper["tail"]]) and np.any(x == 0.8)
    assert STATUS_NAMES[int(ours.status)] in ("projected gradient below gtol", "relative decrease below ftol")
    assert abs(float(ours.value) - reference.fun) <= 1e-8 * max(1.0, abs(reference.fun))
    np.testing.assert_allclose(x, reference.x, atol=1e-4)


def _run(solver, f, params, steps):
    step = jax.jit(lambda params, state: _one_step(solver, f, params, state))
    state, trail = solver.init(params), []
    for _ in range(steps):
        params, state = step(params, state)
        trail.append(params)
    return np.stack(trail), state


def _one_step(solver, f, params, state):
    value, grads = jax.value_and_grad(f)(params)
    updates, state = solver.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state


def test_composes_with_optax_chain_bit_for_bit():
    """A pass-through member before or after it changes nothing, and chain forwards value= to it."""
    h, b, x0 = _quadratic(7)
    f = lambda x: 0.5 * x @ (jnp.asarray(h, jnp.float32) @ x) - jnp.asarray(b, jnp.float32) @ x
    x0 = jnp.asarray(x0, jnp.float32)
    alone, _ = _run(box_lbfgs(0.0, 1.0), f, x0, 25)
    after, state = _run(optax.chain(box_lbfgs(0.0, 1.0), optax.identity()), f, x0, 25)
    before, _ = _run(optax.chain(optax.identity(), box_lbfgs(0.0, 1.0)), f, x0, 25)
    np.testing.assert_array_equal(after, alone)
    np.testing.assert_array_equal(before, alone)
    assert int(state[0].iterations) > 5


def test_updates_land_inside_the_box_despite_rounding():
    # float32: from x = -100 to the upper bound 0.6369617, x + (t - x) rounds to 0.6369629, outside.
    from jaxadv.optim import _inward
    x, upper = np.float32(-100.0), np.float32(0.6369617)
    assert x + (upper - x) > upper                                     # the naive update leaves the box
    step = _inward(jnp.full(1, x), jnp.full(1, upper - x), x, upper)
    assert x + np.asarray(step)[0] <= upper
    # In a loop: the quadratic pulls every coordinate far above the box; the second step goes to the
    # bound and lands on it or (additive updates reach only multiples of the step's ulp) one ulp inside.
    f = lambda x: jnp.sum((x - 1000.0) ** 2)
    trail, _ = _run(box_lbfgs(x, upper), f, jnp.full(3, x), 4)
    assert np.all(trail <= upper) and np.all(trail[1:] >= upper - np.spacing(upper - x))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lower=st.floats(-300.0, 0.0, width=32), width=st.floats(0.0009765625, 400.0, width=32))
def test_every_point_of_a_plain_optax_loop_stays_in_the_box(seed, lower, width):
    lower = np.float32(lower)
    upper = np.float32(lower + width)
    rng = np.random.default_rng(seed)
    center = jnp.asarray(rng.normal(size=6) * 500, jnp.float32)        # mostly outside the box
    f = lambda x: jnp.sum((x - center) ** 2 * jnp.arange(1, 7)) + jnp.sum(jnp.sin(x))
    x0 = jnp.asarray(rng.uniform(lower, upper, size=6), jnp.float32).clip(lower, upper)
    trail, _ = _run(box_lbfgs(lower, upper), f, x0, 15)
    assert np.all((trail >= lower) & (trail <= upper))


def test_done_lands_on_the_best_point_and_stays():
    f = lambda p: jnp.sum((p["w"] - 2.0) ** 2) + jnp.sum(p["b"] ** 2)        # w's minimum outside the box
    params = {"w": jnp.zeros(4), "b": jnp.full((2, 2), 0.5)}
    solver = box_lbfgs(-1.0, 1.0)
    state = solver.init(params)
    for _ in range(100):
        if state.done:
            break
        params, state = _one_step(solver, f, params, state)
    assert bool(state.done)
    best = best_params(state, params)
    for leaf, best_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(best)):
        np.testing.assert_array_equal(leaf, best_leaf)
    np.testing.assert_allclose(best["w"], 1.0)
    value, grads = jax.value_and_grad(f)(params)
    updates, after = solver.update(grads, state, params, value=value)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(after.evaluations) == int(state.evaluations)


def test_value_and_grad_from_state_raises_instead_of_returning_the_best_points_value():
    """The state holds f at its best point, not at params: reusing it would be silently wrong."""
    f = lambda x: jnp.sum(x ** 2)
    solver = box_lbfgs(0.0, 1.0)
    with pytest.raises(ValueError, match="not found in the state"):
        optax.value_and_grad_from_state(f)(jnp.ones(3) * 0.5, state=solver.init(jnp.ones(3) * 0.5))


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(memory_size=0), ValueError, "memory_size"),
    (dict(memory_size=2.0), TypeError, "memory_size"),
    (dict(max_iterations=True), TypeError, "max_iterations"),
    (dict(max_line_search_steps=-1), ValueError, "max_line_search_steps"),
    (dict(gtol=-1.0), ValueError, "gtol"),
    (dict(ftol="1e-6"), TypeError, "ftol"),
    (dict(armijo=1.0), ValueError, "armijo"),
    (dict(steepest_before_stop=1), TypeError, "steepest_before_stop"),
    (dict(lower="0"), TypeError, "lower"),
    (dict(upper=None), TypeError, "upper"),
])
def test_bad_settings_raise_naming_the_argument(kwargs, error, name):
    arguments = dict(lower=0.0, upper=1.0) | kwargs
    with pytest.raises(error, match=name):
        box_lbfgs(**arguments)


def test_bad_params_bounds_and_calls_raise_naming_the_argument():
    params = {"w": jnp.full(3, 0.5)}
    with pytest.raises(ValueError, match="lower, upper"):
        box_lbfgs(1.0, 0.0).init(params)
    with pytest.raises(ValueError, match="params"):
        box_lbfgs(0.0, 1.0).init({"w": jnp.full(3, 2.0)})                    # outside the box
    with pytest.raises(TypeError, match="params"):
        box_lbfgs(0.0, 1.0).init(jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="lower"):
        box_lbfgs(jnp.zeros(3), 1.0).init(params)                            # not shaped like params
    with pytest.raises(ValueError, match="upper"):
        box_lbfgs(0.0, {"w": jnp.ones(4)}).init(params)                      # leaf does not broadcast
    solver = box_lbfgs(0.0, 1.0)
    state = solver.init(params)
    with pytest.raises(TypeError, match="value"):
        solver.update(params, state, params)
    with pytest.raises(ValueError, match="params"):
        solver.update(params, state, value=1.0)
    with pytest.raises(ValueError, match="grads"):
        solver.update({"v": jnp.ones(3)}, state, params, value=1.0)
