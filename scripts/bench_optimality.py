"""How minimal is "minimal"? Every attack against the per-image best known L2, side by side in one process.

    python scripts/bench_optimality.py [--models "FC10(1e-4)" FC100-100-10 ConvNet] [--num-images 500]
                                       [--workdir runs/fashion_mnist] [--data-dir DIR]
                                       [--foolbox ddn cw deepfool] [--ddn-steps 1000] [--cw-steps 1000]
                                       [--cw-binary-steps 5] [--out FILE]

The problem is the untargeted minimum: the smallest L2 perturbation in the
box [0, 1] that changes the label, on the first --num-images correctly
classified Fashion-MNIST test images of each model. Attacks:
  paper        the paper's method (no refinement), minimum over the 9 targets
  refined      the same with the boundary refinement (jaxadv's default), over the 9 targets
  untargeted   `lbfgs_attack_untargeted`: one untargeted run per image, refined, then one
               targeted run toward the nearest other class by the linear estimate at x
  exact QP     the exact minimum (linear models only; `jaxadv.attacks.exact`, scipy)
  DDN, C&W L2, DeepFool   Foolbox 3 on the same JAX model, jit-compiled (a development
               dependency: `pip install foolbox`; skipped with a note if it is missing;
               `--foolbox` with no names runs none of them)
Per attack: success rate, median and mean ratio of its L2 to the per-image
best known (the smallest L2 any attack found, AttackBench's reference; a
failure counts as inf in the median), the share within 1% of it, gradients
(model calls) per image, and wall time (compilation included for everything). Success is rechecked here on every returned image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.common import markdown_table, write_json_atomic  # noqa: E402
from jaxadv.zoo import trained_models  # noqa: E402
from jaxadv.attacks import AttackConfig, lbfgs_attack_all_targets, lbfgs_attack_untargeted  # noqa: E402
from jaxadv.attacks.exact import exact_linear_minimum  # noqa: E402
from jaxadv.data import load_dataset  # noqa: E402
from jaxadv.functional import layer_kind  # noqa: E402

NUM_CLASSES = 10
FOOLBOX_ATTACKS = ("ddn", "cw", "deepfool")


def correctly_classified(model, params, test, num_images):
    predicted = np.argmax(np.asarray(jax.jit(lambda x: model.apply(params, x))(test.images[:4 * num_images])), -1)
    index = np.where(predicted == test.labels[:4 * num_images])[0][:num_images]
    return test.images[index], test.labels[index]


def jaxadv_attacks(logits_fn, images, labels):
    """{name: (adversarial, gradients per image, seconds)} for the paper's method, the refined attack, untargeted."""
    out = {}
    runs = {
        "paper (9 targets)": lambda: lbfgs_attack_all_targets(logits_fn, images, labels,
                                                              AttackConfig(refine_steps=0)).best,
        "refined (9 targets)": lambda: lbfgs_attack_all_targets(logits_fn, images, labels).best,
        "untargeted": lambda: lbfgs_attack_untargeted(logits_fn, images, labels),
    }
    for name, run in runs.items():
        tic = time.perf_counter()
        result = jax.block_until_ready(run())
        out[name] = (np.asarray(result.adversarial), float(np.mean(result.evaluations)), time.perf_counter() - tic)
    return out


def exact_attack(model, params, images, labels):
    kinds = [layer_kind(layer) for layer in model.module.layers]
    if kinds.count("dense") != 1 or set(kinds) - {"dense", "flatten"}:
        return {}
    dense = params["params"][f"layers_{kinds.index('dense')}"]
    w, b = np.asarray(dense["kernel"]), np.asarray(dense["bias"])
    tic = time.perf_counter()
    best = []
    for x, y in zip(images.reshape(len(images), -1), labels):
        candidates = [exact_linear_minimum(w, b, x, t) for t in range(NUM_CLASSES) if t != y]
        best.append(min(candidates, key=lambda c: c[1])[0])
    return {"exact QP": (np.asarray(best, np.float32).reshape(images.shape), float("nan"), time.perf_counter() - tic)}


def foolbox_attacks(logits_fn, images, labels, args):
    try:
        import foolbox
    except ImportError:
        print("foolbox is not installed (pip install foolbox): its attacks are skipped", file=sys.stderr)
        return {}
    # Foolbox differentiates the model eagerly; a jitted model makes each of its calls one compiled program.
    compiled = jax.jit(logits_fn)
    calls = [0]

    def counted(x):
        calls[0] += 1
        return compiled(x)

    model = foolbox.JAXModel(counted, bounds=(0.0, 1.0))
    x, y = jnp.asarray(images), jnp.asarray(labels)
    attacks = {
        "ddn": (f"Foolbox DDN ({args.ddn_steps} steps)", lambda: foolbox.attacks.DDNAttack(steps=args.ddn_steps)),
        "cw": (f"Foolbox C&W L2 ({args.cw_binary_steps}x{args.cw_steps})", lambda: foolbox.attacks.L2CarliniWagnerAttack(
            binary_search_steps=args.cw_binary_steps, steps=args.cw_steps, stepsize=0.01, initial_const=1.0)),
        "deepfool": ("Foolbox DeepFool", lambda: foolbox.attacks.L2DeepFoolAttack(steps=50, candidates=NUM_CLASSES)),
    }
    attacks = dict(attacks[key] for key in args.foolbox)
    out = {}
    for name, make in attacks.items():
        attack = make()
        calls[0] = 0
        tic = time.perf_counter()
        _, clipped, _ = attack(model, x, y, epsilons=None)
        out[name] = (np.asarray(clipped), float(calls[0]), time.perf_counter() - tic)
    return out


def score(logits_fn, images, labels, found):
    """Per attack: its L2 per image (inf where the returned image keeps the label), and the summary figures."""
    l2 = {}
    for name, (adversarial, _, _) in found.items():
        predicted = np.argmax(np.asarray(logits_fn(jnp.asarray(adversarial))), -1)
        distance = np.linalg.norm((adversarial - images).reshape(len(images), -1).astype(np.float64), axis=1)
        # The exact QP gives the infimum: its points lie on the boundary, where float32 rounding picks a side.
        l2[name] = distance if name == "exact QP" else np.where(predicted != labels, distance, np.inf)
    best = np.min(np.stack(list(l2.values())), axis=0)
    rows = {}
    for name, (_, gradients, seconds) in found.items():
        ratio = l2[name] / best
        finite = np.isfinite(ratio)
        rows[name] = dict(success_rate=float(finite.mean()), median_ratio=float(np.median(ratio)),
                          mean_ratio=float(ratio[finite].mean()) if finite.any() else float("nan"),
                          within_1_percent=float(np.mean(ratio <= 1.01)), gradients_per_image=gradients,
                          seconds=seconds, mean_l2=float(l2[name][finite].mean()) if finite.any() else float("nan"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["FC10(1e-4)", "FC100-100-10", "ConvNet"])
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--workdir", default="runs/fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--foolbox", nargs="*", choices=FOOLBOX_ATTACKS, default=list(FOOLBOX_ATTACKS),
                        help="Foolbox attacks to run beside jaxadv's (none: only jaxadv's and the exact QP)")
    parser.add_argument("--ddn-steps", type=int, default=1000)
    parser.add_argument("--cw-steps", type=int, default=1000)
    parser.add_argument("--cw-binary-steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images: must be >= 1")

    test = load_dataset("fashion_mnist", "test", args.data_dir)
    models = trained_models(args.models, "fashion_mnist", args.workdir, args.data_dir)
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s) ({jax.devices()[0].device_kind}); {args.num_images} correctly classified "
          "Fashion-MNIST test images per model; untargeted minimal L2 in [0, 1]", flush=True)
    figures = {}
    for name in args.models:
        model, params = models[name]
        logits_fn = jax.tree_util.Partial(model.apply, params)
        images, labels = correctly_classified(model, params, test, args.num_images)
        found = jaxadv_attacks(logits_fn, images, labels)
        found.update(exact_attack(model, params, images, labels))
        if args.foolbox:
            found.update(foolbox_attacks(logits_fn, images, labels, args))
        rows = score(logits_fn, images, labels, found)
        figures[name] = rows
        print(f"\n## {name} ({len(labels)} images)\n")
        print(markdown_table(["Attack", "Success", "Median ratio", "Mean ratio", "Within 1%", "Gradients/image",
                              "Seconds", "Mean L2"],
                             [[k, f"{r['success_rate']:.1%}", f"{r['median_ratio']:.4f}", f"{r['mean_ratio']:.4f}",
                               f"{r['within_1_percent']:.1%}", f"{r['gradients_per_image']:.0f}",
                               f"{r['seconds']:.1f}", f"{r['mean_l2']:.4f}"] for k, r in rows.items()]), flush=True)
    if args.out:
        write_json_atomic(args.out, figures)


if __name__ == "__main__":
    main()
