"""From unit scores to a hard mask under a parameter budget: uniform per layer, or global."""

from __future__ import annotations

import torch
from torch import Tensor

from .space import Mask, PruningSpace


def _top(scores: Tensor, k: int) -> Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.topk(scores.double(), k).indices] = True
    return keep


def top_heads(space: PruningSpace, layer: int, scores: Tensor, k: int) -> Tensor:
    """Keep the k best attention units of a layer; for `query_head`, k is rounded to a
    multiple of the kv heads and the best k / n_kv are kept inside every group."""
    if space.granularity != "query_head":
        return _top(scores, k)
    s = space.shapes[layer]
    per_group = min(s.group_size, max(0, round(k / s.n_kv)))
    return torch.stack([_top(g, per_group) for g in scores.view(s.n_kv, s.group_size)]).flatten()


def uniform_counts(space: PruningSpace, keep: float) -> tuple[list[int], list[int]]:
    """Units to keep per layer so every layer keeps about `keep` of its decoder-linear
    parameters: heads rounded first (at least one unit, a whole group for `query_head`),
    then MLP channels fill the layer's remaining budget."""
    head_counts, channel_counts = [], []
    for l, s in enumerate(space.shapes):
        n_h, n_c = space.n_head_units(l), space.n_channel_units(l)
        step = s.n_kv if space.granularity == "query_head" else 1
        k_h = min(n_h, max(step, step * round(keep * n_h / step))) if n_h else 0
        mlp_fixed = space.layer_params(s, l) - space.attention_params_keeping(l, n_h) - n_c * space.channel_unit_cost(l)
        budget = keep * space.layer_params(s, l) - space.attention_params_keeping(l, k_h) - mlp_fixed
        k_c = min(n_c, max(1, round(budget / space.channel_unit_cost(l)))) if n_c else 0
        head_counts.append(int(k_h))
        channel_counts.append(int(k_c))
    return head_counts, channel_counts


def uniform_mask(space: PruningSpace, head_scores: list[Tensor], channel_scores: list[Tensor], keep: float) -> Mask:
    """Top units per layer with the counts of `uniform_counts` (uniform sparsity)."""
    head_counts, channel_counts = uniform_counts(space, keep)
    heads = tuple(top_heads(space, l, head_scores[l], k) for l, k in enumerate(head_counts))
    channels = tuple(_top(channel_scores[l], k) for l, k in enumerate(channel_counts))
    return Mask(heads, channels)


def fill_budget(scores: Tensor, costs: Tensor, budget: float) -> Tensor:
    """Greedy knapsack fill: walk units by descending score, keep each one that still fits.

    Returns a bool mask with sum(costs[kept]) <= budget. Unlike a plain prefix cut, a large unit
    that does not fit does not stop smaller, lower-scored units from filling the rest.
    """
    order = torch.argsort(scores.double(), descending=True, stable=True)
    ordered_costs = costs.double()[order]
    prefix = torch.cumsum(ordered_costs, 0) <= budget + 1e-6
    keep = torch.zeros(len(scores), dtype=torch.bool)
    n_prefix = int(prefix.sum())
    keep[order[:n_prefix]] = True
    used = float(ordered_costs[:n_prefix].sum())
    for i, c in zip(order[n_prefix:].tolist(), ordered_costs[n_prefix:].tolist()):
        if used + c <= budget + 1e-6:
            keep[i] = True
            used += c
    return keep


def global_mask(space: PruningSpace, head_scores: list[Tensor], channel_scores: list[Tensor], keep: float) -> Mask:
    """Keep units in order of score, over all layers and both kinds, while they fit in
    `keep` x decoder-linear parameters (`fill_budget`) (scores must be comparable, e.g. standardised).
    For `query_head` each layer's count is then evened out over its groups."""
    h_cost, c_cost = space.unit_costs()
    costs = torch.cat([h_cost, c_cost])
    scores = torch.cat([torch.cat(head_scores), torch.cat(channel_scores)]).double()
    budget = keep * space.decoder_linear_params() - (space.decoder_linear_params() - costs.sum().item())
    keep_flat = fill_budget(scores, costs, budget)
    mask = space.unflatten(keep_flat[: len(h_cost)], keep_flat[len(h_cost):])
    if space.granularity == "query_head":
        heads = tuple(top_heads(space, l, head_scores[l], int(m.sum())) for l, m in enumerate(mask.heads))
        mask = Mask(heads, mask.channels)
    return mask


def achieved_ratio(space: PruningSpace, mask: Mask) -> float:
    """Fraction of decoder-linear parameters the mask removes."""
    return 1.0 - space.kept_params(mask) / space.decoder_linear_params()
