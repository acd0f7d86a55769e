"""Magnitude pruning of single weights: the smallest |W_ij| of each linear go (unstructured: over the
whole matrix, as the Wanda repository's magnitude baseline; N:M: within each group of M inputs)."""

from __future__ import annotations

from ..sparsity_masks import magnitude_scores, select_mask
from .base import Method
from .sparse import sparse_select


def rule(weight, inputs, config):
    keep = select_mask(magnitude_scores(weight), config.ratio, config.sparsity_type, per_row=False)
    return weight * keep, keep


def select(loaded, space, config, on_layer=None):
    """The mask uses no data; the per-layer errors of the report come from sequential calibration."""
    return sparse_select(loaded, space, config, rule, on_layer)


METHOD = Method("magnitude-unstructured", "smallest |W| of each linear zeroed (unstructured or N:M, no update)",
                select, uses_data=False, sparse=True)
