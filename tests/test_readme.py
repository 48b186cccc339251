"""The README's usage example runs as written, and does what it says."""
from pathlib import Path

import numpy as np

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
    assert bool(state.done) and np.all((x >= -2.0) & (x <= 0.8)) and np.any(x == np.float32(0.8))
    assert abs(float(f(params)) - reference.fun) <= 1e-5 * abs(reference.fun)     # float32 against float64
    np.testing.assert_allclose(x, reference.x, atol=1e-3)
    assert "scipy L-BFGS-B" in capsys.readouterr().out


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
