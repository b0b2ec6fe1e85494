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


def _hold_lock_in_child(lock, marker, then):
    """A child process that takes the lock, writes ``marker`` 'held', sleeps, writes 'released' and ``then``s."""
    import subprocess
    import sys
    code = ("import os, sys, time\n"
            "from posthoc.utils.io import exclusive_lock\n"
            "lock, marker, then = sys.argv[1:]\n"
            "with exclusive_lock(lock):\n"
            "    open(marker, 'w').write('held')\n"
            "    time.sleep(0.5)\n"
            "    open(marker, 'w').write('released')\n"
            "    if then == 'die':\n"
            "        os._exit(3)\n")
    return subprocess.Popen([sys.executable, "-c", code, str(lock), str(marker), then])


def test_exclusive_lock_waits_for_the_other_holder_even_one_that_dies(tmp_path):
    import time
    for then in ("leave", "die"):  # leaves the with block / dies holding the lock (the OS releases it)
        marker = tmp_path / f"marker-{then}"
        child = _hold_lock_in_child(tmp_path / "net.lock", marker, then)
        while not (marker.exists() and marker.read_text()):
            time.sleep(0.01)
        with io.exclusive_lock(tmp_path / "net.lock"):
            assert marker.read_text() == "released"  # we got the lock only after the child was done with it
        assert child.wait() == (3 if then == "die" else 0)
