"""AttackBench's optimality score: how close an attack's robust-accuracy curve comes to the best known one.

    from jaxadv.metrics import optimality_score
    score = optimality_score(attack_l2, best_known_l2)

A minimal-norm attack gives, per image, the smallest perturbation it found
(inf where it found none). The robust accuracy at ε is then the share of
images it leaves correctly classified within the ball of radius ε
(`jaxadv.attacks.robust_accuracy_curve`). An image misclassified to begin
with has distance 0.
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


def attack_summary(outputs, labels, targets, adversarial_predictions) -> dict:
    """What a targeted attack over a set of images achieved, as Table 1 reports it.

    outputs: `jaxadv.attacks.attack_dataset`'s {"success", "distortion", "search_distortion"(, "iterations")};
    labels, targets, adversarial_predictions: per image. Distortions are averaged over the successes; the
    paper's definition of success is that accuracy on the adversarial set reaches 0%.
    """
    success = np.asarray(outputs["success"], bool)
    labels, targets, predicted = (np.asarray(a) for a in (labels, targets, adversarial_predictions))
    if not success.ndim == labels.ndim == 1 or not success.shape == labels.shape == predicted.shape:
        raise ValueError(f"labels: expected one per image like outputs['success'] {success.shape}, got "
                         f"{labels.shape} (adversarial_predictions {predicted.shape})")
    distortion = np.asarray(outputs["distortion"], np.float64)
    ok = distortion[success]
    # The c search's own result (the paper's method, before the boundary refinement), over its successes.
    search = np.asarray(outputs["search_distortion"], np.float64)
    search = search[np.isfinite(search)]
    return {
        "av_min_distortion": float(ok.mean()) if ok.size else None,
        "median_min_distortion": float(np.median(ok)) if ok.size else None,
        "paper_method_av_distortion": float(search.mean()) if search.size else None,
        "success_rate": float(success.mean()),
        "num_images": int(len(labels)),
        "adversarial_accuracy": float(np.mean(predicted == labels)),
        "reached_target_rate": float(np.mean(predicted == targets)),
        "mean_iterations": float(np.mean(outputs["iterations"])) if "iterations" in outputs else None,
    }


def untargeted_distortion(logits_fn, images, config, directory: str, name: str = "") -> dict:
    """The untargeted L-BFGS attack away from the model's prediction over `images`: its success rate and the
    mean and median distortion (per-pixel RMS) of its successes, with the seconds it took.

    Models that are not saved (a variant trained anew may differ in the last bits) get a chunk folder per set
    of weights, `directory`-<their fingerprint>: a rerun that trains the same weights resumes, one that does
    not starts a folder of its own instead of being refused. `config`: the attack's `AttackConfig`.
    """
    import time

    import jax.numpy as jnp

    from jaxadv import checks
    from jaxadv.attacks import attack_dataset
    from jaxadv.sweep import function_fingerprint

    checks.model(logits_fn, None, checks.images(images))     # checked; the attack gets them as they are
    tic = time.perf_counter()
    predicted = np.asarray(jnp.argmax(logits_fn(images), axis=-1), np.int32)
    weights = function_fingerprint(logits_fn, images[:1])["parameters"][:16]
    result = attack_dataset(logits_fn, images, predicted, f"{directory}-{weights}", config, untargeted=True,
                            name=name)
    success = result["success"]
    distortion = result["distortion"][success]
    return {"success_rate": float(success.mean()),
            "mean_distortion": float(distortion.mean()) if distortion.size else float("nan"),
            "median_distortion": float(np.median(distortion)) if distortion.size else float("nan"),
            "seconds": time.perf_counter() - tic}
