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
the L-BFGS attack. Each job has its module: `jaxadv.sharding` (the mesh,
`sharded`, multi-host arrays), `jaxadv.chunk_folder` (the manifest, signed chunk
files, locks) and `jaxadv.progress` (the bar); how much one device takes at once
is the attack's (`jaxadv.attacks.sizes`); this module is the orchestration. Multi-host use (several processes,
e.g. a pod): call `jax.distributed.initialize()` in every process before anything
else touches JAX, then use these functions unchanged in every process, each with
the same inputs (`jaxadv.sharding`); `run_sweep` writes files from process 0 only
and expects a directory every process can read; there every process must take
the same chunks, so chunks are not locked: run one multi-host job per folder.
This path is JAX's own machinery but could only be tested single-host here.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import re
import sys
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np

from jaxadv import chunk_files
from jaxadv.chunk_folder import (FORMAT_VERSION, SIGNATURE_KEY, check_or_write_manifest, chunk_path, chunk_rows,
                                 chunk_signature, fingerprint_arrays, hash_json, jsonable, load_sweep, lock,
                                 read_chunk, remove_temporaries, save_npz_atomic)
from jaxadv.progress import SweepProgress
from jaxadv.sharding import leading_batch_size, pad_to_multiple, to_host


class SweepInterrupted(RuntimeError):
    """Raised by `run_sweep(..., stop_after=k)` after k new chunks: a stand-in for a crash."""


def run_sweep(fn: Callable[[dict], Mapping[str, Any]], inputs: Mapping[str, Any], directory: str,
              chunk_size: int, *, config: Any = None, progress: bool = True,
              success_key: str | None = "success", description: str = "",
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
    the time left and the mean of `outputs[success_key]` so far. `description`
    names the sweep there and in the manifest (for messages only: it is no
    part of the sweep's identity). `stop_after=k` raises SweepInterrupted
    after k newly computed chunks (for tests of resumption).
    """
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError("inputs: must be a non-empty dict of arrays")
    inputs = {str(k): np.asarray(v) for k, v in inputs.items()}
    num_items = leading_batch_size(list(inputs.values()), "inputs")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive int, got {chunk_size!r}")
    chunk_size = requested_chunk_size = int(chunk_size)
    if stop_after is not None and stop_after < 0:
        raise ValueError(f"stop_after: must be >= 0, got {stop_after}")
    num_chunks = math.ceil(num_items / chunk_size)
    writer = jax.process_index() == 0

    manifest = {
        "format": FORMAT_VERSION,
        "inputs_fingerprint": fingerprint_arrays(inputs),
        "config_hash": hash_json(config),
        "config": jsonable(config),
        "chunk_size": chunk_size,
        "num_items": num_items,
        "num_chunks": num_chunks,
        "name": description,    # for messages only: not part of the sweep's identity
    }
    locking = _open_folder(directory, manifest, writer)
    saved_chunk_size = manifest["chunk_size"]
    if saved_chunk_size != chunk_size:
        chunk_size = saved_chunk_size
        num_chunks = manifest["num_chunks"]
        if progress and writer:
            print(f"jaxadv.sweep: {directory!r} is cut in chunks of {chunk_size} (this call asked for "
                  f"{requested_chunk_size}); resuming in its chunks: the chunk size changes no result", file=sys.stderr)

    done, resumed, first = _finished_chunks(directory, manifest, chunk_size, num_items, num_chunks, writer,
                                            success_key)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxadv.sweep: chunks listed")

    meter = SweepProgress(num_items, description, enabled=progress and writer)
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


def _open_folder(directory, manifest, writer) -> bool:
    """Create `directory`, check or write its manifest (which takes the folder's chunk size) and clear what a
    killed process left; whether chunks are locked (single-host)."""
    os.makedirs(directory, exist_ok=True)          # after the config is known to be describable
    # Multi-host, every process computes every chunk in step with the others: no chunk may be skipped.
    locking = writer and jax.process_count() == 1
    if writer:
        # One process at a time checks or writes the manifest and clears what a killed one left.
        with lock(directory, "manifest", wait=True):
            check_or_write_manifest(directory, manifest, writer)
            # Another process may be writing a chunk right now: chunk i's leftovers wait for chunk i's lock.
            remove_temporaries(directory, lambda name: not (locking and name.startswith("chunk_")))
    else:
        check_or_write_manifest(directory, manifest, writer)
    return locking


def _finished_chunks(directory, manifest, chunk_size, num_items, num_chunks, writer, success_key):
    """(indices of the chunks saved before, their (rows, successes), the first one's spec and name).

    A chunk that cannot be read (emptied, truncated, overwritten with garbage) is recomputed; one
    from another sweep (a copied file, or old chunks under a rewritten manifest) is refused.
    """
    done, resumed, first = set(), [], {}
    for i in range(num_chunks):
        if not os.path.exists(chunk_path(directory, i)):
            continue
        outputs = read_chunk(directory, i, manifest)
        if outputs is None:
            if writer:
                print(f"jaxadv.sweep: {chunk_path(directory, i)!r} is unreadable; recomputing it", file=sys.stderr)
            continue
        first.setdefault("spec", chunk_files.spec(outputs))
        first.setdefault("name", f"chunk {i}")
        done.add(i)
        resumed.append((chunk_rows(i, chunk_size, num_items), _successes(outputs, success_key)))
    return done, resumed, first


def _compute_pending(fn, inputs, directory, manifest, chunk_size, num_items, num_chunks, done, meter, *,
                     locking, writer, progress, success_key, stop_after, first):
    """Compute and save every chunk not in `done`: first those no other process holds, then wait for the rest."""
    computed = 0
    pending = [i for i in range(num_chunks) if i not in done]
    for wait in (False, True):     # first the chunks no other process holds, then wait for the others
        held_elsewhere = []
        for i in pending:
            with (lock(directory, f"chunk_{i:06d}", wait=wait) if locking else contextlib.nullcontext(True)) as held:
                if not held:
                    held_elsewhere.append(i)
                    continue
                if locking and os.path.exists(chunk_path(directory, i)):
                    outputs = read_chunk(directory, i, manifest)     # saved by another process meanwhile
                    if outputs is not None:
                        meter.resumed(chunk_rows(i, chunk_size, num_items), _successes(outputs, success_key))
                        continue
                if stop_after is not None and computed >= stop_after:
                    raise SweepInterrupted(f"stopped after {computed} new chunk(s) in {directory}")
                if locking:   # a temporary of this chunk is a dead writer's: we hold the chunk's lock
                    remove_temporaries(directory, lambda name: name.startswith(f"chunk_{i:06d}."))
                outputs = _compute_chunk(fn, inputs, i, chunk_size, num_items)
                # Checked before it is saved: a dtype no file holds, or rows shaped unlike the first chunk's.
                where = f"chunk {i} of {directory!r}"
                if first:
                    chunk_files.check_spec(outputs, first["spec"], where, first["name"])
                stored = chunk_files.encode(outputs, where)
                first.setdefault("spec", chunk_files.spec(outputs))
                first.setdefault("name", f"chunk {i}")
                if writer:
                    save_npz_atomic(chunk_path(directory, i), {**stored, SIGNATURE_KEY: np.asarray(chunk_signature(manifest, i))})
                computed += 1
                meter.computed(chunk_rows(i, chunk_size, num_items), _successes(outputs, success_key))
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
    worker = threading.Thread(target=run, name="jaxadv.sweep.chunk", daemon=True)
    worker.start()
    try:
        while not done.wait(poll_seconds):
            pass
    except BaseException:
        atexit.register(_exit_now_if_running, worker)
        raise
    if box.get("inline"):
        return thunk()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _exit_now_if_running(worker: threading.Thread) -> None:
    """At exit after an interrupt, while `worker` still computes: exit at once with SIGINT's status 130.

    Python's shutdown would stop the thread inside XLA's C++ code, which aborts the process ("FATAL:
    exception not rethrown"); the saved chunks are whole either way (each was written, then renamed).
    """
    if worker.is_alive():
        print("jaxadv: exiting without waiting for the interrupted chunk; the saved chunks are kept",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)


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
    rows = chunk_rows(i, chunk_size, num_items)
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
