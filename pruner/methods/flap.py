"""FLAP (An et al., AAAI 2024) as its reference code runs it (structure AL-AM, metric WIFV).

Per input channel j of o_proj and down_proj, from dense calibration statistics:
    m_j = Var_tokens(X_j) * ||W[:, j]||^2                      (fluctuation metric, WIFV)
    o_proj channels: m_j^2                                      (the reference squares the attention metric)
Per layer and per module, the channel scores are standardised (mean, unbiased std over that layer's
channels); an attention unit scores the mean of its channels' z-scores (a query head: its head_dim
channels; a kv group: all g * head_dim of its query heads), an MLP channel its own z-score. One
threshold over all units of all layers, with their exact parameter costs, keeps `1 - ratio` of the
decoder-linear parameters (adaptive per-layer ratios; a layer may lose a whole sublayer). The
removed channels' mean output is kept as a bias (W[:, removed] @ mean(X[removed])), by `apply`.

Differences from the reference, all deliberate: exact token variance instead of its running update
(a common scale factor, gone after standardisation); exact unit costs (a kv group of SmolLM2 costs
170.67 MLP channels, the reference's truncated 512/3 = 170 for LLaMA heads); the threshold never
exceeds the budget (the reference takes the cumulative cost closest to it); calibration on the
chosen corpus's train split (the reference: 1024 x 128 tokens of WikiText-2 train).
`block` granularity (not in the reference): sublayers rank by their mean raw score, standardised
over layers per kind, since per-layer z-scores average to zero over a whole sublayer.
"""

from __future__ import annotations

import torch

from ..budget import global_mask, keep_fraction
from ..calibration import calibration_stats
from ..scores import flap_attention_channel_scores, flap_channel_scores, group_channels, standardize
from ..space import PruningSpace
from .base import Method, Selection, UnitScores
from .columns import standardized_per_kind


@torch.no_grad()
def channel_scores(loaded, space: PruningSpace, stats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the (squared) WIFV scores of the o_proj input channels and the down_proj input channels."""
    attn, mlp = [], []
    for l in range(space.n_layers):
        o = loaded.adapter.output_linear(loaded.model, l, "o_proj").weight
        down = loaded.adapter.output_linear(loaded.model, l, "down_proj").weight
        attn.append(flap_attention_channel_scores(o, stats[0][l].var.to(o.device)).cpu())
        mlp.append(flap_channel_scores(down, stats[1][l].var.to(down.device)).cpu())
    return attn, mlp


def unit_scores(loaded, space: PruningSpace, config) -> UnitScores:
    """Per layer: unit scores that one global threshold can compare (see the module docstring)."""
    attn, mlp = channel_scores(loaded, space, calibration_stats(loaded, config))
    if space.granularity == "block":
        return standardized_per_kind([a.mean().view(1) for a in attn], [m.mean().view(1) for m in mlp])
    heads, channels = [], []
    for l, s in enumerate(space.shapes):
        heads.append(group_channels(standardize(attn[l], unbiased=True), s.head_dim, s.group_size, space.granularity,
                                    reduce="mean", head_reduce="mean"))
        channels.append(standardize(mlp[l], unbiased=True))
    return heads, channels


def select(loaded, space: PruningSpace, config) -> Selection:
    """One threshold over every unit's score with exact costs, then bias compensation when applied."""
    heads, channels = unit_scores(loaded, space, config)
    return Selection(global_mask(space, heads, channels, keep_fraction(config.ratio), greedy=False), compensate=True)


METHOD = Method("flap", "fluctuation metric standardised per layer, one global threshold, bias compensation",
                select, unit_scores=unit_scores)
