"""Save and load trained parameters, bit for bit; a save that fails leaves the previous checkpoint loadable.

A checkpoint is a folder with `params.msgpack` (flax.serialization, which keeps
each array's raw bytes) and `meta.json` (anything JSON-serialisable: the model
name, training settings, errors, timings). `meta.json` carries the SHA-256 of
`params.msgpack`, checked on load: a truncated, extended or bit-flipped params
file is named, never used.

A save writes both files into a new hidden folder beside the checkpoint
(`.<name>.v-XXXXXXXX`), and the checkpoint's own path is a symbolic link to it,
switched with one `os.replace`: the only step that changes what loads, and an
atomic one. So a save that fails anywhere before it (a meta that is not JSON, a
full disk, a kill) leaves the previous checkpoint loadable, and the next save
clears what it left. A checkpoint saved as a plain folder (before versions)
loads, and is moved to a version at its next save.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import flax.linen
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.io import TEMP_PREFIX

PARAMS_FILE = "params.msgpack"
META_FILE = "meta.json"
CHECKSUM_KEY = "params_sha256"    # in meta.json, beside the caller's meta (removed again on load)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (damaged, or another model's): named, with what to do."""


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
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(dir=directory.parent, prefix=_version_prefix(directory)))
    try:
        for name, data in ((PARAMS_FILE, params_bytes), (META_FILE, meta_bytes)):
            with open(version / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(version, 0o755)
        if directory.is_dir() and not directory.is_symlink():
            _make_a_version(directory)
        _switch_link(directory, version.name)          # the one step that changes what loads
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):                 # saved and loadable; leftovers go at the next save
        _remove_other_versions(directory, keep=version.name)


def _version_prefix(directory: Path) -> str:
    return f".{directory.name}.v-"


def _switch_link(path: Path, target: str) -> None:
    """Point the symbolic link `path` at `target` atomically: a new link beside it, moved over it."""
    temporary = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _make_a_version(directory: Path) -> None:
    """A checkpoint saved as a plain folder becomes a version its path links to (undone if the link fails)."""
    moved = directory.with_name(_version_prefix(directory) + secrets.token_hex(4))
    os.rename(directory, moved)
    try:
        os.symlink(moved.name, directory)
    except BaseException:
        os.rename(moved, directory)
        raise


def _remove_other_versions(directory: Path, keep: str) -> None:
    pattern = re.compile(re.escape(_version_prefix(directory)) + r"\w{8}")
    for entry in directory.parent.iterdir():
        if entry.name != keep and pattern.fullmatch(entry.name):
            shutil.rmtree(entry)
        elif entry.name.startswith(f"{TEMP_PREFIX}{directory.name}."):
            entry.unlink(missing_ok=True)


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a complete checkpoint (its two files)."""
    directory = Path(directory)
    return (directory / META_FILE).is_file() and (directory / PARAMS_FILE).is_file()


def read_meta(directory: str | os.PathLike) -> dict:
    """The caller's meta saved in `directory` (without the params' checksum); a damaged meta.json is named."""
    return _read_meta_and_checksum(Path(directory))[0]


def _read_meta_and_checksum(directory: Path):
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(directory / META_FILE)!r} is not valid JSON ({error}): the checkpoint is "
                         "damaged; delete the folder to retrain") from None
    if not isinstance(meta, dict) or not isinstance(meta.get(CHECKSUM_KEY), str):
        raise CheckpointError(f"{str(directory / META_FILE)!r} holds no {CHECKSUM_KEY!r} (damaged, or saved before "
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
    live = directory.resolve()          # one version, whatever a save does meanwhile
    meta, checksum = _read_meta_and_checksum(live)
    params_bytes = (live / PARAMS_FILE).read_bytes()
    if hashlib.sha256(params_bytes).hexdigest() != checksum:
        raise CheckpointError(f"{str(live / PARAMS_FILE)!r} does not match the checksum in {META_FILE} "
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
        raise CheckpointError(f"checkpoint {str(directory)!r} does not hold the parameters{owner}: "
                         f"missing {missing[:4]}, unexpected {extra[:4]} (another model's, or saved before the zoo "
                         "was written in flax: delete the folder to retrain)")
    for path, spec in expected_paths:
        value = np.asarray(stored_paths[path])
        if value.shape != spec.shape or value.dtype != spec.dtype:
            raise CheckpointError(f"checkpoint {str(directory)!r} {jax.tree_util.keystr(path)} is "
                             f"{value.dtype}{list(value.shape)}, expected{owner} {spec.dtype}{list(spec.shape)}")
    restored = flax.serialization.from_state_dict(like, jax.tree.map(jnp.asarray, stored))
    return restored, meta
