"""Sparsity masks and layer-wise weight reconstruction (ADMM, SparseGPT, least squares) on tiny
random layers with known answers."""

import math

import pytest
import torch

from pruner.errors import PrunerError
from pruner.reconstruction import (
    admm_fixed_mask,
    admm_refit_columns,
    admm_update,
    least_squares_on_support,
    ramp_sparsity,
    refit_kept_columns,
    relative_error_to_target,
    relative_output_error,
    sparsegpt_prune,
    with_intercept,
)
from pruner.sparsity_masks import (
    SparsityType,
    magnitude_scores,
    nm_mask,
    nm_ramp_mask,
    parse_sparsity_type,
    prune_count,
    select_mask,
    unstructured_mask,
    wanda_scores,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_layer(seed: int, d_out: int = 32, d_in: int = 64, tokens: int = 512, rank: int = 24):
    """W (d_out, d_in) and inputs X (tokens, d_in) with a strong low-rank structure (rank `rank`
    plus weak noise) and uneven channel scales, like real activations."""
    g = generator(seed)
    mixing = torch.randn(rank, d_in, generator=g, dtype=F64)
    x = torch.randn(tokens, rank, generator=g, dtype=F64) @ mixing
    x = x + 0.5 * torch.randn(tokens, d_in, generator=g, dtype=F64)
    x = x * (0.2 + torch.rand(d_in, generator=g, dtype=F64))
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    return w, x


def error_from_x(w_new: torch.Tensor, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> float:
    """||X W'^T (+ b) - X W^T||_F^2 / ||X W^T||_F^2 from the explicit inputs."""
    out_new = x @ w_new.T + (0 if bias is None else bias)
    out = x @ w.T
    return float((out_new - out).pow(2).sum() / out.pow(2).sum())


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("text,expected", [("unstructured", SparsityType()), ("2:4", SparsityType(2, 4)),
                                           ("4:8", SparsityType(4, 8)), (" 1 : 4 ", SparsityType(1, 4))])
def test_parse_sparsity_type(text, expected):
    kind = parse_sparsity_type(text)
    assert kind == expected
    assert parse_sparsity_type(str(kind)) == kind


@pytest.mark.parametrize("text", ["2-4", "4:2", "0:4", "4:4", "structured", ""])
def test_parse_sparsity_type_rejects(text):
    with pytest.raises(PrunerError):
        parse_sparsity_type(text)


@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_mask_exact_count(sparsity, per_row):
    scores = torch.rand(10, 100, generator=generator(0))
    mask = unstructured_mask(scores, sparsity, per_row=per_row)
    if per_row:
        expected = 100 - math.floor(sparsity * 100 + 1e-6)
        assert (mask.sum(1) == expected).all()
        kept_min = scores.masked_fill(~mask, math.inf).min(1).values
        pruned_max = scores.masked_fill(mask, -math.inf).max(1).values
        assert (kept_min >= pruned_max).all()
    else:
        assert int(mask.sum()) == 1000 - math.floor(sparsity * 1000 + 1e-6)
        if 0 < sparsity < 1:
            assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73])
def test_unstructured_mask_is_what_a_stable_sort_removes(per_row, sparsity):
    """The selection-based mask equals removing the first k entries of a stable ascending sort,
    also with many ties and infinite scores (as the N:M ramp uses them)."""
    scores = torch.randint(0, 5, (12, 40), generator=generator(3)).double()
    scores[2, :7] = math.inf
    mask = unstructured_mask(scores, sparsity, per_row=per_row)
    if per_row:
        k = prune_count(sparsity, 40)
        order = torch.argsort(scores, dim=1, stable=True)
        expected = torch.ones_like(mask).scatter_(1, order[:, :k], False)
    else:
        k = prune_count(sparsity, scores.numel())
        expected = torch.ones(scores.numel(), dtype=torch.bool)
        expected[torch.argsort(scores.flatten(), stable=True)[:k]] = False
        expected = expected.view_as(mask)
    assert torch.equal(mask, expected)


def test_counts_survive_float_products_and_ties():
    assert prune_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    ties = torch.ones(4, 8)
    assert int(unstructured_mask(ties, 0.5).sum()) == 16
    assert (unstructured_mask(ties, 0.25, per_row=True).sum(1) == 6).all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_keeps_exactly_n_largest_per_group(n, m):
    scores = torch.rand(6, 32, generator=generator(1))
    mask = nm_mask(scores, n, m)
    groups = mask.view(6, 32 // m, m)
    assert (groups.sum(-1) == n).all()
    s = scores.view(6, 32 // m, m)
    kept_min = s.masked_fill(~groups, math.inf).min(-1).values
    pruned_max = s.masked_fill(groups, -math.inf).max(-1).values
    assert (kept_min >= pruned_max).all()


def test_nm_mask_needs_divisible_input_dimension():
    with pytest.raises(PrunerError):
        nm_mask(torch.rand(4, 10), 2, 4)


def test_nm_ramp_mask_keeps_the_nm_survivors():
    scores = torch.rand(8, 16, generator=generator(2))
    nm = nm_mask(scores, 2, 4)
    for s in (0.0, 0.1, 0.3):
        ramp = nm_ramp_mask(scores, 2, 4, s)
        assert int((~ramp).sum()) == math.floor(s * 128 + 1e-6)
        assert ramp[nm].all()
    assert torch.equal(nm_ramp_mask(scores, 2, 4, 0.5), nm)


def test_wanda_scores_use_input_norms_from_the_gram_diagonal():
    w, x = correlated_layer(0)
    gram = x.T @ x
    expected = w.abs() * x.norm(dim=0).unsqueeze(0)
    assert torch.allclose(wanda_scores(w, gram.diagonal()), expected, rtol=1e-12)
    assert torch.equal(magnitude_scores(w), w.abs())


def test_select_mask_checks_nm_sparsity():
    scores = torch.rand(4, 8)
    assert torch.equal(select_mask(scores, 0.5, "2:4"), nm_mask(scores, 2, 4))
    with pytest.raises(PrunerError):
        select_mask(scores, 0.3, "2:4")


# ----------------------------------------------------------------------------- error measure

@pytest.mark.parametrize("seed", [0, 1])
def test_relative_error_from_gram_equals_explicit(seed):
    w, x = correlated_layer(seed)
    w_new = w * (torch.rand(w.shape, generator=generator(seed + 10), dtype=F64) > 0.5)
    gram = (x.T @ x).float()  # fp32, as collected
    expected = error_from_x(w_new, w, x)
    assert float(relative_output_error(w_new, w, gram)) == pytest.approx(expected, rel=1e-5)
    assert float(relative_output_error(w_new, w, gram, squared=False)) == pytest.approx(math.sqrt(expected), rel=1e-5)
    assert float(relative_output_error(w, w, gram)) == 0.0


# ----------------------------------------------------------------------------- least squares / fixed mask

@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_least_squares_on_support_is_the_damped_lstsq(damp):
    """Row by row: min ||X w' - X w||^2 + lam sum_j G_jj (w'_j - w_j)^2 over the row's support,
    lam = damp * mean(diag of the normalised Gram) = damp here (no dead inputs)."""
    w, x = correlated_layer(3, d_out=6, d_in=16, tokens=200, rank=6)
    gram = x.T @ x
    mask = torch.rand(w.shape, generator=generator(4)) > 0.5
    got = least_squares_on_support(w, gram, mask, damp=damp)
    ridge = (damp * gram.diagonal()).sqrt()
    for i in range(w.shape[0]):
        s = mask[i]
        a = torch.cat([x[:, s], torch.diag(ridge[s])])
        target = torch.cat([x @ w[i], ridge[s] * w[i, s]])
        row = torch.linalg.lstsq(a, target.unsqueeze(1)).solution.flatten()
        assert torch.allclose(got[i, s], row, rtol=1e-8, atol=1e-10)
        assert (got[i, ~s] == 0).all()


def mask_of(kind: str, w: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    if kind == "wanda":
        return unstructured_mask(wanda_scores(w, gram.diagonal()), 0.5, per_row=True)
    if kind == "2:4":
        return nm_mask(wanda_scores(w, gram.diagonal()), 2, 4)
    columns = torch.rand(w.shape[1], generator=generator(5)) > 0.4  # structured: whole input columns
    return columns.unsqueeze(0).expand_as(w)


@pytest.mark.parametrize("kind", ["wanda", "2:4", "columns"])
@pytest.mark.parametrize("damp,rho", [(0.1, 1.0), (0.01, 0.1)])
def test_admm_fixed_mask_reaches_the_least_squares_optimum(kind, damp, rho):
    w, x = correlated_layer(6)
    gram = x.T @ x
    mask = mask_of(kind, w, gram)
    direct = least_squares_on_support(w, gram, mask, damp=damp)
    admm = admm_fixed_mask(w, gram, mask, iterations=400, rho=rho, damp=damp)
    assert (admm[~mask] == 0).all()
    assert torch.allclose(admm, direct, rtol=0, atol=1e-8 * float(w.abs().max()))
    # 20 iterations (the default) already improve a lot on the unchanged kept weights
    short = admm_fixed_mask(w, gram, mask)
    assert relative_output_error(short, w, gram) < 0.5 * relative_output_error(w * mask, w, gram)


# ----------------------------------------------------------------------------- ADMM with mask selection

def test_ramp_schedule():
    ramp = [ramp_sparsity(0.5, t, 15) for t in range(15)]
    assert ramp[0] == pytest.approx(0.5 - 0.5 * (14 / 15) ** 3)
    assert ramp[-1] == pytest.approx(0.5)
    assert all(a < b for a, b in zip(ramp, ramp[1:]))


@pytest.mark.parametrize("sparsity,sparsity_type", [(0.5, "unstructured"), (0.37, "unstructured"),
                                                    (0.5, "2:4"), (None, "4:8")])
@pytest.mark.parametrize("reselect", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_admm_hits_the_target_sparsity_exactly(sparsity, sparsity_type, reselect, per_row):
    w, x = correlated_layer(7)
    gram = x.T @ x
    new, mask = admm_update(w, gram, sparsity, sparsity_type, reselect=reselect, per_row=per_row)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert ((new != 0) == mask).all()
    kind = parse_sparsity_type(sparsity_type)
    if kind.is_nm:
        assert (mask.view(w.shape[0], -1, kind.m).sum(-1) == kind.n).all()
    elif per_row:
        assert (mask.sum(1) == w.shape[1] - math.floor(sparsity * w.shape[1] + 1e-6)).all()
    else:
        assert int(mask.sum()) == w.numel() - math.floor(sparsity * w.numel() + 1e-6)


def admm_as_written(w, gram, s, schedule, iterations=20, ramp=15, rho=1.0, damp=0.1):
    """algorithms.md Sec. 3 line by line, unstructured over the whole matrix, explicit inverse."""
    n = gram.diagonal().sqrt() + 1e-8
    g = gram / torch.outer(n, n)
    v0 = (w * n).T
    g = g + damp * g.diagonal().mean() * torch.eye(len(n), dtype=F64)
    b = g @ v0
    ginv = torch.linalg.inv(g + rho * torch.eye(len(n), dtype=F64))

    def top(scores, s_t):  # keep all but the floor(s_t * numel) smallest
        k = math.floor(s_t * scores.numel() + 1e-6)
        cut = scores.flatten().sort().values[k - 1] if k else -1.0
        return scores > cut

    u, v = torch.zeros_like(v0), v0.clone()
    mask = top(v0.abs(), s)
    for t in range(iterations):
        if schedule != "fixed" and t < ramp:
            s_t = s if schedule == "reselect" else s - s * (1 - (t + 1) / ramp) ** 3
            mask = top((v + u).abs(), s_t)
        z = (v + u) * mask
        u = u + v - z
        v = ginv @ (b + rho * (z - u))
    return ((v + u) * mask / n.unsqueeze(1)).T


@pytest.mark.parametrize("schedule", ["ramp", "reselect", "fixed"])
@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_admm_update_follows_the_written_algorithm(schedule, sparsity):
    w, x = correlated_layer(14, d_out=8, d_in=16, tokens=128, rank=6)
    gram = x.T @ x
    new, _ = admm_update(w, gram, sparsity, gradual=schedule != "fixed", reselect=schedule == "reselect")
    assert torch.allclose(new, admm_as_written(w, gram, sparsity, schedule), rtol=0, atol=1e-10)


def test_admm_gradual_mask_settles_at_the_end_of_the_ramp():
    """After the ramp the mask is fixed, so the weights are the fixed-mask optimum for it."""
    w, x = correlated_layer(8)
    gram = x.T @ x
    new, mask = admm_update(w, gram, 0.5, iterations=400, ramp_iters=15)
    direct = least_squares_on_support(w, gram, mask)
    assert torch.allclose(new, direct, rtol=0, atol=1e-8 * float(w.abs().max()))


def test_admm_without_iterations_is_global_wanda_pruning():
    w, x = correlated_layer(9)
    gram = x.T @ x
    new, mask = admm_update(w, gram, 0.5, iterations=0, gradual=False)
    assert torch.equal(mask, unstructured_mask(wanda_scores(w, gram.diagonal()), 0.5))
    assert torch.allclose(new, w * mask, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs", [dict(ramp_iters=25), dict(ramp_iters=0), dict(gradual=False, reselect=True),
                                    dict(rho=0.0), dict(iterations=-1)])
def test_admm_rejects_bad_settings(kwargs):
    w, x = correlated_layer(0, d_out=4, d_in=8, tokens=32, rank=4)
    with pytest.raises(PrunerError):
        admm_update(w, x.T @ x, 0.5, **kwargs)


def test_admm_keeps_dtype_and_handles_dead_inputs():
    w, x = correlated_layer(10)
    x[:, :3] = 0  # dead input channels
    gram = (x.T @ x).float()
    new, mask = admm_update(w.float(), gram, 0.5)
    assert new.dtype == torch.float32 and torch.isfinite(new).all()
    assert int(mask.sum()) == w.numel() // 2
    assert relative_output_error(new, w.float(), gram) < 0.05


# ----------------------------------------------------------------------------- method comparison

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_error_order_wanda_sparsegpt_admm(seed, sparsity_type):
    """On correlated inputs: Wanda (mask, no update) > SparseGPT > ADMM, as in the ADMM paper."""
    w, x = correlated_layer(seed)
    gram = x.T @ x
    wanda = w * select_mask(wanda_scores(w, gram.diagonal()), 0.5, sparsity_type, per_row=True)
    sgpt, sgpt_mask = sparsegpt_prune(w, gram, 0.5, sparsity_type)
    admm, _ = admm_update(w, gram, 0.5, sparsity_type)
    errors = [error_from_x(v, w, x) for v in (wanda, sgpt, admm)]
    assert errors[0] > errors[1] > errors[2], errors
    assert ((sgpt != 0) == sgpt_mask).all() and int(sgpt_mask.sum()) == w.numel() // 2


# ----------------------------------------------------------------------------- SparseGPT

def test_sparsegpt_at_zero_sparsity_keeps_the_weights():
    w, x = correlated_layer(11)
    new, mask = sparsegpt_prune(w, x.T @ x, 0.0)
    assert mask.all() and torch.allclose(new, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sparsity_type,blocksize", [("2:4", 16), ("4:8", 128), ("unstructured", 16)])
def test_sparsegpt_patterns_and_dead_inputs(sparsity_type, blocksize):
    w, x = correlated_layer(12)
    x[:, [0, 5]] = 0  # dead inputs: their weights are dropped, the rest must stay finite
    gram = x.T @ x
    new, mask = sparsegpt_prune(w, gram, 0.5, sparsity_type, blocksize=blocksize)
    assert torch.isfinite(new).all() and (new[:, [0, 5]] == 0).all()
    kind = parse_sparsity_type(sparsity_type)
    if kind.is_nm:
        assert (mask.view(w.shape[0], -1, kind.m).sum(-1) == kind.n).all()
    else:  # exact count per block of columns
        blocks = mask.view(w.shape[0], -1, blocksize).sum((0, 2))
        assert (blocks == w.shape[0] * blocksize // 2).all()
    assert error_from_x(new, w, x) < error_from_x(w * mask, w, x)


def test_sparsegpt_first_block_mask_is_the_obs_saliency():
    """In one block the mask is chosen up front on w^2 / [U]_jj^2, U the upper Cholesky factor
    of (H + 0.01 mean(diag H) I)^-1 (SparseGPT Alg. 1; the reference uses U's diagonal)."""
    w, x = correlated_layer(17)
    gram = x.T @ x
    h = gram + 0.01 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=F64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    expected = unstructured_mask(w.pow(2) / u.diagonal().pow(2), 0.5)
    _, mask = sparsegpt_prune(w, gram, 0.5, blocksize=w.shape[1])
    assert torch.equal(mask, expected)


def test_sparsegpt_lazy_block_updates_do_not_change_the_result():
    """Deferring the updates of later columns to the end of each block is exact algebra: with
    N:M (whose mask does not depend on the block) every block size gives the same weights."""
    w, x = correlated_layer(15)
    gram = x.T @ x
    small, mask_small = sparsegpt_prune(w, gram, None, "2:4", blocksize=8)
    whole, mask_whole = sparsegpt_prune(w, gram, None, "2:4", blocksize=64)
    assert torch.equal(mask_small, mask_whole)
    assert torch.allclose(small, whole, rtol=0, atol=1e-10)


def test_sparsegpt_needs_no_full_rank_gram():
    """Fewer tokens than inputs plus dead inputs: damping and the dead-input fix keep the
    Cholesky factorisations defined; without damping only the dead-input fix is needed."""
    w, x = correlated_layer(16, tokens=40)
    x[:, 3] = 0
    new, _ = sparsegpt_prune(w, x.T @ x, 0.5)
    assert torch.isfinite(new).all()
    w, x = correlated_layer(16)
    x[:, 3] = 0
    new, _ = sparsegpt_prune(w, x.T @ x, 0.5, percdamp=0.0)
    assert torch.isfinite(new).all() and (new[:, 3] == 0).all()


# ----------------------------------------------------------------------------- structured refit

def test_refit_is_exact_when_removed_inputs_are_constant():
    w, x = correlated_layer(13)
    removed = torch.zeros(w.shape[1], dtype=torch.bool)
    removed[[1, 7, 20, 40]] = True
    x[:, removed] = torch.tensor([0.5, -2.0, 3.0, 1.5], dtype=F64)
    kept = ~removed
    w_kept, bias = refit_kept_columns(w, x.T @ x, x.sum(0), x.shape[0], kept)
    assert w_kept.shape == (w.shape[0], int(kept.sum()))
    w_new = torch.zeros_like(w)
    w_new[:, kept] = w_kept
    assert error_from_x(w_new, w, x, bias) < 1e-20


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("damp", [0.0, 0.01, 0.5])
def test_refit_beats_flap_bias_compensation(seed, damp):
    w, x = correlated_layer(seed)
    x = x + torch.linspace(-1, 2, x.shape[1], dtype=F64)  # non-zero input means
    kept = torch.rand(w.shape[1], generator=generator(seed + 20)) > 0.3
    removed = ~kept
    w_kept, bias = refit_kept_columns(w, x.T @ x, x.sum(0), x.shape[0], kept.nonzero().flatten(), damp=damp)
    ours = torch.zeros_like(w)
    ours[:, kept] = w_kept
    flap_bias = w[:, removed] @ x.mean(0)[removed]
    flap = w * kept
    err_ours, err_flap = error_from_x(ours, w, x, bias), error_from_x(flap, w, x, flap_bias)
    assert err_ours <= err_flap * (1 + 1e-9)
    if damp == 0.0:  # and it is the optimum: no perturbation of it does better
        for k in range(3):
            noise = 1e-3 * torch.randn(w_kept.shape, generator=generator(k), dtype=F64)
            perturbed = ours.clone()
            perturbed[:, kept] += noise
            assert error_from_x(perturbed, w, x, bias) > err_ours


@pytest.mark.parametrize("seed", [0, 1])
def test_admm_refit_converges_to_the_centred_least_squares_and_beats_flap(seed):
    """With enough iterations the ADMM refit is the damped least squares on the centred Gram
    matrix (the intercept eliminated), and its error with the intercept is below FLAP's."""
    w, x = correlated_layer(seed)
    x = x + torch.linspace(-1, 2, x.shape[1], dtype=F64)
    kept = torch.rand(w.shape[1], generator=generator(seed + 30)) > 0.4
    n = x.shape[0]
    w_kept, bias = admm_refit_columns(w, x.T @ x, x.sum(0), n, kept, iterations=400, damp=0.1)
    centred = x.T @ x - torch.outer(x.sum(0), x.sum(0)) / n
    mask = kept.unsqueeze(0).expand_as(w)
    expected = least_squares_on_support(w, centred, mask, damp=0.1)
    torch.testing.assert_close(w_kept, expected[:, kept], rtol=1e-7, atol=1e-9)
    mu = x.mean(0)
    torch.testing.assert_close(bias, w @ mu - expected @ mu, rtol=1e-7, atol=1e-9)
    ours = torch.zeros_like(w)
    ours[:, kept] = w_kept
    flap_bias = w[:, ~kept] @ mu[~kept]
    assert error_from_x(ours, w, x, bias) < error_from_x(w * kept, w, x, flap_bias)
    # 20 iterations (the default) already beat FLAP's compensation
    w20, b20 = admm_refit_columns(w, x.T @ x, x.sum(0), n, kept)
    short = torch.zeros_like(w)
    short[:, kept] = w20
    assert error_from_x(short, w, x, b20) < error_from_x(w * kept, w, x, flap_bias)


@pytest.mark.parametrize("seed, damp", [(0, 1.0), (1, 1.0), (2, 0.1), (3, 0.01)])
def test_admm_refit_reaches_its_optimum_in_the_default_iterations(seed, damp):
    """On a structured mask the constraint is eliminated (the iterations run on the kept columns)
    and rho follows the damping, so the paper's 20 iterations reach the damped least squares to
    < 1e-5 at any damping; the full-width iterations of admm_fixed_mask (rho 1) are further off."""
    w, x_t = correlated_layer(seed)
    x = x_t + 0.3 * torch.randn(x_t.shape, generator=generator(seed + 40), dtype=F64) + 0.2
    kept = torch.rand(w.shape[1], generator=generator(seed + 41)) > 0.5
    n = x.shape[0]
    mu, mu_t = x.mean(0), x_t.mean(0)
    centred = x.T @ x - n * torch.outer(mu, mu)
    centred_cross = x.T @ x_t - n * torch.outer(mu, mu_t)
    mask = kept.expand_as(w)
    direct = least_squares_on_support(w, centred, mask, damp=damp, cross=centred_cross)
    w20, _ = admm_refit_columns(w, x.T @ x, x.sum(0), n, kept, iterations=20, damp=damp, cross=x.T @ x_t,
                                target_sum=x_t.sum(0))
    restricted_gap = float((w20 - direct[:, kept]).norm() / direct.norm())
    assert restricted_gap < 1e-5
    full_width = admm_fixed_mask(w, centred, mask, iterations=20, damp=damp, cross=centred_cross)
    assert float((full_width - direct).norm() / direct.norm()) > 30 * restricted_gap


@pytest.mark.parametrize("refit", [refit_kept_columns, admm_refit_columns])
@pytest.mark.parametrize("constant_kept", [False, True])
def test_refit_with_constant_input_channels(refit, constant_kept):
    """Inputs that never vary (a head whose value output is the same for every token), with the
    Gram matrix accumulated in fp32 as the walk does: their centred variance is round-off, which
    the paper's normalisation by sqrt(variance) once blew up into an indefinite system (a raw
    LinAlgError from `prune --reconstruct admm` on 2 calibration windows). The refit runs, kept
    weights on the constant inputs stay where they were (the intercept carries them), and its
    error is that of the refit on the same data without those channels."""
    w, x = correlated_layer(5)
    x = x + 0.4
    head = slice(8, 16)
    x[:, head] = 0.1173 + 0.01 * torch.arange(8, dtype=F64)  # constant
    kept = torch.rand(w.shape[1], generator=generator(50)) > 0.4
    kept[head] = constant_kept
    x32 = x.float()
    gram = (x32.T @ x32).double()  # fp32 products, as pruner.sequential accumulates them
    w_kept, bias = refit(w, gram, x.sum(0), x.shape[0], kept, damp=1.0)
    assert torch.isfinite(w_kept).all() and torch.isfinite(bias).all()
    ours = torch.zeros_like(w)
    ours[:, kept] = w_kept
    if constant_kept:
        torch.testing.assert_close(ours[:, head], w[:, head])
    # the same refit with the constant channels removed (their mean output in the bias instead)
    other = kept.clone()
    other[head] = False
    w_other, b_other = refit(w, x.T @ x, x.sum(0), x.shape[0], other, damp=1.0)
    without = torch.zeros_like(w)
    without[:, other] = w_other
    assert error_from_x(ours, w, x, bias) == pytest.approx(error_from_x(without, w, x, b_other), rel=1e-5)
    flap_bias = w[:, ~kept] @ x.mean(0)[~kept]
    assert error_from_x(ours, w, x, bias) < 0.9 * error_from_x(w * kept, w, x, flap_bias)


@pytest.mark.parametrize("refit", [refit_kept_columns, admm_refit_columns])
def test_refit_of_a_removed_sublayer_keeps_its_mean_output(refit):
    """No column kept: no weights, and the bias is the layer's mean output W mu."""
    w, x = correlated_layer(4)
    x = x + 0.7
    w_kept, bias = refit(w, x.T @ x, x.sum(0), x.shape[0], torch.zeros(w.shape[1], dtype=torch.bool))
    assert w_kept.shape == (w.shape[0], 0)
    torch.testing.assert_close(bias, w @ x.mean(0))


def test_relative_error_with_an_intercept_from_the_augmented_gram():
    w, x = correlated_layer(6)
    x = x + 0.3
    w_new = w * (torch.rand(w.shape, generator=generator(1), dtype=F64) > 0.5)
    bias = torch.randn(w.shape[0], generator=generator(2), dtype=F64)
    g = with_intercept(x.T @ x, x.sum(0), x.shape[0])
    zero = torch.zeros(w.shape[0], 1, dtype=F64)
    got = relative_output_error(torch.cat([w_new, bias.unsqueeze(1)], 1), torch.cat([w, zero], 1), g)
    assert float(got) == pytest.approx(error_from_x(w_new, w, x, bias), rel=1e-10)


def test_refit_towards_other_inputs_is_the_least_squares_fit_of_their_outputs():
    """With a cross term the refit fits X_K W'_K^T + b to X_t W^T (X_t: the inputs the original layer
    saw, e.g. the dense model's): against an explicit least squares with an intercept (no ridge)."""
    w, x_t = correlated_layer(8)
    g = generator(9)
    x = x_t + 0.3 * torch.randn(x_t.shape, generator=g, dtype=F64) + 0.2  # drifted inputs of the same tokens
    kept = torch.rand(w.shape[1], generator=g) > 0.4
    w_kept, bias = refit_kept_columns(w, x.T @ x, x.sum(0), x.shape[0], kept, damp=0.0, cross=x.T @ x_t,
                                      target_sum=x_t.sum(0))
    design = torch.cat([x[:, kept], torch.ones(x.shape[0], 1, dtype=F64)], 1)
    solution = torch.linalg.lstsq(design, x_t @ w.T).solution  # (k + 1, d_out)
    torch.testing.assert_close(w_kept, solution[:-1].T, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(bias, solution[-1], rtol=1e-7, atol=1e-8)
    # the input's own outputs as the target: the plain refit
    plain = refit_kept_columns(w, x.T @ x, x.sum(0), x.shape[0], kept)
    same = refit_kept_columns(w, x.T @ x, x.sum(0), x.shape[0], kept, cross=x.T @ x, target_sum=x.sum(0))
    for a, b in zip(plain, same):
        torch.testing.assert_close(a, b)


def test_admm_with_a_cross_term_converges_to_its_least_squares_optimum():
    w, x_t = correlated_layer(10)
    x = x_t + 0.3 * torch.randn(x_t.shape, generator=generator(11), dtype=F64)
    mask = torch.rand(w.shape, generator=generator(12)) > 0.5
    got = admm_fixed_mask(w, x.T @ x, mask, iterations=600, damp=0.1, cross=x.T @ x_t)
    expected = least_squares_on_support(w, x.T @ x, mask, damp=0.1, cross=x.T @ x_t)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    # and the cross term matters: the fit to the other inputs' outputs beats the plain update there
    plain = least_squares_on_support(w, x.T @ x, mask, damp=0.1)
    assert error_from_x(expected, w, x) > error_from_x(plain, w, x)  # on its own target the plain one wins
    target = x_t @ w.T
    assert (x @ expected.T - target).pow(2).sum() < (x @ plain.T - target).pow(2).sum()
    # admm_refit_columns with a cross term: the same problem, centred, with its intercept
    kept = mask[0]
    n = x.shape[0]
    w_kept, bias = admm_refit_columns(w, x.T @ x, x.sum(0), n, kept, iterations=600, cross=x.T @ x_t,
                                      target_sum=x_t.sum(0))
    mu, mu_t = x.mean(0), x_t.mean(0)
    centred = x.T @ x - n * torch.outer(mu, mu)
    direct = least_squares_on_support(w, centred, kept.expand_as(w), damp=0.1, cross=x.T @ x_t - n * torch.outer(mu, mu_t))
    torch.testing.assert_close(w_kept, direct[:, kept], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(bias, w @ mu_t - direct @ mu, rtol=1e-7, atol=1e-9)


def test_error_to_another_target_from_moments_equals_the_explicit_one():
    """relative_error_to_target: ||X W'^T + b - X_t W^T||^2 / ||X_t W^T||^2 from G, X^T X_t, G_t and
    the sums, against the explicit inputs; with X_t = X and b = 0 it is relative_output_error."""
    w, x_t = correlated_layer(13)
    g = generator(14)
    x = x_t + 0.3 * torch.randn(x_t.shape, generator=g, dtype=F64) + 0.1
    w_new = w * (torch.rand(w.shape, generator=g) > 0.5)
    bias = torch.randn(w.shape[0], generator=g, dtype=F64)
    got = relative_error_to_target(w_new, bias, w, x.T @ x, x.T @ x_t, x_t.T @ x_t, x.sum(0), x_t.sum(0), x.shape[0])
    target = x_t @ w.T
    want = ((x @ w_new.T + bias - target).pow(2).sum() / target.pow(2).sum()).item()
    assert float(got) == pytest.approx(want, rel=1e-10)
    zero = torch.zeros(w.shape[0], dtype=F64)
    same = relative_error_to_target(w_new, zero, w, x.T @ x, x.T @ x, x.T @ x, x.sum(0), x.sum(0), x.shape[0])
    assert float(same) == pytest.approx(float(relative_output_error(w_new, w, x.T @ x)), rel=1e-10)
