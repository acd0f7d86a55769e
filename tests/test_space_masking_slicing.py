"""Masked logits equal sliced logits; exact parameter costs; batched per-sequence masks."""

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from pruner.adapters import adapter_for
from pruner.errors import PrunerError
from pruner.masking import masked, stack_masks
from pruner.slicing import sliced_copy
from pruner.space import GRANULARITIES, Mask, PruningSpace, check_granularity, check_ratio


def random_mask(space: PruningSpace, seed: int, drop_first_attention: bool = True) -> Mask:
    """A random valid hard mask; layer 0 loses its whole attention, the last layer its whole MLP."""
    g = torch.Generator().manual_seed(seed)
    heads, channels = [], []
    for l, s in enumerate(space.shapes):
        n = space.n_head_units(l)
        if space.granularity == "query_head":
            k = int(torch.randint(0, s.group_size + 1, (1,), generator=g))
            m = torch.zeros(s.n_kv, s.group_size, dtype=torch.bool)
            for grp in range(s.n_kv):
                m[grp, torch.randperm(s.group_size, generator=g)[:k]] = True
            m = m.flatten()
        else:
            m = torch.rand(n, generator=g) < 0.6
        if l == 0 and drop_first_attention:
            m[:] = False
        c = torch.rand(space.n_channel_units(l), generator=g) < 0.5
        if l == space.n_layers - 1:
            c[:] = False
        heads.append(m)
        channels.append(c)
    return Mask(tuple(heads), tuple(channels))


def decoder_linear_numel(model, adapter) -> int:
    n = 0
    for l in range(len(adapter.layers(model))):
        for lin in adapter.decoder_linears(model, l).values():
            n += lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
        for part in (adapter.attention(model, l), adapter.mlp(model, l)):
            if not hasattr(part, "o_proj") and not hasattr(part, "down_proj") and getattr(part, "bias", None) is not None:
                n += part.bias.numel()
    return n


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_masked_logits_equal_sliced_logits(arch, granularity):
    model = tiny_model(arch)
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, granularity)
    mask = random_mask(space, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with masked(model, adapter, space, mask):
            masked_logits = model(ids).logits
        dense_after = model(ids).logits
        pruned = sliced_copy(model, adapter, space, mask)
        sliced_logits = pruned(ids).logits
    torch.testing.assert_close(sliced_logits, masked_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dense_after, masked_logits)  # the mask did something, and hooks are gone
    assert decoder_linear_numel(pruned, adapter) == space.kept_params(mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_logits_equal_logits_with_zeroed_columns(arch):
    """Independent of slicing: masking a unit equals zeroing its o_proj / down_proj input columns."""
    import copy

    model = tiny_model(arch)
    adapter = adapter_for(model)
    for granularity in GRANULARITIES:
        space = PruningSpace.from_model(model, adapter, granularity)
        mask = random_mask(space, seed=5)
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            for l in range(space.n_layers):
                layer = adapter.layers(zeroed)[l]
                head_keep = mask.heads[l].float()[space.head_unit_of_channel(l)]
                layer.self_attn.o_proj.weight.mul_(head_keep)
                chan_keep = mask.channels[l].float()[space.channel_unit_of_channel(l)]
                layer.mlp.down_proj.weight.mul_(chan_keep)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            with masked(model, adapter, space, mask):
                got = model(ids).logits
            expected = zeroed(ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_cache_matches_masked_model(arch):
    """Greedy decoding through the KV cache, including a layer-0 attention that was removed."""
    model = tiny_model(arch)
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "kv_group")
    mask = random_mask(space, seed=3)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), masked(model, adapter, space, mask):
        expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    pruned = sliced_copy(model, adapter, space, mask)
    with torch.no_grad():
        got = pruned.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)


def test_full_mask_is_dense_and_costs_add_up():
    model = tiny_model("llama_bias")
    adapter = adapter_for(model)
    ids = torch.randint(0, 97, (1, 10))
    for g in GRANULARITIES:
        space = PruningSpace.from_model(model, adapter, g)
        full = space.full_mask()
        with torch.no_grad():
            dense = model(ids).logits
            with masked(model, adapter, space, full):
                under_full_mask = model(ids).logits
        torch.testing.assert_close(under_full_mask, dense, rtol=0, atol=0)
        assert space.kept_params(full) == space.decoder_linear_params() == decoder_linear_numel(model, adapter)
        heads, chans = space.unit_costs()
        fixed = space.decoder_linear_params() - heads.sum().item() - chans.sum().item()
        assert 0 <= fixed <= 2 * space.hidden * space.n_layers  # only o/down biases are in no unit


def test_unit_costs_are_exact():
    """kv_group: dropping one unit removes exactly its cost. query_head: dropping one query head
    per group removes its q rows, q bias and o columns; dropping all removes the amortised k/v too."""
    model = tiny_model("qwen2")  # q/k/v biases
    adapter = adapter_for(model)
    H = model.config.hidden_size
    space = PruningSpace.from_model(model, adapter, "kv_group")
    full = space.full_mask()
    heads = list(full.heads)
    heads[1] = torch.tensor([True, False])
    removed = space.decoder_linear_params() - space.kept_params(Mask(tuple(heads), full.channels))
    s = space.shapes[1]
    assert removed == space.head_unit_cost(1) == s.group_size * s.head_dim * (2 * H + 1) + s.head_dim * (2 * H + 2)

    space = PruningSpace.from_model(model, adapter, "query_head")
    full = space.full_mask()
    heads = list(full.heads)
    keep = torch.ones(s.n_kv, s.group_size, dtype=torch.bool)
    keep[:, 0] = False
    heads[1] = keep.flatten()
    removed = space.decoder_linear_params() - space.kept_params(Mask(tuple(heads), full.channels))
    assert removed == s.n_kv * s.head_dim * (2 * H + 1)
    heads[1] = torch.zeros(s.n_q, dtype=torch.bool)
    removed = space.decoder_linear_params() - space.kept_params(Mask(tuple(heads), full.channels))
    assert removed == pytest.approx(s.n_q * space.head_unit_cost(1))


def test_batched_masks_match_one_mask_per_forward():
    model = tiny_model("mistral")
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "query_head")
    masks = [random_mask(space, seed=s, drop_first_attention=False) for s in range(3)]
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    batched = stack_masks(masks, repeats=2)
    with torch.no_grad():
        with masked(model, adapter, space, batched):
            together = model(ids.repeat(3, 1)).logits
        for k, m in enumerate(masks):
            with masked(model, adapter, space, m):
                alone = model(ids).logits
            torch.testing.assert_close(together[2 * k: 2 * k + 2], alone, rtol=1e-5, atol=1e-5)


def test_query_head_mask_must_be_even_across_groups():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "query_head")
    full = space.full_mask()
    heads = list(full.heads)
    heads[0] = heads[0].clone()
    heads[0][0] = False  # group 0 keeps 2, group 1 keeps 3
    with pytest.raises(PrunerError, match="same number of query heads"):
        space.kept_shapes(Mask(tuple(heads), full.channels))


def test_bad_granularity_and_ratio():
    with pytest.raises(PrunerError, match="granularity"):
        check_granularity("neuron")
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(PrunerError, match="between 0 and 1"):
            check_ratio(bad)


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(PrunerError, match="llama, mistral, qwen2, gemma3"):
        adapter_for(model)


def test_adapters_read_shapes_from_weights():
    model = tiny_model("gemma3")
    adapter = adapter_for(model)
    s = adapter.layer_shape(model, 0)
    assert (s.n_q, s.n_kv, s.head_dim, s.d_ff, s.group_size) == (6, 2, 12, 40, 3)
