"""Wanda-sp and FLAP scores and FLAP's bias compensation against hand-computed values."""

from types import SimpleNamespace

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from pruner.adapters import adapter_for
from pruner.calibration import InputStats, collect_input_stats, input_means
from pruner.masking import masked
from pruner.prune import compensation as bias_compensation
from pruner.scores import flap_bias, flap_channel_scores, group_channels, wanda_sp_channel_scores
from pruner.space import Mask, PruningSpace

W = torch.tensor([[1.0, -2.0, 0.0],
                  [3.0, 4.0, -1.0]])  # (out=2, in=3)


def test_wanda_sp_channel_scores_by_hand():
    x_l2 = torch.tensor([2.0, 0.5, 10.0])
    # mean_i |W_ij| = (2, 3, 0.5), times ||X_j||
    assert torch.allclose(wanda_sp_channel_scores(W, x_l2), torch.tensor([4.0, 1.5, 5.0], dtype=torch.float64))


def test_flap_channel_scores_by_hand():
    x_var = torch.tensor([1.0, 0.25, 4.0])
    # ||W[:, j]||^2 = (10, 20, 1), times Var(X_j)
    assert torch.allclose(flap_channel_scores(W, x_var), torch.tensor([10.0, 5.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("granularity, reduce, expected", [
    ("query_head", "sum", [3.0, 7.0, 11.0, 15.0]),
    ("kv_group", "sum", [10.0, 26.0]),
    ("kv_group", "mean", [5.0, 13.0]),
    ("block", "sum", [36.0]),
])
def test_group_channels_by_hand(granularity, reduce, expected):
    per_channel = torch.arange(1.0, 9.0)  # 4 query heads of head_dim 2, 2 per kv group
    got = group_channels(per_channel, head_dim=2, group_size=2, granularity=granularity, reduce=reduce)
    assert got.tolist() == expected


def test_input_stats_match_torch_over_chunks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g) * 3 + 1
    stats = InputStats.empty(5)
    for chunk in x.split(1):
        stats.add(chunk)
    flat = x.reshape(-1, 5).double()
    assert stats.count == 21
    assert torch.allclose(stats.mean, flat.mean(0))
    assert torch.allclose(stats.var, flat.var(0, unbiased=False))


def test_flap_bias_keeps_the_mean_output():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g) + torch.arange(6.0)
    w = torch.randn(4, 6, generator=g)
    removed = torch.tensor([True, False, True, False, False, True])
    dense_mean = (x @ w.T).double().mean(0)
    pruned = x[:, ~removed] @ w[:, ~removed].T
    assert torch.allclose(pruned.double().mean(0) + flap_bias(w, x.mean(0), removed), dense_mean, atol=1e-5)


@pytest.mark.parametrize("sublayer", ["o_proj", "down_proj"])
def test_bias_compensation_restores_the_mean_of_the_first_pruned_sublayer(sublayer):
    """Prune layer 0's heads (or its MLP channels) only: that o_proj (down_proj) still sees the dense
    inputs on its kept columns, so its output mean plus the compensation is the dense output mean."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "query_head")
    windows = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    stats = collect_input_stats(model, adapter, windows)
    heads = [torch.ones(space.n_head_units(l), dtype=torch.bool) for l in range(space.n_layers)]
    channels = [torch.ones(space.n_channel_units(l), dtype=torch.bool) for l in range(space.n_layers)]
    if sublayer == "o_proj":
        first_of_each_group = torch.ones(space.shapes[0].n_kv, space.shapes[0].group_size, dtype=torch.bool)
        first_of_each_group[:, 0] = False  # units are ordered group by group
        heads[0] = first_of_each_group.flatten()
    else:
        channels[0][::3] = False
    mask = Mask(tuple(heads), tuple(channels))
    loaded = SimpleNamespace(model=model, adapter=adapter)
    updates = {(l, which): delta for l, which, delta in bias_compensation(loaded, space, mask, stats)}
    assert set(updates) == {(0, sublayer)}

    def mean_output(mask_or_none):
        module = adapter.attention(model, 0).o_proj if sublayer == "o_proj" else adapter.mlp(model, 0).down_proj
        outs = []
        hook = module.register_forward_hook(lambda _m, _i, out: outs.append(out.reshape(-1, out.shape[-1])))
        try:
            with torch.no_grad(), masked(model, adapter, space, mask_or_none):
                model(windows)
        finally:
            hook.remove()
        return torch.cat(outs).double().mean(0)

    dense, pruned = mean_output(None), mean_output(mask)
    scale = dense.abs().max()
    assert (pruned - dense).abs().max() > 0.05 * scale  # the pruning moved the mean ...
    assert torch.allclose(pruned + updates[(0, sublayer)], dense, atol=1e-4 * scale)  # ... the bias puts it back


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
def test_mean_filled_masked_logits_equal_sliced_logits_with_compensation(arch, granularity):
    """What PG scores with bias compensation is exactly the model it saves: masked with removed
    channels set to their calibration means == sliced, plus FLAP's bias."""
    from test_space_masking_slicing import random_mask

    from pruner.config import PruneConfig
    from pruner.methods import Selection
    from pruner.prune import apply

    model = tiny_model(arch)
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, granularity)
    g = torch.Generator().manual_seed(3)
    stats = collect_input_stats(model, adapter, torch.randint(0, 97, (4, 16), generator=g))
    fill = input_means(stats)
    mask = random_mask(space, seed=4)
    ids = torch.randint(0, 97, (2, 10), generator=g)
    with torch.no_grad(), masked(model, adapter, space, mask, fill):
        want = model(ids).logits
    sliced, _ = apply(SimpleNamespace(model=model, adapter=adapter), PruneConfig(), space, Selection(mask, compensate=True),
                      stats)
    with torch.no_grad():
        got = sliced(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
