"""What every experiment's command line shares: flags, run names, output folders, the trained zoo, output files.

    parser = ArgumentParser(description=...); add_common_args(parser)
    args = parse_args(parser, argv)                             # runs/<dataset> by default; jax.distributed
    out = output_dir(parser, args, "cross_model")               # WORKDIR/cross_model/<run>/, checked writable
    models = trained_models(ZOO, args.dataset, args.workdir, args.data_dir, args.quick)
    write_json_atomic(out / "results.json", {...})
    write_text_atomic(out / "table.md", markdown_table(headers, rows))   # percent(), fixed(), significant()
    ...
    if __name__ == "__main__": run_main(main)                  # user errors: one line, exit 2

The science lives in `jaxadv` (an attack over a data set is `jaxadv.attacks.attack_dataset`);
this module is the command line around it.

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
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import jax
import numpy as np

from jaxadv.attacks import attack_dataset, attack_sizes
from jaxadv.checkpoint import has_checkpoint, load_checkpoint, read_meta, save_checkpoint
from jaxadv.data import DATASETS, DataError, Dataset, load_dataset
from jaxadv.io import TEMP_PREFIX, atomic_path, write_atomic
from jaxadv.models import get_model
from jaxadv.sweep import CPU_SIZES, SweepMismatch
from jaxadv.train import error_rate, train, zoo_config

#: --quick trains on this many training images (the first ones).
QUICK_TRAIN_SIZE = 2000
#: Options that change no result (where things are, how the work is split): left out of run names.
NOT_IN_RUN_NAME = frozenset({"help", "workdir", "data_dir", "distributed", "coordinator", "num_processes",
                             "process_id", "chunk_size"})


class UsageError(ValueError):
    """A mistake of the command line or its surroundings (a workdir that is a file, ...), not a bug."""


#: What `run_main` reports in one line with exit status 2 instead of a traceback: the user's to fix.
USER_ERRORS = (UsageError, DataError, SweepMismatch)


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser as the experiments want it: a mistake is one line naming the flag, exit status 2
    (--help shows the usage), and a flag is never matched by a prefix (--num-image is an error, not
    --num-images)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every experiment's flags: --dataset, --data-dir, --workdir, --quick and the --distributed ones."""
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
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, then what argparse's defaults cannot say, before any work.

    The default --workdir depends on --dataset (runs/<dataset>); --coordinator, --num-processes and
    --process-id go together and need --distributed; with --distributed, jax.distributed is started
    here, before anything else touches a device. Mistakes go through `parser.error`.
    """
    args = parser.parse_args(argv)
    if args.workdir is None:
        args.workdir = str(Path("runs") / args.dataset)
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if any(value is not None for value in explicit):
        if not args.distributed:
            parser.error("--coordinator, --num-processes and --process-id need --distributed")
        if None in explicit:
            parser.error("--coordinator, --num-processes and --process-id go together")
        if args.process_id >= args.num_processes:
            parser.error(f"--process-id: must be below --num-processes ({args.num_processes}), got {args.process_id}")
    if args.distributed:
        # CPU processes exchange the attack's results (process_allgather) through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(*explicit)
    return args


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


def check_writable(path: str | os.PathLike, flag: str = "--workdir") -> None:
    """UsageError naming the folder unless `path` is, or can be created as, a folder this process can write.

    Writes (and removes) a probe file in the deepest folder that exists: permissions alone do not tell
    (root ignores them; a read-only mount does not).
    """
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag}: {str(existing)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=f"{TEMP_PREFIX}probe.")
    except OSError as error:
        raise UsageError(f"{flag}: cannot write in {str(existing)!r} ({error.strerror}); nothing was computed") from None
    os.close(fd)
    os.remove(probe)


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
        check_writable(directory)          # before the training, not after
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
        if is_writer():     # (every process of a --distributed run trains the same model: training is deterministic)
            save_checkpoint(directory, params, meta)
        out[stored] = (model, params)
    return out


def load_meta(workdir: str | os.PathLike, name: str, tag: str | None = None) -> dict:
    """The meta.json of a stored model (training settings, train_seconds, ...), without its params' checksum."""
    return read_meta(model_dir(workdir, name, tag))


# -- output files ---------------------------------------------------------------

def is_writer() -> bool:
    """Whether this process writes the outputs: the only one, or process 0 of a --distributed run."""
    return jax.process_index() == 0


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


#: What a table shows where there is no value.
MISSING = "–"


def percent(x: float | None, digits: int = 2) -> str:
    """0.1234 -> "12.34%" (`digits` decimals); None -> MISSING."""
    return MISSING if x is None else f"{100 * x:.{digits}f}%"


def fixed(x: float | None, digits: int = 3) -> str:
    """0.12345 -> "0.123" (`digits` decimals); None -> MISSING."""
    return MISSING if x is None else f"{x:.{digits}f}"


def significant(x: float | None, digits: int = 4) -> str:
    """`digits` significant digits ("12.35", "1.2e-05"); None -> MISSING, ±inf -> "∞" / "-∞"."""
    if x is None:
        return MISSING
    if np.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}g}"


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
        raise UsageError(f"{str(directory)!r} holds a model trained on {meta.get('dataset')!r}, not "
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


# -- the flags of the experiments that attack a set of images (jaxadv.attacks.attack_dataset) ----------------

DEFAULT_BLOCK_SIZE = CPU_SIZES.block_size                # on a CPU; an accelerator's: `sizes_for_device`
MAX_CHUNK_PER_DEVICE = CPU_SIZES.max_chunk_per_device


def add_attack_args(parser: argparse.ArgumentParser, images: str, default_num_images: int,
                    quick_num_images: int) -> None:
    """--num-images, --seed and the sizes (`add_size_args`) of an experiment that attacks a set of images."""
    parser.add_argument("--num-images", type=positive_int, default=None,
                        help=f"{images} attacked per model (default {default_num_images}, "
                             f"{quick_num_images} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="picks the images, the targets and the noise")
    add_size_args(parser)


def add_size_args(parser: argparse.ArgumentParser) -> None:
    """--chunk-size and --block-size: how `attack_dataset` cuts the work (default: the device's)."""
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
    check_size_args(parser, args, num_images)
    return num_images


def check_size_args(parser: argparse.ArgumentParser, args: argparse.Namespace, num_images: int) -> None:
    """--chunk-size must be a whole number of devices x blocks (a CPU's block, when --block-size is not given)."""
    if args.chunk_size is not None:
        devices = len(jax.devices())
        block = args.block_size or min(DEFAULT_BLOCK_SIZE, math.ceil(num_images / devices))
        if args.chunk_size % (devices * block):
            parser.error(f"argument --chunk-size: must be a multiple of devices x block = {devices} x {block}, "
                         f"got {args.chunk_size}")


def attack_models(parser, args, logits_fns: dict, images, targets, directory_for, config):
    """`attack_dataset` for each {name: logits_fn}, at the sizes of --chunk-size and --block-size or the
    device's, each model's sizes printed: ({name: outputs}, {name: seconds and sizes}).

    `targets`: one array for every model, or {name: array}; `directory_for(name)`: its chunk folder.
    """
    attacks, timing = {}, {}
    for name, logits_fn in logits_fns.items():
        try:
            sizes = attack_sizes(logits_fn, images, config, chunk_size=args.chunk_size, block_size=args.block_size)
        except ValueError as error:      # an accelerator's block, which --chunk-size was not checked against
            if not str(error).startswith("chunk_size:"):
                raise
            parser.error(f"argument --chunk-size{str(error)[len('chunk_size'):]}")
        print(f"{name}: {sizes.describe()}", flush=True)
        start = time.time()
        attacks[name] = attack_dataset(logits_fn, images, targets[name] if isinstance(targets, dict) else targets,
                                       directory_for(name), config, chunk_size=sizes.chunk_size,
                                       block_size=sizes.block_size, lanes=sizes.lanes, name=name)
        timing[name] = {"seconds_this_invocation": time.time() - start, "chunk_size": sizes.chunk_size,
                        "block_size": sizes.block_size, "lanes": sizes.lanes, "device_kind": sizes.device_kind}
    return attacks, timing
