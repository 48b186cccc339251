"""Figures 1 and 2 (§3): test images that maximise single units and random directions of φ(x).

    python -m experiments.units [--dataset fashion_mnist] [--num-random 100] [--k 10] [--quick]

For the ConvNet and FC100-100-10, φ is the last hidden layer (ConvNet: the ReLU
after FC100, layer 8; FC100-100-10: the second sigmoid, layer 4; both count from
0 in the model's nn.Sequential, the flatten included) and I is the test set. Per model:

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

from experiments.common import ArgumentParser, add_common_args, int_in, output_dir, parse_args
from experiments.cli import UsageError, run_main
from jaxadv.report import save_figure_atomic
from experiments.flags import add_models_arg, models_from_args
from jaxadv.data import NUM_EXAMPLES, load_dataset
from jaxadv.functional import LastDenseInput, hidden_layers, layer_kind, split_sequential
from jaxadv.plots import coherence_figure, image_rows_figure
from jaxadv.report import write_outputs
from jaxadv.tables import mean_and_std, units_markdown
from jaxadv.units import direction_coherence, layer_features

NAME = "units"
MODELS = ("ConvNet", "FC100-100-10")
FIGURE_ROWS = 4            # the paper's Figs. 1 and 2 have 4 panels
NUM_CHANCE_SUBSETS = 2000
NUM_PERMUTATIONS = 10000
QUICK_TEST_IMAGES = 2000
QUICK_NUM_RANDOM = 20
NUM_CLASSES = 10


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
    """φ's description and `direction_coherence` of its features on `images`."""
    features_fn, layer, where = last_feature_layer(name, model)
    features = layer_features(features_fn, images, params=params)
    return {"layer": layer, "where": where, **direction_coherence(
        features, images, labels, key, num_random=num_random, k=k, seed=seed, num_classes=NUM_CLASSES,
        num_chance_subsets=NUM_CHANCE_SUBSETS, num_permutations=NUM_PERMUTATIONS, shown_units=FIGURE_ROWS)}


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
        rows_nat = [res["natural"]["indices"][r] for r in res["shown_rows"]]
        rows_rand = list(res["random"]["indices"][:FIGURE_ROWS])
        for kind, rows, titles, of in (("natural", rows_nat, [f"unit {u}" for u in res["shown_units"]], "single units e_i"),
                                       ("random", rows_rand, [f"random v{j}" for j in range(len(rows_rand))],
                                        "random directions v")):
            figure = image_rows_figure(images, rows, titles, f"{name}, {res['where']}: top {args.k} test images of {of}")
            save_figure_atomic(figure, os.path.join(out_dir, f"{kind}_{slug}.png"), dpi=110)
        record[name] = {
            "layer": res["layer"], "where": res["where"], "dim": res["dim"], "live_units": res["live_units"],
            "figure_units": res["shown_units"], "tests": res["tests"],
            "summary": {g: {m: mean_and_std(res[g][m]) for m in ("majority_share", "pixel_cosine")}
                        for g in ("natural", "random", "chance")},
            "per_direction": {g: {m: res[g][m].tolist() for m in ("majority_share", "pixel_cosine")}
                              for g in ("natural", "random")},
            "figure_top_k_indices": {"natural": [r.tolist() for r in rows_nat],
                                     "random": [r.tolist() for r in rows_rand]},
            "seconds": time.perf_counter() - tic,
        }
    summary = {
        "experiment": NAME, "dataset": args.dataset, "quick": args.quick, "seed": args.seed, "k": args.k,
        "num_test_images": int(len(labels)), "num_random_directions": num_random,
        "num_chance_subsets": NUM_CHANCE_SUBSETS, "num_permutations": NUM_PERMUTATIONS,
        "random_direction_law": "uniform on the unit sphere (normalised standard Gaussian)",
        "natural_directions": "every live unit (activation not constant over I)",
        "models": record}
    table = (f"# Units of φ(x) on {args.dataset} ({len(labels)} test images)\n\n"
             + units_markdown(results, args.k, NUM_CHANCE_SUBSETS, NUM_PERMUTATIONS))
    write_outputs(out_dir, summary, table, {"coherence.png": coherence_figure(results)})
    return summary


if __name__ == "__main__":
    run_main(main)
