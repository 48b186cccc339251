"""Table 1: the zoo's training and test errors and the average minimal distortion (§4.2).

    python -m experiments.table1 [--dataset fashion_mnist] [--num-images 1000] [--split train]
                                 [--targets random] [--chunk-size C] [--block-size B] [--quick]

For each model of Table 1 (trained first if WORKDIR/models/<name>/ is missing):
its error on the training and test sets, and the box-constrained L-BFGS attack
(default `AttackConfig`) on N images of `--split` (the paper attacked training
images), one target label per image. The attack is `jaxadv.attacks.attack_dataset`:
sharded over every device JAX sees, in chunks saved under
WORKDIR/table1/chunks/<model>/<run>/, so an interrupted run resumes where it stopped. "Av. min. distortion" is the mean per-pixel RMS
distortion sqrt(Σ(x'−x)²/n) of the successful adversarial examples; the
success rate is reported beside it.

Writes WORKDIR/table1/<run>/results.json (list `rows`), table.md (the paper's
MNIST values beside ours) and figure7.png (the paper's Fig. 7 layout); <run>
names the options that change the results ("default" for none; see
`experiments.common.run_name`).
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from experiments.common import (ArgumentParser, add_attack_args, add_common_args, add_models_arg, attack_models,
                                check_attack_args, fixed, markdown_table, models_from_args, output_dir, parse_args,
                                percent, run_main, save_figure_atomic, write_json_atomic, write_text_atomic)
from jaxadv import logits_function
from jaxadv.attacks import AttackConfig, runner_up_targets, select_images
from jaxadv.data import CLASS_NAMES, NUM_EXAMPLES, load_dataset
from jaxadv.models import ZOO
from jaxadv.plots import DistortionPanel, distortion_grid_figure
from jaxadv.train import error_rate
from jaxadv.transfer import gaussian_noise

NAME = "table1"
DEFAULT_NUM_IMAGES = 1000
QUICK_NUM_IMAGES = 40
FIGURE_IMAGES = 8
FIGURE_NOISE_STDDEV = 1.0  # the paper's Fig. 7(c) control

# The paper's Table 1 (MNIST): training error, test error, av. min. distortion.
PAPER = {
    "FC10(1e-4)": (0.067, 0.074, 0.062),
    "FC10(1e-2)": (0.10, 0.094, 0.1),
    "FC10(1)": (0.212, 0.20, 0.14),
    "FC100-100-10": (0.0, 0.0164, 0.058),
    "FC200-200-10": (0.0, 0.0154, 0.065),
    "AE400-10": (0.0057, 0.019, 0.086),
}


def predict(model, params, images, batch_size=2000):
    apply = jax.jit(logits_function(model, params))
    return np.concatenate([np.argmax(np.asarray(apply(images[i:i + batch_size])), axis=-1)
                           for i in range(0, len(images), batch_size)])


def summarize(name, attack, labels, targets, adversarial_predictions, train_err, test_err):
    success = np.asarray(attack["success"], bool)
    distortion = np.asarray(attack["distortion"], np.float64)
    ok = distortion[success]
    # The c search's own result (the paper's method, before the boundary refinement), over its successes.
    search = np.asarray(attack["search_distortion"], np.float64)
    search = search[np.isfinite(search)]
    return {
        "model": name,
        "train_error": train_err,
        "test_error": test_err,
        "av_min_distortion": float(ok.mean()) if ok.size else None,
        "median_min_distortion": float(np.median(ok)) if ok.size else None,
        "paper_method_av_distortion": float(search.mean()) if search.size else None,
        "success_rate": float(success.mean()),
        "num_images": int(len(labels)),
        # The paper's definition: accuracy on the adversarial set should reach 0%.
        "adversarial_accuracy": float(np.mean(adversarial_predictions == labels)),
        "reached_target_rate": float(np.mean(adversarial_predictions == targets)),
        "mean_iterations": float(np.mean(attack["iterations"])) if "iterations" in attack else None,
        "paper_train_error": PAPER[name][0] if name in PAPER else None,
        "paper_test_error": PAPER[name][1] if name in PAPER else None,
        "paper_av_min_distortion": PAPER[name][2] if name in PAPER else None,
    }


# -- outputs --------------------------------------------------------------------------------------

def table_markdown(results) -> str:
    headers = ["Model", "Training error", "Test error", "Av. distortion, paper's method", "Av. min. distortion",
               "Success rate", "Adv. accuracy", "Images"]
    rows = [[r["model"], f"{percent(r['train_error'])} ({percent(r['paper_train_error'])})",
             f"{percent(r['test_error'])} ({percent(r['paper_test_error'])})",
             f"{fixed(r.get('paper_method_av_distortion'))} ({fixed(r['paper_av_min_distortion'])})",
             fixed(r["av_min_distortion"]),
             percent(r["success_rate"]), percent(r["adversarial_accuracy"]), str(r["num_images"])]
            for r in results["rows"]]
    return (f"# Table 1 ({results['dataset']}{', quick' if results['quick'] else ''})\n\n"
            f"Each cell: this run (the paper's MNIST value). Attack: {results['num_images']} {results['split']} "
            f"images per model, targets: {results['targets']}.\n"
            "Distortions: mean per-pixel RMS sqrt(Σ(x'−x)²/784) over the successful attacks: the paper's "
            "method (the c search alone; the paper's value beside it) and the minimum after the refinement "
            "to the nearest boundary point; "
            "Adv. accuracy: fraction of adversarial images still classified as the true label.\n\n"
            + markdown_table(headers, rows) + "\n")


def figure7(models, chosen, images, labels, attacks, noise_key, class_names=None):
    """Fig. 7: panels of originals / adversarials / differences for two models, then Gaussian noise."""
    shown = slice(0, min(FIGURE_IMAGES, len(labels)))
    x, y = images[shown], labels[shown]

    def name_of(k):
        return class_names[k] if class_names else str(k)

    def captions(predicted):   # the predicted label, and the true one where they differ
        return [name_of(p) if p == t else f"{name_of(p)} (true {name_of(t)})" for p, t in zip(predicted, y)]

    panels = []
    for letter, name in zip("abcdefgh", chosen):
        model, params = models[name]
        adversarial = np.asarray(attacks[name]["adversarial"][shown])
        before, after = predict(model, params, x), predict(model, params, adversarial)
        rms = np.sqrt(np.mean((adversarial - x) ** 2))
        panels.append(DistortionPanel(
            f"({letter}) adversarial for {name}: RMS {rms:.3f}, accuracy {np.mean(after == y):.0%}",
            x, adversarial, captions(before), captions(after)))
    model, params = models[chosen[-1]]
    noisy = np.asarray(gaussian_noise(noise_key, x, FIGURE_NOISE_STDDEV))
    before, after = predict(model, params, x), predict(model, params, noisy)
    panels.append(DistortionPanel(
        f"({'abcdefgh'[len(chosen)]}) Gaussian noise, stddev {FIGURE_NOISE_STDDEV:g} (clipped): "
        f"{chosen[-1]} accuracy {np.mean(after == y):.0%}",
        x, noisy, captions(before), captions(after)))
    return distortion_grid_figure(panels)


# -- entry point -------------------------------------------------------------------------------------

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_attack_args(parser, "images", DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES)
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="images to attack (the paper used the training set)")
    parser.add_argument("--targets", choices=("random", "runner-up"), default="random",
                        help="random: one seeded uniformly random wrong label per image, shared by all models; "
                             "runner-up: each model's second most likely class")
    add_models_arg(parser, ZOO)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    num_images = check_attack_args(parser, args, DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES, NUM_EXAMPLES[args.split],
                                   f"the {args.split} set")
    out_dir = str(output_dir(parser, args, NAME, sweeps=("table1/chunks",)))
    start = time.time()

    models = models_from_args(parser, args)
    train = load_dataset(args.dataset, "train", args.data_dir)
    test = load_dataset(args.dataset, "test", args.data_dir)
    source = train if args.split == "train" else test
    _, images, labels, random_targets = select_images(source.images, source.labels, num_images, args.seed)
    logits_fns = {name: logits_function(model, params) for name, (model, params) in models.items()}
    if args.targets == "random":
        targets = random_targets
    else:
        targets = {name: np.asarray(runner_up_targets(jax.jit(fn)(images)), dtype=np.int32)
                   for name, fn in logits_fns.items()}
    config = AttackConfig()
    run = f"{args.split}-n{num_images}-seed{args.seed}-{args.targets}"
    attacks, timing = attack_models(parser, args, logits_fns, images, targets,
                                    lambda name: os.path.join(args.workdir, NAME, "chunks", name, run), config)

    rows = []
    for name, (model, params) in models.items():
        adversarial_predictions = predict(model, params, attacks[name]["adversarial"])
        rows.append(summarize(name, attacks[name], labels, targets[name] if isinstance(targets, dict) else targets,
                              adversarial_predictions, error_rate(model, params, train.images, train.labels),
                              error_rate(model, params, test.images, test.labels)))

    results = {
        "experiment": NAME,
        "dataset": args.dataset,
        "split": args.split,
        "num_images": num_images,
        "seed": args.seed,
        "quick": args.quick,
        "targets": ("one uniformly random wrong label per image (seeded), shared by all models"
                    if args.targets == "random" else "each model's runner-up class"),
        "attack_config": repr(config._replace(lanes=timing[list(models)[-1]]["lanes"])),
        "num_devices": len(jax.devices()),
        "rows": rows,
        "timing": timing,
        "paper": {"dataset": "mnist", **{n: dict(zip(("train_error", "test_error", "av_min_distortion"), v))
                                         for n, v in PAPER.items()}},
        "elapsed_seconds": time.time() - start,
    }
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    write_text_atomic(os.path.join(out_dir, "table.md"), table_markdown(results))
    chosen = [n for n in ("FC10(1e-4)", "FC200-200-10") if n in models] or list(models)[:2]
    save_figure_atomic(figure7(models, chosen, images, labels, attacks, jax.random.fold_in(jax.random.PRNGKey(args.seed), 7),
                               class_names=CLASS_NAMES.get(args.dataset)),
                       os.path.join(out_dir, "figure7.png"), dpi=110)
    print(table_markdown(results))
    return results


if __name__ == "__main__":
    run_main(main)
