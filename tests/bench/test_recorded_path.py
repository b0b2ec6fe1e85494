from posthoc.bench.report import recorded_command, recorded_path


def test_results_name_no_folder_outside_the_working_directory(tmp_path, monkeypatch):
    inside = tmp_path / "repo"
    (inside / "runs").mkdir(parents=True)
    monkeypatch.chdir(inside)
    assert recorded_path(inside / "runs" / "a.pt", "<checkpoint-dir>") == "runs/a.pt"
    assert recorded_path("runs/a.pt", "<checkpoint-dir>") == "runs/a.pt"
    assert recorded_path(tmp_path / "cache" / "b.pt", "<checkpoint-dir>") == "<checkpoint-dir>/b.pt"


def test_commands_name_no_folder_outside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["posthoc", "bench", "--checkpoint-dir", "/nowhere/ckpt", f"--out={tmp_path}/res", "--data-dir=../d"]
    assert recorded_command(argv) == "posthoc bench --checkpoint-dir <outside>/ckpt --out=res --data-dir=../d"
    assert recorded_path("/nowhere/data", "<data-dir>", keep_name=False) == "<data-dir>"
