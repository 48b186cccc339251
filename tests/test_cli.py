"""The experiments' command lines, tried as a new user would."""
import importlib

import pytest

EXPERIMENTS = ["train_zoo", "table1", "table2", "table3", "table5", "units", "adversarial_training"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_mistyped_flag_is_an_error_not_a_prefix_match(experiment, capsys):
    # argparse's prefix matching took --num-image for --num-images (and --data for --data-dir).
    main = importlib.import_module(f"experiments.{experiment}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "somewhere", "--num-image", "5", "--quic"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
