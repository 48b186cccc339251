"""Single pixels, and are blind spots fast-gradient steps? (the summary's two open questions)

    python -m experiments.sparse_and_fast [--dataset fashion_mnist] [--num-images 1000] [--quick]
                                          [--models ...] [--fine-values 17] [--fine-images 250]

For each Table 1 model and the ConvNet, on N test images (a seeded sorted subset), each moved away from the
model's own prediction (`jaxadv.blind_spots.measure_blind_spots`): the share one pixel set to 0 or 1 flips
(checked against a finer scan of `--fine-values` values per pixel on the first `--fine-images` images); the
fewest pixels (greedy; exact at 1); the untargeted minimal-L2 perturbation r (`attack_dataset(...,
untargeted=True)`), and against it one FGM step at ε = ‖r‖₂ and one FGSM step at ε = ‖r‖∞, the cosine between
the FGM direction and r, the step each needs (`minimal_fast_gradient`), and the share one FGM step fools at
each L2 of a grid beside the share whose minimal L2 is below it.

Per-image results are saved chunk by chunk under WORKDIR/sparse_and_fast/chunks/<model>/ (the L-BFGS attack's
in lbfgs-n<N>-seed<S>/; a rerun resumes). Writes results.json, table.md, single_pixels.png, cosines.png and
fgm_vs_minimal.png under WORKDIR/sparse_and_fast/<run>/.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import ArgumentParser, add_common_args, int_in, output_dir, parse_args
from experiments.cli import run_main
from jaxadv.report import save_figure_atomic
from jaxadv import logits_function
from jaxadv.attacks import attack_dataset
from jaxadv.attacks.dataset import attack_source_fingerprint
from jaxadv.attacks.config import UNTARGETED
from jaxadv.blind_spots import blind_spot_summary, fine_single_pixel_scan, measure_blind_spots
from jaxadv.data import CLASS_NAMES, NUM_EXAMPLES, load_dataset
from jaxadv.models import ZOO
from jaxadv.plots import cosine_figure, fgm_curve_figure, single_pixel_examples, single_pixels_figure
from jaxadv.report import carry_over_timing, write_outputs
from jaxadv.sweep import function_fingerprint, run_sweep
from jaxadv.tables import sparse_and_fast_markdown
from jaxadv.zoo import trained_models

NAME = "sparse_and_fast"
MODELS = ZOO + ("ConvNet",)
KIND = {"FC10(1e-4)": "softmax (linear)", "FC10(1e-2)": "softmax (linear)", "FC10(1)": "softmax (linear)",
        "FC100-100-10": "sigmoid net", "FC200-200-10": "sigmoid net", "AE400-10": "sigmoid features + softmax",
        "ConvNet": "ReLU convnet"}
DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES = 1000, 40
CHUNK, MAX_PIXELS = 250, 300          # images per saved chunk; the pixel search gives up after MAX_PIXELS
CURVE_L2 = np.geomspace(0.05, 12.0, 48).astype(np.float32)    # ‖r‖₂ of one FGM step (the x axis)
FIGURE_MODELS = ("FC10(1e-4)", "FC100-100-10", "ConvNet")
FIGURE_IMAGES = 6


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--num-images", type=int_in(1, NUM_EXAMPLES["test"]), default=None,
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


def measure_model(name, logits_fn, images, args, fine_images, chunks_dir):
    """One model's per-image outputs, its finer single-pixel scan and the seconds each part took, each saved
    chunk by chunk under `chunks_dir`; every search moves each image away from the model's own prediction."""
    seconds = {"single_pixel": 0.0, "min_pixels": 0.0, "lbfgs": 0.0, "fast": 0.0}
    labels = np.asarray(jnp.argmax(jax.jit(logits_fn)(images), axis=-1), np.int32)
    tic = time.perf_counter()
    lbfgs = attack_dataset(logits_fn, images, labels, os.path.join(chunks_dir, f"lbfgs-n{len(images)}-seed{args.seed}"),
                           UNTARGETED, untargeted=True, name=f"{NAME} {name}")
    seconds["lbfgs"] = time.perf_counter() - tic

    def fn(batch):
        out, t = measure_blind_spots(logits_fn, jnp.asarray(batch["images"]), jnp.asarray(batch["label"]),
                                     jnp.asarray(batch["adversarial"]), jnp.asarray(batch["lb_success"]),
                                     args.max_pixels, CURVE_L2)
        for k, v in t.items():
            seconds[k] += v
        return out

    config = {**function_fingerprint(logits_fn, images[:1]),
              "attacks_source": attack_source_fingerprint(("sparse.py", "fast.py")),
              "max_pixels": args.max_pixels, "curve": CURVE_L2.tolist(), "jax": jax.__version__}
    out = run_sweep(fn, {"images": images, "label": labels, "adversarial": lbfgs["adversarial"],
                         "lb_success": lbfgs["success"]}, os.path.join(chunks_dir, f"n{len(images)}-seed{args.seed}"),
                    min(CHUNK, len(images)), config=config, success_key="sp_success", description=f"{NAME} {name}")
    fine = {"fine_margin": np.zeros(0, np.float32), "fine_success": np.zeros(0, bool),
            "fine_pixels_lower": np.zeros(0, np.int32)}
    if fine_images:
        t0 = time.perf_counter()
        fine = run_sweep(lambda b: fine_single_pixel_scan(logits_fn, jnp.asarray(b["images"]), args.fine_values),
                         {"images": images[:fine_images]},
                         os.path.join(chunks_dir, f"fine{args.fine_values}-n{fine_images}-seed{args.seed}"),
                         min(CHUNK, fine_images), config={**config, "fine_values": args.fine_values, "fine_outputs": 2},
                         success_key="fine_success", description=f"{NAME} {name} fine scan")
        seconds["fine_scan"] = time.perf_counter() - t0
    return out, fine, seconds


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    num_images = args.num_images or (QUICK_NUM_IMAGES if args.quick else DEFAULT_NUM_IMAGES)
    fine_images = min(num_images, args.fine_images if args.fine_images is not None else (20 if args.quick else 100))
    out_dir = str(output_dir(parser, args, NAME, sweeps=("sparse_and_fast/chunks",)))   # the chunks are shared
    start = time.time()

    models = trained_models(list(args.models), args.dataset, args.workdir, args.data_dir, args.quick)
    test = load_dataset(args.dataset, "test", args.data_dir)
    index = np.sort(np.asarray(jax.random.choice(jax.random.PRNGKey(args.seed), len(test.labels), (num_images,),
                                                 replace=False)))
    images = test.images[index]
    per_model, rows, timing = {}, [], {}
    for name in args.models:
        zoo_model, params = models[name]
        out, fine, seconds = measure_model(name, logits_function(zoo_model.module, params), images, args,
                                           fine_images, os.path.join(args.workdir, NAME, "chunks", name))
        per_model[name], timing[name] = out, seconds
        rows.append(blind_spot_summary(name, KIND.get(name, ""), out, fine, args.fine_values, test.labels[index]))
        print(f"{name}: {rows[-1]}", flush=True)

    # (the L-BFGS seconds count even when resumed: they include reading its chunks)
    timing = carry_over_timing(os.path.join(out_dir, "results.json"), timing, {"num_images": num_images, "seed": args.seed},
                               ("single_pixel", "min_pixels", "fast"))
    results = {"experiment": NAME, "dataset": args.dataset, "num_images": num_images, "seed": args.seed,
               "quick": args.quick, "test_indices": index.tolist(), "max_pixels": args.max_pixels,
               "fine_values": args.fine_values, "lbfgs_config": repr(UNTARGETED), "rows": rows, "timing": timing,
               "curve_l2": CURVE_L2.tolist(),
               "curves": {n: {"fgm_share": o["fgm_curve"].mean(0).tolist(),
                              "minimal_share": [float(np.mean(np.where(o["lb_success"], o["lb_l2"], np.inf) <= t))
                                                for t in CURVE_L2]} for n, o in per_model.items()},
               "elapsed_seconds": time.time() - start}
    names = [n for n in FIGURE_MODELS if n in per_model] or list(per_model)[:3]
    shown = single_pixel_examples(per_model, images, names, FIGURE_IMAGES)
    write_outputs(out_dir, results, sparse_and_fast_markdown(results), {})
    if shown:
        save_figure_atomic(single_pixels_figure(shown, CLASS_NAMES.get(args.dataset)),
                           os.path.join(out_dir, "single_pixels.png"), dpi=130)
    save_figure_atomic(cosine_figure(per_model), os.path.join(out_dir, "cosines.png"), dpi=120)
    save_figure_atomic(fgm_curve_figure(per_model, CURVE_L2), os.path.join(out_dir, "fgm_vs_minimal.png"), dpi=120)
    return results


if __name__ == "__main__":
    run_main(main)
