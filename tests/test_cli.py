"""The experiments' command lines, tried as a new user would."""
import importlib

import pytest

EXPERIMENTS = ["train_zoo", "table1", "table2", "table3", "table5", "units", "adversarial_training", "sparse_and_fast"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_mistyped_flag_is_an_error_not_a_prefix_match(experiment, capsys):
    # argparse's prefix matching took --num-image for --num-images (and --data for --data-dir).
    main = importlib.import_module(f"experiments.{experiment}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "somewhere", "--num-image", "5", "--quic"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--num-images", "0"], ["--num-images", "10001"], ["--fine-values", "2"],
                                  ["--max-pixels", "0"]])
def test_sparse_and_fast_checks_its_numbers_at_parse_time(flag, capsys):
    from experiments.sparse_and_fast import main
    with pytest.raises(SystemExit) as exit_info:
        main(flag + ["--workdir", "/nonexistent/never-made"])
    assert exit_info.value.code == 2
    assert flag[0] in capsys.readouterr().err
