"""Masks for unstructured and N:M sparsity of a linear weight W (d_out, d_in), pure tensor math.

A mask is a bool tensor shaped like W: True = the weight is kept, False = it is pruned.

Scores (larger = more important):
- magnitude: |W_ij|
- Wanda (Sun et al., arXiv 2306.11695): |W_ij| * ||X_j||_2, X the layer's input over the
  calibration tokens; ||X_j||_2^2 = sum_tokens x_j^2 is the diagonal of the Gram matrix X^T X.
  Wanda compares scores within each output row (`per_row=True`).

Counting: a target sparsity s removes exactly floor(s * count + 1e-6) entries of `count`
(the whole matrix, or each row with `per_row`). Floor is what the reference implementations
do (`int(numel * s)`); the 1e-6 keeps a product such as 0.29 * 100 = 28.999999999999996 from
rounding down to 28. Ties are broken by position (stable sort), so counts are exact even when
many scores are equal.

N:M sparsity "n:m" keeps the n largest scores of every m consecutive input columns of each row
(NVIDIA's convention: 2:4 = 2 non-zeros in every group of 4). The Wanda / SparseGPT code calls
its argument `prune_n` and removes that many per group; with n = m/2 (2:4, 4:8) it is the same.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PrunerError

COUNT_EPS = 1e-6


@dataclass(frozen=True)
class SparsityType:
    """"unstructured" (n = m = 0) or N:M (keep n of every m consecutive input columns)."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def nm_sparsity(self) -> float:
        """The fraction an N:M pattern removes, 1 - n/m (0 for unstructured)."""
        return 1.0 - self.n / self.m if self.is_nm else 0.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


UNSTRUCTURED = SparsityType()


def parse_sparsity_type(text: str | SparsityType) -> SparsityType:
    """"unstructured", "2:4", "4:8" or any "N:M" with 0 < N < M -> SparsityType."""
    if isinstance(text, SparsityType):
        return text
    spec = text.strip().lower()
    if spec == "unstructured":
        return UNSTRUCTURED
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", spec)
    if match is None:
        raise PrunerError(f"unknown sparsity type {text!r}: use 'unstructured' or 'N:M' such as '2:4' or '4:8'")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise PrunerError(f"sparsity type {text!r}: N:M needs 0 < N < M (keep N of every M weights)")
    return SparsityType(n, m)


def resolve_sparsity(sparsity: float | None, sparsity_type: SparsityType) -> float:
    """The target fraction removed: `sparsity` for unstructured, 1 - n/m for N:M (where a given
    `sparsity` must agree with it)."""
    if sparsity_type.is_nm:
        target = sparsity_type.nm_sparsity
        if sparsity is not None and not math.isclose(sparsity, target, abs_tol=1e-6):
            raise PrunerError(f"sparsity {sparsity} does not match {sparsity_type} (which removes {target:g})")
        return target
    if sparsity is None:
        raise PrunerError("unstructured sparsity needs a target sparsity in [0, 1]")
    check_sparsity(sparsity)
    return float(sparsity)


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise PrunerError(f"sparsity must lie in [0, 1], got {sparsity}")


def prune_count(sparsity: float, count: int) -> int:
    """How many of `count` entries a sparsity removes: floor(sparsity * count + 1e-6), see the module doc."""
    return min(count, math.floor(sparsity * count + COUNT_EPS))


def magnitude_scores(weight: Tensor) -> Tensor:
    """|W|, (d_out, d_in)."""
    return weight.abs()


def wanda_scores(weight: Tensor, x_sq_norm: Tensor) -> Tensor:
    """Wanda: |W_ij| * ||X_j||_2, with x_sq_norm = ||X_j||_2^2 = diag(X^T X), (d_in,).

    Returns (d_out, d_in) in float64 (the product of a small weight and a large norm
    keeps its precision for ranking)."""
    norms = x_sq_norm.double().clamp(min=0).sqrt().to(weight.device)  # (d_in,)
    return weight.double().abs() * norms.unsqueeze(0)


def unstructured_mask(scores: Tensor, sparsity: float, per_row: bool = False) -> Tensor:
    """Keep-mask removing the floor(sparsity * count) smallest scores, over the whole matrix or,
    with `per_row`, within each output row (count = d_in). Exact counts, ties by position."""
    check_sparsity(sparsity)
    if scores.dim() != 2:
        raise PrunerError(f"scores must be a (d_out, d_in) matrix, got shape {tuple(scores.shape)}")
    if per_row:
        return _without_smallest(scores, prune_count(sparsity, scores.shape[1]))
    return _without_smallest(scores.flatten(), prune_count(sparsity, scores.numel())).view_as(scores)


def _without_smallest(scores: Tensor, k: int) -> Tensor:
    """Keep-mask over the last dimension removing the k smallest entries of each row, exactly what
    a stable ascending sort would remove first: everything below the k-th smallest value t, then
    the earliest entries equal to t. A selection (kthvalue) instead of a sort: several times faster
    on large matrices, which matters when ADMM re-selects its mask every iteration."""
    n = scores.shape[-1]
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, k, dim=-1, keepdim=True).values  # (..., 1)
    below = scores < threshold
    ties = scores == threshold
    need = k - below.sum(-1, keepdim=True)  # ties to remove, >= 1
    removed = below | (ties & (torch.cumsum(ties, dim=-1) <= need))
    return ~removed


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep-mask with the n largest scores of every m consecutive input columns of each row."""
    if scores.dim() != 2:
        raise PrunerError(f"scores must be a (d_out, d_in) matrix, got shape {tuple(scores.shape)}")
    if not 0 < n <= m:
        raise PrunerError(f"N:M needs 0 < N <= M, got {n}:{m}")
    d_out, d_in = scores.shape
    if d_in % m != 0:
        raise PrunerError(f"{n}:{m} sparsity needs the input dimension ({d_in}) to be a multiple of {m}")
    groups = scores.reshape(d_out, d_in // m, m)  # (d_out, d_in/m, m)
    order = torch.argsort(groups, dim=2, descending=True, stable=True)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[..., :n], True)
    return mask.view(d_out, d_in)


def nm_ramp_mask(scores: Tensor, n: int, m: int, sparsity: float, per_row: bool = False) -> Tensor:
    """A mask on the way to N:M (gradual pruning): the N:M mask of `scores` is always kept, and of
    the other entries the largest are kept too, so that floor(sparsity * count) are removed.
    At sparsity = 1 - n/m it is the N:M mask itself. This is how the released ADMM code ramps
    its 2:4 masks (it counts over the whole matrix; `per_row` counts within each row)."""
    target = 1 - n / m
    if sparsity > target + 1e-9:
        raise PrunerError(f"a ramp towards {n}:{m} cannot remove more than {target:g}, got {sparsity}")
    protected = nm_mask(scores, n, m)
    if sparsity >= target - 1e-12:  # the end of the ramp: exactly N:M, whatever the float count says
        return protected
    lifted = scores.masked_fill(protected, math.inf)  # the N:M survivors are never removed
    return unstructured_mask(lifted, sparsity, per_row)


def select_mask(scores: Tensor, sparsity: float | None, sparsity_type: str | SparsityType,
                per_row: bool = False) -> Tensor:
    """The keep-mask of a sparsity type: unstructured (whole matrix or per row) or N:M."""
    kind = parse_sparsity_type(sparsity_type)
    if kind.is_nm:
        resolve_sparsity(sparsity, kind)
        return nm_mask(scores, kind.n, kind.m)
    return unstructured_mask(scores, resolve_sparsity(sparsity, kind), per_row)
