"""Every public function x a table of bad inputs: each refused with ValueError/TypeError naming the argument,
before any work. Adding a row to PUBLIC is all it takes to cover a function.

"Before any work" is counted: the bad models run through a `jax.debug.callback` that counts executions (not
traces). A check that needs the logits (NaN, inf, probabilities) may run the model once, at entry; every
other check runs none. An attack that went on to work would run it many more times.
"""
from __future__ import annotations

import functools
import re
import tempfile
from typing import Callable, NamedTuple

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from jaxadv import certify, checks, lipschitz, transfer, units
from jaxadv.adversarial_training import AdversarialTrainingConfig, adversarial_train
from jaxadv.blind_spots import measure_blind_spots
from jaxadv.metrics import untargeted_distortion
from jaxadv.attacks import (ATTACK_LBFGS, AttackConfig, RefineConfig, SearchConfig, alma, attack_dataset, attack_sizes,
                            ddn, deepfool,
                            fgm, fgsm, fmn, lbfgs_attack, lbfgs_attack_all_targets, lbfgs_attack_untargeted,
                            min_pixels_attack, minimal_fast_gradient, minimal_perturbation, pgd, single_pixel_attack,
                            superdeepfool)
from jaxadv.attacks.fast import fast_gradient_direction, success_along_direction
from jaxadv.optim import box_lbfgs, minimize_box
from jaxadv.train import error_rate

SHAPE, CLASSES, BATCH = (4, 4, 1), 3, 4
LOWER, UPPER = 0.7, 1.0           # 0.7 is not a float32: rounded to nearest it lies below 0.7
# No refinement: half the compile time; the checks run before either.
SMALL = AttackConfig(search=SearchConfig(max_bracket_steps=1, bisection_steps=1, runner_ups=0),
                     lbfgs=ATTACK_LBFGS._replace(max_iterations=5), refine=RefineConfig(steps=0), lanes=4)
EXECUTIONS = [0]


def _count(_):
    EXECUTIONS[0] += 1


def apply(params, x):
    """A two-layer tanh net on flattened 4x4x1 images: logits [batch, 3]."""
    return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"]) @ params["w2"]


def counted(apply_fn):
    """`apply_fn` whose every execution (not trace) is counted in EXECUTIONS."""
    def run(params, x):
        jax.debug.callback(_count, x[:1])
        return apply_fn(params, x)
    return run


def nan_logits(params, x):
    return apply(params, x) * jnp.nan


def inf_logits(params, x):
    logits = apply(params, x)
    return jnp.where(jnp.arange(x.shape[0])[:, None] == 0, jnp.inf, logits)


def probabilities(params, x):
    return jax.nn.softmax(apply(params, x) * 3.0)


def with_string_leaf(params, x):
    return getattr(jnp, params["act"])(x.reshape(x.shape[0], -1) @ params["w1"]) @ params["w2"]


def good_inputs():
    """(apply, params, images, labels, lower, upper): float64 NumPy images in [0.7, 1] (some pixels at 0.7)."""
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(8, CLASSES)), jnp.float32)}
    images = rng.uniform(LOWER, UPPER, (BATCH,) + SHAPE)
    images[:, 0, 0, 0] = LOWER
    labels = np.asarray(jnp.argmax(apply(params, images), axis=-1), np.int32)
    return apply, params, images, labels, LOWER, UPPER


class Public(NamedTuple):
    """A public function, called with (model, params, images, labels, lower, upper).

    kinds: the bad inputs that apply ('logits': NaN/inf logits; 'probabilities'; 'params': a string leaf in
      params=, 'partial': in a jax.tree_util.Partial's arguments;
      'batch': one image without a batch axis; 'labels'; 'box': bounds; 'images'). model_name, labels_name,
      images_name: the names its errors must give. produced: the images it returns (to hold to the box), or None.
    """
    name: str
    call: Callable
    kinds: frozenset
    model_name: str = "logits_fn"
    labels_name: str = "labels"
    produced: Callable | None = None
    images_name: str = "images"


ATTACK = frozenset({"logits", "probabilities", "params", "partial", "batch", "labels", "box", "images"})
MODEL = frozenset({"logits", "params", "partial", "batch", "labels", "images"})
adversarial = lambda result: result.adversarial      # noqa: E731


def _dataset(m, p, x, y, lo, up):
    with tempfile.TemporaryDirectory() as folder:
        return attack_dataset(m, x, y, folder, SMALL, lower=lo, upper=up, progress=False, params=p, chunk_size=4,
                              block_size=4, lanes=4)


def _untargeted_distortion(m, p, x):
    with tempfile.TemporaryDirectory() as folder:
        return untargeted_distortion(m if p is None else jax.tree_util.Partial(m, p), x, SMALL, f"{folder}/attack")


def _adversarial_train(m, p, x, y, lo, up):
    config = AdversarialTrainingConfig(epochs=1, batch_size=2, pool_layers=(), refresh_every=2)
    return adversarial_train(m, x, y, jax.random.PRNGKey(0), config, params=p)


PUBLIC = [
    Public("lbfgs_attack", lambda m, p, x, y, lo, up: lbfgs_attack(m, x, y, SMALL, lo, up, params=p), ATTACK,
           labels_name="targets", produced=adversarial),
    Public("lbfgs_attack_untargeted", lambda m, p, x, y, lo, up: lbfgs_attack_untargeted(
        m, x, y, SMALL, lo, up, params=p), ATTACK, produced=adversarial),
    Public("lbfgs_attack_all_targets", lambda m, p, x, y, lo, up: lbfgs_attack_all_targets(
        m, x, y, SMALL, None, lo, up, params=p), ATTACK, produced=lambda r: r.best.adversarial),
    Public("attack_dataset", _dataset, ATTACK, labels_name="targets", produced=lambda r: r["adversarial"]),
    Public("attack_sizes", lambda m, p, x, y, lo, up: attack_sizes(m, x, SMALL, params=p),
           frozenset({"params", "partial", "batch"})),
    Public("fgm", lambda m, p, x, y, lo, up: fgm(m, x, y, 0.5, lower=lo, upper=up, params=p), ATTACK,
           produced=adversarial),
    Public("fgsm", lambda m, p, x, y, lo, up: fgsm(m, x, y, 0.1, lower=lo, upper=up, params=p), ATTACK,
           produced=adversarial),
    Public("pgd", lambda m, p, x, y, lo, up: pgd(m, x, y, 0.1, steps=3, lower=lo, upper=up, params=p), ATTACK,
           produced=adversarial),
    Public("fast_gradient_direction", lambda m, p, x, y, lo, up: fast_gradient_direction(
        m, x, y, lower=lo, upper=up, params=p), ATTACK),
    Public("minimal_fast_gradient", lambda m, p, x, y, lo, up: minimal_fast_gradient(
        m, x, y, grid=4, bisections=3, lower=lo, upper=up, params=p), ATTACK, produced=adversarial),
    Public("success_along_direction", lambda m, p, x, y, lo, up: success_along_direction(
        m, x, y, np.ones_like(x), np.array([0.0, 0.1]), lo, up, params=p), ATTACK),
    Public("single_pixel_attack", lambda m, p, x, y, lo, up: single_pixel_attack(
        m, x, y, lower=lo, upper=up, params=p), ATTACK, produced=adversarial),
    Public("min_pixels_attack", lambda m, p, x, y, lo, up: min_pixels_attack(
        m, x, y, max_pixels=3, shortlist=4, lanes=2, lower=lo, upper=up, params=p), ATTACK, produced=adversarial),
    Public("transfer.predictions", lambda m, p, x, y, lo, up: transfer.predictions(m, x, params=p),
           MODEL - {"labels"}),
    Public("transfer.error_rate_matrix", lambda m, p, x, y, lo, up: transfer.error_rate_matrix([(m, p)], [x], [y]),
           MODEL, model_name=r"logits_fns\[0\]", labels_name=r"labels\[0\]", images_name=r"image_sets\[0\]"),
    Public("train.error_rate", lambda m, p, x, y, lo, up: error_rate(m, p, x, y), MODEL, model_name="model"),
    Public("units.layer_features", lambda m, p, x, y, lo, up: units.layer_features(m, x, params=p),
           frozenset({"params", "partial", "images"}), model_name="features_fn"),
    Public("lipschitz.operator_bounds", lambda m, p, x, y, lo, up: lipschitz.operator_bounds(
        m, jax.ShapeDtypeStruct((1,) + SHAPE, jnp.float32), params=p), frozenset({"params", "partial"})),
    Public("adversarial_train", _adversarial_train, MODEL - {"partial"}, model_name="model"),
    Public("transfer.gaussian_noise", lambda m, p, x, y, lo, up: transfer.gaussian_noise(
        jax.random.PRNGKey(0), x, 0.5, lower=lo, upper=up), frozenset({"box", "images"}), produced=lambda r: r),
    Public("transfer.rescale_perturbations", lambda m, p, x, y, lo, up: transfer.rescale_perturbations(
        x, np.clip(x + 0.1, lo, up), 0.2, lower=lo, upper=up), frozenset({"box", "images"}), produced=lambda r: r,
        images_name="originals"),
    Public("transfer.gaussian_noise_sets", lambda m, p, x, y, lo, up: transfer.gaussian_noise_sets(
        jax.random.PRNGKey(0), x, y, [0.0, 0.5]), frozenset({"images"})),
    Public("metrics.untargeted_distortion", lambda m, p, x, y, lo, up: _untargeted_distortion(m, p, x),
           frozenset({"partial", "batch", "images"})),
    Public("blind_spots.measure_blind_spots", lambda m, p, x, y, lo, up: measure_blind_spots(
        m if p is None else jax.tree_util.Partial(m, p), x, y, np.clip(x + 0.01, 0, 1), np.ones(len(y), bool), 2,
        [0.1]), ATTACK - {"params", "box"}),
    Public("units.direction_coherence", lambda m, p, x, y, lo, up: units.direction_coherence(
        np.reshape(x, (len(x), -1)), x, y, jax.random.PRNGKey(0), num_random=2, k=2, num_classes=CLASSES,
        num_chance_subsets=4, num_permutations=9), frozenset({"images"})),
    Public("ddn", lambda m, p, x, y, lo, up: ddn(m, x, y, params=p, steps=3, lower=lo, upper=up, lanes=4), ATTACK,
           model_name="model", produced=adversarial),
    Public("alma", lambda m, p, x, y, lo, up: alma(m, x, y, params=p, steps=3, lower=lo, upper=up, lanes=4), ATTACK,
           model_name="model", produced=adversarial),
    Public("fmn", lambda m, p, x, y, lo, up: fmn(m, x, y, params=p, steps=3, lower=lo, upper=up, lanes=4), ATTACK,
           model_name="model", produced=adversarial),
    Public("deepfool", lambda m, p, x, y, lo, up: deepfool(m, x, y, params=p, max_steps=3, lower=lo, upper=up,
                                                           lanes=4), ATTACK, model_name="model", produced=adversarial),
    Public("superdeepfool", lambda m, p, x, y, lo, up: superdeepfool(
        m, x, y, params=p, max_steps=3, projections=2, lower=lo, upper=up, lanes=4), ATTACK, model_name="model",
        produced=adversarial),
    Public("minimal_perturbation", lambda m, p, x, y, lo, up: minimal_perturbation(
        m, x, y, params=p, attacks=(("ddn", functools.partial(ddn, steps=3, lanes=4)),), lower=lo, upper=up),
        ATTACK, model_name="model", produced=adversarial),
    Public("certify.certified_radius", lambda m, p, x, y, lo, up: certify.certified_radius(
        m, x, y, params=p, lower=lo, upper=up, steps=2), ATTACK, model_name="model"),
    Public("certify.certificates", lambda m, p, x, y, lo, up: certify.certificates(
        m, x, y, params=p, lower=lo, upper=up, steps=2).radius, ATTACK, model_name="model"),
    Public("certify.margin_lower_bounds", lambda m, p, x, y, lo, up: certify.margin_lower_bounds(
        m, x, 0.1, y, params=p, lower=lo, upper=up), ATTACK, model_name="model"),
    Public("optim.minimize_box", lambda m, p, x, y, lo, up: minimize_box(
        lambda z: jnp.sum((z["x"] - 2.0) ** 2), {"x": jnp.asarray(x[0], jnp.float16)}, lo, up, max_iterations=5),
        frozenset(), produced=lambda r: r.x["x"]),
]


class Bad(NamedTuple):
    """A bad input: which kind it is, how it changes the good inputs, and the argument its error must name."""
    name: str
    kind: str
    change: Callable      # (row, apply, params, images, labels, lower, upper) -> the same, changed
    argument: Callable    # row -> a regex the message must match


def _swap(model):
    return lambda row, m, p, x, y, lo, up: (counted(model), p, x, y, lo, up)


BAD = [
    Bad("nan_logits", "logits", _swap(nan_logits), lambda row: row.model_name),
    Bad("inf_logits", "logits", _swap(inf_logits), lambda row: row.model_name),
    Bad("probabilities", "probabilities", _swap(probabilities), lambda row: row.model_name),
    Bad("string_leaf", "params", lambda row, m, p, x, y, lo, up: (counted(with_string_leaf), {**p, "act": "tanh"},
                                                                   x, y, lo, up),
        lambda row: r"params\['act'\].*functools.partial"),
    Bad("string_leaf_in_partial", "partial", lambda row, m, p, x, y, lo, up: (
        jax.tree_util.Partial(counted(with_string_leaf), {**p, "act": "tanh"}), None, x, y, lo, up),
        lambda row: row.model_name + r".*\['act'\].*functools.partial"),
    Bad("one_image", "batch", lambda row, m, p, x, y, lo, up: (counted(m), p, x[0], y[:1], lo, up),
        lambda row: row.images_name + r".*images\[None\]"),
    Bad("labels_out_of_range", "labels", lambda row, m, p, x, y, lo, up: (counted(m), p, x, y + CLASSES, lo, up),
        lambda row: row.labels_name),
    Bad("float_labels", "labels", lambda row, m, p, x, y, lo, up: (counted(m), p, x, y.astype(np.float32), lo, up),
        lambda row: row.labels_name),
    Bad("labels_rank_2", "labels", lambda row, m, p, x, y, lo, up: (counted(m), p, x, y[:, None], lo, up),
        lambda row: row.labels_name),
    Bad("empty_box_in_float32", "box", lambda row, m, p, x, y, lo, up: (counted(m), p, np.full_like(x, lo), y, lo,
                                                                         lo + 1e-9), lambda row: "lower, upper"),
    Bad("images_outside_box", "box", lambda row, m, p, x, y, lo, up: (counted(m), p, x - 0.8, y, lo, up),
        lambda row: row.images_name + r".*normalisation inside the model"),
    Bad("images_rank_1", "images", lambda row, m, p, x, y, lo, up: (counted(m), p, x.reshape(-1), y, lo, up),
        lambda row: row.images_name),
    Bad("images_overflow_float32", "images", lambda row, m, p, x, y, lo, up: (
        counted(m), p, np.where(np.arange(x.size).reshape(x.shape) == 1, 1e39, x), y, lo, 1e40),
        lambda row: row.images_name),
]

CASES = [(row, bad) for row in PUBLIC for bad in BAD if bad.kind in row.kinds]


@pytest.mark.parametrize("row", PUBLIC, ids=lambda row: row.name)
def test_good_inputs_run_and_stay_inside_the_box_as_given(row):
    """float64 NumPy images and lower=0.7: every returned pixel lies inside [0.7, 1] as given, not as rounded."""
    out = row.call(*good_inputs())
    if row.produced is not None:
        produced = np.asarray(row.produced(out), np.float64)
        assert produced.min() >= LOWER and produced.max() <= UPPER, (produced.min(), produced.max())


@pytest.mark.parametrize("row, bad", CASES, ids=lambda case: getattr(case, "name", None))
def test_bad_input_is_refused_naming_the_argument_before_any_work(row, bad):
    EXECUTIONS[0] = 0
    inputs = bad.change(row, *good_inputs())
    with pytest.raises((ValueError, TypeError)) as caught:
        row.call(*inputs)
    message = str(caught.value)
    assert re.match(bad.argument(row), message, re.S), message       # the message opens with the argument's name
    allowed = 1 if bad.kind in ("logits", "probabilities") else 0
    assert EXECUTIONS[0] <= allowed, f"the model ran {EXECUTIONS[0]} times before the error"


def test_every_public_attack_takes_params():
    """One way in: every public function that takes a model takes params= (checked against the signatures)."""
    import inspect
    import jaxadv.attacks as attacks
    takes_model = [getattr(attacks, name) for name in attacks.__all__ if callable(getattr(attacks, name))
                   and list(inspect.signature(getattr(attacks, name)).parameters)[:1] in (["logits_fn"], ["model"])]
    assert len(takes_model) >= 12
    missing = [f.__name__ for f in takes_model if "params" not in inspect.signature(f).parameters
               and not f.__name__.endswith("_core")]
    assert not missing


# -- the bounds as the work dtype holds them: rounded inward, whatever the value and dtype -----------------

FLOATS = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=True)


@settings(max_examples=200, deadline=None)
@given(value=FLOATS, dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_round_inward_never_crosses_the_bound_as_given(value, dtype):
    """The rounded lower bound is >= the value and the upper <= it, each the nearest such (checked in float64 and
    against np.nextafter); float16 overflow rounds inward to its largest finite value."""
    lower, upper = checks.round_inward(value, dtype, "lower"), checks.round_inward(value, dtype, "upper")
    assert lower.dtype == dtype and upper.dtype == dtype
    assert float(lower) >= value and float(upper) <= value
    tiny = np.finfo(dtype).tiny      # below it, flushed to zero: a positive lower bound stops at tiny
    with np.errstate(over="ignore"):
        assert float(np.nextafter(lower, np.asarray(-np.inf, dtype))) < value or not np.isfinite(lower) \
            or lower == tiny
        assert float(np.nextafter(upper, np.asarray(np.inf, dtype))) > value or not np.isfinite(upper) \
            or upper == -tiny


@functools.lru_cache(maxsize=None)
def _noise_inputs():
    return np.random.default_rng(1).uniform(size=(3, 4))


@settings(max_examples=25, deadline=None)
@given(lower=st.floats(-2.0, 1.0), width=st.floats(1e-3, 2.0), dtype=st.sampled_from([np.float16, np.float32,
                                                                                        np.float64]))
def test_clipped_outputs_stay_inside_any_box_as_given(lower, width, dtype):
    """gaussian_noise clips to the box: every pixel inside [lower, upper] as given, for any bounds and image dtype
    (float64 NumPy images work in float32 unless x64 is on); a box the dtype cannot hold is refused."""
    upper = lower + width
    inner = checks.round_inward(lower, dtype, "lower"), checks.round_inward(upper, dtype, "upper")
    images = np.clip(np.clip(_noise_inputs(), lower, upper).astype(dtype), *inner)
    if not inner[0] < inner[1]:      # no two values of the dtype inside the box: refused, naming the bounds
        with pytest.raises(ValueError, match="lower, upper"):
            transfer.gaussian_noise(jax.random.PRNGKey(0), images, 1.0, lower=lower, upper=upper)
        return
    out = np.asarray(transfer.gaussian_noise(jax.random.PRNGKey(0), images, 1.0, lower=lower, upper=upper),
                     np.float64)
    assert out.min() >= lower and out.max() <= upper


def test_float16_leaves_of_box_lbfgs_end_inside_the_box():
    """A float16 leaf beside a float32 one ends inside [0.1, 0.7] as given, and init accepts the point."""
    params = {"a": jnp.full((5,), 0.5, jnp.float16), "b": jnp.full((3,), 0.5, jnp.float32)}
    result = minimize_box(lambda p: jnp.sum((p["a"].astype(jnp.float32) - 2) ** 2) + jnp.sum((p["b"] + 3) ** 2),
                          params, 0.1, 0.7)
    for leaf in jax.tree.leaves(result.x):
        assert 0.1 <= np.asarray(leaf, np.float64).min() and np.asarray(leaf, np.float64).max() <= 0.7
    box_lbfgs(0.1, 0.7).init(result.x)
    # The nearest float16 to the box's edges: nothing closer inside (the bound is as tight as the dtype allows).
    assert float(np.asarray(result.x["a"], np.float64).max()) == float(checks.round_inward(0.7, np.float16, "upper"))


@pytest.mark.parametrize("value, dtype", [(1e39, np.float32), (1e-50, np.float32), (70000.0, np.float16)])
def test_constants_are_checked_in_the_work_dtype(value, dtype):
    """1e39 is inf and 1e-50 is 0 in float32, 70000 is inf in float16: refused, naming the argument."""
    with pytest.raises(ValueError, match="initial_c"):
        checks.positive_finite(value, dtype, "initial_c")
    assert checks.positive_finite(1e30, np.float32, "initial_c") == np.float32(1e30)


@pytest.mark.parametrize("where", ["call", "config"])
@pytest.mark.parametrize("value", [1e39, 1e-50])
def test_initial_c_of_float64_images_is_checked_in_float32(where, value):
    """Under x64 off, float64 NumPy images are attacked in float32, where 1e39 is inf and 1e-50 is 0: refused
    naming initial_c, before the model runs (under x64 the attack runs in float64, where both are fine)."""
    if jax.config.jax_enable_x64:
        pytest.skip("float64 images work in float64 under x64")
    m, p, x, y, lo, up = good_inputs()
    EXECUTIONS[0] = 0
    config = SMALL._replace(search=SMALL.search._replace(initial_c=value)) if where == "config" else SMALL
    with pytest.raises(ValueError, match="initial_c.*float32"):
        lbfgs_attack(counted(m), x, y, config, lo, up, params=p, initial_c=value if where == "call" else None)
    assert EXECUTIONS[0] == 0
