"""Probe Pruning math on tiny random tensors, checked against oracles and hand counts."""

import math

import pytest
import torch

from pruner import probe_math as pm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=gen(seed)).to(device)


# --- selection -------------------------------------------------------------------------------

def test_residual_importance_is_the_norm_over_hidden(device):
    r = rand(3, 5, 8, device=device)
    n = pm.residual_importance(r)
    assert n.shape == (3, 5)
    assert torch.allclose(n, (r ** 2).sum(-1).sqrt())


def test_whole_batch_probe_equals_the_oracle(device):
    """sample/position fraction 1 and no history: selection, energy and scores are the
    full-batch oracle's (sum over every sample and position of A^2, divided by B)."""
    b, t, c, hidden = 4, 16, 12, 6
    norms = pm.residual_importance(rand(b, t, hidden, seed=1, device=device))
    samples, positions = pm.select_probe(norms, position_fraction=1.0, sample_fraction=1.0)
    assert samples.tolist() == list(range(b))
    assert positions.tolist() == list(range(t))

    acts = rand(b, t, c, seed=2, device=device)
    probe = acts[samples][:, positions]
    c_fused = pm.fuse_with_history(pm.probe_channel_energy(probe), None, positions)
    oracle = (acts ** 2).sum((0, 1)) / b
    assert torch.allclose(c_fused, oracle, rtol=1e-6)

    w_down = rand(hidden, c, seed=3, device=device)
    assert torch.allclose(pm.ppsp_channel_scores(c_fused, w_down), pm.ppsp_channel_scores(oracle, w_down))
    # a zero history changes C_sj = Pr^2 / (Pr + 1e-6) only by about 1e-6
    zero = torch.zeros(t, c, device=device)
    assert torch.allclose(pm.fuse_with_history(pm.probe_channel_energy(probe), zero, positions), oracle, rtol=1e-5)


def test_select_probe_counts_and_scores():
    b, t = 20, 32
    norms = torch.rand(b, t, generator=gen(4)) + 0.1
    samples, positions = pm.select_probe(norms)  # defaults 0.5 / 0.05
    assert positions.numel() == 16 and samples.numel() == 1  # ceil(32 * 0.5), ceil(20 * 0.05)
    token_score = norms.norm(dim=0)
    assert set(positions.tolist()) == set(token_score.topk(16).indices.tolist())
    assert torch.equal(positions, positions.sort().values)
    sample_score = norms[:, positions].norm(dim=1)
    assert samples.tolist() == [int(sample_score.argmax())]


def test_sample_score_uses_only_the_kept_positions():
    # sample 0 is the loudest over all positions, sample 2 over the positions the probe keeps
    norms = torch.tensor([[30.0, 30.0, 1.0, 1.0],
                          [0.0, 0.0, 20.0, 20.0],
                          [0.0, 0.0, 21.0, 21.0],
                          [0.0, 0.0, 20.0, 20.0]])
    samples, positions = pm.select_probe(norms, position_fraction=0.5, sample_fraction=0.2,
                                         force_first_if_at_most=0)
    assert positions.tolist() == [2, 3]  # token scores 35.2 > 30
    assert samples.tolist() == [2]


def test_selection_forces_token_zero_when_few_positions_are_kept():
    t = 12
    norms = torch.ones(2, t)
    norms[:, 0] = 0.01  # token 0 is the quietest
    norms[:, 5] = 3.0
    norms[:, 9] = 2.0
    # k_T = max(ceil(12 * 0.1), 2) = 2 <= 10: the lower of {5, 9} is replaced by token 0
    _, positions = pm.select_probe(norms, position_fraction=0.1, sample_fraction=0.5)
    assert positions.tolist() == [0, 9]
    # no forcing above the threshold
    _, positions = pm.select_probe(norms, position_fraction=0.1, sample_fraction=0.5, force_first_if_at_most=1)
    assert positions.tolist() == [5, 9]


def test_probe_counts_round_like_the_reference():
    assert pm.probe_count(1024, 0.5, 2) == 512
    assert pm.probe_count(20, 0.05) == 1
    assert pm.probe_count(21, 0.05) == 2  # ceil(1.05)
    assert pm.probe_count(3, 0.1, 2) == 2  # the minimum of 2 positions
    assert pm.probe_count(1, 0.5, 2) == 1  # capped at T
    assert pm.probe_count(100, 0.07) == math.ceil(100 * 0.07) == 8  # float product, as the reference
    with pytest.raises(ValueError):
        pm.probe_count(10, 0.0)


def test_batch_of_one_sequence(device):
    t, c = 7, 5
    norms = pm.residual_importance(rand(1, t, 4, seed=5, device=device))
    samples, positions = pm.select_probe(norms)
    assert samples.tolist() == [0]
    assert positions.numel() == 4 and positions[0] == 0  # ceil(3.5) = 4 <= 10 forces token 0
    acts = rand(1, t, c, seed=6, device=device)
    pr = pm.probe_channel_energy(acts[samples][:, positions])
    assert torch.allclose(pr, acts[0, positions] ** 2)
    hist = pm.calibration_history([acts])
    assert torch.allclose(hist, acts[0] ** 2)
    fused = pm.fuse_with_history(pr, hist, positions)
    assert torch.allclose(fused, pr.sum(0), rtol=1e-5)  # Pr == Hs: C_sj = Pr
    kept = pm.keep_indices(fused, 0.4)
    new = pm.update_history(hist, acts[:, :, kept], kept)
    assert torch.allclose(new, hist)  # the same batch again: the EMA is a fixed point


# --- fusion and scores -----------------------------------------------------------------------

def test_fusion_matches_the_reference_closed_form(device):
    tp, c, s = 5, 6, 9
    pr = rand(tp, c, seed=7, device=device).abs()
    hist = rand(s, c, seed=8, device=device).abs()
    positions = torch.tensor([0, 2, 3, 6, 8], device=device)
    hs = hist[positions]
    eps = 1e-6
    expected = ((hs ** 2 + pr ** 2 + eps * hs) / (pr + hs + eps)).sum(0)
    assert torch.allclose(pm.fuse_with_history(pr, hist, positions), expected, rtol=1e-6)
    assert torch.allclose(pm.fuse_with_history(pr, hist.cpu(), positions.cpu()), expected, rtol=1e-6)
    paper = ((hs ** 2 + pr ** 2) / (pr + hs + eps)).sum(0)
    assert torch.allclose(pm.fuse_with_history(pr, hist, positions), paper, atol=tp * eps)

    # small energies separate the reference's eps * Hs term from the paper's form
    pr_small, hist_small = pr * 1e-3, hist * 1e-3
    hs_small = hist_small[positions]
    fused = pm.fuse_with_history(pr_small, hist_small, positions)
    ref = ((hs_small ** 2 + pr_small ** 2 + eps * hs_small) / (pr_small + hs_small + eps)).sum(0)
    paper_small = ((hs_small ** 2 + pr_small ** 2) / (pr_small + hs_small + eps)).sum(0)
    assert torch.allclose(fused, ref, rtol=1e-5)
    assert not torch.allclose(fused, paper_small, rtol=1e-5)

    a = 0.3
    assert torch.allclose(pm.fuse_fixed(pr, hist, positions, a), (a * pr + (1 - a) * hs).sum(0))
    assert torch.allclose(pm.fuse_fixed(pr, hist, positions, 1.0), pr.sum(0))


def test_fusion_past_the_end_of_the_history_falls_back_to_the_probe():
    pr = torch.rand(3, 4, generator=gen(9)) + 0.5
    hist = torch.rand(2, 4, generator=gen(10))
    positions = torch.tensor([1, 4, 6])
    fused = pm.fuse_with_history(pr, hist, positions)
    hs1 = hist[1]
    first = (hs1 ** 2 + pr[0] ** 2 + 1e-6 * hs1) / (pr[0] + hs1 + 1e-6)
    assert torch.allclose(fused, first + pr[1] + pr[2], rtol=1e-5)


def test_ppsp_channel_scores_by_hand(device):
    c = rand(5, seed=11, device=device).abs()
    w = rand(3, 5, seed=12, device=device)
    expected = torch.stack([c[j] * math.sqrt(sum(float(w[i, j]) ** 4 for i in range(3))) for j in range(5)])
    assert torch.allclose(pm.ppsp_channel_scores(c, w), expected.to(device), rtol=1e-5)


def test_ppsp_head_scores_by_hand_and_groups(device):
    hidden, heads, head_dim = 4, 4, 3
    c = rand(heads * head_dim, seed=13, device=device).abs()
    w = rand(hidden, heads * head_dim, seed=14, device=device)
    by_hand = []
    for h in range(heads):
        total = sum((float(c[j]) * float(w[i, j]) ** 2) ** 2
                    for i in range(hidden) for j in range(h * head_dim, (h + 1) * head_dim))
        by_hand.append(math.sqrt(total))
    q = pm.ppsp_head_scores(c, w, head_dim)
    assert torch.allclose(q, torch.tensor(by_hand, device=device), rtol=1e-5)
    groups = pm.ppsp_head_scores(c, w, head_dim, group_size=2)
    assert torch.allclose(groups, torch.stack([q[0] + q[1], q[2] + q[3]]))
    with pytest.raises(ValueError):
        pm.ppsp_head_scores(c, w, head_dim, group_size=3)


# --- counts and ratio ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 10, 32, 100, 11008])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.35, 0.4, 0.5, 0.9, 0.99])
def test_keep_indices_meets_the_count_exactly(n, ratio):
    scores = torch.rand(n, generator=gen(n))
    kept = pm.keep_indices(scores, ratio)
    expected = max(1, math.floor((1 - ratio) * n + 0.5))
    assert kept.numel() == expected
    assert torch.equal(kept, kept.sort().values)
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[kept] = False
    if dropped.any():
        assert scores[kept].min() >= scores[dropped].max()


def test_keep_count_rounding_and_multiple():
    assert pm.keep_count(10, 0.35) == 7  # 6.5 rounds half up
    assert pm.keep_count(10, 0.45) == 6  # 5.5
    assert pm.keep_count(10, 0.99) == 1  # at least one
    assert pm.keep_count(11008, 0.44, multiple=64) == 6208  # as the reference on LLaMA-2-7B
    assert pm.keep_count(100, 0.1, multiple=64) == 100  # capped at n
    with pytest.raises(ValueError):
        pm.keep_count(10, 1.0)


def test_redistributed_ratio():
    assert pm.redistributed_ratio(0.4, 32, 3) == pytest.approx(32 / 29 * 0.4)
    assert pm.redistributed_ratio(0.4, 32, 3, decimals=2) == 0.44
    assert pm.redistributed_ratio(0.3, 12, 0) == 0.3
    with pytest.raises(ValueError, match="unreachable"):
        pm.redistributed_ratio(0.5, 4, 2)  # needs 1.0
    with pytest.raises(ValueError, match="at least one"):
        pm.redistributed_ratio(0.1, 3, 3)


# --- history ---------------------------------------------------------------------------------

def test_update_history_touches_only_kept_channels(device):
    s, c, b, t = 6, 5, 3, 4
    hist = rand(s, c, seed=15, device=device).abs()
    kept = torch.tensor([3, 0, 4], device=device)  # any order, as the reference's score order
    acts = rand(b, t, kept.numel(), seed=16, device=device)
    new = pm.update_history(hist, acts, kept, momentum=0.9)
    expected = hist.clone()
    for k, j in enumerate(kept.tolist()):
        expected[:t, j] = 0.9 * hist[:t, j] + 0.1 * (acts[:, :, k] ** 2).mean(0)
    assert torch.allclose(new, expected)
    assert torch.equal(new[:, [1, 2]], hist[:, [1, 2]])  # pruned channels untouched
    assert torch.equal(new[t:], hist[t:])  # positions past the batch untouched
    assert not torch.equal(hist, new) and hist.data_ptr() != new.data_ptr()


def test_update_history_extends_a_short_history(device):
    hist = torch.ones(2, 3, device=device)
    acts = torch.full((2, 4, 3), 2.0, device=device)
    new = pm.update_history(hist, acts, torch.arange(3, device=device), momentum=0.5)
    assert new.shape == (4, 3)
    assert torch.allclose(new[:2], torch.full((2, 3), 2.5, device=device))  # 0.5 * 1 + 0.5 * 4
    assert torch.allclose(new[2:], torch.full((2, 3), 2.0, device=device))  # 0.5 * 0 + 0.5 * 4
    with pytest.raises(ValueError):
        pm.update_history(hist, acts, torch.arange(2, device=device))


def test_calibration_history_is_the_per_position_mean(device):
    a = rand(3, 5, 4, seed=17, device=device)
    b = rand(2, 3, 4, seed=18, device=device)
    hist = pm.calibration_history([a, b])
    assert hist.shape == (5, 4)
    assert torch.allclose(hist[:3], (torch.cat([a[:, :3], b]) ** 2).mean(0))
    assert torch.allclose(hist[3:], (a[:, 3:] ** 2).mean(0))
    assert torch.allclose(pm.calibration_history([a[:2], a[2:]]), (a ** 2).mean(0))


# --- flops -----------------------------------------------------------------------------------

def test_flops_by_hand():
    # B=2, T=4, H=8, n_q=2, n_kv=1, d=4 (q width 8, k/v width 4), d_ff=16
    dense = pm.dense_flops(batch=2, seqlen=4, hidden=8, heads=2, kv_heads=1, head_dim=4, d_ff=16)
    # q: 8 tokens x 8 x 8 = 512 MACs, k, v: 8 x 8 x 4 = 256 each, o: 8 x 8 x 8 = 512 -> 1536 MACs
    assert dense["attn_proj"] == 2 * 1536
    # per sequence and head: QK^T 4 x 4 x 4 = 64 MACs, PV 64 -> 2 x 2 x 128 = 512 MACs
    assert dense["attn_scores"] == 2 * 512
    # gate, up, down: 8 tokens x 8 x 16 = 1024 MACs each
    assert dense["mlp"] == 2 * 3072
    assert dense["total"] == 2 * (1536 + 512 + 3072)

    probe = pm.probe_flops(batch=2, seqlen=4, probe_batch=1, probe_positions=2, hidden=8, heads=2,
                           kv_heads=1, head_dim=4, d_ff=16)
    # residual norms: 8 tokens x 8 squares and adds, before attention and before the MLP
    assert probe["selection"] == 2 * 2 * 64
    # q, k, v on 2 tokens: 2 x 8 x (8 + 4 + 4) = 256 MACs; no o_proj
    assert probe["attn_proj"] == 2 * 256
    # 1 sequence, 2 heads, 2 x 2 tokens x 4: QK^T 16 and PV 16 MACs per head -> 64
    assert probe["attn_scores"] == 2 * 64
    # gate, up on 2 tokens: 2 x 8 x 16 = 256 each; no down_proj
    assert probe["mlp"] == 2 * 512
    assert probe["total"] == 256 + 512 + 128 + 1024


def test_ppsp_from_column_moments_equals_the_direct_scores(device):
    """The pruner scores with sum_i W_ij^4 computed once per layer; same numbers as the direct forms."""
    w_o, w_down = rand(10, 12, seed=20, device=device), rand(10, 16, seed=21, device=device)
    c_attn, c_mlp = rand(12, seed=22, device=device).abs(), rand(16, seed=23, device=device).abs()
    for group in (1, 2):
        torch.testing.assert_close(pm.ppsp_head_scores_from(c_attn, pm.column_fourth_moments(w_o), 3, group),
                                   pm.ppsp_head_scores(c_attn, w_o, 3, group), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pm.ppsp_channel_scores_from(c_mlp, pm.column_fourth_moments(w_down)),
                               pm.ppsp_channel_scores(c_mlp, w_down), rtol=1e-5, atol=1e-6)


def test_accumulated_squares_merge_batches_of_different_lengths():
    a, b = rand(2, 5, 3, seed=30), rand(3, 7, 3, seed=31)
    h = pm.history_from(pm.accumulate_squares(pm.accumulate_squares(None, a), b))
    expected = torch.cat([(torch.cat([a[:, :5], b[:, :5]]) ** 2).mean(0), (b[:, 5:] ** 2).mean(0)])
    torch.testing.assert_close(h, expected)
    torch.testing.assert_close(pm.calibration_history([a, b]), expected)


def test_probe_attention_output_masks_by_true_position_and_window():
    """Token i sees j when p_j <= p_i and p_i - p_j < window; a single visible key returns its value."""
    q, k = rand(1, 1, 3, 2, seed=32), rand(1, 1, 3, 2, seed=33)
    v = torch.arange(6.0).view(1, 1, 3, 2)
    positions = torch.tensor([0, 5, 9])
    out = pm.probe_attention_output(q, k, v, positions, scaling=1.0, sliding_window=4)
    torch.testing.assert_close(out.view(3, 2), v.view(3, 2))  # gaps 5 and 4 are outside a window of 4
    full = pm.probe_attention_output(q, k, v, positions, scaling=1.0)
    scores = (q[0, 0] @ k[0, 0].T).masked_fill(torch.ones(3, 3).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(full.view(3, 2), torch.softmax(scores, -1) @ v[0, 0])
