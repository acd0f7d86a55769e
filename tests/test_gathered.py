"""Gathered forwards (each mask on only its kept weights) give the masked forward's losses."""

import functools

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from pruner.adapters import adapter_for
from pruner.calibration import collect_input_stats, input_means
from pruner.evaluate import window_losses
from pruner.gathered import gathered
from pruner.masking import masked
from pruner.space import Mask, PruningSpace


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def model_of(arch: str):
    """One tiny model per architecture for the whole file (building one takes a second)."""
    return tiny_model(arch)


def random_masks(space: PruningSpace, seed: int) -> list[Mask]:
    """Bernoulli(0.5) masks, plus one with a whole attention and a whole MLP sublayer removed and
    one that keeps everything."""
    g = torch.Generator().manual_seed(seed)
    n_h = sum(space.n_head_units(l) for l in range(space.n_layers))
    n_c = sum(space.n_channel_units(l) for l in range(space.n_layers))
    masks = [space.unflatten((torch.rand(n_h, generator=g) < 0.5).float(), (torch.rand(n_c, generator=g) < 0.5).float())
             for _ in range(3)]
    removed = space.unflatten(torch.ones(n_h), torch.ones(n_c))
    removed = Mask(tuple(torch.zeros_like(h) if l == 0 else h for l, h in enumerate(removed.heads)),
                   tuple(torch.zeros_like(c) if l == 1 else c for l, c in enumerate(removed.channels)))
    return masks + [removed, space.full_mask()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("granularity", ["kv_group", "query_head", "block"])
@pytest.mark.parametrize("compensate", [False, True])
def test_gathered_losses_equal_masked_losses(arch, granularity, compensate):
    model = model_of(arch)
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, granularity)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    fill = input_means(collect_input_stats(model, adapter, ids)) if compensate else None
    weights = {name: p.clone() for name, p in model.named_parameters()}
    unequal = 0
    for mask in random_masks(space, seed=len(arch)):
        if granularity == "query_head":
            unequal += sum(len(set(h.view(space.shapes[l].n_kv, -1).sum(1).tolist())) > 1 for l, h in enumerate(mask.heads))
        with masked(model, adapter, space, mask, fill):
            expect = window_losses(model, ids)
        with gathered(model, adapter, space, mask, fill):
            got = window_losses(model, ids)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    if granularity == "query_head":
        assert unequal > 0  # the padded case (unequal kept heads per kv group) was exercised
    # the model is as before: same parameter objects and values, no hooks left
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    with masked(model, adapter, space, space.full_mask()):
        dense = window_losses(model, ids)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert adapter.layer_shapes(model) == list(space.shapes)
    torch.testing.assert_close(dense, window_losses(model, ids))


@pytest.mark.parametrize("kept, multiple, width", [(0, 16, 0), (10, 16, 16), (16, 16, 16), (17, 16, 32),
                                                    (38, 16, 40), (40, 16, 40), (7, 1, 7)])
def test_gathered_channels_pad_with_removed_channels(kept, multiple, width):
    """Kept channels first, then the first removed ones up to a multiple (at most d_ff = 40)."""
    space = PruningSpace.from_model(model_of("llama"), adapter_for(model_of("llama")), "kv_group")
    mask = torch.zeros(40)
    chosen = torch.randperm(40, generator=torch.Generator().manual_seed(kept))[:kept].sort().values
    mask[chosen] = 1
    channels, live = space.gathered_channels(0, mask, multiple)
    assert channels.shape == live.shape == (width,)
    assert torch.equal(channels[:kept], chosen) and bool(live[:kept].all()) and not live[kept:].any()
    assert not mask[channels[kept:]].any() and len(set(channels.tolist())) == width


def test_gathered_forward_computes_only_the_kept_weights():
    """The swapped linears hold only the kept rows / columns while the layer runs."""
    model = model_of("llama_bias")
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    mask = space.full_mask()
    mask = Mask((torch.tensor([True, False]),) + mask.heads[1:], (torch.arange(40) < 10,) + mask.channels[1:])
    before = {name: tuple(lin.weight.shape) for name, lin in adapter.decoder_linears(model, 0).items()}
    during, biases, weights = {}, {}, {}

    def record(name):
        def hook(module, args):
            during[name], biases[name] = tuple(module.weight.shape), tuple(module.bias.shape)
            weights[name] = module.weight.clone()
        return hook

    handles = [lin.register_forward_pre_hook(record(name)) for name, lin in adapter.decoder_linears(model, 0).items()]
    with gathered(model, adapter, space, mask):
        window_losses(model, torch.zeros(1, 4, dtype=torch.long))
    for h in handles:
        h.remove()
    # head_dim 8, 3 query heads (one kv group of 3), 1 kv head, 10 of 40 channels padded to
    # CHANNEL_MULTIPLE = 16 with removed channels 10-15, whose down columns are zero; hidden 48
    assert during == {"q_proj": (24, 48), "k_proj": (8, 48), "v_proj": (8, 48), "o_proj": (48, 24),
                      "gate_proj": (16, 48), "up_proj": (16, 48), "down_proj": (48, 16)}
    assert biases == {"q_proj": (24,), "k_proj": (8,), "v_proj": (8,), "o_proj": (48,),
                      "gate_proj": (16,), "up_proj": (16,), "down_proj": (48,)}
    mlp = adapter.mlp(model, 0)
    torch.testing.assert_close(weights["gate_proj"], mlp.gate_proj.weight[:16], rtol=0, atol=0)
    torch.testing.assert_close(weights["down_proj"][:, :10], mlp.down_proj.weight[:, :10], rtol=0, atol=0)
    assert not weights["down_proj"][:, 10:].any()
    assert {name: tuple(lin.weight.shape) for name, lin in adapter.decoder_linears(model, 0).items()} == before


@pytest.mark.parametrize("granularity", ["kv_group", "query_head"])
@pytest.mark.parametrize("compensate", [False, True])
def test_the_search_scores_the_same_losses_gathered_or_masked(granularity, compensate):
    """PGRun.sample_losses and the hard-mask perplexity, in both forward modes, on the same masks."""
    from test_pg import make_run

    probe = make_run(granularity=granularity)
    fill = input_means(collect_input_stats(probe.model, probe.adapter, probe.blocks[:4])) if compensate else None
    runs = {mode: make_run(granularity=granularity, forward_mode=mode, bias_compensation=compensate, fill=fill)
            for mode in ("gathered", "masked")}
    masks = pg_math_masks(runs["masked"], k=4)
    losses = {mode: run.sample_losses(masks, run.batch_at(0)) for mode, run in runs.items()}
    torch.testing.assert_close(losses["gathered"], losses["masked"], rtol=1e-5, atol=1e-6)
    assert losses["gathered"].shape == (4,) and losses["gathered"].dtype == torch.float64
    ppl = {mode: run.evaluate_hard_mask() for mode, run in runs.items()}
    assert ppl["gathered"] == pytest.approx(ppl["masked"], rel=1e-5)


def pg_math_masks(run, k: int) -> torch.Tensor:
    from pruner import pg_math

    return pg_math.sample_masks(torch.cat([run.s_h, run.s_c]), k, torch.Generator().manual_seed(3)).float()


def test_auto_forward_mode_is_gathered_on_a_cpu_and_masked_on_cuda():
    """The default forward mode resolves per device, and the search runs the resolved one."""
    from test_pg import make_run

    from pruner.gathered import resolve_forward_mode
    from pruner.pg.config import PGConfig

    assert PGConfig().forward_mode == "auto"
    assert resolve_forward_mode("auto", torch.device("cpu")) == "gathered"
    assert resolve_forward_mode("auto", torch.device("cuda")) == "masked"
    assert resolve_forward_mode("auto", "cuda:1") == "masked"
    assert resolve_forward_mode("masked", torch.device("cpu")) == "masked"
    assert resolve_forward_mode("gathered", torch.device("cuda")) == "gathered"
    assert make_run().forward_mode == "gathered"
    assert make_run(forward_mode="masked").forward_mode == "masked"
