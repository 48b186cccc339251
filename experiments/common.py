"""What every experiment's command line shares: flags, run names, output folders, the trained zoo, output files.

    parser = ArgumentParser(description=...); add_common_args(parser)
    args = parse_args(parser, argv)                             # runs/<dataset> by default; jax.distributed
    out = output_dir(parser, args, "cross_model")               # WORKDIR/cross_model/<run>/, checked writable
    models = models_from_args(parser, args)                 # --models: zoo names or a config file
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
import errno
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import logits_function
from jaxadv.attacks import attack_dataset, attack_sizes
from jaxadv.checkpoint import CheckpointError
from jaxadv.data import CLASS_NAMES, DATASETS, DataError
from jaxadv.io import NotWritable, atomic_path, check_writable, is_writer, write_atomic  # noqa: F401
from jaxadv.sweep import CPU_SIZES, SweepMismatch
from jaxadv.models import ALL_MODELS
from jaxadv.zoo import QUICK_TRAIN_SIZE, ConfigError, ModelsContext, WorkdirMismatch, load_models

#: Options that change no result (where things are, how the work is split): left out of run names.
NOT_IN_RUN_NAME = frozenset({"help", "workdir", "data_dir", "distributed", "coordinator", "num_processes",
                             "process_id", "chunk_size"})


class UsageError(ValueError):
    """A mistake of the command line or its surroundings (a workdir that is a file, ...), not a bug."""


#: What `run_main` reports in one line with exit status 2 instead of a traceback: the user's to fix.
USER_ERRORS = (UsageError, DataError, SweepMismatch, NotWritable, WorkdirMismatch, ConfigError, CheckpointError)
#: One image of every data set here (MNIST, Fashion-MNIST): what --models are checked on before any work.
IMAGE_SHAPE = (28, 28, 1)


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
    # Paths mean what they meant where the command was typed, wherever the code later runs (a config's
    # get_models, a library call after os.chdir): made absolute here, once.
    args.workdir = os.path.abspath(args.workdir)
    if args.data_dir is not None:
        args.data_dir = os.path.abspath(args.data_dir)
    if getattr(args, "models", None) and len(args.models) == 1 and args.models[0].endswith(".py"):
        args.models = [os.path.abspath(args.models[0])]
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


def output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace, experiment: str,
               sweeps: Sequence[str] = ()) -> Path:
    """WORKDIR/<experiment>/<run_name>/: where this run writes, checked writable now, before any work, with
    WORKDIR/models (trained models) and `sweeps` (folders under WORKDIR where its attacks save chunks).

    Nothing is created here: the first write makes the folder, so a run that stops on a user error
    leaves nothing behind.
    """
    path = Path(args.workdir) / experiment / run_name(parser, args)
    for folder in (path, Path(args.workdir) / "models", *(Path(args.workdir) / sweep for sweep in sweeps)):
        check_writable(folder)
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

    On Ctrl-C it says what is kept, in one line, and exits 130 at once; a user error (USER_ERRORS: missing
    data, an unusable workdir, saved results that refuse to mix, a damaged checkpoint; a full disk) ends in
    one line and exit status 2. Tracebacks are for bugs.
    """
    try:
        main() if argv is None else main(argv)
    except KeyboardInterrupt:
        print("interrupted: trained models and finished attack chunks are saved in the workdir; "
              "run the same command again to resume.", file=sys.stderr, flush=True)
        # At once: a chunk's computation may still run in XLA's threads, and nothing of it is kept (the
        # saved files are whole: each was written to a temporary name and moved into place).
        sys.stdout.flush()
        os._exit(130)
    except USER_ERRORS as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every file is written to a temporary name first: what was saved before stays whole and loadable.
        print(f"error: no space left on the device of {error.filename or 'the workdir'!r}; what was saved "
              "before is kept: free some space and run the same command again to resume", file=sys.stderr)
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


def add_models_arg(parser: argparse.ArgumentParser, default: Sequence[str]) -> None:
    """--models: zoo names, or one config file (configs as code) whose get_models(context) gives the user's models."""
    parser.add_argument("--models", nargs="+", default=list(default), metavar="NAME | FILE.py",
                        help=f"zoo models ({', '.join(default)} by default), or one file my_models.py defining "
                             "get_models(context) -> {name: (model, params)}: your own models (README, \"Your own "
                             "model\"); experiments/configs/zoo.py is the default as such a file")


def models_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """{name: (model, params)} for --models: zoo models trained or loaded, or a config file's; checked before work."""
    if len(args.models) == 1 and args.models[0].endswith(".py"):
        spec = args.models[0]
    else:
        unknown = [name for name in args.models if name not in ALL_MODELS]
        if unknown:
            parser.error(f"argument --models: unknown model(s) {', '.join(map(repr, unknown))}: give zoo names "
                         f"({', '.join(ALL_MODELS)}) or one config file ending in .py")
        spec = list(args.models)
    models = load_models(spec, ModelsContext(args.dataset, args.workdir, args.data_dir, args.quick))
    check_models(models, args.dataset, spec if isinstance(spec, str) else None)
    return models


def check_models(models: dict, dataset: str, config_file: str | None = None) -> None:
    """ConfigError naming the model unless each of `models` runs on one image of `dataset` and gives one logit
    per class: every model is checked (traced, nothing computed) before any is attacked."""
    num_classes = len(CLASS_NAMES[dataset])
    image = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
    of = f" of {config_file!r}" if config_file else ""
    for name, (model, params) in models.items():
        try:
            logits = jax.eval_shape(logits_function(model, params), image)
        except Exception as error:     # noqa: BLE001 - the user's model: named, with JAX's first line
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            raise ConfigError(f"--models: model {name!r}{of} fails on one image of shape {list(IMAGE_SHAPE)} "
                              f"({type(error).__name__}: {first_line})") from None
        if getattr(logits, "shape", None) != (1, num_classes):
            raise ConfigError(f"--models: model {name!r}{of} gives logits of shape {list(getattr(logits, 'shape', []))} "
                              f"for one image; {dataset} has {num_classes} classes, so [1, {num_classes}] is needed")


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
    attacks, timing, sizes_of = {}, {}, {}
    for name, logits_fn in logits_fns.items():      # every model's sizes and folder, before any attack
        try:
            sizes_of[name] = attack_sizes(logits_fn, images, config, chunk_size=args.chunk_size,
                                          block_size=args.block_size)
        except ValueError as error:      # an accelerator's block, which --chunk-size was not checked against
            if not str(error).startswith("chunk_size:"):
                raise
            parser.error(f"argument --chunk-size{str(error)[len('chunk_size'):]}")
        check_writable(directory_for(name))
    for name, logits_fn in logits_fns.items():
        sizes = sizes_of[name]
        print(f"{name}: {sizes.describe()}", flush=True)
        start = time.time()
        attacks[name] = attack_dataset(logits_fn, images, targets[name] if isinstance(targets, dict) else targets,
                                       directory_for(name), config, chunk_size=sizes.chunk_size,
                                       block_size=sizes.block_size, lanes=sizes.lanes, name=name)
        timing[name] = {"seconds_this_invocation": time.time() - start, "chunk_size": sizes.chunk_size,
                        "block_size": sizes.block_size, "lanes": sizes.lanes, "device_kind": sizes.device_kind}
    return attacks, timing
