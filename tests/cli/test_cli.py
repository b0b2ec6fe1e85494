"""The command line: errors are clear and raised before long work."""

import pytest

from posthoc.cli.main import main


def test_unknown_method(capsys, tmp_path):
    assert main(["bench", "--methods", "map,nope", "--checkpoint-dir", str(tmp_path)]) == 2
    assert "unknown method(s) 'nope'" in capsys.readouterr().err


def test_missing_data_names_the_file(capsys, tmp_path):
    code = main(["train", "--suite", "fmnist", "--data-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "FashionMNIST" / "raw") in err and "http" in err


def test_unknown_suite_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_train_embedded_one_epoch(capsys, tmp_path):
    assert main(["train", "--epochs", "1", "--checkpoint-dir", str(tmp_path), "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_every_demo_row_says_what_it_is_for():
    from posthoc.bench.methods import METHODS
    from posthoc.cli.main import DEMO_METHODS, DEMO_ROLES

    assert DEMO_METHODS == tuple(DEMO_ROLES)
    assert all(name in METHODS and len(role) > 20 for name, role in DEMO_ROLES.items())
