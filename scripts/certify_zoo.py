"""Soundness on the zoo: certified radii never above the attack's attained minimum, per image, every model.

    python scripts/certify_zoo.py [--workdir runs/fashion_mnist] [--num-images 1000] [--images ConvNet=50]
                                  [--models FC100-100-10 ...] [--out certify_zoo.json] [--data-dir DIR] [--compiled]

On the first --num-images correctly classified Fashion-MNIST test images of each zoo model (trained and
saved to WORKDIR if missing, and said so): `jaxadv.certify.certificates` (CROWN's radius, the pairwise
Lipschitz radius, the larger of the two) and `lbfgs_attack_untargeted`'s attained L2 (its default). Per
model it prints the images where a certified radius exceeds the attained minimum (there must be none),
the median and 90th percentile of attained / certified for the certified radius, CROWN's and the pairwise
one, how many images CROWN certified (crown >= pairwise), and both wall times, compilation included
(--compiled: also a second, compiled run of each, side by side in the same process); the JSON (written
after every model) holds the same and every image's radii. --images NAME=N takes N images for one model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxadv.attacks import lbfgs_attack_untargeted  # noqa: E402
from jaxadv.certify import certificates, sandwich_summary  # noqa: E402
from jaxadv.data import load_dataset  # noqa: E402
from jaxadv.functional import logits_function  # noqa: E402
from jaxadv.zoo import trained_models  # noqa: E402
from experiments.cli import run_main  # noqa: E402

ZOO = ("FC10(1)", "FC10(1e-2)", "FC10(1e-4)", "FC100-100-10", "FC123-456-10", "FC200-200-10", "AE400-10", "ConvNet")
ROUNDING = 1e-5   # float32: a radius equal to the attained distance may exceed it by rounding alone


def _timed(run):
    start = time.perf_counter()
    out = jax.block_until_ready(run())
    return out, time.perf_counter() - start


def _correct(fn, test, count: int):
    predicted = np.concatenate([np.asarray(jax.jit(fn)(jnp.asarray(test.images[i:i + 1000])).argmax(-1))
                                for i in range(0, min(len(test.labels), 4 * count), 1000)])
    return np.where(predicted == test.labels[:len(predicted)])[0][:count]


def certify_model(name: str, model, variables, test, count: int, compiled: bool = False) -> dict:
    """One model's sandwich: radii, attained distances, ratios, violations and times (compiled: twice)."""
    fn = logits_function(model.module, variables)
    index = _correct(fn, test, count)
    images, labels = jnp.asarray(test.images[index]), jnp.asarray(test.labels[index])
    found, certify_s = _timed(lambda: certificates(fn, images, labels))
    attack, attack_s = _timed(lambda: lbfgs_attack_untargeted(fn, images, labels))
    attained, moved = np.asarray(attack.l2, np.float64), np.asarray(attack.success)
    radii = {key: np.asarray(value, np.float64) for key, value in found._asdict().items()}
    out = {"images": len(index), "certify_s": certify_s, "attack_s": attack_s, "attacked": int(moved.sum()),
           "crown_certified": int(np.sum(radii["crown"] >= radii["pairwise"])),
           "index": index.tolist(), "attained": attained.tolist(), "success": moved.tolist()}
    if compiled:
        out["certify_compiled_s"] = _timed(lambda: certificates(fn, images, labels))[1]
        out["attack_compiled_s"] = _timed(lambda: lbfgs_attack_untargeted(fn, images, labels))[1]
    for key, value in radii.items():
        out[key] = value.tolist()
        out[f"summary_{key}"] = sandwich_summary(value, attained, moved)
        out[f"violations_{key}"] = np.flatnonzero(moved & (value > attained * (1 + ROUNDING))).tolist()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--images", nargs="*", default=[], metavar="NAME=N")
    parser.add_argument("--models", nargs="*", default=list(ZOO))
    parser.add_argument("--out", default="certify_zoo.json")
    parser.add_argument("--compiled", action="store_true", help="also time a second, compiled run of each")
    args = parser.parse_args(argv)
    counts = {name: args.num_images for name in args.models}
    for item in args.images:
        name, _, value = item.partition("=")
        if name not in counts or not value.isdigit() or int(value) < 1:
            parser.exit(2, f"certify_zoo: --images {item!r}: NAME=N with NAME among --models and N >= 1\n")
        counts[name] = int(value)
    if args.num_images < 1:
        parser.exit(2, "certify_zoo: --num-images must be >= 1\n")
    test = load_dataset("fashion_mnist", "test", args.data_dir)
    results = {}
    for name in args.models:
        model, variables = trained_models([name], "fashion_mnist", str(Path(args.workdir).resolve()),
                                          args.data_dir)[name]
        results[name] = row = certify_model(name, model, variables, test, counts[name], args.compiled)
        Path(args.out).write_text(json.dumps(results))
        ratios = "  ".join(f"{key} {row[f'summary_{key}']['ratio_median']:.3f}/{row[f'summary_{key}']['ratio_p90']:.3f}"
                           for key in ("radius", "crown", "pairwise"))
        violations = sum(len(row[f"violations_{key}"]) for key in ("radius", "crown", "pairwise"))
        print(f"{name}: {row['images']} images, attained/certified median/p90: {ratios}; CROWN certified "
              f"{row['crown_certified']}; violations {violations}; certify {row['certify_s']:.1f} s, "
              f"attack {row['attack_s']:.1f} s" + (f" (compiled: certify {row['certify_compiled_s']:.1f} s, attack "
                                                  f"{row['attack_compiled_s']:.1f} s)" if args.compiled else ""),
              flush=True)


if __name__ == "__main__":
    run_main(main)
