"""Projected L-BFGS (jaxadv.box_lbfgs) against independent references.

- the coefficient-space two-loop recursion equals a dense BFGS inverse-Hessian
  recursion built in NumPy, and optax's own two-loop recursion;
- box-constrained convex quadratics and a Rosenbrock in a box: the same
  minimum as scipy's L-BFGS-B (float64), and the KKT conditions hold, run
  through the optax transformation (`jaxadv.optim.minimize_box`), the path the
  attack takes;
- every trial point and iterate stays in the box.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

from jaxadv import box_lbfgs
from jaxadv.optim import minimize_box


def _memory(rng, n, m, num_pairs, newest):
    """Random curvature pairs (s·y > 0) stored in slots newest, newest-1, ... with their Gram matrices."""
    pairs = np.zeros((2, m, n))
    rho = np.zeros(m)
    order = [(newest - age) % m for age in range(num_pairs)][::-1]      # oldest first
    a = rng.normal(size=(n, n))
    hessian = a @ a.T / n + np.eye(n)
    for j in order:
        s = rng.normal(size=n)
        y = hessian @ s
        pairs[0, j], pairs[1, j], rho[j] = s, y, 1.0 / (s @ y)
    s_all, y_all = pairs[0], pairs[1]
    gram = np.stack([s_all @ s_all.T, s_all @ y_all.T, y_all @ y_all.T])
    return pairs, rho, gram, order


def _dense_inverse_hessian(pairs, rho, order, gamma, n):
    h = gamma * np.eye(n)
    for j in order:
        s, y = pairs[0, j], pairs[1, j]
        v = np.eye(n) - rho[j] * np.outer(y, s)
        h = v.T @ h @ v + rho[j] * np.outer(s, s)
    return h


@pytest.mark.parametrize("num_pairs,newest", [(0, 4), (3, 1), (5, 2), (5, 4)])
def test_two_loop_matches_dense_bfgs_and_optax(num_pairs, newest):
    from optax._src.transform import _precondition_by_lbfgs
    rng = np.random.default_rng(num_pairs * 10 + newest)
    n, m, gamma = 12, 5, 0.7
    pairs, rho, gram, order = _memory(rng, n, m, num_pairs, newest)
    g = rng.normal(size=n)
    with jax.enable_x64(True):
        ours = np.asarray(box_lbfgs.inverse_hessian_times(
            jnp.asarray(g), jnp.asarray(pairs[0]), jnp.asarray(pairs[1]), jnp.asarray(rho), jnp.asarray(gram),
            jnp.asarray(gamma), newest))
        reference = _dense_inverse_hessian(pairs, rho, order, gamma, n) @ g
        optax_result = np.asarray(_precondition_by_lbfgs(
            jnp.asarray(g), jnp.asarray(pairs[0]), jnp.asarray(pairs[1]), jnp.asarray(rho), gamma, (newest + 1) % m))
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(ours, optax_result, rtol=1e-9, atol=1e-11)


def _scipy_box(fun, x0, lower, upper):
    value_and_grad = jax.jit(jax.value_and_grad(fun))

    def f(x):
        v, g = value_and_grad(jnp.asarray(x))
        return float(v), np.asarray(g, np.float64)

    return scipy.optimize.minimize(f, x0, jac=True, method="L-BFGS-B", bounds=[(lower, upper)] * len(x0),
                                   options=dict(ftol=0.0, gtol=1e-12, maxiter=5000, maxcor=10))


def _kkt_violation(x, g, lower, upper):
    return np.max(np.abs(np.clip(x - g, lower, upper) - x))


@pytest.mark.parametrize("seed", range(4))
def test_box_quadratic_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n = 25
    a = rng.normal(size=(n, n))
    h = a @ a.T / n + 0.05 * np.eye(n)
    b = 2.0 * rng.normal(size=n)            # pushes many coordinates onto a bound
    x0 = rng.uniform(0, 1, size=n)
    with jax.enable_x64(True):
        fun = lambda x: 0.5 * x @ (jnp.asarray(h) @ x) - jnp.asarray(b) @ x
        config = dict(max_iterations=1000, gtol=1e-10, ftol=0.0)
        ours = jax.jit(lambda x: minimize_box(fun, x, 0.0, 1.0, **config))(jnp.asarray(x0))
        reference = _scipy_box(fun, x0, 0.0, 1.0)
        x = np.asarray(ours.x)
    assert np.all((x >= 0) & (x <= 1))
    active = np.sum((x == 0) | (x == 1))
    assert active > 0, "the test problem should have active bounds"
    # Strictly convex: the minimiser is unique, so both solvers must find it.
    assert float(ours.value) <= reference.fun + 1e-10 * max(1.0, abs(reference.fun))
    np.testing.assert_allclose(x, reference.x, atol=1e-4)
    assert _kkt_violation(x, h @ x - b, 0.0, 1.0) < 1e-5


def test_rosenbrock_in_a_box_matches_scipy():
    n, lower, upper = 8, -2.0, 0.8     # the unconstrained minimiser (1, ..., 1) lies outside the box
    x0 = np.full(n, -0.5)
    with jax.enable_x64(True):
        fun = lambda x: jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)
        config = dict(max_iterations=3000, gtol=1e-9, ftol=0.0)
        ours = jax.jit(lambda x: minimize_box(fun, x, lower, upper, **config))(jnp.asarray(x0))
        reference = _scipy_box(fun, x0, lower, upper)
        g = np.asarray(jax.grad(fun)(ours.x))
    x = np.asarray(ours.x)
    assert np.all((x >= lower) & (x <= upper))
    assert np.any(x == upper)
    assert abs(float(ours.value) - reference.fun) <= 1e-8 * max(1.0, abs(reference.fun))
    np.testing.assert_allclose(x, reference.x, atol=1e-4)
    assert _kkt_violation(x, g, lower, upper) < 1e-6


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lower=st.floats(-2.0, 0.0), width=st.floats(0.1, 3.0))
def test_every_trial_and_iterate_stays_in_the_box(seed, lower, width):
    upper = lower + width
    rng = np.random.default_rng(seed)
    n = 10
    center = jnp.asarray(rng.normal(size=n) * 3.0, jnp.float32)
    fun = lambda x: jnp.sum((x - center) ** 2 * jnp.arange(1, n + 1)) + jnp.sum(jnp.sin(3 * x))
    state = box_lbfgs.init(jnp.asarray(rng.uniform(lower, upper, size=n), jnp.float32), lower, upper)
    for _ in range(40):
        assert bool(jnp.all((state.trial >= lower) & (state.trial <= upper)))
        assert bool(jnp.all((state.x >= lower) & (state.x <= upper)))
        value, grad = jax.value_and_grad(fun)(state.trial)
        state = _tell(state, value, grad, lower, upper)
    assert int(state.iterations) >= 1


_tell = jax.jit(box_lbfgs.tell)


def test_iteration_cap_and_status():
    fun = lambda x: jnp.sum((x - 0.3) ** 4)
    result = minimize_box(fun, jnp.zeros(5), 0.0, 1.0, max_iterations=3, gtol=0.0, ftol=0.0)
    assert int(result.iterations) == 3
    assert int(result.status) == box_lbfgs.MAX_ITERATIONS


def test_starts_converged_at_a_kkt_point():
    # x0 = 0 with the gradient pushing outward on every coordinate: already optimal, no step taken.
    result = minimize_box(lambda x: jnp.sum(x), jnp.zeros(4), 0.0, 1.0)
    assert int(result.status) == box_lbfgs.CONVERGED_GRADIENT
    assert int(result.evaluations) == 1
    np.testing.assert_array_equal(np.asarray(result.x), 0.0)
