"""Training, evaluation, checkpoints, and the experiments' shared plumbing (small synthetic data)."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_synthetic, write_idx_split
from jaxadv.checkpoint import load_checkpoint, save_checkpoint
from jaxadv.data import load_dataset
from jaxadv.models import ZooModel, flatten, get_model
from jaxadv.train import TrainConfig, error_rate, pretrain_sparse_autoencoder, train, zoo_config

FAST = TrainConfig(epochs=2, batch_size=64, learning_rate=1e-2, verbose=False)


def leaves_equal_bitwise(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb))


# -- training -----------------------------------------------------------------------

def test_softmax_learns_separable_data(tiny_trained_softmax):
    model, params = tiny_trained_softmax
    held_out = make_synthetic(256, seed=1)
    assert error_rate(model.module, params, held_out.images, held_out.labels) < 0.05


def test_training_is_deterministic_from_the_key(synthetic):
    model = get_model("FC100-100-10")
    a = train(model, synthetic.images, synthetic.labels, jax.random.PRNGKey(7), FAST)
    b = train(model, synthetic.images, synthetic.labels, jax.random.PRNGKey(7), FAST)
    c = train(model, synthetic.images, synthetic.labels, jax.random.PRNGKey(8), FAST)
    assert leaves_equal_bitwise(a, b)
    assert not leaves_equal_bitwise(a, c)


def test_frozen_layer_is_not_updated(synthetic):
    module = nn.Sequential((flatten, nn.Dense(16), nn.sigmoid, nn.Dense(10)))
    model = ZooModel("frozen-test", module, {"layers_1": 0.1, "layers_3": 0.1}, frozen=("layers_1",))
    key = jax.random.PRNGKey(0)
    short = train(model, synthetic.images, synthetic.labels, key, FAST._replace(epochs=1))["params"]
    long = train(model, synthetic.images, synthetic.labels, key, FAST._replace(epochs=3))["params"]
    assert leaves_equal_bitwise(short["layers_1"], long["layers_1"])          # same init, never updated
    assert not leaves_equal_bitwise(short["layers_3"], long["layers_3"])      # the softmax on top did train


def test_sparse_autoencoder_makes_sparse_codes(synthetic):
    config = TrainConfig(batch_size=64, ae_epochs=8, ae_learning_rate=1e-2, verbose=False)
    encoder = pretrain_sparse_autoencoder(synthetic.images, jax.random.PRNGKey(0), config, features=32)
    assert encoder["w"].shape == (784, 32) and encoder["b"].shape == (32,)
    x = synthetic.images.reshape(len(synthetic.images), -1)
    mean_activation = jax.nn.sigmoid(x @ encoder["w"] + encoder["b"]).mean()
    # A Glorot-initialised sigmoid layer averages about 0.5 on these inputs; the KL penalty pulls towards ρ.
    assert mean_activation < 0.25


def test_error_rate_matches_brute_force(tiny_trained_softmax):
    model, params = tiny_trained_softmax
    data = make_synthetic(203, seed=5)  # not a multiple of the batch: exercises the padded last batch
    dense = params["params"]["layers_1"]
    w, b = np.asarray(dense["kernel"], np.float64), np.asarray(dense["bias"], np.float64)
    predictions = np.argmax(data.images.reshape(203, -1) @ w + b, axis=1)
    expected = np.mean(predictions != data.labels)
    assert error_rate(model.module, params, data.images, data.labels, batch_size=50) == pytest.approx(expected)
    flipped = (data.labels + 1) % 10
    assert error_rate(model.module, params, data.images, flipped) == pytest.approx(np.mean(predictions != flipped))


def test_bad_training_inputs(synthetic):
    model = get_model("FC10(1e-4)")
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="images must have shape"):
        train(model, synthetic.images[:, :, :, 0], synthetic.labels, key, FAST)
    with pytest.raises(TypeError, match="images must be floating"):
        train(model, (synthetic.images * 255).astype(np.uint8), synthetic.labels, key, FAST)
    with pytest.raises(ValueError, match="labels must have shape"):
        train(model, synthetic.images, synthetic.labels[:-1], key, FAST)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        train(model, synthetic.images, synthetic.labels + 5, key, FAST)
    with pytest.raises(ValueError, match="config.epochs"):
        train(model, synthetic.images, synthetic.labels, key, FAST._replace(epochs=0))
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train(model, synthetic.images, synthetic.labels, key, {"epochs": 1})


def test_zoo_config_quick_is_short():
    for name in ("FC10(1)", "FC200-200-10", "AE400-10", "ConvNet"):
        full, quick = zoo_config(get_model(name)), zoo_config(get_model(name), quick=True)
        assert quick.epochs <= 2 and quick.ae_epochs == 1 and full.epochs > quick.epochs


# -- checkpoints ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["AE400-10", "ConvNet"])
def test_checkpoint_round_trip_is_bit_identical(tmp_path, name):
    model = get_model(name)
    params = model.init(jax.random.PRNGKey(3))
    params = jax.tree.map(lambda w: w + jnp.float32(1e-7) * jnp.arange(w.size).reshape(w.shape), params)
    meta = {"model": name, "test_error": 0.123, "config": {"epochs": 3}}
    save_checkpoint(tmp_path / "ckpt", params, meta)
    loaded, loaded_meta = load_checkpoint(tmp_path / "ckpt", model)
    assert loaded_meta == meta
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert leaves_equal_bitwise(loaded, params)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1))
    assert np.array_equal(model.apply(loaded, x), model.apply(params, x))
    save_checkpoint(tmp_path / "ckpt", params, {"again": True})  # overwriting works
    assert load_checkpoint(tmp_path / "ckpt", model)[1] == {"again": True}


def test_checkpoint_errors(tmp_path):
    params = get_model("FC100-100-10").init(jax.random.PRNGKey(0))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "missing", get_model("FC100-100-10"))
    save_checkpoint(tmp_path / "c", params, {})
    with pytest.raises(ValueError, match=r"\['params'\]\['layers_1'\]\['bias'\] is float32\[100\], expected of "
                                         r"FC200-200-10 float32\[200\]"):
        load_checkpoint(tmp_path / "c", get_model("FC200-200-10"))
    with pytest.raises(ValueError, match="does not hold the parameters of FC10.*delete the folder"):
        load_checkpoint(tmp_path / "c", get_model("FC10(1)"))
    # Any structure serves as the template: the variables themselves, or their shapes.
    assert leaves_equal_bitwise(load_checkpoint(tmp_path / "c", params)[0], params)
    with pytest.raises(TypeError, match="meta must be a dict"):
        save_checkpoint(tmp_path / "d", params, ["not", "a", "dict"])
    (tmp_path / "c" / "meta.json").unlink()  # a save killed before its meta landed
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "c", get_model("FC100-100-10"))


def test_a_failed_save_leaves_the_good_checkpoint_as_it_was(tmp_path):
    model = get_model("FC10(1)")
    good, other = model.init(jax.random.PRNGKey(0)), model.init(jax.random.PRNGKey(1))
    save_checkpoint(tmp_path / "c", good, {"epochs": 3})
    before = {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()}
    for meta in ({"error": jnp.float32(0.1)}, {"error": float("nan")}, {"params_sha256": "x"}):
        with pytest.raises((TypeError, ValueError), match="meta"):
            save_checkpoint(tmp_path / "c", other, meta)
        assert {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()} == before
    assert leaves_equal_bitwise(load_checkpoint(tmp_path / "c", model)[0], good)


@pytest.mark.parametrize("damage", ["truncate", "extend", "flip", "empty", "meta-garbage", "meta-list"])
def test_a_damaged_checkpoint_is_named_never_used(tmp_path, damage):
    model = get_model("FC10(1)")
    save_checkpoint(tmp_path / "c", model.init(jax.random.PRNGKey(0)), {})
    params_file, meta_file = tmp_path / "c" / "params.msgpack", tmp_path / "c" / "meta.json"
    data = bytearray(params_file.read_bytes())
    if damage == "truncate":
        params_file.write_bytes(bytes(data[:-7]))
    elif damage == "extend":
        params_file.write_bytes(bytes(data) + b"\0")
    elif damage == "flip":                     # one bit of one weight: msgpack still loads it
        data[len(data) // 2] ^= 1
        params_file.write_bytes(bytes(data))
    elif damage == "empty":
        params_file.write_bytes(b"")
    elif damage == "meta-garbage":
        meta_file.write_text("{not json")
    else:
        meta_file.write_text("[1, 2]")
    named = meta_file.name if damage.startswith("meta") else params_file.name
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_checkpoint(tmp_path / "c", model)


# -- jaxadv.zoo and train_zoo --------------------------------------------------------

def test_trained_models_saves_then_reuses(tmp_path, synthetic, monkeypatch):
    from jaxadv import zoo
    got = zoo.trained_models(["FC10(1)"], "fashion_mnist", tmp_path, quick=True,
                                train_set=synthetic, tag="syn", verbose=False)
    model, params = got["FC10(1)@syn"]
    meta = json.loads((tmp_path / "models" / "FC10(1)@syn" / "meta.json").read_text())
    assert meta["model"] == "FC10(1)" and meta["tag"] == "syn" and meta["quick"] is True
    assert meta["num_train"] == len(synthetic.labels) and meta["num_params"] == 7850

    def must_not_train(*args, **kwargs):
        raise AssertionError("a stored model was retrained")
    monkeypatch.setattr(zoo, "train", must_not_train)
    again = zoo.trained_models("FC10(1)", "fashion_mnist", tmp_path, quick=True,
                                  train_set=synthetic, tag="syn", verbose=False)
    assert leaves_equal_bitwise(again["FC10(1)@syn"][1], params)
    with pytest.raises(AssertionError, match="retrained"):  # a quick model never stands in for a full one
        zoo.trained_models("FC10(1)", "fashion_mnist", tmp_path, train_set=synthetic, tag="syn")
    with pytest.raises(zoo.WorkdirMismatch, match="trained on 'fashion_mnist'"):
        zoo.trained_models("FC10(1)", "mnist", tmp_path, quick=True, train_set=synthetic, tag="syn")
    with pytest.raises(ValueError, match="tag is required"):
        zoo.trained_models("FC10(1)", "fashion_mnist", tmp_path, train_set=synthetic)
    # The same models through the config loader, as (module, variables): the path a user's model takes.
    context = zoo.ModelsContext("fashion_mnist", tmp_path, None, quick=True)
    monkeypatch.setattr(zoo, "trained_models", lambda names, *a, **k: {n: got["FC10(1)@syn"] for n in names})
    (module, variables), = zoo.load_models(["FC10(1)"], context).values()
    assert module is got["FC10(1)@syn"][0].module and leaves_equal_bitwise(variables, params)


def test_a_models_config_file_gives_the_users_models(tmp_path):
    """Configs as code: a file with get_models(context) -> {name: (model, params)}; a bad one is named."""
    from jaxadv.zoo import ConfigError, ModelsContext, load_models
    config = tmp_path / "my_models.py"
    config.write_text(
        "import jax, jax.numpy as jnp\n"
        "def apply(params, x):\n    return x.reshape(x.shape[0], -1) @ params['w']\n"
        "def get_models(context):\n"
        "    return {'linear': (apply, {'w': jnp.ones((784, 10)) * (0.5 if context.quick else 1.0)})}\n")
    models = load_models(str(config), ModelsContext(quick=True))
    assert list(models) == ["linear"] and float(models["linear"][1]["w"][0, 0]) == 0.5
    # A config written as the repo writes Python (postponed annotations, a flax module with a field) loads too.
    (tmp_path / "flax_models.py").write_text(
        "from __future__ import annotations\nimport flax.linen as nn, jax, jax.numpy as jnp\n"
        "class MLP(nn.Module):\n    hidden: int = 8\n    @nn.compact\n    def __call__(self, x):\n"
        "        return nn.Dense(10)(nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1))))\n"
        "def get_models(context):\n"
        "    return {'mlp': (MLP(), MLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))}\n")
    (module, variables), = load_models(str(tmp_path / "flax_models.py")).values()
    assert module.apply(variables, np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="empty.py.*defines no get_models"):
        load_models(str(tmp_path / "empty.py"))
    (tmp_path / "bad.py").write_text("def get_models(context):\n    return {'m': 3}\n")
    with pytest.raises(ConfigError, match="entry 'm' must be a name mapped to \\(model, params\\)"):
        load_models(str(tmp_path / "bad.py"))
    with pytest.raises(ConfigError, match="no config file"):
        load_models(str(tmp_path / "missing.py"))


def test_markdown_table_and_json(tmp_path):
    from jaxadv.report import markdown_table, write_json_atomic
    table = markdown_table(["a", "b"], [[1, 0.123456], ["x", "y"]])
    assert table == "| a | b |\n|---|---|\n| 1 | 0.1235 |\n| x | y |\n"
    with pytest.raises(ValueError, match="cells"):
        markdown_table(["a"], [[1, 2]])
    write_json_atomic(tmp_path / "sub" / "r.json", {"x": np.float32(0.5), "v": np.arange(3)})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"x": 0.5, "v": [0, 1, 2]}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]  # no temporary files left


def test_train_zoo_quick_end_to_end(tmp_path, monkeypatch):
    from experiments import train_zoo
    write_idx_split(tmp_path / "data" / "fashion_mnist", "train", make_synthetic(256, seed=2))
    write_idx_split(tmp_path / "data" / "fashion_mnist", "t10k", make_synthetic(64, seed=3))
    monkeypatch.setattr(train_zoo, "ALL_MODELS", ("FC10(1e-4)", "FC10(1)"))
    argv = ["--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "run"), "--quick"]
    results = train_zoo.main(argv)
    saved = json.loads((tmp_path / "run" / "train_zoo" / "quick" / "results.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["FC10(1e-4)", "FC10(1)"]
    for row in saved["rows"]:
        assert {"model", "train_error", "test_error", "num_params", "train_seconds"} <= set(row)
        assert 0.0 <= row["test_error"] <= 1.0 and row["num_params"] == 7850
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    table = (tmp_path / "run" / "train_zoo" / "quick" / "table.md").read_text()
    assert "FC10(1e-4)" in table and "7.40%" in table  # the paper's test error beside ours
    assert (tmp_path / "run" / "models" / "FC10(1)" / "params.msgpack").is_file()


# -- real data ------------------------------------------------------------------------

def test_fc100_on_real_mnist_digits(data_dir):
    """FC100-100-10 trained briefly on the first half of the MNIST test images, scored on the second."""
    test = load_dataset("mnist", "test", data_dir)
    model = get_model("FC100-100-10")
    params = train(model, test.images[:5000], test.labels[:5000], jax.random.PRNGKey(0),
                   TrainConfig(epochs=10, batch_size=64, learning_rate=2e-3, verbose=False))
    assert error_rate(model.module, params, test.images[5000:], test.labels[5000:]) < 0.10


def test_common_args_default_workdir_follows_dataset():
    from experiments.common import ArgumentParser, add_common_args, parse_args
    parser = add_common_args(ArgumentParser())
    args = parse_args(parser, [])
    # Absolute where given (issue 23): a relative path means the folder where the command was typed.
    assert (args.dataset, args.workdir, args.data_dir, args.quick) == ("fashion_mnist", os.path.abspath(
        "runs/fashion_mnist"), None, False)
    assert parse_args(parser, ["--dataset", "mnist"]).workdir == os.path.abspath("runs/mnist")
    assert parse_args(parser, ["--dataset", "mnist", "--workdir", "w"]).workdir == os.path.abspath("w")
    assert parser.parse_args([]).workdir is None          # argparse alone: nothing patched into the parser
