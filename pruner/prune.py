"""One entry point for every pruning method: choose a mask, slice, report."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import PrunerError
from .evaluate import total_params
from .models import LoadedModel
from .scores import head_weight_sq_norms, magnitude_channel_scores, magnitude_head_scores, mlp_channel_sq_norms
from .selection import achieved_ratio, global_mask, uniform_mask
from .slicing import sliced_copy
from .space import Mask, PruningSpace, check_granularity, check_ratio


@dataclass(frozen=True)
class PruneConfig:
    """Settings shared by all methods. `ratio` is the fraction of decoder-linear parameters removed."""

    method: str = "magnitude"
    ratio: float = 0.3
    granularity: str = "kv_group"
    data: str = "brown"
    seed: int = 0
    calib_windows: int = 32
    calib_seqlen: int = 128

    def validate(self) -> "PruneConfig":
        if self.method not in METHODS:
            raise PrunerError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        check_ratio(self.ratio)
        check_granularity(self.granularity)
        if self.calib_windows < 1 or self.calib_seqlen < 2:
            raise PrunerError("calibration needs at least one window of at least 2 tokens")
        return self


def magnitude_scores(loaded: LoadedModel, space: PruningSpace) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
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


def magnitude_mask(loaded: LoadedModel, space: PruningSpace, config: PruneConfig) -> Mask:
    """Magnitude baseline: uniform per layer; for `block`, whole sublayers ranked globally by the
    root-mean-square of their weights (norms of sublayers of different sizes are not comparable)."""
    heads, channels = magnitude_scores(loaded, space)
    keep = 1.0 - config.ratio
    if space.granularity == "block":
        heads = [h / space.head_unit_cost(l) ** 0.5 for l, h in enumerate(heads)]
        channels = [c / space.channel_unit_cost(l) ** 0.5 for l, c in enumerate(channels)]
        return global_mask(space, heads, channels, keep)
    return uniform_mask(space, heads, channels, keep)


MaskFn = Callable[[LoadedModel, PruningSpace, PruneConfig], Mask]
METHODS: dict[str, MaskFn] = {"magnitude": magnitude_mask}


def per_layer_report(space: PruningSpace, mask: Mask) -> list[dict]:
    rows = []
    for l, (before, after) in enumerate(zip(space.shapes, space.kept_shapes(mask))):
        rows.append({
            "layer": l,
            "query_heads": after.n_q, "query_heads_before": before.n_q,
            "kv_heads": after.n_kv, "kv_heads_before": before.n_kv,
            "mlp_channels": after.d_ff, "mlp_channels_before": before.d_ff,
            "attention_kept": after.n_q > 0, "mlp_kept": after.d_ff > 0,
            "kept_fraction": space.layer_params(after, l) / space.layer_params(before, l),
        })
    return rows


def prune(loaded: LoadedModel, config: PruneConfig, mask_fn: MaskFn | None = None):
    """Select a mask with `config.method`, slice a copy of the model, and report.

    Returns (pruned model, mask, report). The loaded model is never modified.
    """
    config.validate()
    start = time.perf_counter()
    space = PruningSpace.from_model(loaded.model, loaded.adapter, config.granularity)
    mask = (mask_fn or METHODS[config.method])(loaded, space, config)
    pruned = sliced_copy(loaded.model, loaded.adapter, space, mask)
    report = {
        "method": config.method,
        "model": loaded.spec,
        "settings": dataclasses.asdict(config),
        "params_before": total_params(loaded.model),
        "params_after": total_params(pruned),
        "decoder_linear_params_before": space.decoder_linear_params(),
        "decoder_linear_params_after": space.kept_params(mask),
        "target_ratio": config.ratio,
        "achieved_ratio": achieved_ratio(space, mask),
        "per_layer": per_layer_report(space, mask),
        "wall_time_s": time.perf_counter() - start,
    }
    return pruned, mask, report
