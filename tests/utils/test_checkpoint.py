"""posthoc.utils.checkpoint: round trip, fingerprint mismatch, damaged files, planted pickles, writability."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from torch import nn

from posthoc.utils.checkpoint import (
    CheckpointError,
    data_fingerprint,
    fingerprint_digest,
    load_checkpoint,
    module_digest,
    read_checkpoint,
    save_checkpoint,
)
from posthoc.utils.io import check_writable

FINGERPRINT = {"settings": {"lr": 1e-3, "steps": 10}, "weights": "abc", "data": {"digest": "d", "values": 3}}


def _payload() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"step": 4, "weights": torch.randn(50, 7, generator=g, dtype=torch.float64), "rng": g.get_state(),
            "history": [{"loss": 0.5}], "nested": {"optimizer": {"state": {0: {"m": torch.ones(3)}}}}}


def test_round_trip_is_exact(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "c.pt", _payload(), FINGERPRINT, "Test")
    loaded = load_checkpoint(path, FINGERPRINT, "Test")
    reference = _payload()
    assert loaded["step"] == 4 and loaded["history"] == reference["history"]
    assert torch.equal(loaded["weights"], reference["weights"]) and torch.equal(loaded["rng"], reference["rng"])
    assert torch.equal(loaded["nested"]["optimizer"]["state"][0]["m"], torch.ones(3))
    assert read_checkpoint(path, "Test").fingerprint == FINGERPRINT
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_other_fingerprint_or_kind_is_refused_naming_the_keys(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _payload(), FINGERPRINT, "Test")
    other = {**FINGERPRINT, "data": {"digest": "e", "values": 3}, "settings": {"lr": 1e-3, "steps": 11}}
    with pytest.raises(CheckpointError, match=r"other settings, network or data \(differs in \['data', 'settings'\]\)"):
        load_checkpoint(path, other, "Test")
    with pytest.raises(CheckpointError, match=r"differs in \['extra'\]"):
        load_checkpoint(path, {**FINGERPRINT, "extra": 1}, "Test")
    with pytest.raises(CheckpointError, match="is a Test checkpoint, not a ScaLLA checkpoint"):
        load_checkpoint(path, FINGERPRINT, "ScaLLA")
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "d.pt", _payload(), {"t": torch.ones(1)}, "Test")


@pytest.mark.parametrize("where", ["payload tensor", "header", "checksum", "truncated"])
def test_a_damaged_file_is_refused_with_its_path(tmp_path, where):
    path = save_checkpoint(tmp_path / "c.pt", _payload(), FINGERPRINT, "Test")
    raw = bytearray(path.read_bytes())
    if where == "payload tensor":  # one bit of one float64 of the weights: a plausible number, silently wrong
        at = bytes(raw).find(_payload()["weights"][3, 2].numpy().tobytes())
        assert at > 0
        raw[at + 3] ^= 0x10
    elif where == "header":
        raw[bytes(raw).find(b'"weights"') + 2] ^= 0x01
    elif where == "checksum":
        raw[len(b"posthoc-checkpoint\n") + 5] ^= 0x01
    else:
        raw = raw[:-100]
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{path}.* is damaged .*delete it"):
        load_checkpoint(path, FINGERPRINT, "Test")


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"{path} is unreadable: it is not a posthoc checkpoint"):
        load_checkpoint(path, FINGERPRINT, "Test")
    torch.save({"step": 1}, path)  # a plain torch file (e.g. of an older version)
    with pytest.raises(CheckpointError, match="not a posthoc checkpoint"):
        load_checkpoint(path, FINGERPRINT, "Test")
    with pytest.raises(CheckpointError, match="unreadable.*FileNotFoundError"):
        load_checkpoint(tmp_path / "missing.pt", FINGERPRINT, "Test")


class _Planted:
    """Unpickling this calls os.system: it writes a marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _framed(payload_bytes: bytes) -> bytes:
    """A file in the checkpoint layout with a valid checksum around arbitrary payload bytes (an attacker can
    compute the checksum too: it guards against damage, weights_only guards against code)."""
    import hashlib
    import json
    import struct
    header = json.dumps({"format": 1, "what": "Test", "fingerprint": FINGERPRINT}, sort_keys=True).encode()
    body = struct.pack("<Q", len(header)) + header + payload_bytes
    return b"posthoc-checkpoint\n" + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


@pytest.mark.parametrize("layout", ["bare pickle", "torch.save in a valid frame"])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, layout):
    marker = tmp_path / "pwned"
    evil = {"step": 1, "x": _Planted(str(marker))}
    if layout == "bare pickle":
        data = pickle.dumps(evil)
    else:
        buffer = io.BytesIO()
        torch.save(evil, buffer)
        data = _framed(buffer.getvalue())
    path = tmp_path / "c.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, FINGERPRINT, "Test")
    assert not marker.exists()
    pickle.loads(pickle.dumps(evil))  # the check above can fail: unpickling this object does run the code
    assert marker.exists()


def test_digests_see_values_order_shape_and_buffers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 4, generator=g)
    base = data_fingerprint([x])
    assert base == data_fingerprint([x.clone()]) and base["values"] == 400 and base["tensors"] == 1
    y = x.clone()
    y[57, 2] = torch.nextafter(y[57, 2], torch.tensor(10.0))  # one ulp of one entry, same size
    assert data_fingerprint([y])["digest"] != base["digest"]
    assert data_fingerprint([x.flip(0)])["digest"] != base["digest"]
    assert data_fingerprint([x.reshape(200, 2)])["digest"] != base["digest"]
    assert data_fingerprint([x.double()])["digest"] != base["digest"]
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    before = module_digest(model)
    model[1].running_mean += 1e-3  # a buffer, not a parameter
    assert module_digest(model) != before
    assert fingerprint_digest({"a": 1, "b": [1, 2]}) == fingerprint_digest({"b": [1, 2], "a": 1})
    assert fingerprint_digest({"a": 1}) != fingerprint_digest({"a": 2})


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "dir", "results") == tmp_path / "new" / "dir"
    assert (tmp_path / "new" / "dir").is_dir() and not list((tmp_path / "new" / "dir").iterdir())
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=rf"cannot write the results into {blocker}/sub .*writable folder"):
        check_writable(blocker / "sub", "results")
    if os.geteuid() != 0:  # root may write into read-only folders
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match=str(read_only)):
                check_writable(read_only, "results")
        finally:
            read_only.chmod(0o700)
