"""Tables 3 and 4: cross-training-set generalization of adversarial examples (§4.2).

    python -m experiments.table3 [--dataset fashion_mnist] [--num-images 500] [--quick]

Trains FC100-100-10 and FC123-456-10 on P1 and FC100-100-10' on P2 (the two
disjoint halves of the training set) with the same training code as the zoo.

Table 3: each model's error on P1, P2 and the test set, and the average minimal
distortion of its adversarial test images.

Table 4: test images attacked for each model (box-constrained L-BFGS, one random
wrong target per image shared by the three models) and fed to all three; Gaussian
noise of stddev 0.06; the same adversarial sets with every perturbation rescaled
to a per-pixel RMS of 0.1 (our reading of the paper's "amplified to stddev=0.1";
see `jaxadv.transfer.rescale_perturbations`); Gaussian noise of stddev 0.1.
Noise and rescaled images are clipped to [0, 1], and the rescaling is solved so
that the distortion *after* clipping is 0.1. results.json also holds, as extra
rows, the unclipped rescaling and the paper's formula read literally
(x + 0.1·(x'−x)/‖x'−x‖₂, a per-pixel RMS of 0.1/√784).

Writes WORKDIR/table3/<run>/results.json, table.md, heatmap.png and figure5.png
(<run>: see `experiments.common.run_name`).
"""
from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np

from experiments.common import (ArgumentParser, add_attack_args, add_common_args, attack_models, check_attack_args,
                                markdown_table, output_dir, parse_args, percent, run_main)
from experiments.table2 import describe_comparison, heatmap_figure, noise_sets, triplets_figure, write_outputs
from jaxadv.attacks import AttackConfig, select_images
from jaxadv.data import CLASS_NAMES, NUM_EXAMPLES, load_dataset, training_halves
from jaxadv.transfer import (PerturbedSet, error_rate_matrix, rescale_perturbations, transfer_table,
                             transfer_versus_noise)
from jaxadv.zoo import trained_models

NAME = "table3"
DEFAULT_NUM_IMAGES = 1000
QUICK_NUM_IMAGES = 40
AMPLIFIED_RMS = 0.1
NOISE_STDDEVS = (0.06, 0.1)

#: (label in the tables, architecture, training half)
MODELS = (("FC100-100-10", "FC100-100-10", "P1"),
          ("FC123-456-10", "FC123-456-10", "P1"),
          ("FC100-100-10'", "FC100-100-10", "P2"))

PAPER_TABLE3 = {  # error on P1, P2, test; min av distortion
    "FC100-100-10": [0.0, 0.024, 0.02, 0.062],
    "FC123-456-10": [0.0, 0.025, 0.021, 0.059],
    "FC100-100-10'": [0.023, 0.0, 0.021, 0.058],
}
PAPER_TABLE4 = [  # rows: adversarial x3, Gaussian 0.06, amplified x3, Gaussian 0.1
    [1.00, 0.262, 0.059],
    [0.0625, 1.00, 0.051],
    [0.082, 0.082, 1.00],
    [0.022, 0.026, 0.024],
    [1.00, 0.98, 0.43],
    [0.96, 1.00, 0.22],
    [0.27, 0.50, 1.00],
    [0.026, 0.028, 0.027],
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_attack_args(parser, "test images", DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    num_images = check_attack_args(parser, args, DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES, NUM_EXAMPLES["test"],
                                   "the test set")
    workdir = args.workdir
    out_dir = str(output_dir(parser, args, NAME, sweeps=("table3/chunks",)))
    start = time.time()

    train = load_dataset(args.dataset, "train", args.data_dir)
    test = load_dataset(args.dataset, "test", args.data_dir)
    halves = dict(zip(("P1", "P2"), training_halves(train)))
    models = {}
    for label, arch, half in MODELS:
        trained = trained_models([arch], args.dataset, workdir, args.data_dir, args.quick,
                                 train_set=halves[half], tag=half)
        models[label] = next(iter(trained.values()))
    names = [label for label, _, _ in MODELS]
    logits_fns = [functools.partial(models[n][0].apply, models[n][1]) for n in names]

    _, images, labels, targets = select_images(test.images, test.labels, num_images, args.seed)
    noise_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)[2]
    config = AttackConfig()
    run = f"test-n{num_images}-seed{args.seed}-random"
    attacks, timing = attack_models(
        parser, args, dict(zip(names, logits_fns)), images, targets,
        lambda name: os.path.join(workdir, NAME, "chunks", name.replace("'", "_prime"), run), config)

    # Table 3: clean errors on P1, P2, test (full sets) and the minimal distortion.
    baseline = error_rate_matrix(logits_fns, [halves["P1"].images, halves["P2"].images, test.images],
                                 [halves["P1"].labels, halves["P2"].labels, test.labels]).T
    adversarial = [PerturbedSet(images, attacks[n]["adversarial"], labels) for n in names]
    amplified = {
        "clipped": [PerturbedSet(images, rescale_perturbations(images, s.images, AMPLIFIED_RMS), labels)
                    for s in adversarial],
        "unclipped": [PerturbedSet(images, rescale_perturbations(images, s.images, AMPLIFIED_RMS, clip=False),
                                   labels) for s in adversarial],
        "literal": [PerturbedSet(images, rescale_perturbations(images, s.images, AMPLIFIED_RMS / np.sqrt(images[0].size),
                                                               clip=False), labels) for s in adversarial],
    }
    noise_06, noise_10 = noise_sets(noise_key, images, labels, NOISE_STDDEVS)
    sets = adversarial + [noise_06] + amplified["clipped"] + [noise_10]
    table = transfer_table(logits_fns, sets)
    extra = transfer_table(logits_fns, amplified["unclipped"] + amplified["literal"])
    clean = error_rate_matrix(logits_fns, [images], [labels])[0]

    av = table.av_distortion
    row_labels = ([f"Distorted for {n} (av. stddev={av[i]:.3f})" for i, n in enumerate(names)]
                  + [f"Gaussian noise with stddev={NOISE_STDDEVS[0]} (measured {av[3]:.3f})"]
                  + [f"Distorted for {n} amplified to stddev={AMPLIFIED_RMS} (measured {av[4 + i]:.3f})"
                     for i, n in enumerate(names)]
                  + [f"Gaussian noise with stddev={NOISE_STDDEVS[1]} (measured {av[7]:.3f})"])
    extra_labels = ([f"Distorted for {n} amplified to RMS {AMPLIFIED_RMS}, not clipped" for n in names]
                    + [f"Distorted for {n}, paper's formula literally (RMS {AMPLIFIED_RMS}/28)" for n in names])
    results = {
        "experiment": NAME,
        "dataset": args.dataset,
        "source_split": "test",
        "num_images": num_images,
        "seed": args.seed,
        "quick": args.quick,
        "models": {label: {"architecture": arch, "trained_on": half} for label, arch, half in MODELS},
        "table3": {
            "row_labels": names,
            "column_labels": ["error on P1", "error on P2", "error on test", "min av. distortion"],
            "values": [list(baseline[i]) + [float(av[i])] for i in range(len(names))],
            "paper": PAPER_TABLE3,
        },
        "table4": {
            "row_labels": row_labels,
            "column_labels": names,
            "error_rates": table.error_rates.tolist(),
            "av_distortion": av.tolist(),
            "paper": PAPER_TABLE4,
            "amplification": (f"each perturbation x'-x is scaled along its own direction so that, after "
                              f"clipping to [0, 1], its per-pixel RMS is exactly {AMPLIFIED_RMS}"),
            "extra_row_labels": extra_labels,
            "extra_error_rates": extra.error_rates.tolist(),
            "extra_av_distortion": extra.av_distortion.tolist(),
            "transfer_versus_noise": {
                "adversarial vs Gaussian stddev=0.06": transfer_versus_noise(table.error_rates[:3], table.error_rates[3], names),
                "amplified vs Gaussian stddev=0.1": transfer_versus_noise(table.error_rates[4:7], table.error_rates[7], names),
            },
        },
        "clean_error_rates": clean.tolist(),
        "attack_success_rate": {n: float(np.mean(attacks[n]["success"])) for n in names},
        "attack_seconds_this_invocation": {n: t["seconds_this_invocation"] for n, t in timing.items()},
        "attack_config": repr(config),
        "targets": "one uniformly random wrong label per image, shared by all models",
        "noise": {"stddevs": list(NOISE_STDDEVS), "clipped_to_unit_box": True,
                  "measured_av_distortion": [float(av[3]), float(av[7])]},
        "elapsed_seconds": time.time() - start,
    }
    short_rows = names + [f"noise {NOISE_STDDEVS[0]}"] + [f"{n} ×→0.1" for n in names] + [f"noise {NOISE_STDDEVS[1]}"]
    write_outputs(out_dir, results, table_markdown(results),
                  heatmap_figure(table.error_rates, short_rows, names, PAPER_TABLE4,
                                 f"Table 4 on {args.dataset}, {num_images} test images"),
                  triplets_figure(names, logits_fns, images, attacks[names[0]]["adversarial"], labels,
                                  f"Adversarial for {names[0]} ({args.dataset} test images)",
                                  CLASS_NAMES.get(args.dataset)))
    return results


def table_markdown(results) -> str:
    t3, t4 = results["table3"], results["table4"]
    rows3 = []
    for name, values in zip(t3["row_labels"], t3["values"]):
        paper = t3["paper"][name]
        rows3.append([f"{name} (trained on {results['models'][name]['trained_on']})"]
                     + [f"{percent(v, 1)} ({percent(p, 1)})" for v, p in zip(values[:3], paper[:3])]
                     + [f"{values[3]:.3f} ({paper[3]:g})"])
    rows4 = [[label] + [f"{percent(v, 1)} ({percent(p, 1)})" for v, p in zip(rates, paper)]
             for label, rates, paper in zip(t4["row_labels"], t4["error_rates"], t4["paper"])]
    rows_extra = [[label] + [percent(v, 1) for v in rates] + [f"{d:.4f}"]
                  for label, rates, d in zip(t4["extra_row_labels"], t4["extra_error_rates"], t4["extra_av_distortion"])]
    success = ", ".join(f"{n} {percent(s, 1)}" for n, s in results["attack_success_rate"].items())
    quick = ", quick" if results["quick"] else ""
    return (f"# Table 3: cross-training-set models ({results['dataset']}{quick})\n\n"
            "Each cell: this run (the paper's MNIST value). Errors on clean images; distortion over "
            f"{results['num_images']} attacked test images.\n\n"
            + markdown_table(["Model"] + t3["column_labels"], rows3)
            + f"\n\n# Table 4: cross-training-set generalization ({results['num_images']} test images{quick})\n\n"
            + markdown_table([""] + t4["column_labels"], rows4)
            + f"\n\nAttack success (targeted, random wrong label): {success}.\n"
              f"Clean error on these test images: {', '.join(percent(e, 1) for e in results['clean_error_rates'])}.\n"
              f"Amplification: {t4['amplification']}. Gaussian noise is clipped to [0, 1].\n\n"
            + "\n".join(f"- {k}: {describe_comparison(c, 'the noise row')}" for k, c in t4["transfer_versus_noise"].items())
            + "\n\n"
              "Other readings of \"amplified\" (not in the paper's table):\n\n"
            + markdown_table([""] + t4["column_labels"] + ["Av. distortion"], rows_extra) + "\n")


if __name__ == "__main__":
    run_main(main)
