"""Probe Pruning, the pure tensor math (Le et al., ICLR 2025, arXiv 2502.15618).

Per batch and per block (attention or MLP) of a decoder layer:
  1. residual importance picks a small probe of samples and positions (Sec. 3.1),
  2. the probe runs through the block; its pre-o_proj / pre-down_proj activation energy is
     fused with a calibration history (Sec. 3.2),
  3. the PPsp score ranks heads / channels and the lowest share is pruned (Sec. 3.3),
  4. the full batch runs on the kept weights, and the history is updated on the kept
     channels (Sec. 3.2, "history update").

Functions here take and return tensors only (no model plumbing) and run on any device.
Where the public reference code differs from the paper, the reference is followed and the
difference is stated in the docstring.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

FUSION_EPS = 1e-6


def residual_importance(residual: Tensor) -> Tensor:
    """n[b, s] = ||R[b, s, :]||_2 for the residual R entering a block (Sec. 3.1).

    residual: (B, T, H). Returns (B, T) in float32 (fp16 inputs do not overflow).
    """
    return torch.linalg.vector_norm(residual, ord=2, dim=-1, dtype=torch.float32)  # (B, T)


def probe_count(n: int, fraction: float, minimum: int = 1) -> int:
    """Units the probe takes out of n: max(ceil(n * fraction), minimum), capped at n.

    ceil is taken on the float product, as the reference does (so ceil(100 * 0.07) = 8).
    The reference has no cap at n (its topk fails when n < minimum); here it is capped.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"probe fraction must be in (0, 1], got {fraction}")
    return min(n, max(math.ceil(n * fraction), minimum))


def _top_sorted(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, sorted ascending (ties: lowest index first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k].sort().values


def select_probe(norms: Tensor, position_fraction: float = 0.5, sample_fraction: float = 0.05,
                 min_positions: int = 2, force_first_if_at_most: int = 10) -> tuple[Tensor, Tensor]:
    """Probe samples and positions from residual importance, positions first (Sec. 3.1).

    norms: (B, T) from `residual_importance`. As the reference (`seqrank+bszrank`):
      positions: k_T = max(ceil(T * position_fraction), min_positions) (capped at T);
                 token score ||n[:, s]||_2 over all samples; top k_T, sorted ascending;
                 if k_T <= force_first_if_at_most, the first (lowest) kept position is
                 replaced by 0, so token 0 is always in a short probe.
      samples:   k_B = max(ceil(B * sample_fraction), 1) (capped at B); sample score
                 ||n[b, kept positions]||_2; top k_B, sorted ascending.
    Returns (sample indices (k_B,), position indices (k_T,)), int64, both ascending.
    """
    n_samples, n_positions = norms.shape  # (B, T)
    k_t = probe_count(n_positions, position_fraction, min_positions)
    positions = _top_sorted(torch.linalg.vector_norm(norms, ord=2, dim=0), k_t)  # (k_T,)
    if k_t <= force_first_if_at_most:
        positions[0] = 0
    k_b = probe_count(n_samples, sample_fraction, 1)
    kept = norms[:, positions]  # (B, k_T)
    samples = _top_sorted(torch.linalg.vector_norm(kept, ord=2, dim=1), k_b)  # (k_B,)
    return samples, positions


def probe_channel_energy(acts: Tensor) -> Tensor:
    """Pr[s, j] = sum_b A[b, s, j]^2 / Bp (Sec. 3.2).

    acts: the probe's pre-o_proj or pre-down_proj activations A, (Bp, Tp, C).
    Returns (Tp, C) in float32.
    """
    a = acts.float()  # (Bp, Tp, C)
    return a.pow(2).sum(0) / a.shape[0]  # (Tp, C)


def history_at(history: Tensor, positions: Tensor) -> Tensor:
    """Hs = history[positions], (Tp, C) float32 on the history's device; positions past the
    end of the history read 0."""
    needed = int(positions.max()) + 1 if positions.numel() else 0
    if needed > history.shape[0]:
        history = _extend(history, needed)
    return history.float()[positions.to(history.device)]  # (Tp, C)


def fuse_with_history(probe_energy: Tensor, history: Tensor | None, positions: Tensor) -> Tensor:
    """Fused channel importance C_j = sum_s C_sj over the probe positions (Sec. 3.2).

    probe_energy: Pr (Tp, C); history: H (S, C) or None; positions: (Tp,) probe positions.
    The reference code fuses with a probe weight p = Pr / (Pr + Hs + eps):
        C_sj = (1 - p) Hs + p Pr = (Hs^2 + Pr^2 + eps Hs) / (Pr + Hs + eps),  eps = 1e-6,
    while the paper writes (Hs^2 + Pr^2) / (Pr + Hs + eps); they differ by at most eps.
    The sum runs over the Tp probe positions only. Without a history (the oracle,
    full-batch probing) there is no fusion: C_j = sum_s Pr[s, j]. Returns (C,) float32.
    """
    if history is None:
        return probe_energy.float().sum(0)  # (C,)
    pr = probe_energy.float()  # (Tp, C)
    hs = history_at(history, positions).to(pr.device)  # (Tp, C)
    p = pr / (pr + hs + FUSION_EPS)
    return ((1 - p) * hs + p * pr).sum(0)  # (C,)


def fuse_fixed(probe_energy: Tensor, history: Tensor, positions: Tensor, probe_weight: float) -> Tensor:
    """Fixed fusion weights: C_j = sum_s (a Pr[s, j] + (1 - a) Hs[s, j]), a = probe_weight.

    The reference's `probefixratio` uses this form in attention but swaps the weights in the
    MLP (a Hs + (1 - a) Pr); here both blocks use a for the probe. Returns (C,) float32.
    """
    if not 0 <= probe_weight <= 1:
        raise ValueError(f"probe_weight must be in [0, 1], got {probe_weight}")
    pr = probe_energy.float()  # (Tp, C)
    hs = history_at(history, positions).to(pr.device)  # (Tp, C)
    return (probe_weight * pr + (1 - probe_weight) * hs).sum(0)  # (C,)


def _weighted_squares(c: Tensor, weight: Tensor) -> Tensor:
    """C_j W[i, j]^2 for an nn.Linear weight W (out, in) and C (in,), float32."""
    return c.float().to(weight.device).unsqueeze(0) * weight.float().pow(2)  # (out, in)


def ppsp_channel_scores(c: Tensor, w_down: Tensor) -> Tensor:
    """PPsp of MLP channels (Sec. 3.3): S_j = ||C_j W_down[:, j]^2||_2 = C_j sqrt(sum_i W_down[i, j]^4).

    c: fused importance (d_ff,); w_down: down_proj weight (hidden, d_ff). Returns (d_ff,).
    Equal to C_j ||W[:, j]||_4^2 since C_j >= 0.
    """
    return torch.linalg.vector_norm(_weighted_squares(c, w_down), ord=2, dim=0)  # (d_ff,)


def ppsp_head_scores(c: Tensor, w_o: Tensor, head_dim: int, group_size: int = 1) -> Tensor:
    """PPsp of attention heads (Sec. 3.3): S_h = sqrt(sum_i sum_{j in h} (C_j W_o[i, j]^2)^2).

    c: fused importance (n_q * head_dim,); w_o: o_proj weight (hidden, n_q * head_dim).
    group_size = 1 scores query heads (n_q,), as the reference does (it prunes only query
    heads under grouped-query attention and keeps k/v whole). group_size = n_q / n_kv scores
    kv groups (n_kv,): a group's score is the sum of its query heads' scores.
    """
    hidden, width = w_o.shape
    if width % head_dim:
        raise ValueError(f"o_proj input width {width} is not a multiple of head_dim {head_dim}")
    n_heads = width // head_dim
    if n_heads % group_size:
        raise ValueError(f"{n_heads} query heads do not split into groups of {group_size}")
    per_head = _weighted_squares(c, w_o).view(hidden, n_heads, head_dim)  # (H, n_q, d)
    scores = torch.linalg.vector_norm(per_head, ord=2, dim=(0, 2))  # (n_q,)
    return scores.view(n_heads // group_size, group_size).sum(1)  # (n_q / group_size,)


def column_fourth_moments(weight: Tensor) -> Tensor:
    """w4_j = sum_i W[i, j]^4 of an nn.Linear weight (out, in), float32 (in,): everything PPsp needs
    from o_proj / down_proj, computed once per layer since the weights do not change."""
    return weight.float().pow(2).pow(2).sum(0)  # (in,)


def ppsp_channel_scores_from(c: Tensor, w4: Tensor) -> Tensor:
    """`ppsp_channel_scores` from precomputed moments: S_j = C_j sqrt(w4_j) (C_j >= 0). O(d_ff)."""
    return c.float().to(w4.device) * w4.sqrt()  # (d_ff,)


def ppsp_head_scores_from(c: Tensor, w4: Tensor, head_dim: int, group_size: int = 1) -> Tensor:
    """`ppsp_head_scores` from precomputed moments: S_h = sqrt(sum_{j in h} C_j^2 w4_j), since
    sum_i (C_j W_ij^2)^2 = C_j^2 w4_j. Query heads, or kv groups (sum of their heads' scores)."""
    width = w4.numel()
    if width % head_dim:
        raise ValueError(f"o_proj input width {width} is not a multiple of head_dim {head_dim}")
    n_heads = width // head_dim
    if n_heads % group_size:
        raise ValueError(f"{n_heads} query heads do not split into groups of {group_size}")
    per_head = (c.float().to(w4.device).pow(2) * w4).view(n_heads, head_dim).sum(1).sqrt()  # (n_q,)
    return per_head.view(n_heads // group_size, group_size).sum(1)


def keep_count(n: int, ratio: float, multiple: int = 1) -> int:
    """Units kept out of n at pruning ratio r: floor((1 - r) n + 0.5) (round half up), at least 1.

    multiple > 1 rounds the kept count up to a multiple (capped at n), like the reference's
    tensor-core rounding of MLP channels (64). The reference itself keeps n - int(r n).
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    k = max(1, math.floor((1 - ratio) * n + 0.5))
    return min(n, multiple * math.ceil(k / multiple))


def keep_indices(scores: Tensor, ratio: float, multiple: int = 1) -> Tensor:
    """Indices of the `keep_count(n, ratio, multiple)` highest scores, sorted ascending.

    scores: (n,). Ties go to the lower index. Returns int64 (k,).
    """
    return _top_sorted(scores.float(), keep_count(scores.numel(), ratio, multiple))


def redistributed_ratio(ratio: float, n_layers: int, skipped: int, decimals: int | None = None) -> float:
    """Per-layer ratio when `skipped` layers stay dense: r' = L / (L - skipped) * r.

    The reference skips layers 0-2 and rounds r' to 2 decimals (decimals=2 reproduces it);
    None keeps r' exact. Raises ValueError when r' >= 1 (the ratio cannot be reached).
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if not 0 <= skipped < n_layers:
        raise ValueError(f"cannot skip {skipped} of {n_layers} layers: at least one must be pruned")
    r = n_layers / (n_layers - skipped) * ratio
    if decimals is not None:
        r = round(r, decimals)
    if r >= 1:
        reachable = (n_layers - skipped) / n_layers
        raise ValueError(f"ratio {ratio} is unreachable with {skipped} of {n_layers} layers skipped: "
                         f"the pruned layers would need {r:.3f} >= 1 (the ratio must be below {reachable:.3f})")
    return r


def _extend(history: Tensor, length: int) -> Tensor:
    """History padded with zero rows to `length` positions, (length, C)."""
    pad = history.new_zeros(length - history.shape[0], history.shape[1])
    return torch.cat([history, pad], 0)


def update_history(history: Tensor, acts: Tensor, kept_channels: Tensor, momentum: float = 0.99) -> Tensor:
    """EMA history update after the pruned forward (Sec. 3.2), on kept channels only:

        H[s, j] <- m H[s, j] + (1 - m) mean_b x[b, s, j]^2,  s < T, j in kept_channels.

    history: (S, C); acts: the pruned layer's input x (B, T, K), column k holding channel
    kept_channels[k] (the sliced o_proj/down_proj input); kept_channels: (K,) distinct.
    Pruned channels and positions >= T are unchanged. A batch longer than the history
    (T > S) first extends it with zero rows, which is what the reference's zero-filled
    max-length buffer holds at unseen positions. Returns a new (max(S, T), C) tensor.
    """
    if acts.shape[-1] != kept_channels.numel():
        raise ValueError(f"acts hold {acts.shape[-1]} channels but {kept_channels.numel()} are kept")
    if kept_channels.unique().numel() != kept_channels.numel():
        raise ValueError("kept_channels has repeated entries")
    t = acts.shape[1]
    new = _extend(history, t) if t > history.shape[0] else history.clone()  # (max(S, T), C)
    kept = kept_channels.to(new.device)
    energy = acts.float().pow(2).mean(0).to(new.device)  # (T, K)
    old = new[:t, kept].float()  # (T, K)
    new[:t, kept] = (momentum * old + (1 - momentum) * energy).to(new.dtype)
    return new


def accumulate_squares(state: tuple[Tensor, Tensor] | None, acts: Tensor) -> tuple[Tensor, Tensor]:
    """Running sums behind `calibration_history`: state = (sum_b x[b, s, j]^2 (S, C), samples reaching s (S,)).

    state: None (nothing seen yet) or an earlier return value; acts: one batch (B, T, C) of the
    o_proj / down_proj input. Longer batches extend the sums with zero rows. Returns the new state.
    """
    sq = acts.float().pow(2).sum(0)  # (T, C)
    n = torch.full((sq.shape[0],), acts.shape[0], dtype=torch.float32, device=sq.device)
    if state is None:
        return sq, n
    total, count = state
    if sq.shape[1] != total.shape[1]:
        raise ValueError(f"calibration batches disagree on channels: {sq.shape[1]} vs {total.shape[1]}")
    length = max(total.shape[0], sq.shape[0])
    total, sq = _extend(total, length), _extend(sq.to(total.device), length)
    count = torch.cat([count, count.new_zeros(length - count.numel())])
    count[: n.numel()] += n.to(count.device)
    return total + sq, count


def history_from(state: tuple[Tensor, Tensor]) -> Tensor:
    """H[s, j] = sum_b x[b, s, j]^2 / (samples reaching s), from `accumulate_squares`'s state."""
    total, count = state
    return total / count.unsqueeze(1)  # (S, C)


def calibration_history(acts_list: Iterable[Tensor]) -> Tensor:
    """History from dense calibration activations: H[s, j] = mean_b x[b, s, j]^2 (Sec. 3.2).

    acts_list: batches (B_i, T_i, C) of the o_proj / down_proj input. The mean at position s
    is over every sample that reaches s, so batches may differ in length; the result has
    max_i T_i rows. (The reference keeps one sample count per channel, which equals this
    when all windows have the same length.) Returns (max T, C) float32.
    """
    state = None
    for acts in acts_list:
        state = accumulate_squares(state, acts)
    if state is None:
        raise ValueError("calibration_history needs at least one batch of activations")
    return history_from(state)


def probe_attention_output(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, scaling: float,
                           sliding_window: int | None = None, softcap: float | None = None) -> Tensor:
    """Attention among the probe tokens only, at their true positions (Sec. 3.1, "probing").

    q: (Bp, n_q, Tp, d) and k, v: (Bp, n_kv, Tp, d), already projected, normed and rotated
    (RoPE at the true positions); positions: (Tp,) true positions, ascending. Token i attends
    to token j when p_j <= p_i (causal among the probe tokens) and, with a sliding window w,
    p_i - p_j < w. Scores q k^T * scaling, capped as tanh(s / c) c when softcap = c, softmax
    in float32. k and v are repeated per query head (grouped-query attention). Returns the
    pre-o_proj activation (Bp, Tp, n_q * d), head-major like the model's.
    """
    b, n_q, t, d = q.shape
    group = n_q // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (Bp, n_q, Tp, d)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # (Bp, n_q, Tp, Tp)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    pos = positions.to(q.device)
    gap = pos.unsqueeze(1) - pos.unsqueeze(0)  # (Tp, Tp): p_i - p_j
    allowed = gap >= 0
    if sliding_window is not None:
        allowed = allowed & (gap < sliding_window)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)  # (Bp, n_q, Tp, d)
    return out.transpose(1, 2).reshape(b, t, n_q * d)


def _attention_flops(batch: int, seqlen: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                     with_o_proj: bool) -> dict[str, int]:
    tokens = batch * seqlen
    proj = 2 * tokens * hidden * (heads + 2 * kv_heads) * head_dim  # q, k, v
    if with_o_proj:
        proj += 2 * tokens * heads * head_dim * hidden  # o
    scores = 2 * 2 * batch * heads * seqlen * seqlen * head_dim  # Q K^T and P V
    return {"attn_proj": proj, "attn_scores": scores}


def dense_flops(batch: int, seqlen: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                d_ff: int) -> dict[str, int]:
    """FLOPs of one decoder layer's forward, 2 per multiply-add.

    attn_proj:   2 B T H (n_q + 2 n_kv) d  (q, k, v)  +  2 B T n_q d H  (o)
    attn_scores: 2 * 2 B n_q T^2 d  (Q K^T and P V over the full T x T, k/v repeated per query head)
    mlp:         3 * 2 B T H d_ff  (gate, up, down)
    Norms, softmax, RoPE and elementwise products are left out. Passing the kept heads and
    d_ff counts the pruned forward. Returns the parts and their 'total'.
    """
    parts = _attention_flops(batch, seqlen, hidden, heads, kv_heads, head_dim, with_o_proj=True)
    parts["mlp"] = 3 * 2 * batch * seqlen * hidden * d_ff
    parts["total"] = sum(parts.values())
    return parts


def probe_flops(batch: int, seqlen: int, probe_batch: int, probe_positions: int, hidden: int, heads: int,
                kv_heads: int, head_dim: int, d_ff: int) -> dict[str, int]:
    """FLOPs of probing one decoder layer (attention and MLP probes), 2 per multiply-add.

    selection:   2 * 2 B T H  (residual norms over the whole batch, before each block)
    attn_proj:   2 Bp Tp H (n_q + 2 n_kv) d  (q, k, v; o_proj is not run on the probe)
    attn_scores: 2 * 2 Bp n_q Tp^2 d  (causal among the probe tokens, counted full)
    mlp:         2 * 2 Bp Tp H d_ff  (gate, up; down_proj is not run on the probe)
    The PPsp scoring and fusion (O(weights + Tp C), independent of the batch) are left out,
    as in the reference's profiler count. Returns the parts and their 'total'.
    """
    parts = {"selection": 2 * 2 * batch * seqlen * hidden}
    parts.update(_attention_flops(probe_batch, probe_positions, hidden, heads, kv_heads, head_dim,
                                  with_o_proj=False))
    parts["mlp"] = 2 * 2 * probe_batch * probe_positions * hidden * d_ff
    parts["total"] = sum(parts.values())
    return parts
