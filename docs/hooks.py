"""MkDocs hooks of the posthoc site: one page per benchmark results file, and the measurement placeholders.

``mkdocs.yml`` loads this file under ``hooks:``. Every ``benchmarks/results/**/*.md`` becomes the page
``results/<path>.md`` (its content included as it is, so the tables are never copied by hand), every figure
``benchmarks/results/**/*.png`` is served at ``results/<path>.png``, and
``results/index.md`` lists them all, so a new results file shows up on the site without editing anything.
``measurements/core.md`` and ``measurements/methods.md`` are written by the measurement notes; when one is
missing (a checkout without them) a placeholder page stands in so that the navigation still resolves.
The docstrings cross-reference in Sphinx's spelling (``:func:`name```), which mkdocstrings' Google parser leaves
as text: the role prefix is dropped from the rendered pages, leaving the name in code font.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS = REPOSITORY / "benchmarks" / "results"
MEASUREMENT_PAGES = ("measurements/core.md", "measurements/methods.md")
SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(?=<code>)")
# Sphinx's ``~a.b.C`` shows the last name only: ``<code>~a.b.C</code>`` becomes ``<code>C</code>``
SHORT_NAME = re.compile(r"<code>~(?:[\w]+\.)*([\w]+)</code>")


def results_pages() -> dict[str, Path]:
    """Site page path -> results file, for every markdown file under benchmarks/results/, sorted by path."""
    return {f"results/{path.relative_to(RESULTS).as_posix()}": path for path in sorted(RESULTS.rglob("*.md"))}


def index_page(pages: dict[str, Path]) -> str:
    """The markdown of results/index.md: what the tables are and a link to each, with its first heading."""
    lines = [
        "# Benchmark tables",
        "",
        "Every table the benchmark scripts and `posthoc bench` wrote, as committed under `benchmarks/results/`",
        "(each file names the machine, versions and settings it was measured with). "
        "[Benchmarks](../benchmarks.md) says how to rerun them.",
        "",
        "| page | results file |",
        "|---|---|",
    ]
    for page, path in pages.items():
        text = path.read_text(encoding="utf-8")
        title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), path.stem)
        lines.append(f"| [{title}]({Path(page).relative_to('results').as_posix()}) | "
                     f"`benchmarks/results/{path.relative_to(RESULTS).as_posix()}` |")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: Any) -> Files:
    """Add the generated results pages, their index and any missing measurement placeholder to the site."""
    pages = results_pages()
    for page, path in pages.items():
        files.append(File.generated(config, page, content=path.read_text(encoding="utf-8")))
    for path in sorted(RESULTS.rglob("*.png")):  # the figures the results files and pages show
        files.append(File.generated(config, f"results/{path.relative_to(RESULTS).as_posix()}", abs_src_path=str(path)))
    files.append(File.generated(config, "results/index.md", content=index_page(pages)))
    for page in MEASUREMENT_PAGES:
        if files.get_file_from_path(page) is None:
            title = "Core measurements" if page.endswith("core.md") else "Method measurements"
            files.append(File.generated(config, page, content=f"# {title}\n\nNot written yet.\n"))
    return files


def on_page_content(html: str, **kwargs: Any) -> str:
    """Drop Sphinx role prefixes in front of code spans of rendered docstrings; ``~a.b.C`` shows as ``C``.

    The prefixes are ``:func:``, ``:class:`` and the like; the ``~`` form shows its last name only, as in Sphinx.
    """
    return SHORT_NAME.sub(r"<code>\1</code>", SPHINX_ROLE.sub("", html))
