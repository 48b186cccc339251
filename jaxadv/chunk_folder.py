"""A sweep's folder: its manifest, one signed file per finished chunk, and the locks that let processes share it.

    check_or_write_manifest(directory, manifest, writer=True)   # SweepMismatch naming each setting that differs
    with lock(directory, f"chunk_{i:06d}", wait=False) as held: ...
    save_npz_atomic(chunk_path(directory, i), {**arrays, SIGNATURE_KEY: np.asarray(chunk_signature(manifest, i))})
    outputs = load_sweep(directory)                              # every chunk, concatenated

Each finished chunk is written atomically (`chunk_000012.npz` via a temporary file and `os.replace`) next to
`manifest.json`, which fingerprints the inputs and the configuration; a chunk carries its sweep's identity,
so one copied from another run is refused. Locks are flock locks: a killed process leaves none behind.
What a chunk file holds is `jaxadv.chunk_files`'.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np

from jaxadv import chunk_files
from jaxadv.io import TEMP_PREFIX, atomic_path, write_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 2        # 2: each chunk carries the sweep's identity (SIGNATURE_KEY)
SIGNATURE_KEY = "__sweep_signature__"
LOCK_PREFIX = ".lock-"      # a lock file exists while a process holds it (or after its holder was killed)


class SweepMismatch(ValueError):
    """A sweep directory holds results of other inputs or another configuration (never mixed in)."""


def load_sweep(directory: str) -> dict[str, np.ndarray]:
    """The concatenated outputs of a finished sweep in `directory` (ValueError if chunks are missing)."""
    manifest = _read_manifest(directory)
    if manifest is None:
        raise ValueError(f"directory: no {MANIFEST} in {directory!r}")
    num_chunks, chunk_size, num_items = manifest["num_chunks"], manifest["chunk_size"], manifest["num_items"]
    missing = [i for i in range(num_chunks) if not os.path.exists(chunk_path(directory, i))]
    if missing:
        raise ValueError(f"directory: sweep in {directory!r} is unfinished; missing chunks {missing[:10]}")
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(num_chunks):
        outputs = read_chunk(directory, i, manifest)
        if outputs is None:
            raise ValueError(f"{chunk_path(directory, i)!r} is damaged: rerun the sweep to recompute it")
        rows = chunk_rows(i, chunk_size, num_items)
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


def chunk_rows(i: int, chunk_size: int, num_items: int) -> int:
    """How many rows chunk i holds (the last may be short)."""
    return min(chunk_size, num_items - i * chunk_size)


def chunk_path(directory: str, i: int) -> str:
    """Where chunk i of the sweep in `directory` is saved."""
    return os.path.join(directory, f"chunk_{i:06d}.npz")


def chunk_signature(manifest: dict, i: int) -> str:
    """What chunk i of this sweep is: its inputs, config, chunking and position (stored in the chunk)."""
    identity = {k: manifest[k] for k in ("format", "inputs_fingerprint", "config_hash", "chunk_size", "num_items")}
    return hash_json({**identity, "chunk": i})


def read_chunk(directory: str, i: int, manifest: dict) -> dict[str, np.ndarray] | None:
    """Chunk i's outputs; None if it cannot be read; SweepMismatch if it belongs to another sweep."""
    path = chunk_path(directory, i)
    try:
        with np.load(path) as data:
            outputs = {key: data[key] for key in data.files}      # every member decompresses
        signature = outputs.pop(SIGNATURE_KEY, None)
        outputs = chunk_files.decode(outputs)
    except Exception:                                            # EOFError, BadZipFile, ValueError, OSError, ...
        return None
    if signature is None or str(signature) != chunk_signature(manifest, i):
        raise SweepMismatch(f"{path!r} is not chunk {i} of this sweep (copied from another run, or left under a "
                            "rewritten manifest); refusing to mix results. Delete it, or the folder to start over.")
    return outputs


def save_npz_atomic(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez to a temporary file beside `path`, then moved into place."""
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def _write_json_atomic(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def remove_temporaries(directory: str, which: Callable[[str], bool]) -> None:
    """Remove the temporaries (what a process killed mid-write left) whose name after the prefix passes `which`.

    Only a lock's holder removes what the lock guards: chunk i's temporaries under chunk i's lock,
    the manifest's under the manifest's; removing another's file in flight made its os.replace fail.
    """
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX) and which(name[len(TEMP_PREFIX):]):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


@contextlib.contextmanager
def lock(directory: str, name: str, wait: bool):
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


def check_or_write_manifest(directory: str, manifest: dict, writer: bool) -> None:
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


def jsonable(obj):
    """`obj` as the JSON a manifest records (`_canonical`)."""
    return _canonical(obj)


def hash_json(obj) -> str:
    """sha256 of `obj`'s canonical JSON: equal settings, spelled otherwise, hash alike."""
    return hashlib.sha256(json.dumps(_canonical(obj), sort_keys=True).encode()).hexdigest()
