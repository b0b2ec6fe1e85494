"""Running one benchmark case in a fresh process under an address-space limit and a timeout.

A case that runs out of memory or time then becomes a result ("out of memory", "timeout") rather
than taking the machine or the whole benchmark down.
"""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from posthoc.utils.checks import check_positive_int

__all__ = ["ProcessOutcome", "peak_rss_bytes", "reset_peak_rss", "run_limited"]


@dataclass(frozen=True)
class ProcessOutcome:
    """How a limited process ended.

    ``returncode`` is None when it was killed at the timeout (``timed_out`` is then True); ``stdout``
    and ``stderr`` are what it wrote (up to the kill); ``wall_s`` is the wall time from start to end.
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float


def _address_space_limit(limit_bytes: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def _text(stream: str | bytes | None) -> str:
    # TimeoutExpired carries bytes even when the run asked for text
    if isinstance(stream, bytes):
        return stream.decode(errors="replace")
    return stream or ""


def run_limited(command: Sequence[str], *, mem_limit_bytes: int | None = None, timeout: float | None = None,
                env: Mapping[str, str] | None = None) -> ProcessOutcome:
    """Run ``command`` in a fresh process and wait for it, capturing its output as text.

    ``mem_limit_bytes`` caps the child's address space (``RLIMIT_AS``; POSIX only): an allocation over it
    fails in the child (a MemoryError or a bad_alloc), not in this process. ``timeout`` (seconds) kills the
    child when it is exceeded. ``env`` replaces the environment (None: inherit this one).

    Returns a ProcessOutcome; a non-zero exit or a timeout is reported there, never raised. Raises
    ValueError for a limit that is not positive, and OSError when the command cannot be started.
    """
    check_positive_int(mem_limit_bytes, "mem_limit_bytes", "the child's address-space limit", allow_none=True)
    if timeout is not None and timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    preexec = _address_space_limit(mem_limit_bytes) if mem_limit_bytes is not None else None
    started = time.perf_counter()
    try:
        proc = subprocess.run(list(command), env=None if env is None else dict(env), preexec_fn=preexec,
                              timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        return ProcessOutcome(None, _text(exc.stdout), _text(exc.stderr), True, time.perf_counter() - started)
    return ProcessOutcome(proc.returncode, proc.stdout, proc.stderr, False, time.perf_counter() - started)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ``/proc/self/clear_refs``); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM of this process (bytes): its peak RSS since its start or the last :func:`reset_peak_rss`.

    Raises:
        RuntimeError: no VmHWM line in ``/proc/self/status``.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
