"""Readers for the idx file format of MNIST-style data sets, and file md5 sums.

The idx format (LeCun et al.) is a big-endian header followed by raw values:

- bytes 0-1: zero;
- byte 2: value type (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
  0x0D float32, 0x0E float64);
- byte 3: number of dimensions ``d``;
- then ``d`` big-endian uint32 sizes, then the values in C order.

Images files therefore start with the magic number 0x00000803 (3-D,
``(N, 28, 28)``) and label files with 0x00000801 (1-D, ``(N,)``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

__all__ = ["file_md5", "read_idx", "parse_idx"]

# idx type code -> big-endian numpy dtype
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def file_md5(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex md5 digest of the file at ``path``.

    Reads the file in ``chunk_size`` blocks, so memory stays constant; cost is
    one sequential read (timings in docs/measurements/core.md).
    """
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def parse_idx(raw: bytes, ndim: int | None = None, source: str = "<bytes>") -> np.ndarray:
    """Parse the uncompressed bytes of an idx file into a numpy array.

    ``ndim``, if given, is the number of dimensions the file must have (3 for
    images, 1 for labels). ``source`` only names the data in error messages.
    Returns an array of the file's native type (uint8 for MNIST-style data),
    shape given by the header; native byte order. Cost: one copy of the data.

    Raises ``ValueError`` on a bad magic number, an unexpected number of
    dimensions or a payload whose length does not match the header.
    """
    if len(raw) < 4:
        raise ValueError(f"{source}: not an idx file (only {len(raw)} bytes, header needs at least 4)")
    zero, type_code, n_dims = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    magic = int.from_bytes(raw[0:4], "big")
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise ValueError(
            f"{source}: bad idx magic number 0x{magic:08X}; expected 0x0000TTDD with a known "
            "type code TT (08 for uint8 images/labels). The file is corrupt or not an idx file"
        )
    if ndim is not None and n_dims != ndim:
        raise ValueError(
            f"{source}: idx file has {n_dims} dimension(s) (magic 0x{magic:08X}) but {ndim} were "
            f"expected (magic 0x{(type_code << 8) | ndim:08X})"
        )
    header_len = 4 + 4 * n_dims
    if len(raw) < header_len:
        raise ValueError(f"{source}: idx header is truncated ({len(raw)} bytes, need {header_len})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise ValueError(
            f"{source}: idx payload has {actual} bytes but the header {shape} of {dtype.name} "
            f"needs {expected}; the file is truncated or corrupt"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    # astype gives a writable array in native byte order (frombuffer is read-only)
    return arr.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read an idx file (gzip-compressed if the name ends in ``.gz``).

    Returns the array described by the header, e.g. uint8 ``(60000, 28, 28)``
    for training images or uint8 ``(60000,)`` for labels. ``ndim`` is checked
    against the header when given. Cost: decompressing the whole file plus one
    copy (timings in docs/measurements/core.md).

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError``
    with the path when the gzip stream or the idx header is corrupt or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(
            f"{path}: cannot decompress ({type(exc).__name__}: {exc}); the file is corrupt or "
            "truncated, delete it and download it again"
        ) from exc
    return parse_idx(raw, ndim=ndim, source=str(path))
