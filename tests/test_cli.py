"""The experiments' command lines, tried as a new user would (issue 10, classes 14-20).

Every mistake ends with one line on stderr that names the flag or the file, exit status 2, within
seconds, and leaves nothing behind; tracebacks are for bugs.
"""
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, make_synthetic, write_idx_split

EXPERIMENTS = ["train_zoo", "table1", "table2", "table3", "table5", "units", "adversarial_training", "sparse_and_fast"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_mistyped_flag_is_an_error_not_a_prefix_match(experiment, capsys):
    # argparse's prefix matching took --num-image for --num-images (and --data for --data-dir).
    main = importlib.import_module(f"experiments.{experiment}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "somewhere", "--num-image", "5", "--quic"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_mistyped_flag_gets_the_usage_and_the_nearest_flag(experiment, capsys):
    """--quik: argparse's usage, then one line naming the flag and the one meant; exit 2, no traceback."""
    main = importlib.import_module(f"experiments.{experiment}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--quik", "--workdri=w"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith("usage: ") and err.count("error:") == 1
    error_line = err.splitlines()[-1]
    assert error_line.endswith("unrecognized arguments: --quik --workdri=w "
                               "(did you mean --quick?; did you mean --workdir?)"), error_line
    with pytest.raises(SystemExit):
        main(["--zzzzzz"])                    # nothing near it: no guess
    assert "did you mean" not in capsys.readouterr().err


def _fails_in_one_line(experiment, argv, capsys, tmp_path):
    """Run `experiment` as its command does (run_main); its one line on stderr, after checking the rest."""
    from experiments.cli import run_main
    main = importlib.import_module(f"experiments.{experiment}").main
    before = sorted(tmp_path.rglob("*"))
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert seconds < 30
    assert sorted(tmp_path.rglob("*")) == before          # no partial output: not even a folder
    return err


@pytest.fixture
def no_data(tmp_path):
    """A --data-dir that does not exist: a run that got past its checks would stop there, not train."""
    return ["--data-dir", str(tmp_path / "no-data"), "--workdir", str(tmp_path / "w")]


# -- class 14: every flag checked at parse time ----------------------------------------------------

@pytest.mark.parametrize("experiment, argv, flag", [
    ("table5", ["--no-alexnet", "--num-images", "0"], "--num-images"),          # ran 10 images
    ("table5", ["--no-alexnet", "--num-images", "99999999"], "--num-images"),   # a JAX traceback
    ("table5", ["--no-alexnet", "--power-iterations", "-1"], "--power-iterations"),
    ("table5", ["--no-alexnet", "--chunk-size", "0"], "--chunk-size"),
    ("units", ["--num-random", "0"], "--num-random"),                          # ran 20 directions
    ("units", ["--k", "1"], "--k"),
    ("units", ["--quick", "--k", "5000"], "--k"),                              # --quick ranks 2000 images
    ("adversarial_training", ["--train-images", "-3"], "--train-images"),      # trained on 59,997
    ("adversarial_training", ["--train-images", "0"], "--train-images"),       # fell back to 6,000
    ("adversarial_training", ["--epochs", "0"], "--epochs"),                   # a traceback
    ("adversarial_training", ["--eval-images", "0"], "--eval-images"),
    ("table1", ["--split", "test", "--num-images", "10001"], "--num-images"),  # the test set has 10,000
    ("table1", ["--num-images", "10", "--chunk-size", "7"], "--chunk-size"),   # found after training
    ("table3", ["--num-images", "20000"], "--num-images"),
    ("table2", ["--num-images", "three"], "--num-images"),
])
def test_nonsense_values_are_refused_at_parse_time(experiment, argv, flag, capsys, tmp_path, no_data):
    err = _fails_in_one_line(experiment, argv + no_data, capsys, tmp_path)
    assert f"argument {flag}" in err


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "127.0.0.1:1"], "need --distributed"),
    (["--distributed", "--coordinator", "127.0.0.1:1"], "go together"),
    (["--distributed", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id"),
])
def test_the_distributed_flags_are_checked_before_jax_distributed_starts(argv, message, capsys, tmp_path, no_data):
    err = _fails_in_one_line("table1", argv + no_data, capsys, tmp_path)
    assert message in err


def test_a_size_given_with_quick_is_used():
    # --eval-images was ignored under --quick.
    from experiments import adversarial_training as at
    base, train_images, eval_images, curve_images = at.sizes(at.build_parser().parse_args(["--quick", "--eval-images", "7"]))
    assert (eval_images, train_images, base.epochs) == (7, at.QUICK["train_images"], at.QUICK["epochs"])
    base, train_images, eval_images, _ = at.sizes(at.build_parser().parse_args(["--epochs", "2", "--train-images", "100"]))
    assert (base.epochs, train_images, eval_images) == (2, 100, at.DEFAULT_EVAL_IMAGES)


# -- class 15: user errors in one line, exit 2 -------------------------------------------------------

def test_a_missing_data_folder_is_one_line(capsys, tmp_path, no_data):
    err = _fails_in_one_line("train_zoo", no_data, capsys, tmp_path)
    assert err.startswith("error: data folder") and str(tmp_path / "no-data") in err and "--data-dir" in err


def test_a_workdir_that_is_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    err = _fails_in_one_line("table1", ["--workdir", str(tmp_path / "file"), "--quick"], capsys, tmp_path)
    assert err.startswith("error: --workdir:") and str(tmp_path / "file") in err and "is a file" in err


def test_mnist_without_its_training_images_is_one_line(capsys, tmp_path):
    write_idx_split(tmp_path / "data" / "mnist", "t10k", make_synthetic(20))      # the test split only
    err = _fails_in_one_line("train_zoo", ["--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                                           "--workdir", str(tmp_path / "w"), "--quick"], capsys, tmp_path)
    assert "train-images-idx3-ubyte" in err and "MNIST training images are not in this folder" in err


# -- class 16: an unwritable workdir is found before any work ----------------------------------------

def _read_only_command(folder: Path, argv):
    """A command running `argv` where `folder` is really read-only (root ignores file permissions)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return argv
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: no way to make a folder read-only for this test")
    wrap = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            'mount -t tmpfs -o ro none "$0" && exec "$@"', str(folder)]
    probe = subprocess.run(wrap + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a read-only folder here: {probe.stderr.strip()}")
    return wrap + argv


def test_a_read_only_workdir_is_refused_before_any_work(tmp_path):
    data = tmp_path / "data" / "fashion_mnist"
    write_idx_split(data, "train", make_synthetic(256))
    write_idx_split(data, "t10k", make_synthetic(64, seed=1))
    read_only = tmp_path / "ro"
    read_only.mkdir()
    command = _read_only_command(read_only, [sys.executable, "-m", "experiments.train_zoo", "--quick",
                                             "--data-dir", str(tmp_path / "data"), "--workdir", str(read_only / "w")])
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    seconds = time.perf_counter() - start
    try:
        assert proc.returncode == 2, proc.stderr
        # One line, before training (which prints "training ..." on stderr): the work was not done to be lost.
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("error: --workdir: cannot write in") and str(read_only) in proc.stderr
        assert seconds < 30
    finally:
        read_only.chmod(0o755)


# -- class 17: offline, no data folder: a clear error within seconds, nothing left behind --------------

def test_offline_without_a_data_folder_fails_within_seconds(tmp_path):
    from jaxadv.data import _unreachable_host
    if _unreachable_host(["https://storage.googleapis.com/cvdf-datasets/mnist/"]) is None:
        pytest.skip("MNIST's download host answers here: tensorflow-datasets would really download it")
    env = {k: v for k, v in os.environ.items() if k != "JAXADV_DATA_DIR"}
    env.update(TFDS_DATA_DIR=str(tmp_path / "tfds"), HOME=str(tmp_path / "home"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "experiments.train_zoo", "--dataset", "mnist", "--quick",
                           "--workdir", str(tmp_path / "w")], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "could not load mnist train" in proc.stderr and "cannot be reached" in proc.stderr
    assert "--data-dir" in proc.stderr
    assert seconds < 30              # tensorflow-datasets alone retried for about 7 minutes
    assert list(tmp_path.iterdir()) == []     # no *.tmp.* or incomplete.* folders, no workdir


@pytest.mark.parametrize("script", ["certify_zoo", "profile_attack", "bench_attack", "bench_optimality",
                                    "check_lbfgs_identity", "check_lipschitz_identity"])
def test_a_script_without_its_data_says_so_in_one_line(tmp_path, script):
    """The scripts that load data run through `experiments.cli.run_main`, as the experiments do: a missing data
    folder is one line on stderr and exit status 2, never a traceback."""
    out = ["--out", str(tmp_path / "out")] if script.startswith("check_") else []
    out += ["--jax-only"] if script == "bench_optimality" else []     # (no note that torch is missing)
    proc = subprocess.run([sys.executable, f"scripts/{script}.py", "--data-dir", str(tmp_path / "none"),
                           "--workdir", str(tmp_path / "w"), *out], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "does not exist" in proc.stderr


# -- class 18: runs of other configurations never overwrite each other ---------------------------------

def _parser(experiment):
    return importlib.import_module(f"experiments.{experiment}").build_parser()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_configuration_has_its_own_output_folder(experiment, tmp_path):
    from experiments.common import output_dir
    parser = _parser(experiment)
    flags = {a.option_strings[-1]: a for a in parser._actions if a.option_strings}
    configurations = [[], ["--quick"], ["--quick", "--workdir", str(tmp_path / "w2")]]
    for flag, value in (("--num-images", "7"), ("--seed", "3"), ("--split", "test"), ("--num-random", "5"),
                        ("--epochs", "2"), ("--power-iterations", "3"), ("--block-size", "4"),
                        ("--variants", "dropout"), ("--models", "FC10(1)")):
        if flag in flags:
            configurations.append([flag, value])
            configurations.append(["--quick", flag, value])
    names = {}
    for argv in configurations:
        args = parser.parse_args(argv + ["--data-dir", "d"] + ([] if "--workdir" in argv else ["--workdir", str(tmp_path)]))
        path = output_dir(parser, args, experiment)
        assert path.parent.name == experiment and re.fullmatch(r"[\w.,=+-]+", path.name), path
        names.setdefault(path.name, set()).add(tuple(a for a in argv if not a.startswith(str(tmp_path))))
    # Only the --workdir (where, not what) and nothing else may share a name.
    shared = {name: argvs for name, argvs in names.items() if len(argvs) > 1}
    assert shared == {"quick": {("--quick",), ("--quick", "--workdir")}}


def test_run_names_read_as_the_options_that_changed():
    from experiments.common import run_name
    parser = _parser("table1")
    name = lambda argv: run_name(parser, parser.parse_args(argv + ["--workdir", "w"]))   # noqa: E731
    assert name([]) == "default"
    assert name(["--split", "test", "--num-images", "10000"]) == "num-images=10000_split=test"
    assert name(["--chunk-size", "50", "--data-dir", "x", "--split", "test"]) == "split=test"   # where and how only
    odd = name(["--models", "FC10(1e-4)", "FC10(1)"])
    assert odd.startswith("models=FC101e-4,FC101-") and odd != name(["--models", "FC10(1e-4)", "FC10(1e-2)"])


def test_a_rerun_with_other_options_keeps_the_earlier_results(tmp_path, monkeypatch):
    from experiments import train_zoo
    write_idx_split(tmp_path / "data" / "fashion_mnist", "train", make_synthetic(256, seed=2))
    write_idx_split(tmp_path / "data" / "fashion_mnist", "t10k", make_synthetic(64, seed=3))
    monkeypatch.setattr(train_zoo, "ALL_MODELS", ("FC10(1)",))
    argv = ["--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "run")]
    train_zoo.main(argv + ["--quick"])
    train_zoo.main(argv)          # the full schedule: was written over the quick run's results
    out = tmp_path / "run" / "train_zoo"
    assert sorted(p.name for p in out.iterdir()) == ["default", "quick"]
    assert json.loads((out / "quick" / "results.json").read_text())["quick"] is True
    assert json.loads((out / "default" / "results.json").read_text())["quick"] is False


# -- class 20: the documentation says what the code does ----------------------------------------------

README = (REPO_ROOT / "README.md").read_text()
DOCS = "\n".join(path.read_text() for path in sorted((REPO_ROOT / "docs").glob("*.md")))


def test_readme_and_help_agree_on_adversarial_training_epochs():
    from experiments import adversarial_training as at
    help_text = at.build_parser().format_help()
    assert f"default {at.BASE.epochs}, {at.QUICK['epochs']} with --quick" in " ".join(help_text.split())
    text = README + DOCS
    stated = set(re.findall(r"(\d+) epochs of Adam", text)) | set(re.findall(r"FC100-100-10, (\d+) epochs", text))
    assert stated == {str(at.BASE.epochs)}


def test_quick_says_how_many_epochs_it_trains():
    from experiments import adversarial_training as at
    from jaxadv.models import ALL_MODELS, get_model
    from jaxadv.train import zoo_config
    quick_help = " ".join(_parser("train_zoo")._option_string_actions["--quick"].help.split())
    zoo_epochs = {zoo_config(get_model(name), quick=True, verbose=False).epochs for name in ALL_MODELS}
    assert f"for {min(zoo_epochs)}-{max(zoo_epochs)} epochs" in quick_help
    assert f"adversarial_training: {at.QUICK['epochs']} epochs" in quick_help


def test_readme_commands_name_their_environment_and_data():
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    venvs = [re.search(r"-m venv (\S+)", command).group(1) for command in commands]
    assert len(venvs) == 2 and venvs[0] != venvs[1]       # command 2 does not silently reuse command 1's
    experiments = README.split("## Experiments", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", experiments, flags=re.S)        # commands typed as they stand
    prose = re.sub(r"```bash\n.*?```", "", experiments, flags=re.S)
    runs = re.findall(r"`([^`]*-m experiments\.\w+[^`]*)`", prose)
    assert runs and all(run.startswith(".venv/bin/python -m") for run in runs), runs
    typed = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert typed and all(line.startswith("JAXADV_DATA_DIR=../shared/data .venv/bin/python -m") for line in typed)
    assert "JAXADV_DATA_DIR" in experiments


@pytest.mark.parametrize("flag", [["--num-images", "0"], ["--num-images", "10001"], ["--fine-values", "2"],
                                  ["--max-pixels", "0"]])
def test_sparse_and_fast_checks_its_numbers_at_parse_time(flag, capsys):
    from experiments.sparse_and_fast import main
    with pytest.raises(SystemExit) as exit_info:
        main(flag + ["--workdir", "/nonexistent/never-made"])
    assert exit_info.value.code == 2
    assert flag[0] in capsys.readouterr().err


def test_experiments_take_your_models_as_a_config_file(data_dir, tmp_path, capsys):
    """--models my_models.py: Table 1's attack columns, Table 2's transfer, Table 5's bounds and the units run on a
    user's flax CNN (experiments/configs/my_cnn.py, trained once on 2,000 images and then loaded)."""
    from experiments import table1, table2, table5, units
    config = str(REPO_ROOT / "experiments" / "configs" / "my_cnn.py")
    common = ["--models", config, "--quick", "--data-dir", data_dir, "--workdir", str(tmp_path)]
    t1 = table1.main(common + ["--num-images", "40"])
    assert [row["model"] for row in t1["rows"]] == ["CNN-quick"] and t1["rows"][0]["success_rate"] > 0.9
    assert (tmp_path / "models" / "CNN-quick" / "meta.json").is_file()      # trained once, loaded afterwards
    t2 = table2.main(common + ["--num-images", "40"])
    assert t2["column_labels"] == ["CNN-quick"] and t2["paper"] is None
    assert t2["error_rates"][0][0] > 0.9                # its own adversarial set fools it
    t5 = table5.main(common + ["--no-alexnet", "--num-images", "10"])
    (network,) = t5["zoo"]
    kinds = [row["kind"] for row in network["layers"]]
    assert "conv" in kinds and "avgpool" in kinds and network["network_bound"] > 0
    assert not t5["radius"]["CNN-quick"]["violations"] and not t5["radius"]["CNN-quick"]["violations_pairwise"]
    u = units.main(common + ["--num-random", "4", "--k", "5"])
    assert u["models"]["CNN-quick"]["where"] == "the input of its last dense layer"
    assert u["models"]["CNN-quick"]["dim"] == 16 * 7 * 7
    assert len(list((tmp_path / "units").rglob("natural_CNN-quick.png"))) == 1
    # A config without get_models, and a model name that does not exist, are one line each.
    capsys.readouterr()
    (tmp_path / "broken.py").write_text("x = 1\n")
    err = _fails_in_one_line("table1", ["--models", str(tmp_path / "broken.py"), "--quick", "--data-dir", data_dir,
                                        "--workdir", str(tmp_path / "w")], capsys, tmp_path / "w")
    assert "defines no get_models" in err
    err = _fails_in_one_line("table1", ["--models", "FC7", "--quick", "--workdir", str(tmp_path / "w")], capsys,
                             tmp_path / "w")
    assert "--models: unknown model(s) 'FC7'" in err


# -- issue 23, class 10: every model of --models and every folder checked before any work -------------------

TINY_CONFIG = """
import jax.numpy as jnp
import numpy as np


def dense(params, x):
    return x.reshape(len(x), -1) @ params["w"] + params["b"]


def headless(params, x):                       # no dense layer last: Table 5's pairwise radius has nothing to use
    return jnp.tanh(x.reshape(len(x), -1) @ params["w"])


def layer(classes, inputs=784):
    rng = np.random.default_rng(classes)
    return {"w": rng.normal(size=(inputs, classes)).astype(np.float32) * 0.01, "b": np.zeros(classes, np.float32)}


def get_models(context):
    return {MODELS}
"""


@pytest.fixture
def tiny_setup(tmp_path):
    """(common flags with a synthetic data folder and a workdir under tmp_path, a writer of config files)."""
    data = tmp_path / "data" / "fashion_mnist"
    write_idx_split(data, "train", make_synthetic(64))
    write_idx_split(data, "t10k", make_synthetic(64, seed=1))

    def config(models: str) -> str:
        path = tmp_path / f"models_{len(list(tmp_path.glob('models_*.py')))}.py"
        path.write_text(TINY_CONFIG.replace("{MODELS}", models))
        return str(path)
    return ["--quick", "--num-images", "10", "--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "w")], config


@pytest.mark.parametrize("models, message", [
    ('{"three": (dense, layer(3))}', "model 'three' of '{config}' gives logits of shape [1, 3] for one image; "
                                     "fashion_mnist has 10 classes"),
    # The working model was attacked and its chunks saved, then a raw JAX traceback.
    ('{"good": (dense, layer(10)), "broken": (dense, layer(10, inputs=100))}',
     "model 'broken' of '{config}' fails on one image of shape [28, 28, 1] (TypeError: dot_general"),
])
def test_a_model_that_cannot_be_attacked_is_named_before_any_is(models, message, tiny_setup, capsys, tmp_path):
    flags, config = tiny_setup
    path = config(models)
    err = _fails_in_one_line("table1", flags + ["--models", path], capsys, tmp_path)
    assert err.startswith("error: --models: " + message.format(config=path)), err


def test_a_model_without_a_dense_head_is_refused_by_table5_before_any_attack(tiny_setup, capsys, tmp_path):
    flags, config = tiny_setup
    path = config('{"good": (dense, layer(10)), "headless": (headless, {"w": layer(10)["w"]})}')
    err = _fails_in_one_line("table5", flags + ["--no-alexnet", "--models", path], capsys, tmp_path)
    assert "model 'headless' does not end in a dense layer" in err and "pairwise" in err


def test_a_file_where_the_chunks_folder_should_be_is_named_before_any_work(tiny_setup, capsys, tmp_path):
    flags, config = tiny_setup
    path = config('{"good": (dense, layer(10))}')
    chunks = tmp_path / "w" / "table1" / "chunks"
    chunks.parent.mkdir(parents=True)
    chunks.write_text("not a folder")
    err = _fails_in_one_line("table1", flags + ["--models", path], capsys, tmp_path)
    assert err.startswith("error: --workdir:") and f"{str(chunks)!r} is a file, not a folder" in err


def test_a_damaged_checkpoint_in_the_workdir_is_named_before_any_training(tiny_setup, capsys, tmp_path):
    """FC10(1)'s stored checkpoint has a flipped byte: named (which file, what to do), before FC10(1e-4), listed
    first and not stored, is trained."""
    import jax
    from jaxadv.checkpoint import save_checkpoint
    from jaxadv.models import get_model
    flags, _ = tiny_setup
    stored = tmp_path / "w" / "models" / "FC10(1)"
    save_checkpoint(stored, get_model("FC10(1)").init(jax.random.PRNGKey(0)),
                    {"model": "FC10(1)", "dataset": "fashion_mnist", "quick": True})
    params = stored / "params.msgpack"
    damaged = bytearray(params.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    params.write_bytes(bytes(damaged))
    err = _fails_in_one_line("table1", flags + ["--models", "FC10(1e-4)", "FC10(1)"], capsys, tmp_path)
    assert "params.msgpack' does not match the checksum" in err and "delete the folder to retrain" in err
    assert not (tmp_path / "w" / "models" / "FC10(1e-4)").exists()


@pytest.mark.parametrize("source, message", [
    ("raise RuntimeError('no GPU here')\n", "importing '{config}' raised RuntimeError: no GPU here"),
    ("def get_models(context):\n    return 1 / 0\n",
     "get_models of '{config}' raised ZeroDivisionError: division by zero"),
    ("def get_models(context):\n    return {\n", "importing '{config}' raised SyntaxError: '{{' was never closed"),
    ("import jaxadv_no_such_module\n", "importing '{config}' raised ModuleNotFoundError: No module named"),
])
def test_an_error_in_a_models_config_file_is_one_line_naming_it(source, message, tiny_setup, capsys, tmp_path):
    flags, _ = tiny_setup
    path = tmp_path / "mine.py"
    path.write_text(source)
    err = _fails_in_one_line("table1", flags + ["--models", str(path)], capsys, tmp_path)
    assert err.startswith("error: --models: " + message.format(config=str(path))), err


def test_a_quick_run_that_uses_a_full_model_says_so_in_one_line(tmp_path, capsys):
    """A stored fully trained model serves a --quick run (nothing is trained: the data folder does not exist),
    and that is said, naming the model and its folder; a quick model serves it silently."""
    import jax
    from jaxadv.checkpoint import save_checkpoint
    from jaxadv.models import get_model
    from jaxadv.zoo import trained_models
    for name, quick in [("FC10(1)", False), ("FC10(1e-4)", True)]:
        save_checkpoint(tmp_path / "models" / name, get_model(name).init(jax.random.PRNGKey(0)),
                        {"model": name, "dataset": "fashion_mnist", "quick": quick})
    models = trained_models(["FC10(1)", "FC10(1e-4)"], "fashion_mnist", tmp_path, str(tmp_path / "no-data"),
                            quick=True)
    assert list(models) == ["FC10(1)", "FC10(1e-4)"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("FC10(1): the fully trained model in ")
    assert str(tmp_path / "models" / "FC10(1)") in err and "serves this quick run" in err


def test_a_config_files_run_is_named_by_the_file_not_its_path_with_the_slashes_dropped(tmp_path):
    """--models configs/mine.py named its run "models=<every folder of the absolute path run together>mine.py-...";
    now "models=mine.py-<hash of the path>": readable, and another folder's mine.py gets another name."""
    from experiments.common import parse_args, run_name
    parser = _parser("table1")
    names = [run_name(parser, parse_args(parser, ["--models", str(tmp_path / folder / "mine.py"), "--quick",
                                                  "--workdir", str(tmp_path / "w")])) for folder in ("a", "b")]
    assert all(re.fullmatch(r"quick_models=mine\.py-[0-9a-f]{10}", name) for name in names), names
    assert names[0] != names[1]


def test_relative_paths_of_the_command_line_are_made_absolute_where_they_are_given(tmp_path, monkeypatch):
    """--workdir, --data-dir and a --models file mean the same wherever the code later runs (a config's
    get_models, a library call after os.chdir)."""
    from experiments.common import ArgumentParser, add_common_args, parse_args
    from experiments.flags import add_models_arg
    monkeypatch.chdir(tmp_path)
    parser = ArgumentParser()
    add_common_args(parser)
    add_models_arg(parser, ["FC10(1)"])
    args = parse_args(parser, ["--workdir", "w", "--data-dir", "../data", "--models", "configs/mine.py"])
    assert (args.workdir, args.data_dir, args.models) == (str(tmp_path / "w"), str(tmp_path.parent / "data"),
                                                          [str(tmp_path / "configs" / "mine.py")])
    assert parse_args(parser, []).workdir == str(tmp_path / "runs" / "fashion_mnist")
