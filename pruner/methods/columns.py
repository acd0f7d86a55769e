"""Shared by the metric methods: scores of the input columns of o_proj and down_proj, per unit."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import resident
from ..scores import group_channels, standardize
from ..space import PruningSpace
from .base import UnitScores


@torch.no_grad()
def layer_column_scores(model, adapter, space: PruningSpace, l: int, attn_stat: Tensor, mlp_stat: Tensor,
                        channel_score, reduce: str) -> tuple[Tensor, Tensor]:
    """Layer l's units scored from its o_proj and down_proj input columns: `channel_score(W, stat)` per
    column, grouped into units (a head sums its channels; a kv group combines its heads with `reduce`;
    a block sums all)."""
    s = space.shapes[l]
    with resident(model, adapter.layers(model)[l]):  # offloaded weights come in
        o = adapter.output_linear(model, l, "o_proj").weight
        down = adapter.output_linear(model, l, "down_proj").weight
        per_ch = channel_score(o, attn_stat.to(o.device)).cpu()
        ch = channel_score(down, mlp_stat.to(down.device)).cpu()
    heads = group_channels(per_ch, s.head_dim, s.group_size, space.granularity, reduce=reduce)
    return heads, (ch.sum().view(1) if space.granularity == "block" else ch)


def column_scores(loaded, space: PruningSpace, stats, channel_score, stat: str, reduce: str) -> UnitScores:
    """`layer_column_scores` of every layer from the calibration statistics' `stat` (e.g. "l2")."""
    attn_stats, mlp_stats = stats
    per_layer = [layer_column_scores(loaded.model, loaded.adapter, space, l, getattr(attn_stats[l], stat),
                                     getattr(mlp_stats[l], stat), channel_score, reduce)
                 for l in range(space.n_layers)]
    return [h for h, _ in per_layer], [c for _, c in per_layer]


def standardized_per_kind(heads: list[Tensor], channels: list[Tensor]) -> UnitScores:
    """Standardise head scores over all layers, and channel scores over all layers, so one
    global threshold compares units across layers and kinds."""
    def split_like(flat: Tensor, parts: list[Tensor]) -> list[Tensor]:
        return list(torch.split(flat, [p.numel() for p in parts]))

    return (split_like(standardize(torch.cat(heads)), heads),
            split_like(standardize(torch.cat(channels)), channels))
