"""Shared benchmark helpers: run metadata and the memory- and time-limited case process."""

import subprocess
import sys

import pytest

from posthoc.bench.processes import peak_rss_bytes, reset_peak_rss, run_limited
from posthoc.bench.report import git_commit, run_meta, write_markdown_keeping_notes


def test_run_meta_records_machine_versions_commit_and_command():
    meta = run_meta()
    assert meta["machine"]["cpu_count"] >= 1 and meta["machine"]["torch_threads"] >= 1
    assert {"python", "torch", "numpy", "posthoc"} <= set(meta["versions"])
    assert meta["date"].endswith("+00:00")
    assert "command" in meta and "git_commit" in meta


def test_git_commit_of_a_checkout_and_outside_one(tmp_path):
    assert git_commit(tmp_path) is None  # not a checkout
    try:
        subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                        "--allow-empty", "-m", "x"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not usable here")
    commit = git_commit(tmp_path)
    assert commit is not None and len(commit) == 40
    (tmp_path / "f").write_text("a")
    subprocess.run(["git", "-C", str(tmp_path), "add", "f"], check=True)
    assert git_commit(tmp_path) == commit + "+dirty"


def test_run_limited_returns_output_and_exit_code():
    out = run_limited([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], timeout=60)
    assert out.returncode == 3 and out.stdout.strip() == "hi" and not out.timed_out and out.wall_s > 0


def test_run_limited_turns_a_timeout_into_an_outcome():
    out = run_limited([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"],
                      timeout=2)
    assert out.timed_out and out.returncode is None and "started" in out.stdout


def test_run_limited_memory_limit_fails_in_the_child():
    code = "b = bytearray(2 * 2**30)\nprint('allocated')"
    out = run_limited([sys.executable, "-c", code], mem_limit_bytes=512 * 2**20, timeout=60)
    assert out.returncode != 0 and "MemoryError" in out.stderr and "allocated" not in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_peak_rss_rises_with_an_allocation_and_resets():
    assert reset_peak_rss()
    base = peak_rss_bytes()
    block = bytearray(64 * 2**20)  # touched: bytearray zero-fills
    assert peak_rss_bytes() - base >= 60 * 2**20
    del block
    assert reset_peak_rss() and peak_rss_bytes() < base + 32 * 2**20


def test_run_limited_refuses_bad_limits():
    with pytest.raises(ValueError, match="mem_limit_bytes"):
        run_limited([sys.executable, "-c", "pass"], mem_limit_bytes=0)
    with pytest.raises(ValueError, match=r"mem_limit_bytes must be a positive int or None .*got 2000000000.0"):
        run_limited([sys.executable, "-c", "pass"], mem_limit_bytes=2e9)
    with pytest.raises(ValueError, match="timeout"):
        run_limited([sys.executable, "-c", "pass"], timeout=-1)


def test_find_map_checkpoint_given_cached_and_missing(tmp_path):
    from posthoc.bench.checkpoints import find_map_checkpoint

    with pytest.raises(FileNotFoundError, match="posthoc train"):
        find_map_checkpoint(None, ["fmnist_cnn-e40-*.pt"], cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_map_checkpoint(tmp_path / "nope.pt", ["*.pt"], cache_dir=tmp_path)
    (tmp_path / "fmnist_cnn-e15-s0-b.pt").write_bytes(b"")
    (tmp_path / "fmnist_cnn-e15-s0-a.pt").write_bytes(b"")
    assert find_map_checkpoint(None, ["fmnist_cnn-e40-*.pt", "fmnist_cnn-*.pt"],
                               cache_dir=tmp_path).name == "fmnist_cnn-e15-s0-a.pt"
    given = tmp_path / "fmnist_cnn-e15-s0-b.pt"
    assert find_map_checkpoint(given, ["x"], cache_dir=tmp_path) == given


def test_rewriting_a_results_table_keeps_the_hand_written_notes(tmp_path):
    path = tmp_path / "table.md"
    write_markdown_keeping_notes(path, "# Table\n\n| a |\n| 1 |\n", "## Closing note")
    assert path.read_text() == "# Table\n\n| a |\n| 1 |\n"  # no old file: the table alone
    notes = "## Closing note (by hand)\n\n- a finding\n\n## Closing note 2\n\n- another\n"
    path.write_text(path.read_text() + "\n" + notes)
    write_markdown_keeping_notes(path, "# Table\n\n| a |\n| 2 |", "## Closing note")
    assert path.read_text() == "# Table\n\n| a |\n| 2 |\n\n" + notes  # new table, both notes kept, in order
    write_markdown_keeping_notes(path, "# Table\n\n| a |\n| 2 |", "## Closing note")
    assert path.read_text() == "# Table\n\n| a |\n| 2 |\n\n" + notes  # a second rerun changes nothing
    path.write_text("# Table\n\nsome text mentioning ## Closing note mid-line\n")
    write_markdown_keeping_notes(path, "# New", "## Closing note")
    assert path.read_text() == "# New\n"  # only a line that starts with the marker opens the notes
