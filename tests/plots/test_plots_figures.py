"""Plots: every function draws a figure and save_figure writes a valid PNG atomically."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from posthoc.metrics import calibration_bins
from posthoc.plots import ood_histograms, regression_band, reliability_diagram, save_figure, uncertainty_map

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, tmp_path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    # Only the target remains: no temporary file left beside it.
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _bins(seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(300, 4, generator=g), dim=1)
    return calibration_bins(probs, torch.randint(0, 4, (300,), generator=g))


def test_reliability_diagram_single(tmp_path):
    fig = reliability_diagram(_bins(0), title="MAP")
    assert isinstance(fig, Figure)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("ECE = " in s for s in labels)
    out = save_figure(fig, tmp_path / "rel.png")
    assert out == tmp_path / "rel.png"
    _check_png(out, tmp_path)


def test_reliability_diagram_several_methods(tmp_path):
    fig = reliability_diagram({"MAP": _bins(0), "LLA": _bins(1)})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(s.startswith("MAP (ECE = ") for s in labels)
    assert any(s.startswith("LLA (ECE = ") for s in labels)
    _check_png(save_figure(fig, tmp_path / "rel2.png"), tmp_path)


def test_reliability_diagram_bad_input():
    with pytest.raises(TypeError, match="CalibrationBins"):
        reliability_diagram({})
    with pytest.raises(TypeError, match="CalibrationBins"):
        reliability_diagram(torch.ones(3))


def test_ood_histograms(tmp_path):
    g = torch.Generator().manual_seed(0)
    fig = ood_histograms(torch.rand(500, generator=g), torch.rand(300, generator=g) + 0.5, title="LLA")
    title = fig.axes[0].get_title()
    assert title.startswith("LLA") and "AUROC = " in title
    _check_png(save_figure(fig, tmp_path / "ood.png"), tmp_path)


def test_ood_histograms_numpy_and_nan():
    fig = ood_histograms(np.zeros(10), np.ones(10), score_name="½ log det Σ")
    assert "AUROC = 1.000" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="NaN"):
        ood_histograms(np.array([0.0, np.nan]), np.ones(3))


def test_uncertainty_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=g)
    y = (x[:, 0] > 0).long()
    calls = []

    def predict(grid):
        calls.append(grid.shape)
        return grid.pow(2).sum(1)

    fig = uncertainty_map(predict, x, y, resolution=30, title="distance")
    assert calls == [(900, 2)]
    _check_png(save_figure(fig, tmp_path / "map.png"), tmp_path)


def test_uncertainty_map_errors():
    x, y = torch.randn(10, 2), torch.zeros(10)
    with pytest.raises(ValueError, match="predict_fn must return"):
        uncertainty_map(lambda g: g, x, y, resolution=5)
    with pytest.raises(ValueError, match="bounds"):
        uncertainty_map(lambda g: g[:, 0], x, y, bounds=((1, 0), (0, 1)), resolution=5)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        uncertainty_map(lambda g: g[:, 0], torch.randn(10, 3), y, resolution=5)


def test_regression_band(tmp_path):
    x = torch.linspace(-3, 3, 80)[:, None]
    mean, std = torch.sin(x[:, 0]), 0.1 + x[:, 0].abs() / 5
    x_train = torch.cat([torch.linspace(-2, -1, 10), torch.linspace(1, 2, 10)])[:, None]
    fig = regression_band(x.flip(0), mean.flip(0), std.flip(0), x_train, torch.sin(x_train[:, 0]), title="gap")
    _check_png(save_figure(fig, tmp_path / "band.png"), tmp_path)
    with pytest.raises(ValueError, match="std must be >= 0"):
        regression_band(x, mean, -std, x_train, x_train[:, 0])
    with pytest.raises(ValueError, match="M entries"):
        regression_band(x, mean[:5], std, x_train, x_train[:, 0])


def test_draw_into_pyplot_axis_and_close(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2)
    assert reliability_diagram(_bins(0), ax=ax1) is fig
    assert ood_histograms(torch.rand(20), torch.rand(20), ax=ax2) is fig
    assert plt.fignum_exists(fig.number)
    save_figure(fig, tmp_path / "sub" / "both.png")  # parent folder is created
    assert not plt.fignum_exists(fig.number)
    assert (tmp_path / "sub" / "both.png").read_bytes().startswith(PNG_SIGNATURE)


def test_save_figure_rejects_other_formats(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        save_figure(Figure(), tmp_path / "fig.pdf")
    assert list(tmp_path.iterdir()) == []


def test_library_does_not_import_pyplot():
    code = (
        "import sys, torch, posthoc.plots as p, posthoc.metrics as m\n"
        "fig = p.ood_histograms(torch.rand(5), torch.rand(5))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_axes_inside_a_subfigure_and_axes_without_a_figure():
    fig = Figure()
    ax = fig.subfigures(1, 2)[0].add_subplot()
    assert reliability_diagram(_bins(0), ax=ax) is fig

    class Orphan:
        def get_figure(self):
            return None

    with pytest.raises(ValueError, match="belongs to no figure"):
        reliability_diagram(_bins(0), ax=Orphan())
