"""The README's usage example runs as written, and does what it says."""
import os
import re
import subprocess
from pathlib import Path

import numpy as np

from jaxadv import checks

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks(text):
    blocks, inside, lines = [], False, []
    for line in text.splitlines():
        if line.strip() == "```python":
            inside, lines = True, []
        elif line.strip() == "```" and inside:
            blocks.append("\n".join(lines))
            inside = False
        elif inside:
            lines.append(line)
    return blocks


def test_readme_attack_example_runs_and_its_claims_hold(capsys):
    blocks = _python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)   # noqa: S102 - our own README
    result, logits_fn = namespace["result"], namespace["logits_fn"]
    adversarial = np.asarray(result.adversarial)
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    predicted = np.asarray(np.argmax(logits_fn(result.adversarial), -1))
    np.testing.assert_array_equal(np.asarray(result.success), predicted == np.asarray(namespace["targets"]))
    assert "success" in capsys.readouterr().out


def test_readme_optax_example_matches_scipy(capsys):
    block = next(b for b in _python_blocks(README.read_text()) if "jaxadv.optim" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)   # noqa: S102 - our own README
    params, state, reference, f = (namespace[k] for k in ("params", "state", "reference", "f"))
    x = np.concatenate([np.asarray(params["head"]), np.asarray(params["tail"])])
    at_upper = checks.round_inward(0.8, np.float32, "upper")     # 0.8 rounded down to float32: inside the box
    assert bool(state.done) and np.all((x >= -2.0) & (x <= 0.8)) and np.any(x == at_upper)
    assert abs(float(f(params)) - reference.fun) <= 1e-5 * abs(reference.fun)     # float32 against float64
    np.testing.assert_allclose(x, reference.x, atol=1e-3)
    assert "scipy L-BFGS-B" in capsys.readouterr().out


def test_readme_smallest_change_of_label_lies_between_the_certificate_and_the_attack(capsys):
    blocks = _python_blocks(README.read_text())
    block = next(b for b in blocks if "minimal_perturbation(" in b)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)   # noqa: S102 - the batch example defines the model
    exec(compile(block, "README.md", "exec"), namespace)       # noqa: S102
    best, radius = namespace["best"], np.asarray(namespace["radius"])
    assert np.all(np.asarray(best.success))
    assert np.all((radius >= 0) & (radius <= np.asarray(best.l2))) and np.median(radius) > 0
    assert "certified at least" in capsys.readouterr().out


def test_readme_dataset_example_resumes_what_it_saved(capsys, tmp_path, monkeypatch):
    blocks = _python_blocks(README.read_text())
    block = next(b for b in blocks if "attack_dataset(" in b)
    monkeypatch.chdir(tmp_path)                     # its folder, runs/attacks/mlp, goes here
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)   # noqa: S102 - the batch example defines the model
    exec(compile(block, "README.md", "exec"), namespace)       # noqa: S102
    out, result = namespace["out"], namespace["result"]
    assert "mean distortion" in capsys.readouterr().out
    assert (tmp_path / "runs" / "attacks" / "mlp" / "manifest.json").exists()
    # The batch attack's answer (up to float32 rounding: one compiled program per block against
    # steps dispatched one by one).
    np.testing.assert_array_equal(out["success"], np.asarray(result.success))
    np.testing.assert_allclose(out["distortion"], np.asarray(result.distortion), rtol=1e-3)
    exec(compile(block, "README.md", "exec"), namespace)       # noqa: S102 - "interrupted? call it again"
    assert "resuming: 1/1 chunks" in capsys.readouterr().err


def test_readme_your_own_model_section_runs_every_analysis(data_dir, tmp_path, monkeypatch, capsys):
    """The "Your own model" block: a flax CNN the reader writes, attacked, swept and resumed, bounded, its units shown."""
    from jaxadv.data import STARTING_DIRECTORY
    block = next(b for b in _python_blocks(README.read_text()) if "class CNN(nn.Module)" in b)
    # As the README's command 2 sets it, relative (../shared/data), then a change of folder: the variable still
    # means the folder relative to where the process started (it failed so in a fresh clone).
    monkeypatch.setenv("JAXADV_DATA_DIR", os.path.relpath(data_dir, STARTING_DIRECTORY))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)   # noqa: S102 - our own README
    result, swept, again, bounds, radii = (namespace[k] for k in ("result", "swept", "again", "bounds", "radii"))
    assert np.mean(np.asarray(result.success)) > 0.95
    for field in swept:
        np.testing.assert_array_equal(again[field], swept[field])
    assert re.search(r"resuming: (\d+)/\1 chunks", capsys.readouterr().err)      # the second sweep computed nothing
    kinds = [row["kind"] for row in bounds.rows]
    assert kinds.count("conv") == 1 and "avgpool" in kinds and kinds.count("dense") == 1, kinds
    # The radii are certified: where the prediction is the true label (what the attack moves away from), the
    # attack never changed it within the radius.
    predicted = np.argmax(np.asarray(namespace["logits_fn"](namespace["x"])), -1)
    moved = np.asarray(result.success) & (predicted == np.asarray(namespace["y"]))
    assert moved.sum() > 50 and np.all(radii[moved] <= np.asarray(result.l2)[moved] * (1 + 1e-4))
    assert (tmp_path / "runs/my_cnn/units.png").stat().st_size > 10_000
    assert namespace["features"].shape == (10000, 16 * 7 * 7)


def _opening_commands(text):
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readmes_opening_commands_exactly_as_written():
    """.ci/run reads the README's opening commands from README.md and runs command 2 as it stands there (with
    the data path relative), so CI cannot drift from what a reader types; before, it ran its own variant with
    an absolute JAXADV_DATA_DIR, which hid the failure of the command as written."""
    commands = _opening_commands(README.read_text())
    assert len(commands) == 2 and "JAXADV_DATA_DIR=../shared/data" in commands[1] and "pytest -q" in commands[1]
    printed = subprocess.run(["bash", str(README.parent / ".ci" / "run"), "--print-commands"], capture_output=True,
                             text=True, check=True, timeout=60).stdout.splitlines()
    assert printed == commands
    script = (README.parent / ".ci" / "run").read_text()
    assert 'eval "${COMMANDS[1]}"' in script and "export JAXADV_DATA_DIR" not in script
    # The linter runs from the tests' environment (ruff is in the [dev] extra), before the tests.
    assert script.index(".venv-test/bin/ruff check .") < script.index('eval "${COMMANDS[1]}"')
    assert '"ruff' in (README.parent / "pyproject.toml").read_text().split("dev = [", 1)[1].split("]", 1)[0]
