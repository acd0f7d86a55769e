"""Layer-wise weight reconstruction after pruning, pure tensor math.

A linear layer y = W x has W (d_out, d_in). Over the calibration tokens its inputs form
X (tokens, d_in) and their Gram matrix G = X^T X = sum_tokens x x^T (d_in, d_in). Every method
here only sees W and G (plus sum x and the token count for an intercept) and minimises, over
pruned weights W', the output error

    ||X W'^T - X W^T||_F^2 = tr((W' - W) G (W' - W)^T).

Methods:
- `admm_update`: ADMM with gradual mask selection (Boza, arXiv 2401.02938: its ADMM
  weight update and gradual pruning; our notes, algorithms.md Sec. 3).
- `admm_fixed_mask`: the same iterations for a mask chosen elsewhere (Wanda, a structured mask).
- `least_squares_on_support`: the direct solve per output row that ADMM converges to.
- `refit_kept_columns`: least squares with an intercept after removing whole input columns;
  `admm_refit_columns` the same problem by the fixed-mask ADMM iterations.
- `sparsegpt_prune`: SparseGPT (Frantar & Alistarh, arXiv 2301.00774, Alg. 1).
- `relative_output_error`: the error above divided by ||X W^T||_F^2, from G alone.

Precision: everything is computed in float64 on the weight's device (the Gram matrix is
usually accumulated in fp32; its inverse and the iterates lose digits in fp32 on ill-conditioned
inputs) and returned in the weight's dtype. Memory: a few (d_in, d_in) float64 matrices.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .errors import PrunerError
from .sparsity_masks import (
    SparsityType,
    nm_mask,
    nm_ramp_mask,
    parse_sparsity_type,
    resolve_sparsity,
    unstructured_mask,
)

NORM_EPS = 1e-8  # n = sqrt(diag G) + 1e-8, as in the paper's code


# ----------------------------------------------------------------------------- shared helpers

def _as_f64(t: Tensor, device: torch.device) -> Tensor:
    return t.detach().to(device=device, dtype=torch.float64)


def _check_shapes(weight: Tensor, gram: Tensor, mask: Tensor | None = None) -> None:
    if weight.dim() != 2:
        raise PrunerError(f"weight must be (d_out, d_in), got shape {tuple(weight.shape)}")
    d_in = weight.shape[1]
    if tuple(gram.shape) != (d_in, d_in):
        raise PrunerError(f"gram must be ({d_in}, {d_in}) for a weight of shape {tuple(weight.shape)}, "
                          f"got {tuple(gram.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(weight.shape):
        raise PrunerError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")


def _spd_inverse(a: Tensor) -> Tensor:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor."""
    return torch.cholesky_inverse(torch.linalg.cholesky(a))


def _solve_psd(a: Tensor, rhs: Tensor) -> Tensor:
    """a^-1 rhs for symmetric positive semi-definite a: Cholesky where a is definite, else the
    minimum-norm solution through the pseudo-inverse (an undamped, rank-deficient support)."""
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.pinv(a, hermitian=True) @ rhs


def _normalised_problem(weight: Tensor, gram: Tensor, damp: float) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's normalisation and damping (algorithms.md Sec. 3):

        n = sqrt(diag G) + 1e-8,  D = diag(n),  G_n = D^-1 G D^-1   (unit diagonal)
        V0 = (W D)^T              (|V0| is the Wanda score, transposed)
        G_n <- G_n + damp * mean(diag G_n) * I

    In the original units the damping adds damp * mean(diag G_n) * diag(G): each input is
    damped in proportion to its own energy. Returns V0 (d_in, d_out), damped G_n (d_in, d_in)
    and n (d_in,), all float64.
    """
    w = _as_f64(weight, weight.device)  # (d_out, d_in)
    g = _as_f64(gram, weight.device)  # (d_in, d_in)
    norm = g.diagonal().clamp(min=0).sqrt() + NORM_EPS  # (d_in,)
    g_n = g / norm.unsqueeze(0) / norm.unsqueeze(1)  # (d_in, d_in)
    g_n.diagonal().add_(damp * g_n.diagonal().mean())
    v0 = (w * norm.unsqueeze(0)).T.contiguous()  # (d_in, d_out)
    return v0, g_n, norm


def _denormalise(v: Tensor, norm: Tensor, dtype: torch.dtype) -> Tensor:
    """W = (V D^-1)^T: (d_in, d_out) normalised -> (d_out, d_in) in `dtype`."""
    return (v / norm.unsqueeze(1)).T.to(dtype)


def _check_admm_args(iterations: int, rho: float, damp: float) -> None:
    if iterations < 0:
        raise PrunerError(f"ADMM iterations must be >= 0, got {iterations}")
    if rho <= 0:
        raise PrunerError(f"ADMM penalty rho must be > 0, got {rho}")
    if damp < 0:
        raise PrunerError(f"damping must be >= 0, got {damp}")


# ----------------------------------------------------------------------------- ADMM

MaskRule = Callable[[int, Tensor, Tensor], Tensor]


def _admm_iterations(v0: Tensor, g_n: Tensor, mask_t: Tensor, iterations: int, rho: float,
                     choose_mask: MaskRule, b: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The paper's ADMM iterations (algorithms.md Sec. 3), in normalised coordinates.

    Problem: min_V (V - V0)^T G_n (V - V0)  s.t.  V = Z, Z zero outside the mask M
    (or, with `b` given, min_V V^T G_n V - 2 V^T b, whose minimiser solves G_n V = b).
        B = G_n V0 (or b);  Ginv = (G_n + rho I)^-1   (one inverse, rho fixed)
        U = 0;  V = V0
        repeat: M <- choose_mask(t, V + U, M)
                Z = (V + U) * M;  U = U + V - Z;  V = Ginv (B + rho (Z - U))
        return Z = (V + U) * M
    `mask_t` and the returned mask are (d_in, d_out), like V.
    """
    b = g_n @ v0 if b is None else b  # (d_in, d_out)
    ginv = _spd_inverse(g_n + rho * torch.eye(g_n.shape[0], dtype=g_n.dtype, device=g_n.device))
    u = torch.zeros_like(v0)  # (d_in, d_out)
    v = v0.clone()
    mask = mask_t
    for t in range(iterations):
        mask = choose_mask(t, v + u, mask)
        z = (v + u) * mask
        u = u + v - z
        v = ginv @ (b + rho * (z - u))
    return (v + u) * mask, mask


def ramp_sparsity(target: float, t: int, ramp_iters: int) -> float:
    """The paper's cubic schedule for gradual pruning: s_t = s - s (1 - (t+1)/ramp)^3 for
    t < ramp, so s_0 is small and s_{ramp-1} = s."""
    return target - target * (1.0 - (t + 1) / ramp_iters) ** 3


def _select_on(scores_t: Tensor, sparsity: float, kind: SparsityType, per_row: bool) -> Tensor:
    """Keep-mask at `sparsity` chosen on scores laid out like V, (d_in, d_out)."""
    scores = scores_t.T  # (d_out, d_in)
    if kind.is_nm:
        mask = nm_ramp_mask(scores, kind.n, kind.m, sparsity, per_row)
    else:
        mask = unstructured_mask(scores, sparsity, per_row)
    return mask.T


def admm_update(weight: Tensor, gram: Tensor, sparsity: float | None,
                sparsity_type: str | SparsityType = "unstructured", iterations: int = 20,
                rho: float = 1.0, damp: float = 0.1, gradual: bool = True, ramp_iters: int = 15,
                reselect: bool = False, per_row: bool = False) -> tuple[Tensor, Tensor]:
    """Prune W to `sparsity` and update the kept weights by ADMM (Boza, arXiv 2401.02938).

    Normalisation and damping as in `_normalised_problem` (n = sqrt(diag G) + 1e-8, damping
    `damp` * mean(diag G_n)), one inverse (G_n + rho I)^-1, then `iterations` rounds of
    Z = (V + U) * M;  U = U + V - Z;  V = (G_n + rho I)^-1 (G_n V0 + rho (Z - U)),
    and finally W = ((V + U) * M D^-1)^T.

    Mask selection, always on |V + U| (at t = 0 that is |V0|, the Wanda score):
    - gradual=True, reselect=False (the paper's gradual pruning): at iterations t < ramp_iters the mask
      is re-chosen at the cubic ramp s_t = s - s (1 - (t+1)/ramp_iters)^3 (`ramp_sparsity`),
      which reaches s at t = ramp_iters - 1; later iterations keep it fixed. For N:M the
      intermediate masks keep the current N:M survivors plus the largest other entries
      (`nm_ramp_mask`), so the last one is exactly N:M.
    - gradual=True, reselect=True (the released code, lib/admm.py, unstructured branch): it
      computes the ramp value but selects with the *full* target sparsity, so at every
      t < ramp_iters the mask is re-chosen at sparsity s on |V + U|; there is no ramp, only
      re-selection. For N:M we re-select the exact N:M mask each time. (The released code's
      N:M branch always ramps, as gradual=True, reselect=False does here, but hard-codes 2:4
      groups and sparsity 0.5 whatever N:M was asked; its per-row `per_out` branch ramps too.)
    - gradual=False: one mask on |V0| at sparsity s, fixed for all iterations (the released
      code's iterative_prune=0); with iterations=0 that is plain Wanda-scored pruning with no
      update.
    Unstructured masks count over the whole matrix, as the released code does (per_out=False),
    or within each output row with `per_row`. Exactly floor(s * count) entries are removed at
    the end (see pruner.sparsity_masks); N:M needs d_in % m == 0 and removes 1 - n/m.

    Returns (new weight (d_out, d_in) in the weight's dtype, keep-mask (d_out, d_in) bool).
    """
    _check_shapes(weight, gram)
    _check_admm_args(iterations, rho, damp)
    kind = parse_sparsity_type(sparsity_type)
    target = resolve_sparsity(sparsity, kind)
    if kind.is_nm and weight.shape[1] % kind.m:
        raise PrunerError(f"{kind} sparsity needs the input dimension ({weight.shape[1]}) "
                          f"to be a multiple of {kind.m}")
    if reselect and not gradual:
        raise PrunerError("reselect=True re-chooses the mask during the iterations: it needs gradual=True")
    if gradual and not 1 <= ramp_iters <= iterations:
        raise PrunerError(f"gradual pruning needs 1 <= ramp_iters <= iterations "
                          f"(got ramp_iters={ramp_iters}, iterations={iterations}): "
                          f"otherwise the final mask would not reach the target sparsity")

    v0, g_n, norm = _normalised_problem(weight, gram, damp)
    first = _select_on(v0.abs(), target, kind, per_row)

    def choose_mask(t: int, vu: Tensor, mask: Tensor) -> Tensor:
        if not gradual or t >= ramp_iters:
            return mask
        s_t = target if reselect else ramp_sparsity(target, t, ramp_iters)
        return _select_on(vu.abs(), s_t, kind, per_row)

    if iterations == 0:
        z, mask = v0 * first, first
    else:
        z, mask = _admm_iterations(v0, g_n, first, iterations, rho, choose_mask)
    return _denormalise(z, norm, weight.dtype), mask.T.contiguous()


def admm_fixed_mask(weight: Tensor, gram: Tensor, mask: Tensor, iterations: int = 20,
                    rho: float = 1.0, damp: float = 0.1, cross: Tensor | None = None) -> Tensor:
    """Update the weights kept by a given keep-mask (d_out, d_in) by ADMM (the paper's
    fixed-mask weight update, which its gradual variant builds on).

    Same normalisation, damping and iterations as `admm_update`, with M fixed. The problem is
    convex, so the iterates converge to its unique minimiser, `least_squares_on_support` with
    the same `damp`. 20 iterations get most of the way; with rho = 1 and damp = 0.1 a few hundred
    reach it to round-off. Less damping converges more slowly at rho = 1 (damp = 0.01 needs
    ~2000 iterations), but as fast again with rho lowered alongside it (rho = 0.1).
    A structured mask (whole input columns False) is a special case, solved faster by
    `admm_refit_columns`, which runs the iterations on the kept columns alone.

    `cross` = X^T X_t (d_in, d_in) changes the target from X W^T to X_t W^T, the outputs of the
    original layer on other inputs X_t of the same tokens (the dense model's, when X comes from an
    already pruned one): min ||X W'^T - X_t W^T||^2 + the same damping towards W, whose normal
    equations in the normalised coordinates are (G_n + delta I) V = D^-1 X^T X_t W^T + delta V0
    (delta = damp * mean(diag G_n)); with X_t = X it is the problem above.
    Returns the new weight (d_out, d_in) in the weight's dtype, zero outside the mask.
    """
    _check_shapes(weight, gram, mask)
    return _admm_on_mask(weight, gram, mask, iterations, rho, damp, _cross_target(weight, gram, cross))


def _admm_on_mask(weight: Tensor, gram: Tensor, mask: Tensor, iterations: int, rho: float, damp: float,
                  target_out: Tensor | None) -> Tensor:
    """`admm_fixed_mask` with its target given as target_out = X^T X_t W_t^T (d_in, d_out), any
    target weight W_t (None: the layer's own outputs X W^T)."""
    _check_admm_args(iterations, rho, damp)
    v0, g_n, norm = _normalised_problem(weight, gram, damp)
    mask_t = mask.to(device=weight.device, dtype=torch.bool).T  # (d_in, d_out)
    b = _target_rhs(weight, gram, target_out, v0, g_n, norm)
    z, _ = _admm_iterations(v0, g_n, mask_t, iterations, rho, lambda t, vu, m: m, b)
    return _denormalise(z, norm, weight.dtype)


def _cross_target(weight: Tensor, gram: Tensor, cross: Tensor | None) -> Tensor | None:
    """X^T X_t W^T (d_in, d_out) from cross = X^T X_t (d_in, d_in); None without one."""
    if cross is None:
        return None
    if tuple(cross.shape) != tuple(gram.shape):
        raise PrunerError(f"cross must have the gram's shape {tuple(gram.shape)}, got {tuple(cross.shape)}")
    return _as_f64(cross, weight.device) @ _as_f64(weight, weight.device).T


def _target_rhs(weight: Tensor, gram: Tensor, target_out: Tensor | None, v0: Tensor, g_n: Tensor,
                norm: Tensor) -> Tensor | None:
    """D^-1 X^T X_t W_t^T + delta V0 in the normalised coordinates, from target_out = X^T X_t W_t^T
    (d_in, d_out); None without a separate target, where it is the damped G_n V0."""
    if target_out is None:
        return None
    g = _as_f64(gram, weight.device)
    delta = g_n.diagonal() - g.diagonal() / norm.pow(2)  # the damping added to each diagonal entry
    return _as_f64(target_out, weight.device) / norm.unsqueeze(1) + delta.unsqueeze(1) * v0


# ----------------------------------------------------------------------------- direct solves

def least_squares_on_support(weight: Tensor, gram: Tensor, mask: Tensor, damp: float = 0.1,
                             cross: Tensor | None = None) -> Tensor:
    """The exact minimiser of the damped reconstruction error on the mask's support, row by row.

    Output row i only depends on row i of W', so each row is its own problem. In the
    normalised coordinates of `_normalised_problem` (v = D w, G_n damped by `damp`):

        min_{v : v_j = 0 for j not in S_i} (v - v0)^T G_n (v - v0)
        =>  v_S = G_n[S, S]^-1 (G_n v0)[S],   S = S_i the kept inputs of row i.

    With damp = 0 it is the plain least squares min ||X w'_i - X w_i||^2 over the support
    (normalisation does not change the minimiser); damp > 0 is the objective ADMM with that
    damping minimises, so `admm_fixed_mask` converges to this (also with a `cross` term, which
    replaces G_n v0 by the right-hand side described there). Rows that share a support
    share one factorisation (a structured mask needs a single solve). A singular undamped
    block falls back to the minimum-norm solution. Returns (d_out, d_in) in the weight's dtype.
    """
    _check_shapes(weight, gram, mask)
    if damp < 0:
        raise PrunerError(f"damping must be >= 0, got {damp}")
    v0, g_n, norm = _normalised_problem(weight, gram, damp)
    rhs = _target_rhs(weight, gram, _cross_target(weight, gram, cross), v0, g_n, norm)
    rhs = g_n @ v0 if rhs is None else rhs  # (d_in, d_out)
    keep = mask.to(device=weight.device, dtype=torch.bool)  # (d_out, d_in)
    supports, row_support = torch.unique(keep, dim=0, return_inverse=True)
    v = torch.zeros_like(v0)  # (d_in, d_out)
    for k, support in enumerate(supports):
        rows = (row_support == k).nonzero().flatten()
        cols = support.nonzero().flatten()
        if cols.numel() == 0:
            continue
        block = g_n[cols][:, cols]  # (|S|, |S|)
        v[cols.unsqueeze(1), rows.unsqueeze(0)] = _solve_psd(block, rhs[cols][:, rows])
    return _denormalise(v, norm, weight.dtype)


def refit_kept_columns(weight: Tensor, gram: Tensor, x_sum: Tensor, count: int, kept_columns: Tensor,
                       damp: float = 0.01, cross: Tensor | None = None,
                       target_sum: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Refit the kept input columns of W, with an intercept, after whole columns are removed.

    Target: the dense outputs. With K the kept columns, find W'_K (d_out, |K|) and b (d_out,):

        min ||X_K W'_K^T + 1 b^T - X W^T||_F^2 + lambda ||W'_K - W_K||_F^2.

    An intercept is a weight on a constant input: append 1 to every x, so the Gram matrix of
    [x_K; 1] is [[G_KK, s_K], [s_K^T, N]] (s = sum x, N = token count) and its cross term with
    the dense input is [[G_K:], [s^T]]. The normal equations in (W'_K, b) are

        [[G_KK + lambda I, s_K], [s_K^T, N]] [W'_K^T; b^T] = [[G_K:], [s^T]] W^T + [lambda W_K^T; 0].

    Eliminating b (its row gives b = W mu - W'_K mu_K, mu = s / N) leaves the centred system
    solved here, with C = G / N - mu mu^T the input covariance:

        (C_KK + lambda' I) W'_K^T = C_K: W^T + lambda' W_K^T,   lambda' = damp * mean(diag C_KK).

    The ridge pulls towards the original W_K (not towards 0), so when the removed inputs are
    constant the exact answer W'_K = W_K, b = W_R mu_R (zero error) is still the solution; in
    general the error is at most that of FLAP's bias compensation (W_K kept, b = W_R mu_R),
    which is one feasible point of the same problem. The intercept itself is not damped.

    Another target: with `cross` = X^T X_t and `target_sum` = sum x_t (X_t the inputs the original
    layer saw for the same tokens, e.g. in the dense model while X comes from a pruned one) the
    target is X_t W^T: the right-hand side becomes C^t_K: W^T + lambda' W_K^T with the cross
    covariance C^t = X^T X_t / N - mu mu_t^T, and b = W mu_t - W'_K mu_K.

    A kept input that is constant over the tokens (variance below CONSTANT_INPUT_TOL of its mean
    square) has no column in the system: its weight stays, the intercept absorbs it.
    kept_columns: bool (d_in,) or indices. Returns (W'_K (d_out, |K|) in the weight's dtype,
    bias delta b (d_out,) in the weight's dtype, to add to the layer's bias).
    """
    if damp < 0:
        raise PrunerError(f"damping must be >= 0, got {damp}")

    def solve(w: Tensor, cov: Tensor, cov_t: Tensor, count: int, fit: Tensor) -> Tensor:
        cov_ff = cov[fit][:, fit]  # (f, f)
        lam = damp * cov_ff.diagonal().mean() if fit.numel() else 0.0
        lhs = cov_ff + lam * torch.eye(fit.numel(), dtype=w.dtype, device=w.device)
        rhs = cov_t[fit] @ w.T + lam * w[:, fit].T  # (f, d_out)
        return _solve_psd(lhs, rhs).T

    return _refit_columns(weight, gram, x_sum, count, kept_columns, cross, target_sum, solve)


CONSTANT_INPUT_TOL = 1e-5  # variance / mean square below which an input counts as constant


def _centred(gram: Tensor, x_sum: Tensor, count: int, cross: Tensor | None, target_sum: Tensor | None,
             dev: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """mu, C = G/N - mu mu^T, the target's mu_t and cross covariance X^T X_t/N - mu mu_t^T (mu and
    C themselves without a separate target), and which inputs vary (bool (d_in,)).

    An input whose variance is below CONSTANT_INPUT_TOL of its mean square is constant as far as
    the Gram matrix (accumulated in fp32) can tell: its entries of G/N - mu mu^T are round-off,
    possibly negative on the diagonal, and normalising by their square root would blow that noise
    up into an indefinite system."""
    if (cross is None) != (target_sum is None):
        raise PrunerError("a cross term needs both `cross` and `target_sum`")
    mu = _as_f64(x_sum, dev) / count  # (d_in,)
    second = _as_f64(gram, dev) / count  # (d_in, d_in)
    cov = second - torch.outer(mu, mu)
    varying = cov.diagonal() > CONSTANT_INPUT_TOL * second.diagonal()  # (d_in,)
    if cross is None:
        return mu, cov, mu, cov, varying
    if tuple(cross.shape) != tuple(gram.shape):
        raise PrunerError(f"cross must have the gram's shape {tuple(gram.shape)}, got {tuple(cross.shape)}")
    mu_t = _as_f64(target_sum, dev) / count
    return mu, cov, mu_t, _as_f64(cross, dev) / count - torch.outer(mu, mu_t), varying


BlockSolve = Callable[[Tensor, Tensor, Tensor, int, Tensor], Tensor]


def _refit_columns(weight: Tensor, gram: Tensor, x_sum: Tensor, count: int, kept_columns: Tensor,
                   cross: Tensor | None, target_sum: Tensor | None, solve: BlockSolve) -> tuple[Tensor, Tensor]:
    """What both refits share: centre the moments (the intercept eliminated), let
    solve(W, C, C^t, N, fit) give W'_fit (d_out, f) for the kept columns that vary (f,), keep the
    weights of kept constant inputs (they only shift the intercept, which absorbs them, and the
    ridge pulls towards W), and return (W'_K, b = W mu_t - W'_K mu_K) in the weight's dtype."""
    _check_shapes(weight, gram)
    if count <= 0:
        raise PrunerError(f"the token count must be positive, got {count}")
    dev = weight.device
    w = _as_f64(weight, dev)  # (d_out, d_in)
    kept = _column_indices(kept_columns, w.shape[1], dev)  # (k,)
    mu, cov, mu_t, cov_t, varying = _centred(gram, x_sum, count, cross, target_sum, dev)
    w_kept = w[:, kept].clone()  # (d_out, k)
    fits = varying[kept]  # (k,)
    w_kept[:, fits] = solve(w, cov, cov_t, count, kept[fits])
    bias = w @ mu_t - w_kept @ mu[kept]  # (d_out,)
    return w_kept.to(weight.dtype), bias.to(weight.dtype)


def admm_refit_columns(weight: Tensor, gram: Tensor, x_sum: Tensor, count: int, kept_columns: Tensor,
                       iterations: int = 20, rho: float | None = None, damp: float = 0.1,
                       cross: Tensor | None = None, target_sum: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`refit_kept_columns` by the ADMM fixed-mask update instead of a direct solve.

    The intercept is eliminated as there (b = W mu_t - W'_K mu_K, not damped), which leaves the
    problem on the centred Gram matrix N C = G - s s^T / N (and the centred cross term, with a
    separate target); on it the fixed-mask ADMM runs with the paper's normalisation, damping
    `damp` and `iterations` rounds at penalty `rho`. The mask keeps the columns K in every row,
    so the constraint W'_R = 0 is eliminated exactly: the iterations run on the kept block,

        min_{W'_K} ||X_K W'_K^T - X_t W^T||^2 + damping towards W_K   (centred),

    the same minimiser as `admm_fixed_mask` on the full mask (`least_squares_on_support`), but
    reached in a few iterations: each contracts the error by rho / (lambda + rho), lambda >= the
    damping, so rho = the damping (the default; 1 without damping) at least halves it, where the
    full-width iterations also have to drive the removed columns' V + U to
    zero through the correlations of X (on a layer after Wanda-sp: 3% from the minimiser
    after 20 iterations, 0.2% after 100).
    Its damping pulls towards the original W_K, so FLAP's point (W_K kept, b = W_R mu_R) stays
    feasible and the converged error is at most FLAP's. Constant kept inputs keep their weights,
    as in `refit_kept_columns`.
    Returns (W'_K (d_out, |K|), bias delta (d_out,)), both in the weight's dtype.
    """
    rho = (damp if damp > 0 else 1.0) if rho is None else rho

    def solve(w: Tensor, cov: Tensor, cov_t: Tensor, count: int, fit: Tensor) -> Tensor:
        w_f = w[:, fit]  # (d_out, f)
        target_out = count * cov_t[fit] @ w.T  # (f, d_out): X_f^T X_t W^T, centred (X_t = X without a target)
        every_row = torch.ones_like(w_f, dtype=torch.bool)
        return _admm_on_mask(w_f, count * cov[fit][:, fit], every_row, iterations, rho, damp, target_out)

    return _refit_columns(weight, gram, x_sum, count, kept_columns, cross, target_sum, solve)


def with_intercept(gram: Tensor, x_sum: Tensor, count: int) -> Tensor:
    """The Gram matrix of the inputs with a constant 1 appended, [[G, s], [s^T, N]] (float64):
    with it, `relative_output_error` of [W', b] against [W, 0] measures a layer whose bias
    changed too."""
    g = _as_f64(gram, gram.device)
    s = _as_f64(x_sum, gram.device).unsqueeze(1)  # (d_in, 1)
    corner = torch.tensor([[float(count)]], dtype=torch.float64, device=gram.device)
    return torch.cat([torch.cat([g, s], 1), torch.cat([s.T, corner], 1)], 0)


def relative_error_to_target(weight_new: Tensor, bias: Tensor, weight: Tensor, gram: Tensor, cross: Tensor,
                             target_gram: Tensor, x_sum: Tensor, target_sum: Tensor, count: int) -> Tensor:
    """A layer's error against the outputs it should match, from moments alone:

        ||X W'^T + 1 b^T - X_t W^T||^2 / ||X_t W^T||^2

    (X: its inputs, X_t: the inputs the original layer saw for the same tokens, e.g. the dense
    model's), with G = X^T X, C = X^T X_t, G_t = X_t^T X_t, s = sum x, s_t = sum x_t, N = count:
        ||Y'||^2 = <W' G, W'> + 2 b.(W' s) + N b.b,   <Y', Y> = <W' C, W> + b.(W s_t),
        ||Y||^2 = <W G_t, W>;   error = (||Y'||^2 - 2 <Y', Y> + ||Y||^2) / ||Y||^2.
    A 0-dim float64 tensor (the squared ratio, as `relative_output_error`)."""
    _check_shapes(weight, gram)
    dev = weight.device
    w_new, w, b = (_as_f64(t, dev) for t in (weight_new, weight, bias))
    g, c, gt = (_as_f64(t, dev) for t in (gram, cross, target_gram))
    s, st = _as_f64(x_sum, dev), _as_f64(target_sum, dev)
    own = ((w_new @ g) * w_new).sum() + 2 * b @ (w_new @ s) + count * b @ b
    inner = ((w_new @ c) * w).sum() + b @ (w @ st)
    target = ((w @ gt) * w).sum()
    return (own - 2 * inner + target).clamp(min=0) / target


def _column_indices(columns: Tensor, d_in: int, device: torch.device) -> Tensor:
    columns = columns.to(device)
    if columns.dtype == torch.bool:
        if columns.numel() != d_in:
            raise PrunerError(f"kept_columns as a bool mask must have {d_in} entries, got {columns.numel()}")
        return columns.nonzero().flatten()
    return columns.long().flatten()


# ----------------------------------------------------------------------------- SparseGPT

def _upper_cholesky_of_inverse(h: Tensor) -> Tensor:
    """U upper triangular with H^-1 = U^T U: row i of U holds the OBS update of column i given
    that columns < i are already fixed (SparseGPT, Alg. 1)."""
    return torch.linalg.cholesky(_spd_inverse(h), upper=True)


def _obs_scores(w: Tensor, hinv_diag: Tensor) -> Tensor:
    """The OBS saliency w^2 / [H^-1]_jj^2 that SparseGPT ranks with (the reference code uses the
    diagonal of the Cholesky factor U, as here)."""
    return w.pow(2) / hinv_diag.pow(2).unsqueeze(0)


def sparsegpt_prune(weight: Tensor, gram: Tensor, sparsity: float | None,
                    sparsity_type: str | SparsityType = "unstructured", blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[Tensor, Tensor]:
    """SparseGPT (Frantar & Alistarh, arXiv 2301.00774, Alg. 1), as its reference code runs it.

    Hessian H = 2 X^T X; its scale changes neither the mask nor the update, so G itself is used.
    - dead inputs (diag H = 0): their diagonal is set to 1 and their weights to 0;
    - damping: H += percdamp * mean(diag H) * I;
    - U = upper Cholesky factor of H^-1;
    - columns are processed left to right in blocks of `blocksize`. Unstructured: at the start
      of each block the mask is chosen adaptively on w^2 / U_jj^2 over the whole block (all rows,
      `blocksize` columns), removing floor(s * rows * block columns) entries. N:M: at every m-th
      column the (m - n) smallest scores of the next m columns of each row are removed, on the
      weights as updated so far;
    - for each column j: q = w_j with its pruned entries zeroed, e = (w_j - q) / U_jj, and the
      not yet processed columns of the block get w_{j:} -= e U_{j, j:}; at the end of the block
      its errors update all later columns at once (lazy batch update).
    The reference's threshold test `score <= sorted[int(s * count)]` removes one entry more
    than floor(s * count) (and every tie); here each block removes exactly floor(s * count).
    Returns (new weight (d_out, d_in) in the weight's dtype, keep-mask (d_out, d_in) bool).
    """
    _check_shapes(weight, gram)
    kind = parse_sparsity_type(sparsity_type)
    target = resolve_sparsity(sparsity, kind)
    if blocksize < 1:
        raise PrunerError(f"blocksize must be >= 1, got {blocksize}")
    if kind.is_nm and (weight.shape[1] % kind.m or blocksize % kind.m):
        raise PrunerError(f"{kind} sparsity needs the input dimension ({weight.shape[1]}) and the block "
                          f"size ({blocksize}) to be multiples of {kind.m}")
    dev = weight.device
    w = _as_f64(weight, dev).clone()  # (d_out, d_in)
    h = _as_f64(gram, dev).clone()  # (d_in, d_in)
    d_out, d_in = w.shape

    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    hinv = _upper_cholesky_of_inverse(h)  # (d_in, d_in), upper

    pruned = torch.zeros_like(w, dtype=torch.bool)  # (d_out, d_in)
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        w1 = w[:, i1:i2].clone()  # (d_out, b)
        u1 = hinv[i1:i2, i1:i2]  # (b, b)
        err1 = torch.zeros_like(w1)
        pruned1 = pruned[:, i1:i2]  # a view: filled in place
        if not kind.is_nm:
            pruned1.copy_(~unstructured_mask(_obs_scores(w1, u1.diagonal()), target))
        for i in range(i2 - i1):
            if kind.is_nm and i % kind.m == 0:
                group = slice(i, i + kind.m)
                scores = _obs_scores(w1[:, group], u1.diagonal()[group])
                pruned1[:, group] = ~nm_mask(scores, kind.n, kind.m)
            col = w1[:, i]
            q = col.masked_fill(pruned1[:, i], 0.0)  # (d_out,)
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(weight.dtype), ~pruned


# ----------------------------------------------------------------------------- error

def relative_output_error(weight_new: Tensor, weight_old: Tensor, gram: Tensor,
                          squared: bool = True) -> Tensor:
    """Relative reconstruction error of a layer from its inputs' Gram matrix G = X^T X:

        ||X W'^T - X W^T||_F^2 / ||X W^T||_F^2 = tr(dW G dW^T) / tr(W G W^T),  dW = W' - W.

    squared=True gives this ratio of squared norms, the quantity the ADMM paper reports (about
    9.5e-3 for ADMM at 50% on an OPT-13B layer) and the one our reports use; squared=False
    gives its square root, ||X W'^T - X W^T||_F / ||X W^T||_F. A 0-dim float64 tensor.
    """
    _check_shapes(weight_old, gram)
    if weight_new.shape != weight_old.shape:
        raise PrunerError(f"weights differ in shape: {tuple(weight_new.shape)} vs {tuple(weight_old.shape)}")
    dev = weight_old.device
    w = _as_f64(weight_old, dev)  # (d_out, d_in)
    dw = _as_f64(weight_new, dev) - w  # (d_out, d_in)
    g = _as_f64(gram, dev)  # (d_in, d_in)
    num = ((dw @ g) * dw).sum()
    den = ((w @ g) * w).sum()
    ratio = num.clamp(min=0) / den
    return ratio if squared else ratio.sqrt()
