"""Sparse changes (jaxadv.attacks.sparse): against brute-force Python loops on a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv.attacks import min_pixels_attack, single_pixel_attack
from jaxadv.attacks import sparse
from conftest import tiny_sigmoid_net

SHAPE = (4, 4, 1)
N_PIXELS = 16


def _linear_net(seed=1, classes=10):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = (jax.random.normal(k1, (16, classes)), jax.random.normal(k2, (classes,)))

    def logits(params, x):
        return x.reshape(x.shape[0], -1) @ params[0] + params[1]

    return jax.tree_util.Partial(logits, params)


NET = tiny_sigmoid_net()


def _images(seed, batch=12):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(batch,) + SHAPE).astype(np.float32)
    x[rng.uniform(size=x.shape) < 0.3] = 0.0          # pixels on the bound, like the data's backgrounds
    return x


def _predictions(fn, x):
    return np.asarray(jnp.argmax(fn(jnp.asarray(x)), -1), np.int32)


def _margin_np(logits, label):
    others = np.delete(logits, label)
    return logits[label] - others.max()


def _brute_force_single_pixel(fn, x, labels, values):
    """margins[i, p, v], one forward pass per candidate image."""
    out = np.zeros((len(x), N_PIXELS, len(values)))
    for i in range(len(x)):
        for p in range(N_PIXELS):
            for j, v in enumerate(values):
                z = x[i].reshape(-1).copy()
                z[p] = v
                out[i, p, j] = _margin_np(np.asarray(fn(jnp.asarray(z.reshape((1,) + SHAPE))))[0], labels[i])
    return out


@pytest.mark.parametrize("num_values", [2, 5])
def test_single_pixel_matches_a_brute_force_loop(num_values):
    x = _images(0)
    y = _predictions(NET, x)
    result = single_pixel_attack(NET, x, y, num_values=num_values, images_per_pass=5)   # 12 images: a padded pass
    values = np.linspace(0, 1, num_values, dtype=np.float32)
    reference = _brute_force_single_pixel(NET, x, y, values)
    np.testing.assert_allclose(np.asarray(result.pixel_margin).reshape(len(x), -1), reference.min(-1), atol=1e-5)
    best = reference.reshape(len(x), -1).min(-1)
    np.testing.assert_allclose(result.margin, best, atol=1e-5)
    # The chosen pixel and value reach the best margin, and the returned image is x with that one pixel set.
    flat = np.asarray(result.adversarial).reshape(len(x), -1)
    for i in range(len(x)):
        p, v = int(result.pixel[i]), float(result.value[i])
        assert reference[i, p, list(values).index(np.float32(v))] == pytest.approx(best[i], abs=1e-5)
        expected = x[i].reshape(-1).copy()
        expected[p] = v
        np.testing.assert_array_equal(flat[i], expected)
    # Success is recomputed on the returned image; this model has images that one pixel flips and others it does not.
    np.testing.assert_array_equal(result.success, _predictions(NET, result.adversarial) != y)
    assert 0 < np.mean(result.success) < 1
    np.testing.assert_array_equal(result.success, best < 0)


def test_bounds_are_exact_for_a_linear_model():
    """Softmax regression: the margin is concave in each pixel, so {0, 1} does as well as 33 values."""
    fn = _linear_net()
    x = _images(1, batch=16)
    y = _predictions(fn, x)
    bounds = single_pixel_attack(fn, x, y, num_values=2)
    fine = single_pixel_attack(fn, x, y, num_values=33)
    np.testing.assert_allclose(bounds.pixel_margin, fine.pixel_margin, atol=1e-5)
    np.testing.assert_array_equal(bounds.success, fine.success)
    # ... which a sigmoid net does not guarantee: a finer scan reaches lower margins on some pixel.
    coarse = single_pixel_attack(NET, x, _predictions(NET, x), num_values=2)
    finer = single_pixel_attack(NET, x, _predictions(NET, x), num_values=33)
    assert np.all(np.asarray(finer.pixel_margin) <= np.asarray(coarse.pixel_margin) + 1e-5)
    assert np.any(np.asarray(finer.pixel_margin) < np.asarray(coarse.pixel_margin) - 1e-3)


def _brute_force_greedy(fn, x, label, values, max_pixels):
    """Python greedy: each step sets the unchanged pixel and value of smallest margin; the count that flips."""
    z = x.reshape(-1).copy()
    changed = np.zeros(N_PIXELS, bool)
    for count in range(1, max_pixels + 1):
        best = (np.inf, None, None)
        for p in np.flatnonzero(~changed):
            for v in values:
                if v == z[p]:
                    continue
                trial = z.copy()
                trial[p] = v
                m = _margin_np(np.asarray(fn(jnp.asarray(trial.reshape((1,) + SHAPE))))[0], label)
                if m < best[0]:
                    best = (m, p, v)
        _, p, v = best
        z[p] = v
        changed[p] = True
        if np.argmax(np.asarray(fn(jnp.asarray(z.reshape((1,) + SHAPE))))[0]) != label:
            return count
    return None


def test_min_pixels_is_one_exactly_when_single_pixel_succeeds():
    x = _images(2, batch=24)
    y = _predictions(NET, x)
    single = single_pixel_attack(NET, x, y)
    result = min_pixels_attack(NET, x, y, max_pixels=N_PIXELS, shortlist=4, lanes=3)
    counts = np.asarray(result.num_pixels)
    assert np.all(counts >= 1)
    np.testing.assert_array_equal(counts == 1, np.asarray(single.success))
    np.testing.assert_array_equal(np.asarray(result.adversarial)[counts == 1], np.asarray(single.adversarial)[counts == 1])
    assert np.any(counts > 1)
    # The count is the number of pixels that differ; success is recomputed; the image stays in the box.
    np.testing.assert_array_equal(result.l0, counts)
    np.testing.assert_array_equal(result.success, _predictions(NET, result.adversarial) != y)
    assert np.all(result.success)
    adv = np.asarray(result.adversarial)
    assert adv.min() >= 0 and adv.max() <= 1


def test_exhaustive_greedy_matches_a_python_greedy_loop():
    x = _images(3, batch=10)
    y = _predictions(NET, x)
    result = min_pixels_attack(NET, x, y, max_pixels=N_PIXELS, shortlist=None, lanes=4)
    reference = [_brute_force_greedy(NET, x[i], y[i], (0.0, 1.0), N_PIXELS) for i in range(len(x))]
    assert list(np.asarray(result.num_pixels)) == reference


def test_already_misclassified_needs_zero_pixels_and_max_pixels_caps():
    x = _images(4, batch=8)
    y = _predictions(NET, x)
    wrong = (y + 1) % 10
    wrong[4:] = y[4:]
    result = min_pixels_attack(NET, x, wrong.astype(np.int32), max_pixels=1, lanes=2)
    np.testing.assert_array_equal(result.num_pixels[:4], 0)
    np.testing.assert_array_equal(result.adversarial[:4], x[:4])
    assert np.all(np.asarray(result.num_pixels[4:]) == 1)     # capped at 1: success only where one pixel flips


def test_results_do_not_depend_on_batch_position():
    x = _images(5, batch=16)
    y = _predictions(NET, x)
    single = single_pixel_attack(NET, x, y, images_per_pass=4)
    few = min_pixels_attack(NET, x, y, max_pixels=N_PIXELS, shortlist=4, lanes=3)
    for shift in (1, 7):
        xr, yr = np.roll(x, shift, 0), np.roll(y, shift, 0)
        s = single_pixel_attack(NET, xr, yr, images_per_pass=4)
        f = min_pixels_attack(NET, xr, yr, max_pixels=N_PIXELS, shortlist=4, lanes=3)
        for a, b in ((single, s), (few, f)):
            for field in a._fields:
                np.testing.assert_array_equal(np.roll(np.asarray(getattr(a, field)), shift, 0),
                                              np.asarray(getattr(b, field)), err_msg=field)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(images=np.zeros((2,) + SHAPE, np.int32)), TypeError, "images"),
    (dict(images=np.full((2,) + SHAPE, 1.5, np.float32)), ValueError, "images"),
    (dict(labels=np.zeros(3, np.int32)), ValueError, "labels"),
    (dict(labels=np.zeros(2, np.float32)), TypeError, "labels"),
    (dict(labels=np.array([0, 10], np.int32)), ValueError, "labels"),
    (dict(num_values=1), ValueError, "num_values"),
    (dict(lower=1.0, upper=0.0), ValueError, "lower"),
    (dict(logits_fn="model"), TypeError, "logits_fn"),
    (dict(max_pixels=0), ValueError, "max_pixels"),
    (dict(shortlist=2.5), TypeError, "shortlist"),
])
def test_bad_input_is_refused_by_name_before_any_work(kwargs, error, name, monkeypatch):
    def no_work(*args, **kw):
        raise AssertionError("compiled search reached")

    monkeypatch.setattr(sparse, "single_pixel_core", no_work)
    monkeypatch.setattr(sparse, "min_pixels_core", no_work)
    args = dict(logits_fn=NET, images=np.zeros((2,) + SHAPE, np.float32), labels=np.zeros(2, np.int32))
    args.update(kwargs)
    call = min_pixels_attack if {"max_pixels", "shortlist"} & set(kwargs) else single_pixel_attack
    with pytest.raises(error, match=name):
        call(args.pop("logits_fn"), args.pop("images"), args.pop("labels"), **args)
