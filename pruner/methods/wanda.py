"""Wanda (Sun et al., arXiv 2306.11695): score |W_ij| * ||X_j||_2 on sequential calibration inputs,
compared within each output row (unstructured) or each group of M inputs (N:M); no weight update."""

from __future__ import annotations

from ..sparsity_masks import select_mask, wanda_scores
from .base import Method
from .sparse import sparse_select


def rule(weight, inputs, config):
    scores = wanda_scores(weight, inputs.gram.diagonal())
    keep = select_mask(scores, config.ratio, config.sparsity_type, per_row=True)
    return weight * keep, keep


def select(loaded, space, config, on_layer=None):
    return sparse_select(loaded, space, config, rule, on_layer)


METHOD = Method("wanda", "|W| x input norm per weight, per output row (unstructured or N:M, no update)",
                select, sparse=True)
