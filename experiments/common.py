"""What every experiment's command line shares: the common flags, parsing, run names and output folders.

    parser = ArgumentParser(description=...); add_common_args(parser)
    args = parse_args(parser, argv)                             # runs/<dataset> by default; jax.distributed
    out = output_dir(parser, args, "cross_model")               # WORKDIR/cross_model/<run>/, checked writable
    if __name__ == "__main__": run_main(main)                  # user errors: one line, exit 2

The parser and run_main are `experiments.cli`'s; the flags of the experiments that attack images and load
models are `experiments.flags`'; the output files are written by `jaxadv.report`. Each run writes under a
folder named by the options that change its results (`run_name`), so runs of other configurations never
overwrite each other.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

import jax

from experiments.cli import (ArgumentParser, int_in)
from jaxadv.data import DATASETS
from jaxadv.io import check_writable
from jaxadv.zoo import QUICK_TRAIN_SIZE


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


def run_name(parser: ArgumentParser, args: argparse.Namespace) -> str:
    """The options of this run that change its results, as a folder name: "default" when there are none.

    E.g. `table1 --split test --num-images 10000` -> "num-images=10000_split=test"; `--quick` -> "quick".
    A file (a --models config) shows as its name: `--models configs/mine.py` -> "models=mine.py-<hash>".
    Characters other than letters, digits and .,=+- are dropped, and a name so changed (or shortened to a
    file's name, or over 100 characters) ends in a hash of the options as given, so two configurations
    never share a name.
    """
    parts, exact = [], []
    for action in parser.run_name_flags:     # experiments.cli.ArgumentParser: its flags, in the order added
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1].lstrip("-")
        values = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        exact.append(flag if value is True else f"{flag}={','.join(values)}")
        shown = [os.path.basename(v) if os.sep in v else v for v in values]     # a path: its file's name
        parts.append(flag if value is True else f"{flag}={','.join(shown)}")
    name, full = "_".join(parts) or "default", "_".join(exact) or "default"
    safe = re.sub(r"[^\w.,=+-]", "", name)
    if safe != full or len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha256(full.encode()).hexdigest()[:10]}"
    return safe


def output_dir(parser: ArgumentParser, args: argparse.Namespace, experiment: str,
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
