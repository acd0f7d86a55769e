"""Probe Pruning's lifecycle on tiny models of every architecture: the sliced forward against masked
inference, the whole-batch probe against the oracle computed from the real block activations,
exact per-layer ratios, the history update, one-sequence batches, generation and restoration."""

import pytest
import torch
from tiny_models import ARCHS, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from pruner import probe_math as pm
from pruner.adapters import adapter_for, channels_of_heads
from pruner.errors import PrunerError
from pruner.masking import masked
from pruner.probe import ProbeConfig, ProbePruner, collect_history
from pruner.space import Mask, PruningSpace

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# 3 tiny layers: layer 0 stays dense, r' = 3/2 * r; at r = 1/3 each pruned layer keeps 3 of 6 query
# heads (so grouped attention sees uneven groups) and 20 of 40 channels.
RATIO = 1 / 3


def ids_of(b, t, seed=0, vocab=97):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def setup(arch, variant="probe", device="cpu", history=True, **overrides):
    model = tiny_model(arch).to(device)
    adapter = adapter_for(model)
    settings = {"ratio": RATIO, "variant": variant, "skip_layers": 1, "sample_fraction": 0.3, "mlp_multiple": 1}
    config = ProbeConfig(**settings | overrides)
    hist = collect_history(model, adapter, ids_of(6, 32, seed=9), range(1, 3)) if history else None
    return model, adapter, ProbePruner(model, adapter, config, hist)


def masked_logits(model, adapter, pruner, record, ids):
    """Logits with the record's decisions applied as masks on the full model (no slicing)."""
    heads, channels = pruner.keep_masks(record)
    space = PruningSpace.from_model(model, adapter, "query_head")
    with torch.no_grad(), masked(model, adapter, space, Mask(tuple(heads), tuple(channels))):
        return model(ids.to(next(model.parameters()).device)).logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_inference_equals_masked_inference(arch, device):
    model, adapter, pruner = setup(arch, device=device)
    ids = ids_of(4, 24)  # longer than the sliding windows (16) of mistral and gemma3
    with torch.no_grad():
        dense = model(ids.to(device)).logits
    logits = pruner.forward(ids)
    record = pruner.records[-1]
    assert (record.batch, record.seqlen, record.probe_batch, record.probe_positions) == (4, 24, 2, 12)
    reference = masked_logits(model, adapter, pruner, record, ids)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, dense, atol=1e-3)  # the pruning did something


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_slices_any_query_heads_like_the_mask(arch):
    """Uneven groups (with 3 kv heads of 2 query heads: [2, 4, 5] uses kv heads 1, 2, 2, and kv
    head 0 goes), even ones ([1, 4]) and a single head, against masked inference."""
    config = tiny_config(arch)
    config.num_key_value_heads = 3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = adapter_for(model)
    space = PruningSpace.from_model(model, adapter, "query_head")
    ids = ids_of(2, 20, seed=3)
    for kept in ([2, 4, 5], [0, 1, 3], [1, 4], [5]):
        heads = [torch.ones(6) for _ in range(3)]
        heads[1] = torch.zeros(6)
        heads[1][kept] = 1
        channels = [torch.ones(40) for _ in range(3)]
        channels[1][::3] = 0
        with torch.no_grad():
            with masked(model, adapter, space, Mask(tuple(heads), tuple(channels))):
                reference = model(ids).logits
            parts = adapter.sublayer_parts(model, 1, "attention"), adapter.sublayer_parts(model, 1, "mlp")
            adapter.slice_query_heads(model, 1, torch.tensor(kept))
            adapter.slice_mlp(model, 1, channels[1].nonzero().flatten())
            assert adapter.output_linear(model, 1, "o_proj").in_features == adapter.head_dim(model) * len(kept)
            sliced = model(ids).logits
            adapter.restore_sublayer(model, 1, "attention", parts[0])
            adapter.restore_sublayer(model, 1, "mlp", parts[1])
        torch.testing.assert_close(sliced, reference, rtol=1e-5, atol=1e-5)
    assert adapter.layer_shape(model, 1).n_q == 6 and adapter.layer_shape(model, 1).d_ff == 40


def oracle_decisions(model, adapter, pruner, record, ids):
    """Kept heads / channels by PPsp of the real full-batch activations of each block: one masked
    forward under the record's decisions, with the o_proj / down_proj inputs recorded before the
    mask multiplies them (so layer l's input reflects the pruned layers before it)."""
    acts = {}
    handles = []
    for l in pruner.layers:
        for which in ("o_proj", "down_proj"):
            linear = adapter.output_linear(model, l, which)
            handles.append(linear.register_forward_pre_hook(
                lambda m, args, key=(l, which): acts.__setitem__(key, args[0].detach().clone())))
    try:
        masked_logits(model, adapter, pruner, record, ids)
    finally:
        for h in handles:
            h.remove()
    heads, channels, hd = {}, {}, adapter.head_dim(model)
    for l in pruner.layers:
        a = acts[(l, "o_proj")]
        c = a.float().pow(2).sum((0, 1)) / a.shape[0]
        o = adapter.output_linear(model, l, "o_proj").weight
        heads[l] = pm.keep_indices(pm.ppsp_head_scores(c, o, hd), pruner.layer_ratio).cpu()
        a = acts[(l, "down_proj")]
        c = a.float().pow(2).sum((0, 1)) / a.shape[0]
        down = adapter.output_linear(model, l, "down_proj").weight
        channels[l] = pm.keep_indices(pm.ppsp_channel_scores(c, down), pruner.layer_ratio).cpu()
    return heads, channels, acts


@pytest.mark.parametrize("arch", ARCHS)
def test_whole_batch_probe_without_history_selects_like_the_oracle(arch):
    """Probe = the whole batch, no history: the probe's own attention (true positions, RoPE,
    q/k norms, scaling, sliding window) must reproduce the block's activations, so its choices
    are the oracle's."""
    model, adapter, pruner = setup(arch, variant="full-batch", history=False)
    ids = ids_of(3, 24, seed=4)
    pruner.forward(ids)
    record = pruner.records[-1]
    assert (record.probe_batch, record.probe_positions) == (3, 24)
    heads, channels, _ = oracle_decisions(model, adapter, pruner, record, ids)
    for l in pruner.layers:
        assert record.heads[l].tolist() == heads[l].tolist(), (l, record.heads[l], heads[l])
        assert record.channels[l].tolist() == channels[l].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_probe_attends_at_its_true_positions(arch):
    """The probe's activations equal the model's own attention module run on just the probe tokens
    with their true position ids (RoPE) and a causal mask among them."""
    model, adapter, pruner = setup(arch, sample_fraction=0.5)
    ids = ids_of(3, 14, seed=5)
    seen = {}
    norm = adapter.block_entry_norms(model, 1)[0]
    handle = norm.register_forward_hook(lambda m, a, out: seen.setdefault("x", out.clone()))
    original = pruner.fused

    def capture(acts, l, which, positions):
        if l == 1 and which == "attention":
            seen["acts"], seen["positions"] = acts.clone(), positions.clone()
        return original(acts, l, which, positions)

    pruner.fused = capture
    pruner.forward(ids)
    handle.remove()
    record = pruner.records[-1]
    positions = seen["positions"]
    assert positions.tolist() != list(range(positions.numel()))  # not a prefix: true positions matter
    x = seen["x"][:, positions]
    attn = adapter.attention(model, 1)
    out = {}
    h = adapter.output_linear(model, 1, "o_proj").register_forward_pre_hook(lambda m, a: out.setdefault("a", a[0]))
    with torch.no_grad():
        extra = (model.config.layer_types[1],) if arch == "gemma3" else ()  # gemma3: local / global RoPE
        embeddings = model.model.rotary_emb(x, positions.unsqueeze(0), *extra)
        attn(hidden_states=x, position_embeddings=embeddings, attention_mask=None)
    h.remove()
    # the probe took `probe_batch` of the 3 samples; each probe row is one of the full rows
    assert seen["acts"].shape == (record.probe_batch, positions.numel(), out["a"].shape[-1])
    for row in seen["acts"]:
        assert min((row - full).abs().max().item() for full in out["a"]) < 1e-5


def test_ratios_are_met_exactly_per_layer_with_the_first_three_layers_dense():
    config = tiny_config("llama")
    config.num_hidden_layers = 7
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = adapter_for(model)
    for ratio, multiple in ((0.2, 1), (0.4, 1), (0.4, 8), (0.4, 32)):
        pruner = ProbePruner(model, adapter, ProbeConfig(ratio=ratio, mlp_multiple=multiple))
        assert pruner.layer_ratio == pytest.approx(7 / 4 * ratio)
        pruner.forward(ids_of(5, 16))
        record = pruner.records[-1]
        assert sorted(record.heads) == sorted(record.channels) == [3, 4, 5, 6]
        for l in range(3, 7):
            assert record.heads[l].numel() == pm.keep_count(6, pruner.layer_ratio)
            assert record.channels[l].numel() == pm.keep_count(40, pruner.layer_ratio, multiple)
            assert multiple == 1 or record.channels[l].numel() % multiple == 0 or record.channels[l].numel() == 40
            assert torch.equal(record.heads[l], record.heads[l].sort().values)
    with pytest.raises(PrunerError, match="unreachable"):
        ProbePruner(model, adapter, ProbeConfig(ratio=0.6))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_history_updates_only_kept_channels(arch):
    model, adapter, pruner = setup(arch)
    before = ([h.clone() if h is not None else None for h in pruner.history[0]],
              [h.clone() if h is not None else None for h in pruner.history[1]])
    ids = ids_of(4, 20, seed=6)  # shorter than the calibration windows (32): rows 20.. stay
    pruner.forward(ids)
    record = pruner.records[-1]
    _, _, acts = oracle_decisions(model, adapter, pruner, record, ids)
    hd = adapter.head_dim(model)
    for l in pruner.layers:
        for k, which, kept in ((0, "o_proj", channels_of_heads(record.heads[l], hd)), (1, "down_proj", record.channels[l])):
            old, new = before[k][l], pruner.history[k][l]
            pruned = torch.ones(old.shape[1], dtype=torch.bool)
            pruned[kept] = False
            assert torch.equal(new[:, pruned], old[:, pruned])
            assert torch.equal(new[20:], old[20:])
            x = acts[(l, which)][..., kept]
            expected = 0.99 * old[:20, kept] + 0.01 * x.pow(2).mean(0)
            torch.testing.assert_close(new[:20, kept], expected, rtol=1e-5, atol=1e-7)
            assert not torch.allclose(new[:20, kept], old[:20, kept])


@pytest.mark.parametrize("variant", ["probe", "fixed", "full-batch"])
def test_a_batch_of_one_sequence(variant):
    model, adapter, pruner = setup("mistral", variant=variant, history=variant != "full-batch")
    ids = ids_of(1, 9, seed=7)
    logits = pruner.forward(ids)
    record = pruner.records[-1]
    assert record.probe_batch == 1 and record.probe_positions == (9 if variant == "full-batch" else 5)
    torch.testing.assert_close(logits, masked_logits(model, adapter, pruner, record, ids), rtol=1e-4, atol=1e-4)


def test_fixed_weights_and_history_change_the_scores():
    _, _, probe = setup("llama")
    _, _, fixed = setup("llama", variant="fixed", probe_weight=0.0)  # history only
    acts = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 3, 4, 7, 9])
    history = fixed.history[1][1]
    torch.testing.assert_close(fixed.fused(acts, 1, "mlp", positions), history[positions].sum(0))
    fused = pm.fuse_with_history(pm.probe_channel_energy(acts), history, positions)
    torch.testing.assert_close(probe.fused(acts, 1, "mlp", positions), fused)


def test_generation_reuses_the_prompt_structure_and_restores_the_model():
    model, adapter, pruner = setup("gemma3")
    prompt = ids_of(1, 10, seed=8)
    params = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        dense = model(prompt).logits
        with pruner.active(reprobe=False):
            out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        record = pruner.records[-1]
        assert len(pruner.records) == 1  # only the prompt was probed
        heads, channels = pruner.keep_masks(record)
        space = PruningSpace.from_model(model, adapter, "query_head")
        with masked(model, adapter, space, Mask(tuple(heads), tuple(channels))):
            expected = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.tolist() == expected.tolist()
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, dense, rtol=0, atol=0)


def test_bad_settings_are_one_line_errors():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    with pytest.raises(PrunerError, match="variant"):
        ProbePruner(model, adapter, ProbeConfig(variant="nope"))
    with pytest.raises(PrunerError, match="ratio"):
        ProbePruner(model, adapter, ProbeConfig(ratio=1.2))
    with pytest.raises(PrunerError, match="skip"):  # 3 tiny layers, 3 skipped: nothing left to prune
        ProbePruner(model, adapter, ProbeConfig(ratio=0.2))


def test_the_dynamic_card_counts_what_a_batch_ran_with():
    """Compare's numbers under Probe Pruning: parameters = all less the achieved share of the decoder
    linears, perplexity from the pruned forwards of the windows (equal to masked inference with each
    batch's decisions); the timing prompts record nothing, and the model has its full weights afterwards."""
    import math
    from types import SimpleNamespace

    from pruner.evaluate import total_params
    from pruner.probe import decoder_params, dynamic_card

    model, adapter, pruner = setup("llama")
    windows = ids_of(4, 16, seed=3)
    before = [t.clone() for t in model.state_dict().values()]
    card = dynamic_card(SimpleNamespace(model=model, adapter=adapter), pruner, windows, batch_size=2)
    assert len(pruner.records) == 2  # the two evaluation batches only
    unused = sum(pruner.achieved_ratio(r) for r in pruner.records) / 2 * decoder_params(model, adapter)
    assert card["parameters"] == pytest.approx(total_params(model) - unused)
    assert card["parameters"] < total_params(model)
    nll = []
    for record, batch in zip(pruner.records, windows.split(2)):
        logp = torch.log_softmax(masked_logits(model, adapter, pruner, record, batch), -1)
        nll.append(-logp[:, :-1].gather(-1, batch[:, 1:, None]).squeeze(-1).mean(1))
    assert card["perplexity"] == pytest.approx(math.exp(float(torch.cat(nll).mean())), rel=1e-4)
    assert card["prefill_s"] > 0 and card["decode_tokens_per_s"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_private_copies_of_a_model_share_one_calibration_history(monkeypatch):
    """Compare's generation and the What-if queue's card each probe a private copy of the dense model:
    one history is calibrated for both; other settings calibrate anew; a pruner's updates never reach
    the remembered history."""
    import dataclasses

    from tiny_models import tiny_loaded

    from pruner import probe
    from pruner.models import private_copy

    loaded = tiny_loaded("llama", seed=5)
    calls = []
    real = probe.collect_history
    monkeypatch.setattr(probe, "collect_history", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = ProbeConfig(ratio=0.4, calib_windows=2, skip_layers=1, mlp_multiple=1)
    first, second = private_copy(loaded), private_copy(loaded)
    history = probe.calibration_history_for(first, config, 16)
    assert probe.calibration_history_for(second, config, 16) is history and len(calls) == 1
    probe.calibration_history_for(first, dataclasses.replace(config, calib_windows=3), 16)
    assert len(calls) == 2
    kept = [[None if h is None else h.clone() for h in part] for part in history]
    pruner = ProbePruner(second.model, second.adapter, config, history)
    pruner.forward(ids_of(2, 16))
    assert any(a is not None and not torch.equal(a, b) for a, b in zip(pruner.history[1], history[1]))
    assert all(a is None or torch.equal(a, b) for part, saved in zip(history, kept) for a, b in zip(part, saved))
