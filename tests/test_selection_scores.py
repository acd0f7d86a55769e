"""Magnitude scores on hand-computed tensors; budgets of uniform and global selection."""

import pytest
import torch
from tiny_models import tiny_model

from pruner.adapters import adapter_for
from pruner.scores import (head_weight_sq_norms, magnitude_channel_scores, magnitude_head_scores,
                           mlp_channel_sq_norms, standardize)
from pruner.budget import (achieved_ratio, global_mask, hard_mask, largest_step, project_probs, uniform_counts,
                           uniform_mask)
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
def test_uniform_selection_is_at_most_one_step_below_the_budget(granularity, ratio):
    model = tiny_model("llama")
    space = PruningSpace.from_model(model, adapter_for(model), granularity)
    scores_h = [torch.rand(space.n_head_units(l)) for l in range(space.n_layers)]
    scores_c = [torch.rand(space.n_channel_units(l)) for l in range(space.n_layers)]
    mask = uniform_mask(space, scores_h, scores_c, 1 - ratio)
    budget = (1 - ratio) * space.decoder_linear_params()
    assert budget - space.channel_unit_cost(0) < space.kept_params(mask) <= budget
    head_counts, _ = uniform_counts(space, 1 - ratio)
    assert all(int(m.sum()) == k for m, k in zip(mask.heads, head_counts))
    assert len({int(m.sum()) for m in mask.heads}) == 1  # the same heads in every layer
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


def random_model(seed: int):
    """A tiny model of random shapes (layers, heads, groups, head_dim, d_ff, biases)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    g = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    n_kv, group, head_dim = pick(1, 4), pick(1, 4), 2 * pick(2, 6)
    common = dict(vocab_size=32, hidden_size=n_kv * group * pick(2, 6), intermediate_size=pick(4, 48),
                  num_hidden_layers=pick(1, 4), num_attention_heads=n_kv * group, num_key_value_heads=n_kv,
                  head_dim=head_dim, max_position_embeddings=32)
    config = Qwen2Config(**common) if seed % 3 == 0 else LlamaConfig(**common, attention_bias=seed % 3 == 1,
                                                                       mlp_bias=seed % 3 == 1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("granularity", ["kv_group", "query_head", "block"])
def test_every_selection_keeps_at_most_the_budget_and_at_most_one_step_less(seed, granularity):
    """Property test on random shapes: global, uniform and PG hard masks never keep more than the
    budget, and (where the units allow) come within one step of it."""
    model = random_model(seed)
    space = PruningSpace.from_model(model, adapter_for(model), granularity)
    g = torch.Generator().manual_seed(seed)
    total, step = space.decoder_linear_params(), largest_step(space)
    for keep in (0.35, 0.6, 0.85):
        budget = keep * total
        scores_h = [torch.randn(space.n_head_units(l), generator=g) for l in range(space.n_layers)]
        scores_c = [torch.randn(space.n_channel_units(l), generator=g) for l in range(space.n_layers)]
        masks = {"global": global_mask(space, scores_h, scores_c, keep)}
        if granularity != "block":
            masks["uniform"] = uniform_mask(space, scores_h, scores_c, keep)
        s_h, s_c = torch.rand(sum(map(len, scores_h)), generator=g), torch.rand(sum(map(len, scores_c)), generator=g)
        for budget_kind in ("separate", "joint"):
            for scope in ("global", "per_layer"):
                masks[f"pg-{budget_kind}-{scope}"] = hard_mask(space, s_h, s_c, keep, budget_kind, scope)
        for name, mask in masks.items():
            kept = space.kept_params(mask)
            space.kept_shapes(mask)  # a valid mask (query heads even across groups)
            assert kept <= budget + 1e-6, (name, kept, budget)
            if granularity != "block" and not name.endswith("per_layer"):
                assert kept > budget - step - 1e-6, (name, kept, budget, step)


def test_projection_and_hard_mask_hold_the_budget_for_every_form():
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    for granularity in ("kv_group", "query_head"):
        space = PruningSpace.from_model(model, adapter, granularity)
        costs = space.unit_costs()
        g = torch.Generator().manual_seed(1)
        for budget in ("separate", "joint"):
            for scope in ("global", "per_layer"):
                s_h = torch.rand(len(costs[0]), generator=g, dtype=torch.float64) + 0.5
                s_c = torch.rand(len(costs[1]), generator=g, dtype=torch.float64) + 0.5
                p_h, p_c = project_probs(space, s_h, s_c, 0.6, budget, scope, costs)
                total = float((p_h * costs[0]).sum() + (p_c * costs[1]).sum())
                assert total <= 0.6 * float(costs[0].sum() + costs[1].sum()) * (1 + 1e-3)
