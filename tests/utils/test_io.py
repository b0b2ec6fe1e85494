import os

from posthoc.utils import io


def test_atomic_write_flushes_to_disk_unless_told_not_to(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(fd))
    path = io.atomic_write_text(tmp_path / "sub" / "a.json", "{}")
    assert path.read_text() == "{}" and len(synced) == 1
    io.atomic_write_text(path, '{"b": 1}', fsync=False)
    assert path.read_text() == '{"b": 1}' and len(synced) == 1
    assert os.listdir(path.parent) == ["a.json"]  # no temporary file left behind


def test_copy_missing_copies_only_what_the_target_lacks(tmp_path):
    source, target = tmp_path / "kept", tmp_path / "run"
    (source / "models").mkdir(parents=True)
    (source / "models" / "a.pt").write_bytes(b"a")
    (source / "models" / "b.pt").write_bytes(b"b")
    (source / "notes.txt").write_text("not a checkpoint")
    (target / "models").mkdir(parents=True)
    (target / "models" / "b.pt").write_bytes(b"newer")
    assert io.copy_missing(source, target, "models/*.pt") == ["models/a.pt"]
    assert (target / "models" / "a.pt").read_bytes() == b"a"
    assert (target / "models" / "b.pt").read_bytes() == b"newer"  # never overwritten
    assert not (target / "notes.txt").exists()
    assert io.copy_missing(tmp_path / "missing", target) == []
