"""Magnitude scores on hand-computed tensors; budgets of uniform and global selection."""

import pytest
import torch
from tiny_models import tiny_model

from pruner.adapters import adapter_for
from pruner.scores import (head_weight_sq_norms, magnitude_channel_scores, magnitude_head_scores,
                           mlp_channel_sq_norms, standardize)
from pruner.selection import achieved_ratio, global_mask, uniform_counts, uniform_mask
from pruner.space import PruningSpace


def test_head_norms_by_hand():
    hd, H = 2, 3
    q = torch.arange(4 * hd * H, dtype=torch.float).view(4 * hd, H)  # 4 query heads
    k = torch.ones(2 * hd, H)
    v = 2 * torch.ones(2 * hd, H)
    o = torch.ones(H, 4 * hd)
    q_sq, kv_sq = head_weight_sq_norms(q, k, v, o, hd)
    expect_q = torch.stack([q[i * hd:(i + 1) * hd].pow(2).sum() + hd * H for i in range(4)])
    torch.testing.assert_close(q_sq, expect_q)
    torch.testing.assert_close(kv_sq, torch.full((2,), hd * H * (1 + 4.0)))
    kv_group = magnitude_head_scores(q_sq, kv_sq, "kv_group")
    torch.testing.assert_close(kv_group, torch.stack([(expect_q[0] + expect_q[1] + 30).sqrt(), (expect_q[2] + expect_q[3] + 30).sqrt()]))
    torch.testing.assert_close(magnitude_head_scores(q_sq, kv_sq, "query_head"), expect_q.sqrt())
    assert magnitude_head_scores(q_sq, kv_sq, "block").shape == (1,)


def test_channel_norms_by_hand():
    gate = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # d_ff=3, H=2
    up = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    down = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    sq = mlp_channel_sq_norms(gate, up, down, gate_bias=torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(sq, torch.tensor([1 + 1 + 9 + 1, 4 + 1 + 0, 2 + 0 + 2.0]))
    torch.testing.assert_close(magnitude_channel_scores(sq, "channel"), sq.sqrt())
    torch.testing.assert_close(standardize(torch.tensor([1.0, 2.0, 3.0])).float(), torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_uniform_selection_is_near_the_budget(granularity, ratio):
    model = tiny_model("llama")
    space = PruningSpace.from_model(model, adapter_for(model), granularity)
    scores_h = [torch.rand(space.n_head_units(l)) for l in range(space.n_layers)]
    scores_c = [torch.rand(space.n_channel_units(l)) for l in range(space.n_layers)]
    mask = uniform_mask(space, scores_h, scores_c, 1 - ratio)
    # once heads are fixed, half an MLP channel is the rounding step
    assert abs(achieved_ratio(space, mask) - ratio) <= 0.5 * space.channel_unit_cost(0) / space.layer_params(space.shapes[0], 0)
    head_counts, _ = uniform_counts(space, 1 - ratio)
    assert all(int(m.sum()) == k for m, k in zip(mask.heads, head_counts))
    space.kept_shapes(mask)  # query_head: even across groups, else this raises


def test_uniform_selection_keeps_the_top_scores():
    model = tiny_model("llama")
    space = PruningSpace.from_model(model, adapter_for(model), "kv_group")
    scores_c = [torch.arange(40, dtype=torch.float) for _ in range(space.n_layers)]
    scores_h = [torch.tensor([0.0, 1.0]) for _ in range(space.n_layers)]
    mask = uniform_mask(space, scores_h, scores_c, 0.5)
    for m, c in zip(mask.heads, mask.channels):
        assert m.tolist() == [False, True]
        k = int(c.sum())
        assert c[40 - k:].all() and not c[: 40 - k].any()


@pytest.mark.parametrize("granularity", ["kv_group", "query_head", "block"])
def test_global_selection_never_exceeds_the_budget(granularity):
    model = tiny_model("qwen2")
    space = PruningSpace.from_model(model, adapter_for(model), granularity)
    g = torch.Generator().manual_seed(0)
    for keep in (0.3, 0.6, 0.9):
        scores_h = [torch.randn(space.n_head_units(l), generator=g) for l in range(space.n_layers)]
        scores_c = [torch.randn(space.n_channel_units(l), generator=g) for l in range(space.n_layers)]
        mask = global_mask(space, scores_h, scores_c, keep)
        kept = space.kept_params(mask)
        if granularity != "query_head":  # evening out groups may round up by one head per group
            assert kept <= keep * space.decoder_linear_params() + 1e-6
        assert kept >= keep * space.decoder_linear_params() - max(space.head_unit_cost(0), space.channel_unit_cost(0)) * (
            space.shapes[0].n_kv if granularity == "query_head" else 1) - (space.decoder_linear_params() if granularity == "block" else 0)
