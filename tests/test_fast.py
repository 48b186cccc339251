"""The fast-gradient family (jaxadv.attacks.fast): closed forms on linear models, the box, batch independence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv.attacks import fgm, fgsm, minimal_fast_gradient, pgd
from jaxadv.attacks.fast import fast_gradient_direction, success_along_direction
from jaxadv.attacks import fast
from jaxadv.attacks.exact import exact_linear_minimum
from conftest import tiny_sigmoid_net

SHAPE = (4, 4, 1)
N = 16


def _linear(weights, bias):
    def logits(params, x):
        return x.reshape(x.shape[0], -1) @ params[0] + params[1]
    return jax.tree_util.Partial(logits, (jnp.asarray(weights, jnp.float32), jnp.asarray(bias, jnp.float32)))


NET = tiny_sigmoid_net()


def _images(seed, batch=12, low=0.0, high=1.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, high, size=(batch,) + SHAPE).astype(np.float32)
    if low == 0.0:
        x[rng.uniform(size=x.shape) < 0.3] = 0.0
    return x


def _predictions(fn, x):
    return np.asarray(jnp.argmax(fn(jnp.asarray(x)), -1), np.int32)


def test_fgm_on_a_linear_binary_model_is_the_exact_minimal_l2_direction():
    """Two classes: the gradient is ∝ w_other − w_label, the boundary's normal; distance (w·x + b)/‖w‖."""
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(N, 2)).astype(np.float32) * 0.3
    offset = -0.25 * np.sum(weights[:, 0] - weights[:, 1])          # the boundary through the box's middle
    bias = np.array([offset, -offset], np.float32)
    fn = _linear(weights, bias)
    x = _images(1, batch=16, low=0.4, high=0.6)                     # mid-box: the box does not bind
    y = _predictions(fn, x)
    w = (weights[:, 0] - weights[:, 1]).astype(np.float64)
    flat = x.reshape(len(x), -1).astype(np.float64)
    signed = flat @ w + (bias[0] - bias[1])                          # > 0: class 0
    distance = np.abs(signed) / np.linalg.norm(w)                    # the closed form
    exact_r = -(signed / np.dot(w, w))[:, None] * w[None, :]         # the minimal perturbation
    assert np.all(np.abs(exact_r) < 0.35)                            # ... well inside the box
    direction = np.asarray(fast_gradient_direction(fn, x, y)).reshape(len(x), -1)
    cosine = np.sum(direction * exact_r, -1) / np.linalg.norm(exact_r, axis=-1)
    np.testing.assert_allclose(cosine, 1.0, atol=1e-6)
    found = minimal_fast_gradient(fn, x, y, bisections=30)
    assert np.all(found.success)
    np.testing.assert_allclose(found.l2, distance, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(found.epsilon, distance, rtol=1e-4, atol=1e-6)
    # The same minimum from the independent QP reference (scipy), box included.
    for i in range(4):
        _, reference = exact_linear_minimum(weights, bias, flat[i], 1 - y[i])
        assert float(found.l2[i]) == pytest.approx(reference, rel=1e-4, abs=1e-6)
    # One FGM step just past the distance succeeds, just short of it fails.
    assert np.all(fgm(fn, x, y, (distance * 1.001).astype(np.float32)).success)
    assert not np.any(fgm(fn, x, y, (distance * 0.999).astype(np.float32)).success)


def test_fgsm_matches_the_analytic_gradient_of_softmax_regression():
    rng = np.random.default_rng(2)
    weights, bias = rng.normal(size=(N, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)
    fn = _linear(weights, bias)
    x = _images(2)
    y = _predictions(fn, x)
    flat = x.reshape(len(x), -1).astype(np.float64)
    logits = flat @ weights + bias
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    grad = (p - np.eye(10)[y]) @ weights.T                           # ∇x cross-entropy
    expected = np.clip(flat + 0.1 * np.sign(grad), 0, 1).reshape(x.shape)
    np.testing.assert_allclose(fgsm(fn, x, y, 0.1).adversarial, expected, atol=1e-6)


@pytest.mark.parametrize("attack", ["fgm", "fgsm", "pgd_linf", "pgd_l2", "minimal_l2", "minimal_linf"])
def test_every_output_inside_the_box_with_success_recomputed(attack):
    x = _images(3, batch=16, low=0.2, high=0.8)
    y = _predictions(NET, x)
    box = dict(lower=0.2, upper=0.8)
    result = {"fgm": lambda: fgm(NET, x, y, 0.5, **box),
              "fgsm": lambda: fgsm(NET, x, y, 0.1, **box),
              "pgd_linf": lambda: pgd(NET, x, y, 0.1, norm="linf", steps=8, **box),
              "pgd_l2": lambda: pgd(NET, x, y, 0.5, norm="l2", steps=8, **box),
              "minimal_l2": lambda: minimal_fast_gradient(NET, x, y, norm="l2", **box),
              "minimal_linf": lambda: minimal_fast_gradient(NET, x, y, norm="linf", **box)}[attack]()
    adv = np.asarray(result.adversarial)
    assert adv.min() >= 0.2 and adv.max() <= 0.8
    np.testing.assert_array_equal(result.success, _predictions(NET, adv) != y)
    d = (adv - x).reshape(len(x), -1)
    np.testing.assert_allclose(result.l2, np.linalg.norm(d, axis=-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.linf, np.abs(d).max(-1), atol=1e-7)
    if attack.startswith("pgd"):
        budget = result.l2 if attack == "pgd_l2" else result.linf
        assert np.all(np.asarray(budget) <= np.asarray(result.epsilon) * (1 + 1e-5))
    if attack.startswith("minimal"):
        ok = np.asarray(result.success)
        assert ok.any()
        np.testing.assert_array_equal(np.isfinite(result.epsilon), ok)


def test_pgd_fools_at_least_what_one_step_does_and_stops_once_adversarial():
    x = _images(4, batch=32)
    y = _predictions(NET, x)
    one = fgsm(NET, x, y, 0.1)
    many = pgd(NET, x, y, 0.1, norm="linf", steps=10, step_size=0.1)
    # The first BIM step with step size ε is the FGSM step; an image stops where it first succeeds.
    assert np.all(np.asarray(many.success)[np.asarray(one.success)])
    np.testing.assert_array_equal(np.asarray(many.adversarial)[np.asarray(one.success)],
                                  np.asarray(one.adversarial)[np.asarray(one.success)])
    assert np.mean(many.success) > np.mean(one.success)


def test_minimal_step_is_the_first_success_along_the_direction():
    x = _images(5, batch=16)
    y = _predictions(NET, x)
    found = minimal_fast_gradient(NET, x, y, norm="l2", bisections=25)
    direction = fast_gradient_direction(NET, x, y, norm="l2")
    eps = np.asarray(found.epsilon)
    ok = np.isfinite(eps)
    # Just below the found ε the step fails (the bisection's invariant); at it, it succeeds.
    scaled = direction[ok] * jnp.asarray(eps[ok] * 0.999).reshape(-1, 1, 1, 1)
    ratio = success_along_direction(NET, jnp.asarray(x[ok]), jnp.asarray(y[ok]), scaled, jnp.ones(1), 0.0, 1.0)
    assert not np.any(ratio)
    assert np.all(found.success[ok])


def test_results_do_not_depend_on_batch_position():
    x = _images(6, batch=16)
    y = _predictions(NET, x)
    runs = lambda a, b: (fgm(NET, a, b, 0.7), pgd(NET, a, b, 0.1, steps=5), minimal_fast_gradient(NET, a, b))
    base = runs(x, y)
    shift = 5
    for a, b in zip(base, runs(np.roll(x, shift, 0), np.roll(y, shift, 0))):
        for field in a._fields:
            np.testing.assert_array_equal(np.roll(np.asarray(getattr(a, field)), shift, 0), np.asarray(getattr(b, field)),
                                          err_msg=field)


@pytest.mark.parametrize("call, error, name", [
    (lambda x, y: fgm(NET, x, y, 0.1, norm="l1"), ValueError, "norm"),
    (lambda x, y: fgm(NET, x, y, -0.1), ValueError, "epsilon"),
    (lambda x, y: fgm(NET, x, y, np.ones(3)), ValueError, "epsilon"),
    (lambda x, y: fgm(NET, x, y, "big"), TypeError, "epsilon"),
    (lambda x, y: fgsm(NET, x.astype(np.int32), y, 0.1), TypeError, "images"),
    (lambda x, y: fgsm(NET, x + 2, y, 0.1), ValueError, "images"),
    (lambda x, y: pgd(NET, x, y, 0.1, steps=0), ValueError, "steps"),
    (lambda x, y: pgd(NET, x, y, 0.1, step_size=np.nan), ValueError, "step_size"),
    (lambda x, y: minimal_fast_gradient(NET, x, y, max_epsilon=0.0), ValueError, "max_epsilon"),
    (lambda x, y: minimal_fast_gradient(NET, x, y[:1]), ValueError, "labels"),
    (lambda x, y: fast_gradient_direction(NET, x, y.astype(np.float32)), TypeError, "labels"),
])
def test_bad_input_is_refused_by_name_before_any_work(call, error, name, monkeypatch):
    def no_work(*args, **kw):
        raise AssertionError("compiled attack reached")

    for core in ("fgm_core", "pgd_core", "minimal_fast_gradient_core", "fast_gradient_direction_core"):
        monkeypatch.setattr(fast, core, no_work)
    x = _images(7, batch=2)
    with pytest.raises(error, match=name):
        call(x, np.zeros(2, np.int32))
