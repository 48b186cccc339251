"""The L-BFGS attack over a whole data set, for any model: on every device, in chunks that survive a crash.

    from jaxadv.attacks import attack_dataset
    logits_fn = jax.tree_util.Partial(module.apply, variables)     # any pure function images -> logits
    out = attack_dataset(logits_fn, images, targets, "runs/attacks/mlp", name="MLP")
    out["adversarial"], out["success"], out["distortion"]           # NumPy arrays, one row per image
    # Interrupted? Call it again: finished chunks are loaded, only the rest is computed.

`lbfgs_attack` holds its whole batch in memory and loses it all to a crash; a
data set of 60,000 images takes minutes to hours. `attack_dataset` runs the same
attack (`lbfgs_attack_core`, targeted or untargeted) through `jaxadv.sweep`:

* sharded over every device JAX sees (`jaxadv.sharding.sharded`, a 1-D mesh over the
  batch), each device running fixed blocks of `block_size` images, so that an
  image's result does not depend on the number of devices;
* in chunks of `chunk_size` images, each saved atomically under `directory` as
  soon as it is done (`sweep.run_sweep`): rerun after Ctrl-C, a kill or a
  crash, and only the missing chunks are computed;
* with a tqdm bar on stderr (images, rate, time left, success so far).

The sizes default to the device's (`attack_sizes`): on a CPU 32 lanes (images
attacked at once), blocks of 256 images and chunks of one block per device, so
that an interrupted run keeps its work and the bar moves; on a GPU or TPU as many
lanes as fit in a quarter of its free memory (`jaxadv.attacks.sizes.sizes_for_device`). One lane's
memory is read off the traced function itself: the L-BFGS history and iterates
(image-sized vectors) and three times the bytes of every intermediate value in
`jax.make_jaxpr(logits_fn)` of one image (the forward and backward passes), so
no model class has to describe its layers.

A folder holds one sweep. Its manifest records what the results depend on: the
inputs' fingerprint, `sweep.function_fingerprint(logits_fn)` (the jaxpr's text,
i.e. the architecture, and the arrays it closes over, i.e. the weights), the
attack's settings, a hash of the attack's source files (`attack_source_fingerprint`)
and the jax version. A rerun that differs in any of them raises `SweepMismatch`
naming the folder and each setting that changed, with both values, instead of
mixing results: other weights for the same architecture, another architecture,
or an upgraded attack. The block and chunk sizes change no result and are no part
of it: a rerun with other sizes resumes in the folder's chunks. `name` is for people: it labels the bar and the manifest, and is no part of
the identity (tests/test_sweep.py: the same model with other weights and a second
architecture are refused, the same model and weights resume, and an image's result
is the same in any chunking and at any position).
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.extend.core import jaxprs_in_params

from jaxadv import checks
from jaxadv.attacks.config import UNTARGETED, AttackConfig, check_config
from jaxadv.attacks.lbfgs import lbfgs_attack_core
from jaxadv.attacks.targets import random_wrong_targets
from jaxadv.attacks.sizes import chunk_size_for_memory, sizes_for_device
from jaxadv.sharding import sharded
from jaxadv.sweep import function_fingerprint, run_sweep

#: The per-image arrays `attack_dataset` returns (the fields of `AttackResult`).
RESULT_FIELDS = ("adversarial", "success", "distortion", "l2", "c", "iterations", "evaluations", "search_distortion")
#: The L-BFGS attack's source files in jaxadv/attacks/ (the other attacks there change none of its results),
#: besides its solver's optax face, jaxadv/optim.py, which every source fingerprint includes.
LBFGS_SOURCES = ("config.py", "lbfgs.py", "boundary.py", "projection.py", "targets.py")


class AttackSizes(NamedTuple):
    """How `attack_dataset` cuts the work (`attack_sizes`)."""
    chunk_size: int      # images per saved chunk: a whole number of devices x blocks
    block_size: int      # images one device attacks in one pass
    lanes: int           # images attacked at once on a device (AttackConfig.lanes)
    num_devices: int
    device_kind: str

    def describe(self) -> str:
        return (f"{self.num_devices} {self.device_kind} device(s), {self.lanes} lanes, blocks of {self.block_size}, "
                f"chunks of {self.chunk_size}")


def attack_dataset(logits_fn: Callable, images, targets, directory: str | os.PathLike,
                   config: AttackConfig | None = None, *, untargeted: bool = False, lower: float = 0.0,
                   upper: float = 1.0, chunk_size: int | None = None, block_size: int | None = None,
                   lanes: int | None = None, name: str | None = None, progress: bool = True,
                   params=None) -> dict[str, np.ndarray]:
    """`lbfgs_attack_core` on every image, sharded over all devices, in resumable chunks under `directory`.

    logits_fn: any pure function [B, *shape] -> [B, classes] (a `jax.tree_util.Partial`
      of a flax `module.apply` and its variables, a closure, ...), or with `params` a flax
      module (params: its variables) or a function apply(params, x), as for `lbfgs_attack`.
    images: [N, *shape] floating, inside [lower, upper]; targets: [N] ints, the
      classes to reach, or with `untargeted=True` the classes to leave (true labels or
      the model's predictions).
    lower, upper: the box every adversarial image stays in (numbers).
    config: the attack's settings (default `AttackConfig()`, or `UNTARGETED` with
      `untargeted`); its `lanes` is replaced by `lanes`.
    chunk_size, block_size, lanes: None for the device's (`attack_sizes`). A chunk
      holds whole blocks on every device; a `chunk_size` given alone gets the
      largest block that divides it.
    name: names the sweep on the progress bar and in the manifest (messages only).

    Returns {field: NumPy array with N rows} for `RESULT_FIELDS`, read back from the
    saved chunks. Every argument is checked before any work: ValueError or TypeError
    naming it. A folder holding another sweep raises `jaxadv.chunk_folder.SweepMismatch`.
    """
    config = _checked_config(config, untargeted)
    logits_fn, images, targets, image, box = _checked_inputs(logits_fn, params, images, targets, lower, upper,
                                                             untargeted)
    checks.path(directory, "directory")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name: expected a string or None, got {type(name).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool, got {type(progress).__name__}")
    sizes = attack_sizes(logits_fn, images, config, chunk_size=chunk_size, block_size=block_size, lanes=lanes)
    config = config._replace(lanes=sizes.lanes)

    # The model goes in as a replicated argument, not closed over: its parameters are traced, so a second
    # call with new parameters of the same architecture reuses the compiled sweep (tests/test_attack_dataset.py).
    attack_on_devices = sharded(_BlockAttack(config, untargeted, *box),
                                block_size=sizes.block_size, replicated=1)
    # What the results depend on, and nothing else: not the block or chunk size (an image's result is the same in
    # any block and chunk: tests/test_attack_dataset.py), so a rerun with other sizes resumes.
    identity = {**function_fingerprint(logits_fn, image), "attack": config.settings(), "untargeted": untargeted,
                "box": [float(lower), float(upper)], "attack_source": attack_source_fingerprint(),
                "jax": jax.__version__}
    return run_sweep(lambda chunk: attack_on_devices(logits_fn, chunk["images"], chunk["targets"]),
                     {"images": images, "targets": targets}, os.path.abspath(directory), sizes.chunk_size,
                     config=identity, progress=progress, description=f"attack {name}" if name else "attack")


class _BlockAttack(NamedTuple):
    """`lbfgs_attack_core` on one block, as a hashable callable of (logits_fn, images, targets): equal settings, one
    compiled program."""
    config: AttackConfig
    untargeted: bool
    lower: float
    upper: float

    def __call__(self, logits_fn, x, t):
        result = lbfgs_attack_core(logits_fn, x, t, self.lower, self.upper, config=self.config,
                                   untargeted=self.untargeted)
        return {field: getattr(result, field) for field in RESULT_FIELDS}


def attack_sizes(logits_fn: Callable, images, config: AttackConfig | None = None, *, chunk_size: int | None = None,
                 block_size: int | None = None, lanes: int | None = None, device=None, params=None) -> AttackSizes:
    """The lanes, block and chunk sizes `attack_dataset` uses for `images` on this machine's devices.

    `device` (default the first local one) decides the lanes, blocks and chunks by
    `sizes.sizes_for_device`: 32 lanes, blocks of 256 and chunks of one block per
    device on a CPU; on a GPU as many lanes as fit in a quarter of its free memory. A small
    set shrinks the block, so that padding never costs more than one block per device; the
    chunk is a whole number of devices x blocks, at most what fits in half of the free
    memory. A size given is used as it is (ValueError naming it when it does not fit).
    logits_fn, params: the model, as for `attack_dataset`.
    """
    config = _checked_config(config, False)
    for argument, value in (("chunk_size", chunk_size), ("block_size", block_size), ("lanes", lanes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{argument}: must be a positive int or None, got {value!r}")
    shape = np.shape(images)
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"images: expected shape [N, ...] with N >= 1, got {shape}")
    num_images, num_devices = shape[0], len(jax.devices())
    image = jax.ShapeDtypeStruct((1,) + tuple(shape[1:]), checks.work_dtype(np.empty(0, np.result_type(images))))
    logits_fn, _ = checks.model(logits_fn, params, jax.ShapeDtypeStruct(shape, image.dtype))
    per_lane = _bytes_per_lane(logits_fn, image, config)
    device_sizes = sizes_for_device(per_lane, device)
    lanes = int(lanes or device_sizes.lanes)
    block = int(block_size or min(device_sizes.block_size, math.ceil(num_images / num_devices)))
    if chunk_size is not None and block_size is None:
        block = _block_dividing(chunk_size, num_devices, block)
    step = num_devices * block
    if chunk_size is None:
        per_image = _bytes_per_image(per_lane, image, lanes, block)
        chunk_size = chunk_size_for_memory(per_image, device=device, num_devices=num_devices, multiple_of=step,
                                           maximum=max(step, device_sizes.max_chunk_per_device * num_devices))
        chunk_size = min(chunk_size, step * math.ceil(num_images / step))
    if chunk_size % step:
        raise ValueError(f"chunk_size: must be a multiple of devices x block = {num_devices} x {block}, "
                         f"got {chunk_size} (pass chunk_size alone to have the block fit it)")
    return AttackSizes(int(chunk_size), block, lanes, num_devices, device_sizes.device_kind)


def _block_dividing(chunk_size: int, num_devices: int, block: int) -> int:
    """The largest block <= `block` that splits `chunk_size` evenly over the devices (a chunk size given
    alone fixes the block, rather than being refused for the default one)."""
    if chunk_size % num_devices:
        raise ValueError(f"chunk_size: must be a multiple of the number of devices ({num_devices}), got {chunk_size}")
    per_device = chunk_size // num_devices
    return max(b for b in range(1, min(block, per_device) + 1) if per_device % b == 0)


def attack_source_fingerprint(files: Sequence[str] = LBFGS_SOURCES) -> str:
    """sha256 of the attack's source `files` in jaxadv/attacks/ and of the solver's (jaxadv/box_lbfgs.py,
    jaxadv/optim.py): a resumed sweep must not mix two versions of the algorithm."""
    import jaxadv.box_lbfgs as box_lbfgs
    import jaxadv.optim as optim
    folder = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.join(folder, name) for name in sorted(files)] + [box_lbfgs.__file__, optim.__file__]
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    return digest.hexdigest()


def select_images(images, labels, num_images: int, seed: int, num_classes: int = 10):
    """(index, images, labels, targets): a sorted random subset of N images, each with a random wrong target.

    The same `seed` and N give the same images and targets whoever asks (Tables 1 and 2 share
    their attacks so); N equal to the set's size takes every image.
    """
    count = len(labels)
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or not 1 <= num_images <= count:
        raise ValueError(f"num_images: must be in [1, {count}], got {num_images!r}")
    pick_key, target_key, _ = jax.random.split(jax.random.PRNGKey(seed), 3)
    index = np.sort(np.asarray(jax.random.choice(pick_key, count, (num_images,), replace=False)))
    chosen_images, chosen_labels = images[index], labels[index]
    targets = np.asarray(random_wrong_targets(target_key, chosen_labels, num_classes), dtype=np.int32)
    return index, chosen_images, chosen_labels, targets


# -- memory per lane, from the traced function ------------------------------------------------------

def _bytes_per_lane(logits_fn, image: jax.ShapeDtypeStruct, config: AttackConfig) -> int:
    """One lane's working state: the (s, y) history 2·m·n, ~10 image-sized vectors (iterate, trial, gradient,
    direction, origin, best) and 3x the intermediate values of one forward pass (forward and backward)."""
    n, itemsize = math.prod(image.shape[1:]), np.dtype(image.dtype).itemsize
    return itemsize * (2 * config.lbfgs.memory_size * n + 10 * n) + 3 * intermediate_bytes(logits_fn, image)


def _bytes_per_image(bytes_per_lane: int, image: jax.ShapeDtypeStruct, lanes: int, block: int) -> int:
    """One image's share of a block's memory: its lanes' state spread over the block, and ~4 image-sized
    arrays of its own (the image, its best point, the output, the padding copy)."""
    n, itemsize = math.prod(image.shape[1:]), np.dtype(image.dtype).itemsize
    return 4 * n * itemsize + math.ceil(min(lanes, block) * bytes_per_lane / block)


def intermediate_bytes(fn: Callable, *example_args) -> int:
    """The bytes of every value `fn` computes on `example_args`: the outputs of the equations of its jaxpr,
    inside nested jaxprs (jit, custom_jvp, ...) rather than their calls' outputs twice."""
    def total(jaxpr) -> int:
        count = 0
        for equation in jaxpr.eqns:
            inner = list(jaxprs_in_params(equation.params))
            if inner:
                count += sum(total(sub) for sub in inner)
                continue
            for var in equation.outvars:
                aval = var.aval
                # (PRNG keys, which flax's apply may make, have an extended dtype of no fixed item size: negligible.)
                if hasattr(aval, "shape") and hasattr(aval, "dtype") and not jax.dtypes.issubdtype(
                        aval.dtype, jax.dtypes.extended):
                    count += math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
        return count
    return total(jax.make_jaxpr(fn)(*example_args).jaxpr)


# -- checks --------------------------------------------------------------------------------------------

def _checked_config(config, untargeted):
    config = (UNTARGETED if untargeted else AttackConfig()) if config is None else config
    check_config(config)
    return config


def _checked_inputs(logits_fn, params, images, targets, lower, upper, untargeted):
    """(logits_fn, images, targets, one image's abstract shape, (lower, upper)): NumPy arrays in the work dtype and
    the box rounded inward in it, as floats; checked as `lbfgs_attack` checks (`checks.attack_inputs`)."""
    if not isinstance(untargeted, bool):
        raise TypeError(f"untargeted: expected a bool, got {type(untargeted).__name__}")
    checked = checks.attack_inputs(logits_fn, images, targets, lower, upper, params=params, scalar_bounds=True,
                                   labels_name="labels" if untargeted else "targets")
    images = np.asarray(checked.images)
    image = jax.ShapeDtypeStruct((1,) + images.shape[1:], images.dtype)
    return (checked.logits_fn, images, np.asarray(checked.labels, np.int32), image,
            (float(checked.lower), float(checked.upper)))
