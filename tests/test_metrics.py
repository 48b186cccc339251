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
