"""Command-line values that used to mean something else silently, and outputs checked before the work.

`--epochs 0` trained the suite's default 15 epochs, `--methods ''` ran every method, an empty path fell
back to a default folder, and a read-only `--out` failed with a traceback after the whole run. The long
work (training, data loading) is replaced by a sentinel so that reaching it fails the test at once.
"""

import os

import pytest

import posthoc.bench.runner as runner
from posthoc.cli.main import main


class WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Any MAP training or suite loading raises WorkStarted (records the epochs it was asked for)."""
    asked = {}

    def train(bench, suite, config, *args, **kwargs):
        asked["epochs"] = config.epochs
        raise WorkStarted(f"training started with {config.epochs} epochs")

    def get_suite(*args, **kwargs):
        raise WorkStarted("data loading started")

    monkeypatch.setattr(runner, "train_suite_model", train)
    monkeypatch.setattr(runner, "get_suite", get_suite)
    return asked


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "bench", "demo"])
@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_epochs_below_one_is_an_error(capsys, tmp_path, no_work, command, epochs):
    err = _usage_error(capsys, [command, "--epochs", epochs, "--checkpoint-dir", str(tmp_path)])
    assert "--epochs" in err and ">= 1" in err
    assert "epochs" not in no_work


def test_epochs_given_is_used(tmp_path, no_work):
    with pytest.raises(WorkStarted):
        main(["train", "--epochs", "2", "--checkpoint-dir", str(tmp_path), "--no-progress"])
    assert no_work["epochs"] == 2


@pytest.mark.parametrize("methods", ["", " ", ",", " , ,"])
def test_empty_methods_is_an_error_listing_the_methods(capsys, tmp_path, no_work, methods):
    code = main(["bench", "--methods", methods, "--out", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--methods" in err and "names no method" in err
    for name in ("map", "la_kron", "streamlined_diag"):
        assert name in err


@pytest.mark.parametrize("option", ["--out", "--checkpoint-dir", "--data-dir"])
def test_empty_path_is_an_error(capsys, tmp_path, no_work, option):
    argv = ["bench", "--methods", "map", "--out", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path)]
    argv += [option, ""]
    err = _usage_error(capsys, argv)
    assert option in err and "empty path" in err


def test_empty_data_dir_in_the_library_is_an_error(monkeypatch, tmp_path):
    from posthoc.data.paths import resolve_data_dir

    monkeypatch.setenv("POSTHOC_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    with pytest.raises(ValueError, match="empty path.*POSTHOC_DATA"):
        resolve_data_dir("")


def _unwritable(tmp_path):
    """A folder no file can be written into, also for root: a path through a regular file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "results"


@pytest.mark.parametrize("command", ["bench", "demo"])
def test_unwritable_out_fails_before_any_work(capsys, tmp_path, no_work, command):
    out = _unwritable(tmp_path)
    argv = [command, "--out", str(out), "--checkpoint-dir", str(tmp_path / "ckpt")]
    argv += ["--methods", "map"] if command == "bench" else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "writable" in err


@pytest.mark.parametrize("command", ["train", "bench"])
def test_unwritable_checkpoint_dir_fails_before_any_work(capsys, tmp_path, no_work, command):
    ckpt = _unwritable(tmp_path)
    argv = [command, "--checkpoint-dir", str(ckpt)]
    argv += ["--methods", "map", "--out", str(tmp_path / "out")] if command == "bench" else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "--checkpoint-dir" in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permission bits do not bind root")
def test_read_only_out_fails_before_any_work(capsys, tmp_path, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["bench", "--methods", "map", "--out", str(locked), "--checkpoint-dir", str(tmp_path)]) == 2
    finally:
        locked.chmod(0o700)
    assert str(locked) in capsys.readouterr().err


def test_run_bench_checks_out_dir_before_any_work(tmp_path, no_work):
    out = _unwritable(tmp_path)
    with pytest.raises(PermissionError, match=str(out)):
        runner.run_bench("fmnist-embedded", methods=["map"], out_dir=out, checkpoint_dir=tmp_path, log=lambda m: None)


def test_a_method_named_twice_is_an_error(capsys, tmp_path, no_work):
    code = main(["bench", "--methods", "map,temperature,map", "--out", str(tmp_path / "out"), "--checkpoint-dir",
                 str(tmp_path)])
    assert code == 2
    assert "map more than once" in capsys.readouterr().err


def test_data_dir_with_the_embedded_suite_says_it_is_not_read(capsys, tmp_path, no_work):
    with pytest.raises(WorkStarted):
        main(["train", "--data-dir", str(tmp_path / "nowhere"), "--checkpoint-dir", str(tmp_path), "--no-progress"])
    assert "--data-dir is not read" in capsys.readouterr().out
