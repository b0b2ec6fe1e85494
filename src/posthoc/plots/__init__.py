"""Figures: reliability diagrams, OOD score histograms, 2-D uncertainty maps, 1-D regression bands."""

from posthoc.plots.figures import (
    ood_histograms,
    regression_band,
    reliability_diagram,
    save_figure,
    uncertainty_map,
)

__all__ = [
    "ood_histograms",
    "regression_band",
    "reliability_diagram",
    "save_figure",
    "uncertainty_map",
]
