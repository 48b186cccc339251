"""Results to trust from the attack: odd models, dtypes, bounds and settings give a right answer or a clear error.

One test per class of fault; hypothesis where the class is wide. The tiny model of test_attacks
keeps each compilation cheap.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxadv.attacks import lbfgs_attack, lbfgs_attack_all_targets, lbfgs_attack_untargeted, runner_up_targets
from jaxadv.attacks.config import UNTARGETED
from jaxadv.attacks.lbfgs import lbfgs_attack_core
from test_attacks import FAST, LOGITS, _images

TARGETS = np.array([1, 2, 3, 4], np.int32)


def _recheck(logits_fn, result, targets):
    """Success recomputed independently: finite logits with the target strictly on top."""
    logits = np.asarray(logits_fn(jnp.asarray(result.adversarial)), np.float64)
    others = np.where(np.arange(logits.shape[1]) == targets[:, None], -np.inf, logits)
    return np.all(np.isfinite(logits), axis=1) & (logits[np.arange(len(targets)), targets] > others.max(1))


def _poisoned(params, x):
    mask, threshold = params
    z = LOGITS(x)
    return jnp.where(mask[None, :] & (z[:, 3:4] > threshold), jnp.nan, z)


@settings(max_examples=8, deadline=None)
@given(classes=st.lists(st.integers(0, 9), min_size=1, max_size=10, unique=True),
       threshold=st.floats(-3.0, 3.0))
def test_nan_logits_never_count_as_success(classes, threshold):
    # NaN in some classes wherever the target's logit exceeds a threshold (or everywhere): a NaN can
    # sit on the target, on a competitor, or on all of them, and appear only near the boundary.
    mask = jnp.zeros(10, bool).at[jnp.asarray(classes)].set(True)

    fn = jax.tree_util.Partial(_poisoned, (mask, jnp.asarray(threshold, jnp.float32)))
    images, targets = _images(0), np.full(4, 3, np.int32)
    if np.all(np.isfinite(np.asarray(fn(jnp.asarray(images))))):
        result = lbfgs_attack(fn, images, targets, FAST)
    else:     # NaN already at the images: refused at entry; the compiled attack must still not count it
        with pytest.raises(ValueError, match="logits_fn: returned NaN"):
            lbfgs_attack(fn, images, targets, FAST)
        result = lbfgs_attack_core(fn, jnp.asarray(images), jnp.asarray(targets), 0.0, 1.0, config=FAST)
    np.testing.assert_array_equal(np.asarray(result.success), _recheck(fn, result, targets))


def test_a_model_that_returns_nan_fails_everywhere():
    nan_model = jax.tree_util.Partial(lambda x: LOGITS(x) * jnp.nan)
    with pytest.raises(ValueError, match="logits_fn: returned NaN or infinite logits for 4 of 4 images"):
        lbfgs_attack(nan_model, _images(0), TARGETS, FAST)
    result = lbfgs_attack_core(nan_model, jnp.asarray(_images(0)), jnp.asarray(TARGETS), 0.0, 1.0, config=FAST)
    assert not np.any(np.asarray(result.success))


@pytest.mark.parametrize("where,value", [("config", 1e39), ("config", 1e-50), ("config", float("inf")),
                                         ("config", float("nan")), ("call", 1e39), ("call", 1e-50),
                                         ("call", float("inf")), ("call", -1.0)])
def test_initial_c_must_be_finite_and_positive_in_the_images_dtype(where, value):
    # 1e39 is inf in float32 and 1e-50 is 0: both were accepted, then every image failed (inf) or came
    # out 8x too far (0).
    with pytest.raises(ValueError, match="initial_c"):
        if where == "config":
            lbfgs_attack(LOGITS, _images(0), TARGETS, _with(FAST, "search.initial_c", value))
        else:
            lbfgs_attack(LOGITS, _images(0), TARGETS, FAST, initial_c=value)


def test_initial_c_that_float64_holds_works_under_float64_images():
    with jax.enable_x64(True):
        result = lbfgs_attack(LOGITS, _images(0).astype(np.float64), TARGETS, FAST, initial_c=1e-50)
        assert np.all(np.isfinite(np.asarray(result.distortion)))


@settings(max_examples=6, deadline=None)
@given(lower=st.floats(0.05, 0.6, allow_subnormal=False), width=st.floats(0.2, 0.39))
def test_bounds_given_in_float64_hold_exactly_in_the_result(lower, width):
    # Rounded to float32 the plain way, 0.7 lies 1 ulp below itself: results crossed the bound as
    # given, and feeding them back was refused.
    upper = lower + width
    x = np.clip(_images(1).astype(np.float64), lower, upper)
    x = np.clip(x.astype(np.float32), np.nextafter(np.float32(lower), 1), np.nextafter(np.float32(upper), 0))
    x = np.where(x < lower, np.nextafter(x, np.float32(1)), x).astype(np.float32)
    x = np.where(x > upper, np.nextafter(x, np.float32(0)), x).astype(np.float32)
    lo, up = np.float64(lower), np.full(x.shape, upper, np.float64)
    result = lbfgs_attack(LOGITS, x, TARGETS, FAST, lower=lo, upper=up)
    adversarial = np.asarray(result.adversarial)
    assert np.all(adversarial >= lo) and np.all(adversarial <= up)
    lbfgs_attack(LOGITS, adversarial, TARGETS, FAST, lower=lo, upper=up)      # accepted as input


@pytest.mark.parametrize("penalty", ["l2", "l2_squared"])
def test_float16_images_are_attacked_in_float16(penalty):
    # 1e-12 (the l2 penalty's smoothing) is 0 in float16: the gradient at r = 0 was NaN and every
    # image failed, silently. The refinement's small solve has no half-precision LAPACK kernel.
    x = _images(0)
    config = _with(FAST, "search.penalty", penalty)
    half = lbfgs_attack(LOGITS, x.astype(np.float16), TARGETS, config)
    full = lbfgs_attack(LOGITS, x, TARGETS, config)
    assert half.adversarial.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(half.success), np.asarray(full.success))
    found = np.asarray(full.success)
    np.testing.assert_allclose(np.asarray(half.distortion, np.float32)[found], np.asarray(full.distortion)[found],
                               rtol=0.05, atol=2e-3)


def test_all_targets_tries_every_class_of_the_model():
    # A 12-class model with num_classes=10 left classes 10 and 11 untried, silently.
    w = jax.random.normal(jax.random.PRNGKey(3), (16, 12))
    twelve = jax.tree_util.Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w - 4.0 * jnp.eye(12)[None, 10:11].sum(1)
                                   + 4.0 * (jnp.arange(12) >= 10), w)
    x = _images(2)
    labels = np.asarray(jnp.argmax(twelve(jnp.asarray(x)), -1))
    with pytest.raises(ValueError, match="num_classes"):
        lbfgs_attack_all_targets(twelve, x, labels, FAST, num_classes=10)
    result = lbfgs_attack_all_targets(twelve, x, labels, FAST)
    assert result.per_target.success.shape[0] == 11
    assert set(np.asarray(result.target)) <= set(range(12))


@pytest.mark.parametrize("field,value,error", [
    ("lanes", 2.5, TypeError), ("search.max_steps", -5, ValueError), ("search.max_steps", 0, ValueError),
    ("refine.walk_steps", 1.5, TypeError), ("lbfgs.memory_size", True, TypeError),
    ("search.growth", float("inf"), ValueError), ("refine.margin", "1e-4", TypeError),
    ("search.runner_ups", -1, ValueError), ("lbfgs.armijo", 1.0, ValueError), ("refine.patience", 0, ValueError),
    ("search", {"initial_c": 1.0}, TypeError), ("refine", None, TypeError),
])
def test_config_values_are_checked_and_named(field, value, error):
    with pytest.raises(error, match=f"config.{field}:"):
        lbfgs_attack(LOGITS, _images(0), TARGETS, _with(FAST, field, value))


def _with(config, path, value):
    """config with the setting at `path` ("part.field" or "field") set to value."""
    part, _, field = path.rpartition(".")
    if not part:
        return config._replace(**{field: value})
    return config._replace(**{part: getattr(config, part)._replace(**{field: value})})


def test_labels_must_be_integers():
    with pytest.raises(TypeError, match="labels"):
        lbfgs_attack(LOGITS, _images(0), TARGETS, FAST, labels=np.zeros(4))
    with pytest.raises(TypeError, match="labels"):
        lbfgs_attack_untargeted(LOGITS, _images(0), np.zeros(4), UNTARGETED)


def test_runner_up_is_never_the_excluded_class_even_when_the_rest_is_minus_infinity():
    logits = jnp.array([[0.0, -jnp.inf, -jnp.inf], [-jnp.inf, 1.0, -jnp.inf], [-jnp.inf, -jnp.inf, 2.0]])
    labels = jnp.array([0, 1, 2])
    picked = np.asarray(runner_up_targets(logits, labels))
    assert np.all(picked != np.asarray(labels))
    assert np.all(np.asarray(runner_up_targets(logits)) != np.argmax(np.asarray(logits), -1))
