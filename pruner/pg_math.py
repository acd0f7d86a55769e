"""Policy-gradient mask learning, the pure math (Gao et al., arXiv 2406.10576, Sec. 3).

Each unit i has a keep probability s_i in [0, 1]; masks m ~ Bernoulli(s). The loss of the
masked model L(m) is scored with forward passes only, and

    grad_s E[L(m)] = E[(L(m) - delta) * d log p(m|s) / ds],   d log p / ds = (m - s) / (s (1 - s)),

where the baseline delta does not change the expectation. The reference implementation
divides by sqrt(s (1 - s)) instead (a rescaled, still low-variance direction); both are here.

Antithetic sampling draws the K masks in pairs from one uniform u: m = 1[u < s], m~ = 1[1 - u < s],
and scores each pair with DisARM (Dong, Mnih & Tucker, NeurIPS 2020), which needs no baseline.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ESTIMATORS = ("reference", "exact")
BASELINES = ("moving", "loo", "none")
INITS = ("sigmap", "const", "norm", "mask", "random")
SAMPLINGS = ("independent", "antithetic")


def sample_masks(s: Tensor, k: int, generator: torch.Generator, sampling: str = "independent") -> Tensor:
    """K Bernoulli(s) masks, (K, N) float 0/1, drawn from `generator`.

    independent: K draws u_j ~ U(0, 1)^N, m_j = 1[u_j < s].
    antithetic:  K/2 draws u_j; rows 2j and 2j+1 are the pair 1[u_j < s], 1[1 - u_j < s]
                 (each row still Bernoulli(s); a pair disagrees on a unit with probability
                 2 min(s, 1 - s), the most two Bernoulli(s) draws can).
    """
    if sampling == "independent":
        u = torch.rand((k, s.numel()), generator=generator, dtype=torch.float64)
        return (u < s.double().unsqueeze(0)).to(s.dtype)
    if sampling == "antithetic":
        if k % 2:
            raise ValueError(f"antithetic sampling draws masks in pairs: K must be even, not {k}")
        u = torch.rand((k // 2, s.numel()), generator=generator, dtype=torch.float64)
        p = s.double().unsqueeze(0)
        return torch.stack([u < p, 1 - u < p], dim=1).reshape(k, s.numel()).to(s.dtype)
    raise ValueError(f"unknown sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")


def score_function(m: Tensor, s: Tensor, estimator: str = "reference", eps: float = 1e-8) -> Tensor:
    """d log Bernoulli(m | s) / ds, per unit.

    exact:     (m - s) / (s (1 - s) + eps)
    reference: (m - s) / sqrt(s (1 - s) + eps)       (the public reference code)
    """
    var = s * (1 - s) + eps
    if estimator == "exact":
        return (m - s) / var
    if estimator == "reference":
        return (m - s) / var.sqrt()
    raise ValueError(f"unknown estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")


def update_baseline(delta: float | None, losses: Tensor, window: int) -> float:
    """Moving-average baseline: the mean loss on the first step, then
    delta <- (1 - 1/T) delta + (1/T) mean(losses). Updated before the gradient is formed."""
    mean = float(losses.mean())
    if delta is None:
        return mean
    return (1 - 1 / window) * delta + mean / window


def per_sample_gradients(losses: Tensor, masks: Tensor, s: Tensor, baseline: float,
                         estimator: str = "reference") -> Tensor:
    """(K, N): sample j's estimate (L_j - delta) * score(m_j, s)."""
    return (losses - baseline).unsqueeze(1).to(s.dtype) * score_function(masks, s, estimator)


def policy_gradient(losses: Tensor, masks: Tensor, s: Tensor, baseline: float,
                    estimator: str = "reference") -> Tensor:
    """g = 1/(K-1) sum_j (L_j - delta) score(m_j, s), as in the reference scripts (K >= 2)."""
    k = losses.numel()
    return per_sample_gradients(losses, masks, s, baseline, estimator).sum(0) / max(k - 1, 1)


def disarm_gradients(losses: Tensor, masks: Tensor, s: Tensor, estimator: str = "reference",
                     eps: float = 1e-8) -> Tensor:
    """(K/2, N): one DisARM estimate of dE[L]/ds per antithetic pair (rows 2j, 2j+1 of `masks`).

    DisARM (Dong et al. 2020, eq. 6) in the logits a, s = sigmoid(a), for the pair b, b~:
        g_a = 1/2 (L(b) - L(b~)) (b - b~) sigmoid(|a|),      sigmoid(|a|) = max(s, 1 - s)
    and ds/da = s (1 - s), so
        exact:     g_s = 1/2 (L(b) - L(b~)) (b - b~) max(s, 1 - s) / (s (1 - s) + eps)
        reference: the same times sqrt(s (1 - s)), as the reference score scales each unit.
    Unbiased for any L; no baseline (the pair's difference cancels any shift of the loss).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    b, b_anti = masks[0::2], masks[1::2]
    diff = 0.5 * (losses[0::2] - losses[1::2]).to(s.dtype).unsqueeze(1)
    var = s * (1 - s) + eps
    scale = torch.maximum(s, 1 - s) / (var if estimator == "exact" else var.sqrt())
    return diff * (b - b_anti) * scale


def gradient_variance(per_sample: Tensor) -> float | None:
    """Spread of the estimate: mean over units of the unbiased sample variance across the
    per-sample (or per-pair) estimates, (1/N) sum_i 1/(K-1) sum_j (g_ji - mean_j g_ji)^2;
    None from a single estimate (one antithetic pair), where it cannot be measured."""
    if per_sample.shape[0] < 2:
        return None
    return float(per_sample.double().var(0, unbiased=True).mean())


def mean_square(per_sample: Tensor) -> float:
    """(1/(K N)) sum_j sum_i g_ji^2 over the per-sample (or per-pair) estimates: their spread around
    zero, defined from a single estimate too; close to their variance where the signal is small."""
    return float(per_sample.double().pow(2).mean())


def log_odds_penalty(s: Tensor, eps: float = 1e-6) -> Tensor:
    """Gradient term lambda_t * (log(1 - s) - log s): pushes probabilities toward 0 or 1."""
    s = s.clamp(eps, 1 - eps)
    return torch.log1p(-s) - torch.log(s)


def cosine_lr(step: int, total: int, lr0: float) -> float:
    """Cosine decay from lr0 at step 0 to 0 at step `total`, no warm-up."""
    return 0.5 * lr0 * (1 + math.cos(math.pi * min(step, total) / total))


def project(s: Tensor, budget: float, costs: Tensor | None = None, tol: float = 1e-3, iters: int = 60,
            lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Euclidean projection of s onto {lo <= s <= hi, sum c_i s_i <= budget}.

    If sum c_i clip(s_i, lo, hi) <= budget, the answer is clip(s, lo, hi); otherwise
    s_i = clip(s_i - v c_i, lo, hi) with v >= 0 found by bisection so that the weighted sum
    meets the budget (|sum - budget| <= tol * max cost). With c = 1, lo = 0, hi = 1 this is the
    reference's projection with k = budget units; lo > 0 keeps every unit explorable (a unit
    at exactly 0 is never sampled again and its score is 0 forever).
    """
    costs = torch.ones_like(s) if costs is None else costs.to(s.dtype)
    clipped = s.clamp(lo, hi)
    if float((clipped * costs).sum()) <= budget:
        return clipped
    v_lo, v_hi = 0.0, float(((s - lo) / costs).max().clamp(min=0)) + 1.0
    target_tol = tol * float(costs.max())
    for _ in range(iters):
        v = 0.5 * (v_lo + v_hi)
        total = float(((s - v * costs).clamp(lo, hi) * costs).sum())
        if abs(total - budget) <= target_tol:
            break
        v_lo, v_hi = (v, v_hi) if total > budget else (v_lo, v)
    return (s - v * costs).clamp(lo, hi)


def init_probs(metric: Tensor, keep: float, method: str = "sigmap", const: float = 0.9,
               generator: torch.Generator | None = None) -> Tensor:
    """Initial keep probabilities of one layer's units from a metric (higher = more important).

    sigmap: z = standardised metric; s = clip(sigmoid(z) - mean(sigmoid(z)) + keep, 0, 1)
    const:  c for the top keep-fraction units, 1 - c for the rest
    norm:   min-max to [0, 1], then shift the mean to keep, clipped
    mask:   `metric` holds a method's own keep decisions (1 kept, 0 removed), so the search starts
            from that method's mask (its allocation across layers and kinds); with d = 2c - 1,
            s = keep + (1 - keep) d where kept and keep - keep d where removed (c and 1 - c at
            keep 0.5): the mean is keep when the mask keeps that fraction, so projecting onto the
            budget hardly moves s and kept units stay above removed ones
    random: uniform(0, 1) shifted to mean keep, clipped (the metric is ignored)
    """
    metric = metric.double()
    if method == "sigmap":
        z = (metric - metric.mean()) / (metric.std(unbiased=False) + 1e-12)
        sig = torch.sigmoid(z)
        return (sig - sig.mean() + keep).clamp(0, 1)
    if method == "const":
        n_keep = round(keep * metric.numel())
        s = torch.full_like(metric, 1 - const)
        if n_keep:
            s[torch.topk(metric, n_keep).indices] = const
        return s
    if method == "mask":
        d = 2 * const - 1
        return torch.where(metric > 0.5, keep + (1 - keep) * d, keep - keep * d).double()
    if method == "norm":
        span = metric.max() - metric.min()
        x = (metric - metric.min()) / span if span > 0 else torch.full_like(metric, 0.5)
        return (x - x.mean() + keep).clamp(0, 1)
    if method == "random":
        u = torch.rand(metric.numel(), generator=generator, dtype=torch.float64)
        return (u - u.mean() + keep).clamp(0, 1)
    raise ValueError(f"unknown init {method!r}: choose one of {', '.join(INITS)}")


def entropy(s: Tensor, eps: float = 1e-12) -> float:
    """Mean Bernoulli entropy in nats: 0 when every unit is decided, log 2 at s = 0.5."""
    s = s.double().clamp(eps, 1 - eps)
    return float((-(s * s.log()) - (1 - s) * (1 - s).log()).mean())


def pg_step(s: Tensor, masks: Tensor, losses: Tensor, baseline: float | None, lr: float, *,
            estimator: str = "reference", window: int = 5, baseline_kind: str = "moving", penalty: float = 0.0,
            lr0: float | None = None, sampling: str = "independent") -> tuple[Tensor, float | None, Tensor]:
    """One update of the keep probabilities, before the budget projection, as a run composes it.

        delta <- update_baseline(delta, L, T)                (the moving average, always tracked)
        independent masks:
            c  = delta (moving) | mean_j L_j (loo) | 0 (none)
            g  = 1/(K-1) sum_j (L_j - c) score(m_j, s)        (policy_gradient)
        antithetic pairs:
            g  = 2/K sum_pairs disarm(pair)                   (disarm_gradients; no baseline)
        g     += (lr / lr0) * penalty * (log(1-s) - log s)
        s     <- s - lr g

    Returns (new s, new delta, the per-sample (or per-pair) terms). Expected step, for the exact
    score (the reference score scales each unit by sqrt(s(1-s)) as well):
    - moving: delta already holds this step's mean loss with weight 1/T, so
      E[g] = (K - 1/T) / (K - 1) * dE[L]/ds (1.8x at K=2, T=5; the reference scripts);
    - loo: c is this step's mean, and 1/(K-1) sum_j (L_j - mean L) = 1/K sum_j (L_j - mean of the
      others): the leave-one-out baseline, E[g] = dE[L]/ds exactly;
    - none: E[g] = K / (K - 1) * dE[L]/ds;
    - antithetic: E[g] = dE[L]/ds exactly, whatever the baseline knob says.
    The K sampled losses must be finite.
    """
    if baseline_kind not in BASELINES:
        raise ValueError(f"unknown baseline {baseline_kind!r}: choose one of {', '.join(BASELINES)}")
    delta = update_baseline(baseline, losses, window)
    if sampling == "antithetic":
        per_sample = disarm_gradients(losses, masks, s, estimator)
        grad = per_sample.mean(0)
    elif sampling == "independent":
        centre = {"moving": delta, "loo": float(losses.mean()), "none": 0.0}[baseline_kind]
        per_sample = per_sample_gradients(losses, masks, s, centre, estimator)
        grad = policy_gradient(losses, masks, s, centre, estimator)
    else:
        raise ValueError(f"unknown sampling {sampling!r}: choose one of {', '.join(SAMPLINGS)}")
    if penalty:
        grad = grad + (lr / (lr0 or lr)) * penalty * log_odds_penalty(s)
    return s - lr * grad, delta, per_sample
