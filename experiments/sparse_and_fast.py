"""Single pixels, and are blind spots fast-gradient steps? (the summary's two open questions)

    python -m experiments.sparse_and_fast [--dataset fashion_mnist] [--num-images 1000] [--quick]
                                          [--models ...] [--fine-values 17] [--fine-images 250]

For each Table 1 model and the ConvNet, on N test images (a seeded sorted subset),
moving each image away from the model's own prediction:

1. `single_pixel_attack`: every pixel set to 0 and to 1; the share of images one
   pixel flips. On the first `--fine-images` images the scan is repeated with
   `--fine-values` values per pixel, to measure how far the bounds are from exact.
2. `min_pixels_attack`: the fewest pixels (greedy; exact at 1): median and 90th percentile.
3. `attack_dataset(..., untargeted=True)`: the smallest L2 change of the prediction at
   all (the untargeted minimum, refined to the boundary), r = x′ − x. Then, per image:
   - `fgm` at exactly ε = ‖r‖₂: does one FGM step of the same L2 fool the model?
   - the cosine between the FGM direction (the cross-entropy's gradient at x) and r,
     and the same with the gradient's components that leave the box removed;
   - `minimal_fast_gradient`: the L2 one FGM step needs, over ‖r‖₂;
   - the same for FGSM at ε = ‖r‖∞ (the L∞ of the L2-minimal perturbation).
4. `success_along_direction`: the share fooled by one FGM step at each L2 of a grid,
   beside the share whose minimal L2 is below it.

Per-image results are saved chunk by chunk under WORKDIR/sparse_and_fast/chunks/<model>/
(the L-BFGS attack's in lbfgs-n<N>-seed<S>/; a rerun resumes). Writes results.json, table.md, single_pixels.png, cosines.png
and fgm_vs_minimal.png under WORKDIR/sparse_and_fast/.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (ArgumentParser, add_common_args, int_in, markdown_table, output_dir, parse_args,
                                percent, run_main, save_figure_atomic, significant, write_json_atomic,
                                write_text_atomic)
from jaxadv import logits_function
from jaxadv.attacks import (UNTARGETED, attack_dataset, attack_source_fingerprint, fast_gradient_direction, fgm, fgsm,
                            min_pixels_attack, minimal_fast_gradient, single_pixel_attack, success_along_direction)
from jaxadv.data import CLASS_NAMES, load_dataset
from jaxadv.models import ZOO
from jaxadv.sweep import function_fingerprint, run_sweep
from jaxadv.zoo import trained_models

NAME = "sparse_and_fast"
MODELS = ZOO + ("ConvNet",)
KIND = {"FC10(1e-4)": "softmax (linear)", "FC10(1e-2)": "softmax (linear)", "FC10(1)": "softmax (linear)",
        "FC100-100-10": "sigmoid net", "FC200-200-10": "sigmoid net", "AE400-10": "sigmoid features + softmax",
        "ConvNet": "ReLU convnet"}
DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES = 1000, 40
TEST_SIZE = 10000
CHUNK = 250
MAX_PIXELS = 300
CURVE_L2 = np.geomspace(0.05, 12.0, 48).astype(np.float32)    # ‖r‖₂ of one FGM step (the x axis)
FIGURE_MODELS = ("FC10(1e-4)", "FC100-100-10", "ConvNet")
FIGURE_IMAGES = 6


def measure(logits_fn, x, labels, adversarial, lbfgs_success, max_pixels):
    """Every per-image quantity of one chunk but the L-BFGS attack's (`adversarial`, given), by library calls only."""
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
    curve = success_along_direction(logits_fn, x, labels, direction.reshape(x.shape), jnp.asarray(CURVE_L2), 0.0, 1.0)
    t["fast"] = time.perf_counter() - start
    pixel_margin = one.pixel_margin.reshape(len(labels), -1)
    out = {"label": labels, "clean_margin": single_pixel_margin_of_clean(logits_fn, x, labels),
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


def single_pixel_margin_of_clean(logits_fn, x, labels):
    from jaxadv.attacks.sparse import margin
    return margin(logits_fn(x), labels)


def fine_scan(logits_fn, x, num_values):
    labels = jnp.argmax(logits_fn(x), axis=-1).astype(jnp.int32)
    fine = single_pixel_attack(logits_fn, x, labels, num_values=num_values)
    bounds = single_pixel_attack(logits_fn, x, labels)
    # Per pixel: does some inner value beat both bounds (by more than float32 noise)?
    lower = (fine.pixel_margin < bounds.pixel_margin - 1e-5 * (1 + jnp.abs(bounds.pixel_margin))).reshape(len(labels), -1)
    return {"fine_margin": np.asarray(fine.margin), "fine_success": np.asarray(fine.success),
            "fine_pixels_lower": np.asarray(jnp.sum(lower, -1))}


def _percentile(values, q):
    values = np.asarray(values, float)
    return float(np.percentile(values, q)) if values.size else None


def summarize(name, out, fine, fine_values, true_labels):
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
        "model": name, "kind": KIND.get(name, ""), "images": int(len(ok)),
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


# -- outputs --------------------------------------------------------------------------------------

def table_markdown(results) -> str:
    rows = [[r["model"], r["kind"], f"{percent(r['one_pixel_share'], 1)} ({percent(r.get('one_pixel_share_correct'), 1)})",
             f"{significant(r['min_pixels_median'], 3)} / {significant(r['min_pixels_p90'], 3)}",
             significant(r["lbfgs_l2_median"], 3), percent(r["fgm_at_min_l2_success"], 1),
             f"{significant(r['cosine_median'], 2)} ({significant(r['cosine_feasible_median'], 2)})",
             f"{significant(r['fgm_l2_ratio_median'], 3)} / {significant(r['fgm_l2_ratio_p90'], 3)}",
             percent(r["fgsm_at_linf_success"], 1),
             f"{significant(r['fgsm_linf_ratio_median'], 3)} / {significant(r['fgsm_linf_ratio_p90'], 3)}"] for r in results["rows"]]
    main = markdown_table(["Model", "Kind", "One pixel flips (of correctly classified)", "Min. pixels: median / 90th",
                           "Min. L2 (L-BFGS), median", "FGM at min. L2: success",
                           "Cosine FGM dir. vs r: median (box-feasible)", "FGM L2 needed / min. L2: median / 90th",
                           "FGSM at r's L∞: success", "FGSM L∞ needed / r's L∞: median / 90th"], rows)
    fine_rows = [[r["model"], str(r["fine_images"]), str(r["fine_verdict_changed"]), str(r["fine_flips_bounds_do_not"]),
                  percent(r["fine_margin_lower_share"], 1), significant(r["fine_gap_mean"], 3), significant(r["fine_gap_max"], 3),
                  f"{100 * r['fine_pixels_lower_share']:.3f}%" if r["fine_pixels_lower_share"] is not None else "–",
                  str(r["fine_images_with_a_pixel_lower"])]
                 for r in results["rows"]]
    fine = markdown_table(["Model", "Images", "One-pixel verdict changed", "Flipped only by the finer scan",
                           "Best margin lower with the finer scan", "Gap, mean", "Gap, max",
                           "Pixels an inner value helps more", "Images with such a pixel"], fine_rows)
    timing = markdown_table(["Model", "Single pixel (s)", "Min. pixels (s)", "L-BFGS untargeted (s)", "Fast family (s)",
                             "Finer scan (s)"],
                            [[n, *(f"{t.get(k, 0.0):.1f}" for k in ("single_pixel", "min_pixels", "lbfgs", "fast",
                                                                   "fine_scan"))]
                             for n, t in results["timing"].items()])
    return (f"# Single pixels and fast-gradient steps ({results['dataset']}{', quick' if results['quick'] else ''})\n\n"
            f"{results['num_images']} test images per model (seed {results['seed']}), each moved away from the model's "
            "own prediction. One pixel: every pixel set to 0 and to 1 (`single_pixel_attack`). Min. pixels: greedy "
            f"(`min_pixels_attack`, exhaustive at the first pixel, then a saliency shortlist of 32; at most "
            f"{results['max_pixels']}, ∞ where it gave up). r: the untargeted minimal-L2 perturbation "
            "(`lbfgs_attack_untargeted`, the smallest change of the prediction). FGM: one step ε·g/‖g‖₂ along the "
            "cross-entropy's gradient g at x, clipped to [0, 1]; FGSM: ε·sign(g). \"Needed\": the smallest ε that "
            "succeeds along the same direction (`minimal_fast_gradient`), as the clipped step's L2 (L∞) over r's. "
            "Cosines in brackets: g without the components that would leave the box.\n\n"
            + main +
            f"\n## Is the bounds-only scan exact? ({results['fine_values']} values per pixel on the first images)\n\n"
            "Gap: (best margin of the bounds-only scan − best margin of the finer scan) / the clean margin "
            "(0: the bounds are exact; the margin is the label's logit minus the best other). The last two columns "
            "look at every pixel, not only each image's best: the share of (image, pixel) pairs whose margin an "
            "inner value lowers below both bounds'.\n\n" + fine +
            "\n## Time on this machine (all images, compilation included)\n\n" + timing
            + f"\nAll models: {_total_seconds(results['timing']):.0f} s of measurement; this invocation: "
            f"{results['elapsed_seconds']:.0f} s (a model resumed from saved chunks keeps the seconds of the run that "
            "computed them).\n")


def _total_seconds(timing):
    keys = ("single_pixel", "min_pixels", "lbfgs", "fast", "fine_scan")
    return sum(t.get(k, 0.0) for t in timing.values() for k in keys)


def single_pixels_figure(images_by_model, class_names):
    """Rows: models; columns: images one pixel flips, every flipping pixel marked (red: set to 1, cyan: to 0)."""
    from matplotlib.figure import Figure

    rows = list(images_by_model.items())
    columns = max(len(v["images"]) for _, v in rows)
    fig = Figure(figsize=(1.6 * columns + 0.6, 1.9 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (name, v) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(v["images"]):
                ax.set_axis_off()
                continue
            ax.imshow(v["images"][c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            up, down = np.nonzero(v["up"][c]), np.nonzero(v["down"][c])
            ax.scatter(up[1], up[0], s=14, facecolors="none", edgecolors="red", linewidths=0.9)
            ax.scatter(down[1], down[0], s=14, facecolors="none", edgecolors="cyan", linewidths=0.9)
            name_of = (lambda k: class_names[k]) if class_names else str
            ax.set_xlabel(f"{name_of(v['label'][c])} → {name_of(v['new'][c])}\n{int(v['up'][c].sum() + v['down'][c].sum())} "
                          "pixel(s)", fontsize=6)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle("Single pixels that change the label (red: set to 1, cyan: set to 0)", fontsize=9)
    return fig


def cosine_figure(per_model):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    lowest = min(float(np.min(o["cosine"][o["lb_success"].astype(bool)], initial=0.0)) for o in per_model.values())
    bins = np.linspace(min(-0.2, np.floor(lowest * 10) / 10), 1.0, 61)
    for name, out in per_model.items():
        ok = out["lb_success"].astype(bool)
        ax.hist(out["cosine"][ok], bins=bins, histtype="step", linewidth=1.3, label=name)
    ax.set_xlabel("cosine between the FGM direction at x and the minimal L-BFGS perturbation r")
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    return fig


def fgm_curve_figure(per_model):
    from matplotlib.figure import Figure

    names = list(per_model)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(3.0 * columns, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        out = per_model[name]
        lb = np.where(out["lb_success"], out["lb_l2"], np.inf)
        ax.plot(CURVE_L2, [np.mean(lb <= t) for t in CURVE_L2], label="minimal L2 (L-BFGS)")
        ax.plot(CURVE_L2, out["fgm_curve"].mean(0), label="one FGM step of L2 ε")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("L2", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    axes[0].set_ylabel("share of images fooled", fontsize=7)
    axes[0].legend(fontsize=6)
    return fig


# -- entry point ------------------------------------------------------------------------------------

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--num-images", type=int_in(1, TEST_SIZE), default=None,
                        help=f"test images per model (default {DEFAULT_NUM_IMAGES}, {QUICK_NUM_IMAGES} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="picks the test images")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--fine-values", type=int_in(3), default=17,
                        help="values per pixel of the finer single-pixel scan, at least 3 (2 is the bounds-only "
                             "scan itself; default 17)")
    parser.add_argument("--fine-images", type=int_in(0), default=None,
                        help="images the finer scan checks (default 100, 20 with --quick)")
    parser.add_argument("--max-pixels", type=int_in(1), default=MAX_PIXELS,
                        help=f"the pixel search gives up after this many (default {MAX_PIXELS})")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    num_images = args.num_images or (QUICK_NUM_IMAGES if args.quick else DEFAULT_NUM_IMAGES)
    fine_images = min(num_images, args.fine_images if args.fine_images is not None else (20 if args.quick else 100))
    workdir = args.workdir
    out_dir = str(output_dir(parser, args, NAME, sweeps=("sparse_and_fast/chunks",)))       # this run's outputs; the chunks are shared
    chunks_dir = os.path.join(workdir, NAME, "chunks")
    start = time.time()

    models = trained_models(list(args.models), args.dataset, workdir, args.data_dir, args.quick)
    test = load_dataset(args.dataset, "test", args.data_dir)
    index = np.sort(np.asarray(jax.random.choice(jax.random.PRNGKey(args.seed), len(test.labels), (num_images,),
                                                 replace=False)))
    images = test.images[index]
    chunk = min(CHUNK, num_images)
    per_model, rows, timing = {}, [], {}
    for name in args.models:
        model, params = models[name]
        logits_fn = logits_function(model.module, params)
        seconds = {"single_pixel": 0.0, "min_pixels": 0.0, "lbfgs": 0.0, "fast": 0.0}
        # The model's own predictions: every search moves each image away from its own.
        labels = np.asarray(jnp.argmax(jax.jit(logits_fn)(images), axis=-1), np.int32)
        tic = time.perf_counter()
        lbfgs = attack_dataset(logits_fn, images, labels,
                               os.path.join(chunks_dir, name, f"lbfgs-n{num_images}-seed{args.seed}"),
                               UNTARGETED, untargeted=True, name=f"{NAME} {name}")
        seconds["lbfgs"] = time.perf_counter() - tic

        def fn(batch, logits_fn=logits_fn, seconds=seconds):
            out, t = measure(logits_fn, jnp.asarray(batch["images"]), jnp.asarray(batch["label"]),
                             jnp.asarray(batch["adversarial"]), jnp.asarray(batch["lb_success"]), args.max_pixels)
            for k, v in t.items():
                seconds[k] += v
            return out

        config = {**function_fingerprint(logits_fn, images[:1]),
                  "attacks_source": attack_source_fingerprint(("sparse.py", "fast.py")),
                  "max_pixels": args.max_pixels, "curve": CURVE_L2.tolist(), "jax": jax.__version__}
        out = run_sweep(fn, {"images": images, "label": labels, "adversarial": lbfgs["adversarial"],
                             "lb_success": lbfgs["success"]},
                        os.path.join(chunks_dir, name, f"n{num_images}-seed{args.seed}"),
                        chunk, config=config, success_key="sp_success", label=f"{NAME} {name}")
        fine = {"fine_margin": np.zeros(0, np.float32), "fine_success": np.zeros(0, bool),
                "fine_pixels_lower": np.zeros(0, np.int32)}
        if fine_images:
            t0 = time.perf_counter()
            fine = run_sweep(lambda b, f=logits_fn: fine_scan(f, jnp.asarray(b["images"]), args.fine_values),
                             {"images": images[:fine_images]},
                             os.path.join(chunks_dir, name, f"fine{args.fine_values}-n{fine_images}-seed{args.seed}"),
                             min(CHUNK, fine_images), config={**config, "fine_values": args.fine_values, "fine_outputs": 2},
                             success_key="fine_success", label=f"{NAME} {name} fine scan")
            seconds["fine_scan"] = time.perf_counter() - t0
        per_model[name], timing[name] = out, seconds
        rows.append(summarize(name, out, fine, args.fine_values, test.labels[index]))
        print(f"{name}: {rows[-1]}", flush=True)

    timing = _carry_timing(os.path.join(out_dir, "results.json"), timing, num_images, args.seed)
    results = {"experiment": NAME, "dataset": args.dataset, "num_images": num_images, "seed": args.seed,
               "quick": args.quick, "test_indices": index.tolist(), "max_pixels": args.max_pixels,
               "fine_values": args.fine_values, "lbfgs_config": repr(UNTARGETED), "rows": rows, "timing": timing,
               "curve_l2": CURVE_L2.tolist(),
               "curves": {n: {"fgm_share": o["fgm_curve"].mean(0).tolist(),
                              "minimal_share": [float(np.mean(np.where(o["lb_success"], o["lb_l2"], np.inf) <= t))
                                                for t in CURVE_L2]} for n, o in per_model.items()},
               "elapsed_seconds": time.time() - start}
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    write_text_atomic(os.path.join(out_dir, "table.md"), table_markdown(results))

    shown = {}
    for name in [n for n in FIGURE_MODELS if n in per_model] or list(per_model)[:3]:
        out = per_model[name]
        pick = np.flatnonzero(out["sp_success"])[:FIGURE_IMAGES]
        if not len(pick):
            continue
        shape = images.shape[1:3]
        flips, up = out["sp_flips"][pick], out["sp_flips_up"][pick]
        shown[name] = {"images": images[pick, :, :, 0], "up": up.reshape((-1,) + shape),
                       "down": (flips & ~up).reshape((-1,) + shape), "label": out["label"][pick],
                       "new": out["sp_new_label"][pick]}
    if shown:
        save_figure_atomic(single_pixels_figure(shown, CLASS_NAMES.get(args.dataset)),
                           os.path.join(out_dir, "single_pixels.png"), dpi=130)
    save_figure_atomic(cosine_figure(per_model), os.path.join(out_dir, "cosines.png"), dpi=120)
    save_figure_atomic(fgm_curve_figure(per_model), os.path.join(out_dir, "fgm_vs_minimal.png"), dpi=120)
    print(table_markdown(results))
    return results


def _carry_timing(path, timing, num_images, seed):
    """A model whose chunks were all resumed took no time now: keep the seconds of the run that computed them."""
    import json

    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return timing
    if old.get("num_images") != num_images or old.get("seed") != seed:
        return timing
    for name, seconds in timing.items():
        previous = old.get("timing", {}).get(name)
        # (the L-BFGS seconds count even when resumed: they include reading its chunks)
        if previous and not any(seconds.get(k) for k in ("single_pixel", "min_pixels", "fast")):
            timing[name] = {**previous, "carried_over": True}
    return timing


if __name__ == "__main__":
    run_main(main)
