"""How much work one device takes at once: the attack's lanes, blocks and chunks, and a chunk that fits memory.

    sizes = sizes_for_device(bytes_per_lane)            # CPU_SIZES on a CPU; from free memory on a GPU or TPU
    chunk = chunk_size_for_memory(bytes_per_example, num_devices=4, multiple_of=4 * sizes.block_size)
"""
from __future__ import annotations

from typing import NamedTuple

import jax


class DeviceSizes(NamedTuple):
    """How much of the attack one device runs at once (`sizes_for_device`)."""
    device_kind: str
    lanes: int                 # images attacked at once (AttackConfig.lanes): one batched gradient each step
    block_size: int            # images per device pass (several rounds of lanes, so that no lane waits long)
    max_chunk_per_device: int  # a chunk is the unit of loss on interruption: minutes of work, not hours


#: On a CPU: 32 lanes, and blocks and chunks of 256 images (8 rounds of lanes), so that a chunk of a slow
#: model is a minute of work, kept when the run is interrupted (the measurements: docs/benchmarks.md).
CPU_SIZES = DeviceSizes("cpu", lanes=32, block_size=256, max_chunk_per_device=256)
#: On an accelerator a batched gradient of 32 leaves it nearly idle: as many lanes as fit in this share of
#: its free memory, a power of two up to this many (a first guess: docs/benchmarks.md).
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
