"""Wanda-sp: |W| times the input norm on the o_proj / down_proj columns, uniform per layer.

Statistics (`PruneConfig.wanda_sp_stats`): "dense", every layer's input norms from the dense model
(computed once per model and reused at every ratio); or "sequential", the reference's order (FLAP
repository, `prune_wanda_sp`): layer by layer, each layer's norms on the calibration windows as they
leave the already-pruned layers before it, its units cut, its pruned outputs the next layer's inputs.
"""

from __future__ import annotations

import copy

import torch

from ..budget import even_query_heads, global_mask, keep_fraction, top_k, uniform_counts, uniform_mask
from ..calibration import calibration_stats
from ..errors import PrunerError
from ..scores import wanda_sp_channel_scores
from ..sequential import SequentialInputs
from ..space import Mask, PruningSpace
from .base import Method, Selection, UnitScores
from .columns import column_scores, layer_column_scores, standardized_per_kind


def unit_scores(loaded, space: PruningSpace, config) -> UnitScores:
    """mean_i |W_ij| * ||X_j|| per column (dense statistics); a head sums its channels, a kv group
    averages its heads."""
    return column_scores(loaded, space, calibration_stats(loaded, config), wanda_sp_channel_scores, "l2", "mean")


def select(loaded, space: PruningSpace, config) -> Selection:
    """The same sparsity in every layer (whole sublayers: one global ranking)."""
    keep = keep_fraction(config.ratio)
    if config.wanda_sp_stats == "sequential":
        return Selection(sequential_mask(loaded, space, config, keep))
    heads, channels = unit_scores(loaded, space, config)
    if space.granularity == "block":
        return Selection(global_mask(space, *standardized_per_kind(heads, channels), keep))
    return Selection(uniform_mask(space, heads, channels, keep))


@torch.no_grad()
def sequential_mask(loaded, space: PruningSpace, config, keep: float) -> Mask:
    """Layer by layer on a copy: ||X_j|| = sqrt(diag(X^T X)) of the o_proj / down_proj inputs as the
    pruned layers before deliver them, the layer's top units by Wanda-sp score with `uniform_counts`,
    then the removed columns of o_proj and down_proj zeroed (the sliced layer's output: Wanda-sp adds
    no bias) before the layer's outputs feed the next."""
    from ..windows import calibration_windows

    if space.granularity == "block":
        raise PrunerError("sequential Wanda-sp statistics cut each layer in turn; the block granularity ranks "
                          "whole sublayers over all layers at once: use dense statistics")
    windows = calibration_windows(loaded.tokenizer, config.data, "train", config.calib_windows,
                                  config.calib_seqlen, config.seed)
    model, adapter = copy.deepcopy(loaded.model), loaded.adapter
    walk = SequentialInputs(model, adapter, windows)
    head_counts, channel_counts = uniform_counts(space, keep)
    full = space.full_mask()
    heads, channels = [], []
    for l in range(walk.n_layers):
        inputs = walk.collect(["o_proj", "down_proj"])
        norms = [inputs[name].gram.diagonal().clamp(min=0).sqrt() for name in ("o_proj", "down_proj")]
        head_scores, channel_scores = layer_column_scores(model, adapter, space, l, *norms,
                                                          wanda_sp_channel_scores, "mean")
        heads.append(even_query_heads(space, l, head_scores, head_counts[l]))
        channels.append(top_k(channel_scores, channel_counts[l]))
        so_far = Mask(tuple(heads) + full.heads[l + 1:], tuple(channels) + full.channels[l + 1:])
        for which, kept in zip(("o_proj", "down_proj"), space.kept_inputs(l, so_far)):
            weight = adapter.output_linear(model, l, which).weight
            weight[:, ~kept.to(weight.device)] = 0
        walk.advance()
    return Mask(tuple(heads), tuple(channels))


METHOD = Method("wanda-sp", "|W| x input norm per column, uniform per layer", select, unit_scores=unit_scores)
