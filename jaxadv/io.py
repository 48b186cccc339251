"""Atomic file writes: a reader (or an interrupted run) sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import jax

TEMP_PREFIX = ".tmp-"  # what an interrupted write leaves behind; safe to delete


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and move it into place.

    The temporary file keeps `path`'s suffix, so writers that infer the format
    from the name (matplotlib's savefig, numpy's savez) behave as for `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


class NotWritable(ValueError):
    """A folder that is a file, or that this process cannot write in: the user's to fix, named with its flag."""


def check_writable(path: str | os.PathLike, flag: str = "--workdir") -> None:
    """NotWritable naming the folder unless `path` is, or can be created as, a folder this process can write.

    Writes (and removes) a probe file in the deepest folder that exists: permissions alone do not tell
    (root ignores them; a read-only mount does not).
    """
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotWritable(f"{flag}: {str(existing)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=f"{TEMP_PREFIX}probe.")
    except OSError as error:
        raise NotWritable(f"{flag}: cannot write in {str(existing)!r} ({error.strerror}); nothing was computed") from None
    os.close(fd)
    os.remove(probe)


def is_writer() -> bool:
    """Whether this process writes the outputs: the only one, or process 0 of a --distributed run."""
    return jax.process_index() == 0
