"""The README's and docs/'s code blocks run as written, and do what they say.

Every ```python block of README.md and docs/*.md runs here. A block that must not run (one that needs a
download, say) is marked by the line `<!-- not run: <why> -->` just before its opening fence.
"""
import os
import re
import subprocess
from pathlib import Path

import numpy as np

from jaxadv import checks

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))
NOT_RUN = "<!-- not run:"


def _python_blocks(text, *, with_marked=False):
    """The ```python blocks of `text`, in order; those marked `<!-- not run: ... -->` only `with_marked`."""
    blocks, inside, lines, marked, previous = [], False, [], False, ""
    for line in text.splitlines():
        if line.strip() == "```python" and not inside:
            inside, lines, marked = True, [], previous.strip().startswith(NOT_RUN)
        elif line.strip() == "```" and inside:
            if with_marked or not marked:
                blocks.append("\n".join(lines))
            inside = False
        elif inside:
            lines.append(line)
        previous = line
    return blocks


def test_a_block_marked_not_run_is_left_out():
    text = "a\n```python\nx = 1\n```\n<!-- not run: needs a download -->\n```python\ny = 2\n```\n"
    assert _python_blocks(text) == ["x = 1"]
    assert _python_blocks(text, with_marked=True) == ["x = 1", "y = 2"]


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


def _check_optax_example(namespace, out):
    """docs/api.md's optax example: box_lbfgs ends inside the box, at scipy's L-BFGS-B minimum."""
    params, state, reference, f = (namespace[k] for k in ("params", "state", "reference", "f"))
    x = np.concatenate([np.asarray(params["head"]), np.asarray(params["tail"])])
    at_upper = checks.round_inward(0.8, np.float32, "upper")     # 0.8 rounded down to float32: inside the box
    assert bool(state.done) and np.all((x >= -2.0) & (x <= 0.8)) and np.any(x == at_upper)
    assert abs(float(f(params)) - reference.fun) <= 1e-5 * abs(reference.fun)     # float32 against float64
    np.testing.assert_allclose(x, reference.x, atol=1e-3)
    assert "scipy L-BFGS-B" in out


def _check_units_example(namespace, out):
    """docs/api.md's units example: one feature row per test image, and the figure saved."""
    assert namespace["features"].shape == (10000, 16 * 7 * 7)
    top = np.asarray(namespace["top"].indices)
    assert top.shape == (4, 8) and len(set(top[0])) == 8
    assert Path("units.png").stat().st_size > 10_000


#: What each docs/ block must show beyond running, by a string only that block holds.
DOCS_CHECKS = {"from jaxadv.optim import box_lbfgs": _check_optax_example, "top_k_images(": _check_units_example}


def _docs_blocks():
    return [(path.name, block) for path in DOCS for block in _python_blocks(path.read_text())]


def test_the_docs_have_blocks_and_every_check_finds_its_block():
    blocks = [block for _, block in _docs_blocks()]
    assert {key for key in DOCS_CHECKS if sum(key in block for block in blocks) == 1} == set(DOCS_CHECKS)


@pytest.mark.parametrize("name, block", _docs_blocks(), ids=lambda value: value[:40].split("\n")[0])
def test_every_docs_block_runs_and_does_what_it_says(name, block, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXADV_DATA_DIR", os.path.abspath(data_dir))
    monkeypatch.chdir(tmp_path)                      # what a block writes goes here
    namespace = {}
    exec(compile(block, name, "exec"), namespace)   # noqa: S102 - our own docs
    for key, check in DOCS_CHECKS.items():
        if key in block:
            check(namespace, capsys.readouterr().out)


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
    block = next(b for b in blocks if "attack_dataset(logits_fn" in b)
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
    crown, first = np.asarray(namespace["proofs"].crown), moved[:10]
    assert np.all(crown >= 0) and np.all(crown[first] <= np.asarray(result.l2)[:10][first] * (1 + 1e-4))
    assert np.all(np.asarray(namespace["proofs"].radius) >= crown)


def test_every_readme_block_is_run_by_a_test():
    """Each README block holds what one of the tests above picks it by (the first block is the batch attack)."""
    blocks = _python_blocks(README.read_text())
    keys = ["minimal_perturbation(", "attack_dataset(logits_fn", "class CNN(nn.Module)"]
    assert len(blocks) == 1 + len(keys) and all(sum(key in block for block in blocks) == 1 for key in keys)


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
