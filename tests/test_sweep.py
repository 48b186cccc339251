"""Sharding over forced host devices and chunked, resumable sweeps (jaxadv.sweep)."""
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import chunk_folder, sharding, sweep
from jaxadv.attacks import sizes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _descent(x, target):
    """Per-example stand-in for an attack: gradient steps on a tiny MLP until each row's loss is small.

    A vmapped while_loop whose rows stop at different iterations, with matrix
    products over the batch, like the real attack.
    """
    w1 = jax.random.normal(jax.random.PRNGKey(1), (x.shape[1], 16)) / 4.0
    w2 = jax.random.normal(jax.random.PRNGKey(2), (16, 4))

    def loss(v, t):
        logits = jax.nn.sigmoid(v @ w1) @ w2
        return -jax.nn.log_softmax(logits)[t]

    def solve(v0, t):
        def cond(s):
            return (s[2] < 30) & (loss(s[0], t) > 0.1)

        def body(s):
            v, _, i = s
            g = jax.grad(loss)(v, t)
            return v - 0.5 * g, loss(v, t), i + 1
        v, last, i = jax.lax.while_loop(cond, body, (v0, loss(v0, t), 0))
        return v, i, loss(v, t) < 0.1

    v, iters, ok = jax.vmap(solve)(x, target)
    return {"x": v, "iterations": iters, "success": ok}


def _inputs(n, d=12, seed=0):
    rng = np.random.RandomState(seed)
    return {"x": rng.rand(n, d).astype(np.float32), "target": rng.randint(0, 4, n).astype(np.int32)}


def _sweep_fn(calls):
    jitted = jax.jit(_descent)

    def fn(chunk):
        calls.append(len(chunk["x"]))
        return jitted(chunk["x"], chunk["target"])
    return fn


# -- chunked sweeps ---------------------------------------------------------------

def test_interrupted_sweep_resumes_to_the_uninterrupted_result_without_duplicates(tmp_path):
    data = _inputs(23)
    full_calls, calls = [], []
    full = sweep.run_sweep(_sweep_fn(full_calls), data, str(tmp_path / "full"), 5, progress=False)
    assert full_calls == [5] * 5     # 23 rows in 5 chunks; the last is padded to 5 rows

    with pytest.raises(sweep.SweepInterrupted):
        sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path / "cut"), 5, progress=False, stop_after=2)
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path / "cut")) == ["chunk_000000.npz", "chunk_000001.npz", "manifest.json"]
    resumed = sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path / "cut"), 5, progress=False)

    assert len(calls) == 5                       # chunks 2, 3, 4 only: nothing recomputed
    assert set(resumed) == {"x", "iterations", "success"}
    for key in full:
        assert resumed[key].shape[0] == 23
        np.testing.assert_array_equal(resumed[key], full[key])
    # A third run computes nothing and returns the same.
    again = sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path / "cut"), 5, progress=False)
    assert len(calls) == 5
    np.testing.assert_array_equal(again["x"], full["x"])


def test_sweep_equals_one_big_call_and_the_padding_never_leaks():
    data = _inputs(23)
    calls = []
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        out = sweep.run_sweep(_sweep_fn(calls), data, d, 7, progress=False)
    reference = jax.jit(_descent)(data["x"], data["target"])
    np.testing.assert_allclose(out["x"], np.asarray(reference["x"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["iterations"], np.asarray(reference["iterations"]))
    assert out["iterations"].max() > out["iterations"].min()   # rows really stop at different times


def test_a_crash_inside_fn_loses_no_finished_chunk_and_writes_no_partial_one(tmp_path):
    data = _inputs(12)
    jitted = jax.jit(_descent)
    seen = []

    def crashing(chunk):
        seen.append(chunk["x"][0].copy())
        if len(seen) == 3:
            raise KeyboardInterrupt   # like Ctrl-C mid-chunk
        return jitted(chunk["x"], chunk["target"])

    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(crashing, data, str(tmp_path), 4, progress=False)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("chunk")) == ["chunk_000000.npz", "chunk_000001.npz"]
    (tmp_path / ".tmp-left-by-a-kill.npz").write_bytes(b"garbage")
    out = sweep.run_sweep(crashing, data, str(tmp_path), 4, progress=False)   # call 4 computes chunk 2
    assert len(seen) == 4
    np.testing.assert_array_equal(seen[3], data["x"][8])
    assert not any(f.startswith(".tmp-") for f in os.listdir(tmp_path))
    np.testing.assert_array_equal(out["iterations"], np.asarray(jitted(data["x"], data["target"])["iterations"]))


@pytest.mark.parametrize("change", ["inputs", "config", "nested setting"])
def test_a_rerun_with_other_inputs_or_config_refuses_to_mix_results(tmp_path, change):
    data = _inputs(10)
    calls = []
    saved = {"model": "a", "attack": {"lanes": 32, "lower": 0}}
    with pytest.raises(sweep.SweepInterrupted):
        sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path), 5, config=saved, progress=False, stop_after=1)
    other, config = dict(data), {"model": "a", "attack": {"lanes": 32, "lower": 0}}
    if change == "inputs":
        other["x"] = other["x"].copy()
        other["x"][7, 3] += 1e-3
    elif change == "config":
        config["model"] = "b"
    else:
        config["attack"] = {"lanes": 64, "lower": 0}
    with pytest.raises(chunk_folder.SweepMismatch, match="refusing to mix") as error:
        sweep.run_sweep(_sweep_fn(calls), other, str(tmp_path), 5, config=config, progress=False)
    if change == "config":       # names the setting and both values
        assert 'model: the folder\'s "a", this call\'s "b"' in str(error.value)
    elif change == "nested setting":
        assert "attack.lanes: the folder's 32, this call's 64" in str(error.value) and "lower" not in str(error.value)
    assert len(calls) == 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["num_items"] == 10 and manifest["num_chunks"] == 2 and manifest["config"] == saved


def test_equal_settings_spelled_otherwise_and_another_chunk_size_resume(tmp_path, capsys):
    """0 and 0.0 (or np.float32(0)) are one setting; another chunk size resumes in the folder's chunks, and the
    result equals one uninterrupted sweep (independent reference: the jitted function on all rows at once)."""
    data = _inputs(10)
    calls = []
    with pytest.raises(sweep.SweepInterrupted):
        sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path), 5, config={"lower": 0, "upper": 1.0},
                        progress=False, stop_after=1)
    out = sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path), 4, config={"lower": 0.0, "upper": np.float32(1)})
    assert calls == [5, 5]                         # one chunk computed before, one now, in the folder's chunks of 5
    assert "cut in chunks of 5 (this call asked for 4)" in capsys.readouterr().err
    reference = jax.jit(_descent)(data["x"], data["target"])
    for key in reference:
        np.testing.assert_array_equal(out[key], np.asarray(reference[key]))


def test_bfloat16_and_other_ml_dtypes_load_back_as_themselves_bit_for_bit(tmp_path):
    import ml_dtypes
    data = _inputs(10)

    def fn(chunk):
        x = jnp.asarray(chunk["x"])
        return {"half": x.astype(jnp.bfloat16), "eight": x.astype(jnp.float8_e4m3fn), "n": jnp.sum(x > 0.5, 1)}
    first = sweep.run_sweep(fn, data, str(tmp_path), 4, progress=False)
    again = sweep.run_sweep(fn, data, str(tmp_path), 4, progress=False)            # read back from the files
    for out in (first, again):
        assert out["half"].dtype == ml_dtypes.bfloat16 and out["eight"].dtype == ml_dtypes.float8_e4m3fn
        reference = data["x"].astype(ml_dtypes.bfloat16)                       # ml_dtypes' own rounding
        assert out["half"].tobytes() == reference.tobytes()
        assert out["eight"].tobytes() == data["x"].astype(ml_dtypes.float8_e4m3fn).tobytes()
        np.testing.assert_array_equal(out["n"], np.sum(data["x"] > 0.5, 1))


def test_what_a_file_cannot_hold_is_refused_on_the_first_chunk_before_it_is_saved(tmp_path):
    data = _inputs(10)
    with pytest.raises(TypeError, match=r"output 'labels' of chunk 0 of .* has dtype object"):
        sweep.run_sweep(lambda c: {"labels": np.array([object()] * len(c["x"]))}, data, str(tmp_path), 4,
                        progress=False)
    assert not any(name.startswith("chunk_") for name in os.listdir(tmp_path))


def test_rows_shaped_unlike_the_first_chunks_are_named_before_they_are_saved(tmp_path):
    """A ragged output (one more column per chunk) stopped at the chunk that changes, naming folder and chunk;
    before, every chunk was computed and saved and numpy's concatenate failed on every rerun."""
    data = _inputs(10)

    def ragged(chunk):
        start = int(round(float(chunk["x"][0, 0]) * 1e6))          # differs per chunk
        width = 3 if start == int(round(float(data["x"][0, 0]) * 1e6)) else 4
        return {"y": np.zeros((len(chunk["x"]), width), np.float32)}
    with pytest.raises(ValueError, match=r"output 'y' of chunk 1 of '.*' is float32\[4\] per row, but chunk 0's "
                                         r"was float32\[3\]"):
        sweep.run_sweep(ragged, data, str(tmp_path), 4, progress=False)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("chunk_")) == ["chunk_000000.npz"]


def test_ctrl_c_during_a_long_chunk_acts_at_once_and_the_command_says_so_in_one_line(tmp_path):
    """A chunk's compiled call that runs for minutes (a while_loop XLA cannot interrupt): SIGINT raises
    KeyboardInterrupt in the library, and the command line (run_main) prints one line and exits 130, long
    before the call could end; the chunk saved before is kept."""
    import signal
    script = tmp_path / "long.py"
    script.write_text(textwrap.dedent("""
        import signal, sys
        import jax, jax.numpy as jnp, numpy as np
        from jaxadv import sweep
        from experiments.cli import run_main

        # A shell's background job (`pytest &`) starts with SIGINT ignored, and Python then installs no handler
        signal.signal(signal.SIGINT, signal.default_int_handler)

        @jax.jit
        def slow(x, steps):     # 3e8 steps over 256 copies of x: about 20 s here (x alone: 2e9 steps took 5 s)
            body = lambda s: (s[0] + 1, s[1] * 1.0000001 + 1e-9)
            wide = jnp.broadcast_to(x[..., None], x.shape + (256,))
            return jax.lax.while_loop(lambda s: s[0] < steps, body, (0, wide))[1][..., 0]

        def fn(chunk):
            steps = 10 if chunk["x"][0, 0] == 0 else 300_000_000   # the first chunk at once, then seconds
            print("computing", file=sys.stderr, flush=True)
            return {"y": slow(jnp.asarray(chunk["x"]), steps)}

        run = lambda: sweep.run_sweep(fn, {"x": np.arange(8, dtype=np.float32).reshape(4, 2)}, sys.argv[2], 2,
                                      progress=False)
        run_main(run) if sys.argv[1] == "command" else run()
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for mode in ("library", "command"):
        folder = tmp_path / mode
        proc = subprocess.Popen([sys.executable, str(script), mode, str(folder)], stderr=subprocess.PIPE, text=True,
                                env=env, cwd=REPO)
        line = ""
        while line != "computing" or not (folder / "chunk_000000.npz").exists():   # chunk 1 has begun
            line = proc.stderr.readline()
            assert line, "the sweep ended before it was interrupted"
            line = line.strip()
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait(timeout=60)        # the chunk's call alone runs for minutes
        if mode == "library":
            # The interrupt reaches the caller; at exit, the chunk still computing does not abort the process.
            assert proc.returncode == 130 and "KeyboardInterrupt" in err and "FATAL" not in err, err
        else:
            assert proc.returncode == 130, err
            assert err.count("\n") == 1 and err.startswith("interrupted:") and "Traceback" not in err, err
        assert sorted(n for n in os.listdir(folder) if n.startswith("chunk_")) == ["chunk_000000.npz"]


@pytest.mark.parametrize("how", ["manifest deleted", "chunk copied in"])
def test_a_chunk_of_another_sweep_is_refused_by_its_own_signature(tmp_path, how):
    # The manifest alone guarded the folder: deleting it let old chunks stand for new inputs and a
    # new config, and a chunk file copied in from another run was taken as one of this run's.
    data, other = _inputs(10), _inputs(10, seed=1)
    calls = []
    sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path / "a"), 5, config={"model": "a"}, progress=False)
    if how == "manifest deleted":
        (tmp_path / "a" / "manifest.json").unlink()
        target = tmp_path / "a"
    else:
        with pytest.raises(sweep.SweepInterrupted):
            sweep.run_sweep(_sweep_fn(calls), other, str(tmp_path / "b"), 5, config={"model": "b"}, progress=False,
                            stop_after=1)
        (tmp_path / "b" / "chunk_000001.npz").write_bytes((tmp_path / "a" / "chunk_000001.npz").read_bytes())
        target = tmp_path / "b"
    with pytest.raises(chunk_folder.SweepMismatch, match="chunk_00000[01].npz"):
        sweep.run_sweep(_sweep_fn(calls), other, str(target), 5, config={"model": "b"}, progress=False)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "member garbled"])
def test_a_damaged_chunk_is_named_and_recomputed(tmp_path, damage, capsys):
    data = _inputs(10)
    calls = []
    clean = sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path / "clean"), 5, progress=False)
    sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path / "d"), 5, progress=False)
    chunk = tmp_path / "d" / "chunk_000001.npz"
    raw = chunk.read_bytes()
    chunk.write_bytes({"empty": b"", "truncated": raw[:len(raw) // 2], "garbage": b"\x93NUMPY garbage",
                       "member garbled": raw[:200] + bytes(b ^ 0xFF for b in raw[200:260]) + raw[260:]}[damage])
    with pytest.raises(ValueError, match="chunk_000001.npz"):
        chunk_folder.load_sweep(str(tmp_path / "d"))
    before = len(calls)
    out = sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path / "d"), 5, progress=False)
    assert len(calls) == before + 1                      # that chunk alone, again
    assert "chunk_000001.npz" in capsys.readouterr().err
    for key in clean:
        np.testing.assert_array_equal(out[key], clean[key])


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 2}'])
def test_a_damaged_manifest_is_named(tmp_path, content):
    data = _inputs(10)
    sweep.run_sweep(_sweep_fn([]), data, str(tmp_path), 5, progress=False)
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(chunk_folder.SweepMismatch, match="manifest.json"):
        sweep.run_sweep(_sweep_fn([]), data, str(tmp_path), 5, progress=False)
    with pytest.raises(chunk_folder.SweepMismatch, match="manifest.json"):
        chunk_folder.load_sweep(str(tmp_path))


def test_config_values_are_fingerprinted_exactly_or_refused(tmp_path):
    # Hashed by repr, numpy elided the middle of a long array (a one-element change resumed into a
    # mixed result), and a function's repr (its address) made every new process refuse to resume.
    data = _inputs(10)
    vector = np.linspace(0, 1, 5000)
    changed = vector.copy()
    changed[2500] += 1e-9
    assert repr(vector) == repr(changed)
    calls = []
    with pytest.raises(sweep.SweepInterrupted):
        sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path), 5, config={"w": vector}, progress=False, stop_after=1)
    with pytest.raises(chunk_folder.SweepMismatch, match="refusing to mix"):
        sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path), 5, config={"w": changed}, progress=False)
    sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path), 5, config={"w": np.array(vector)}, progress=False)
    assert len(calls) == 2                       # an equal array, built anew, resumes
    with pytest.raises(TypeError, match=r"config\['fn'\]"):
        sweep.run_sweep(_sweep_fn(calls), data, str(tmp_path / "f"), 5, config={"fn": len}, progress=False)
    assert len(calls) == 2 and not (tmp_path / "f").exists()


def test_an_experiment_meeting_a_foreign_sweep_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    from experiments.cli import run_main
    data = {"x": np.arange(4, dtype=np.float32)}
    sweep.run_sweep(lambda c: {"y": c["x"]}, data, str(tmp_path), 2, config={"attack": "old"}, progress=False)

    def main():   # the same sweep after an upgrade of the attack
        sweep.run_sweep(lambda c: {"y": c["x"]}, data, str(tmp_path), 2, config={"attack": "new"}, progress=False)

    with pytest.raises(SystemExit) as stop:
        run_main(main)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: directory:") and err.count("\n") == 1 and "Traceback" not in err


def test_progress_bar_reports_images_rate_time_left_and_success(tmp_path, capsys):
    data = {"x": np.arange(6, dtype=np.float32)}
    sweep.run_sweep(lambda c: {"success": c["x"] < 2, "y": c["x"] * 2}, data, str(tmp_path), 3, description="demo")
    err = capsys.readouterr().err
    # tqdm's bar, one update per chunk: "demo:  50%|█████     | 3/6 [00:00<00:00, 812.4img/s, success 66.7%]"
    assert re.search(r"demo: +50%\|.*\| 3/6 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+img/s, success 66\.7%\]", err), err
    assert re.search(r"demo: 100%\|.*\| 6/6 \[.*img/s, success 33\.3%\]", err), err
    out = sweep.run_sweep(lambda c: 1 / 0, data, str(tmp_path), 3, description="demo")   # all resumed
    err = capsys.readouterr().err
    assert "demo resuming: 2/2 chunks (6/6 images, success 33.3%) already done" in err
    assert re.search(r"demo: 100%\|.*\| 6/6 \[00:00<\?", err), err      # no rate: nothing computed in this run
    np.testing.assert_array_equal(out["y"], np.arange(6) * 2)
    sweep.run_sweep(lambda c: {"y": c["x"]}, data, str(tmp_path / "quiet"), 3, progress=False)
    assert capsys.readouterr().err == ""


def test_run_sweep_validates_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="inputs"):
        sweep.run_sweep(lambda c: c, {}, str(tmp_path), 2)
    with pytest.raises(ValueError, match="batch size"):
        sweep.run_sweep(lambda c: c, {"a": np.zeros(3), "b": np.zeros(4)}, str(tmp_path), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        sweep.run_sweep(lambda c: c, {"a": np.zeros(3)}, str(tmp_path), 0)
    with pytest.raises(TypeError, match="fn"):
        sweep.run_sweep(lambda c: np.zeros(2), {"a": np.zeros(3)}, str(tmp_path / "t"), 2, progress=False)
    with pytest.raises(ValueError, match="leading axis"):
        sweep.run_sweep(lambda c: {"y": np.zeros(())}, {"a": np.zeros(3)}, str(tmp_path / "u"), 2, progress=False)
    with pytest.raises(ValueError, match="unfinished"):
        chunk_folder.load_sweep(str(tmp_path / "t"))


# -- padding, chunk size, single-device sharding -----------------------------------------------

def test_pad_to_multiple_repeats_the_first_row():
    tree = {"a": np.arange(5), "b": np.arange(10).reshape(5, 2)}
    out = sharding.pad_to_multiple(tree, 4)
    np.testing.assert_array_equal(out["a"], [0, 1, 2, 3, 4, 0, 0, 0])
    np.testing.assert_array_equal(out["b"][5:], [[0, 1]] * 3)
    assert sharding.pad_to_multiple(tree, 5)["a"].shape == (5,)


class _FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_chunk_size_follows_free_device_memory():
    gpu = _FakeDevice({"bytes_limit": 10_000_000, "bytes_in_use": 2_000_000})
    # half of 8 MB free / 1000 B = 4000 rows per device
    assert sizes.chunk_size_for_memory(1000, device=gpu) == 4000
    assert sizes.chunk_size_for_memory(1000, device=gpu, num_devices=4, multiple_of=12) == 15996
    assert sizes.chunk_size_for_memory(1000, device=gpu, maximum=300, multiple_of=64) == 256
    cpu = _FakeDevice(None)
    assert sizes.chunk_size_for_memory(1000, device=cpu, fallback_bytes=3000, memory_fraction=1.0) == 3
    assert sizes.chunk_size_for_memory(10**12, device=gpu, multiple_of=8) == 8   # never below one block
    with pytest.raises(ValueError, match="bytes_per_example"):
        sizes.chunk_size_for_memory(0)


def test_sharded_on_one_device_handles_ragged_batches():
    data = _inputs(11)
    fn = sharding.sharded(_descent, block_size=4)
    out = fn(data["x"], data["target"])
    assert out["x"].shape == (11, 12)
    blocked = [jax.jit(_descent)(*sharding.pad_to_multiple((data["x"], data["target"]), 4))]
    np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(blocked[0]["x"])[:11])
    with pytest.raises(ValueError, match="block_size"):
        sharding.sharded(_descent, block_size=0)
    with pytest.raises(ValueError, match="batch size"):
        fn(data["x"], data["target"][:5])


# -- four forced host devices (in a subprocess: XLA_FLAGS must precede importing jax) ----------

_FOUR_DEVICES = textwrap.dedent("""
    import os, sys, tempfile
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, {tests_dir!r})
    import jax, numpy as np
    from jaxadv import sharding, sweep
    from test_sweep import _descent, _inputs, _attack_fn
    assert len(jax.devices()) == 4, jax.devices()

    def same(a, b):
        return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)

    one = sharding.batch_mesh(jax.devices()[:1])
    data = _inputs(23)                      # ragged: padded to a multiple of 4 devices x block
    args = (data["x"], data["target"])
    for block in (1, 4):
        four = sharding.sharded(_descent, block_size=block)(*args)
        single = sharding.sharded(_descent, mesh=one, block_size=block)(*args)
        assert same(four, single), ("stand-in", block)
    whole = sharding.sharded(_descent)(*args)          # no blocks: equal up to rounding
    assert whole["x"].sharding.mesh.shape["batch"] == 4
    ref = jax.jit(_descent)(*args)
    np.testing.assert_allclose(np.asarray(whole["x"]), np.asarray(ref["x"]), atol=1e-5)
    # the per-block program is the plain jitted function on one block
    data = _inputs(16)
    four = sharding.sharded(_descent, block_size=4)(data["x"], data["target"])
    plain = jax.jit(_descent)(data["x"][4:8], data["target"][4:8])
    assert same({{k: v[4:8] for k, v in four.items()}}, plain)

    attack = _attack_fn()
    if attack is not None:
        images, targets, attack = attack

        def run(x, t, mesh):
            return sharding.sharded(attack, mesh=mesh, block_size=3)(x, t)
        four = run(images, targets, None)
        two = run(images, targets, sharding.batch_mesh(jax.devices()[:2]))
        single = run(images, targets, one)
        assert same(four, two), "attack: 4 vs 2 devices"
        # A one-device mesh compiles without SPMD partitioning, so XLA fuses it differently;
        # the attack must not let that change a bit (see box_lbfgs._two_loop).
        assert same(four, single), "attack: 4 devices vs 1"
        plain = jax.jit(attack)(images[3:6], targets[3:6])   # unsharded, the second block
        assert same({{k: v[3:6] for k, v in four.items()}}, plain), "attack: 4 devices vs plain jit"
        assert np.asarray(four["success"]).any()   # the attack really ran
        print("attack checked")

    # a sharded sweep, interrupted and resumed, equals an unsharded uninterrupted one
    data = _inputs(37)
    four = sharding.sharded(_descent, block_size=2)
    single = sharding.sharded(_descent, mesh=one, block_size=2)
    with tempfile.TemporaryDirectory() as d:
        calls = []
        def fn(chunk):
            calls.append(1)
            return four(chunk["x"], chunk["target"])
        try:
            sweep.run_sweep(fn, data, d + "/s", 8, progress=False, stop_after=3)
        except sweep.SweepInterrupted:
            pass
        resumed = sweep.run_sweep(fn, data, d + "/s", 8, progress=False)
        assert len(calls) == 5, calls
        plain = sweep.run_sweep(lambda c: single(c["x"], c["target"]), data, d + "/p", 8, progress=False)
        assert same(resumed, plain)
    print("OK")
""")


def _attack_fn():
    """(images, targets, attack): the real attack, small and quick, on a random model, if it exists yet."""
    try:
        from jaxadv.attacks.config import ATTACK_LBFGS, AttackConfig, SearchConfig
        from jaxadv.attacks.lbfgs import lbfgs_attack_core
    except ImportError:
        return None
    from jaxadv.models import get_model
    model = get_model("FC10(1e-2)")
    logits_fn = jax.tree_util.Partial(model.apply, model.init(jax.random.PRNGKey(0)))
    rng = np.random.RandomState(0)
    images = rng.rand(10, 28, 28, 1).astype(np.float32)
    targets = rng.randint(0, 10, 10).astype(np.int32)
    # Small and quick; 2 lanes for 3-image blocks exercises the attack's image queue.
    config = AttackConfig(search=SearchConfig(max_bracket_steps=2, bisection_steps=2),
                          lbfgs=ATTACK_LBFGS._replace(max_iterations=10), lanes=2)

    def attack(x, t):
        r = lbfgs_attack_core(logits_fn, x, t, 0.0, 1.0, config=config)
        return {"adversarial": r.adversarial, "success": r.success, "distortion": r.distortion, "c": r.c}
    return images, targets, attack


def test_four_forced_host_devices_give_bit_identical_results():
    script = _FOUR_DEVICES.format(tests_dir=os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")
    if _attack_fn() is not None:
        assert "attack checked" in proc.stdout


# -- processes that die, and processes that share a folder (issue 10, class 10) ----------------------

# A cheap sweep in its own process. fn logs "start i pid" and "done i pid" for each chunk i it computes;
# `hang` is a chunk on which it sleeps until killed; with `barrier` > 0 it waits until that many
# processes are ready, so that they really start the sweep together.
_WORKER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from jaxadv import sweep
    directory, log, hang, barrier = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def note(what):
        with open(log, "a") as f:      # O_APPEND: one line per write, whoever writes
            f.write(f"{what} {os.getpid()}\\n")

    def fn(chunk):
        i = int(chunk["row"][0]) // 3
        note(f"start {i}")
        if i == hang:
            time.sleep(600)            # killed here, in the middle of the chunk
        time.sleep(0.15)
        note(f"done {i}")
        return {"y": chunk["x"] * 2.0 + chunk["row"], "row": chunk["row"]}

    open(f"{log}.ready.{os.getpid()}", "w").close()
    while len([f for f in os.listdir(os.path.dirname(log)) if ".ready." in f]) < barrier:
        time.sleep(0.01)
    out = sweep.run_sweep(fn, {"x": np.linspace(0, 1, 25, dtype=np.float32), "row": np.arange(25)},
                          directory, 3, progress=True)
    np.save(f"{log}.result.{os.getpid()}.npy", out["y"])
""")
_WORKER_CHUNKS = 9     # 25 rows in chunks of 3


def _start_worker(tmp_path, hang=-1, barrier=0):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "sweep"), str(tmp_path / "log"),
                             str(hang), str(barrier)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _log(tmp_path):
    path = tmp_path / "log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(condition, timeout=60):
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _check_one_clean_result(tmp_path, processes):
    """Every finished process returned one clean run's result, and each chunk was computed once in all."""
    clean = np.linspace(0, 1, 25, dtype=np.float32) * 2.0 + np.arange(25)
    results = sorted(tmp_path.glob("log.result.*.npy"))
    assert len(results) == processes
    for path in results:
        np.testing.assert_array_equal(np.load(path), clean)
    done = sorted(int(i) for what, i, _ in _log(tmp_path) if what == "done")
    assert done == list(range(_WORKER_CHUNKS)), done          # each chunk computed once, none twice
    names = os.listdir(tmp_path / "sweep")
    assert sorted(names) == [f"chunk_{i:06d}.npz" for i in range(_WORKER_CHUNKS)] + ["manifest.json"]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_sweep_killed_mid_chunk_resumes_to_one_clean_run(tmp_path, signal_name):
    import signal
    first = _start_worker(tmp_path, hang=4)
    _wait_for(lambda: ["start", "4", str(first.pid)] in _log(tmp_path))
    first.send_signal(getattr(signal, signal_name))
    assert first.wait(timeout=30) == -getattr(signal, signal_name)
    # What a kill during the chunk's write leaves: only the holder of chunk 4's lock may remove it.
    (tmp_path / "sweep" / ".tmp-chunk_000004.x1y2z3.npz").write_bytes(b"half a chunk")
    second = _start_worker(tmp_path)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "resuming: 4/9 chunks" in err
    _check_one_clean_result(tmp_path, processes=1)
    starts = [int(i) for what, i, _ in _log(tmp_path) if what == "start"]
    assert sorted(starts) == sorted(list(range(_WORKER_CHUNKS)) + [4])    # only the killed chunk restarted


def test_two_processes_started_together_share_the_chunks(tmp_path):
    workers = [_start_worker(tmp_path, barrier=2) for _ in range(2)]
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        assert "Traceback" not in err
    _check_one_clean_result(tmp_path, processes=2)
    # Both took chunks: they shared the work rather than one waiting for the other throughout.
    assert {pid for what, _, pid in _log(tmp_path) if what == "done"} == {str(w.pid) for w in workers}


def test_a_process_waiting_for_a_killed_ones_chunk_computes_it(tmp_path):
    import signal
    first = _start_worker(tmp_path, hang=2)
    _wait_for(lambda: ["start", "2", str(first.pid)] in _log(tmp_path))
    second = _start_worker(tmp_path)
    # The second takes every other chunk, says that chunk 2 is held, and waits for it.
    _wait_for(lambda: sum(what == "done" for what, _, pid in _log(tmp_path) if pid == str(second.pid)) == 6)
    first.send_signal(signal.SIGKILL)     # its lock dies with it
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "waiting for chunk(s) [2]" in err
    first.wait(timeout=30)
    _check_one_clean_result(tmp_path, processes=1)


# -- sizes by device (issue 14) ---------------------------------------------------------------------

class _StandInDevice:
    """A device description as jax.Device gives it: platform, device_kind, memory_stats()."""
    def __init__(self, platform, kind, limit=None, in_use=0):
        self.platform, self.device_kind, self._stats = platform, kind, limit and {"bytes_limit": limit,
                                                                                   "bytes_in_use": in_use}

    def memory_stats(self):
        return self._stats


def test_sizes_follow_the_device_kind_and_its_memory():
    from jaxadv.attacks.sizes import ACCELERATOR_MAX_LANES, CPU_SIZES, sizes_for_device
    per_lane = 4 * (2 * 3 * 784 + 10 * 784 + 3 * 2000)        # the attack's state for a small MLP, float32
    cpu = sizes_for_device(per_lane, _StandInDevice("cpu", "cpu"))
    assert (cpu.lanes, cpu.block_size, cpu.max_chunk_per_device) == (CPU_SIZES.lanes, 256, 256)
    # An H200 (141 GiB, 1 GiB in use): the cap, a power of two, blocks of several rounds of lanes.
    gpu = sizes_for_device(per_lane, _StandInDevice("gpu", "NVIDIA H200", 141 << 30, 1 << 30))
    assert gpu.device_kind == "NVIDIA H200" and gpu.lanes == ACCELERATOR_MAX_LANES
    assert gpu.block_size > gpu.lanes and gpu.block_size % gpu.lanes == 0 and gpu.max_chunk_per_device >= gpu.block_size
    # A small card: as many lanes as fit in a quarter of its free memory, rounded down to a power of two.
    small = sizes_for_device(per_lane, _StandInDevice("gpu", "small", 256 << 20))
    assert small.lanes == 1 << ((256 << 20) // 4 // per_lane).bit_length() - 1
    assert small.lanes * per_lane <= (256 << 20) // 4 < 2 * small.lanes * per_lane
    with pytest.raises(ValueError, match="memory_stats"):
        sizes_for_device(per_lane, _StandInDevice("gpu", "silent"))
    with pytest.raises(ValueError, match="bytes_per_lane"):
        sizes_for_device(0)


def test_attack_sizes_take_the_lanes_of_the_device():
    from jaxadv.attacks import AttackConfig, attack_sizes
    weights = jax.random.normal(jax.random.PRNGKey(0), (784, 10))
    logits_fn = lambda x: jnp.tanh(x.reshape(len(x), -1) @ weights)   # noqa: E731
    images = np.zeros((60000, 28, 28, 1), np.float32)
    sizes = attack_sizes(logits_fn, images, AttackConfig(), device=_StandInDevice("gpu", "H200", 141 << 30))
    assert sizes.lanes >= 4096 and sizes.block_size == 4 * sizes.lanes and sizes.chunk_size % sizes.block_size == 0
    assert sizes.device_kind == "H200"
    sizes = attack_sizes(logits_fn, images, AttackConfig(), device=_StandInDevice("cpu", "cpu"))
    assert (sizes.lanes, sizes.block_size, sizes.chunk_size) == (32, 256, 256)       # the CPU's
    assert attack_sizes(logits_fn, images[:40]).block_size == 40                     # a small set: one block
    # 400 images (a CNN at a few images/s: minutes) are no longer one chunk: an interrupted run keeps work.
    assert attack_sizes(logits_fn, images[:400], device=_StandInDevice("cpu", "cpu")).chunk_size == 256
