"""The batched L-BFGS attack (jaxadv.attacks): reference checks, properties, targets, validation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

from jaxadv.attacks import (ATTACK_LBFGS, AttackConfig, RefineConfig, SearchConfig, all_wrong_targets, lbfgs_attack, lbfgs_attack_all_targets,
                            random_wrong_targets, runner_up_targets)
from jaxadv.models import get_model

# -- a tiny random model with fixed shapes (one compilation per config) ------

SHAPE = (4, 4, 1)
BATCH = 4
FAST = AttackConfig(search=SearchConfig(bisection_steps=3, max_bracket_steps=4),
                    lbfgs=ATTACK_LBFGS._replace(max_iterations=30, memory_size=5))


def _tiny_logits_fn(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    w1 = jax.random.normal(k1, (16, 12)) * 1.5
    w2 = jax.random.normal(k2, (12, 10)) * 1.5
    params = (w1, w2)

    def logits(params, x):
        return jax.nn.sigmoid(x.reshape(x.shape[0], -1) @ params[0] - 1.0) @ params[1]

    return jax.tree_util.Partial(logits, params)


LOGITS = _tiny_logits_fn()


def _images(seed, batch=BATCH):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(batch,) + SHAPE).astype(np.float32)
    x[rng.uniform(size=x.shape) < 0.3] = 0.0          # pixels on the bound, like MNIST backgrounds
    return x


def _wrong_targets(seed, x):
    labels = np.asarray(jnp.argmax(LOGITS(jnp.asarray(x)), -1))
    return np.asarray(random_wrong_targets(jax.random.PRNGKey(seed), labels)), labels


# -- against scipy at a fixed c, real data ----------------------------------

@pytest.fixture(scope="module")
def trained_fc100(data_dir):
    from jaxadv.data import load_dataset
    from jaxadv.train import TrainConfig, train
    train_set = load_dataset("fashion_mnist", "train", data_dir)
    test_set = load_dataset("fashion_mnist", "test", data_dir)
    model = get_model("FC100-100-10")
    params = train(model, train_set.images[:5000], train_set.labels[:5000], jax.random.PRNGKey(0),
                   TrainConfig(epochs=3, verbose=False))
    return model, params, test_set


def test_fixed_c_objective_matches_scipy_lbfgsb(trained_fc100):
    """float32 model and objective; scipy L-BFGS-B (float64 iterates, float32 function) at tight tolerances.

    At c = 0.1 (one L-BFGS run, no c search) our objective is within 1e-3
    relative of scipy's, or lower, on >= 95% of 40 test images.
    """
    model, params, test_set = trained_fc100
    images, labels = test_set.images[:40], test_set.labels[:40]
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(1), labels))
    c = 0.1
    config = AttackConfig(search=SearchConfig(initial_c=c, max_bracket_steps=0, bisection_steps=0),
                          refine=RefineConfig(steps=0))  # the minimiser itself
    result = lbfgs_attack(jax.tree_util.Partial(model.apply, params), images, targets, config)
    adversarial = np.asarray(result.adversarial)
    assert np.all((adversarial >= 0) & (adversarial <= 1))

    def objective(x, x0, target):
        logits = model.apply(params, x.reshape((1,) + SHAPE_MNIST))[0]
        return c * jnp.sum((x - x0) ** 2) + jax.nn.logsumexp(logits) - logits[target]

    value_and_grad = jax.jit(jax.value_and_grad(objective))
    ours, reference = [], []
    for i in range(len(images)):
        x0 = images[i].reshape(-1)

        def f(z):
            v, g = value_and_grad(jnp.asarray(z, jnp.float32), x0, targets[i])
            return float(v), np.asarray(g, np.float64)

        solution = scipy.optimize.minimize(f, x0.astype(np.float64), jac=True, method="L-BFGS-B",
                                           bounds=[(0.0, 1.0)] * x0.size,
                                           options=dict(maxcor=10, ftol=1e-10, gtol=1e-7, maxiter=2000))
        ours.append(f(adversarial[i].reshape(-1))[0])
        reference.append(solution.fun)
    ours, reference = np.array(ours), np.array(reference)
    relative_excess = (ours - reference) / np.abs(reference)
    assert np.mean(relative_excess <= 1e-3) >= 0.95, relative_excess


SHAPE_MNIST = (28, 28, 1)


def test_l2_penalty_runs_and_stays_in_box(trained_fc100):
    model, params, test_set = trained_fc100
    images, labels = test_set.images[:8], test_set.labels[:8]
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(2), labels))
    result = lbfgs_attack(jax.tree_util.Partial(model.apply, params), images, targets,
                          AttackConfig(search=SearchConfig(penalty="l2", bisection_steps=3),
                                       lbfgs=ATTACK_LBFGS._replace(max_iterations=50)))
    adversarial = np.asarray(result.adversarial)
    assert np.all((adversarial >= 0) & (adversarial <= 1))
    predicted = np.argmax(np.asarray(model.apply(params, adversarial)), -1)
    np.testing.assert_array_equal(np.asarray(result.success), predicted == targets)
    assert np.mean(np.asarray(result.success)) >= 0.75


# -- properties ---------------------------------------------------------------

@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_box_success_and_distortion_properties(seed):
    x = _images(seed)
    targets, labels = _wrong_targets(seed, x)
    result = lbfgs_attack(LOGITS, x, targets, FAST, labels=labels)
    adversarial = np.asarray(result.adversarial)
    assert adversarial.shape == x.shape
    # The box holds exactly, and nothing clips after the fact: the solver's iterates are projections.
    assert np.all((adversarial >= 0.0) & (adversarial <= 1.0))
    predicted = np.argmax(np.asarray(LOGITS(jnp.asarray(adversarial))), -1)
    np.testing.assert_array_equal(np.asarray(result.success), predicted == targets)
    r = (adversarial - x).reshape(BATCH, -1).astype(np.float64)
    np.testing.assert_allclose(np.asarray(result.l2), np.linalg.norm(r, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(result.distortion), np.sqrt(np.mean(r ** 2, axis=1)), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(result.evaluations) >= np.asarray(result.iterations))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_an_image_gets_the_same_result_in_any_batch(seed):
    x = _images(seed)
    targets, _ = _wrong_targets(seed, x)
    others = _images(seed + 1)
    other_targets, _ = _wrong_targets(seed + 1, others)
    mixed_x = np.concatenate([x[:1], others[1:]])
    mixed_t = np.concatenate([targets[:1], other_targets[1:]])
    in_batch = lbfgs_attack(LOGITS, x, targets, FAST)
    in_other_batch = lbfgs_attack(LOGITS, mixed_x, mixed_t, FAST)
    alone = lbfgs_attack(LOGITS, x[:1], targets[:1], FAST)
    # Same batch shape: bit-identical.
    for field in in_batch._fields:
        np.testing.assert_array_equal(np.asarray(getattr(in_batch, field))[0],
                                      np.asarray(getattr(in_other_batch, field))[0], err_msg=field)
    # Alone: the lane block has the same shape (idle lanes), so the same bits too.
    for field in in_batch._fields:
        np.testing.assert_array_equal(np.asarray(getattr(alone, field))[0],
                                      np.asarray(getattr(in_batch, field))[0], err_msg=field)


def test_a_queue_of_images_through_few_lanes_matches_separate_calls():
    # 8 images through 4 lanes: images 4-7 start in whichever lane frees up first, mid-loop.
    x = np.concatenate([_images(11), _images(12)])
    labels = np.asarray(jnp.argmax(LOGITS(jnp.asarray(x)), -1))
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(3), labels))
    config = FAST._replace(lanes=4)
    queued = lbfgs_attack(LOGITS, x, targets, config)
    separate = [lbfgs_attack(LOGITS, x[i:i + 4], targets[i:i + 4], config) for i in (0, 4)]
    joined = jax.tree.map(lambda *a: np.concatenate([np.asarray(v) for v in a]), *separate)
    # A lane's row position in XLA's kernels can change the last bit, and L-BFGS runs that carry their
    # memory across the c search amplify it (a few 1e-4 per pixel here); the c search must agree exactly.
    np.testing.assert_array_equal(np.asarray(queued.success), joined.success)
    np.testing.assert_array_equal(np.asarray(queued.c), joined.c)
    np.testing.assert_allclose(np.asarray(queued.adversarial), joined.adversarial, atol=2e-3)
    np.testing.assert_allclose(np.asarray(queued.distortion), joined.distortion, rtol=1e-3, atol=1e-6)


def test_same_seed_same_result():
    x = _images(5)
    labels = np.asarray(jnp.argmax(LOGITS(jnp.asarray(x)), -1))
    runs = []
    for _ in range(2):
        targets = random_wrong_targets(jax.random.PRNGKey(42), labels)
        runs.append(lbfgs_attack(LOGITS, x, targets, FAST))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_the_largest_successful_c_on_a_linear_model():
    # Softmax regression: the loss is convex, so success is monotone in c and the search brackets it.
    w = jax.random.normal(jax.random.PRNGKey(7), (16, 10)) * 3.0
    logits_fn = jax.tree_util.Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, w)
    x = _images(8)
    labels = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(9), labels))
    result = lbfgs_attack(logits_fn, x, targets, FAST)
    found = np.asarray(result.success)
    assert found.sum() >= 2
    # One run at a fixed c per image: the chosen c succeeds, 1.5x that c fails.
    fixed = FAST._replace(search=FAST.search._replace(max_bracket_steps=0, bisection_steps=0))
    c = np.asarray(result.c)
    at_c = lbfgs_attack(logits_fn, x, targets, fixed, initial_c=c)
    above = lbfgs_attack(logits_fn, x, targets, fixed, initial_c=1.5 * c)
    assert np.all(np.asarray(at_c.success)[found])
    assert not np.any(np.asarray(above.success)[found])


def test_hidden_layer_bounds_zero_to_infinity():
    # e.g. attacking a ReLU layer's output: [0, inf), values above 1 allowed.
    x = _images(13) * 3.0
    logits_fn = jax.tree_util.Partial(lambda p, h: LOGITS(h / 3.0), ())
    labels = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(4), labels))
    result = lbfgs_attack(logits_fn, x, targets, FAST, lower=0.0, upper=np.inf)
    assert np.all(np.asarray(result.adversarial) >= 0.0)
    assert np.all(np.isfinite(np.asarray(result.adversarial)))
    predicted = np.argmax(np.asarray(logits_fn(result.adversarial)), -1)
    np.testing.assert_array_equal(np.asarray(result.success), predicted == targets)


def test_per_pixel_bounds_hold():
    x = _images(14)
    lower = np.maximum(x - 0.05, 0.0)
    upper = np.minimum(x + 0.05, 1.0)
    labels = np.asarray(jnp.argmax(LOGITS(jnp.asarray(x)), -1))
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(5), labels))
    adversarial = np.asarray(lbfgs_attack(LOGITS, x, targets, FAST, lower=lower, upper=upper).adversarial)
    assert np.all((adversarial >= lower) & (adversarial <= upper))


def test_kept_memory_is_the_memory_of_the_new_c_computed_densely():
    # A new c adds 2Δc·I to the penalty's Hessian: every y_j becomes y_j + 2Δc·s_j, and the Gram
    # matrices, rho and gamma must equal those recomputed from the moved pairs; pairs whose s·y
    # turns non-positive (Δc < 0) are dropped.
    from jaxadv import box_lbfgs
    from jaxadv.attacks.lbfgs import _keep_memory
    rng = np.random.default_rng(0)
    lanes, m, n = 3, 4, 7
    s_vecs = rng.normal(size=(lanes, m, n))
    y_vecs = s_vecs * 0.3 + 0.1 * rng.normal(size=(lanes, m, n))
    dots = lambda a, b: np.einsum("lin,ljn->lij", a, b)
    gram = np.stack([dots(s_vecs, s_vecs), dots(s_vecs, y_vecs), dots(y_vecs, y_vecs)], axis=1)
    rho = 1.0 / np.einsum("lin,lin->li", s_vecs, y_vecs)
    rho[2, 1] = 0.0                                    # an empty slot stays empty
    newest = np.array([0, 3, 2])
    opt = jax.vmap(box_lbfgs.init)(jnp.zeros((lanes, n)))._replace(
        s_memory=jnp.asarray(s_vecs, jnp.float32), y_memory=jnp.asarray(y_vecs, jnp.float32), gram=jnp.asarray(gram, jnp.float32), rho=jnp.asarray(rho, jnp.float32),
        newest=jnp.asarray(newest, jnp.int32), gamma=jnp.ones(lanes))
    fresh = opt._replace(rho=jnp.zeros_like(opt.rho), gamma=jnp.ones(lanes))
    delta_c = np.array([0.5, -0.2, 0.0], np.float32)
    keep = jnp.array([True, True, False])
    fresh, moved = jax.vmap(_keep_memory)(fresh, opt, jnp.asarray(delta_c), keep)
    y_new = y_vecs + 2 * delta_c[:, None, None] * s_vecs
    shifted = np.asarray(moved.y_memory) + np.asarray(moved.y_shift)[:, None, None] * np.asarray(moved.s_memory)
    np.testing.assert_allclose(shifted, y_new, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(moved.s_memory), np.asarray(s_vecs, np.float32))
    expected_gram = np.stack([dots(s_vecs, s_vecs), dots(s_vecs, y_new), dots(y_new, y_new)], axis=1)
    np.testing.assert_allclose(np.asarray(moved.gram), expected_gram, rtol=1e-4, atol=1e-5)
    s_dot_y = np.einsum("lin,lin->li", s_vecs, y_new)
    valid = (rho != 0) & (s_dot_y > 0)
    assert not valid[1].all(), "the test should drop a pair"
    expected_rho = np.where(valid, 1.0 / np.where(valid, s_dot_y, 1.0), 0.0)
    np.testing.assert_allclose(np.asarray(fresh.rho)[:2], expected_rho[:2], rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(fresh.rho)[2], 0.0)          # not kept: fresh memory
    for lane in range(2):
        j = newest[lane]
        if valid[lane, j]:
            expected = s_dot_y[lane, j] / np.sum(y_new[lane, j] ** 2)
            np.testing.assert_allclose(float(fresh.gamma[lane]), expected, rtol=1e-4)


def test_warm_starts_and_kept_memory_do_not_lose_distortion():
    # Against a cold start from x at every c (the paper's literal reading) on the tiny model. Either
    # may settle on another local piece of the boundary for an image, so compare over many images.
    x = np.concatenate([_images(seed) for seed in range(40, 48)])
    labels = np.asarray(jnp.argmax(LOGITS(jnp.asarray(x)), -1))
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(8), labels))
    warm = lbfgs_attack(LOGITS, x, targets, FAST)
    cold = lbfgs_attack(LOGITS, x, targets, FAST._replace(search=FAST.search._replace(warm_start="none", keep_memory=False)))
    both = np.asarray(warm.success) & np.asarray(cold.success)
    assert both.sum() >= 12
    assert np.mean(np.asarray(warm.distortion)[both]) <= 1.02 * np.mean(np.asarray(cold.distortion)[both])
    assert np.sum(warm.evaluations) < np.sum(cold.evaluations)


# -- targets ------------------------------------------------------------------

def test_random_wrong_targets_are_wrong_seeded_and_cover_every_class():
    labels = np.arange(1000) % 10
    a = np.asarray(random_wrong_targets(jax.random.PRNGKey(0), labels))
    b = np.asarray(random_wrong_targets(jax.random.PRNGKey(0), labels))
    np.testing.assert_array_equal(a, b)
    assert np.all(a != labels) and a.min() >= 0 and a.max() <= 9
    for label in range(10):
        assert set(a[labels == label]) == set(range(10)) - {label}


def test_runner_up_targets_brute_force():
    logits = np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 10, 50)
    expected_pred = [int(np.argsort(row)[-2]) for row in logits]
    expected_label = [max((v, k) for k, v in enumerate(row) if k != lab)[1] for row, lab in zip(logits, labels)]
    np.testing.assert_array_equal(np.asarray(runner_up_targets(logits)), expected_pred)
    np.testing.assert_array_equal(np.asarray(runner_up_targets(logits, labels)), expected_label)


def test_all_targets_minimum_is_the_minimum_over_single_target_attacks():
    x = _images(21)
    labels = np.asarray(jnp.argmax(LOGITS(jnp.asarray(x)), -1))
    everything = lbfgs_attack_all_targets(LOGITS, x, labels, FAST)
    targets = np.asarray(all_wrong_targets(labels))
    assert targets.shape == (BATCH, 9) and np.all(targets != labels[:, None])
    per_target = [lbfgs_attack(LOGITS, x, targets[:, k], FAST) for k in range(9)]
    distortions = np.stack([np.where(r.success, r.distortion, np.inf) for r in per_target], 1)
    np.testing.assert_allclose(np.asarray(everything.best.distortion), distortions.min(1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(everything.target), targets[np.arange(BATCH), distortions.argmin(1)])


# -- validation ---------------------------------------------------------------

@pytest.mark.parametrize("change,error,name", [
    (dict(images=_images(0) + 1.5), ValueError, "images"),
    (dict(images=np.where(np.arange(16).reshape(SHAPE) == 3, np.nan, _images(0)).astype(np.float32)), ValueError, "images"),
    (dict(images=(_images(0) > 0.5).astype(np.int32)), TypeError, "images"),
    (dict(images=_images(0)[:0], targets=np.zeros(0, np.int32)), ValueError, "images"),
    (dict(images=np.float32(0.5)), ValueError, "images"),
    (dict(targets=np.array([1.0, 2.0, 3.0, 4.0])), TypeError, "targets"),
    (dict(targets=np.array([1, 2, 3], np.int32)), ValueError, "targets"),
    (dict(targets=np.array([1, 2, 3, 10], np.int32)), ValueError, "targets"),
    (dict(targets=np.array([1, 2, 3, -1], np.int32)), ValueError, "targets"),
    (dict(labels=np.array([1, 0, 0, 0], np.int32)), ValueError, "targets"),
    (dict(lower=np.zeros(3)), ValueError, "lower"),
    (dict(lower=0.6, upper=0.4), ValueError, "lower"),
    (dict(config=AttackConfig(search=SearchConfig(penalty="l1"))), ValueError, "config.search.penalty"),
    (dict(config=AttackConfig(lbfgs=ATTACK_LBFGS._replace(memory_size=0))), ValueError, "config.lbfgs.memory_size"),
    (dict(config=AttackConfig(search=SearchConfig(warm_start="previous"))), ValueError, "config.search.warm_start"),
    (dict(logits_fn="model"), TypeError, "logits_fn"),
])
def test_bad_input_is_rejected_before_compiling(change, error, name):
    kwargs = dict(logits_fn=LOGITS, images=_images(0), targets=np.array([1, 2, 3, 4], np.int32))
    kwargs.update(change)
    with pytest.raises(error, match=name.replace(".", r"\.")):
        lbfgs_attack(**kwargs)


def test_attack_works_under_an_outer_jit():
    x = _images(30)
    labels = np.asarray(jnp.argmax(LOGITS(jnp.asarray(x)), -1))
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(6), labels))
    eager = lbfgs_attack(LOGITS, x, targets, FAST)
    traced = jax.jit(lambda x, t: lbfgs_attack(LOGITS, x, t, FAST))(x, targets)
    np.testing.assert_array_equal(np.asarray(traced.success), np.asarray(eager.success))
    np.testing.assert_array_equal(np.asarray(traced.c), np.asarray(eager.c))
    # Another compilation rounds differently, and L-BFGS runs that carry their memory along the c
    # search amplify it (most in a failed search's last run: the smallest c, the loss alone, flat and
    # ill-conditioned); the c search must still agree exactly.
    found = np.asarray(eager.success)
    np.testing.assert_allclose(np.asarray(traced.distortion)[found], np.asarray(eager.distortion)[found],
                               rtol=3e-3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(traced.distortion), np.asarray(eager.distortion), rtol=2e-2)


def test_functools_partial_params_do_not_recompile():
    model = get_model("FC10(1e-4)")
    x = np.random.default_rng(0).uniform(0, 1, (2, 28, 28, 1)).astype(np.float32)
    targets = np.array([3, 4], np.int32)
    from jaxadv.attacks.lbfgs import lbfgs_attack_core
    config = FAST._replace(search=FAST.search._replace(bisection_steps=1, max_bracket_steps=1),
                           lbfgs=FAST.lbfgs._replace(max_iterations=5))
    lbfgs_attack(functools.partial(model.apply, model.init(jax.random.PRNGKey(0))), x, targets, config)
    before = lbfgs_attack_core._cache_size()
    lbfgs_attack(functools.partial(model.apply, model.init(jax.random.PRNGKey(1))), x, targets, config)
    assert lbfgs_attack_core._cache_size() == before


def test_attack_objective_is_the_penalty_plus_the_loss_computed_in_numpy():
    """c·‖x − x0‖² + cross-entropy toward the target, and −log(1 − p_label) untargeted, against scipy's logsumexp."""
    from scipy.special import logsumexp, softmax

    from jaxadv.attacks.lbfgs import attack_objective
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 10))
    x, origin = rng.uniform(0, 1, 16), rng.uniform(0, 1, 16)
    logits_one = lambda v: v @ jnp.asarray(w, jnp.float32)
    z = x @ w
    targeted = attack_objective(logits_one, AttackConfig())
    value, logits = targeted(jnp.asarray(x, jnp.float32), jnp.asarray(origin, jnp.float32), 0.7, 4)
    np.testing.assert_allclose(float(value), 0.7 * np.sum((x - origin) ** 2) + logsumexp(z) - z[4], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), z, rtol=1e-5, atol=1e-5)
    untargeted = attack_objective(logits_one, AttackConfig(), untargeted=True)
    value, _ = untargeted(jnp.asarray(x, jnp.float32), jnp.asarray(origin, jnp.float32), 0.7, 4)
    expected = 0.7 * np.sum((x - origin) ** 2) - np.log1p(-softmax(z)[4])
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    with pytest.raises(TypeError, match="logits_one"):
        attack_objective(None)
    with pytest.raises(ValueError, match="untargeted"):
        attack_objective(logits_one, untargeted="yes")
    with pytest.raises(ValueError, match="config.search.penalty"):
        attack_objective(logits_one, AttackConfig(search=SearchConfig(penalty="l1")))
