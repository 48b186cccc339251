"""Figures 1 and 2 (§3): test images that maximise single units and random directions of φ(x).

    python -m experiments.units [--dataset fashion_mnist] [--num-random 100] [--k 10] [--quick]

For the ConvNet and FC100-100-10, φ is the last hidden layer (ConvNet: the ReLU
after FC100, layer 8; FC100-100-10: the second sigmoid, layer 3) and I is the
test set. Per model:

* figures `natural_<model>.png` and `random_<model>.png`: rows of the k test
  images with the largest ⟨φ(x), v⟩ for a few natural-basis units e_i and a few
  random unit directions v (the paper's Figs. 1 and 2; 4 rows of 10 there);
* a number the paper did not give: how coherent each direction's top-k is, as the
  share of its majority label and the mean pairwise cosine similarity of its
  images in pixel space, for every live unit against as many random directions
  (and against random k-subsets of I, the chance level), with two-sided
  permutation tests of the difference of means.

Writes WORKDIR/units/<run>/results.json, table.md, the grids and coherence.png
(<run>: see `experiments.common.run_name`).
"""
from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import numpy as np

from experiments.common import (ArgumentParser, UsageError, add_common_args, add_models_arg, int_in, markdown_table,
                                models_from_args, output_dir, parse_args, run_main, save_figure_atomic,
                                write_json_atomic, write_text_atomic)
from jaxadv.data import NUM_EXAMPLES, load_dataset
from jaxadv.functional import LastDenseInput, hidden_layers, layer_kind, split_sequential
from jaxadv.plots import image_rows_figure
from jaxadv.units import (
    layer_features, live_units, majority_label_share, mean_pairwise_cosine, natural_basis, permutation_test,
    random_unit_directions, top_k_images)

NAME = "units"
MODELS = ("ConvNet", "FC100-100-10")
FIGURE_ROWS = 4            # the paper's Figs. 1 and 2 have 4 panels
NUM_CHANCE_SUBSETS = 2000
NUM_PERMUTATIONS = 10000
QUICK_TEST_IMAGES = 2000
QUICK_NUM_RANDOM = 20
NUM_CLASSES = 10


def direction_stats(features, images, labels, directions, k):
    """Top-k of each direction with its coherence: indices, majority-label share, pixel-space cosine."""
    top = top_k_images(features, directions, k)
    indices = np.asarray(top.indices)
    return {"indices": indices,
            "majority_share": np.asarray(majority_label_share(labels[indices], NUM_CLASSES)),
            "pixel_cosine": np.asarray(mean_pairwise_cosine(images[indices]))}


def chance_stats(key, images, labels, k, num_subsets):
    """The same statistics for uniformly random k-subsets of I: what no direction at all gives."""
    keys = jax.random.split(key, num_subsets)
    indices = np.stack([np.asarray(jax.random.choice(kk, len(labels), (k,), replace=False)) for kk in keys])
    return {"majority_share": np.asarray(majority_label_share(labels[indices], NUM_CLASSES)),
            "pixel_cosine": np.asarray(mean_pairwise_cosine(images[indices]))}


def summarize(values):
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "n": int(values.size)}


def last_feature_layer(name, model):
    """φ, "the last feature layer" (§1), and a description: a Sequential's last hidden layer, else the input of a
    flax module's last dense layer (the same values for the zoo)."""
    if isinstance(model, nn.Sequential):
        layer = hidden_layers(model)[-1]
        return split_sequential(model, layer)[0], layer, f"layer {layer} ({layer_kind(model.layers[layer])})"
    if isinstance(model, nn.Module):
        return LastDenseInput(model), None, "the input of its last dense layer"
    raise UsageError(f"--models: {name!r} is a plain function; the units need a flax module (its last feature layer)")


def analyse_model(name, model, params, images, labels, key, num_random, k, seed):
    features_fn, layer, where = last_feature_layer(name, model)
    features = layer_features(features_fn, images, params=params)
    dim = features.shape[1]
    live = live_units(features)
    if live.size == 0:
        raise RuntimeError(f"{name}: every unit of {where} is constant on the test images")
    natural = direction_stats(features, images, labels, natural_basis(dim, live), k)
    random_key, chance_key, pick_key = jax.random.split(key, 3)
    random = direction_stats(features, images, labels, random_unit_directions(random_key, num_random, dim), k)
    chance = chance_stats(chance_key, images, labels, k, NUM_CHANCE_SUBSETS)
    tests = {}
    for metric in ("majority_share", "pixel_cosine"):
        diff, p = permutation_test(natural[metric], random[metric], seed=seed, num_permutations=NUM_PERMUTATIONS)
        diff_nc, p_nc = permutation_test(natural[metric], chance[metric], seed=seed, num_permutations=NUM_PERMUTATIONS)
        diff_rc, p_rc = permutation_test(random[metric], chance[metric], seed=seed, num_permutations=NUM_PERMUTATIONS)
        tests[metric] = {"natural_minus_random": diff, "p_natural_vs_random": p,
                         "natural_minus_chance": diff_nc, "p_natural_vs_chance": p_nc,
                         "random_minus_chance": diff_rc, "p_random_vs_chance": p_rc}
    shown_units = np.sort(np.asarray(jax.random.choice(pick_key, live.size, (min(FIGURE_ROWS, live.size),),
                                                       replace=False)))
    return {
        "layer": layer, "where": where, "dim": dim, "live_units": int(live.size),
        "natural": natural, "random": random, "chance": chance, "tests": tests,
        "figure_natural_rows": [int(i) for i in shown_units],      # positions in natural["indices"]
        "figure_units": [int(live[i]) for i in shown_units],
    }


def grid_figure(path, images, rows, row_titles, title):
    """Rows of images (one row per direction), saved atomically as a PNG."""
    save_figure_atomic(image_rows_figure(images, rows, row_titles, title), path, dpi=110)


def coherence_figure(path, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = (("majority_share", "share of the majority label in the top-k"),
               ("pixel_cosine", "mean pairwise cosine (pixels) in the top-k"))
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3 * len(results)), squeeze=False)
    for r, (name, res) in enumerate(results.items()):
        for c, (metric, label) in enumerate(metrics):
            ax = axes[r, c]
            data = [res["natural"][metric], res["random"][metric], res["chance"][metric]]
            ax.boxplot(data, tick_labels=["natural e_i", "random v", "random k-subset"])
            ax.set_title(f"{name}, {res['where']}: {label}", fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


def results_table(results, k):
    headers = ["Model", "φ (layer)", "Directions", "Majority share (mean ± sd)", "Pixel cosine (mean ± sd)"]
    rows = []
    for name, res in results.items():
        for group, label in (("natural", f"natural e_i ({res['live_units']} live units)"),
                             ("random", f"random v ({len(res['random']['majority_share'])})"),
                             ("chance", f"random {k}-subsets of I ({NUM_CHANCE_SUBSETS})")):
            share, cosine = summarize(res[group]["majority_share"]), summarize(res[group]["pixel_cosine"])
            rows.append([name, f"{res['where']}, n={res['dim']}", label,
                         f"{share['mean']:.3f} ± {share['std']:.3f}", f"{cosine['mean']:.3f} ± {cosine['std']:.3f}"])
    test_headers = ["Model", "Metric", "natural − random", "p", "natural − chance", "p", "random − chance", "p"]
    test_rows = [[name, metric, f"{t['natural_minus_random']:+.3f}", f"{t['p_natural_vs_random']:.4f}",
                  f"{t['natural_minus_chance']:+.3f}", f"{t['p_natural_vs_chance']:.4f}",
                  f"{t['random_minus_chance']:+.3f}", f"{t['p_random_vs_chance']:.4f}"]
                 for name, res in results.items() for metric, t in res["tests"].items()]
    return (f"## Coherence of the top-{k} test images per direction\n\n" + markdown_table(headers, rows)
            + f"\n\nTwo-sided permutation tests of the difference of means ({NUM_PERMUTATIONS} permutations; "
            "the smallest reportable p is 1/(permutations+1)):\n\n" + markdown_table(test_headers, test_rows) + "\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--num-random", type=int_in(2), default=None,
                        help=f"random directions per model (default: 100; {QUICK_NUM_RANDOM} with --quick)")
    parser.add_argument("--k", type=int_in(2, NUM_EXAMPLES["test"]), default=10,
                        help="top images per direction (the paper shows 10)")
    parser.add_argument("--seed", type=int, default=0)
    add_models_arg(parser, MODELS)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    num_random = args.num_random if args.num_random is not None else (QUICK_NUM_RANDOM if args.quick else 100)
    if args.quick and args.k > QUICK_TEST_IMAGES:
        parser.error(f"argument --k: must be in [2, {QUICK_TEST_IMAGES}] with --quick (its test images), got {args.k}")

    out_dir = str(output_dir(parser, args, NAME))
    test = load_dataset(args.dataset, "test", args.data_dir)
    images, labels = test.images, test.labels
    if args.quick:
        images, labels = images[:QUICK_TEST_IMAGES], labels[:QUICK_TEST_IMAGES]
    models = models_from_args(parser, args)

    key = jax.random.PRNGKey(args.seed)
    results, record = {}, {}
    for i, (name, (model, params)) in enumerate(models.items()):
        tic = time.perf_counter()
        res = analyse_model(name, model, params, images, labels, jax.random.fold_in(key, i), num_random,
                            args.k, args.seed)
        results[name] = res
        slug = name.replace("(", "").replace(")", "")
        rows_nat = [res["natural"]["indices"][r] for r in res["figure_natural_rows"]]
        grid_figure(os.path.join(out_dir, f"natural_{slug}.png"), images, rows_nat,
                    [f"unit {u}" for u in res["figure_units"]],
                    f"{name}, {res['where']}: top {args.k} test images of single units e_i")
        rows_rand = list(res["random"]["indices"][:FIGURE_ROWS])
        grid_figure(os.path.join(out_dir, f"random_{slug}.png"), images, rows_rand,
                    [f"random v{j}" for j in range(len(rows_rand))],
                    f"{name}, {res['where']}: top {args.k} test images of random directions v")
        record[name] = {
            "layer": res["layer"], "where": res["where"], "dim": res["dim"], "live_units": res["live_units"],
            "figure_units": res["figure_units"], "tests": res["tests"],
            "summary": {g: {m: summarize(res[g][m]) for m in ("majority_share", "pixel_cosine")}
                        for g in ("natural", "random", "chance")},
            "per_direction": {g: {m: res[g][m].tolist() for m in ("majority_share", "pixel_cosine")}
                              for g in ("natural", "random")},
            "figure_top_k_indices": {"natural": [r.tolist() for r in rows_nat],
                                     "random": [r.tolist() for r in rows_rand]},
            "seconds": time.perf_counter() - tic,
        }
    coherence_figure(os.path.join(out_dir, "coherence.png"), results)
    summary = {
        "experiment": NAME, "dataset": args.dataset, "quick": args.quick, "seed": args.seed, "k": args.k,
        "num_test_images": int(len(labels)), "num_random_directions": num_random,
        "num_chance_subsets": NUM_CHANCE_SUBSETS, "num_permutations": NUM_PERMUTATIONS,
        "random_direction_law": "uniform on the unit sphere (normalised standard Gaussian)",
        "natural_directions": "every live unit (activation not constant over I)",
        "models": record}
    write_json_atomic(os.path.join(out_dir, "results.json"), summary)
    table = f"# Units of φ(x) on {args.dataset} ({len(labels)} test images)\n\n" + results_table(results, args.k)
    write_text_atomic(os.path.join(out_dir, "table.md"), table)
    print(table)
    return summary


if __name__ == "__main__":
    run_main(main)
