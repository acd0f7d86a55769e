"""Metric pruning methods: magnitude, Wanda-sp, FLAP. Each returns a Selection (mask + extras)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .calibration import InputStats, collect_input_stats
from .models import LoadedModel
from .scores import (flap_bias, flap_channel_scores, group_channels, head_weight_sq_norms,
                     magnitude_channel_scores, magnitude_head_scores, mlp_channel_sq_norms, standardize,
                     wanda_sp_channel_scores)
from .selection import global_mask, uniform_mask
from .space import Mask, PruningSpace


@dataclass
class Selection:
    """A method's result: the hard mask, bias additions to apply after slicing
    ((layer, "o_proj" | "down_proj", delta)), and anything worth reporting."""

    mask: Mask
    bias_updates: list[tuple[int, str, Tensor]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


_STATS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def calibration_stats(loaded: LoadedModel, config) -> tuple[list[InputStats], list[InputStats]]:
    """Input statistics of o_proj/down_proj over the config's calibration windows (train split).

    Remembered per model object and calibration setting (models are never modified in place),
    so pruning the same model again at another ratio costs no forward passes."""
    from .windows import calibration_windows

    key = (config.data, config.calib_windows, config.calib_seqlen, config.seed)
    per_model = _STATS_CACHE.setdefault(loaded.model, {})
    if key not in per_model:
        windows = calibration_windows(loaded.tokenizer, config.data, "train", config.calib_windows,
                                      config.calib_seqlen, config.seed)
        per_model[key] = collect_input_stats(loaded.model, loaded.adapter, windows, progress=True)
    return per_model[key]


@torch.no_grad()
def magnitude_scores(loaded: LoadedModel, space: PruningSpace) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer: L2 norm of each unit's weights (and biases)."""
    heads, channels = [], []
    for l in range(space.n_layers):
        attn, mlp = loaded.adapter.attention(loaded.model, l), loaded.adapter.mlp(loaded.model, l)
        q_sq, kv_sq = head_weight_sq_norms(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                           attn.o_proj.weight, space.shapes[l].head_dim,
                                           attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
        ch_sq = mlp_channel_sq_norms(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                     mlp.gate_proj.bias, mlp.up_proj.bias)
        heads.append(magnitude_head_scores(q_sq, kv_sq, space.granularity).cpu())
        channels.append(magnitude_channel_scores(ch_sq, space.granularity).cpu())
    return heads, channels


@torch.no_grad()
def column_scores(loaded: LoadedModel, space: PruningSpace, stats, channel_score, stat: str,
                  reduce: str) -> tuple[list[Tensor], list[Tensor]]:
    """Scores of o_proj/down_proj input columns, `channel_score(W, stats.<stat>)`, grouped into units."""
    attn_stats, mlp_stats = stats
    heads, channels = [], []
    for l, s in enumerate(space.shapes):
        o = loaded.adapter.attention(loaded.model, l).o_proj.weight
        down = loaded.adapter.mlp(loaded.model, l).down_proj.weight
        per_ch = channel_score(o, getattr(attn_stats[l], stat).to(o.device)).cpu()
        heads.append(group_channels(per_ch, s.head_dim, s.group_size, space.granularity, reduce=reduce))
        ch = channel_score(down, getattr(mlp_stats[l], stat).to(down.device)).cpu()
        channels.append(ch.sum().view(1) if space.granularity == "block" else ch)
    return heads, channels


def wanda_sp_scores(loaded: LoadedModel, space: PruningSpace, stats) -> tuple[list[Tensor], list[Tensor]]:
    """Wanda-sp on o_proj/down_proj columns: mean_i |W_ij| * ||X_j||; a head sums its channels,
    a kv group averages its query heads."""
    return column_scores(loaded, space, stats, wanda_sp_channel_scores, "l2", reduce="mean")


def flap_scores(loaded: LoadedModel, space: PruningSpace, stats) -> tuple[list[Tensor], list[Tensor]]:
    """FLAP fluctuation per unit: Var(X_j) ||W[:, j]||^2 summed over the unit's channels."""
    return column_scores(loaded, space, stats, flap_channel_scores, "var", reduce="sum")


def standardized_per_kind(heads: list[Tensor], channels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Standardise head scores over all layers, and channel scores over all layers, so one
    global threshold compares units across layers and kinds (FLAP's adaptive structure)."""
    def split_like(flat: Tensor, parts: list[Tensor]) -> list[Tensor]:
        return list(torch.split(flat, [p.numel() for p in parts]))

    return (split_like(standardize(torch.cat(heads)), heads),
            split_like(standardize(torch.cat(channels)), channels))


def magnitude(loaded: LoadedModel, space: PruningSpace, config) -> Selection:
    """Magnitude baseline: uniform per layer; for `block`, whole sublayers ranked globally by the
    root-mean-square of their weights (norms of sublayers of different sizes are not comparable)."""
    heads, channels = magnitude_scores(loaded, space)
    keep = 1.0 - config.ratio
    if space.granularity == "block":
        heads = [h / space.head_unit_cost(l) ** 0.5 for l, h in enumerate(heads)]
        channels = [c / space.channel_unit_cost(l) ** 0.5 for l, c in enumerate(channels)]
        return Selection(global_mask(space, heads, channels, keep))
    return Selection(uniform_mask(space, heads, channels, keep))


def wanda_sp(loaded: LoadedModel, space: PruningSpace, config) -> Selection:
    """Wanda-sp: the same sparsity in every layer (whole sublayers: one global ranking)."""
    heads, channels = wanda_sp_scores(loaded, space, calibration_stats(loaded, config))
    keep = 1.0 - config.ratio
    if space.granularity == "block":
        return Selection(global_mask(space, *standardized_per_kind(heads, channels), keep))
    return Selection(uniform_mask(space, heads, channels, keep))


def flap(loaded: LoadedModel, space: PruningSpace, config) -> Selection:
    """FLAP: standardised fluctuation scores, one global threshold (adaptive per-layer ratios),
    then bias compensation (see `bias_compensation`)."""
    stats = calibration_stats(loaded, config)
    heads, channels = flap_scores(loaded, space, stats)
    mask = global_mask(space, *standardized_per_kind(heads, channels), 1.0 - config.ratio)
    return Selection(mask, bias_compensation(loaded, space, mask, stats))


def bias_compensation(loaded: LoadedModel, space: PruningSpace, mask: Mask,
                      stats) -> list[tuple[int, str, Tensor]]:
    """FLAP's bias compensation for any mask: for o_proj and down_proj, W[:, removed] @ mean(X[removed])
    over the removed input columns, to be added to the sliced layer's bias."""
    updates = []
    for l in range(space.n_layers):
        head_dim = space.shapes[l].head_dim
        attn_removed = torch.ones(space.shapes[l].n_q * head_dim, dtype=torch.bool)
        for h in space.kept_query_heads(l, mask.heads[l]).tolist():
            attn_removed[h * head_dim:(h + 1) * head_dim] = False
        mlp_removed = torch.ones(space.shapes[l].d_ff, dtype=torch.bool)
        mlp_removed[space.kept_channels(l, mask.channels[l])] = False
        o = loaded.adapter.attention(loaded.model, l).o_proj.weight
        down = loaded.adapter.mlp(loaded.model, l).down_proj.weight
        if attn_removed.any():
            updates.append((l, "o_proj", flap_bias(o, stats[0][l].mean, attn_removed).cpu()))
        if mlp_removed.any():
            updates.append((l, "down_proj", flap_bias(down, stats[1][l].mean, mlp_removed).cpu()))
    return updates


def pg(loaded: LoadedModel, space: PruningSpace, config) -> Selection:
    """Policy-gradient search (see pruner.pg_run); runs in the foreground with a progress bar."""
    from .pg_run import run_pg_to_completion

    return run_pg_to_completion(loaded, space, config)


METHODS = {"magnitude": magnitude, "wanda-sp": wanda_sp, "flap": flap, "pg": pg}
DATA_FREE = {"magnitude"}
