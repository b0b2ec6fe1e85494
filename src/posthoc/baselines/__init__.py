"""Baselines every method is compared with: the MAP network and temperature scaling."""

from posthoc.baselines.map import MAP
from posthoc.baselines.temperature import TemperatureScaling

__all__ = ["MAP", "TemperatureScaling"]
