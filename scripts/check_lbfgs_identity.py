"""Every field of the L-BFGS attack's results on 1,000 test images, saved, or compared with a saved run.

    python scripts/check_lbfgs_identity.py --out before.npz              # save this code's results
    python scripts/check_lbfgs_identity.py --out after.npz --compare before.npz

Runs `lbfgs_attack` (targeted: a random other label per image, seed --seed)
and `lbfgs_attack_untargeted`, each with its default config, on the first
--num-images Fashion-MNIST test images of the zoo's FC100-100-10 (loaded from
WORKDIR/models; trained and stored there if missing). More images than lanes,
so that lanes finish and take the next image. With --compare, prints per
field how many images differ and the largest difference; exits 1 if any do.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxadv.attacks import lbfgs_attack, lbfgs_attack_untargeted, random_wrong_targets  # noqa: E402
from jaxadv.data import load_dataset  # noqa: E402
from jaxadv.zoo import trained_models  # noqa: E402
from experiments.cli import run_main  # noqa: E402

MODEL = "FC100-100-10"


def results(model, params, images, labels, seed):
    """{'targeted.<field>' / 'untargeted.<field>': array} for both attacks, and their seconds."""
    targets = random_wrong_targets(jax.random.PRNGKey(seed), labels)
    out, seconds = {"targets": np.asarray(targets)}, {}
    runs = (("targeted", lambda: lbfgs_attack(model.module, images, targets, labels=labels, params=params)),
            ("untargeted", lambda: lbfgs_attack_untargeted(model.module, images, labels, params=params)))
    for name, run in runs:
        start = time.perf_counter()
        result = jax.block_until_ready(run())
        seconds[name] = time.perf_counter() - start
        out.update({f"{name}.{field}": np.asarray(value) for field, value in result._asdict().items()})
    return out, seconds


def compare(new: dict, old: dict) -> int:
    """Prints, per field, the images that differ and the largest difference; returns how many fields differ."""
    differing = 0
    for field in sorted(set(new) | set(old)):
        if field not in new or field not in old:
            print(f"{field:32s} only in the {'new' if field in new else 'old'} run")
            differing += 1
            continue
        a, b = new[field], old[field]
        if a.shape != b.shape:
            print(f"{field:32s} shapes differ: {a.shape} against {b.shape}")
            differing += 1
            continue
        rows = (a != b).reshape(a.shape[0], -1).any(axis=1) if a.ndim else np.asarray([a != b])
        both_inf = np.isinf(a) & np.isinf(b) & (np.sign(a) == np.sign(b)) if a.dtype.kind == "f" else False
        gap = np.where(both_inf, 0, np.abs(a.astype(np.float64) - b.astype(np.float64)))
        largest = float(np.nanmax(gap)) if gap.size else 0.0
        print(f"{field:32s} {int(rows.sum()):5d} of {rows.size} images differ; largest difference {largest:.3g}")
        differing += bool(rows.any())
    return differing


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--workdir", default="runs/fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="save every field here (.npz)")
    parser.add_argument("--compare", default=None, metavar="OLD.npz", help="report the fields that differ from OLD")
    args = parser.parse_args(argv)
    if args.compare is not None and not Path(args.compare).is_file():
        parser.error(f"--compare: no such file {args.compare}")

    model, params = trained_models([MODEL], "fashion_mnist", args.workdir, args.data_dir)[MODEL]
    test = load_dataset("fashion_mnist", "test", args.data_dir)
    images, labels = test.images[:args.num_images], test.labels[:args.num_images]
    out, seconds = results(model, params, images, labels, args.seed)
    np.savez(args.out, **out)
    print(f"{MODEL}, {args.num_images} images: targeted {seconds['targeted']:.1f} s, "
          f"untargeted {seconds['untargeted']:.1f} s (compile included); saved {args.out}")
    if args.compare is not None:
        with np.load(args.compare) as old:
            differing = compare(out, dict(old))
        print("bit-identical" if differing == 0 else f"{differing} field(s) differ")
        return 1 if differing else 0
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
