"""`jaxadv.attacks.attack_dataset`: the attack over a data set for any pure function, resumable, refusing to mix.

The models are defined here, as a user would bring them: a pure MLP on a parameter dict (as a
`jax.tree_util.Partial`), a closure, and a flax linen module; none is the zoo's `Model`.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import chunk_folder, sweep
from jaxadv.attacks import ATTACK_LBFGS, AttackConfig, RefineConfig, SearchConfig, attack_dataset, attack_sizes, dataset, lbfgs_attack

#: Short searches: the properties under test do not need the default's precision.
QUICK = AttackConfig(search=SearchConfig(max_bracket_steps=3, bisection_steps=2),
                     lbfgs=ATTACK_LBFGS._replace(max_iterations=20), refine=RefineConfig(steps=5))
SHAPE = (6, 6, 1)
CLASSES = 4


def mlp(params, x):
    """A tiny pure MLP: [B, 6, 6, 1] -> [B, 4] logits."""
    hidden = jnp.tanh(x.reshape(len(x), -1) @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def mlp_params(seed, hidden=12):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    n = int(np.prod(SHAPE))
    return {"w1": jax.random.normal(k1, (n, hidden)) * 1.5 / np.sqrt(n), "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, CLASSES)), "b2": jnp.zeros(CLASSES)}


def data(n, seed=0):
    rng = np.random.RandomState(seed)
    return rng.rand(n, *SHAPE).astype(np.float32), rng.randint(0, CLASSES, n).astype(np.int32)


def run(logits_fn, images, targets, directory, **options):
    return attack_dataset(logits_fn, images, targets, str(directory), QUICK, progress=False, **options)


def same(a, b, what=""):
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{what}: {key}")


# -- any model -------------------------------------------------------------------------------------

def _linen_model():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(CLASSES)(jnp.tanh(nn.Dense(12)(x.reshape(len(x), -1))))

    module = MLP()
    return jax.tree_util.Partial(module.apply, module.init(jax.random.PRNGKey(3), jnp.zeros((1,) + SHAPE)))


_CLOSED_OVER = mlp_params(4)
MODELS = {
    "Partial of a pure function": lambda: jax.tree_util.Partial(mlp, mlp_params(0)),
    "closure": lambda: (lambda x: mlp(_CLOSED_OVER, x)),
    "functools.partial": lambda: functools.partial(mlp, mlp_params(5)),
    "flax linen module": _linen_model,
}


@pytest.mark.parametrize("model", MODELS)
def test_any_pure_function_is_attacked(model, tmp_path):
    images, targets = data(10)
    out = run(MODELS[model](), images, targets, tmp_path / "a", lanes=4)
    assert set(out) == set(dataset.RESULT_FIELDS) and all(len(v) == 10 for v in out.values())
    assert out["success"].any() and np.all((out["adversarial"] >= 0) & (out["adversarial"] <= 1))


def test_the_sweep_finds_what_the_in_memory_attack_finds(tmp_path):
    logits_fn = jax.tree_util.Partial(mlp, mlp_params(0))
    images, targets = data(10)
    out = run(logits_fn, images, targets, tmp_path / "a", lanes=4)
    # Up to float32 rounding: the sweep runs one compiled program per block, `lbfgs_attack` dispatches
    # its steps one by one (and XLA fuses them otherwise).
    direct = lbfgs_attack(logits_fn, images, targets, QUICK._replace(lanes=4))
    np.testing.assert_array_equal(out["success"], np.asarray(direct.success))
    np.testing.assert_allclose(out["adversarial"], np.asarray(direct.adversarial), atol=1e-4)
    np.testing.assert_allclose(out["distortion"], np.asarray(direct.distortion), rtol=1e-3)


# -- resumption and the sweep's identity ---------------------------------------------------------------

def test_an_interrupted_attack_resumes_without_recomputing_its_chunks(tmp_path, monkeypatch, capsys):
    logits_fn = jax.tree_util.Partial(mlp, mlp_params(0))
    images, targets = data(12)
    whole = run(logits_fn, images, targets, tmp_path / "whole", lanes=4, chunk_size=4, block_size=4)

    # A crash after the first chunk (run_sweep's stand-in for one), then the same call again.
    monkeypatch.setattr(dataset, "run_sweep", functools.partial(sweep.run_sweep, stop_after=1))
    with pytest.raises(sweep.SweepInterrupted):
        run(logits_fn, images, targets, tmp_path / "cut", lanes=4, chunk_size=4, block_size=4)
    monkeypatch.undo()
    first = tmp_path / "cut" / "chunk_000000.npz"
    saved = first.stat()
    resumed = attack_dataset(logits_fn, images, targets, str(tmp_path / "cut"), QUICK, lanes=4, chunk_size=4,
                             block_size=4, name="MLP")
    assert "attack MLP resuming: 1/3 chunks (4/12 images" in capsys.readouterr().err
    assert first.stat().st_mtime_ns == saved.st_mtime_ns and first.stat().st_ino == saved.st_ino   # not rewritten
    same(resumed, whole, "resumed")


def test_a_folder_refuses_other_weights_and_other_architectures_and_resumes_the_same(tmp_path, capsys):
    images, targets = data(8)
    folder = tmp_path / "sweep"
    first = run(jax.tree_util.Partial(mlp, mlp_params(0)), images, targets, folder, name="MLP")

    # The same architecture and weights, built anew (new arrays, a new Partial): resumes, computes nothing.
    again = attack_dataset(jax.tree_util.Partial(mlp, mlp_params(0)), images, targets, str(folder), QUICK,
                           name="MLP again")
    assert "resuming: 1/1 chunks" in capsys.readouterr().err
    same(again, first, "resumed")

    with pytest.raises(chunk_folder.SweepMismatch, match="parameters") as other_weights:
        run(jax.tree_util.Partial(mlp, mlp_params(1)), images, targets, folder)
    assert str(folder) in str(other_weights.value) and "of attack MLP" in str(other_weights.value)
    assert "function:" not in str(other_weights.value)          # the architecture is the same
    with pytest.raises(chunk_folder.SweepMismatch, match="function") as other_architecture:
        run(jax.tree_util.Partial(mlp, mlp_params(0, hidden=13)), images, targets, folder)
    assert str(folder) in str(other_architecture.value)
    weights = mlp_params(0)
    with pytest.raises(chunk_folder.SweepMismatch, match="function"):
        run(lambda x: mlp(weights, x) * 2.0, images, targets, folder)     # the same weights, another function
    with pytest.raises(chunk_folder.SweepMismatch, match="attack"):
        attack_dataset(jax.tree_util.Partial(mlp, mlp_params(0)), images, targets, str(folder),
                       QUICK._replace(lbfgs=QUICK.lbfgs._replace(max_iterations=21)), progress=False)
    with pytest.raises(chunk_folder.SweepMismatch, match="untargeted"):
        run(jax.tree_util.Partial(mlp, mlp_params(0)), images, targets, folder, untargeted=True)


def test_the_fingerprint_reads_the_function_not_its_python_object():
    image = jnp.zeros((1,) + SHAPE)
    a = sweep.function_fingerprint(jax.tree_util.Partial(mlp, mlp_params(0)), image)
    assert a == sweep.function_fingerprint(jax.tree_util.Partial(mlp, mlp_params(0)), image)
    assert a == sweep.function_fingerprint(functools.partial(mlp, mlp_params(0)), image)
    b = sweep.function_fingerprint(jax.tree_util.Partial(mlp, mlp_params(1)), image)
    assert a["function"] == b["function"] and a["parameters"] != b["parameters"]


def test_a_rerun_with_other_sizes_or_settings_spelled_otherwise_resumes_and_a_real_change_is_named(tmp_path, monkeypatch,
                                                                                                   capsys):
    """Blocks and chunks change no result (tested below), so they are no part of the sweep's identity: a rerun with
    other sizes, or lower=0 for 0.0, resumes the folder's chunks and returns what one uninterrupted run returns.
    Other lanes are another sweep, named with both values."""
    logits_fn = jax.tree_util.Partial(mlp, mlp_params(0))
    images, targets = data(12)
    whole = run(logits_fn, images, targets, tmp_path / "whole", lanes=4, chunk_size=4, block_size=4)
    monkeypatch.setattr(dataset, "run_sweep", functools.partial(sweep.run_sweep, stop_after=1))
    with pytest.raises(sweep.SweepInterrupted):
        run(logits_fn, images, targets, tmp_path / "cut", lanes=4, chunk_size=4, block_size=4, lower=0, upper=1)
    monkeypatch.undo()
    capsys.readouterr()
    resumed = attack_dataset(logits_fn, images, targets, str(tmp_path / "cut"), QUICK, lanes=4, chunk_size=6,
                             block_size=2, lower=0.0, upper=1.0)
    assert "resuming: 1/3 chunks" in capsys.readouterr().err
    same(resumed, whole, "resumed with other sizes")
    with pytest.raises(chunk_folder.SweepMismatch, match="attack.lanes: the folder's 4, this call's 8"):
        run(logits_fn, images, targets, tmp_path / "cut", lanes=8)


# -- an image's result is the image's: any chunk, block or position ------------------------------------------

def test_an_images_result_does_not_depend_on_chunks_blocks_or_its_position(tmp_path):
    logits_fn = jax.tree_util.Partial(mlp, mlp_params(0))
    images, targets = data(15)              # more images than lanes, so lanes take new images mid-run
    reference = run(logits_fn, images, targets, tmp_path / "ref", lanes=4)
    assert reference["success"].any() and len(np.unique(reference["iterations"])) > 1
    for chunk, block in ((5, 5), (6, 3)):
        out = run(logits_fn, images, targets, tmp_path / f"c{chunk}b{block}", lanes=4, chunk_size=chunk, block_size=block)
        same(out, reference, f"chunks of {chunk}, blocks of {block}")
    order = np.roll(np.arange(15), 7)[::-1]         # every image elsewhere, in another block and lane
    moved = run(logits_fn, images[order], targets[order], tmp_path / "moved", lanes=4, chunk_size=6, block_size=3)
    same(moved, {k: v[order] for k, v in reference.items()}, "rotated and reversed")


# -- sizes from the traced function ------------------------------------------------------------------

def test_memory_per_lane_is_read_off_the_traced_function():
    image = jax.ShapeDtypeStruct((1,) + SHAPE, jnp.float32)
    # reshape [1, 36], x @ w1 [1, 12], + b1 (a broadcast [1, 12] and the sum [1, 12]), tanh [1, 12],
    # @ w2 [1, 4], + b2 (broadcast, sum [1, 4]): 36 + 4·12 + 3·4 floats.
    assert dataset.intermediate_bytes(jax.tree_util.Partial(mlp, mlp_params(0)), image) == 4 * (36 + 4 * 12 + 3 * 4)

    class _GPU:
        platform, device_kind = "gpu", "stand-in"

        def memory_stats(self):
            return {"bytes_limit": 64 << 20, "bytes_in_use": 0}

    images = np.zeros((10000,) + SHAPE, np.float32)
    narrow = attack_sizes(jax.tree_util.Partial(mlp, mlp_params(0, hidden=12)), images, device=_GPU())
    wide = attack_sizes(jax.tree_util.Partial(mlp, mlp_params(0, hidden=4096)), images, device=_GPU())
    assert wide.lanes < narrow.lanes          # a wider model leaves room for fewer lanes


def test_a_chunk_size_given_alone_gets_a_block_that_divides_it():
    images = np.zeros((200,) + SHAPE, np.float32)
    logits_fn = jax.tree_util.Partial(mlp, mlp_params(0))
    devices = len(jax.devices())
    for chunk in (50 * devices, 48 * devices, 7 * devices):
        sizes = attack_sizes(logits_fn, images, chunk_size=chunk)
        assert sizes.chunk_size == chunk and chunk % (devices * sizes.block_size) == 0
        assert sizes.block_size <= attack_sizes(logits_fn, images).block_size
    assert attack_sizes(logits_fn, images, chunk_size=48 * devices).block_size == 48


# -- bad arguments: named, before any work -----------------------------------------------------------

_IMAGES, _TARGETS = data(6)
BAD = {
    "logits_fn": (TypeError, dict(logits_fn="mlp")),
    "images dtype": (TypeError, dict(images=(_IMAGES * 255).astype(np.uint8))),
    "images range": (ValueError, dict(images=_IMAGES + 1.0)),
    "images NaN": (ValueError, dict(images=np.where(_IMAGES > 0.99, np.nan, _IMAGES))),
    "targets shape": (ValueError, dict(targets=_TARGETS[:5])),
    "targets range": (ValueError, dict(targets=_TARGETS + CLASSES)),
    "targets dtype": (TypeError, dict(targets=_TARGETS.astype(np.float32))),
    "directory": (TypeError, dict(directory=3)),
    "config": (TypeError, dict(config={"lanes": 4})),
    "config.lanes": (ValueError, dict(config=QUICK._replace(lanes=0))),
    "chunk_size": (ValueError, dict(chunk_size=0)),
    "chunk_size multiple": (ValueError, dict(chunk_size=5, block_size=2)),
    "block_size": (ValueError, dict(block_size=-1)),
    "lanes": (ValueError, dict(lanes=1.5)),
    "name": (TypeError, dict(name=7)),
    "progress": (TypeError, dict(progress="yes")),
    "lower": (ValueError, dict(lower=2.0)),
    "untargeted": (TypeError, dict(untargeted=1)),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_argument_is_named_before_any_work(case, tmp_path):
    error, change = BAD[case]
    arguments = dict(logits_fn=jax.tree_util.Partial(mlp, mlp_params(0)), images=_IMAGES, targets=_TARGETS,
                     directory=str(tmp_path / "never"), config=QUICK)
    options = {k: v for k, v in change.items() if k not in arguments}
    arguments.update({k: v for k, v in change.items() if k in arguments})
    with pytest.raises(error, match=case.split()[0].split(".")[0]):
        attack_dataset(*arguments.values(), **options)
    assert not os.path.exists(tmp_path / "never")
