"""What every experiment shares: command-line flags, the trained zoo, atomic output files.

    parser = argparse.ArgumentParser(); add_common_args(parser); args = parser.parse_args()
    workdir = resolve_workdir(args)                             # runs/<dataset> by default
    models = trained_models(ZOO, args.dataset, workdir, args.data_dir, args.quick)
    out = experiment_dir(workdir, "cross_model")                # WORKDIR/cross_model/
    write_json_atomic(out / "results.json", {...})

Trained models live in WORKDIR/models/<name>/ (see jaxadv.checkpoint) and are
reused by every later experiment; a model trained on custom data is stored
under "<name>@<tag>" (e.g. "FC100-100-10@P1").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import jax
import numpy as np

from jaxadv.attacks import lbfgs_attack_core, random_wrong_targets
from jaxadv.checkpoint import has_checkpoint, load_checkpoint, read_meta, save_checkpoint
from jaxadv.data import DATASETS, Dataset, load_dataset
from jaxadv.io import atomic_path, write_atomic
from jaxadv.models import get_model
from jaxadv.sweep import SweepMismatch, chunk_size_for_memory, fingerprint_arrays, run_sweep, sharded
from jaxadv.train import error_rate, train, zoo_config

#: --quick trains on this many training images (the first ones).
QUICK_TRAIN_SIZE = 2000


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.allow_abbrev = False      # a typo (--num-image) is an error, never a prefix of another flag
    parser.add_argument("--dataset", choices=DATASETS, default="fashion_mnist",
                        help="data set (default: fashion_mnist, complete offline; MNIST needs its training images)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding mnist/ and/or fashion_mnist/ IDX files "
                             "(default: $JAXADV_DATA_DIR, else tensorflow-datasets)")
    parser.add_argument("--workdir", default=None, help="output folder (default: runs/<dataset>)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_TRAIN_SIZE} training images, 1-2 epochs, small sizes")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first: one process per host (SLURM, TPU pods, or "
                             "JAX's coordinator environment variables); attacks then shard over every host's devices")
    # The default workdir depends on --dataset, which argparse defaults cannot express: fill it in
    # after parsing, so that every caller sees args.workdir already set.
    parse_known_args = parser.parse_known_args

    def parse_known_args_with_workdir(args=None, namespace=None):
        namespace, rest = parse_known_args(args, namespace)
        if getattr(namespace, "workdir", None) is None:
            namespace.workdir = str(Path("runs") / namespace.dataset)
        if getattr(namespace, "distributed", False):
            jax.distributed.initialize()   # before anything else touches a device
        return namespace, rest

    parser.parse_known_args = parse_known_args_with_workdir
    return parser


def resolve_workdir(args: argparse.Namespace) -> Path:
    """args.workdir as a Path (add_common_args fills in runs/<dataset> when it was not given)."""
    return Path(args.workdir) if args.workdir else Path("runs") / args.dataset


def experiment_dir(workdir: str | os.PathLike, name: str) -> Path:
    """WORKDIR/<name>/, created if needed: where experiment `name` writes its outputs."""
    path = Path(workdir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_dir(workdir: str | os.PathLike, name: str, tag: str | None = None) -> Path:
    return Path(workdir) / "models" / _stored_name(name, tag)


def trained_models(names: Iterable[str], dataset: str, workdir: str | os.PathLike | None,
                   data_dir: str | None = None, quick: bool = False, *,
                   train_set: Dataset | None = None, tag: str | None = None,
                   seed: int = 0, verbose: bool = True) -> dict:
    """{stored name: (model, params)} for `names`, loaded from WORKDIR/models/ or trained and saved.

    By default a model is trained on the whole training split of `dataset` (the
    first QUICK_TRAIN_SIZE images with `quick`). With `train_set` (e.g. P1) a
    `tag` is required and the model is stored and returned as "<name>@<tag>".
    A stored quick model is retrained when a full one is asked for; a stored
    full model serves quick runs too. Training is deterministic: the key is
    PRNGKey(seed) folded with a hash of the stored name.
    """
    names = [names] if isinstance(names, str) else list(names)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    workdir = Path("runs") / dataset if workdir is None else Path(workdir)
    if train_set is not None and not tag:
        raise ValueError("tag is required with train_set, so that the model is not stored under the "
                         "name of the model trained on the whole training set")
    if tag is not None and (not isinstance(tag, str) or not tag or "/" in tag):
        raise ValueError(f"tag must be a non-empty string without '/', got {tag!r}")
    if train_set is not None:
        train_set = Dataset(np.asarray(train_set.images), np.asarray(train_set.labels))
    fingerprint = _fingerprint(train_set) if train_set is not None else None

    out, data = {}, train_set
    for name in names:
        model = get_model(name)
        stored = _stored_name(name, tag)
        directory = model_dir(workdir, name, tag)
        if has_checkpoint(directory):
            params, meta = load_checkpoint(directory, model)
            if _reusable(meta, dataset, quick, fingerprint, directory):
                out[stored] = (model, params)
                continue
        if data is None:
            data = load_dataset(dataset, "train", data_dir)
        subset = _quick_subset(data) if quick else data
        config = zoo_config(model, quick=quick, verbose=verbose)
        if verbose:
            print(f"training {stored} on {len(subset.labels)} {dataset} images "
                  f"({config.epochs} epochs, Adam lr {config.learning_rate:g})", file=sys.stderr, flush=True)
        start = time.perf_counter()
        params = train(model, subset.images, subset.labels, _model_key(seed, stored), config)
        params = jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        meta = {"model": name, "stored_name": stored, "tag": tag, "dataset": dataset, "quick": quick,
                "seed": seed, "num_train": len(subset.labels), "train_fingerprint": fingerprint,
                "num_params": model.num_params(), "train_seconds": round(seconds, 2),
                "train_error": error_rate(model, params, subset.images, subset.labels),
                "optimizer": "adam, cosine-decayed learning rate", "config": config._asdict()}
        save_checkpoint(directory, params, meta)
        out[stored] = (model, params)
    return out


def load_meta(workdir: str | os.PathLike, name: str, tag: str | None = None) -> dict:
    """The meta.json of a stored model (training settings, train_seconds, ...), without its params' checksum."""
    return read_meta(model_dir(workdir, name, tag))


# -- output files ---------------------------------------------------------------

def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON (numpy scalars and arrays are converted)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_to_json) + "\n")


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """fig.savefig to a temporary file in the same folder, then os.replace."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **savefig_kwargs)


def markdown_table(headers: Sequence, rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table; floats are shown with 4 significant digits."""
    if any(len(row) != len(headers) for row in rows):
        raise ValueError(f"every row must have {len(headers)} cells, one per header")
    cells = lambda row: "| " + " | ".join(_cell(c) for c in row) + " |"
    return "\n".join([cells(headers), "|" + "---|" * len(headers)] + [cells(r) for r in rows]) + "\n"


def percent(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


# -- helpers -----------------------------------------------------------------------

def _stored_name(name: str, tag: str | None) -> str:
    return f"{name}@{tag}" if tag else name


def _model_key(seed: int, stored_name: str) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(stored_name.encode()) & 0x7FFFFFFF)


def _quick_subset(data: Dataset) -> Dataset:
    return Dataset(data.images[:QUICK_TRAIN_SIZE], data.labels[:QUICK_TRAIN_SIZE])


def _fingerprint(data: Dataset) -> str:
    """Cheap identity of a custom training set, so a tag reused for other data retrains."""
    crc = zlib.crc32(np.ascontiguousarray(data.labels).tobytes())
    crc = zlib.crc32(np.ascontiguousarray(data.images[:: max(len(data.images) // 64, 1)]).tobytes(), crc)
    return f"{len(data.labels)}:{crc:08x}"


def _reusable(meta: dict, dataset: str, quick: bool, fingerprint: str | None, directory: Path) -> bool:
    if meta.get("dataset") != dataset:
        raise ValueError(f"{str(directory)!r} holds a model trained on {meta.get('dataset')!r}, not "
                         f"{dataset!r}: use another --workdir (the default is runs/<dataset>)")
    if meta.get("quick") and not quick:
        return False  # a smoke-test model never stands in for a real one
    if fingerprint is not None and meta.get("train_fingerprint") not in (None, fingerprint):
        return False
    return True


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _to_json(value):
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def run_main(main) -> None:
    """Run an experiment's `main`; on Ctrl-C, say what is kept instead of printing a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: trained models and finished attack chunks are saved in the workdir; "
              "run the same command again to resume.", file=sys.stderr)
        raise SystemExit(130) from None
    except SweepMismatch as error:
        # Saved chunks of other inputs or another attack (e.g. after an upgrade): the user's call, not a bug.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

# -- the attack over a data set: sharded over all devices, in resumable chunks ---------------------

NUM_CLASSES = 10
DEFAULT_BLOCK_SIZE = 1000       # images per device pass: several rounds of the attack's lanes
MAX_CHUNK_PER_DEVICE = 2000     # a chunk is the unit of loss on interruption: keep it minutes, not hours
RESULT_FIELDS = ("adversarial", "success", "distortion", "l2", "c", "iterations", "evaluations", "search_distortion")

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_attack_args(parser: argparse.ArgumentParser, images: str, default_num_images: int,
                    quick_num_images: int) -> None:
    """The flags of every experiment that attacks a set of images through `attack_images`."""
    parser.add_argument("--num-images", type=positive_int, default=None,
                        help=f"{images} attacked per model (default {default_num_images}, "
                             f"{quick_num_images} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="picks the images, the targets and the noise")
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="images per saved chunk (default: from device memory, at most "
                             f"{MAX_CHUNK_PER_DEVICE} per device); a multiple of devices x block size")
    parser.add_argument("--block-size", type=positive_int, default=None,
                        help=f"images one device attacks at once (default {DEFAULT_BLOCK_SIZE}, fewer for small "
                             "runs); results do not depend on the number of devices for a fixed block size")


def attack_bytes_per_image(model, config, block_size) -> int:
    """Device memory per image of a block attacked with `lbfgs_attack_core`, in bytes (float32).

    The attack keeps L-BFGS state only for its `config.lanes` lanes: the
    (s, y) history 2·m·n, about 10 image-sized vectors (iterate, trial,
    gradient, direction, origin, best) and 3x the activations for the forward
    and backward passes. Every image of the block holds about 4·n more
    (the image, its best point, the output, the padding copy).
    """
    n = math.prod(model.input_shape)
    lanes = block_size if config.lanes is None else min(config.lanes, block_size)
    activations = sum(math.prod(s) for s in model.output_shapes())
    per_lane = 2 * config.memory_size * n + 10 * n + 3 * activations
    return 4 * (4 * n + math.ceil(lanes * per_lane / block_size))


def attack_images(model, params, images, targets, directory, config, chunk_size, block_size, label=""):
    """`lbfgs_attack_core` on every image, sharded over all devices, in resumable chunks under `directory`."""
    logits_fn = jax.tree_util.Partial(model.apply, params)

    def attack(x, t):
        result = lbfgs_attack_core(logits_fn, x, t, 0.0, 1.0, config=config)
        return {f: getattr(result, f) for f in RESULT_FIELDS}

    attack_on_devices = sharded(attack, block_size=block_size)
    sweep_config = {"model": model.name, "params": fingerprint_arrays({"params": params}),
                    "attack": repr(config), "attack_source": attack_source_fingerprint(),
                    "jax": jax.__version__, "block_size": block_size}
    return run_sweep(lambda chunk: attack_on_devices(chunk["images"], chunk["targets"]),
                     {"images": images, "targets": targets}, directory, chunk_size,
                     config=sweep_config, label=label or f"attack {model.name}")


def attack_source_fingerprint() -> str:
    """sha256 of the attack's source files (jaxadv/attacks/*.py and the solver's optax face, jaxadv/optim.py):
    a resumed sweep must not mix two versions of the algorithm."""
    import jaxadv.attacks as attacks
    import jaxadv.optim as optim
    folder = os.path.dirname(attacks.__file__)
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")] + [optim.__file__]
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    return digest.hexdigest()


def choose_sizes(num_images, num_devices, model, config, chunk_size=None, block_size=None):
    """(chunk, block): a block per device pass, a chunk a whole number of devices x block rows.

    Small runs shrink the block so that padding never costs more than one block
    per device; the chunk follows from --chunk-size, else from device memory
    (`chunk_size_for_memory`), at most MAX_CHUNK_PER_DEVICE per device.
    """
    block = block_size or min(DEFAULT_BLOCK_SIZE, math.ceil(num_images / num_devices))
    step = num_devices * block
    if chunk_size is None:
        chunk_size = chunk_size_for_memory(attack_bytes_per_image(model, config, block), num_devices=num_devices,
                                           multiple_of=step, maximum=max(step, MAX_CHUNK_PER_DEVICE * num_devices))
        chunk_size = min(chunk_size, step * math.ceil(num_images / step))
    if chunk_size % step:
        raise ValueError(f"--chunk-size: must be a multiple of devices x block = {num_devices} x {block}, "
                         f"got {chunk_size}")
    return chunk_size, block


def select_images(dataset, num_images, seed):
    """The images, labels and random wrong targets that table2 also draws for the same seed and N.

    A sorted random subset of size N (all images when N is the split's size),
    so `--num-images 500 --seed 0` attacks exactly Table 2's images and targets.
    """
    if not 1 <= num_images <= len(dataset.labels):
        raise ValueError(f"--num-images: must be in [1, {len(dataset.labels)}], got {num_images}")
    pick_key, target_key, _ = jax.random.split(jax.random.PRNGKey(seed), 3)
    index = np.sort(np.asarray(jax.random.choice(pick_key, len(dataset.labels), (num_images,), replace=False)))
    images, labels = dataset.images[index], dataset.labels[index]
    targets = np.asarray(random_wrong_targets(target_key, labels, NUM_CLASSES), dtype=np.int32)
    return index, images, labels, targets
