"""Shared by the metric methods: scores of the input columns of o_proj and down_proj, per unit."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import resident
from ..scores import group_channels, standardize
from ..space import PruningSpace
from .base import UnitScores


@torch.no_grad()
def column_scores(loaded, space: PruningSpace, stats, channel_score, stat: str, reduce: str) -> UnitScores:
    """`channel_score(W, stats.<stat>)` for the input columns of o_proj and down_proj of every layer,
    grouped into units (a head sums its channels; a kv group combines its heads with `reduce`)."""
    attn_stats, mlp_stats = stats
    heads, channels = [], []
    for l, s in enumerate(space.shapes):
        with resident(loaded.model, loaded.adapter.layers(loaded.model)[l]):  # offloaded weights come in
            o = loaded.adapter.output_linear(loaded.model, l, "o_proj").weight
            down = loaded.adapter.output_linear(loaded.model, l, "down_proj").weight
            per_ch = channel_score(o, getattr(attn_stats[l], stat).to(o.device)).cpu()
            ch = channel_score(down, getattr(mlp_stats[l], stat).to(down.device)).cpu()
        heads.append(group_channels(per_ch, s.head_dim, s.group_size, space.granularity, reduce=reduce))
        channels.append(ch.sum().view(1) if space.granularity == "block" else ch)
    return heads, channels


def standardized_per_kind(heads: list[Tensor], channels: list[Tensor]) -> UnitScores:
    """Standardise head scores over all layers, and channel scores over all layers, so one
    global threshold compares units across layers and kinds."""
    def split_like(flat: Tensor, parts: list[Tensor]) -> list[Tensor]:
        return list(torch.split(flat, [p.numel() for p in parts]))

    return (split_like(standardize(torch.cat(heads)), heads),
            split_like(standardize(torch.cat(channels)), channels))
