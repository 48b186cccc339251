"""jaxadv.metrics against brute force: the robust-accuracy curve by counting, the optimality by fine integration."""
import numpy as np
import pytest

from jaxadv.metrics import optimality_score, robust_accuracy_curve


def test_robust_accuracy_curve_counts_images_beyond_each_epsilon():
    rng = np.random.default_rng(0)
    d = np.where(rng.random(200) < 0.1, np.inf, rng.exponential(1.0, 200))
    d[:5] = 0.0                                       # misclassified from the start
    grid = np.linspace(0, 5, 101)
    eps, accuracy = robust_accuracy_curve(d, grid)
    assert np.array_equal(eps, grid)
    np.testing.assert_allclose(accuracy, [np.mean([x > e for x in d]) for e in grid])
    eps, accuracy = robust_accuracy_curve(d)          # its own grid: 0 and every finite distance, where it drops
    assert eps[0] == 0 and np.all(np.diff(eps) > 0) and len(eps) == len(np.unique(d[np.isfinite(d)]))
    np.testing.assert_allclose(accuracy, [np.mean(d > e) for e in eps])
    assert accuracy[-1] == pytest.approx(np.mean(np.isinf(d)))


def test_robust_accuracy_curve_counts_failures_as_infinite():
    d = np.array([0.5, 1.0, 2.0])
    _, with_mask = robust_accuracy_curve(d, [0.0, 1.5, 3.0], success=[True, False, True])
    _, with_inf = robust_accuracy_curve([0.5, np.inf, 2.0], [0.0, 1.5, 3.0])
    assert np.array_equal(with_mask, with_inf) and np.allclose(with_inf, [1, 2 / 3, 1 / 3])


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
    assert 0 < optimality_score(attack, best) < optimality_score(np.minimum(attack, best * 1.01), best) < 1
    # An attack at least the best known on every image never scores above 1 (its curve lies above the best's).
    for seed in range(20):
        noise = np.random.default_rng(seed).uniform(1.0, 1.3, 300)
        assert optimality_score(best * noise, best) <= 1.0


@pytest.mark.parametrize("bad, match", [(np.array([[1.0]]), "1-D"), (np.array([np.nan]), "NaN"),
                                        (np.array([-1.0]), ">= 0")])
def test_bad_distances_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        robust_accuracy_curve(bad)
    with pytest.raises(ValueError, match="best_distances"):
        optimality_score([1.0, 2.0], [1.0, np.inf])
