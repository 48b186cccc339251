"""Table 5: upper Lipschitz bounds per layer (§4.3), and how loose they are.

    python -m experiments.table5 [--dataset fashion_mnist] [--num-images 100] [--quick] [--alexnet-only]

Every bound is read from the network's jaxpr (`jaxadv.lipschitz.operator_bounds`),
so any pure logits function works; nothing here walks a layer list.

1. An AlexNet-shaped flax network with the paper's layer sizes and strides, at
   a stated random initialisation (the authors' weights are not public): every
   layer's bound (Fourier method for convolutions, exact top singular value
   for dense layers) beside a power-iteration estimate on the real layer.
2. The same for every trained zoo model and the MNIST convnet.
3. Beyond the paper: per test image, the L2 radius that the global bound
   certifies (top-two logit margin / (√2 · Π_k L_k)), the tighter radius of
   the per-pair bounds (min over classes j of (z_y − z_j) / (‖w_y − w_j‖ ·
   Π_{k below the last layer} L_k)), the radius linear bound propagation
   proves (`jaxadv.certify.certified_radius`, CROWN on the L2 ball ∩ box), and
   the smallest L2 perturbation the untargeted L-BFGS attack finds; their
   ratios say how loose the bounds are, and CROWN's with the attack's
   sandwich the true minimum per image.

Writes WORKDIR/table5/<run>/results.json, table.md, radius_scatter.png and sandwich.png
(<run>: see `experiments.common.run_name`). The attacks are saved chunk by
chunk under WORKDIR/table5/attacks/<model>/.
"""
from __future__ import annotations

import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import run_main, significant
from jaxadv import lipschitz
from jaxadv.models import ZOO

NAME = "table5"
ALEXNET_INPUT = (227, 227, 3)   # 227 with VALID conv1 gives the 55-27-13-6 maps and 9216 = 6·6·256 features
ALEXNET_SEED = 0
DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES = 100, 10
DEFAULT_POWER_ITERATIONS, QUICK_POWER_ITERATIONS = 100, 20
SPECTRAL_MODELS = ZOO + ("ConvNet",)
#: Bounded but not attacked for the radius comparison (the ConvNet's attack is the slowest of the zoo's).
NOT_ATTACKED = ("ConvNet",)
NUM_CLASSES = 10

# The paper's Table 5 (its own AlexNet weights): layer -> (size, stride, upper bound).
PAPER_TABLE5 = {
    "Conv. 1": ("3 × 11 × 11 × 96", 4, 2.75),
    "Conv. 2": ("96 × 5 × 5 × 256", 1, 10.0),
    "Conv. 3": ("256 × 3 × 3 × 384", 1, 7.0),
    "Conv. 4": ("384 × 3 × 3 × 384", 1, 7.5),
    "Conv. 5": ("384 × 3 × 3 × 256", 1, 11.0),
    "FC. 1": ("9216 × 4096", None, 3.12),
    "FC. 2": ("4096 × 4096", None, 4.0),
    "FC. 3": ("4096 × 1000", None, 4.0),
}


class AlexNetShaped(nn.Module):
    """Single-tower AlexNet (Krizhevsky et al. 2012) on 227×227×3, as in Table 5's sizes.

    Local response normalisation is left out, as before the port to flax: the
    paper's Table 5 lists only the convolutional and dense layers.
    """
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x):
        pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2))
        x = pool(nn.relu(nn.Conv(96, (11, 11), strides=4, padding="VALID", name="conv1")(x)))
        x = pool(nn.relu(nn.Conv(256, (5, 5), padding="SAME", name="conv2")(x)))
        x = nn.relu(nn.Conv(384, (3, 3), padding="SAME", name="conv3")(x))
        x = nn.relu(nn.Conv(384, (3, 3), padding="SAME", name="conv4")(x))
        x = pool(nn.relu(nn.Conv(256, (3, 3), padding="SAME", name="conv5")(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(4096, name="fc1")(x))
        x = nn.relu(nn.Dense(4096, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


# Where each weighted layer sat in the 19-layer list the AlexNet-shaped net was drawn from before
# the port to flax (conv, relu, pool, conv, relu, pool, conv, relu, conv, relu, conv, relu, pool,
# flatten, dense, relu, dense, relu, dense): its weights came from key i of
# jax.random.split(PRNGKey(seed), 19), so the same draw keeps Table 5's bounds comparable.
ALEXNET_LAYER_INDEX = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10, "fc1": 14, "fc2": 16, "fc3": 18}
ALEXNET_NUM_LAYERS = 19


def alexnet_variables(seed: int = ALEXNET_SEED) -> dict:
    """`AlexNetShaped`'s variables: Glorot-uniform kernels, zero biases, the draw Table 5 always used."""
    shapes = jax.eval_shape(AlexNetShaped().init, jax.random.PRNGKey(0), jnp.zeros((1, *ALEXNET_INPUT)))["params"]
    keys = jax.random.split(jax.random.PRNGKey(seed), ALEXNET_NUM_LAYERS)
    glorot = jax.nn.initializers.glorot_uniform()
    return {"params": {name: {"kernel": glorot(keys[ALEXNET_LAYER_INDEX[name]], layer["kernel"].shape, jnp.float32),
                              "bias": jnp.zeros(layer["bias"].shape, jnp.float32)}
                       for name, layer in shapes.items()}}


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
    from jaxadv.attacks import attack_dataset

    logits = jax.jit(logits_fn)(jnp.asarray(images))
    predicted = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
    attack = attack_dataset(logits_fn, images, predicted, directory, config, untargeted=True,
                            name=f"radius {name}", **sizes)
    from jaxadv.certify import certified_radius

    adversarial_class = np.asarray(jnp.argmax(jax.jit(logits_fn)(attack["adversarial"]), axis=-1), np.int32)
    attained = jax.jit(lambda a, x: jnp.sqrt(jnp.sum((a - x) ** 2, axis=(1, 2, 3))))(attack["adversarial"], images)
    return {"predicted": predicted, "success": attack["success"] & (adversarial_class != predicted),
            "attained": np.asarray(attained), "adversarial_class": adversarial_class,
            "certified": np.asarray(bounds.certified_radius(logits)),
            "certified_pairwise": np.asarray(bounds.pairwise_certified_radius(logits)),
            "certified_crown": np.asarray(certified_radius(logits_fn, jnp.asarray(images), predicted))}


RADII = (("certified", "paper's: margin / (√2 · Π L_k)"),
         ("certified_pairwise", "pairwise: min_j (z_y − z_j) / (‖w_y − w_j‖ · Π_{below} L_k)"),
         ("certified_crown", "CROWN: linear bound propagation on the L2 ball ∩ box"))


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


def scatter_figure(per_model: dict[str, dict[str, np.ndarray]], dataset: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    lo, hi = np.inf, 0.0
    for color, (name, out) in enumerate(per_model.items()):
        for (key, _), marker in zip(RADII, ("o", "x")):
            ok = np.asarray(out["success"], bool) & (out[key] > 0) & np.isfinite(out[key])
            if not ok.any():
                continue
            ax.scatter(out[key][ok], out["attained"][ok], s=10, alpha=0.7, marker=marker, color=f"C{color}",
                       label=name if marker == "o" else None)
            lo = min(lo, out[key][ok].min(), out["attained"][ok].min())
            hi = max(hi, out[key][ok].max(), out["attained"][ok].max())
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="attained = certified")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("certified L2 radius: o margin / (√2 · Π L_k),  "
                  "x pairwise min_j (z_y − z_j) / (‖w_y − w_j‖ · Π L_k)")
    ax.xaxis.label.set_fontsize(7)
    ax.set_ylabel("attained L2 distortion (untargeted L-BFGS)")
    ax.set_title(f"Global Lipschitz certificates vs attack ({dataset} test images)", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def _fmt_shape(shape):
    return " × ".join(str(n) for n in shape) if shape else "–"


def _both_radii(summary: dict, key: str) -> str:
    """"paper's / pairwise" for a ratio statistic such as ratio_median."""
    return f"{significant(summary.get(key))} / {significant(summary.get(key.replace('ratio', 'ratio_pairwise')))}"


def spectrum_table(network: dict, paper: dict | None = None) -> str:
    from experiments.common import markdown_table

    headers = ["Layer", "Size", "Stride", "Upper bound", "Power iteration"] + (["Paper (its AlexNet)"] if paper else [])
    rows = []
    for r in network["layers"]:
        if paper is None and not (r["kind"] in ("dense", "conv") or r["upper_bound"] != 1.0):
            continue   # the zoo tables skip the layers whose bound is 1
        row = [r["layer"], _fmt_shape(r["shape"]), "N/A" if r["stride"] is None else str(r["stride"]),
               significant(r["upper_bound"]), significant(r["power_iteration"])]
        if paper is not None:
            row.append(significant(paper[r["layer"]][2], 3) if r["layer"] in paper else "–")
        rows.append(row)
    return markdown_table(headers, rows)


def table_markdown(results: dict) -> str:
    from experiments.common import markdown_table

    alex = results["alexnet"]
    parts = ["# Table 5: upper Lipschitz bounds of each layer (§4.3)\n"]
    if alex is not None:
        parts += [
            f"## AlexNet-shaped network ({alex['weights']})\n",
            "Our bounds are for random weights, so they cannot match the paper's numbers (its trained "
            "AlexNet): only the method, the sizes and the strides compare. Conv layers: the Fourier method on "
            "the zero-padded input grid (rounded up to a multiple of the stride); dense layers: the exact top "
            "singular value. Power iteration runs on the real layer (its own padding and stride) and can only "
            "be below the true norm. Max-pooling is 3×3 with stride 2: overlapping windows give a bound of 2, "
            "not the paper's 1.\n",
            spectrum_table(alex, PAPER_TABLE5),
            f"\nProduct of all layer bounds (ReLU 1, max-pool 2 each): {alex['network_bound']:.4g}. "
            f"Time on this CPU: bounds {alex['bounds_seconds']:.1f} s wall "
            f"({alex['bounds_cpu_seconds']:.1f} s CPU, all threads), power iteration "
            f"({alex['power_iterations']} iterations per layer) {alex['power_iteration_seconds']:.1f} s.\n",
        ]
    if results.get("zoo"):
        parts.append(f"## Trained models ({results['dataset']})\n")
        parts.append("Layers with bound 1 (ReLU, flatten, non-overlapping max-pool) are omitted; sigmoid is 1/4.\n")
        for net in results["zoo"]:
            parts += [f"### {net['name']}: network bound {net['network_bound']:.4g}\n", spectrum_table(net), ""]
    if results.get("radius"):
        parts.append(f"## Certified radius vs attained distortion (L2, {results['num_images']} test images)\n")
        parts.append("Certified, paper's: top-two logit margin / (√2 · network bound). Certified, pairwise: "
                     "min over classes j ≠ y of (z_y − z_j) / (‖w_y − w_j‖ · the bound of every layer below the "
                     "last), never smaller. Attained: the smallest ‖x′ − x‖₂ the untargeted L-BFGS attack finds "
                     "away from the predicted class (`lbfgs_attack_untargeted`, refined to the boundary). "
                     "Ratio = attained / certified (≥ 1 if both are right); paper's / pairwise.\n")
        rows = []
        for name, s in results["radius"].items():
            rows.append([name, significant(s["network_bound"]), f"{s['attack_success']}/{s['images']}",
                         significant(s["median_attained_l2"]),
                         f"{significant(s['median_certified_l2'])} / {significant(s['median_certified_pairwise_l2'])}",
                         *(_both_radii(s, f"ratio_{stat}") for stat in ("median", "geometric_mean", "min", "max")),
                         f"{len(s['violations'])} / {len(s['violations_pairwise'])}"])
        parts.append(markdown_table(["Model", "Bound Π L_k", "Attacked", "Median attained",
                                     "Median certified", "Ratio median", "Ratio geo. mean", "Ratio min",
                                     "Ratio max", "Certified > attained"], rows))
        parts.append("\n## The sandwich: CROWN's certified radius below, the attack's distortion above\n")
        parts.append("Per image the true minimal distortion lies in [certified, attained]; the ratio says how far "
                     "the attack's \"minimal\" is from a proof (1: it is the minimum). Certified by "
                     "`jaxadv.certify.certified_radius` (CROWN on {‖x′ − x‖₂ ≤ ε} ∩ [0, 1]); the pairwise "
                     "Lipschitz ratio beside it.\n")
        rows = [[name, significant(s.get("median_attained_l2")), significant(s.get("median_certified_crown_l2")),
                 significant(s.get("ratio_crown_median")), significant(s.get("ratio_crown_p90")),
                 significant(s.get("ratio_pairwise_median")), str(len(s.get("violations_crown", [])))]
                for name, s in results["radius"].items()]
        parts.append(markdown_table(["Model", "Median attained", "Median certified (CROWN)", "Ratio median",
                                     "Ratio 90th pct.", "Pairwise ratio median", "Certified > attained"], rows))
    return "\n".join(parts) + "\n"


def build_parser():
    from experiments.common import ArgumentParser, add_common_args, add_models_arg, add_size_args, int_in
    from jaxadv.data import NUM_EXAMPLES

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_models_arg(parser, SPECTRAL_MODELS)
    parser.add_argument("--num-images", type=int_in(1, NUM_EXAMPLES["test"]), default=None,
                        help=f"test images for the certified radius (default {DEFAULT_NUM_IMAGES}, "
                             f"{QUICK_NUM_IMAGES} with --quick)")
    parser.add_argument("--power-iterations", type=int_in(0), default=None,
                        help=f"per dense/conv layer (default {DEFAULT_POWER_ITERATIONS}, "
                             f"{QUICK_POWER_ITERATIONS} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="picks the test images and the power-iteration starts")
    add_size_args(parser)
    parser.add_argument("--alexnet-only", action="store_true", help="only the AlexNet-shaped table (no data needed)")
    parser.add_argument("--no-alexnet", action="store_true", help="skip the AlexNet-shaped table")
    return parser


def check_dense_heads(logits_fns: dict, input_shape) -> None:
    """ConfigError naming the model unless each of `logits_fns` ends in a dense layer: the pairwise radius
    beside each attack needs one (checked on the traced bounds, before any attack)."""
    from jaxadv.zoo import ConfigError
    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    for name, logits_fn in logits_fns.items():
        if lipschitz.operator_bounds(logits_fn, example).head_weights is None:
            raise ConfigError(f"--models: model {name!r} does not end in a dense layer (a [features, classes] "
                              "matrix, then a bias), which Table 5's pairwise certified radius needs")


def main(argv=None):
    from experiments.common import (check_size_args, models_from_args, output_dir, parse_args, save_figure_atomic,
                                    write_json_atomic, write_text_atomic)

    parser = build_parser()
    args = parse_args(parser, argv)
    if args.alexnet_only and args.no_alexnet:
        parser.error("--alexnet-only and --no-alexnet exclude each other")
    num_images = args.num_images or (QUICK_NUM_IMAGES if args.quick else DEFAULT_NUM_IMAGES)
    check_size_args(parser, args, num_images)
    iterations = args.power_iterations if args.power_iterations is not None else (
        QUICK_POWER_ITERATIONS if args.quick else DEFAULT_POWER_ITERATIONS)
    workdir = args.workdir
    out_dir = str(output_dir(parser, args, NAME, sweeps=("table5/attacks",)))
    start = time.time()
    key = jax.random.PRNGKey(args.seed)
    alex_key, zoo_key, pick_key = jax.random.split(key, 3)
    if not args.alexnet_only:     # a missing data folder or a model unfit for the table is found now, before any work
        from jaxadv import logits_function
        from jaxadv.data import load_dataset
        test = load_dataset(args.dataset, "test", args.data_dir)
        models = models_from_args(parser, args)
        logits_fns = {name: logits_function(model, params) for name, (model, params) in models.items()}
        check_dense_heads({name: fn for name, fn in logits_fns.items() if name not in NOT_ATTACKED},
                          test.images.shape[1:])

    alex = None
    if not args.no_alexnet:
        alexnet = AlexNetShaped()
        logits_fn = jax.tree_util.Partial(alexnet.apply, alexnet_variables(ALEXNET_SEED))
        alex, _ = network_spectrum("AlexNet-shaped", logits_fn, ALEXNET_INPUT, alex_key, iterations)
        alex["weights"] = f"Glorot-uniform init, zero biases, jax.random.PRNGKey({ALEXNET_SEED}); no LRN"
        del logits_fn
        print(spectrum_table(alex, PAPER_TABLE5), flush=True)
    results = {"experiment": NAME, "dataset": args.dataset, "quick": args.quick, "seed": args.seed,
               "alexnet": alex, "paper_table5": {k: {"size": v[0], "stride": v[1], "upper_bound": v[2]}
                                                 for k, v in PAPER_TABLE5.items()}}

    if not args.alexnet_only:
        from jaxadv.attacks import UNTARGETED

        results["zoo"], bounds_of = [], {}
        for i, name in enumerate(models):
            net, bounds_of[name] = network_spectrum(name, logits_fns[name], test.images.shape[1:],
                                                    jax.random.fold_in(zoo_key, i), iterations)
            results["zoo"].append(net)

        index = np.sort(np.asarray(jax.random.choice(pick_key, len(test.labels), (num_images,), replace=False)))
        images = test.images[index]
        config = UNTARGETED
        per_model, summaries = {}, {}
        for name in [n for n in models if n not in NOT_ATTACKED]:
            t0 = time.time()
            out = radius_against_attack(name, logits_fns[name], images, bounds_of[name],
                                        os.path.join(workdir, NAME, "attacks", name, f"n{num_images}-seed{args.seed}"),
                                        config, chunk_size=args.chunk_size, block_size=args.block_size)
            per_model[name] = out
            summaries[name] = {"network_bound": bounds_of[name].network_bound,
                               "features_bound": bounds_of[name].features_bound, **looseness_summary(out),
                               "attack_seconds": time.time() - t0}
            for key, _ in RADII:
                suffix = key.removeprefix("certified")
                summaries[name][f"violation{suffix}_details"] = [
                    {"test_index": int(index[i]), "certified": float(out[key][i]), "attained": float(out["attained"][i])}
                    for i in summaries[name][f"violations{suffix}"]]
        results.update(num_images=num_images, test_indices=index.tolist(), attack_config=repr(config),
                       radius=summaries,
                       radius_per_image={n: {k: np.asarray(v).tolist() for k, v in o.items()}
                                         for n, o in per_model.items()})
        save_figure_atomic(scatter_figure(per_model, args.dataset), os.path.join(out_dir, "radius_scatter.png"), dpi=120)
        from jaxadv.plots import sandwich_figure
        moved = {name: (out["certified_crown"][out["success"]], out["attained"][out["success"]])
                 for name, out in per_model.items() if np.any(out["success"])}
        if moved:
            save_figure_atomic(sandwich_figure(moved, f"Certified (CROWN) and attained L2, {args.dataset} test images"),
                               os.path.join(out_dir, "sandwich.png"), dpi=120)

    results["elapsed_seconds"] = time.time() - start
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    write_text_atomic(os.path.join(out_dir, "table.md"), table_markdown(results))
    print(table_markdown(results))
    return results


if __name__ == "__main__":
    run_main(main)
