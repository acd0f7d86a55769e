"""Sequential calibration against direct computations on tiny models of every architecture."""

import copy

import pytest
import torch
from tiny_models import ARCHS, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from pruner.adapters import adapter_for
from pruner.calibration import collect_input_stats
from pruner.sequential import SequentialInputs

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def mixed_gemma3():
    """Gemma 3 with a full-attention layer between sliding-window ones: the layers get different
    masks and position embeddings (windows longer than the sliding window of 16 tell them apart)."""
    config = tiny_config("gemma3")
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def windows_for(model, n=5, seqlen=20, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def direct_grams(model, adapter, windows, layer):
    """X^T X, sum x and count of every linear's input in `layer`, from one full forward in fp64."""
    return {name: (x.T @ x, x.sum(0), x.shape[0]) for name, x in direct_inputs(model, adapter, windows, layer).items()}


def assert_stats_equal(got, expected):
    assert set(got) == set(expected)
    for name, (gram, total, count) in expected.items():
        assert got[name].count == count, name
        torch.testing.assert_close(got[name].gram, gram, rtol=1e-5, atol=1e-4 * gram.abs().max().item())
        torch.testing.assert_close(got[name].total, total, rtol=1e-5, atol=1e-5 * total.abs().max().item())


@pytest.mark.parametrize("arch", [*ARCHS, "gemma3-mixed"])
def test_without_changes_every_layer_sees_the_dense_inputs(arch):
    """No update: the walk's statistics are the dense model's (also per channel, as calibration.py
    computes them), in every layer, with batches that do not divide the windows evenly."""
    model = mixed_gemma3() if arch == "gemma3-mixed" else tiny_model(arch)
    adapter = adapter_for(model)
    windows = windows_for(model)
    walk = SequentialInputs(model, adapter, windows, batch_size=2)
    attn, mlp = collect_input_stats(model, adapter, windows, batch_size=3)
    for layer in range(walk.n_layers):
        stats = walk.collect()
        assert_stats_equal(stats, direct_grams(model, adapter, windows, layer))
        assert stats["q_proj"] is stats["k_proj"] is stats["v_proj"] and stats["gate_proj"] is stats["up_proj"]
        torch.testing.assert_close(stats["o_proj"].gram.diagonal(), attn[layer].total_sq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats["down_proj"].mean, mlp[layer].mean, rtol=1e-5, atol=1e-6)
        walk.advance()
    # the walk ends with the last decoder layer's outputs of the dense model
    last = []
    handle = adapter.layers(model)[-1].register_forward_hook(lambda m, args, out: last.append(out))
    with torch.no_grad():
        model(windows, use_cache=False)
    handle.remove()
    torch.testing.assert_close(torch.cat(walk.hidden), adapter_output(last[0]), rtol=1e-4, atol=1e-4)


def adapter_output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_pruned_layer_changes_what_the_next_layer_sees(arch):
    """Layer 0 updated in the walk: layer 1's statistics change, and equal a full forward of the
    updated model (direct computation); a later `collect` sees an update made within the layer."""
    model = tiny_model(arch)
    adapter = adapter_for(model)
    windows = windows_for(model, seed=3)
    dense = direct_grams(model, adapter, windows, 1)
    walk = SequentialInputs(model, adapter, windows, batch_size=3)
    walk.collect()
    with torch.no_grad():
        for lin in adapter.decoder_linears(model, 0).values():
            lin.weight.mul_(torch.rand_like(lin.weight) < 0.5)
    walk.advance()
    stats = walk.collect(["q_proj", "o_proj"])
    assert set(stats) == {"q_proj", "o_proj"}
    expected = direct_grams(model, adapter, windows, 1)
    assert_stats_equal(stats, {k: expected[k] for k in stats})
    assert not torch.allclose(stats["q_proj"].gram, dense["q_proj"][0], rtol=1e-3)
    # within a layer: change o_proj, and down_proj's inputs follow
    with torch.no_grad():
        adapter.output_linear(model, 1, "o_proj").weight.mul_(0.5)
    after = walk.collect(["down_proj"])["down_proj"]
    assert_stats_equal({"down_proj": after}, {"down_proj": direct_grams(model, adapter, windows, 1)["down_proj"]})


def test_capture_leaves_the_model_as_it_was():
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    before = copy.deepcopy(model)
    windows = windows_for(model)
    SequentialInputs(model, adapter, windows)
    assert [type(l) for l in adapter.layers(model)] == [type(l) for l in adapter.layers(before)]
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, before(windows).logits, rtol=0, atol=0)


@torch.no_grad()
def direct_inputs(model, adapter, windows, layer):
    """Every linear's input in `layer` over a full forward: (tokens, d_in) float64 by name."""
    out, handles = {}, []
    for name, lin in adapter.decoder_linears(model, layer).items():
        def hook(module, args, name=name):
            out[name] = args[0].reshape(-1, args[0].shape[-1]).double()
        handles.append(lin.register_forward_pre_hook(hook))
    try:
        model(windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3-mixed"])
def test_the_dense_stream_gives_cross_moments_with_the_dense_model(arch):
    """dense_reference: in layer 0 (nothing changed yet) the cross moments are the Gram matrix;
    after layer 0 is pruned, layer 1's cross moments are X_pruned^T X_dense between a full forward
    of the pruned model and one of the dense model, and its dense moments are the dense model's."""
    model = mixed_gemma3() if arch == "gemma3-mixed" else tiny_model(arch)
    dense = copy.deepcopy(model)
    adapter = adapter_for(model)
    windows = windows_for(model, seed=5)
    walk = SequentialInputs(model, adapter, windows, batch_size=2, dense_reference=True)
    first = walk.collect(["o_proj"])["o_proj"]
    torch.testing.assert_close(first.cross, first.gram)
    torch.testing.assert_close(first.dense_gram, first.gram)
    torch.testing.assert_close(first.dense_total, first.total)
    with torch.no_grad():
        for lin in adapter.decoder_linears(model, 0).values():
            lin.weight.mul_(torch.rand_like(lin.weight) < 0.5)
    walk.advance()
    with torch.no_grad():  # an update inside layer 1 before collecting down_proj's inputs
        adapter.output_linear(model, 1, "o_proj").weight.mul_(0.5)
    stats = walk.collect(["q_proj", "down_proj"])
    pruned_x, dense_x = direct_inputs(model, adapter, windows, 1), direct_inputs(dense, adapter, windows, 1)
    for name in ("q_proj", "down_proj"):
        xp, xd = pruned_x[name], dense_x[name]
        scale = xd.abs().max().item() ** 2
        torch.testing.assert_close(stats[name].cross, xp.T @ xd, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(stats[name].dense_gram, xd.T @ xd, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(stats[name].gram, xp.T @ xp, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(stats[name].dense_total, xd.sum(0), rtol=1e-5, atol=1e-5 * scale ** 0.5)
        assert not torch.allclose(stats[name].cross, stats[name].gram, rtol=1e-3)
