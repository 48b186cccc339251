"""How loose are Lipschitz bounds? Per layer against power iteration, and per image the certified radii
(`jaxadv.lipschitz`'s global and pairwise, `jaxadv.certify`'s CROWN) against the distortion the untargeted
attack attains (Table 5 and beyond).

    spectrum, bounds = network_spectrum("FC100-100-10", logits_fn, (28, 28, 1), key, power_iterations=100)
    out = radius_against_attack("FC100-100-10", logits_fn, images, bounds, "runs/radius", UNTARGETED)
    summary = looseness_summary(out)            # attained / certified: medians, extremes, violations
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import lipschitz
from jaxadv.attacks import attack_dataset
from jaxadv.certify import certificates


RADII = (("certified", "paper's: margin / (√2 · Π L_k)"),
         ("certified_pairwise", "pairwise: min_j (z_y − z_j) / (‖w_y − w_j‖ · Π_{below} L_k)"),
         ("certified_crown", "CROWN: linear bound propagation on the L2 ball ∩ box"))


def network_spectrum(name: str, logits_fn, input_shape, key: jax.Array,
                     power_iterations: int) -> tuple[dict, lipschitz.LipschitzBounds]:
    """Every operator's bound from the trace (timed), then a power-iteration estimate of each linear one (timed)."""
    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    start, cpu = time.perf_counter(), time.process_time()
    bounds = lipschitz.operator_bounds(logits_fn, example)
    bounds_seconds, bounds_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    if power_iterations:
        bounds = lipschitz.estimate_by_power_iteration(bounds, key, power_iterations)
    power_seconds = time.perf_counter() - start
    return ({"name": name, "input_shape": list(input_shape), "layers": list(bounds.rows),
             "network_bound": bounds.network_bound, "features_bound": bounds.features_bound,
             "bounds_seconds": bounds_seconds, "bounds_cpu_seconds": bounds_cpu,
             "power_iteration_seconds": power_seconds, "power_iterations": power_iterations}, bounds)


def radius_against_attack(name: str, logits_fn, images: np.ndarray, bounds: lipschitz.LipschitzBounds,
                          directory: str, config, **sizes) -> dict[str, np.ndarray]:
    """Both certified radii and the untargeted attack's smallest L2 (`attack_dataset`, untargeted), per image.

    The attack moves away from the predicted class (the class the radii
    certify), and every adversarial image is re-checked here: `success` means
    the model really predicts another class there. The radii come from the
    logits alone, outside the saved attack chunks, so a change of bound never
    invalidates them. `sizes`: chunk_size, block_size for `attack_dataset`.
    """
    logits = jax.jit(logits_fn)(jnp.asarray(images))
    predicted = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
    attack = attack_dataset(logits_fn, images, predicted, directory, config, untargeted=True,
                            name=f"radius {name}", **sizes)
    adversarial_class = np.asarray(jnp.argmax(jax.jit(logits_fn)(attack["adversarial"]), axis=-1), np.int32)
    attained = jax.jit(lambda a, x: jnp.sqrt(jnp.sum((a - x) ** 2, axis=(1, 2, 3))))(attack["adversarial"], images)
    return {"predicted": predicted, "success": attack["success"] & (adversarial_class != predicted),
            "attained": np.asarray(attained), "adversarial_class": adversarial_class,
            "certified": np.asarray(bounds.certified_radius(logits)),
            "certified_pairwise": np.asarray(bounds.pairwise_certified_radius(logits)),
            # CROWN's own radius: `certified_radius` would give max(CROWN, pairwise), and the pairwise has its column
            "certified_crown": np.asarray(certificates(logits_fn, jnp.asarray(images), predicted,
                                                           lipschitz_bounds=bounds).crown)}


def looseness_summary(out: dict[str, np.ndarray]) -> dict:
    """Per-model summary of attained / certified over images the attack moved, for both radii.

    Keys for the paper's radius as before (`median_certified_l2`, `ratio_median`,
    `violations`, ...); the pairwise radius's carry `_pairwise` (`median_certified_pairwise_l2`,
    `ratio_pairwise_median`, `violations_pairwise`, ...).
    """
    moved = np.asarray(out["success"], bool)
    summary = {"images": int(len(moved)), "attack_success": int(np.sum(moved))}
    for key, _ in RADII:
        suffix = key.removeprefix("certified")
        certified = np.asarray(out[key])
        ok = moved & (certified > 0)
        ratio = out["attained"][ok] / certified[ok]
        summary[f"median_certified{suffix}_l2"] = float(np.median(certified))
        summary[f"violations{suffix}"] = np.flatnonzero(moved & (certified > out["attained"])).tolist()
        if not suffix:
            summary["median_attained_l2"] = float(np.median(out["attained"][ok])) if ok.any() else None
        if ok.any():
            summary.update({f"ratio{suffix}_median": float(np.median(ratio)),
                            f"ratio{suffix}_geometric_mean": float(np.exp(np.mean(np.log(ratio)))),
                            f"ratio{suffix}_min": float(ratio.min()), f"ratio{suffix}_max": float(ratio.max()),
                            f"ratio{suffix}_p90": float(np.percentile(ratio, 90))})
    return summary


def violation_details(out: dict, test_indices) -> dict:
    """Per radius, the images whose certified radius exceeds the attained distortion (a bound or the attack is
    wrong): {"violation<suffix>_details": [{"test_index", "certified", "attained"}]}."""
    moved = np.asarray(out["success"], bool)
    details = {}
    for key, _ in RADII:
        violations = np.flatnonzero(moved & (np.asarray(out[key]) > out["attained"]))
        details[f"violation{key.removeprefix('certified')}_details"] = [
            {"test_index": int(test_indices[i]), "certified": float(out[key][i]), "attained": float(out["attained"][i])}
            for i in violations]
    return details
