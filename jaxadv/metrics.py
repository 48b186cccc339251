"""Robustness figures from per-image minimal distances: the robust-accuracy curve and AttackBench's optimality.

    from jaxadv.metrics import robust_accuracy_curve, optimality_score
    epsilons, accuracy = robust_accuracy_curve(result.l2, success=result.success)
    score = optimality_score(attack_l2, best_known_l2)

A minimal-norm attack gives, per image, the smallest perturbation it found
(inf where it found none). The robust accuracy at ε is then the share of
images it leaves correctly classified within the ball of radius ε: those whose
distance exceeds ε. An image misclassified to begin with has distance 0.
"""
from __future__ import annotations

import numpy as np


def _distances(distances, success=None, argument: str = "distances") -> np.ndarray:
    d = np.asarray(distances, np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"{argument}: expected a non-empty 1-D array of per-image distances, got shape {d.shape}")
    if success is not None:
        s = np.asarray(success)
        if s.shape != d.shape:
            raise ValueError(f"success: expected shape {d.shape} like {argument}, got {s.shape}")
        d = np.where(s.astype(bool), d, np.inf)
    if np.any(np.isnan(d)) or np.any(d < 0):
        raise ValueError(f"{argument}: distances must be >= 0 (inf for a failure), without NaN")
    return d


def robust_accuracy_curve(distances, epsilons=None, *, success=None):
    """(epsilons, robust accuracy): the share of images whose minimal distance exceeds each ε.

    Args:
      distances: [N] per-image distances (inf, or `success` False, where the attack failed).
      epsilons: the radii to evaluate at; default: 0 and every distinct finite distance, where
        the step function drops (plot it with `drawstyle="steps-post"`).
      success: optional [N] booleans; a False entry counts as inf.

    Returns two float64 arrays of the same length: epsilons ascending, and the
    robust accuracy at each, mean(distances > ε).
    """
    d = _distances(distances, success)
    if epsilons is None:
        finite = d[np.isfinite(d)]
        epsilons = np.unique(np.concatenate([[0.0], finite]))
    else:
        epsilons = np.asarray(epsilons, np.float64)
        if epsilons.ndim != 1 or np.any(np.isnan(epsilons)) or np.any(np.diff(epsilons) < 0):
            raise ValueError("epsilons: expected an ascending 1-D array without NaN")
    ordered = np.sort(d)
    broken = np.searchsorted(ordered, epsilons, side="right")        # images with distance <= ε
    return epsilons, 1.0 - broken / d.size


def optimality_score(distances, best_distances, *, success=None) -> float:
    """AttackBench's optimality of an attack: how close its robust-accuracy curve is to the best known one.

    1 − (A − A*) / (a·d_max − A*), where A* is the area under the best-known
    curve, A the attack's, d_max the largest best-known distance, and a the
    clean accuracy (the share of nonzero best-known distances). Both areas are
    AttackBench's: the trapezoidal rule through the points (d, robust accuracy
    after d) at each distinct distance, the attack's distances clipped to
    d_max, so a failure counts as broken at d_max (`analysis/utils.py`,
    `eval_optimality`, in github.com/attackbench/AttackBench). 1 means as good
    as the best known on every image. AttackBench's sets hold misclassified
    images (distance 0), so its curves start at ε = 0; here each curve starts
    there too, whatever the images: on correctly classified images alone,
    curves starting at their own smallest distance scored an attack worse
    on every image above 1.

    Args:
      distances: [N] the attack's per-image distances (inf where it failed).
      best_distances: [N] the per-image best known (finite: the smallest any attack found).
      success: optional [N] booleans for `distances`; a False entry counts as inf.
    """
    d = _distances(distances, success)
    best = _distances(best_distances, argument="best_distances")
    if best.shape != d.shape:
        raise ValueError(f"best_distances: expected shape {d.shape} like distances, got {best.shape}")
    if not np.all(np.isfinite(best)):
        raise ValueError("best_distances: must be finite (images no attack broke have no best known distance)")
    max_distance = best.max()
    best_area = _stepwise_area(best)
    area = _stepwise_area(np.minimum(d, max_distance))
    clean_accuracy = np.count_nonzero(best) / best.size
    denominator = clean_accuracy * max_distance - best_area
    return float(1.0 - (area - best_area) / denominator) if denominator > 0 else float(area <= best_area)


def _stepwise_area(distances: np.ndarray) -> float:
    """The trapezoidal area through (0 and each distinct distance, the share of distances above it), AttackBench's sum."""
    values = np.unique(np.concatenate([[0.0], distances]))
    accuracy = 1.0 - np.searchsorted(np.sort(distances), values, side="right") / distances.size
    return float(np.sum((values[1:] - values[:-1]) * (accuracy[1:] + accuracy[:-1]) / 2))
