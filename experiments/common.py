"""What every experiment shares: command-line flags, the trained zoo, atomic output files.

    parser = argparse.ArgumentParser(); add_common_args(parser); args = parser.parse_args()
    workdir = resolve_workdir(args)                             # runs/<dataset> by default
    out = output_dir(parser, args, "cross_model")               # WORKDIR/cross_model/<run>/, checked writable
    models = trained_models(ZOO, args.dataset, workdir, args.data_dir, args.quick)
    write_json_atomic(out / "results.json", {...})
    ...
    if __name__ == "__main__": run_main(main)                  # user errors: one line, exit 2

Each run writes under a folder named by the options that change its results
(`run_name`), so runs of other configurations never overwrite each other.

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
import re
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from jaxadv.attacks import lbfgs_attack_core, random_wrong_targets
from jaxadv.data import DATASETS, DataError
from jaxadv.io import NotWritable, atomic_path, check_writable, is_writer, write_atomic  # noqa: F401
from jaxadv.sweep import (CPU_SIZES, SweepMismatch, chunk_size_for_memory, fingerprint_arrays, run_sweep, sharded,
                          sizes_for_device)
from jaxadv.zoo import (QUICK_TRAIN_SIZE, ConfigError, WorkdirMismatch, load_meta, model_dir,  # noqa: F401
                        trained_models)

#: Options that change no result (where things are, how the work is split): left out of run names.
NOT_IN_RUN_NAME = frozenset({"help", "workdir", "data_dir", "distributed", "coordinator", "num_processes",
                             "process_id", "chunk_size"})


class UsageError(ValueError):
    """A mistake of the command line or its surroundings (a workdir that is a file, ...), not a bug."""


#: What `run_main` reports in one line with exit status 2 instead of a traceback: the user's to fix.
USER_ERRORS = (UsageError, DataError, SweepMismatch, NotWritable, WorkdirMismatch, ConfigError)


def int_in(low: int, high: int | None = None):
    """An argparse type: an int in [low, high] (no upper bound when high is None), refused at parse time."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'in [{low}, {high}]' if high is not None else f'>= {low}'}, "
                                             f"got {value}")
        return value
    parse.__name__ = "int"     # argparse names the type in its messages
    return parse


positive_int = int_in(1)


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.allow_abbrev = False      # a typo (--num-image) is an error, never a prefix of another flag
    # One line, naming the flag, exit 2: not the usage block before it (--help shows that).
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")
    parser.add_argument("--dataset", choices=DATASETS, default="fashion_mnist",
                        help="data set (default: fashion_mnist, complete offline; MNIST needs its training images)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding mnist/ and/or fashion_mnist/ IDX files "
                             "(default: $JAXADV_DATA_DIR, else tensorflow-datasets)")
    parser.add_argument("--workdir", default=None, help="output folder (default: runs/<dataset>)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: zoo models trained on {QUICK_TRAIN_SIZE} training images for 1-2 epochs "
                             "(adversarial_training: 3 epochs on 6000), small sizes")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first: one process per host (SLURM, TPU pods, or "
                             "JAX's coordinator environment variables); attacks then shard over every host's devices, "
                             "and process 0 alone writes the outputs")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="with --distributed, where elsewhere no cluster is detected: process 0's address")
    parser.add_argument("--num-processes", type=int_in(1), default=None, help="with --coordinator: how many processes")
    parser.add_argument("--process-id", type=int_in(0), default=None, help="with --coordinator: this process's rank")
    # The default workdir depends on --dataset, which argparse defaults cannot express: fill it in
    # after parsing, so that every caller sees args.workdir already set.
    parse_known_args = parser.parse_known_args

    def parse_known_args_with_workdir(args=None, namespace=None):
        namespace, rest = parse_known_args(args, namespace)
        if getattr(namespace, "workdir", None) is None:
            namespace.workdir = str(Path("runs") / namespace.dataset)
        explicit = [getattr(namespace, flag, None) for flag in ("coordinator", "num_processes", "process_id")]
        if any(value is not None for value in explicit):
            if not getattr(namespace, "distributed", False):
                parser.error("--coordinator, --num-processes and --process-id need --distributed")
            if None in explicit:
                parser.error("--coordinator, --num-processes and --process-id go together")
            if namespace.process_id >= namespace.num_processes:
                parser.error(f"--process-id: must be below --num-processes ({namespace.num_processes}), "
                             f"got {namespace.process_id}")
        if getattr(namespace, "distributed", False):
            # CPU processes exchange the attack's results (process_allgather) through gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(*explicit)   # before anything else touches a device
        return namespace, rest

    parser.parse_known_args = parse_known_args_with_workdir
    return parser


def resolve_workdir(args: argparse.Namespace) -> Path:
    """args.workdir as a Path (add_common_args fills in runs/<dataset> when it was not given)."""
    return Path(args.workdir) if args.workdir else Path("runs") / args.dataset


def run_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The options of this run that change its results, as a folder name: "default" when there are none.

    E.g. `table1 --split test --num-images 10000` -> "num-images=10000_split=test"; `--quick` -> "quick".
    Characters other than letters, digits and .,=+- are dropped, and a name so changed (or over 100
    characters) ends in a hash of the options, so two configurations never share a name.
    """
    parts = []
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_IN_RUN_NAME:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1].lstrip("-")
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag}={','.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    name = "_".join(parts) or "default"
    safe = re.sub(r"[^\w.,=+-]", "", name)
    if safe != name or len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return safe


def output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace, experiment: str) -> Path:
    """WORKDIR/<experiment>/<run_name>/: where this run writes, checked writable now, before any work.

    Nothing is created here: the first write makes the folder, so a run that stops on a user error
    leaves nothing behind.
    """
    path = Path(args.workdir) / experiment / run_name(parser, args)
    check_writable(path)
    return path


# -- output files ---------------------------------------------------------------

def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    if is_writer():
        write_atomic(path, text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON (numpy scalars and arrays are converted)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_to_json) + "\n")


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """fig.savefig to a temporary file in the same folder, then os.replace."""
    if not is_writer():
        return
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


def run_main(main, argv: Sequence[str] | None = None) -> None:
    """Run an experiment's `main` (with `argv` if given) as a command.

    On Ctrl-C it says what is kept; a user error (USER_ERRORS: missing data, an unusable workdir,
    saved results that refuse to mix) ends in one line and exit status 2. Tracebacks are for bugs.
    """
    try:
        main() if argv is None else main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted: trained models and finished attack chunks are saved in the workdir; "
              "run the same command again to resume.", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


# -- the attack over a data set: sharded over all devices, in resumable chunks ---------------------

NUM_CLASSES = 10
DEFAULT_BLOCK_SIZE = CPU_SIZES.block_size                # on a CPU; an accelerator's: `sizes_for_device`
MAX_CHUNK_PER_DEVICE = CPU_SIZES.max_chunk_per_device
RESULT_FIELDS = ("adversarial", "success", "distortion", "l2", "c", "iterations", "evaluations", "search_distortion")

def add_attack_args(parser: argparse.ArgumentParser, images: str, default_num_images: int,
                    quick_num_images: int) -> None:
    """The flags of every experiment that attacks a set of images through `attack_images`."""
    parser.add_argument("--num-images", type=positive_int, default=None,
                        help=f"{images} attacked per model (default {default_num_images}, "
                             f"{quick_num_images} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="picks the images, the targets and the noise")
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="images per saved chunk (default: from device memory, at most "
                             f"{MAX_CHUNK_PER_DEVICE} per CPU device); a multiple of devices x block size")
    parser.add_argument("--block-size", type=positive_int, default=None,
                        help=f"images one device attacks in one pass (default {DEFAULT_BLOCK_SIZE} on a CPU, 4 rounds "
                             "of its lanes on a GPU; fewer for small runs); results do not depend on the number of "
                             "devices for a fixed block size")


def check_attack_args(parser: argparse.ArgumentParser, args: argparse.Namespace, default_num_images: int,
                      quick_num_images: int, available: int, where: str) -> int:
    """The number of images to attack, with --num-images and --chunk-size checked now, before any work.

    `available`: how many images `where` (e.g. "the training set") holds.
    """
    num_images = args.num_images or (quick_num_images if args.quick else default_num_images)
    if num_images > available:
        parser.error(f"argument --num-images: must be in [1, {available}] ({where}), got {num_images}")
    if args.chunk_size is not None:
        devices = len(jax.devices())
        block = args.block_size or min(DEFAULT_BLOCK_SIZE, math.ceil(num_images / devices))
        if args.chunk_size % (devices * block):
            parser.error(f"argument --chunk-size: must be a multiple of devices x block = {devices} x {block}, "
                         f"got {args.chunk_size}")
    return num_images


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
    floats_per_lane = attack_bytes_per_lane(model, config) // 4
    return 4 * (4 * n + math.ceil(lanes * floats_per_lane / block_size))


def attack_bytes_per_lane(model, config) -> int:
    """One lane's working state in bytes (float32): the (s, y) history, ~10 image-sized vectors, 3x the activations."""
    n = math.prod(model.input_shape)
    activations = sum(math.prod(s) for s in model.output_shapes())
    return 4 * (2 * config.memory_size * n + 10 * n + 3 * activations)


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


#: The L-BFGS attack's source files in jaxadv/attacks/ (the other attacks there change none of its results),
#: besides its solver's optax face, jaxadv/optim.py, which every fingerprint includes.
LBFGS_SOURCES = ("box_lbfgs.py", "lbfgs.py", "boundary.py", "targets.py")


def attack_source_fingerprint(files: Sequence[str] = LBFGS_SOURCES) -> str:
    """sha256 of the attack's source `files` and jaxadv/optim.py: a resumed sweep must not mix two versions of
    the algorithm."""
    import jaxadv.attacks as attacks
    import jaxadv.optim as optim
    folder = os.path.dirname(attacks.__file__)
    paths = [os.path.join(folder, name) for name in sorted(files)] + [optim.__file__]
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    return digest.hexdigest()


def choose_sizes(num_images, num_devices, model, config, chunk_size=None, block_size=None, device=None):
    """(chunk, block, config): a block per device pass, a chunk a whole number of devices x block rows, and
    `config` with the device's lanes (`jaxadv.sweep.sizes_for_device`: 32 on a CPU, thousands on a GPU).

    Small runs shrink the block so that padding never costs more than one block
    per device; the chunk follows from --chunk-size, else from device memory
    (`chunk_size_for_memory`), at most the device's chunk per device.
    """
    sizes = sizes_for_device(attack_bytes_per_lane(model, config), device)
    config = config._replace(lanes=sizes.lanes)
    block = block_size or min(sizes.block_size, math.ceil(num_images / num_devices))
    step = num_devices * block
    if chunk_size is None:
        chunk_size = chunk_size_for_memory(attack_bytes_per_image(model, config, block), num_devices=num_devices,
                                           multiple_of=step,
                                           maximum=max(step, sizes.max_chunk_per_device * num_devices))
        chunk_size = min(chunk_size, step * math.ceil(num_images / step))
    if chunk_size % step:
        raise ValueError(f"--chunk-size: must be a multiple of devices x block = {num_devices} x {block}, "
                         f"got {chunk_size}")
    return chunk_size, block, config


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
