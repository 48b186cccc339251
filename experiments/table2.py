"""Table 2: cross-model generalization of adversarial examples (§4.2).

    python -m experiments.table2 [--dataset fashion_mnist] [--num-images 500] [--quick]

For each model of the zoo, the same training images are attacked (box-constrained
L-BFGS, minimal distortion, one random wrong target per image shared by all
models) to make that model's adversarial set. Every zoo model is then fed every
set, and two Gaussian-noise controls (stddev 0.1 and 0.3, clipped to [0, 1]).
Entry [set, model] is the fraction of the set the model does not classify as the
image's true label; the last column is the set's average per-pixel RMS distortion.

Writes WORKDIR/table2/<run>/results.json, table.md, heatmap.png and figure5.png (the
paper's Fig. 5 layout for a few images, captioned with every model's label).
The attack is table1's (sharded over devices, saved chunk by chunk, resumed if
interrupted) and its chunks live in table1's folder
WORKDIR/table1/chunks/<model>/train-n<N>-seed<S>-random/: for the same
--num-images and --seed, Tables 1 and 2 attack the same images toward the same
targets, so whichever runs second reuses the other's attacks.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from experiments.common import ArgumentParser, add_common_args, output_dir, parse_args
from experiments.cli import run_main
from experiments.flags import add_attack_args, add_models_arg, attack_models, check_attack_args, models_from_args
from jaxadv import logits_function
from jaxadv.attacks import AttackConfig
from jaxadv.attacks.dataset import select_images
from jaxadv.data import CLASS_NAMES, NUM_EXAMPLES, load_dataset
from jaxadv.models import ZOO
from jaxadv.paper import TABLE2_AV_DISTORTION, TABLE2_ERROR_RATES
from jaxadv.plots import error_rate_heatmap_figure, transfer_triplets_figure
from jaxadv.report import write_outputs
from jaxadv.tables import table2_markdown
from jaxadv.transfer import PerturbedSet, error_rate_matrix, gaussian_noise_sets, transfer_table, transfer_versus_noise

NAME = "table2"
NOISE_STDDEVS = (0.1, 0.3)
DEFAULT_NUM_IMAGES = 1000  # table1's default: the same seed and N attack the same images, and the attacks are shared
QUICK_NUM_IMAGES = 40
FIGURE_IMAGES = 4



def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_attack_args(parser, "training images", DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES)
    add_models_arg(parser, ZOO)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    num_images = check_attack_args(parser, args, DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES, NUM_EXAMPLES["train"],
                                   "the training set")
    out_dir = str(output_dir(parser, args, NAME, sweeps=("table1/chunks",)))
    start = time.time()

    models = models_from_args(parser, args)
    train = load_dataset(args.dataset, "train", args.data_dir)
    _, images, labels, targets = select_images(train.images, train.labels, num_images, args.seed)
    noise_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)[2]

    names = list(models)
    logits_fns = [logits_function(model, params) for model, params in models.values()]
    config = AttackConfig()
    # table1's chunk folder for the same split, N, seed and targets: whichever runs first attacks, the other resumes.
    run = f"train-n{num_images}-seed{args.seed}-random"
    attacks, timing = attack_models(parser, args, dict(zip(names, logits_fns)), images, targets,
                                    lambda name: os.path.join(args.workdir, "table1", "chunks", name, run), config)

    sets = [PerturbedSet(images, attacks[n]["adversarial"], labels) for n in names]
    sets += gaussian_noise_sets(noise_key, images, labels, NOISE_STDDEVS)
    table = transfer_table(logits_fns, sets)
    clean = error_rate_matrix(logits_fns, [images], [labels])[0]

    row_labels = names + [f"Gaussian noise, stddev={s}" for s in NOISE_STDDEVS]
    diagonal = np.diag(table.error_rates[:len(names)])
    off_diagonal = table.error_rates[:len(names)][~np.eye(len(names), dtype=bool)].reshape(len(names), -1)
    results = {
        "experiment": NAME, "dataset": args.dataset, "source_split": "train", "num_images": num_images,
        "seed": args.seed, "quick": args.quick, "row_labels": row_labels, "column_labels": names,
        "error_rates": table.error_rates.tolist(),
        "av_distortion": table.av_distortion.tolist(),
        "clean_error_rates": clean.tolist(),
        "attack_success_rate": {n: float(np.mean(attacks[n]["success"])) for n in names},
        "attack_seconds_this_invocation": {n: t["seconds_this_invocation"] for n, t in timing.items()},
        "attack_config": repr(config),
        "targets": "one uniformly random wrong label per image, shared by all models",
        "noise": {"stddevs": list(NOISE_STDDEVS), "clipped_to_unit_box": True,
                  "measured_av_distortion": table.av_distortion[len(names):].tolist()},
        "diagonal": diagonal.tolist(),
        "mean_off_diagonal_by_row": off_diagonal.mean(axis=1).tolist() if len(names) > 1 else None,
        "transfer_versus_noise": {
            f"stddev={s}": transfer_versus_noise(table.error_rates[:len(names)], table.error_rates[len(names) + k], names)
            for k, s in enumerate(NOISE_STDDEVS)},
        # The paper's figures stand beside the zoo's only: other models have no paper values.
        "paper": ({"dataset": "mnist", "error_rates": TABLE2_ERROR_RATES, "av_distortion": TABLE2_AV_DISTORTION}
                  if names == list(ZOO) else None),
        "elapsed_seconds": time.time() - start,
    }
    shown = "FC100-100-10" if "FC100-100-10" in names else names[0]
    heatmap = error_rate_heatmap_figure(table.error_rates, row_labels, names, TABLE2_ERROR_RATES if results["paper"]
                                        else None, f"Table 2 on {args.dataset}, {num_images} training images")
    figure5 = transfer_triplets_figure(names, logits_fns, images, attacks[shown]["adversarial"], labels,
                                       f"Adversarial for {shown} ({args.dataset} training images)",
                                       CLASS_NAMES.get(args.dataset), FIGURE_IMAGES)
    write_outputs(out_dir, results, table2_markdown(results), {"heatmap.png": heatmap, "figure5.png": figure5})
    return results


if __name__ == "__main__":
    run_main(main)
