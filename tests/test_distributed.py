"""Two processes, one Table 1 sweep: jax.distributed with a local coordinator on this machine (issue 14).

Each process has its own CPU device; the attack is sharded over both, each
process attacks its share, process 0 alone writes the chunks and outputs, and
everything equals one process's run. The same command lines serve a cluster,
one process per host (README, "Long sweeps, many devices").
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = os.environ.get("JAXADV_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA_DIR or not Path(DATA_DIR, "fashion_mnist").is_dir(),
                                reason="needs $JAXADV_DATA_DIR with fashion_mnist/")
TABLE1 = [sys.executable, "-m", "experiments.table1", "--quick", "--models", "FC10(1e-4)", "FC100-100-10",
          "--num-images", "48", "--block-size", "16", "--chunk-size", "32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timings_dropped(results):
    if isinstance(results, dict):
        return {k: _timings_dropped(v) for k, v in results.items()
                if k not in ("timing", "elapsed_seconds", "num_devices")}
    if isinstance(results, list):
        return [_timings_dropped(v) for v in results]
    return results


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_run_one_table1_sweep_exactly_as_one_process(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)                 # one CPU device per process
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(TABLE1 + ["--workdir", str(one)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    shutil.copytree(one / "models", two / "models")        # the same trained models; no training in the pair

    port = _free_port()
    processes = [subprocess.Popen(TABLE1 + ["--workdir", str(two), "--distributed", "--coordinator", f"127.0.0.1:{port}",
                                            "--num-processes", "2", "--process-id", str(rank)],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs

    [single_path] = (one / "table1").glob("*/results.json")       # one run folder, named by the options
    single = json.loads(single_path.read_text())
    pair = json.loads((two / single_path.relative_to(one)).read_text())
    assert _timings_dropped(pair) == _timings_dropped(single)

    # The chunks: written once (no leftovers of a second writer, no temporaries or locks), bit for bit the same.
    chunks_one, chunks_two = _files(one / "table1" / "chunks"), _files(two / "table1" / "chunks")
    assert chunks_two.keys() == chunks_one.keys()
    for name, path in chunks_one.items():
        if name.endswith(".npz"):
            with np.load(path) as a, np.load(chunks_two[name]) as b:
                assert a.files == b.files
                for key in a.files:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")


def _readme_two_process_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Many processes, many hosts", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_readmes_two_process_snippet_resumes_a_one_process_run_and_fails_when_its_processes_fail(tmp_path):
    """The snippet as written, after the README's one-process `table1 --quick` on the same workdir (before: refused
    with "block_size: 40 != 20"), with the venv's python and a smaller model list and workdir added; and its
    status is the processes': `wait` alone returned 0 when both failed."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    workdir = tmp_path / "w"
    extra = f"--models 'FC10(1e-4)' --workdir {workdir}"
    snippet = _readme_two_process_snippet()
    assert "--quick --distributed" in snippet and ".venv/bin/python" in snippet
    snippet = (snippet.replace(".venv/bin/python", sys.executable).replace("../shared/data", DATA_DIR)
               .replace("127.0.0.1:12355", f"127.0.0.1:{_free_port()}"))
    single = subprocess.run([sys.executable, "-m", "experiments.table1", "--quick", *shlex.split(extra)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    [results] = (workdir / "table1").glob("*/results.json")
    first = json.loads(results.read_text())
    pair = subprocess.run(["bash", "-c", snippet.replace("--quick", f"--quick {extra}")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert pair.returncode == 0, pair.stdout + pair.stderr
    assert "resuming: 1/1 chunks" in pair.stdout + pair.stderr         # the one-process run's chunk, not recomputed
    assert _timings_dropped(json.loads(results.read_text())) == _timings_dropped(first)
    failing = subprocess.run(["bash", "-c", snippet.replace("--quick", f"--quick {extra} --num-images 0")], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    assert failing.returncode != 0 and "--num-images" in failing.stderr
