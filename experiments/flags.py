"""The flags of the experiments that attack a set of images or analyse models, and what they load.

    add_models_arg(parser, ZOO); add_attack_args(parser, "test images", 10_000, 100)
    args = parse_args(parser, argv)
    num_images = check_attack_args(parser, args, 10_000, 100, available=10_000, where="the test set")
    models = models_from_args(parser, args)          # {name: (model, params)}, each checked on one image
    attacks, timing = attack_models(parser, args, logits_fns, images, targets, directory_for, config)

Zoo models are loaded from WORKDIR/models/ or trained there, each training announced in one line
(`jaxadv.zoo.trained_models`); a config file's `get_models(context)` loads the user's.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from experiments.cli import positive_int
from jaxadv import logits_function
from jaxadv.attacks import attack_dataset, attack_sizes
from jaxadv.data import CLASS_NAMES
from jaxadv.io import check_writable
from jaxadv.models import ALL_MODELS
from jaxadv.attacks.sizes import CPU_SIZES
from jaxadv.zoo import ConfigError, ModelsContext, load_models

#: One image of every data set here (MNIST, Fashion-MNIST): what --models are checked on before any work.
IMAGE_SHAPE = (28, 28, 1)
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
