"""adv_lib's minimal-L2 attacks on a small CNN, measured once and stored, so that tests compare without torch.

    OMP_WAIT_POLICY=PASSIVE python scripts/advlib_reference.py [--data-dir DIR] [--num-images 100]
                                                               [--out tests/data/advlib_reference]

Needs the bench extra: torch and adv-lib 0.2.8, which installs in two steps:

    pip install "setuptools<80" wheel
    pip install --no-build-isolation adv-lib        # or: pip install --no-build-isolation -e ".[bench]"

The model is `scripts.bench_models.reference_cnn`, trained 2 epochs on the first 10,000
Fashion-MNIST training images from PRNGKey(0); the images are the first --num-images test
images it classifies correctly. Both are written to OUT.npz (weights float32, images uint8:
image = uint8 / 255 exactly), and adv_lib's results to OUT.json: per attack its settings and,
per image, success (rechecked on the returned image by the PyTorch twin) and L2 distance
(null where it failed), with the command, the adv_lib / torch versions and a fingerprint of
the .npz's arrays, so that a test can refuse a stale pair. Attacks: DDN (levels=None, continuous
output), ALMA (L2), FMN (L2), each 1,000 steps; DeepFool and SuperDeepFool at adv_lib's defaults.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxadv.report import write_json_atomic  # noqa: E402
from jaxadv.data import load_dataset  # noqa: E402
from scripts.bench_models import correctly_classified, reference_cnn, train_cnn  # noqa: E402
from experiments.cli import run_main  # noqa: E402

NUM_TRAIN = 10_000
EPOCHS = 2
#: adv_lib's attacks and settings, as run here: (adv_lib function name, keyword arguments).
ATTACKS = {
    "ddn": ("ddn", dict(steps=1000, levels=None)),
    "alma": ("alma", dict(num_steps=1000, distance="l2")),
    "fmn": ("fmn", dict(norm=2, steps=1000)),
    "deepfool": ("df", dict(steps=100, overshoot=0.02, norm=2)),
    "superdeepfool": ("sdf", dict(steps=100, df_steps=100, overshoot=0.02, search_iter=10)),
}


def fingerprint(arrays: dict) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes, in name order: what a stale file would not match."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def flat_variables(variables) -> dict:
    """{"layers_0/kernel": array, ...}: a flax variables tree as flat float32 arrays."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, np.float32)
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}


def build_reference(data_dir: str | None, num_images: int) -> dict:
    """The arrays of OUT.npz: the reference CNN's weights, its images (uint8) and labels."""
    train = load_dataset("fashion_mnist", "train", data_dir)
    test = load_dataset("fashion_mnist", "test", data_dir)
    module = reference_cnn()
    variables = train_cnn(module, train.images[:NUM_TRAIN], train.labels[:NUM_TRAIN], jax.random.PRNGKey(0),
                          EPOCHS, name="reference_cnn")
    # Images rounded to uint8 first, so that what is stored is exactly what was attacked.
    pixels = np.round(test.images * 255).astype(np.uint8)
    images, labels = correctly_classified(jax.tree_util.Partial(module.apply, variables),
                                          pixels.astype(np.float32) / 255, test.labels, num_images)
    return {**flat_variables(variables), "images": np.round(images * 255).astype(np.uint8),
            "labels": labels.astype(np.int32)}


def run_advlib(twin, images: np.ndarray, labels: np.ndarray) -> dict:
    """{attack: {"settings", "success", "l2", "seconds"}} of adv_lib's attacks on the twin."""
    import adv_lib.attacks
    import torch

    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    out = {}
    for name, (function, settings) in ATTACKS.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        adversarial = getattr(adv_lib.attacks, function)(twin, x, y, **settings).detach()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            success = (twin(adversarial).argmax(1) != y).numpy()
        distance = (adversarial - x).flatten(1).double().norm(dim=1).numpy()
        out[name] = {"function": f"adv_lib.attacks.{function}", "settings": settings,
                     "success": success.tolist(), "seconds": round(seconds, 2),
                     "l2": [float(d) if s else None for d, s in zip(distance, success)]}
        print(f"{name}: success {success.mean():.1%}, median L2 (successes) "
              f"{np.median(distance[success]) if success.any() else float('nan'):.4f}, {seconds:.1f} s", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/data/advlib_reference"))
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num-images: must be >= 1")
    try:
        import adv_lib
        import torch
    except ImportError as error:
        parser.exit(2, f"{parser.prog}: error: {error.name} is missing: install the bench extra (see --help)\n")
    torch.set_num_threads(1)
    from scripts.torch_twins import check_twin, torch_twin

    arrays = build_reference(args.data_dir, args.num_images)
    module, images = reference_cnn(), arrays["images"].astype(np.float32) / 255
    variables = {"params": {}}
    for key, value in arrays.items():
        if "/" in key:
            layer, leaf = key.split("/")
            variables["params"].setdefault(layer, {})[leaf] = value
    twin = torch_twin(module, variables)
    check_twin(jax.tree_util.Partial(module.apply, variables), twin, images, name="reference_cnn")
    results = run_advlib(twin, images, arrays["labels"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out.with_suffix(".npz"), **arrays)
    write_json_atomic(out.with_suffix(".json"), {
        "command": "OMP_WAIT_POLICY=PASSIVE python scripts/advlib_reference.py " + " ".join(argv or sys.argv[1:]),
        "versions": {"adv_lib": getattr(adv_lib, "__version__", None) or _version("adv-lib"),
                     "torch": torch.__version__, "jax": jax.__version__},
        "model": f"scripts.bench_models.reference_cnn, {EPOCHS} epochs on the first {NUM_TRAIN} Fashion-MNIST "
                 "training images from PRNGKey(0)",
        "fingerprint": fingerprint(arrays), "num_images": int(len(arrays["labels"])), "attacks": results})
    print(f"wrote {out.with_suffix('.npz')} and {out.with_suffix('.json')}")


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    run_main(main)
