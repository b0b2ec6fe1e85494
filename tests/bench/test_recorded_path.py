from posthoc.bench.report import recorded_path


def test_results_name_no_folder_outside_the_working_directory(tmp_path, monkeypatch):
    inside = tmp_path / "repo"
    (inside / "runs").mkdir(parents=True)
    monkeypatch.chdir(inside)
    assert recorded_path(inside / "runs" / "a.pt", "<checkpoint-dir>") == "runs/a.pt"
    assert recorded_path("runs/a.pt", "<checkpoint-dir>") == "runs/a.pt"
    assert recorded_path(tmp_path / "cache" / "b.pt", "<checkpoint-dir>") == "<checkpoint-dir>/b.pt"
