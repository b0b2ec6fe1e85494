import gzip
import hashlib

import numpy as np
import pytest

from posthoc.data import file_md5, parse_idx, read_idx


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_roundtrip_gz_and_plain(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(arr))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    for name in ("a.idx", "a.idx.gz"):
        out = read_idx(tmp_path / name, ndim=3)
        assert out.dtype == np.uint8 and out.flags.writeable
        np.testing.assert_array_equal(out, arr)


def test_wrong_ndim_and_bad_magic():
    raw = _idx_bytes(np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="dimension"):
        parse_idx(raw, ndim=3)
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x00\x00\x42\x01" + raw[4:])


def test_truncated_payload(tmp_path):
    raw = _idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8))
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(path)


def test_truncated_gzip_file(tmp_path, data_root):
    src = data_root / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes()[:2000])
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_not_gzip(tmp_path):
    path = tmp_path / "junk.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match="cannot decompress"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.gz"):
        read_idx(tmp_path / "nothere.gz")


def test_file_md5(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert file_md5(tmp_path / "f", chunk_size=1000) == hashlib.md5(data).hexdigest()
