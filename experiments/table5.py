"""Table 5: upper Lipschitz bounds per layer (§4.3), and how loose they are.

    python -m experiments.table5 [--dataset fashion_mnist] [--num-images 100] [--quick] [--alexnet-only]

Every bound is read from the network's jaxpr (`jaxadv.lipschitz.operator_bounds`), so any pure logits function
works; nothing here walks a layer list. (1) An AlexNet-shaped network with the paper's layer sizes and strides,
at a stated random initialisation (`jaxadv.alexnet`; the authors' weights are not public): every layer's bound
(Fourier method for convolutions, exact top singular value for dense layers) beside a power-iteration estimate
on the real layer. (2) The same for every trained zoo model and the MNIST convnet. (3) Beyond the paper, per
test image (`jaxadv.radii`): the L2 radius the global bound certifies (top-two logit margin / (√2 · Π_k L_k)),
the tighter radius of the per-pair bounds (min over classes j of (z_y − z_j) / (‖w_y − w_j‖ · Π_{k below the
last layer} L_k)), the radius CROWN proves (`jaxadv.certify.certified_radius`, on the L2 ball ∩ box), and the
smallest L2 perturbation the untargeted L-BFGS attack finds; their ratios say how loose the bounds are, and
CROWN's with the attack's sandwich the true minimum per image.

Writes WORKDIR/table5/<run>/results.json, table.md, radius_scatter.png and sandwich.png; the attacks are saved
chunk by chunk under WORKDIR/table5/attacks/<model>/.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import ArgumentParser, add_common_args, int_in, output_dir, parse_args
from experiments.cli import run_main
from experiments.flags import add_models_arg, add_size_args, check_size_args, models_from_args
from jaxadv import lipschitz, logits_function
from jaxadv.alexnet import ALEXNET_INPUT, ALEXNET_SEED, AlexNetShaped, alexnet_variables
from jaxadv.attacks.config import UNTARGETED
from jaxadv.data import NUM_EXAMPLES, load_dataset
from jaxadv.models import ZOO
from jaxadv.paper import TABLE5
from jaxadv.plots import radius_scatter_figure, sandwich_figure
from jaxadv.radii import looseness_summary, network_spectrum, radius_against_attack, violation_details
from jaxadv.report import save_figure_atomic, write_outputs
from jaxadv.tables import spectrum_table, table5_markdown
from jaxadv.zoo import ConfigError

NAME = "table5"
DEFAULT_NUM_IMAGES, QUICK_NUM_IMAGES = 100, 10
DEFAULT_POWER_ITERATIONS, QUICK_POWER_ITERATIONS = 100, 20
SPECTRAL_MODELS = ZOO + ("ConvNet",)


def build_parser():
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
    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    for name, logits_fn in logits_fns.items():
        if lipschitz.operator_bounds(logits_fn, example).head_weights is None:
            raise ConfigError(f"--models: model {name!r} does not end in a dense layer (a [features, classes] "
                              "matrix, then a bias), which Table 5's pairwise certified radius needs")


def alexnet_spectrum(key, iterations: int) -> dict:
    """The AlexNet-shaped network's bounds and power-iteration estimates (`network_spectrum`), printed."""
    alexnet = AlexNetShaped()
    alex, _ = network_spectrum("AlexNet-shaped", jax.tree_util.Partial(alexnet.apply, alexnet_variables(ALEXNET_SEED)),
                               ALEXNET_INPUT, key, iterations)
    alex["weights"] = f"Glorot-uniform init, zero biases, jax.random.PRNGKey({ALEXNET_SEED}); no LRN"
    print(spectrum_table(alex, TABLE5), flush=True)
    return alex


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.alexnet_only and args.no_alexnet:
        parser.error("--alexnet-only and --no-alexnet exclude each other")
    num_images = args.num_images or (QUICK_NUM_IMAGES if args.quick else DEFAULT_NUM_IMAGES)
    check_size_args(parser, args, num_images)
    iterations = args.power_iterations if args.power_iterations is not None else (
        QUICK_POWER_ITERATIONS if args.quick else DEFAULT_POWER_ITERATIONS)
    out_dir = str(output_dir(parser, args, NAME, sweeps=("table5/attacks",)))
    start = time.time()
    key = jax.random.PRNGKey(args.seed)
    alex_key, zoo_key, pick_key = jax.random.split(key, 3)
    if not args.alexnet_only:     # a missing data folder or a model unfit for the table is found now, before any work
        test = load_dataset(args.dataset, "test", args.data_dir)
        models = models_from_args(parser, args)
        logits_fns = {name: logits_function(model, params) for name, (model, params) in models.items()}
        check_dense_heads(logits_fns,
                          test.images.shape[1:])

    alex = None if args.no_alexnet else alexnet_spectrum(alex_key, iterations)
    results = {"experiment": NAME, "dataset": args.dataset, "quick": args.quick, "seed": args.seed,
               "alexnet": alex, "paper_table5": {k: {"size": v[0], "stride": v[1], "upper_bound": v[2]}
                                                 for k, v in TABLE5.items()}}

    if not args.alexnet_only:
        results["zoo"], bounds_of = [], {}
        for i, name in enumerate(models):
            net, bounds_of[name] = network_spectrum(name, logits_fns[name], test.images.shape[1:],
                                                    jax.random.fold_in(zoo_key, i), iterations)
            results["zoo"].append(net)

        index = np.sort(np.asarray(jax.random.choice(pick_key, len(test.labels), (num_images,), replace=False)))
        images = test.images[index]
        config = UNTARGETED
        per_model, summaries = {}, {}
        for name in models:
            t0 = time.time()
            out = radius_against_attack(name, logits_fns[name], images, bounds_of[name],
                                        os.path.join(args.workdir, NAME, "attacks", name, f"n{num_images}-seed{args.seed}"),
                                        config, chunk_size=args.chunk_size, block_size=args.block_size)
            per_model[name] = out
            summaries[name] = {"network_bound": bounds_of[name].network_bound,
                               "features_bound": bounds_of[name].features_bound, **looseness_summary(out),
                               "attack_seconds": time.time() - t0, **violation_details(out, index)}
        results.update(num_images=num_images, test_indices=index.tolist(), attack_config=repr(config),
                       radius=summaries,
                       radius_per_image={n: {k: np.asarray(v).tolist() for k, v in o.items()}
                                         for n, o in per_model.items()})
        save_figure_atomic(radius_scatter_figure(per_model, args.dataset), os.path.join(out_dir, "radius_scatter.png"), dpi=120)
        moved = {name: (out["certified_crown"][out["success"]], out["attained"][out["success"]])
                 for name, out in per_model.items() if np.any(out["success"])}
        if moved:
            save_figure_atomic(sandwich_figure(moved, f"Certified (CROWN) and attained L2, {args.dataset} test images"),
                               os.path.join(out_dir, "sandwich.png"), dpi=120)

    results["elapsed_seconds"] = time.time() - start
    write_outputs(out_dir, results, table5_markdown(results))
    return results


if __name__ == "__main__":
    run_main(main)
