"""Certifying against attacking: CROWN's certified radius beside lbfgs_attack_untargeted, in one process.

    python scripts/bench_certify.py [--model FC100-100-10] [--num-images 1000] [--workdir runs/fashion_mnist]
                                    [--data-dir DIR] [--steps 20]

On the first --num-images correctly classified Fashion-MNIST test images of a zoo model (trained and
saved to WORKDIR if missing): the wall time of `certified_radius` and of the untargeted attack (each
compilation included, then a second, compiled run of each), the time ratio, and the median and 90th
percentile of attained / certified per image (≥ 1 wherever both are right).
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

from jaxadv.attacks import lbfgs_attack_untargeted  # noqa: E402
from jaxadv.certify import certified_radius  # noqa: E402
from jaxadv.data import load_dataset  # noqa: E402
from jaxadv.functional import logits_function  # noqa: E402
from jaxadv.zoo import trained_models  # noqa: E402


def _timed(run):
    start = time.perf_counter()
    out = jax.block_until_ready(run())
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="FC100-100-10")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--workdir", default="runs/fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        parser.exit(2, "bench_certify: --num-images and --steps must be >= 1\n")
    model, variables = trained_models([args.model], "fashion_mnist", args.workdir, args.data_dir)[args.model]
    fn = logits_function(model.module, variables)
    test = load_dataset("fashion_mnist", "test", args.data_dir)
    predicted = np.argmax(np.asarray(jax.jit(fn)(jnp.asarray(test.images[:4 * args.num_images]))), -1)
    index = np.where(predicted == test.labels[:4 * args.num_images])[0][:args.num_images]
    images, labels = jnp.asarray(test.images[index]), jnp.asarray(test.labels[index])
    def certify():
        return certified_radius(fn, images, labels, steps=args.steps)
    def attack():
        return lbfgs_attack_untargeted(fn, images, labels)
    print(f"{args.model}, {len(index)} images on {jax.devices()[0].platform}", flush=True)
    radii, certify_first = _timed(certify)
    print(f"certify: {certify_first:.1f} s", flush=True)
    result, attack_first = _timed(attack)
    print(f"attack: {attack_first:.1f} s", flush=True)
    _, certify_again = _timed(certify)
    _, attack_again = _timed(attack)
    success = np.asarray(result.success)
    ratio = np.asarray(result.l2)[success] / np.asarray(radii)[success]
    print(f"compiled: certify {certify_again:.1f} s, attack {attack_again:.1f} s")
    print(f"time ratio attack / certify: {attack_first / certify_first:.2f} ({attack_again / certify_again:.2f} compiled)")
    print(f"attained / certified: median {np.median(ratio):.3f}, 90th percentile {np.percentile(ratio, 90):.3f}, "
          f"min {ratio.min():.4f} over {success.sum()} attacked images")


if __name__ == "__main__":
    main()
