"""Adversarial training of FC100-100-10 with a pool per layer (§4.2), against its baselines.

    python -m experiments.adversarial_training [--dataset fashion_mnist] [--epochs 40] [--quick]

Variants, all the same net, optimiser (Adam, cosine-decayed step), epochs, batches and the paper's weight
decay (λ = 1e-5, 1e-5, 1e-6): `weight_decay` (the plain model: the paper's 1.6% on MNIST), `dropout` on both
hidden layers (the paper's ~1.3%; the rate is ours), `adversarial_per_layer` (pools at the input and at both
sigmoid outputs, each training the layers above it: the paper's recipe, <1.2%) and `adversarial_input_only`
(a pool at the input alone: the ablation of the detail the paper calls essential).

Pool examples: random training images, their representation at the pool's layer attacked with a cheap
box-constrained L-BFGS toward a random wrong label (box [0, 1]: pixels and sigmoid outputs), kept with their
true label. Each model is scored by its test error and, beyond the paper, by the mean minimal distortion the
untargeted L-BFGS attack needs on the same test images (`jaxadv.metrics.untargeted_distortion`).

Writes WORKDIR/adversarial_training/<run>/results.json, table.md and learning_curves.png; the attacks' chunks
go to <run>/attacks/<variant>-<its weights' fingerprint>/.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp

from experiments.common import ArgumentParser, add_common_args, int_in, output_dir, parse_args
from experiments.cli import run_main
from jaxadv.adversarial_training import INPUT, AdversarialTrainingConfig, adversarial_train, logits_above
from jaxadv.attacks import ATTACK_LBFGS, AttackConfig, SearchConfig, lbfgs_attack, random_wrong_targets
from jaxadv.attacks.config import UNTARGETED
from jaxadv.data import NUM_EXAMPLES, load_dataset
from jaxadv.functional import hidden_layers
from jaxadv.metrics import untargeted_distortion
from jaxadv.models import get_model, weight_decay_penalty
from jaxadv.paper import ADVERSARIAL_TRAINING_TEST_ERROR
from jaxadv.plots import learning_curves_figure
from jaxadv.report import write_outputs
from jaxadv.tables import adversarial_training_markdown
from jaxadv.train import error_rate

NAME = "adversarial_training"
MODEL = "FC100-100-10"
NUM_CLASSES = 10
DROPOUT_RATE = 0.2
#: Cheap attack for pool refreshes: 3 bracket moves of c, 2 bisections, 30 L-BFGS iterations per c.
POOL_ATTACK = AttackConfig(search=SearchConfig(max_bracket_steps=3, bisection_steps=2),
                           lbfgs=ATTACK_LBFGS._replace(max_iterations=30))
#: The full attack (the library's defaults) for the final distortion of each model.
EVAL_ATTACK = UNTARGETED
BASE = AdversarialTrainingConfig(epochs=40, batch_size=128, learning_rate=1e-3, pool_size=2000,
                                 pool_batch_size=32, refresh_every=100, refresh_fraction=0.25)
DEFAULT_EVAL_IMAGES = 500
QUICK = dict(train_images=6000, epochs=3, pool_size=200, refresh_every=20, eval_images=50, curve_images=2000)
VARIANTS = ("weight_decay", "dropout", "adversarial_per_layer", "adversarial_input_only")


def variant_config(variant: str, zoo_model, base: AdversarialTrainingConfig) -> AdversarialTrainingConfig:
    """`base` with `variant`'s dropout or pools (the layers above each pool train on it)."""
    return {"weight_decay": base, "dropout": base._replace(dropout_rate=DROPOUT_RATE),
            "adversarial_per_layer": base._replace(pool_layers=(INPUT,) + hidden_layers(zoo_model.module)),
            "adversarial_input_only": base._replace(pool_layers=(INPUT,))}[variant]


def pool_attack(config: AttackConfig):
    """The `make_adversarial` of `adversarial_train`: L-BFGS toward a random wrong label."""
    def make_adversarial(logits_fn, inputs, labels, key, lower, upper):
        targets = random_wrong_targets(key, labels, NUM_CLASSES)
        result = lbfgs_attack(logits_fn, inputs, targets, config=config, lower=lower, upper=upper)
        return result.adversarial, result.success
    return make_adversarial


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--epochs", type=int_in(1), default=None,
                        help=f"epochs per variant (default {BASE.epochs}, {QUICK['epochs']} with --quick)")
    parser.add_argument("--train-images", type=int_in(1, NUM_EXAMPLES["train"]), default=None,
                        help=f"training subset size (default: all, {QUICK['train_images']} with --quick)")
    parser.add_argument("--eval-images", type=int_in(1, NUM_EXAMPLES["test"]), default=None,
                        help=f"test images attacked per final model (default {DEFAULT_EVAL_IMAGES}, "
                             f"{QUICK['eval_images']} with --quick)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def sizes(args):
    """(training config, training images, attacked test images, test images of the curves; None: all).

    --quick sets small sizes; a flag given explicitly wins over them.
    """
    base, train_images, eval_images, curve_images = BASE, None, DEFAULT_EVAL_IMAGES, None
    if args.quick:
        base = base._replace(epochs=QUICK["epochs"], pool_size=QUICK["pool_size"], refresh_every=QUICK["refresh_every"])
        train_images, eval_images, curve_images = QUICK["train_images"], QUICK["eval_images"], QUICK["curve_images"]
    if args.epochs is not None:
        base = base._replace(epochs=args.epochs)
    train_images = args.train_images if args.train_images is not None else train_images
    eval_images = args.eval_images if args.eval_images is not None else eval_images
    return base, train_images, eval_images, curve_images


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    base, train_images, eval_images, curve_images = sizes(args)
    out_dir = str(output_dir(parser, args, NAME))
    train, test = load_dataset(args.dataset, "train", args.data_dir), load_dataset(args.dataset, "test", args.data_dir)
    train_x, train_y = train.images[:train_images], train.labels[:train_images]
    curve_x, curve_y = test.images[:curve_images], test.labels[:curve_images]
    eval_x = jnp.asarray(test.images[:eval_images])
    key = jax.random.PRNGKey(args.seed)

    zoo_model = get_model(MODEL)
    decay = functools.partial(weight_decay_penalty, zoo_model)   # the paper's λ, as the zoo trains the model
    records = {}
    for variant in args.variants:
        config = variant_config(variant, zoo_model, base)
        evaluate = lambda p: {"test_error": error_rate(zoo_model.module, p, curve_x, curve_y)}   # noqa: E731
        tic = time.perf_counter()
        # The same key for every variant: the same initial weights and the same clean batches.
        params, history = adversarial_train(zoo_model.module, train_x, train_y, jax.random.fold_in(key, 0), config,
                                            pool_attack(POOL_ATTACK), evaluate, params=zoo_model.init, penalty=decay,
                                            frozen=zoo_model.frozen)
        wall = time.perf_counter() - tic
        records[variant] = {
            "config": config._asdict(), "epochs": config.epochs, "steps": history[-1]["step"],
            "train_seconds": history[-1]["train_seconds"], "attack_seconds": history[-1]["attack_seconds"],
            "wall_seconds": wall, "test_error": error_rate(zoo_model.module, params, test.images, test.labels),
            "train_error": error_rate(zoo_model.module, params, train_x, train_y),
            "distortion": untargeted_distortion(logits_above(zoo_model.module, params, INPUT), eval_x, EVAL_ATTACK,
                                             os.path.join(out_dir, "attacks", variant), variant),
            "history": history,
        }
        print(f"[{variant}] test error {100 * records[variant]['test_error']:.2f}%  "
              f"distortion {records[variant]['distortion']['mean_distortion']:.4f}  {wall:.0f}s", flush=True)

    results = {
        "experiment": NAME, "dataset": args.dataset, "quick": args.quick, "seed": args.seed, "model": MODEL,
        "num_train_images": int(len(train_y)), "num_eval_images": int(eval_x.shape[0]),
        "curve_test_images": int(len(curve_y)),
        "pool_attack": POOL_ATTACK.settings(), "eval_attack": EVAL_ATTACK.settings(), "dropout_rate": DROPOUT_RATE,
        "paper_mnist_test_error": ADVERSARIAL_TRAINING_TEST_ERROR, "variants": records}
    table = adversarial_training_markdown(records, MODEL, args.dataset, int(eval_x.shape[0]),
                                          ADVERSARIAL_TRAINING_TEST_ERROR, hidden_layers(zoo_model.module))
    write_outputs(out_dir, results, table, {"learning_curves.png": learning_curves_figure(records, base.epochs)})


if __name__ == "__main__":
    run_main(main)
