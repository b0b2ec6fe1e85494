"""Figures for calibration, OOD detection and toy-problem uncertainty.

Figures are built with :class:`matplotlib.figure.Figure` directly, not through
``pyplot``: the library never selects a backend, never opens a window and keeps
no global figure registry, so it works headless and in threads. Pass ``ax=`` to
draw into an existing (e.g. pyplot) axis instead; the function then returns that
axis' figure. In Jupyter, a returned figure displays as the cell's value.
Save with :func:`save_figure`.

Inputs may be torch tensors (any device; they are detached and copied to the
CPU) or array-likes.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from posthoc.metrics.classification import CalibrationBins
from posthoc.metrics.ood import auroc
from posthoc.utils.io import atomic_write_bytes

__all__ = [
    "ood_histograms",
    "regression_band",
    "reliability_diagram",
    "save_figure",
    "uncertainty_map",
]


def _to_numpy(x: Any, name: str, shapes: tuple[int, ...], shape_doc: str) -> np.ndarray:
    """float64 array of ``x`` with ndim in ``shapes``; rejects NaN/Inf."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().double().numpy()
    else:
        arr = np.asarray(x, dtype=np.float64)
    if arr.ndim not in shapes:
        raise ValueError(f"{name} must have shape {shape_doc}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN/Inf values; clean them before plotting")
    return arr


def _column(x: Any, name: str) -> np.ndarray:
    """(M,) from an (M,) or (M, 1) input."""
    arr = _to_numpy(x, name, (1, 2), "(M,) or (M, 1)")
    if arr.ndim == 2:
        if arr.shape[1] != 1:
            raise ValueError(f"{name} must have shape (M,) or (M, 1), got {arr.shape}")
        arr = arr[:, 0]
    return arr


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    parent = ax.get_figure()
    while parent is not None and not isinstance(parent, Figure):  # an axis inside a SubFigure
        parent = parent.figure
    if parent is None:
        raise ValueError("ax belongs to no figure; pass an Axes created by a Figure (e.g. fig.add_subplot())")
    return parent, ax


def reliability_diagram(
    bins: CalibrationBins | Mapping[str, CalibrationBins],
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal.

    Args:
        bins: the output of :func:`posthoc.metrics.calibration_bins`, or a
            mapping from method name to such bins to compare several methods
            on one axis (their bars are drawn side by side within each bin).
        ax: axis to draw into; a new figure is made when ``None``.
        title: axis title.

    Each non-empty bin gets a bar of height accuracy and a hatched bar spanning
    the gap between accuracy and the bin's mean confidence; the legend shows
    each method's ECE. Empty bins are left blank. Cost: O(n_bins) per method.
    """
    if isinstance(bins, CalibrationBins):
        methods = {"": bins}
    elif isinstance(bins, Mapping) and bins and all(isinstance(b, CalibrationBins) for b in bins.values()):
        methods = dict(bins)
    else:
        raise TypeError(
            "bins must be a CalibrationBins (from posthoc.metrics.calibration_bins) or a "
            "non-empty dict of them keyed by method name"
        )
    fig, ax = _figure_and_axes(ax, (4.5, 4.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.4", linewidth=1, label="perfectly calibrated")
    n_methods = len(methods)
    single = n_methods == 1 and "" in methods
    for k, (name, b) in enumerate(methods.items()):
        color = "C0" if single else f"C{k % 10}"
        edges = b.edges.double().cpu().numpy()
        acc = b.accuracy.double().cpu().numpy()
        conf = b.confidence.double().cpu().numpy()
        keep = b.counts.cpu().numpy() > 0
        width = np.diff(edges) / n_methods
        left = edges[:-1] + k * width
        label = f"accuracy (ECE = {b.ece:.4f})" if single else f"{name} (ECE = {b.ece:.4f})"
        ax.bar(
            left[keep], acc[keep], width=width[keep], align="edge", color=color,
            alpha=0.8, edgecolor="black", linewidth=0.5, label=label,
        )
        gap_label = "gap" if single else None
        ax.bar(
            left[keep], (conf - acc)[keep], bottom=acc[keep], width=width[keep], align="edge",
            color=color, alpha=0.25, hatch="//", edgecolor="red" if single else color,
            linewidth=0.5, label=gap_label,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small")
    if title is not None:
        ax.set_title(title)
    return fig


def ood_histograms(
    scores_in: Any,
    scores_out: Any,
    ax: Axes | None = None,
    score_name: str = "entropy",
    labels: tuple[str, str] = ("in-distribution", "OOD"),
    title: str | None = None,
    bins: int = 50,
) -> Figure:
    """Overlaid density-normalised histograms of an uncertainty score.

    Args:
        scores_in: (N_in,) scores on in-distribution inputs.
        scores_out: (N_out,) scores on OOD inputs (higher = more OOD).
        ax: axis to draw into; a new figure is made when ``None``.
        score_name: x-axis label.
        labels: legend names of the two groups.
        title: prefix of the title, which always ends with the AUROC.
        bins: number of shared, equal-width bins over the range of both groups.

    Cost: O(N log N) for the AUROC, N = N_in + N_out.
    """
    s_in = _column(scores_in, "scores_in")
    s_out = _column(scores_out, "scores_out")
    auc = auroc(torch.from_numpy(s_in), torch.from_numpy(s_out))
    fig, ax = _figure_and_axes(ax, (5.5, 3.5))
    edges = np.histogram_bin_edges(np.concatenate([s_in, s_out]), bins=bins).tolist()
    ax.hist(s_in, bins=edges, density=True, alpha=0.55, color="C0", label=labels[0])
    ax.hist(s_out, bins=edges, density=True, alpha=0.55, color="C3", label=labels[1])
    ax.set_xlabel(score_name)
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    ax.set_title(f"{title}, AUROC = {auc:.3f}" if title else f"AUROC = {auc:.3f}")
    return fig


def uncertainty_map(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    x_train: Any,
    y_train: Any,
    bounds: tuple[tuple[float, float], tuple[float, float]] | None = None,
    resolution: int = 100,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Filled contour of an uncertainty over a 2-D input grid, training points on top.

    Args:
        predict_fn: maps a (M, 2) grid tensor to an (M,) uncertainty tensor (e.g.
            predictive entropy or variance). It is called once, with
            M = resolution², on the CPU, in the dtype of ``x_train`` when that is
            floating point (else the default dtype), outside ``torch.no_grad``
            so that Jacobian-based predictives work.
        x_train: (N, 2) training inputs.
        y_train: (N,) labels or targets, used to colour the points.
        bounds: ((x0_min, x0_max), (x1_min, x1_max)); by default the data range
            widened by 25 % on each side.
        resolution: grid points per axis (>= 2).
        ax: axis to draw into; a new figure is made when ``None``.
        title: axis title.

    Cost: one ``predict_fn`` call on resolution² points.
    """
    x = _to_numpy(x_train, "x_train", (2,), "(N, 2)")
    if x.shape[1] != 2 or x.shape[0] == 0:
        raise ValueError(f"x_train must have shape (N, 2) with N >= 1, got {x.shape}")
    y = _column(y_train, "y_train")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x_train has {x.shape[0]} points but y_train has {y.shape[0]}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {resolution!r}")
    if bounds is None:
        lo, hi = x.min(axis=0), x.max(axis=0)
        pad = np.where(hi > lo, 0.25 * (hi - lo), 1.0)
        bounds = ((lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1]))
    (a0, b0), (a1, b1) = bounds
    if not (a0 < b0 and a1 < b1):
        raise ValueError(f"bounds must be ((min0, max0), (min1, max1)) with min < max, got {bounds!r}")

    if isinstance(x_train, torch.Tensor) and x_train.is_floating_point():
        dtype = x_train.dtype
    else:
        dtype = torch.get_default_dtype()
    g0 = torch.linspace(float(a0), float(b0), resolution, dtype=dtype)
    g1 = torch.linspace(float(a1), float(b1), resolution, dtype=dtype)
    mesh0, mesh1 = torch.meshgrid(g0, g1, indexing="xy")  # (resolution, resolution), rows = x1
    grid = torch.stack([mesh0.reshape(-1), mesh1.reshape(-1)], dim=1)
    out = predict_fn(grid)
    m = grid.shape[0]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) not in ((m,), (m, 1)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"predict_fn must return a tensor of shape ({m},) for a ({m}, 2) grid, got {got}")
    z = _column(out, "predict_fn output").reshape(resolution, resolution)

    fig, ax = _figure_and_axes(ax, (5.5, 4.5))
    filled = ax.contourf(mesh0.double().numpy(), mesh1.double().numpy(), z, levels=20, cmap="viridis")
    fig.colorbar(filled, ax=ax, label="uncertainty")
    ax.scatter(x[:, 0], x[:, 1], c=y, cmap="coolwarm", s=14, edgecolors="black", linewidths=0.4)
    ax.set_xlim(a0, b0)
    ax.set_ylim(a1, b1)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    if title is not None:
        ax.set_title(title)
    return fig


def regression_band(
    x: Any,
    mean: Any,
    std: Any,
    x_train: Any,
    y_train: Any,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Predictive mean with a ±2 std band over a 1-D input, training data on top.

    Args:
        x: (M,) or (M, 1) test inputs (any order; sorted for drawing).
        mean: (M,) predictive means.
        std: (M,) predictive standard deviations (>= 0; include the noise for
            the predictive of y).
        x_train: (N,) or (N, 1) training inputs.
        y_train: (N,) training targets.
        ax: axis to draw into; a new figure is made when ``None``.
        title: axis title.

    Cost: O(M log M).
    """
    xs, mu, sd = _column(x, "x"), _column(mean, "mean"), _column(std, "std")
    if not (xs.shape == mu.shape == sd.shape):
        raise ValueError(f"x, mean and std must have M entries each, got {xs.shape}, {mu.shape}, {sd.shape}")
    if np.any(sd < 0):
        raise ValueError("std must be >= 0; pass standard deviations, not log-variances")
    xt, yt = _column(x_train, "x_train"), _column(y_train, "y_train")
    if xt.shape != yt.shape:
        raise ValueError(f"x_train and y_train must have N entries each, got {xt.shape} and {yt.shape}")
    order = np.argsort(xs, kind="stable")
    xs, mu, sd = xs[order], mu[order], sd[order]
    fig, ax = _figure_and_axes(ax, (6.0, 3.5))
    ax.fill_between(xs, mu - 2 * sd, mu + 2 * sd, color="C0", alpha=0.25, linewidth=0, label="±2 std")
    ax.plot(xs, mu, color="C0", linewidth=1.5, label="mean")
    ax.scatter(xt, yt, s=10, color="black", alpha=0.7, label="training data", zorder=3)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize="small")
    if title is not None:
        ax.set_title(title)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically, close it and return the path.

    The figure is rendered into memory first and then written beside the target
    and renamed, so an interrupted run never leaves a truncated image. ``path``
    must end in ``.png``; parent folders are created. A figure made through
    pyplot is also removed from pyplot's registry (``plt.close``).
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; path must end in .png, got {str(path)!r}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    out = atomic_write_bytes(path, buffer.getvalue())
    # Only a figure registered by pyplot needs closing; avoid importing pyplot
    # (and so choosing a backend) when the caller never did.
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    return out
