"""How sparse and how fast are the blind spots? Per image: one pixel, the fewest pixels, and fast-gradient steps
against the minimal L-BFGS perturbation (the paper's summary left both open; `experiments.sparse_and_fast`).

    out, seconds = measure_blind_spots(logits_fn, x, labels, adversarial, success, max_pixels=300, curve_l2=grid)
    row = blind_spot_summary("FC100-100-10", "sigmoid net", out, fine_single_pixel_scan(logits_fn, x, 17), 17, y)

Everything here composes the library's attacks; the outputs are per image, so a sweep can save them in chunks.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.attacks import fgm, fgsm, min_pixels_attack, minimal_fast_gradient, single_pixel_attack
from jaxadv.attacks.fast import fast_gradient_direction, success_along_direction
from jaxadv.attacks.sparse import margin


def measure_blind_spots(logits_fn, x, labels, adversarial, lbfgs_success, max_pixels: int, curve_l2):
    """Every per-image quantity of one chunk but the L-BFGS attack's, and the seconds each part took.

    x [N, H, W, C] images moved away from `labels` (the model's own predictions); adversarial, lbfgs_success:
    the untargeted L-BFGS attack's result on them, r = adversarial − x. Measured: one pixel set to 0 or 1
    (`single_pixel_attack`), the fewest pixels (`min_pixels_attack`), one FGM step at ‖r‖₂ and one FGSM step at
    ‖r‖∞, the cosine between the FGM direction and r (and with the direction's box-infeasible components
    removed), the step each needs (`minimal_fast_gradient`) and one FGM step's success at each L2 of `curve_l2`.
    """
    t = {}
    start = time.perf_counter()
    one = jax.block_until_ready(single_pixel_attack(logits_fn, x, labels))
    t["single_pixel"] = time.perf_counter() - start
    start = time.perf_counter()
    few = jax.block_until_ready(min_pixels_attack(logits_fn, x, labels, max_pixels=max_pixels))
    t["min_pixels"] = time.perf_counter() - start
    start = time.perf_counter()
    r = (adversarial - x).reshape(len(labels), -1)
    l2 = jnp.sqrt(jnp.sum(r * r, -1))
    linf = jnp.max(jnp.abs(r), -1)
    ok = lbfgs_success
    direction = fast_gradient_direction(logits_fn, x, labels, norm="l2").reshape(len(labels), -1)
    flat = x.reshape(len(labels), -1)
    # The components the box allows: a pixel at 0 cannot fall, a pixel at 1 cannot rise.
    feasible = jnp.where(((flat <= 0) & (direction < 0)) | ((flat >= 1) & (direction > 0)), 0.0, direction)

    def cosine(a, b):
        return jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)

    at_l2 = fgm(logits_fn, x, labels, jnp.where(ok, l2, 0.0))
    at_linf = fgsm(logits_fn, x, labels, jnp.where(ok, linf, 0.0))
    need_l2 = minimal_fast_gradient(logits_fn, x, labels, norm="l2")
    need_linf = minimal_fast_gradient(logits_fn, x, labels, norm="linf")
    curve = success_along_direction(logits_fn, x, labels, direction.reshape(x.shape), jnp.asarray(curve_l2), 0.0, 1.0)
    t["fast"] = time.perf_counter() - start
    pixel_margin = one.pixel_margin.reshape(len(labels), -1)
    out = {"label": labels, "clean_margin": margin(logits_fn(x), labels),
           "sp_success": one.success, "sp_margin": one.margin, "sp_pixel": one.pixel, "sp_value": one.value,
           "sp_flips": pixel_margin < 0, "sp_flips_up": (pixel_margin < 0) & (one.pixel_value.reshape(len(labels), -1) >= 1),
           "sp_new_label": jnp.argmax(logits_fn(one.adversarial), -1),
           "mp_num_pixels": few.num_pixels, "mp_success": few.success,
           "lb_success": ok, "lb_l2": l2, "lb_linf": linf,
           "cosine": cosine(direction, r), "cosine_feasible": cosine(feasible, r),
           "fgm_at_l2": at_l2.success & ok, "fgsm_at_linf": at_linf.success & ok,
           "fgm_need_success": need_l2.success, "fgm_need_l2": need_l2.l2, "fgm_need_eps": need_l2.epsilon,
           "fgsm_need_success": need_linf.success, "fgsm_need_linf": need_linf.linf,
           "fgm_curve": curve.T}
    return {k: np.asarray(v) for k, v in out.items()}, t


def fine_single_pixel_scan(logits_fn, x, num_values: int) -> dict:
    """The single-pixel scan with `num_values` values per pixel beside the bounds-only one: its best margins and
    successes, and per image how many pixels an inner value lowers below both bounds (float32 noise aside)."""
    labels = jnp.argmax(logits_fn(x), axis=-1).astype(jnp.int32)
    fine = single_pixel_attack(logits_fn, x, labels, num_values=num_values)
    bounds = single_pixel_attack(logits_fn, x, labels)
    # Per pixel: does some inner value beat both bounds (by more than float32 noise)?
    lower = (fine.pixel_margin < bounds.pixel_margin - 1e-5 * (1 + jnp.abs(bounds.pixel_margin))).reshape(len(labels), -1)
    return {"fine_margin": np.asarray(fine.margin), "fine_success": np.asarray(fine.success),
            "fine_pixels_lower": np.asarray(jnp.sum(lower, -1))}


def blind_spot_summary(name: str, kind: str, out: dict, fine: dict, fine_values: int, true_labels) -> dict:
    """One model's row: `measure_blind_spots`'s per-image outputs `out` and `fine_single_pixel_scan`'s `fine`
    (on the first images) summed up as shares, medians and percentiles; true_labels for the accuracy."""
    ok = out["lb_success"].astype(bool)
    correct = out["label"] == true_labels
    pixels = np.where(out["mp_success"], out["mp_num_pixels"], np.inf).astype(float)
    ratio_l2 = np.where(out["fgm_need_success"], out["fgm_need_l2"], np.inf)[ok] / out["lb_l2"][ok]
    ratio_linf = np.where(out["fgsm_need_success"], out["fgsm_need_linf"], np.inf)[ok] / out["lb_linf"][ok]
    flipped = out["sp_success"].astype(bool)
    n_fine = len(fine["fine_margin"])
    bounds_margin = out["sp_margin"][:n_fine]
    # How much of the way from the clean margin to the bounds-only best the finer scan adds (0: bounds exact).
    scale = np.maximum(np.abs(out["clean_margin"][:n_fine]), 1e-12)
    gap = (bounds_margin - fine["fine_margin"]) / scale
    return {
        "model": name, "kind": kind, "images": int(len(ok)),
        "one_pixel_share": float(flipped.mean()),
        "accuracy": float(correct.mean()),
        "one_pixel_share_correct": float(flipped[correct].mean()) if correct.any() else None,
        "one_pixel_share_wrong": float(flipped[~correct].mean()) if (~correct).any() else None,
        "flipping_pixels_per_flipped_image_median": _percentile(out["sp_flips"][flipped].sum(-1), 50),
        "min_pixels_median": _percentile(pixels, 50), "min_pixels_p90": _percentile(pixels, 90),
        "min_pixels_found_share": float(np.isfinite(pixels).mean()),
        "lbfgs_success": float(ok.mean()), "lbfgs_l2_median": _percentile(out["lb_l2"][ok], 50),
        "lbfgs_linf_median": _percentile(out["lb_linf"][ok], 50),
        "fgm_at_min_l2_success": float(out["fgm_at_l2"][ok].mean()) if ok.any() else None,
        "cosine_median": _percentile(out["cosine"][ok], 50), "cosine_mean": float(out["cosine"][ok].mean()),
        "cosine_p10": _percentile(out["cosine"][ok], 10), "cosine_p90": _percentile(out["cosine"][ok], 90),
        "cosine_feasible_median": _percentile(out["cosine_feasible"][ok], 50),
        "fgm_found_share": float(np.isfinite(ratio_l2).mean()) if ok.any() else None,
        "fgm_l2_ratio_median": _percentile(ratio_l2, 50), "fgm_l2_ratio_p90": _percentile(ratio_l2, 90),
        "fgsm_at_linf_success": float(out["fgsm_at_linf"][ok].mean()) if ok.any() else None,
        "fgsm_linf_ratio_median": _percentile(ratio_linf, 50), "fgsm_linf_ratio_p90": _percentile(ratio_linf, 90),
        "fine_values": fine_values, "fine_images": n_fine,
        "fine_verdict_changed": int(np.sum(fine["fine_success"] != out["sp_success"][:n_fine])),
        "fine_flips_bounds_do_not": int(np.sum(fine["fine_success"] & ~out["sp_success"][:n_fine])),
        "fine_gap_mean": float(gap.mean()) if n_fine else None, "fine_gap_max": float(gap.max()) if n_fine else None,
        "fine_gap_share_above_1e-3": float(np.mean(gap > 1e-3)) if n_fine else None,
        "fine_margin_lower_share": float(np.mean(fine["fine_margin"] < bounds_margin - 1e-5)) if n_fine else None,
        "fine_pixels_lower_share": float(np.sum(fine["fine_pixels_lower"]) / (n_fine * out["sp_flips"].shape[1]))
                                   if n_fine else None,
        "fine_images_with_a_pixel_lower": int(np.sum(fine["fine_pixels_lower"] > 0)),
    }


def _percentile(values, q):
    values = np.asarray(values, float)
    return float(np.percentile(values, q)) if values.size else None
