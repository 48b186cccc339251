"""How minimal is "minimal"? jaxadv's attacks beside adv_lib's on PyTorch twins of the same weights, per image.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_optimality.py [--models FC100-100-10 ConvNet ReluCNN]
        [--num-images 500] [--steps 1000] [--quick] [--jax-only] [--workdir runs/fashion_mnist]
        [--data-dir DIR] [--out-dir DIR] [--threads 1]

adv_lib (the bench extra) installs in two steps: `pip install "setuptools<80" wheel`, then
`pip install --no-build-isolation adv-lib torch` (adv-lib 0.2.8's build needs setuptools' old
API). Without it, or with --jax-only, only jaxadv's attacks run (no torch is imported).

The problem is the untargeted minimum: the smallest L2 perturbation in the box [0, 1] that
changes the label, on the first --num-images correctly classified Fashion-MNIST test images of
each model: FC100-100-10 and the ConvNet of the zoo (WORKDIR/models, trained if missing) and
ReluCNN, a second ReLU CNN written with flax's nn.Conv and nn.max_pool (scripts/bench_models.py;
trained 2 epochs if WORKDIR/models/ReluCNN is missing). Attacks:
  ours        `lbfgs_attack_untargeted`, DDN, ALMA, FMN, DeepFool, SuperDeepFool (jaxadv.attacks,
              --steps gradients for the iterative ones), `minimal_perturbation` where it exists,
              and "ours, per-image best": the smallest of ours on each image
  adv_lib     DDN (levels=None: continuous output), ALMA (L2), FMN (L2), each --steps steps;
              FAB (L2, 9 targeted restarts of --steps/10 steps); SuperDeepFool (its defaults);
              on the PyTorch twin (scripts/torch_twins.py; logits and gradients checked equal first)
Every returned image is rechecked on the JAX model. Per attack: success; the median ratio of its
L2 to the per-image best known (the smallest any attack found; a failure counts as inf); the
share within 1% and within 0.1% of it; AttackBench's optimality score (`jaxadv.metrics`: the
area between the attack's robust-accuracy curve, `jaxadv.attacks.robust_accuracy_curve`, and the
best known one; AttackBench caps each attack at 2,000 propagations, forward and backward, i.e.
1,000 gradients, which --steps 1000 keeps to; rows over it are marked); gradients per image
(backward passes of one image; a Jacobian of K classes counts K); wall time (JAX compilation
included; --warm: excluded). Writes OUT/results.json, OUT/table.md and
OUT/<model>_robust_accuracy.png, atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxadv.attacks as attacks  # noqa: E402
from jaxadv.report import markdown_table, save_figure_atomic, write_json_atomic, write_text_atomic  # noqa: E402
from jaxadv.attacks.alma import alma  # noqa: E402
from jaxadv.attacks.ddn import ddn  # noqa: E402
from jaxadv.attacks.deepfool import deepfool, superdeepfool  # noqa: E402
from jaxadv.attacks.fmn import fmn  # noqa: E402
from jaxadv.certify import certificates  # noqa: E402
from jaxadv.data import load_dataset  # noqa: E402
from jaxadv.metrics import optimality_score  # noqa: E402
from jaxadv.plots import sandwich_figure  # noqa: E402
from jaxadv.zoo import trained_models  # noqa: E402
from scripts.bench_models import RELU_CNN, correctly_classified, trained_relu_cnn  # noqa: E402
from experiments.cli import run_main  # noqa: E402

#: AttackBench's budget: forward plus backward propagations per image (a gradient is one of each).
BUDGET_GRADIENTS = 1000
OURS_BEST = "ours, per-image best"


def jax_attacks(steps: int) -> dict:
    """{name: run(logits_fn, images, labels) -> (adversarial, gradients per image)} of jaxadv's attacks."""
    def minnorm(attack, **settings):
        def run(logits_fn, images, labels):
            result = attack(logits_fn, images, labels, **settings)
            return result.adversarial, float(np.mean(np.asarray(result.gradients, np.float64)))
        return run

    def untargeted(logits_fn, images, labels):
        result = attacks.lbfgs_attack_untargeted(logits_fn, images, labels)
        return result.adversarial, float(np.mean(np.asarray(result.evaluations, np.float64)))

    runs = {"lbfgs_attack_untargeted": untargeted, f"DDN ({steps})": minnorm(ddn, steps=steps),
            f"ALMA ({steps})": minnorm(alma, steps=steps), f"FMN ({steps})": minnorm(fmn, steps=steps),
            "DeepFool": minnorm(deepfool), "SuperDeepFool": minnorm(superdeepfool)}
    if hasattr(attacks, "minimal_perturbation"):
        def minimal(logits_fn, images, labels):
            result = attacks.minimal_perturbation(logits_fn, images, labels)
            return result.adversarial, float(np.mean(np.asarray(result.gradients, np.float64)))
        runs["minimal_perturbation"] = minimal
    return runs


def run_jax(logits_fn, images, labels, steps: int, warm: bool = False, skip=lambda name: False) -> dict:
    """{name: (adversarial, gradients per image, seconds)} of jaxadv's attacks; warm: timed on a second run."""
    out = {}
    for name, run in jax_attacks(steps).items():
        if skip("ours: " + name):
            continue
        if warm:        # the same shapes: the timed run below reuses the compiled programs
            jax.block_until_ready(run(logits_fn, jnp.asarray(images), jnp.asarray(labels)))
        start = time.perf_counter()
        adversarial, gradients = run(logits_fn, jnp.asarray(images), jnp.asarray(labels))
        adversarial = np.asarray(jax.block_until_ready(adversarial))
        out["ours: " + name] = (adversarial, gradients, time.perf_counter() - start)
        print(f"  {name}: {out['ours: ' + name][2]:.1f} s", file=sys.stderr, flush=True)
    return out


def run_advlib(twin, images, labels, steps: int, skip=lambda name: False) -> dict:
    """{name: (adversarial, gradients per image, seconds)} of adv_lib's attacks on the PyTorch twin."""
    import torch
    from adv_lib.attacks import alma as advlib_alma, ddn as advlib_ddn, fab, fmn as advlib_fmn, sdf
    from scripts.torch_twins import CountedModel

    counted = CountedModel(twin)
    runs = {f"DDN ({steps})": lambda m, x, y: advlib_ddn(m, x, y, steps=steps, levels=None),
            f"ALMA ({steps})": lambda m, x, y: advlib_alma(m, x, y, num_steps=steps, distance="l2"),
            f"FMN ({steps})": lambda m, x, y: advlib_fmn(m, x, y, norm=2, steps=steps),
            f"FAB (9 targeted x {steps // 10})": lambda m, x, y: fab(m, x, y, norm=2, n_iter=steps // 10,
                                                                     restarts=9, targeted_restarts=True),
            "SuperDeepFool": lambda m, x, y: sdf(m, x, y)}
    x, y = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))
    out = {}
    for name, run in runs.items():
        if skip("adv_lib: " + name):
            continue
        torch.manual_seed(0)
        counted.reset()
        start = time.perf_counter()
        adversarial = run(counted, x, y).detach().numpy()
        out["adv_lib: " + name] = (adversarial, counted.gradients / len(labels), time.perf_counter() - start)
        print(f"  adv_lib {name}: {out['adv_lib: ' + name][2]:.1f} s", file=sys.stderr, flush=True)
    return out


def distances(logits_fn, images, labels, found: dict) -> dict:
    """{name: per-image L2, inf where the returned image keeps the label on the JAX model}."""
    out = {}
    for name, (adversarial, _, _) in found.items():
        if adversarial is None:         # reused: found holds no images, the L2 were rechecked when stored
            out[name] = found[name].l2
            continue
        predicted = np.argmax(np.asarray(jax.jit(logits_fn)(jnp.asarray(adversarial))), -1)
        l2 = np.linalg.norm((adversarial.astype(np.float64) - images).reshape(len(images), -1), axis=1)
        out[name] = np.where(predicted != labels, l2, np.inf)
    ours = [l2 for name, l2 in out.items() if name.startswith("ours: ")]
    if ours:
        out[OURS_BEST] = np.min(np.stack(ours), axis=0)
    return out


def score(l2: dict, found: dict, best: np.ndarray) -> dict:
    """The figures of each attack against the per-image best known."""
    rows = {}
    for name, d in l2.items():
        ratio = d / best
        gradients, seconds = found[name][1:] if name in found else (float("nan"), float("nan"))
        rows[name] = dict(success=float(np.isfinite(d).mean()), median_ratio=float(np.median(ratio)),
                          within_1_percent=float(np.mean(ratio <= 1.01)),
                          within_0_1_percent=float(np.mean(ratio <= 1.001)),
                          optimality=optimality_score(d, best), gradients_per_image=gradients, seconds=seconds,
                          median_l2=float(np.median(d)))
    return rows


def table(rows: dict) -> str:
    headers = ["Attack", "Success", "Median ratio", "Within 1%", "Within 0.1%", "Optimality", "Gradients/image",
               "Seconds", "Median L2"]
    over = lambda g: " (over budget)" if g > BUDGET_GRADIENTS else ""
    return markdown_table(headers, [
        [name, f"{r['success']:.1%}", f"{r['median_ratio']:.4f}", f"{r['within_1_percent']:.1%}",
         f"{r['within_0_1_percent']:.1%}", f"{r['optimality']:.4f}",
         "" if np.isnan(r["gradients_per_image"]) else f"{r['gradients_per_image']:.0f}{over(r['gradients_per_image'])}",
         "" if np.isnan(r["seconds"]) else f"{r['seconds']:.1f}", f"{r['median_l2']:.4f}"] for name, r in rows.items()])


def plot_curves(model_name: str, l2: dict, best: np.ndarray, path: Path) -> None:
    """One robust-accuracy-versus-ε curve per attack and one for the best known, to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(d, grid):
        return np.asarray(attacks.robust_accuracy_curve(np.where(np.isfinite(d), d, 0), np.isfinite(d), grid))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = np.linspace(0.0, float(best.max()) * 1.1, 400)
    colors = plt.get_cmap("tab20").colors
    for index, (name, d) in enumerate(l2.items()):
        ax.plot(grid, curve(d, grid), label=name, color=colors[index % len(colors)],
                linewidth=1.2 if name.startswith("ours") else 0.9, linestyle="-" if name.startswith("ours") else "--")
    ax.plot(grid, curve(best, grid), label="best known", color="black", linewidth=2)
    ax.set(xlabel="ε (L2)", ylabel="robust accuracy", title=f"{model_name}: robust accuracy vs ε", ylim=(0, 1.01))
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)


def load_models(names, workdir, data_dir) -> dict:
    """{name: (flax module, variables)}: zoo models from WORKDIR (trained if missing), ReluCNN from scripts."""
    zoo = [name for name in names if name != RELU_CNN]
    models = {name: (model.module, params)
              for name, (model, params) in trained_models(zoo, "fashion_mnist", workdir, data_dir).items()}
    if RELU_CNN in names:
        models[RELU_CNN] = trained_relu_cnn(workdir, data_dir)
    return {name: models[name] for name in names}


def have_advlib() -> bool:
    try:
        import adv_lib  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class Reused(tuple):
    """An attack's figures read back from an earlier run: (None, gradients per image, seconds), and its L2."""
    l2: np.ndarray


def reused_results(directory, model: str, num_images: int, steps: int, rerun=()) -> dict:
    """{attack: Reused} from DIR/results.json's run on the same images (none without --reuse)."""
    if directory is None:
        return {}
    results = json.loads((Path(directory) / "results.json").read_text())
    if results["steps"] != steps:
        raise SystemExit(f"--reuse: {directory} ran {results['steps']} steps, not {steps}")
    previous = results["models"].get(model)
    if previous is None:
        return {}
    if previous["num_images"] != num_images:
        raise SystemExit(f"--reuse: {directory} ran {model} on {previous['num_images']} images, not {num_images}")
    out = {}
    for name, l2 in previous["l2"].items():
        if name != OURS_BEST and not any(part in name for part in rerun):
            row = previous["rows"][name]
            out[name] = Reused((None, row["gradients_per_image"], row["seconds"]))
            out[name].l2 = np.array([np.inf if d is None else d for d in l2])
    return out


def bench_model(name, module, variables, test, args) -> dict:
    """Every attack on one model: the figures per attack, and its curves drawn to OUT."""
    logits_fn = jax.tree_util.Partial(module.apply, variables)
    images, labels = correctly_classified(logits_fn, test.images, test.labels, args.num_images)
    print(f"{name}: {len(labels)} images", file=sys.stderr, flush=True)
    found = reused_results(args.reuse, name, len(labels), args.steps, args.rerun)
    def skip(attack):       # reused, or left out by --skip
        return attack in found or any(part in attack for part in args.skip)
    found.update(run_jax(logits_fn, images, labels, args.steps, args.warm, skip=skip))
    if not args.jax_only:
        from scripts.torch_twins import check_twin, torch_twin
        twin = torch_twin(module, variables)
        check_twin(logits_fn, twin, images, name=name)  # before any bench
        found.update(run_advlib(twin, images, labels, args.steps, skip=skip))
    l2 = distances(logits_fn, images, labels, found)
    best = np.min(np.stack(list(l2.values())), axis=0)
    broken = np.isfinite(best)
    if not broken.all():
        print(f"{name}: no attack changed the label of {int((~broken).sum())} images; left out", file=sys.stderr)
    l2 = {k: v[broken] for k, v in l2.items()}
    rows = score(l2, found, best[broken])
    plot_curves(name, l2, best[broken], args.out_dir / f"{name}_robust_accuracy.png")
    out = {"num_images": int(broken.sum()), "rows": rows,
           "l2": {k: [None if not np.isfinite(x) else float(x) for x in v] for k, v in l2.items()}}
    if args.certify:
        out["certified"] = sandwich(name, module, variables, images[broken], labels[broken], best[broken], args)
    return out


def sandwich(name, module, variables, images, labels, best, args) -> dict:
    """The certified radius (CROWN and pairwise Lipschitz, the larger) below the best known, per image."""
    start = time.perf_counter()
    proofs = certificates(module, images, labels, params=variables)
    seconds = time.perf_counter() - start
    radius = np.asarray(proofs.radius, np.float64)
    ratio = best / np.maximum(radius, np.finfo(np.float64).tiny)
    save_figure_atomic(sandwich_figure({name: (radius, best)}, f"{name}: certified and best known L2"),
                       args.out_dir / f"{name}_sandwich.png", dpi=120)
    return dict(median_ratio=float(np.median(ratio)), p90_ratio=float(np.percentile(ratio, 90)),
                violations=int(np.sum(radius > best * (1 + 1e-6))), seconds=seconds,
                radius=[float(r) for r in radius])


def certified_line(certified: dict) -> str:
    return (f"\nCertified radius (`certificates().radius`) below the best known: best / certified median "
            f"{certified['median_ratio']:.3g}, 90th percentile {certified['p90_ratio']:.3g}; "
            f"{certified['violations']} images certified above the best known; {certified['seconds']:.1f} s\n")


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["FC100-100-10", "ConvNet", RELU_CNN])
    parser.add_argument("--num-images", type=int, default=None, help="per model (default 500; --quick: 16)")
    parser.add_argument("--steps", type=int, default=None, help="gradients per iterative attack (default 1000; "
                        "--quick: 100)")
    parser.add_argument("--quick", action="store_true", help="a smoke test in a few minutes")
    parser.add_argument("--jax-only", action="store_true", help="jaxadv's attacks only (no torch)")
    parser.add_argument("--workdir", default="runs/fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default=None, help="default WORKDIR/bench_optimality/<run>")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--reuse", default=None, metavar="DIR", help="take the attacks that DIR/results.json holds "
                        "(same models, images and steps) from there instead of running them again")
    parser.add_argument("--rerun", nargs="+", default=[], metavar="TEXT",
                        help="with --reuse: run again the attacks whose names contain TEXT (e.g. adv_lib)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="TEXT",
                        help="leave out the attacks whose names contain TEXT (e.g. 'ours: DDN'); the best known "
                        "is then taken over the others")
    parser.add_argument("--warm", action="store_true", help="time jaxadv's attacks on a second run, after "
                        "compilation (each runs twice)")
    parser.add_argument("--no-certify", dest="certify", action="store_false",
                        help="leave out the certified radius (CROWN) beside the best known")
    args = parser.parse_args(argv)
    if args.num_images is None:
        args.num_images = 16 if args.quick else 500
    if args.steps is None:
        args.steps = 100 if args.quick else 1000
    if args.num_images < 1 or args.steps < 10 or args.threads < 1:
        parser.error("--num-images and --threads must be >= 1, --steps >= 10")
    if not args.jax_only and not have_advlib():
        print("adv_lib or torch is missing (see --help for the bench extra): running jaxadv's attacks only",
              file=sys.stderr)
        args.jax_only = True
    if not args.jax_only:
        import torch
        torch.set_num_threads(args.threads)
    run = (f"{'quick' if args.quick else 'full'}_{args.num_images}x{args.steps}{'_jax' if args.jax_only else ''}"
           f"{'_warm' if args.warm else ''}")
    args.out_dir = Path(args.out_dir or Path(args.workdir) / "bench_optimality" / run)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    test = load_dataset("fashion_mnist", "test", args.data_dir)
    models = load_models(args.models, args.workdir, args.data_dir)
    header = (f"{jax.device_count()} {jax.devices()[0].platform} device(s) ({jax.devices()[0].device_kind}); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; up to {args.num_images} correctly "
              f"classified Fashion-MNIST test images per model; untargeted minimal L2 in [0, 1]; {args.steps} steps")
    print(header, flush=True)
    results, text = {"header": header, "steps": args.steps, "models": {}}, f"# bench_optimality\n\n{header}\n"
    for name, (module, variables) in models.items():
        results["models"][name] = bench_model(name, module, variables, test, args)
        section = f"\n## {name} ({results['models'][name]['num_images']} images)\n\n" + table(
            results["models"][name]["rows"])
        if "certified" in results["models"][name]:
            section += certified_line(results["models"][name]["certified"])
        print(section, flush=True)
        text += section
        write_json_atomic(args.out_dir / "results.json", results)      # after each model: a partial run keeps it
        write_text_atomic(args.out_dir / "table.md", text)
    print(f"wrote {args.out_dir}/results.json, table.md and the curves", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
