"""Run a batched pure function over many examples: sharded over devices, in resumable chunks.

Two independent pieces, both generic (nothing here knows about attacks):

* `sharded(fn, mesh=None, block_size=None)` spreads a batched, per-example
  independent function over every device JAX sees. The batch axis is split
  over a one-dimensional device mesh (`batch_mesh`) with `jax.shard_map`, and
  each device runs `fn` on its rows in fixed-size blocks.

* `run_sweep(fn, inputs, directory, chunk_size)` feeds a large set of examples
  through `fn` one chunk at a time. Each finished chunk is written atomically
  (`chunk_000012.npz` via a temporary file and `os.replace`) next to a
  `manifest.json` that fingerprints the inputs and the configuration. Run again
  after an interruption, it loads the finished chunks, computes only the
  missing ones, and refuses to mix results from different inputs or configs.
  A tqdm bar on stderr shows its progress. `function_fingerprint(fn, example)`
  describes what a model computes (its jaxpr and the arrays it closes over) for
  that config, whatever library built it.

The attack over a data set (`jaxadv.attacks.attack_dataset`) is these two around
the L-BFGS attack. Multi-host use (several processes, e.g. a pod): call
`jax.distributed.initialize()` in every process before anything else touches
JAX, then use these functions unchanged in every process, each with the same
inputs. `batch_mesh()` spans `jax.devices()`, which then lists every host's
devices; `sharded` builds global arrays with `jax.make_array_from_callback`
(each process supplies only the rows its own devices hold) and `to_host`
gathers results with `multihost_utils.process_allgather`; `run_sweep` writes
files from process 0 only and expects a directory every process can read;
there every process must take the same chunks, so chunks are not locked: run
one multi-host job per folder.
This path is JAX's own machinery but could only be tested single-host here.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import sys
import threading
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tqdm import tqdm

from jaxadv import chunk_files
from jaxadv.io import TEMP_PREFIX, atomic_path, write_atomic

BATCH_AXIS = "batch"
MANIFEST = "manifest.json"
_FORMAT_VERSION = 2        # 2: each chunk carries the sweep's identity (SIGNATURE_KEY)
SIGNATURE_KEY = "__sweep_signature__"
LOCK_PREFIX = ".lock-"      # a lock file exists while a process holds it (or after its holder was killed)


# -- sharding ---------------------------------------------------------------

def batch_mesh(devices=None) -> Mesh:
    """A one-dimensional mesh named "batch" over `devices` (default: all of `jax.devices()`)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices: need at least one device")
    # Auto axis: classic GSPMD arrays, so that trimming the padding (a[:n]) needs no out_sharding.
    return jax.make_mesh((len(devices),), (BATCH_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def sharded(fn: Callable, mesh: Mesh | None = None, block_size: int | None = None, replicated: int = 0) -> Callable:
    """Run `fn` with its leading (batch) axis split over the devices of `mesh`.

    `fn(*args)` must be a batched pure function whose every input and output
    leaf has the batch as its leading axis, and whose output row i depends only
    on input row i (per-example independence); close over anything else
    (configs), or pass it as one of the first `replicated` arguments, which
    every device receives whole (parameters: a `jax.tree_util.Partial` model
    passed so is traced, and new parameters reuse the compiled program). The
    returned function takes the same arguments (NumPy or JAX arrays, any batch
    size >= 1) and returns `fn`'s outputs as JAX arrays with the same batch size.

    The batch is padded to a whole number of blocks per device with copies of
    the first example; the padding is dropped from the outputs. Padding is
    harmless because rows are independent: the copies change no real row, only
    add work.

    `block_size`: each device runs `fn` on `block_size` rows at a time (one
    compiled call per group of devices x block rows). XLA chooses its matrix
    kernels by shape, so a product over 16 rows can round differently from the
    same rows inside a product over 64 (we measured 1.2e-7 on this CPU); with
    a fixed block every device runs the same program on the same block
    contents, whatever the number of devices, and it bounds one device's
    working memory to one block. `None` runs each device's whole share at once
    (one call; fastest).

    Bit-identity across device counts also needs `fn` to be written so that
    XLA's fusion choices cannot change its rounding: a one-device mesh (like
    plain `jax.jit`) is compiled without SPMD partitioning and fused
    differently from a partitioned program, and XLA:CPU lets LLVM contract an
    elementwise a*b + c into one FMA or not depending on the fusion. Measured
    here: the stand-in test function and the L-BFGS attack are bit-identical on
    1, 2 and 4 devices and to `jax.jit(fn)` on one block (tests/test_sweep.py);
    before `box_lbfgs._two_loop` computed its small D u + γ Y^T Y u − γ q as one
    matrix product, the attack differed by float32 ulps (7e-6 in pixels).
    """
    mesh = batch_mesh() if mesh is None else mesh
    if BATCH_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh: needs an axis named {BATCH_AXIS!r}, got {mesh.axis_names}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size: must be a positive int or None, got {block_size!r}")
    if isinstance(replicated, bool) or not isinstance(replicated, int) or replicated < 0:
        raise ValueError(f"replicated: must be a non-negative int, got {replicated!r}")
    num_devices = mesh.shape[BATCH_AXIS]
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    spec = PartitionSpec(BATCH_AXIS)
    whole = NamedSharding(mesh, PartitionSpec())

    def compiled(*args):
        in_specs = (PartitionSpec(),) * replicated + (spec,) * (len(args) - replicated)
        try:
            program = _shard_mapped(fn, mesh, in_specs, spec)
        except TypeError:       # an unhashable fn: compiled for this call alone
            program = _shard_mapped.__wrapped__(fn, mesh, in_specs, spec)
        return program(*args)

    def call(*all_args):
        if len(all_args) < replicated:
            raise ValueError(f"args: expected the {replicated} replicated argument(s) first, got {len(all_args)} in all")
        shared = jax.tree.map(lambda a: jax.device_put(a, whole), all_args[:replicated])
        args = all_args[replicated:]
        leaves = jax.tree.leaves(args)
        if not leaves:
            raise ValueError("args: need at least one array with a batch axis")
        n = _batch_size(leaves, "args")
        padded = pad_to_multiple(args, num_devices * (block_size or 1))
        total = _batch_size(jax.tree.leaves(padded), "args")
        # One call per group of `num_devices` blocks: every device runs the same
        # compiled per-block program whatever the device count (a lax.map over
        # blocks would be simplified differently for one trip than for four).
        step = total if block_size is None else num_devices * block_size
        outs = []
        for start in range(0, total, step):
            group = jax.tree.map(lambda a: _global_array(a[start:start + step], sharding), padded)
            outs.append(compiled(*shared, *group))
        out = outs[0] if len(outs) == 1 else jax.tree.map(lambda *parts: jnp.concatenate(parts), *outs)
        return jax.tree.map(lambda a: a[:n], out)

    call.mesh = mesh
    call.block_size = block_size
    return call


@functools.lru_cache(maxsize=8)
def _shard_mapped(fn, mesh, in_specs, out_specs):
    """One jitted shard_map per (function, mesh, specs), so that a second `sharded` of the same `fn` (equal
    callables: a NamedTuple of settings) reuses its compilations."""
    # check_vma=False: `fn` is ordinary single-device code with no collectives;
    # its loop carries may start from constants (jnp.zeros(())), which the
    # varying-manual-axes check would reject although every row is independent.
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False))


def pad_to_multiple(tree, multiple: int):
    """Pad every leaf's leading axis to a multiple of `multiple` with copies of its first row (NumPy)."""
    leaves = jax.tree.leaves(tree)
    n = _batch_size(leaves, "tree")
    pad = -n % multiple
    if pad == 0:
        return jax.tree.map(np.asarray, tree)

    def pad_leaf(a):
        a = np.asarray(a)
        return np.concatenate([a, np.repeat(a[:1], pad, axis=0)], axis=0)
    return jax.tree.map(pad_leaf, tree)


def to_host(tree) -> Any:
    """NumPy copies of every leaf, gathering across processes when arrays span several hosts."""
    def fetch(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)
    return jax.tree.map(fetch, tree)


def _global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Every process holds the whole (padded) batch; each supplies the rows of
    # its own devices. Single-process this is just a sharded device_put.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _batch_size(leaves, name: str) -> int:
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if None in sizes:
        raise ValueError(f"{name}: every array needs a leading batch axis")
    if len(sizes) != 1:
        raise ValueError(f"{name}: arrays disagree on the batch size: {sorted(sizes)}")
    (n,) = sizes
    if n < 1:
        raise ValueError(f"{name}: the batch is empty")
    return n


# -- sizes by device -------------------------------------------------------------

class DeviceSizes(NamedTuple):
    """How much of the attack one device runs at once (`sizes_for_device`)."""
    device_kind: str
    lanes: int                 # images attacked at once (AttackConfig.lanes): one batched gradient each step
    block_size: int            # images per device pass (several rounds of lanes, so that no lane waits long)
    max_chunk_per_device: int  # a chunk is the unit of loss on interruption: minutes of work, not hours


#: On a CPU (measured on this 2-core machine, bench_attack): 32 lanes ran at 54-60% of the raw batched
#: gradient, 64 gave more images/s at 45%, 128 no more than 64. Blocks and chunks of 256 images (8 rounds of
#: lanes): a chunk of a slow model (a CNN at a few images/s) is a minute of work, kept when the run is
#: interrupted, and the progress bar moves; larger blocks cost fast models less of a block's tail (README, Sweeps).
CPU_SIZES = DeviceSizes("cpu", lanes=32, block_size=256, max_chunk_per_device=256)
#: On an accelerator a batched gradient of 32 leaves it nearly idle: as many lanes as fit in this share of
#: its free memory, a power of two up to this many (not yet measured on one: see the README).
ACCELERATOR_MEMORY_FRACTION = 0.25
ACCELERATOR_MAX_LANES = 8192


def sizes_for_device(bytes_per_lane: int, device=None) -> DeviceSizes:
    """The attack's lanes, block and chunk sizes for `device` (default: the first local one).

    `bytes_per_lane`: one lane's working memory (L-BFGS history, iterates,
    activations of the forward and backward pass). A CPU gets `CPU_SIZES`; a
    GPU or TPU as many lanes as fit in ACCELERATOR_MEMORY_FRACTION of its free
    memory (`memory_stats()`), rounded down to a power of two, at least the
    CPU's 32 (a device with less room than that is no use to the attack) and
    at most ACCELERATOR_MAX_LANES, blocks of 4 rounds of lanes and chunks of 4
    blocks.
    """
    if bytes_per_lane <= 0:
        raise ValueError(f"bytes_per_lane: must be positive, got {bytes_per_lane}")
    device = jax.local_devices()[0] if device is None else device
    kind = getattr(device, "device_kind", device.platform)
    if device.platform == "cpu":
        return CPU_SIZES._replace(device_kind=kind)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"device {kind!r} reports no memory (memory_stats); pass the sizes by hand")
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    fit = int(free * ACCELERATOR_MEMORY_FRACTION) // int(bytes_per_lane)
    lanes = max(CPU_SIZES.lanes, min(ACCELERATOR_MAX_LANES, 1 << max(fit, 1).bit_length() - 1))
    return DeviceSizes(kind, lanes=lanes, block_size=4 * lanes, max_chunk_per_device=16 * lanes)


# -- chunk size ---------------------------------------------------------------

def chunk_size_for_memory(bytes_per_example: int, *, device=None, num_devices: int = 1,
                          memory_fraction: float = 0.5, fallback_bytes: int = 1 << 30,
                          multiple_of: int = 1, maximum: int | None = None) -> int:
    """The largest chunk whose working state fits in `memory_fraction` of the devices' free memory.

    `bytes_per_example` is the working state one example needs while `fn`
    runs (for the attack: its L-BFGS history, iterate and activations). Free
    memory comes from `device.memory_stats()` (GPUs and TPUs report
    `bytes_limit` and `bytes_in_use`); a device that reports nothing (the CPU)
    is assumed to have `fallback_bytes`. A chunk sharded over `num_devices`
    devices puts 1/num_devices of its rows on each. The result is rounded down
    to a multiple of `multiple_of` (devices x block size), at least
    `multiple_of`, and capped at `maximum`.
    """
    if bytes_per_example <= 0:
        raise ValueError(f"bytes_per_example: must be positive, got {bytes_per_example}")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction: must be in (0, 1], got {memory_fraction}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of: must be >= 1, got {multiple_of}")
    device = jax.local_devices()[0] if device is None else device
    free = fallback_bytes
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if num_devices < 1:
        raise ValueError(f"num_devices: must be >= 1, got {num_devices}")
    rows = int(free * memory_fraction) // int(bytes_per_example) * num_devices
    if maximum is not None:
        rows = min(rows, maximum)
    return max(multiple_of, rows - rows % multiple_of)


# -- chunked, resumable sweeps ---------------------------------------------------

class SweepInterrupted(RuntimeError):
    """Raised by `run_sweep(..., stop_after=k)` after k new chunks: a stand-in for a crash."""


class SweepMismatch(ValueError):
    """A sweep directory holds results of other inputs or another configuration (never mixed in)."""


def run_sweep(fn: Callable[[dict], Mapping[str, Any]], inputs: Mapping[str, Any], directory: str,
              chunk_size: int, *, config: Any = None, progress: bool = True,
              success_key: str | None = "success", label: str = "",
              stop_after: int | None = None) -> dict[str, np.ndarray]:
    """Apply `fn` to `inputs` chunk by chunk, saving each chunk; resume what is already saved.

    `fn(chunk)` takes a dict of arrays (the `inputs` rows of one chunk) and
    returns a dict of arrays whose leading axis is the chunk's length. Every
    chunk, the last included, reaches `fn` with exactly `chunk_size` rows (the
    last is padded with copies of its first row and trimmed afterwards), so a
    jitted `fn` compiles once. Only one chunk is in flight at a time.

    `directory` receives `manifest.json` and one `chunk_NNNNNN.npz` per chunk.
    The manifest fingerprints the inputs (names, dtypes, shapes, bytes) and
    `config` (any JSON-serialisable description of `fn`: what it computes, e.g.
    `function_fingerprint` of the model, and its settings; equal numbers are one
    setting, 0 as 0.0); a rerun with different inputs or config raises SweepMismatch
    (a ValueError) naming each setting that differs, instead of mixing results.
    The chunk size is no part of that identity (a result does not depend on its
    chunk): a rerun with another `chunk_size` resumes in the folder's chunks.
    Finished chunks are never recomputed. What a chunk returns is checked before
    it is saved: dtypes a file stores (bfloat16 and other ml_dtypes are stored as
    their bits and load back as themselves; `jaxadv.chunk_files`), and in every
    chunk the names, dtypes and row shapes of the first (ValueError naming the
    folder and the chunk). Ctrl-C acts within a fraction of a second, even while
    a chunk's computation runs (`call_interruptibly`).

    Other processes may run the same sweep in `directory` at the same time
    (single-host): a process computes a chunk only under that chunk's lock,
    and only if no other process has saved it meanwhile; it first takes the
    chunks no other process holds, then waits (saying so on stderr) for the
    rest, and computes any whose holder died without saving it. The folder
    must be writable (PermissionError naming it otherwise, before any work).

    Returns the outputs of all chunks concatenated, read back from the chunk
    files, so a resumed sweep returns exactly what an uninterrupted one would.
    `progress` shows a tqdm bar on stderr: images done, images per second,
    the time left and the mean of `outputs[success_key]` so far. `label`
    names the sweep there and in the manifest (for messages only: it is no
    part of the sweep's identity). `stop_after=k` raises SweepInterrupted
    after k newly computed chunks (for tests of resumption).
    """
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError("inputs: must be a non-empty dict of arrays")
    inputs = {str(k): np.asarray(v) for k, v in inputs.items()}
    num_items = _batch_size(list(inputs.values()), "inputs")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive int, got {chunk_size!r}")
    chunk_size = requested_chunk_size = int(chunk_size)
    if stop_after is not None and stop_after < 0:
        raise ValueError(f"stop_after: must be >= 0, got {stop_after}")
    num_chunks = math.ceil(num_items / chunk_size)
    writer = jax.process_index() == 0

    manifest = {
        "format": _FORMAT_VERSION,
        "inputs_fingerprint": fingerprint_arrays(inputs),
        "config_hash": _hash_json(config),
        "config": _jsonable(config),
        "chunk_size": chunk_size,
        "num_items": num_items,
        "num_chunks": num_chunks,
        "name": label,          # for messages only: not part of the sweep's identity
    }
    os.makedirs(directory, exist_ok=True)          # after the config is known to be describable
    # Multi-host, every process computes every chunk in step with the others: no chunk may be skipped.
    locking = writer and jax.process_count() == 1
    if writer:
        # One process at a time checks or writes the manifest and clears what a killed one left.
        with _lock(directory, "manifest", wait=True):
            _check_or_write_manifest(directory, manifest, writer)
            # Another process may be writing a chunk right now: chunk i's leftovers wait for chunk i's lock.
            _remove_temporaries(directory, lambda name: not (locking and name.startswith("chunk_")))
    else:
        _check_or_write_manifest(directory, manifest, writer)
    saved_chunk_size = manifest["chunk_size"]
    if saved_chunk_size != chunk_size:
        chunk_size = saved_chunk_size
        num_chunks = manifest["num_chunks"]
        if progress and writer:
            print(f"jaxadv.sweep: {directory!r} is cut in chunks of {chunk_size} (this call asked for "
                  f"{requested_chunk_size}); resuming in its chunks: the chunk size changes no result", file=sys.stderr)

    # A chunk that cannot be read (emptied, truncated, overwritten with garbage) is recomputed; one
    # from another sweep (a copied file, or old chunks under a rewritten manifest) is refused.
    done, resumed, first = set(), [], {}
    for i in range(num_chunks):
        if not os.path.exists(_chunk_path(directory, i)):
            continue
        outputs = _read_chunk(directory, i, manifest)
        if outputs is None:
            if writer:
                print(f"jaxadv.sweep: {_chunk_path(directory, i)!r} is unreadable; recomputing it", file=sys.stderr)
            continue
        first.setdefault("spec", chunk_files.spec(outputs))
        first.setdefault("name", f"chunk {i}")
        done.add(i)
        resumed.append((_chunk_rows(i, chunk_size, num_items), _successes(outputs, success_key)))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxadv.sweep: chunks listed")

    meter = _Progress(num_items, label, enabled=progress and writer)
    for rows, successes in resumed:
        meter.resumed(rows, successes)
    meter.start(len(done), num_chunks)
    try:
        _compute_pending(fn, inputs, directory, manifest, chunk_size, num_items, num_chunks, done, meter,
                         locking=locking, writer=writer, progress=progress, success_key=success_key,
                         stop_after=stop_after, first=first)
    finally:
        meter.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxadv.sweep: chunks written")
    return load_sweep(directory)


def _compute_pending(fn, inputs, directory, manifest, chunk_size, num_items, num_chunks, done, meter, *,
                     locking, writer, progress, success_key, stop_after, first):
    """Compute and save every chunk not in `done`: first those no other process holds, then wait for the rest."""
    computed = 0
    pending = [i for i in range(num_chunks) if i not in done]
    for wait in (False, True):     # first the chunks no other process holds, then wait for the others
        held_elsewhere = []
        for i in pending:
            with (_lock(directory, f"chunk_{i:06d}", wait=wait) if locking else contextlib.nullcontext(True)) as held:
                if not held:
                    held_elsewhere.append(i)
                    continue
                if locking and os.path.exists(_chunk_path(directory, i)):
                    outputs = _read_chunk(directory, i, manifest)     # saved by another process meanwhile
                    if outputs is not None:
                        meter.resumed(_chunk_rows(i, chunk_size, num_items), _successes(outputs, success_key))
                        continue
                if stop_after is not None and computed >= stop_after:
                    raise SweepInterrupted(f"stopped after {computed} new chunk(s) in {directory}")
                if locking:   # a temporary of this chunk is a dead writer's: we hold the chunk's lock
                    _remove_temporaries(directory, lambda name: name.startswith(f"chunk_{i:06d}."))
                outputs = _compute_chunk(fn, inputs, i, chunk_size, num_items)
                # Checked before it is saved: a dtype no file holds, or rows shaped unlike the first chunk's.
                where = f"chunk {i} of {directory!r}"
                if first:
                    chunk_files.check_spec(outputs, first["spec"], where, first["name"])
                stored = chunk_files.encode(outputs, where)
                first.setdefault("spec", chunk_files.spec(outputs))
                first.setdefault("name", f"chunk {i}")
                if writer:
                    _save_npz_atomic(_chunk_path(directory, i), {**stored, SIGNATURE_KEY: np.asarray(_signature(manifest, i))})
                computed += 1
                meter.computed(_chunk_rows(i, chunk_size, num_items), _successes(outputs, success_key))
        pending = held_elsewhere
        if pending and progress:
            meter.note(f"jaxadv.sweep: waiting for chunk(s) {pending[:10]} of {directory!r}, which another process "
                       "is computing")


def call_interruptibly(thunk: Callable[[], Any], poll_seconds: float = 0.2) -> Any:
    """`thunk()`, run in a helper thread while this one polls, so that Ctrl-C acts within `poll_seconds`.

    XLA:CPU runs a compiled call to its end before Python sees a signal (a chunk of an attack: minutes), so
    KeyboardInterrupt is raised here at once instead, and the helper's work, which nothing keeps, runs on.
    JAX's thread-local settings (`with jax.enable_x64(True):`) do not reach another thread: under any, `thunk`
    runs here, as a plain call.
    """
    caller, done, box = _thread_settings(), threading.Event(), {}

    def run():
        try:
            if _thread_settings() != caller:
                box["inline"] = True
            else:
                box["value"] = thunk()
        except BaseException as error:   # noqa: BLE001 - handed to the caller, which raises it
            box["error"] = error
        finally:
            done.set()
    threading.Thread(target=run, name="jaxadv.sweep.chunk", daemon=True).start()
    while not done.wait(poll_seconds):
        pass
    if box.get("inline"):
        return thunk()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _thread_settings():
    """JAX's settings as this thread sees them (those its compiled programs depend on)."""
    try:
        from jax._src.config import trace_context
    except ImportError:        # another jax: assume no thread-local settings
        return None
    return trace_context()


def _successes(outputs, success_key):
    return float(np.sum(outputs[success_key])) if success_key in outputs else None


def _compute_chunk(fn, inputs, i, chunk_size, num_items):
    """fn's outputs for chunk i (padded to `chunk_size` rows for fn, the padding dropped), checked."""
    start = i * chunk_size
    rows = _chunk_rows(i, chunk_size, num_items)
    chunk = pad_to_multiple({k: v[start:start + rows] for k, v in inputs.items()}, chunk_size)
    outputs = call_interruptibly(lambda: _outputs_on_host(fn, chunk))
    bad = {k: np.shape(v) for k, v in outputs.items() if np.shape(v)[:1] != (chunk_size,)}
    if bad:
        raise ValueError(f"fn: every output needs a leading axis of the chunk's {chunk_size} rows, got {bad}")
    outputs = {k: v[:rows] for k, v in outputs.items()}
    if SIGNATURE_KEY in outputs:
        raise ValueError(f"fn: the output name {SIGNATURE_KEY!r} is reserved")
    return outputs


def _outputs_on_host(fn, chunk):
    outputs = fn(chunk)
    if not isinstance(outputs, Mapping) or not outputs:
        raise TypeError(f"fn: must return a non-empty dict of arrays, got {type(outputs).__name__}")
    return to_host(dict(outputs))


def load_sweep(directory: str) -> dict[str, np.ndarray]:
    """The concatenated outputs of a finished sweep in `directory` (ValueError if chunks are missing)."""
    manifest = _read_manifest(directory)
    if manifest is None:
        raise ValueError(f"directory: no {MANIFEST} in {directory!r}")
    num_chunks, chunk_size, num_items = manifest["num_chunks"], manifest["chunk_size"], manifest["num_items"]
    missing = [i for i in range(num_chunks) if not os.path.exists(_chunk_path(directory, i))]
    if missing:
        raise ValueError(f"directory: sweep in {directory!r} is unfinished; missing chunks {missing[:10]}")
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(num_chunks):
        outputs = _read_chunk(directory, i, manifest)
        if outputs is None:
            raise ValueError(f"{_chunk_path(directory, i)!r} is damaged: rerun the sweep to recompute it")
        rows = _chunk_rows(i, chunk_size, num_items)
        if parts:
            first = {key: value[0] for key, value in parts.items()}
            chunk_files.check_spec(outputs, chunk_files.spec(first), f"chunk {i} of {directory!r}", "chunk 0")
        for key, value in outputs.items():
            if value.shape[:1] != (rows,):
                raise ValueError(f"directory: chunk {i} output {key!r} has {value.shape[:1]} rows, expected {rows}")
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def fingerprint_arrays(arrays: Mapping[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a dict of arrays (or pytrees of arrays)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        for leaf in jax.tree.leaves(arrays[name]):
            a = np.ascontiguousarray(np.asarray(leaf))
            digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            digest.update(a.tobytes())
    return digest.hexdigest()


def function_fingerprint(fn: Callable, *example_args) -> dict[str, str]:
    """What `fn` computes, for a sweep's identity: {"function": ..., "parameters": ...}, two sha256 digests.

        function_fingerprint(jax.tree_util.Partial(module.apply, variables), images[:1])

    "function" hashes the text of `fn`'s jaxpr on `example_args` (its operations, shapes and
    dtypes: the architecture), "parameters" the arrays it closes over (a `jax.tree_util.Partial`'s
    arguments, a closure's variables), which tracing makes the jaxpr's constants. So the same
    architecture with other weights differs in "parameters" alone, and a process started anew
    gets the same digests (no object's address or name enters them), whatever model library
    built `fn`.
    """
    # Traced on the example, the arrays fn closes over (a Partial's arguments, a closure's
    # variables) become the jaxpr's constants: typed variables in its text, values in .consts.
    closed = jax.make_jaxpr(fn)(*example_args)
    # A parameter printed as a function's repr would carry its memory address; drop any.
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed.jaxpr))
    return {"function": hashlib.sha256(text.encode()).hexdigest(),
            "parameters": fingerprint_arrays({"constants": list(closed.consts)})}


def _chunk_rows(i: int, chunk_size: int, num_items: int) -> int:
    return min(chunk_size, num_items - i * chunk_size)


def _chunk_path(directory: str, i: int) -> str:
    return os.path.join(directory, f"chunk_{i:06d}.npz")


def _signature(manifest: dict, i: int) -> str:
    """What chunk i of this sweep is: its inputs, config, chunking and position (stored in the chunk)."""
    identity = {k: manifest[k] for k in ("format", "inputs_fingerprint", "config_hash", "chunk_size", "num_items")}
    return _hash_json({**identity, "chunk": i})


def _read_chunk(directory: str, i: int, manifest: dict) -> dict[str, np.ndarray] | None:
    """Chunk i's outputs; None if it cannot be read; SweepMismatch if it belongs to another sweep."""
    path = _chunk_path(directory, i)
    try:
        with np.load(path) as data:
            outputs = {key: data[key] for key in data.files}      # every member decompresses
        signature = outputs.pop(SIGNATURE_KEY, None)
        outputs = chunk_files.decode(outputs)
    except Exception:                                            # EOFError, BadZipFile, ValueError, OSError, ...
        return None
    if signature is None or str(signature) != _signature(manifest, i):
        raise SweepMismatch(f"{path!r} is not chunk {i} of this sweep (copied from another run, or left under a "
                            "rewritten manifest); refusing to mix results. Delete it, or the folder to start over.")
    return outputs


def _save_npz_atomic(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def _write_json_atomic(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def _remove_temporaries(directory: str, which: Callable[[str], bool]) -> None:
    """Remove the temporaries (what a process killed mid-write left) whose name after the prefix passes `which`.

    Only a lock's holder removes what the lock guards: chunk i's temporaries under chunk i's lock,
    the manifest's under the manifest's; removing another's file in flight made its os.replace fail.
    """
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX) and which(name[len(TEMP_PREFIX):]):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


@contextlib.contextmanager
def _lock(directory: str, name: str, wait: bool):
    """Hold an exclusive lock on `directory`/.lock-<name>: yields True, or False when `wait` is False
    and another process holds it.

    flock locks belong to the open file and the kernel drops them when their process dies, so a killed
    sweep leaves no stale lock. The file is removed before its lock is released, and a process that
    locked a file already removed (no longer at its path) tries again on a new one.
    """
    path = os.path.join(directory, LOCK_PREFIX + name)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise PermissionError(f"directory: cannot write in {directory!r} ({error.strerror}); a sweep "
                                  "saves its chunks there: give a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield True
    finally:
        os.remove(path)
        os.close(fd)


def _read_manifest(directory: str):
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise SweepMismatch(f"{path!r} is not valid JSON ({error}); delete the folder {directory!r} to start over") from None
    if not isinstance(manifest, dict) or not all(k in manifest for k in ("num_chunks", "chunk_size", "num_items")):
        raise SweepMismatch(f"{path!r} is not a sweep manifest; delete the folder {directory!r} to start over")
    return manifest


def _check_or_write_manifest(directory: str, manifest: dict, writer: bool) -> None:
    """Write `manifest` into a new sweep folder, or check it against the folder's: SweepMismatch naming what
    differs. The chunk size is no part of a sweep's identity: `manifest` takes the folder's."""
    existing = _read_manifest(directory)
    if existing is None:
        if writer:
            _write_json_atomic(os.path.join(directory, MANIFEST), manifest)
        return
    for key, what in (("format", "file format"), ("inputs_fingerprint", "inputs"),
                      ("config_hash", "config"), ("num_items", "number of items")):
        if existing.get(key) != manifest[key]:
            detail = f"{existing.get(key)!r} != {manifest[key]!r}"
            if key == "config_hash":
                detail = "; ".join(_differences(existing.get("config"), manifest["config"], "")) or detail
            of = f" of {existing['name']}" if existing.get("name") else ""
            raise SweepMismatch(
                f"directory: {directory!r} holds a sweep{of} with different {what} ({detail}); "
                "refusing to mix results. Pass the folder's values to resume it, or use another directory "
                "(or delete this one) to start over.")
    manifest["chunk_size"], manifest["num_chunks"] = existing["chunk_size"], existing["num_chunks"]


def _differences(old, new, path: str) -> list[str]:
    """The settings in which two canonical configs differ, as "path: the folder's X, this call's Y"."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new))
                for line in _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)]
    if old == new:
        return []
    return [f"{path or 'config'}: the folder's {_short(old)}, this call's {_short(new)}"]


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _canonical(obj, where="config"):
    """`obj` as plain JSON values, exactly: arrays by their content's fingerprint, never by `repr`.

    repr elides the middle of a long numpy array (two vectors that differ in one element looked the
    same) and carries a function's memory address (every new process refused to resume).
    """
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)                       # 0 and 0.0 are one setting, as Python's == says
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return _canonical(obj.item(), where)
    if isinstance(obj, (np.ndarray, jax.Array)):
        a = np.asarray(obj)
        return _canonical(a.item(), where) if a.ndim == 0 else {"array": fingerprint_arrays({"a": a}), "dtype": a.dtype.str,
                                              "shape": list(a.shape)}
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: keys must be strings, got {bad[0]!r}")
        return {k: _canonical(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where}: {type(obj).__name__} is not a JSON value or an array; describe it by its "
                    "settings (numbers, strings, lists, dicts) or fingerprint it (fingerprint_arrays)")


def _jsonable(obj):
    return _canonical(obj)


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(_canonical(obj), sort_keys=True).encode()).hexdigest()


class _Progress:
    """tqdm's bar on stderr (images done, rate, ETA) with the success share so far as its postfix.

    Chunks found finished (resumed) count as done but not in the rate: the bar starts at them
    (tqdm's `initial`) and `smoothing=0` makes the rate this run's images over this run's time.
    A chunk takes seconds to minutes, so every chunk is shown (`mininterval=0`, `miniters=1`).
    """

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.done = self.successes = self.success_rows = 0
        self.bar = None

    def resumed(self, rows, successes):
        self._count(rows, successes)
        if self.bar is not None:        # saved by another process meanwhile: done, but not this run's rate
            self.bar.initial += rows
            self._advance(rows)

    def start(self, chunks, total_chunks):
        """Say what was found finished, then start the bar there."""
        if not self.enabled:
            return
        if chunks:
            sys.stderr.write(f"{self.label + ' ' if self.label else ''}resuming: {chunks}/{total_chunks} chunks "
                             f"({self.done}/{self.total} images{self._success(', success ')}) already done\n")
            sys.stderr.flush()
        self.bar = tqdm(total=self.total, initial=self.done, desc=self.label or None, unit="img", file=sys.stderr,
                        smoothing=0, mininterval=0, miniters=1, dynamic_ncols=True)
        self.bar.set_postfix_str(self._success("success "), refresh=False)

    def computed(self, rows, successes):
        self._count(rows, successes)
        if self.bar is not None:
            self._advance(rows)

    def _advance(self, rows):
        self.bar.set_postfix_str(self._success("success "), refresh=False)
        self.bar.update(rows)

    def note(self, text):
        """A line on stderr that leaves the bar whole."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _count(self, rows, successes):
        self.done += rows
        if successes is not None:
            self.successes += successes
            self.success_rows += rows

    def _success(self, prefix):
        return f"{prefix}{self.successes / self.success_rows:.1%}" if self.success_rows else ""

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
