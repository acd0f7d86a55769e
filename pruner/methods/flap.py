"""FLAP: fluctuation of the o_proj / down_proj inputs, one global threshold, bias compensation."""

from __future__ import annotations

from ..budget import global_mask, keep_fraction
from ..calibration import calibration_stats
from ..scores import flap_channel_scores
from ..space import PruningSpace
from .base import Method, Selection, UnitScores
from .columns import column_scores, standardized_per_kind


def unit_scores(loaded, space: PruningSpace, config) -> UnitScores:
    """Var(X_j) ||W[:, j]||^2 summed over each unit's channels."""
    return column_scores(loaded, space, calibration_stats(loaded, config), flap_channel_scores, "var", "sum")


def select(loaded, space: PruningSpace, config) -> Selection:
    """Standardised fluctuation scores, one global threshold (adaptive per-layer ratios), and the
    removed channels' mean output kept as a bias when the mask is applied."""
    heads, channels = unit_scores(loaded, space, config)
    return Selection(global_mask(space, *standardized_per_kind(heads, channels), keep_fraction(config.ratio)),
                     compensate=True)


METHOD = Method("flap", "fluctuation metric, global threshold, bias compensation", select, unit_scores=unit_scores)
