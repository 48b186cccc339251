"""Saves that cannot destroy: a disk that fills up in the middle of a checkpoint's or a sweep chunk's save leaves
the previous state loadable, and a rerun with space completes (issue 23, class 6).

Each test runs its steps in a process of its own in a small tmpfs (a user and mount namespace, as the read-only
tests of tests/test_cli.py do), so that the disk is really full: ENOSPC from the kernel, not a mock.
"""
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT

PRELUDE = """
import errno, json, os, sys
import numpy as np
folder = sys.argv[1]
"""


def _run_in_small_tmpfs(tmp_path, size_kib, phases):
    """Run each Python source of `phases` in turn, in a tmpfs of `size_kib` KiB at tmp_path/disk that grows to
    64 MiB before the last phase; the phases' outputs, joined."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare: cannot mount a small tmpfs here")
    disk = tmp_path / "disk"
    disk.mkdir()
    scripts = []
    for i, source in enumerate(phases):
        path = tmp_path / f"phase{i}.py"
        path.write_text(PRELUDE + textwrap.dedent(source))
        scripts.append(f'"$PY" {path} {disk} || exit $?')
    scripts.insert(-1, f"mount -o remount,size=64m none {disk} || exit 90")
    shell = f"mount -t tmpfs -o size={size_kib}k none {disk} || exit 90\n" + "\n".join(scripts)
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env={"PY": sys.executable, "PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin",
                               "JAX_PLATFORMS": "cpu"})
    if proc.returncode == 90:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_checkpoint_save_that_fills_the_disk_leaves_the_previous_one_loadable(tmp_path):
    before_full = """
    from jaxadv.checkpoint import load_checkpoint, save_checkpoint
    small = {"w": np.arange(1000, dtype=np.float32)}
    big = {"w": np.arange(200_000, dtype=np.float32)}           # 800 kB: more than the disk holds
    path = os.path.join(folder, "models", "m")
    save_checkpoint(path, small, {"epochs": 1})
    try:
        save_checkpoint(path, big, {"epochs": 2})
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    else:
        raise AssertionError("the disk did not fill")
    params, meta = load_checkpoint(path, small)                 # the previous checkpoint, bit for bit
    assert meta == {"epochs": 1} and params["w"].tobytes() == small["w"].tobytes()
    assert sorted(os.listdir(os.path.join(folder, "models"))) == [os.readlink(path), "m"], \\
        os.listdir(os.path.join(folder, "models"))               # the failed version was removed
    print("kept")
    """
    with_space = """
    from jaxadv.checkpoint import load_checkpoint, save_checkpoint
    big = {"w": np.arange(200_000, dtype=np.float32)}
    path = os.path.join(folder, "models", "m")
    save_checkpoint(path, big, {"epochs": 2})
    params, meta = load_checkpoint(path, big)
    assert meta == {"epochs": 2} and params["w"].tobytes() == big["w"].tobytes()
    assert len(os.listdir(os.path.join(folder, "models"))) == 2  # the link and its one version
    print("saved")
    """
    assert _run_in_small_tmpfs(tmp_path, 256, [before_full, with_space]).split() == ["kept", "saved"]


def test_a_sweep_chunk_that_fills_the_disk_keeps_the_saved_chunks_and_a_rerun_completes(tmp_path):
    sweep_fn = """
    from jaxadv import sweep
    calls = []
    def fn(chunk):          # 64 kB per row: a chunk of 4 rows is 256 kB
        calls.append(int(chunk["x"][0, 0]))
        return {"y": np.tile(chunk["x"], (1, 4096)) * 2.0}
    inputs = {"x": np.arange(32, dtype=np.float32).reshape(8, 4)}
    reference = np.tile(inputs["x"], (1, 4096)) * 2.0
    directory = os.path.join(folder, "sweep")
    """
    before_full = sweep_fn + """
    try:
        sweep.run_sweep(fn, inputs, directory, 4, progress=False)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    else:
        raise AssertionError("the disk did not fill")
    assert calls == [0, 16]
    assert sorted(n for n in os.listdir(directory) if not n.startswith(".lock")) == ["chunk_000000.npz",
                                                                                      "manifest.json"]
    with np.load(os.path.join(directory, "chunk_000000.npz")) as saved:
        assert np.array_equal(saved["y"], reference[:4])
    print("kept")
    """
    with_space = sweep_fn + """
    out = sweep.run_sweep(fn, inputs, directory, 4, progress=False)
    assert calls == [16]                                  # only the chunk the full disk lost
    assert np.array_equal(out["y"], reference)
    print("completed")
    """
    assert _run_in_small_tmpfs(tmp_path, 400, [before_full, with_space]).split() == ["kept", "completed"]


def test_a_checkpoint_saved_as_a_plain_folder_loads_and_becomes_a_version_at_its_next_save(tmp_path):
    """Checkpoints saved before versions (the two files in the folder itself) still load, bit for bit; the next
    save moves the folder to a version and links it, and the new parameters load."""
    import os

    import numpy as np

    from jaxadv.checkpoint import load_checkpoint, save_checkpoint
    old, new = {"w": np.arange(6, dtype=np.float32)}, {"w": -np.arange(6, dtype=np.float32)}
    save_checkpoint(tmp_path / "staging", old, {"epochs": 1})
    plain = tmp_path / "models" / "m"
    shutil.copytree(tmp_path / "staging", plain, symlinks=False)            # the files alone, in a real folder
    assert plain.is_dir() and not plain.is_symlink()
    params, meta = load_checkpoint(plain, old)
    assert meta == {"epochs": 1} and params["w"].tobytes() == old["w"].tobytes()
    save_checkpoint(plain, new, {"epochs": 2})
    assert plain.is_symlink()
    params, meta = load_checkpoint(plain, new)
    assert meta == {"epochs": 2} and params["w"].tobytes() == new["w"].tobytes()
    assert sorted(os.listdir(plain.parent)) == sorted([os.readlink(plain), "m"])   # the plain folder's version went
