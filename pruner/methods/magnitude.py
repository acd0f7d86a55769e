"""Magnitude: the L2 norm of each unit's weights, the same sparsity in every layer (data-free)."""

from __future__ import annotations

import torch

from ..budget import global_mask, keep_fraction, uniform_mask
from ..dispatch import resident
from ..scores import head_weight_sq_norms, magnitude_channel_scores, magnitude_head_scores, mlp_channel_sq_norms
from ..space import PruningSpace
from .base import Method, Selection, UnitScores


@torch.no_grad()
def unit_scores(loaded, space: PruningSpace, config=None) -> UnitScores:
    """Per layer: L2 norm of each unit's weights (and biases)."""
    heads, channels = [], []
    for l in range(space.n_layers):
        with resident(loaded.model, loaded.adapter.layers(loaded.model)[l]):  # offloaded weights come in
            lin = loaded.adapter.decoder_linears(loaded.model, l)
            q, k, v, o = lin["q_proj"], lin["k_proj"], lin["v_proj"], lin["o_proj"]
            q_sq, kv_sq = head_weight_sq_norms(q.weight, k.weight, v.weight, o.weight, space.shapes[l].head_dim,
                                               q.bias, k.bias, v.bias)
            gate, up, down = lin["gate_proj"], lin["up_proj"], lin["down_proj"]
            ch_sq = mlp_channel_sq_norms(gate.weight, up.weight, down.weight, gate.bias, up.bias)
        heads.append(magnitude_head_scores(q_sq, kv_sq, space.granularity).cpu())
        channels.append(magnitude_channel_scores(ch_sq, space.granularity).cpu())
    return heads, channels


def select(loaded, space: PruningSpace, config) -> Selection:
    """Uniform per layer; for `block`, whole sublayers ranked globally by the root-mean-square of
    their weights (norms of sublayers of different sizes are not comparable)."""
    heads, channels = unit_scores(loaded, space)
    keep = keep_fraction(config.ratio)
    if space.granularity == "block":
        heads = [h / space.head_unit_cost(l) ** 0.5 for l, h in enumerate(heads)]
        channels = [c / space.channel_unit_cost(l) ** 0.5 for l, c in enumerate(channels)]
        return Selection(global_mask(space, heads, channels, keep))
    return Selection(uniform_mask(space, heads, channels, keep))


METHOD = Method("magnitude", "L2 norm of each unit's weights, uniform per layer", select, uses_data=False,
                unit_scores=unit_scores)
