r"""One checkpoint format for every resumable fit (ScaLLA's surrogate training, FiberSampler, MAP training).

A checkpoint is only resumed when it was written by the same computation: the caller passes a *fingerprint*,
a JSON-serialisable dict of everything the result depends on (the settings, a digest of the network's weights
from :func:`module_digest`, a digest of the data the fit reads from :func:`data_fingerprint`), and
:func:`load_checkpoint` refuses a file whose stored fingerprint differs, naming the keys that differ. The file
also carries a checksum of its contents, so a damaged file (a bit flip on disk or in a copy) is refused instead
of resuming from wrong numbers, and the payload is read with ``torch.load(weights_only=True)``, so a planted
file cannot run code.

File layout (bytes)::

    b"posthoc-checkpoint\n"
    sha256 of everything after this line, 64 hex digits, b"\n"
    header length, 8 bytes little-endian; header, UTF-8 JSON {"format": 1, "what": ..., "fingerprint": {...}}
    payload: ``torch.save`` of a dict of tensors, numbers, strings, lists and dicts

Files are written atomically (:func:`posthoc.utils.io.atomic_write_bytes`): an interrupted write leaves the
previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
from torch import nn

from posthoc.utils.io import atomic_write_bytes, check_writable

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "check_writable",
    "data_fingerprint",
    "fingerprint_digest",
    "load_checkpoint",
    "module_digest",
    "read_checkpoint",
    "save_checkpoint",
    "tensor_digest",
]

MAGIC = b"posthoc-checkpoint\n"
FORMAT = 1
_DIGEST_HEX = 64  # sha256
_FIX = "delete it to start over, or pass another checkpoint path"


class CheckpointError(ValueError):
    """A checkpoint file that must not be resumed: unreadable, damaged, of another kind, or of another run."""


class Checkpoint(NamedTuple):
    """A verified checkpoint: the fingerprint it was written with and its payload."""

    fingerprint: dict[str, Any]
    payload: dict[str, Any]


# ----------------------------------------------------------------------------------------- digests
def _update(h: hashlib.blake2b, t: torch.Tensor) -> None:
    h.update(str((tuple(t.shape), t.dtype)).encode())
    h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """blake2b (32 hex digits) of each tensor's shape, dtype and bytes, in order. Cost: one pass over them."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module``, in registration order: what its outputs depend on."""
    return [t for t in (*module.parameters(), *module.buffers()) if t is not None]


def module_digest(module: nn.Module) -> str:
    """:func:`tensor_digest` of :func:`module_tensors`: the weights a fit of the network depends on.

    BatchNorm statistics (buffers) are included. Cost: one pass over the parameters and buffers.
    """
    return tensor_digest(module_tensors(module))


def data_fingerprint(tensors: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Identity of data: ``{"tensors": count, "values": total entries, "digest": blake2b of all of them}``.

    Every byte is hashed (with each tensor's shape and dtype, in order), so data of the same size with other
    values, or the same values in another order, get another digest. Tensors may be streamed (e.g. batches of a
    loader in a fixed order). Cost: one pass over the data, far below one training epoch over it (timings in
    docs/measurements/core.md).
    """
    h = hashlib.blake2b(digest_size=16)
    count = values = 0
    for t in tensors:
        _update(h, t)
        count += 1
        values += t.numel()
    return {"tensors": count, "values": values, "digest": h.hexdigest()}


def _canonical(fingerprint: dict[str, Any]) -> str:
    if not isinstance(fingerprint, dict):
        raise TypeError(f"a checkpoint fingerprint must be a dict, got {type(fingerprint).__name__}")
    try:  # NaN is refused: it never compares equal, so a file written with it could never be resumed
        return json.dumps(fingerprint, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"a checkpoint fingerprint must hold only JSON values (str, int, finite float, bool, None, "
                        f"lists and dicts of them): {err}") from err


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``fingerprint``: a file-name-safe key for a computation."""
    return hashlib.sha256(_canonical(fingerprint).encode()).hexdigest()


# ----------------------------------------------------------------------------------------- files
def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any], fingerprint: dict[str, Any],
                    what: str) -> Path:
    """Write ``payload`` with its ``fingerprint`` and checksum to ``path`` atomically (see the module docstring).

    ``payload`` must load with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts);
    ``fingerprint`` must be JSON-serialisable; ``what`` names the kind of checkpoint ("ScaLLA", ...).
    Cost: one serialisation and one sha256 pass over the payload. Raises TypeError for a fingerprint that is not
    JSON, OSError if the file cannot be written.
    """
    header = json.dumps({"format": FORMAT, "what": what, "fingerprint": json.loads(_canonical(fingerprint))},
                        sort_keys=True).encode()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = struct.pack("<Q", len(header)) + header + buffer.getvalue()
    return atomic_write_bytes(path, MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)


def read_checkpoint(path: str | os.PathLike, what: str, map_location: str | torch.device | None = "cpu"
                    ) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` without comparing its fingerprint.

    Raises :class:`CheckpointError` (naming the path and the fix) when the file cannot be read, is not a posthoc
    checkpoint, is damaged (its checksum does not match), is another kind of checkpoint than ``what``, or its
    payload holds anything but tensors and plain data (it is never unpickled with code execution).
    Cost: reading the file and one sha256 pass over it.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"the {what} checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                              f"{_FIX}") from err
    start = len(MAGIC) + _DIGEST_HEX + 1
    if not raw.startswith(MAGIC) or len(raw) < start + 8 or raw[start - 1:start] != b"\n":
        raise CheckpointError(f"the {what} checkpoint {path} is unreadable: it is not a posthoc checkpoint (or was "
                              f"written by an older version, or is corrupt); {_FIX}")
    body = raw[start:]
    if hashlib.sha256(body).hexdigest().encode() != raw[len(MAGIC):start - 1]:
        raise CheckpointError(f"the {what} checkpoint {path} is damaged (corrupt: its contents do not match their "
                              f"checksum, e.g. a bit flip on disk or in a copy); {_FIX}")
    (n_header,) = struct.unpack("<Q", body[:8])
    try:
        header = json.loads(body[8:8 + n_header].decode())
        kind, fingerprint = header["what"], header["fingerprint"]
        if header["format"] != FORMAT:
            raise ValueError(f"format {header['format']!r}, expected {FORMAT}")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"the {what} checkpoint {path} has an unreadable header ({err}); {_FIX}") from err
    if kind != what:
        raise CheckpointError(f"{path} is a {kind} checkpoint, not a {what} checkpoint; {_FIX}")
    try:
        payload = torch.load(io.BytesIO(body[8 + n_header:]), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"the {what} checkpoint {path} holds something other than tensors and plain data, "
                              f"which is never loaded (it could run code) ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); {_FIX}") from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"the {what} checkpoint {path} is corrupt (its payload is a "
                              f"{type(payload).__name__}, not a dict); {_FIX}")
    return Checkpoint(fingerprint, payload)


def load_checkpoint(path: str | os.PathLike, fingerprint: dict[str, Any], what: str,
                    map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The payload of the checkpoint at ``path`` if it was written with this ``fingerprint``.

    Raises :class:`CheckpointError` as :func:`read_checkpoint` does, and when the stored fingerprint differs
    (the message names the keys that differ, e.g. ``['train_data']``): resuming another run's state would give
    a wrong result without a word.
    """
    stored, payload = read_checkpoint(path, what, map_location)
    mine = json.loads(_canonical(fingerprint))
    if stored != mine:
        keys = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        raise CheckpointError(f"the {what} checkpoint {path} was written with other settings, network or data "
                              f"(differs in {keys}); {_FIX}")
    return payload
