"""Transfer tables: error-rate matrix, distortion, Gaussian controls, rescaled perturbations."""
import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.optimize import brentq

from jaxadv.models import get_model
from jaxadv.transfer import (PerturbedSet, average_distortion, distortions, error_rate_matrix,
                             gaussian_noise, predictions, rescale_perturbations, transfer_table,
                             transfer_versus_noise)


def _images(seed, n, shape=(28, 28, 1)):
    rng = np.random.default_rng(seed)
    # Like MNIST: many pixels exactly at the bounds, the rest inside.
    x = rng.uniform(-0.5, 1.5, size=(n, *shape)).clip(0, 1)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def tiny_models():
    """Two tiny models with random weights: a linear softmax and a sigmoid MLP."""
    out = []
    for name, seed in (("FC10(1e-4)", 0), ("FC100-100-10", 1)):
        model = get_model(name)
        params = model.init(jax.random.PRNGKey(seed))
        out.append((model, params))
    return out


def _brute_force_prediction(model, params, image):
    """One image at a time in float64 numpy, written independently of models.apply."""
    h = np.asarray(image, np.float64).reshape(-1)
    dense = sorted(params["params"].items(), key=lambda item: int(item[0].split("_")[1]))
    for i, (_, p) in enumerate(dense):
        h = h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
        if i < len(dense) - 1:            # the zoo's hidden layers are sigmoids
            h = 1.0 / (1.0 + np.exp(-h))
    return int(np.argmax(h))


def test_error_rate_matrix_matches_brute_force_loop(tiny_models):
    sets = [_images(10, 23), _images(11, 7), _images(12, 40)]
    rng = np.random.default_rng(3)
    labels = [rng.integers(0, 10, size=len(s)).astype(np.int32) for s in sets]
    fns = [functools.partial(m.apply, p) for m, p in tiny_models]
    # batch_size 8 divides none of the set sizes: exercises the padded last batch.
    got = error_rate_matrix(fns, sets, labels, batch_size=8)
    expected = np.zeros((len(sets), len(tiny_models)))
    for s, (images, y) in enumerate(zip(sets, labels)):
        for m, (model, params) in enumerate(tiny_models):
            wrong = [_brute_force_prediction(model, params, img) != label for img, label in zip(images, y)]
            expected[s, m] = np.mean(wrong)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert got.shape == (3, 2)


def test_labels_equal_to_own_predictions_give_zero_error_and_others_full_error(tiny_models):
    model, params = tiny_models[1]
    fn = functools.partial(model.apply, params)
    images = _images(5, 30)
    pred = predictions(fn, images, batch_size=7)
    rates = error_rate_matrix([fn], [images, images], [pred, (pred + 1) % 10])
    np.testing.assert_array_equal(rates, [[0.0], [1.0]])


def test_transfer_table_reports_distortion_and_sizes(tiny_models):
    fns = [functools.partial(m.apply, p) for m, p in tiny_models]
    x = _images(0, 12)
    y = np.zeros(12, np.int32)
    shifted = np.clip(x + 0.05, 0, 1)
    table = transfer_table(fns, [PerturbedSet(x, x, y), PerturbedSet(x, shifted, y)])
    assert table.error_rates.shape == (2, 2)
    assert table.av_distortion[0] == 0.0
    per_image = np.sqrt(((shifted - x) ** 2).reshape(12, -1).mean(axis=1))
    np.testing.assert_allclose(table.av_distortion[1], per_image.mean(), rtol=1e-6)
    np.testing.assert_array_equal(table.set_sizes, [12, 12])


def test_distortion_is_per_pixel_rms():
    x = np.zeros((2, 28, 28, 1), np.float32)
    y = x.copy()
    y[0] = 0.1                      # every pixel moved by 0.1: RMS 0.1
    y[1, 0, 0, 0] = 28.0            # one pixel moved by 28: RMS 28/sqrt(784) = 1
    np.testing.assert_allclose(distortions(x, y), [0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(average_distortion(x, y), 0.55, rtol=1e-6)


def test_gaussian_noise_is_reproducible_from_its_key():
    x = _images(1, 50)
    a = gaussian_noise(jax.random.PRNGKey(7), x, 0.3)
    b = gaussian_noise(jax.random.PRNGKey(7), x, 0.3)
    c = gaussian_noise(jax.random.PRNGKey(8), x, 0.3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_gaussian_noise_has_requested_stddev_and_clipping_keeps_images_valid():
    x = np.full((200, 28, 28, 1), 0.5, np.float32)
    raw = np.asarray(gaussian_noise(jax.random.PRNGKey(0), x, 0.1, clip=False))
    noise = raw - x
    assert abs(noise.mean()) < 2e-3 and abs(noise.std() - 0.1) < 2e-3
    # Near a bound, clipping cuts the applied distortion: at pixel 0, about half the noise is removed.
    zeros = np.zeros((200, 28, 28, 1), np.float32)
    clipped = np.asarray(gaussian_noise(jax.random.PRNGKey(0), zeros, 0.3))
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0
    np.testing.assert_allclose(average_distortion(zeros, clipped), 0.3 / np.sqrt(2), rtol=0.02)


def test_unclipped_rescaling_keeps_direction_and_reaches_rms():
    x = _images(2, 9)
    rng = np.random.default_rng(4)
    adv = x + rng.normal(0, 0.03, x.shape).astype(np.float32) * (rng.uniform(size=x.shape) < 0.2)
    out = np.asarray(rescale_perturbations(x, adv, 0.1, clip=False))
    d_in = (adv - x).reshape(9, -1).astype(np.float64)
    d_out = (out - x).reshape(9, -1).astype(np.float64)
    cosine = np.sum(d_in * d_out, 1) / np.linalg.norm(d_in, axis=1) / np.linalg.norm(d_out, axis=1)
    np.testing.assert_allclose(cosine, 1.0, atol=1e-5)
    np.testing.assert_allclose(distortions(x, out), 0.1, rtol=1e-5)


def _reference_clipped_rescale(x, adv, rms):
    """scipy brentq on the clipped RMS as a function of the scale, one image at a time."""
    out = []
    for xi, ai in zip(x.reshape(len(x), -1).astype(np.float64), adv.reshape(len(x), -1).astype(np.float64)):
        d = ai - xi
        f = lambda s: np.sqrt(np.mean((np.clip(xi + s * d, 0, 1) - xi) ** 2)) - rms
        hi = 1.0
        while f(hi) < 0:
            hi *= 2
        out.append(np.clip(xi + brentq(f, 0.0, hi, xtol=1e-12) * d, 0, 1))
    return np.stack(out).reshape(x.shape)


def test_clipped_rescaling_matches_scipy_root_and_stays_in_box():
    x = _images(3, 6)
    rng = np.random.default_rng(5)
    adv = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1).astype(np.float32)
    out = np.asarray(rescale_perturbations(x, adv, 0.1))
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(distortions(x, out), 0.1, rtol=1e-4)
    np.testing.assert_allclose(out, _reference_clipped_rescale(x, adv, 0.1), atol=1e-4)
    # Every pixel moves the way the original perturbation moved it (or stays).
    assert np.all(np.sign(out - x) * np.sign(adv - x) >= 0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rms=st.floats(0.01, 0.2), shrink=st.booleans())
def test_clipped_rescaling_reaches_any_reachable_rms(seed, rms, shrink):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.3, 1.3, size=(3, 8, 8, 1)).clip(0, 1).astype(np.float32)
    adv = np.clip(x + rng.normal(0, 0.5 if not shrink else 0.01, x.shape), 0, 1).astype(np.float32)
    out = np.asarray(rescale_perturbations(x, adv, rms))
    d = (adv - x).reshape(3, -1)
    room = np.where(d > 0, 1 - x.reshape(3, -1), x.reshape(3, -1))
    reachable = np.sqrt(np.mean(np.where(d != 0, room, 0.0) ** 2, axis=1))
    got = np.asarray(distortions(x, out))
    expected = np.minimum(reachable, rms)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_rescaling_leaves_zero_perturbations_alone():
    x = _images(6, 3)
    adv = x.copy()
    adv[1, 3, 3, 0] = 1.0 - adv[1, 3, 3, 0]
    for clip in (True, False):
        out = np.asarray(rescale_perturbations(x, adv, 0.1, clip=clip))
        np.testing.assert_array_equal(out[0], x[0])
        np.testing.assert_array_equal(out[2], x[2])


def test_invalid_inputs_name_the_argument():
    x = _images(0, 2)
    with pytest.raises(ValueError, match="originals and images"):
        distortions(x, x[:1])
    with pytest.raises(ValueError, match="stddev"):
        gaussian_noise(jax.random.PRNGKey(0), x, -1.0)
    with pytest.raises(ValueError, match="lower must be below upper"):
        gaussian_noise(jax.random.PRNGKey(0), x, 0.1, lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="rms"):
        rescale_perturbations(x, x, float("nan"))
    with pytest.raises(TypeError, match="images"):
        predictions(lambda b: b, np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        error_rate_matrix([lambda b: b.reshape(len(b), -1)], [x], [np.zeros(3, np.int32)])
    with pytest.raises(ValueError, match="same length"):
        error_rate_matrix([lambda b: b], [x], [])


def test_transfer_versus_noise_counts_off_diagonal_cells_above_the_noise_column():
    rates = np.array([[1.0, 0.30, 0.05],
                      [0.20, 1.0, 0.10],
                      [0.01, 0.02, 1.0]])
    noise = np.array([0.10, 0.05, 0.10])
    result = transfer_versus_noise(rates, noise, ["a", "b", "c"])
    # Off-diagonal cells above noise[column]: (a,b) .30>.05, (b,a) .20>.10, (c,b) .02<=.05 no,
    # (a,c) .05<=.10 no, (b,c) .10<=.10 no (ties do not count), (c,a) .01 no.
    assert result["cells"] == 6 and result["above_noise"] == 2
    assert {(c["made_for"], c["fed_to"]) for c in result["not_above"]} == {("a", "c"), ("b", "c"), ("c", "a"), ("c", "b")}
    with pytest.raises(ValueError, match="noise_rates"):
        transfer_versus_noise(rates, noise[:2], ["a", "b", "c"])


def test_gaussian_noise_sets_draw_one_independent_clipped_control_per_stddev():
    """Each set keeps the originals and labels, has the noise's spread (images at 0.5: clipping never bites at
    these stddevs), and the sets' draws are independent (correlation ~0), as the tables' noise rows need."""
    from jaxadv.transfer import gaussian_noise_sets
    images = np.full((64, 28, 28, 1), 0.5, np.float32)
    labels = np.arange(64, dtype=np.int32) % 10
    sets = gaussian_noise_sets(jax.random.PRNGKey(3), images, labels, [0.05, 0.1])
    assert len(sets) == 2
    noise = [np.asarray(s.images, np.float64).ravel() - 0.5 for s in sets]
    for s, stddev, n in zip(sets, [0.05, 0.1], noise):
        assert s.originals is images and s.labels is labels
        assert abs(n.std() / stddev - 1) < 0.01 and abs(n.mean()) < 0.01 * stddev
    assert abs(np.corrcoef(noise[0], noise[1])[0, 1]) < 0.01
    with pytest.raises(ValueError, match="stddevs\\[1\\]"):
        gaussian_noise_sets(jax.random.PRNGKey(3), images, labels, [0.05, -1.0])
