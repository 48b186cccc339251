"""jaxadv.metrics.optimality_score against AttackBench's formula integrated on a fine grid."""
import numpy as np
import pytest

from jaxadv.metrics import optimality_score


def _attackbench_area(d, upper):
    """The area AttackBench sums, by integrating its piecewise-linear curve from ε = 0 on a fine grid."""
    values = np.unique(np.concatenate([[0.0], d]))
    accuracy = np.array([np.mean(d > v) for v in values])
    grid = np.linspace(values[0], values[-1], 200_001)
    return np.trapezoid(np.interp(grid, values, accuracy), grid) if len(values) > 1 else 0.0


def test_optimality_score_matches_the_integrated_attackbench_formula():
    rng = np.random.default_rng(1)
    best = rng.uniform(0.2, 2.0, 300)
    attack = best * rng.uniform(1.0, 1.5, 300)
    attack[rng.random(300) < 0.05] = np.inf
    upper = best.max()
    best_area, area = _attackbench_area(best, upper), _attackbench_area(np.minimum(attack, upper), upper)
    expected = 1 - (area - best_area) / (upper - best_area)
    assert optimality_score(attack, best) == pytest.approx(expected, abs=1e-6)
    assert optimality_score(best, best) == 1.0
    failed = ~np.isfinite(attack)
    assert optimality_score(np.where(failed, 0.5, attack), best, success=~failed) == optimality_score(attack, best)
    assert 0 < optimality_score(attack, best) < optimality_score(np.minimum(attack, best * 1.01), best) < 1
    # An attack at least the best known on every image never scores above 1 (its curve lies above the best's).
    for seed in range(20):
        noise = np.random.default_rng(seed).uniform(1.0, 1.3, 300)
        assert optimality_score(best * noise, best) <= 1.0


@pytest.mark.parametrize("bad, match", [(np.array([[1.0]]), "1-D"), (np.array([np.nan]), "NaN"),
                                        (np.array([-1.0]), ">= 0")])
def test_bad_distances_are_refused(bad, match):
    """One line naming the argument, before any work."""
    with pytest.raises(ValueError, match=match):
        optimality_score(bad, np.ones(bad.shape))
    with pytest.raises(ValueError, match="best_distances"):
        optimality_score([1.0, 2.0], [1.0, np.inf])


def test_attack_summary_counts_per_image_by_brute_force():
    """Each field recomputed image by image with Python loops: successes only in the distortions, the paper's
    method over its finite entries, adversarial accuracy and the target rate over every image."""
    from jaxadv.metrics import attack_summary
    rng = np.random.default_rng(0)
    n = 37
    success = rng.random(n) < 0.7
    outputs = {"success": success, "distortion": rng.random(n), "iterations": rng.integers(1, 9, n),
               "search_distortion": np.where(rng.random(n) < 0.8, rng.random(n), np.inf)}
    labels, targets, predicted = rng.integers(0, 3, n), rng.integers(0, 3, n), rng.integers(0, 3, n)
    row = attack_summary(outputs, labels, targets, predicted)
    ok = [d for d, s in zip(outputs["distortion"], success) if s]
    search = [d for d in outputs["search_distortion"] if d != np.inf]
    assert row["av_min_distortion"] == pytest.approx(sum(ok) / len(ok))
    assert row["median_min_distortion"] == pytest.approx(sorted(ok)[len(ok) // 2] if len(ok) % 2 else
                                                          (sorted(ok)[len(ok) // 2 - 1] + sorted(ok)[len(ok) // 2]) / 2)
    assert row["paper_method_av_distortion"] == pytest.approx(sum(search) / len(search))
    assert row["success_rate"] == pytest.approx(len(ok) / n) and row["num_images"] == n
    assert row["adversarial_accuracy"] == pytest.approx(sum(p == y for p, y in zip(predicted, labels)) / n)
    assert row["reached_target_rate"] == pytest.approx(sum(p == t for p, t in zip(predicted, targets)) / n)
    assert row["mean_iterations"] == pytest.approx(sum(outputs["iterations"]) / n)
    nothing = attack_summary({**outputs, "success": np.zeros(n, bool)}, labels, targets, predicted)
    assert nothing["av_min_distortion"] is None and nothing["success_rate"] == 0.0
    with pytest.raises(ValueError, match="^labels"):
        attack_summary(outputs, labels[:-1], targets, predicted)
