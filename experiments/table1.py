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

from experiments.common import ArgumentParser, add_common_args, output_dir, parse_args
from experiments.cli import run_main
from jaxadv.report import save_figure_atomic
from experiments.flags import add_attack_args, add_models_arg, attack_models, check_attack_args, models_from_args
from jaxadv import logits_function
from jaxadv.attacks import AttackConfig, runner_up_targets
from jaxadv.attacks.dataset import select_images
from jaxadv.data import CLASS_NAMES, NUM_EXAMPLES, load_dataset
from jaxadv.metrics import attack_summary
from jaxadv.paper import TABLE1
from jaxadv.models import ZOO
from jaxadv.plots import adversarial_and_noise_figure
from jaxadv.report import write_outputs
from jaxadv.tables import table1_markdown
from jaxadv.train import error_rate

NAME = "table1"
DEFAULT_NUM_IMAGES = 1000
QUICK_NUM_IMAGES = 40
FIGURE_IMAGES = 8
FIGURE_NOISE_STDDEV = 1.0  # the paper's Fig. 7(c) control



def predict(model, params, images, batch_size=2000):
    apply = jax.jit(logits_function(model, params))
    return np.concatenate([np.argmax(np.asarray(apply(images[i:i + batch_size])), axis=-1)
                           for i in range(0, len(images), batch_size)])


def summarize(name, attack, labels, targets, adversarial_predictions, train_err, test_err):
    paper = dict(zip(("paper_train_error", "paper_test_error", "paper_av_min_distortion"), TABLE1.get(name, (None,) * 3)))
    return {"model": name, "train_error": train_err, "test_error": test_err,
            **attack_summary(attack, labels, targets, adversarial_predictions), **paper}


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
                                         for n, v in TABLE1.items()}},
        "elapsed_seconds": time.time() - start,
    }
    chosen = [n for n in ("FC10(1e-4)", "FC200-200-10") if n in models] or list(models)[:2]
    figure7 = adversarial_and_noise_figure(logits_fns, chosen, images, labels,
                                           {name: attacks[name]["adversarial"] for name in chosen},
                                           jax.random.fold_in(jax.random.PRNGKey(args.seed), 7), FIGURE_NOISE_STDDEV,
                                           FIGURE_IMAGES, CLASS_NAMES.get(args.dataset))
    write_outputs(out_dir, results, table1_markdown(results), {})
    save_figure_atomic(figure7, os.path.join(out_dir, "figure7.png"), dpi=110)
    return results


if __name__ == "__main__":
    run_main(main)
