"""The refinement to the nearest boundary point (jaxadv.attacks.boundary) and the minimality of the attack.

References: scipy's SLSQP for the projection QP; the exact minimum of softmax
regression (jaxadv.attacks.exact, scipy L-BFGS-B on the dual, float64, KKT
checked) for the whole attack; the exact minimum of a small ReLU net (one QP
per activation pattern and class, scipy SLSQP) for the boundary walk;
bit-identity under rotations and shuffles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings, strategies as st

from jaxadv.attacks import (ATTACK_LBFGS, AttackConfig, RefineConfig, SearchConfig, lbfgs_attack, lbfgs_attack_all_targets,
                            lbfgs_attack_untargeted, random_wrong_targets)
from jaxadv.attacks.projection import project_onto_cuts
from jaxadv.attacks.config import UNTARGETED
from jaxadv.attacks.exact import exact_linear_minimum
from conftest import exact_relu_untargeted_minimum, small_relu_net, train_on_fashion_mnist


@pytest.mark.parametrize("seed", range(6))
def test_projection_onto_cuts_and_box_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    n, m = 30, 1 + seed % 4
    x = rng.uniform(0, 1, n)
    x[rng.uniform(size=n) < 0.3] = 0.0
    a = rng.normal(size=(m, n)).astype(np.float32)
    b = (a @ x + rng.uniform(0.5, 3.0, m)).astype(np.float32)         # x violates every cut
    valid = np.ones(m, bool)
    valid[-1] = m == 1                                                  # an ignored cut, when there are several
    z, _ = project_onto_cuts(jnp.asarray(x, jnp.float32), jnp.asarray(a), jnp.asarray(b), jnp.asarray(valid), 0.0, 1.0)
    rows = np.where(valid)[0]
    reference = scipy.optimize.minimize(
        lambda v: 0.5 * np.sum((v - x) ** 2), x, jac=lambda v: v - x, bounds=[(0, 1)] * n, method="SLSQP",
        constraints=[dict(type="ineq", fun=lambda v: a[rows] @ v - b[rows], jac=lambda v: a[rows].astype(np.float64))],
        options=dict(ftol=1e-14, maxiter=500))
    assert reference.success
    z = np.asarray(z, np.float64)
    assert np.all((z >= 0) & (z <= 1))
    assert np.min(a[rows] @ z - b[rows]) >= -1e-4
    np.testing.assert_allclose(np.linalg.norm(z - x), np.linalg.norm(reference.x - x), rtol=1e-4)


def test_exact_linear_minimum_satisfies_kkt_and_beats_feasible_points():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(20, 5)), rng.normal(size=5)
    x = rng.uniform(0, 1, 20)
    target = int(np.argsort(x @ w + b)[1])
    z, l2 = exact_linear_minimum(w, b, x, target)
    logits = z @ w + b
    assert np.all(logits[target] >= np.delete(logits, target) - 1e-7)   # on the boundary, target on top
    assert np.all((z >= 0) & (z <= 1))
    # Any point that is strictly adversarial (a random direction, then the segment's crossing) is farther.
    for _ in range(20):
        direction = z - x + 0.3 * rng.normal(size=20) * np.linalg.norm(z - x) / np.sqrt(20)
        for t in np.linspace(0, 3, 301):
            p = np.clip(x + t * direction, 0, 1)
            scores = p @ w + b
            if scores.argmax() == target:
                assert np.linalg.norm(p - x) >= l2 * (1 - 1e-9)
                break


@pytest.fixture(scope="module")
def real_softmax(data_dir):
    """FC10(1e-4) trained briefly on 5000 Fashion-MNIST images, and 60 correctly classified test images."""
    logits_fn, params, test = train_on_fashion_mnist(data_dir, "FC10(1e-4)", 5000, epochs=3)
    predicted = np.argmax(np.asarray(logits_fn(test.images[:200])), -1)
    keep = np.where(predicted == test.labels[:200])[0][:60]
    return logits_fn, params, test.images[keep], test.labels[keep]


def test_refined_attack_is_the_exact_minimum_on_softmax_regression(real_softmax):
    """The must-show bound: median ratio to the exact QP <= 1.005 and worst <= 1.02 (the paper's method: > 1.01)."""
    logits_fn, params, images, labels = real_softmax
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(1), labels))
    w, b = np.asarray(params["params"]["layers_1"]["kernel"]), np.asarray(params["params"]["layers_1"]["bias"])
    exact = np.array([exact_linear_minimum(w, b, x.reshape(-1), int(t))[1] for x, t in zip(images, targets)])
    refined = lbfgs_attack(logits_fn, images, targets)
    paper = lbfgs_attack(logits_fn, images, targets, AttackConfig(refine=RefineConfig(steps=0)))
    assert np.all(np.asarray(refined.success))
    ratio = np.asarray(refined.l2, np.float64) / exact
    assert np.all(ratio >= 1 - 1e-4), ratio.min()                      # nothing beats the true minimum
    assert np.median(ratio) <= 1.005 and ratio.max() <= 1.02, (np.median(ratio), ratio.max())
    assert np.median(np.asarray(paper.l2, np.float64) / exact) > np.median(ratio)
    # The search's own estimate is reported beside the refined one and equals the paper's method's result.
    np.testing.assert_array_equal(np.asarray(refined.search_distortion), np.asarray(paper.distortion))


def test_untargeted_finds_the_exact_untargeted_minimum_on_softmax_regression(real_softmax):
    logits_fn, params, images, labels = real_softmax
    images, labels = images[:30], labels[:30]
    w, b = np.asarray(params["params"]["layers_1"]["kernel"]), np.asarray(params["params"]["layers_1"]["bias"])
    exact = np.array([min(exact_linear_minimum(w, b, x.reshape(-1), t)[1] for t in range(10) if t != y)
                      for x, y in zip(images, labels)])
    result = lbfgs_attack_untargeted(logits_fn, images, labels)
    assert np.all(np.asarray(result.success))
    ratio = np.asarray(result.l2, np.float64) / exact
    assert np.median(ratio) <= 1.005 and np.mean(ratio <= 1.01) >= 0.9, ratio
    assert np.mean(np.asarray(result.evaluations)) < 150


# -- an image's result does not depend on its batch -------------------------------------------------

@pytest.fixture(scope="module")
def trained_mlp(data_dir):
    logits_fn, _, test = train_on_fashion_mnist(data_dir, "FC100-100-10", 3000, epochs=2)
    return logits_fn, test


def _untargeted(**changes):
    """UNTARGETED with some of its search or refinement settings changed, each by its own name."""
    search = {k: v for k, v in changes.items() if k in UNTARGETED.search._fields}
    refine = {k: v for k, v in changes.items() if k not in search}
    return UNTARGETED._replace(search=UNTARGETED.search._replace(**search), refine=UNTARGETED.refine._replace(**refine))


LANES = 8
SMALL = AttackConfig(search=SearchConfig(bisection_steps=3), lbfgs=ATTACK_LBFGS._replace(max_iterations=40),
                     refine=RefineConfig(steps=8), lanes=LANES)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rotation=st.integers(1, 3 * LANES - 1))
def test_an_image_gets_the_same_bits_under_rotations_and_shuffles(trained_mlp, seed, rotation):
    """3 x lanes images, so images change lanes mid-run; every field must be bit-identical."""
    logits_fn, test = trained_mlp
    rng = np.random.default_rng(seed)
    index = rng.choice(len(test.labels), 3 * LANES, replace=False)
    images, labels = test.images[index], test.labels[index]
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(seed % 1000), labels))
    base = lbfgs_attack(logits_fn, images, targets, SMALL)
    for order in (np.roll(np.arange(len(index)), rotation), rng.permutation(len(index))):
        moved = lbfgs_attack(logits_fn, images[order], targets[order], SMALL)
        for field in base._fields:
            np.testing.assert_array_equal(np.asarray(getattr(base, field))[order], np.asarray(getattr(moved, field)),
                                          err_msg=field)
    # The untargeted mode with every stage: its runner-up run, and a walk where the short SQP stalls.
    small_untargeted = SMALL._replace(search=SMALL.search._replace(bisection_steps=0),
                                      refine=SMALL.refine._replace(steps=4, walk_steps=6))
    untargeted = lbfgs_attack_untargeted(logits_fn, images, labels, small_untargeted)
    order = rng.permutation(len(index))
    moved = lbfgs_attack_untargeted(logits_fn, images[order], labels[order], small_untargeted)
    for field in untargeted._fields:
        np.testing.assert_array_equal(np.asarray(getattr(untargeted, field))[order], np.asarray(getattr(moved, field)),
                                      err_msg=field)


def test_untargeted_is_no_worse_than_the_all_targets_minimum_on_most_images(trained_mlp):
    logits_fn, test = trained_mlp
    images, labels = test.images[:40], test.labels[:40]
    predicted = np.argmax(np.asarray(logits_fn(images)), -1)
    keep = predicted == labels
    images, labels = images[keep], labels[keep]
    config = AttackConfig(lanes=16)
    untargeted = lbfgs_attack_untargeted(logits_fn, images, labels, config)
    every = lbfgs_attack_all_targets(logits_fn, images, labels, config).best
    assert np.all(np.asarray(untargeted.success))
    ratio = np.asarray(untargeted.l2) / np.asarray(every.l2)
    assert np.median(ratio) <= 1.001 and np.mean(ratio <= 1.01) >= 0.8, ratio
    assert np.sum(untargeted.evaluations) < 0.25 * np.sum(every.evaluations)
    # Refinement never returns a point farther than the search's own.
    assert np.all(np.asarray(untargeted.distortion) <= np.asarray(untargeted.search_distortion) * (1 + 1e-6))


def test_runner_up_runs_only_ever_shorten_the_untargeted_result(trained_mlp):
    logits_fn, test = trained_mlp
    images, labels = test.images[40:64], test.labels[40:64]
    alone = lbfgs_attack_untargeted(logits_fn, images, labels, _untargeted(runner_ups=0))
    with_runner_up = lbfgs_attack_untargeted(logits_fn, images, labels)
    assert np.all(np.asarray(with_runner_up.success))
    assert np.all(np.asarray(with_runner_up.l2) <= np.asarray(alone.l2))
    assert np.all(np.asarray(with_runner_up.evaluations) > np.asarray(alone.evaluations))
    predicted = np.argmax(np.asarray(logits_fn(with_runner_up.adversarial)), -1)
    assert np.all(predicted != labels)


@pytest.mark.parametrize("field, value", [("search.runner_ups", -1), ("refine.walk_steps", -1), ("refine.walk_step", 0.0)])
def test_untargeted_settings_out_of_range_are_refused_naming_the_field(field, value):
    logits_fn = lambda x: x.reshape(len(x), -1)[:, :10]
    images = jnp.full((2, 12), 0.5)
    with pytest.raises(ValueError, match=f"config.{field}"):
        lbfgs_attack_untargeted(logits_fn, images, jnp.array([0, 1]), _untargeted(**{field.split('.')[1]: value}))


# -- a piecewise-linear model: the boundary walk, against the exact minimum --------------------------

def test_untargeted_attack_with_the_walk_finds_the_exact_minimum_of_a_relu_net():
    logits_fn, weights = small_relu_net(0)
    images = np.random.default_rng(1).uniform(0, 1, (16, 5)).astype(np.float32)
    labels = np.asarray(jnp.argmax(logits_fn(jnp.asarray(images)), -1))
    exact = np.array([exact_relu_untargeted_minimum(x.astype(np.float64), y, *weights) for x, y in zip(images, labels)])
    result = lbfgs_attack_untargeted(logits_fn, images, labels)
    assert np.all(np.asarray(result.success))
    ratio = np.asarray(result.l2, np.float64) / exact
    assert np.all(ratio >= 1 - 1e-4), ratio.min()                        # nothing beats the true minimum
    assert np.median(ratio) <= 1.005 and np.mean(ratio <= 1.01) >= 0.85, np.sort(ratio)
    # The walk starts from the SQP's best point and keeps the best it sees: never farther, image by image.
    walked = lbfgs_attack_untargeted(logits_fn, images, labels, _untargeted(runner_ups=0, steps=3))
    stopped = lbfgs_attack_untargeted(logits_fn, images, labels,
                                      _untargeted(runner_ups=0, steps=3, walk_steps=0))
    both = np.asarray(walked.success) & np.asarray(stopped.success)
    assert both.mean() >= 0.8
    assert np.all(np.asarray(walked.l2)[both] <= np.asarray(stopped.l2)[both])
    assert np.mean(np.asarray(walked.l2)[both]) < np.mean(np.asarray(stopped.l2)[both])


def test_the_attack_runs_in_float64_under_x64():
    """Researchers turn x64 on to compare with float64 references: the attack must run, in the images' dtype."""
    with jax.enable_x64(True):
        logits_fn, weights = small_relu_net(2, inputs=8, classes=4)
        images = jnp.asarray(np.random.default_rng(3).uniform(0, 1, (12, 8)))
        labels = jnp.argmax(logits_fn(images), -1)
        targeted = lbfgs_attack(logits_fn, images, (labels + 1) % 4, labels=labels)
        untargeted = lbfgs_attack_untargeted(logits_fn, images, labels)
        for result in (targeted, untargeted):
            assert result.adversarial.dtype == jnp.float64 and result.l2.dtype == jnp.float64
            assert np.mean(np.asarray(result.success)) >= 0.75


def test_untargeted_defaults_serve_a_binary_classifier():
    """Two classes leave no runner-up (the label and the class found are all there is): the run alone counts."""
    logits_fn, _ = small_relu_net(4, inputs=6, classes=2)
    images = jnp.asarray(np.random.default_rng(5).uniform(0, 1, (10, 6)), jnp.float32)
    labels = jnp.argmax(logits_fn(images), -1)
    alone = lbfgs_attack_untargeted(logits_fn, images, labels, _untargeted(runner_ups=0))
    result = lbfgs_attack_untargeted(logits_fn, images, labels)
    np.testing.assert_array_equal(np.asarray(result.l2), np.asarray(alone.l2))
    assert np.all(np.asarray(result.success) <= (np.argmax(np.asarray(logits_fn(result.adversarial)), -1) != labels))


@pytest.mark.parametrize("rank", [6, 4, 0])
def test_cholesky_solve_matches_a_dense_solve_and_stays_finite_when_rank_deficient(rank):
    """The projection's written-out Cholesky against numpy's solve (full rank), finite when the system is singular."""
    from jaxadv.attacks.projection import _cholesky_solve
    rng = np.random.default_rng(rank)
    a = rng.normal(size=(6, 20)) * (np.arange(6) < rank)[:, None]          # rank-deficient rows are zero
    a[rank:] = a[:max(rank, 1)][0] if rank else 0.0                       # ...or repeat a row
    h = a @ a.T
    floor = 1e-12 * max(np.max(np.diag(h)), np.finfo(np.float32).eps)     # as project_onto_cuts sets it
    h32 = (h + floor * np.eye(6)).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32)
    x = np.asarray(_cholesky_solve(jnp.asarray(h32), jnp.asarray(b), jnp.float32(floor)))
    assert np.all(np.isfinite(x))
    if rank == 6:
        np.testing.assert_allclose(x, np.linalg.solve(h32.astype(np.float64), b), rtol=1e-3, atol=1e-4)
