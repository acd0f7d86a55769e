"""Wanda-sp: |W| times the input norm on the o_proj / down_proj columns, uniform per layer."""

from __future__ import annotations

from ..budget import global_mask, keep_fraction, uniform_mask
from ..calibration import calibration_stats
from ..scores import wanda_sp_channel_scores
from ..space import PruningSpace
from .base import Method, Selection, UnitScores
from .columns import column_scores, standardized_per_kind


def unit_scores(loaded, space: PruningSpace, config) -> UnitScores:
    """mean_i |W_ij| * ||X_j|| per column; a head sums its channels, a kv group averages its heads."""
    return column_scores(loaded, space, calibration_stats(loaded, config), wanda_sp_channel_scores, "l2", "mean")


def select(loaded, space: PruningSpace, config) -> Selection:
    """The same sparsity in every layer (whole sublayers: one global ranking)."""
    heads, channels = unit_scores(loaded, space, config)
    keep = keep_fraction(config.ratio)
    if space.granularity == "block":
        return Selection(global_mask(space, *standardized_per_kind(heads, channels), keep))
    return Selection(uniform_mask(space, heads, channels, keep))


METHOD = Method("wanda-sp", "|W| x input norm per column, uniform per layer", select, unit_scores=unit_scores)
