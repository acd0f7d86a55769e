"""Importance scores of pruning units: pure functions from weight tensors to score vectors."""

from __future__ import annotations

import torch
from torch import Tensor


def head_weight_sq_norms(q: Tensor, k: Tensor, v: Tensor, o: Tensor, head_dim: int,
                         q_bias: Tensor | None = None, k_bias: Tensor | None = None,
                         v_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Squared L2 norms of everything one head owns.

    q (n_q*hd, H), k/v (n_kv*hd, H), o (H, n_q*hd) -> (per query head: q rows + q bias + o columns,
    per kv head: k rows + v rows + their biases), shapes (n_q,), (n_kv,).
    """
    def per_head(rows: Tensor, bias: Tensor | None) -> Tensor:
        sq = rows.float().pow(2).sum(1)
        if bias is not None:
            sq = sq + bias.float().pow(2)
        return sq.view(-1, head_dim).sum(1)

    q_sq = per_head(q, q_bias) + o.float().pow(2).sum(0).view(-1, head_dim).sum(1)
    kv_sq = per_head(k, k_bias) + per_head(v, v_bias)
    return q_sq, kv_sq


def magnitude_head_scores(q_sq: Tensor, kv_sq: Tensor, granularity: str) -> Tensor:
    """L2 norm of all weights of each attention unit.

    kv_group: the kv head plus its query heads; query_head: the query head's q rows and o
    columns (the shared k/v heads belong to no single query head); block: the whole sublayer.
    """
    if granularity == "kv_group":
        group = q_sq.numel() // kv_sq.numel()
        return (q_sq.view(-1, group).sum(1) + kv_sq).sqrt()
    if granularity == "query_head":
        return q_sq.sqrt()
    return (q_sq.sum() + kv_sq.sum()).sqrt().view(1)


def mlp_channel_sq_norms(gate: Tensor, up: Tensor, down: Tensor,
                         gate_bias: Tensor | None = None, up_bias: Tensor | None = None) -> Tensor:
    """Squared L2 norm of each intermediate channel: gate row + up row + down column (+ biases)."""
    sq = gate.float().pow(2).sum(1) + up.float().pow(2).sum(1) + down.float().pow(2).sum(0)
    for b in (gate_bias, up_bias):
        if b is not None:
            sq = sq + b.float().pow(2)
    return sq


def magnitude_channel_scores(channel_sq: Tensor, granularity: str) -> Tensor:
    """L2 norm of each MLP unit (a channel, or the whole sublayer for `block`)."""
    return channel_sq.sum().sqrt().view(1) if granularity == "block" else channel_sq.sqrt()


def standardize(scores: Tensor, unbiased: bool = False) -> Tensor:
    """z = (x - mean) / std, so scores of different layers or kinds can share one threshold
    (`unbiased`: the n-1 std that torch.std uses by default, as FLAP's reference code does).
    Constant scores (std 0) give zeros."""
    scores = scores.double()
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    std = scores.std(unbiased=unbiased)
    return (scores - scores.mean()) / std if std > 0 else torch.zeros_like(scores)


def group_channels(channel_scores: Tensor, head_dim: int, group_size: int, granularity: str,
                   reduce: str = "sum", head_reduce: str = "sum") -> Tensor:
    """Per-channel scores of the o_proj input (n_q*head_dim,) -> per attention unit.

    A query head combines its head_dim channels with `head_reduce` ("sum" or "mean"); a kv group
    combines its query heads with `reduce`; a block combines everything the same way.
    """
    heads = channel_scores.view(-1, head_dim)
    per_head = heads.mean(1) if head_reduce == "mean" else heads.sum(1)
    if granularity == "query_head":
        return per_head
    if granularity == "kv_group":
        grouped = per_head.view(-1, group_size)
        return grouped.mean(1) if reduce == "mean" else grouped.sum(1)
    return (per_head.mean() if reduce == "mean" else per_head.sum()).view(1)


def wanda_sp_channel_scores(weight: Tensor, x_l2: Tensor) -> Tensor:
    """Wanda-sp: column j of W (out, in) scores mean_i |W[i, j]| * ||X_j||_2, X the layer input."""
    return weight.float().abs().mean(0).double() * x_l2.double()


def flap_channel_scores(weight: Tensor, x_var: Tensor) -> Tensor:
    """FLAP fluctuation metric (WIFV): Var_tokens(X_j) * ||W[:, j]||_2^2. FLAP's reference code squares
    it once more for the o_proj input (`flap_attention_channel_scores`)."""
    return x_var.double() * weight.double().pow(2).sum(0)


def flap_attention_channel_scores(weight: Tensor, x_var: Tensor) -> Tensor:
    """FLAP on the o_proj input: (Var(X_j) * ||W[:, j]||^2)^2, as the reference code scores heads."""
    return flap_channel_scores(weight, x_var).pow(2)


def taylor_salience(weight: Tensor, grad: Tensor) -> Tensor:
    """LLM-Pruner's first-order Taylor importance per weight: |w * dL/dw| (element-wise, 'param_first')."""
    return (weight.double() * grad.double()).abs()


def flap_bias(weight: Tensor, x_mean: Tensor, removed: Tensor) -> Tensor:
    """FLAP bias compensation for removed input channels: W[:, removed] @ mean(X[removed]).

    Adding it to the layer's bias keeps the output's mean where the dense layer had it.
    """
    idx = removed.nonzero().flatten().to(weight.device)
    return weight.double()[:, idx] @ x_mean.double().to(weight.device)[idx]
