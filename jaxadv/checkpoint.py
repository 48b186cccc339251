"""Save and load trained parameters, bit for bit.

A checkpoint is a folder with `params.msgpack` (flax.serialization, which keeps
each array's raw bytes) and `meta.json` (anything JSON-serialisable: the model
name, training settings, errors, timings). Each file is written to a temporary
name and moved into place with `os.replace`, and `meta.json` goes last: a
folder with `meta.json` is a complete checkpoint, so a run killed mid-save
never leaves one that loads. Both files are encoded before either is touched,
so a save that fails (a meta that is not JSON) leaves the old checkpoint as it
was. `meta.json` carries the SHA-256 of `params.msgpack`, checked on load: a
truncated, extended or bit-flipped params file is named, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import flax.linen
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.io import write_atomic

PARAMS_FILE = "params.msgpack"
META_FILE = "meta.json"
CHECKSUM_KEY = "params_sha256"    # in meta.json, beside the caller's meta (removed again on load)


def save_checkpoint(directory: str | os.PathLike, params, meta: dict) -> None:
    """Write `params` (any pytree of arrays, e.g. a flax module's variables) and `meta` to `directory`."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    if CHECKSUM_KEY in meta:
        raise ValueError(f"meta: the key {CHECKSUM_KEY!r} is reserved for the params' checksum")
    # Everything is encoded before anything on disk changes.
    params_bytes = flax.serialization.to_bytes(jax.tree.map(np.asarray, params))
    try:
        meta_bytes = json.dumps({**meta, CHECKSUM_KEY: hashlib.sha256(params_bytes).hexdigest()},
                                indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise TypeError(f"meta: not JSON-serialisable ({error}); the checkpoint was not touched") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)  # incomplete until the new meta lands
    write_atomic(directory / PARAMS_FILE, params_bytes)
    write_atomic(directory / META_FILE, meta_bytes)


def has_checkpoint(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / META_FILE).is_file() and (directory / PARAMS_FILE).is_file()


def read_meta(directory: str | os.PathLike) -> dict:
    """The caller's meta saved in `directory` (without the params' checksum); a damaged meta.json is named."""
    return _read_meta_and_checksum(Path(directory))[0]


def _read_meta_and_checksum(directory: Path):
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(directory / META_FILE)!r} is not valid JSON ({error}): the checkpoint is "
                         "damaged; delete the folder to retrain") from None
    if not isinstance(meta, dict) or not isinstance(meta.get(CHECKSUM_KEY), str):
        raise ValueError(f"{str(directory / META_FILE)!r} holds no {CHECKSUM_KEY!r} (damaged, or saved before "
                         "checkpoints carried one): delete the folder to retrain")
    checksum = meta.pop(CHECKSUM_KEY)
    return meta, checksum


def load_checkpoint(directory: str | os.PathLike, like):
    """Return (params, meta) saved in `directory`, checked against `like`.

    like: the structure the parameters must have: a pytree of arrays or
      `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape(module.init, key, x)`), or
      an object with `init(key)` (a `jaxadv.models.ZooModel`). Every name, shape
      and dtype must match; a mismatch names the entry.
    """
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"no complete checkpoint in {str(directory)!r} "
                                f"(needs {PARAMS_FILE} and {META_FILE})")
    meta, checksum = _read_meta_and_checksum(directory)
    params_bytes = (directory / PARAMS_FILE).read_bytes()
    if hashlib.sha256(params_bytes).hexdigest() != checksum:
        raise ValueError(f"{str(directory / PARAMS_FILE)!r} does not match the checksum in {META_FILE} "
                         "(truncated, extended or altered): delete the folder to retrain")
    if isinstance(like, flax.linen.Module):
        raise TypeError(f"like: a flax module is not its parameters: pass jax.eval_shape({type(like).__name__}().init, "
                        "key, x), or variables of the same structure")
    owner = f" of {like.name}" if isinstance(getattr(like, "name", None), str) else ""
    if hasattr(like, "init"):
        like = jax.eval_shape(like.init, jax.random.PRNGKey(0))
    stored = flax.serialization.msgpack_restore(params_bytes)
    expected = flax.serialization.to_state_dict(like)
    stored_paths = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    expected_paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    if set(stored_paths) != {path for path, _ in expected_paths}:
        missing = sorted(map(jax.tree_util.keystr, {p for p, _ in expected_paths} - set(stored_paths)))
        extra = sorted(map(jax.tree_util.keystr, set(stored_paths) - {p for p, _ in expected_paths}))
        raise ValueError(f"checkpoint {str(directory)!r} does not hold the parameters{owner}: "
                         f"missing {missing[:4]}, unexpected {extra[:4]} (another model's, or saved before the zoo "
                         "was written in flax: delete the folder to retrain)")
    for path, spec in expected_paths:
        value = np.asarray(stored_paths[path])
        if value.shape != spec.shape or value.dtype != spec.dtype:
            raise ValueError(f"checkpoint {str(directory)!r} {jax.tree_util.keystr(path)} is "
                             f"{value.dtype}{list(value.shape)}, expected{owner} {spec.dtype}{list(spec.shape)}")
    restored = flax.serialization.from_state_dict(like, jax.tree.map(jnp.asarray, stored))
    return restored, meta
