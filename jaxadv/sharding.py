"""Spread a batched, per-example independent function over every device JAX sees.

`sharded(fn, mesh=None, block_size=None)` splits the batch axis over a one-dimensional device mesh
(`batch_mesh`) with `jax.shard_map`, and each device runs `fn` on its rows in fixed-size blocks.

Multi-host use (several processes, e.g. a pod): call `jax.distributed.initialize()` in every process before
anything else touches JAX, then use these functions unchanged in every process, each with the same inputs.
`batch_mesh()` spans `jax.devices()`, which then lists every host's devices; `sharded` builds global arrays
with `jax.make_array_from_callback` (each process supplies only the rows its own devices hold) and `to_host`
gathers results with `multihost_utils.process_allgather`. This path is JAX's own machinery but could only be
tested single-host here.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


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
    same rows inside a product over 64 (by about 1e-7); with
    a fixed block every device runs the same program on the same block
    contents, whatever the number of devices, and it bounds one device's
    working memory to one block. `None` runs each device's whole share at once
    (one call; fastest).

    Bit-identity across device counts also needs `fn` to be written so that
    XLA's fusion choices cannot change its rounding: a one-device mesh (like
    plain `jax.jit`) is compiled without SPMD partitioning and fused
    differently from a partitioned program, and XLA:CPU lets LLVM contract an
    elementwise a*b + c into one FMA or not depending on the fusion. The
    stand-in test function and the L-BFGS attack are bit-identical on 1, 2 and
    4 devices and to `jax.jit(fn)` on one block (tests/test_sweep.py).
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
        n = leading_batch_size(leaves, "args")
        padded = pad_to_multiple(args, num_devices * (block_size or 1))
        total = leading_batch_size(jax.tree.leaves(padded), "args")
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
    n = leading_batch_size(leaves, "tree")
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


def leading_batch_size(leaves, name: str) -> int:
    """The batch size all `leaves` share along their leading axis; ValueError naming `name` otherwise."""
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if None in sizes:
        raise ValueError(f"{name}: every array needs a leading batch axis")
    if len(sizes) != 1:
        raise ValueError(f"{name}: arrays disagree on the batch size: {sorted(sizes)}")
    (n,) = sizes
    if n < 1:
        raise ValueError(f"{name}: the batch is empty")
    return n


def clear_compilations() -> None:
    """Forget the compiled programs `sharded` keeps (one per function, mesh and specs)."""
    _shard_mapped.cache_clear()
