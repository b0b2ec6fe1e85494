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
