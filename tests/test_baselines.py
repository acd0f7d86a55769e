"""The baselines against plain re-implementations of their reference code, written here loop by loop."""

import dataclasses

import pytest
import torch
from tiny_models import tiny_corpus, tiny_loaded

from pruner.budget import keep_fraction, uniform_counts
from pruner.config import PruneConfig
from pruner.errors import PrunerError
from pruner.methods import flap, taylor, wanda_sp
from pruner.prune import prune, select
from pruner.space import PruningSpace
from pruner.windows import calibration_windows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(tiny_corpus(tmp_path_factory.mktemp("corpus") / "text.txt", words=8000))


def dense_inputs(loaded, windows):
    """Per layer, every calibration token's input to o_proj and to down_proj: (tokens, C) each."""
    got = {}
    handles = []
    for l, layer in enumerate(loaded.model.model.layers):
        for name, linear in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            def hook(module, args, key=(l, name)):
                got.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
            handles.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        loaded.model(windows)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def plain_flap_mask(loaded, windows, ratio):
    """FLAP AL-AM / WIFV as lib/prune.py::prune_flap does it, for kv groups (GQA: mean of the group's
    channels), with exact costs, keeping the longest prefix of the ranking that fits the budget."""
    cfg = loaded.model.config
    hd, n_q, n_kv, h = cfg.head_dim if hasattr(cfg, "head_dim") else cfg.hidden_size // cfg.num_attention_heads, \
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    g = n_q // n_kv
    x = dense_inputs(loaded, windows)
    units, costs, owners = [], [], []
    for l, layer in enumerate(loaded.model.model.layers):
        w_o = layer.self_attn.o_proj.weight.detach().double()
        a = (x[(l, "o")].var(0, unbiased=False) * w_o.pow(2).sum(0)) ** 2
        z = (a - a.mean()) / torch.std(a)
        for kv in range(n_kv):
            units.append(float(z[kv * g * hd:(kv + 1) * g * hd].mean().detach()))
            costs.append(hd * h * (2 * g + 2))
            owners.append(("head", l, kv))
        w_d = layer.mlp.down_proj.weight.detach().double()
        m = x[(l, "down")].var(0, unbiased=False) * w_d.pow(2).sum(0)
        zm = (m - m.mean()) / torch.std(m)
        for j in range(len(zm)):
            units.append(float(zm[j]))
            costs.append(3 * h)
            owners.append(("channel", l, j))
    order = sorted(range(len(units)), key=lambda i: -units[i])
    budget, used, kept = (1 - ratio) * sum(costs), 0, set()
    for i in order:
        if used + costs[i] > budget:
            break
        used += costs[i]
        kept.add(owners[i])
    return kept


def test_flap_matches_a_plain_reimplementation_of_its_reference(corpus):
    loaded = tiny_loaded("llama")
    for ratio in (0.2, 0.4, 0.6):
        config = PruneConfig(method="flap", ratio=ratio, granularity="kv_group", data=corpus, calib_windows=6,
                             calib_seqlen=16)
        windows = calibration_windows(loaded.tokenizer, corpus, "train", 6, 16, config.seed)
        expected = plain_flap_mask(loaded, windows, ratio)
        space, selection = select(loaded, config)
        got = {("head", l, u) for l, m in enumerate(selection.mask.heads) for u in m.nonzero().flatten().tolist()}
        got |= {("channel", l, u) for l, m in enumerate(selection.mask.channels) for u in m.nonzero().flatten().tolist()}
        assert got == expected, ratio
        assert selection.compensate


@pytest.mark.parametrize("metric", ["flap", "taylor"])
def test_the_mask_init_starts_the_search_at_the_metric_methods_own_mask(corpus, metric):
    """init=mask with the joint budget: the search's first hard mask keeps every unit the method's
    mask keeps (its allocation across layers and between heads and channels), topped up with removed
    units only as far as the budget allows where the method removed more than the ratio."""
    from pruner.budget import achieved_ratio
    from pruner.methods.pg import build_run
    from pruner.pg.config import PGConfig

    loaded = tiny_loaded("llama")
    for ratio in (0.2, 0.4):
        pg = PGConfig(init="mask", init_metric=metric, budget="joint", seqlen=16, eval_windows=2, steps=1)
        config = PruneConfig(method="pg", ratio=ratio, granularity="kv_group", data=corpus, calib_windows=6,
                             calib_seqlen=16, pg=pg)
        space, own = select(loaded, dataclasses.replace(config, method=metric))
        run = build_run(loaded, space, config)
        start = run.current_mask()
        flat = lambda m: torch.cat([u.flatten() for u in m.heads + m.channels]).bool()  # noqa: E731
        kept, started = flat(own.mask), flat(start)
        assert started[kept].all(), ratio
        assert achieved_ratio(space, own.mask) >= achieved_ratio(space, start) >= ratio - 0.02, ratio
        s = torch.cat([run.s_h, run.s_c])
        assert float(s[kept].min()) > float(s[~kept].max()), ratio


def test_flap_scores_standardise_per_layer_and_average_channels():
    """A head's score is the mean of its channels' per-layer z-scores (not a sum, not over all layers)."""
    loaded = tiny_loaded("qwen2")
    space = PruningSpace.from_model(loaded.model, loaded.adapter, "query_head")
    from pruner.calibration import collect_input_stats
    from pruner.scores import group_channels, standardize

    st = collect_input_stats(loaded.model, loaded.adapter, torch.randint(3, 93, (4, 12)))
    attn, mlp = flap.channel_scores(loaded, space, st)
    for l, s in enumerate(space.shapes):
        z = (attn[l] - attn[l].mean()) / attn[l].std()
        torch.testing.assert_close(attn[l], (st[0][l].var * loaded.adapter.output_linear(
            loaded.model, l, "o_proj").weight.double().pow(2).sum(0)) ** 2)
        expected = z.view(s.n_q, s.head_dim).mean(1)
        got = group_channels(standardize(attn[l], unbiased=True), s.head_dim, s.group_size, "query_head",
                             reduce="mean", head_reduce="mean")
        torch.testing.assert_close(got, expected)


def plain_taylor_scores(loaded, windows):
    """|w * dL/dw| summed over each kv group's q/k/v rows and o columns, and each channel's gate/up rows
    and down column, after one backward pass of the mean token loss (hf_prune.py, param_first, sum)."""
    model = loaded.model
    model.zero_grad()
    with torch.enable_grad():
        logits = model(windows).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        loss.backward()
    cfg = model.config
    hd, n_kv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads
    g = cfg.num_attention_heads // n_kv
    heads, channels = [], []
    for layer in model.model.layers:
        a = layer.self_attn
        sal = {n: (getattr(a, n).weight * getattr(a, n).weight.grad).abs().double().detach()
               for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        per = []
        for kv in range(n_kv):
            q_rows = slice(kv * g * hd, (kv + 1) * g * hd)
            kv_rows = slice(kv * hd, (kv + 1) * hd)
            per.append(float(sal["q_proj"][q_rows].sum() + sal["o_proj"][:, q_rows].sum()
                             + sal["k_proj"][kv_rows].sum() + sal["v_proj"][kv_rows].sum()))
        heads.append(torch.tensor(per, dtype=torch.float64))
        m = layer.mlp
        ch = ((m.gate_proj.weight * m.gate_proj.weight.grad).abs().sum(1) + (m.up_proj.weight * m.up_proj.weight.grad).abs().sum(1)
              + (m.down_proj.weight * m.down_proj.weight.grad).abs().sum(0))
        channels.append(ch.double())
    model.zero_grad()
    return heads, channels


def test_taylor_matches_a_plain_reimplementation_of_its_reference(corpus):
    loaded = tiny_loaded("llama")
    config = PruneConfig(method="taylor", ratio=0.3, granularity="kv_group", data=corpus, calib_windows=8, calib_seqlen=16)
    space = PruningSpace.from_model(loaded.model, loaded.adapter, "kv_group")
    heads, channels = taylor.unit_scores(loaded, space, config)
    windows = calibration_windows(loaded.tokenizer, corpus, "train", 8, 16, 0)
    want_h, want_c = plain_taylor_scores(loaded, windows)
    for got, want in zip(heads + channels, want_h + want_c):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in loaded.model.parameters())  # the shared model is left clean


def test_taylor_keeps_the_first_four_and_last_two_layers_dense():
    from tiny_models import COMMON
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pruner.adapters import adapter_for

    deep = AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "num_hidden_layers": 10}))
    space = PruningSpace.from_model(deep, adapter_for(deep), "kv_group")
    dense = taylor.dense_layers(space.n_layers)
    assert dense == (0, 1, 2, 3, 8, 9)
    heads, channels = uniform_counts(space, keep_fraction(0.2), dense)
    for l in dense:
        assert heads[l] == space.n_head_units(l) and channels[l] == space.n_channel_units(l)
    assert len({heads[l] for l in range(4, 8)}) == 1  # the pruned layers are pruned alike
    assert all(channels[l] < space.n_channel_units(l) for l in range(4, 8))


def test_wanda_sp_scores_are_the_reference_scores(corpus):
    """Column score mean_i |W_ij| ||X_j||; a head sums its channels; a kv group averages its heads."""
    loaded = tiny_loaded("llama")
    config = PruneConfig(method="wanda-sp", ratio=0.3, granularity="kv_group", data=corpus, calib_windows=6, calib_seqlen=16)
    space = PruningSpace.from_model(loaded.model, loaded.adapter, "kv_group")
    heads, channels = wanda_sp.unit_scores(loaded, space, config)
    x = dense_inputs(loaded, calibration_windows(loaded.tokenizer, corpus, "train", 6, 16, 0))
    for l, layer in enumerate(loaded.model.model.layers):
        s = space.shapes[l]
        col = layer.self_attn.o_proj.weight.double().abs().mean(0) * x[(l, "o")].pow(2).sum(0).sqrt()
        torch.testing.assert_close(heads[l], col.view(s.n_q, s.head_dim).sum(1).view(s.n_kv, s.group_size).mean(1))
        col = layer.mlp.down_proj.weight.double().abs().mean(0) * x[(l, "down")].pow(2).sum(0).sqrt()
        torch.testing.assert_close(channels[l], col)


def plain_sequential_wanda_sp_mask(loaded, windows, ratio):
    """FLAP repository, lib/prune.py::prune_wanda_sp, for kv groups: layer by layer, the norms of the
    o_proj / down_proj inputs with the layers before it already pruned (here: a whole forward of a
    copy whose earlier layers have their removed columns zeroed), the layer's top units kept by
    score, its removed o_proj / down_proj columns zeroed."""
    import copy

    model = copy.deepcopy(loaded.model)
    space = PruningSpace.from_model(model, loaded.adapter, "kv_group")
    head_counts, channel_counts = uniform_counts(space, keep_fraction(ratio))
    heads, channels = [], []
    for l, layer in enumerate(model.model.layers):
        s = space.shapes[l]
        x = dense_inputs(dataclasses.replace(loaded, model=model), windows)  # through the pruned layers
        w_o, w_d = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
        col = w_o.detach().double().abs().mean(0) * x[(l, "o")].pow(2).sum(0).sqrt()
        unit = col.view(s.n_q, s.head_dim).sum(1).view(s.n_kv, s.group_size).mean(1)
        keep_h = torch.zeros(s.n_kv, dtype=torch.bool)
        keep_h[torch.argsort(unit, descending=True, stable=True)[:head_counts[l]]] = True
        col = w_d.detach().double().abs().mean(0) * x[(l, "down")].pow(2).sum(0).sqrt()
        keep_c = torch.zeros(s.d_ff, dtype=torch.bool)
        keep_c[torch.argsort(col, descending=True, stable=True)[:channel_counts[l]]] = True
        with torch.no_grad():
            w_o[:, ~keep_h.repeat_interleave(s.group_size * s.head_dim)] = 0
            w_d[:, ~keep_c] = 0
        heads.append(keep_h)
        channels.append(keep_c)
    return heads, channels


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_sequential_wanda_sp_is_the_reference_order(corpus, ratio):
    """--wanda-sp-stats sequential equals the plain layer-by-layer loop; its first layer equals the
    dense statistics' (same inputs), and later layers see the pruned ones (the masks differ)."""
    loaded = tiny_loaded("llama")
    config = PruneConfig(method="wanda-sp", ratio=ratio, granularity="kv_group", data=corpus, calib_windows=6,
                         calib_seqlen=16, wanda_sp_stats="sequential")
    space = PruningSpace.from_model(loaded.model, loaded.adapter, "kv_group")
    mask = select(loaded, config, space)[1].mask
    heads, channels = plain_sequential_wanda_sp_mask(
        loaded, calibration_windows(loaded.tokenizer, corpus, "train", 6, 16, 0), ratio)
    for l in range(space.n_layers):
        assert torch.equal(mask.heads[l], heads[l]) and torch.equal(mask.channels[l], channels[l]), l
    dense = select(loaded, dataclasses.replace(config, wanda_sp_stats="dense"), space)[1].mask
    assert torch.equal(dense.channels[0], mask.channels[0]) and torch.equal(dense.heads[0], mask.heads[0])
    assert any(not torch.equal(dense.channels[l], mask.channels[l]) for l in range(1, space.n_layers))
    with pytest.raises(PrunerError, match="block"):
        select(loaded, dataclasses.replace(config, granularity="block"))


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "taylor"])
@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
def test_every_baseline_meets_its_budget(method, granularity, corpus):
    loaded = tiny_loaded("qwen2")
    for ratio in (0.25, 0.5):
        _, _, report = prune(loaded, PruneConfig(method=method, ratio=ratio, granularity=granularity, data=corpus,
                                                 calib_windows=4, calib_seqlen=16))
        assert report["achieved_ratio"] >= ratio - 1e-9 and report["reachable"], report
