"""Writing benchmark results: markdown, CSV and JSON, with machine and versions."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from posthoc.utils.io import atomic_write_text

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (key, header, format)
    ("method", "method", "{}"),
    ("accuracy", "ACC", "{:.4f}"),
    ("nll", "NLL", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
    ("brier", "Brier", "{:.4f}"),
    ("auroc_entropy", "OOD AUROC (entropy)", "{:.3f}"),
    ("auroc_variance", "OOD AUROC (variance)", "{:.3f}"),
    ("fit_s", "fit s", "{:.1f}"),
    ("predict_s", "predict s", "{:.1f}"),
)


def machine_info() -> dict[str, Any]:
    """Where the benchmark ran: OS, processor, cores, memory, torch threads, accelerator."""
    mem_gib = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": mem_gib,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def versions() -> dict[str, str]:
    """The versions of Python, torch, numpy and posthoc, for a run's record."""
    from posthoc import __version__

    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "posthoc": __version__}


def git_commit(repo: str | os.PathLike | None = None) -> str | None:
    """The commit checked out in ``repo`` (default: the checkout holding the posthoc package), or None.

    The commit has a ``+dirty`` suffix when tracked files differ from it; None outside a git checkout or without
    git.

    Cost: two short ``git`` subprocesses (each limited to 10 s).
    """
    directory = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def run_meta() -> dict[str, Any]:
    """What a benchmark script records about its run.

    The UTC date, the machine (with torch threads), versions, git commit and the command line (its paths as
    :func:`recorded_command` writes them).
    """
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
            "versions": versions(), "git_commit": git_commit(), "command": recorded_command(sys.argv)}


def recorded_path(path: str | os.PathLike, placeholder: str, keep_name: bool = True) -> str:
    """How a results file names ``path``: relative to the working directory when under it, else ``placeholder/name``.

    Results files are committed, so they name no folder of the machine that wrote them: a path outside the working
    directory keeps only its file name behind ``placeholder`` (e.g. ``"<checkpoint-dir>"``), or becomes
    ``placeholder`` alone with ``keep_name=False`` (for a folder such as the data directory). Cost: resolving the
    path (no file is read).
    """
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return f"{placeholder}/{resolved.name}" if keep_name else placeholder


def recorded_command(argv: Sequence[str]) -> str:
    """The command line ``argv`` joined by spaces, its absolute paths named as :func:`recorded_path` names them.

    Paths count as words starting with ``/`` or as ``--option=/path``. A path outside the working directory becomes ``<outside>/name``, so a committed results file names no machine
    folder.
    """
    words = []
    for word in argv:
        option, sep, value = word.partition("=") if word.startswith("-") else ("", "", word)
        if value.startswith("/"):
            value = recorded_path(value, "<outside>")
        words.append(option + sep + value)
    return " ".join(words)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically and return the path.

    Values JSON cannot hold are written with ``str``.

    Raises:
        OSError: When the folder cannot be written.
    """
    return atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def write_markdown_keeping_notes(path: str | os.PathLike, generated: str, marker: str) -> Path:
    """Write the generated markdown ``generated`` to ``path``, keeping the hand-written part of the file there.

    The hand-written part is everything of the old file from the first line that starts with ``marker`` (e.g.
    ``"## Closing note"``) to its end; it is appended after ``generated``, so a rerun of a benchmark rewrites its
    tables without losing the notes written beside them. Atomic, as :func:`write_json`.
    """
    old = Path(path).read_text() if Path(path).is_file() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(marker)), None)
    text = generated.rstrip("\n") + "\n"
    if start is not None:
        text += "\n" + "".join(lines[start:]).rstrip("\n") + "\n"
    return atomic_write_text(path, text)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the result rows; missing values print as '—'."""
    header = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("—" if value is None or (isinstance(value, float) and np.isnan(value)) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: str | os.PathLike, meta: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Path]:
    """Write results.md, results.csv and results.json atomically into ``out_dir``."""
    out = Path(out_dir)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = {**meta, "created": stamp, "machine": machine_info(), "versions": versions()}
    md = [f"# posthoc bench: {meta['suite']}", "", format_markdown(rows)]
    infos = [f"- {row['method']}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row["info"].items())
             for row in rows if row.get("info")]
    if infos:
        md += ["Method figures:", "", *infos, ""]
    md.append(f"MAP: {meta['map']}\n")
    md.append(f"Seed {meta['seed']}; {stamp}; machine: {json.dumps(meta['machine'])}; versions: "
              f"{json.dumps(meta['versions'])}\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[k for k, _, _ in COLUMNS], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = {
        "markdown": atomic_write_text(out / "results.md", "\n".join(md)),
        "csv": atomic_write_text(out / "results.csv", buffer.getvalue()),
        "json": atomic_write_text(out / "results.json", json.dumps({**meta, "rows": rows}, indent=2, default=str)),
    }
    return paths
