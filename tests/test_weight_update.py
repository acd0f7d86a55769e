"""The unstructured / N:M methods and the structured reconstruction through `prune()`, on tiny
random models with the embedded tokenizer and Brown calibration windows."""

import copy
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM

from pruner.adapters import adapter_for
from pruner.config import REFIT_DAMP, PruneConfig
from pruner.errors import PrunerError
from pruner.masking import masked
from pruner.methods import METHODS, check_config
from pruner.paths import embedded_model_dir
from pruner.prune import prune
from pruner.reconstruction import admm_refit_columns, refit_kept_columns, relative_output_error, with_intercept
from pruner.space import PruningSpace
from pruner.sparsity_masks import prune_count

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not (embedded_model_dir() / "config.json").is_file(),
                                 reason="embedded tokenizer and corpus not prepared (make test prepares them)")]
SPARSE = ("magnitude-unstructured", "wanda", "sparsegpt", "admm")
CALIB = dict(calib_windows=4, calib_seqlen=32)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def tiny_loaded(arch, tokenizer, seed=0):
    """A tiny random model that reads the embedded tokenizer's ids, as `prune()` expects it."""
    config = tiny_config(arch)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return SimpleNamespace(model=model, tokenizer=tokenizer, adapter=adapter_for(model), spec=f"tiny-{arch}")


def ids(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def check_pattern(weight, method, ratio, sparsity_type):
    """The zeros a method leaves: exact counts (whole matrix, per row, per SparseGPT block) or N:M."""
    zero = weight == 0
    if sparsity_type != "unstructured":
        n, m = map(int, sparsity_type.split(":"))
        per_group = (~zero).reshape(weight.shape[0], -1, m).sum(-1)
        assert (per_group == n).all()
    elif method == "wanda":
        assert (zero.sum(1) == prune_count(ratio, weight.shape[1])).all()
    elif method == "sparsegpt":
        blocks = torch.split(zero, 128, dim=1)
        assert int(zero.sum()) == sum(prune_count(ratio, b.numel()) for b in blocks)
    else:
        assert int(zero.sum()) == prune_count(ratio, weight.numel())


@pytest.mark.parametrize("method", SPARSE)
@pytest.mark.parametrize("sparsity_type, ratio", [("unstructured", 0.6), ("2:4", 0.5), ("4:8", 0.5)])
def test_sparse_methods_leave_their_pattern_and_report_it(tokenizer, method, sparsity_type, ratio):
    loaded = tiny_loaded("llama_bias", tokenizer)
    before = copy.deepcopy(loaded.model)
    config = PruneConfig(method=method, ratio=ratio, sparsity_type=sparsity_type, admm_iterations=20, **CALIB)
    seen = []
    pruned, selection, report = prune(loaded, config, on_layer=seen.append)
    adapter = loaded.adapter
    for l in range(3):
        for name, linear in adapter.decoder_linears(pruned, l).items():
            check_pattern(linear.weight, method, ratio, sparsity_type)
            assert linear.weight.shape == adapter.decoder_linears(before, l)[name].weight.shape
    # the loaded model is untouched; the pruned one has every parameter, and the report says what is zero
    for p, q in zip(loaded.model.parameters(), before.parameters()):
        assert torch.equal(p, q)
    assert report["params_after"] == report["params_before"]
    zeros = sum(int((lin.weight == 0).sum()) for l in range(3) for lin in adapter.decoder_linears(pruned, l).values())
    assert report["achieved_ratio"] == pytest.approx(zeros / report["decoder_linear_params_before"])
    assert report["achieved_ratio"] == pytest.approx(ratio, abs=0.03)  # floor per row or block; biases are kept
    assert "dense" in report["storage"] and report["sparsity_type"] == sparsity_type
    records = report["weight_update"]["per_layer"]
    assert seen == records and [r["layer"] for r in records] == [0, 1, 2]
    for r in records:
        assert set(r["errors"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        for e in r["errors"].values():
            if method in ("magnitude-unstructured", "wanda"):  # no weight update
                assert e["after"] == pytest.approx(e["before"])
            else:  # the update lowers the error of its own mask
                assert e["after"] < e["before"]
    assert [r["kept_fraction"] for r in report["per_layer"]] == pytest.approx([1 - r["zero_fraction"] for r in records])


def test_sparse_errors_follow_the_sequential_inputs(tokenizer):
    """The last layer's q/k/v errors are those of its weights on the inputs the pruned earlier
    layers give it (a direct full forward of the result), not on the dense model's inputs. (Within
    a layer every linear is pruned on the layer's dense pass, as the reference code does.)"""
    from test_sequential import direct_grams

    from pruner.windows import calibration_windows

    loaded = tiny_loaded("qwen2", tokenizer)
    pruned, _, report = prune(loaded, PruneConfig(method="wanda", ratio=0.5, **CALIB))
    windows = calibration_windows(tokenizer, "brown", "train", 4, 32, 0)
    last = 2
    grams = direct_grams(pruned, loaded.adapter, windows, last)
    dense_grams = direct_grams(loaded.model, loaded.adapter, windows, last)
    dense_w = loaded.adapter.decoder_linears(loaded.model, last)
    for name in ("q_proj", "k_proj", "v_proj"):
        new = loaded.adapter.decoder_linears(pruned, last)[name].weight
        reported = report["weight_update"]["per_layer"][last]["errors"][name]["after"]
        assert reported == pytest.approx(float(relative_output_error(new, dense_w[name].weight, grams[name][0])), rel=1e-4)
        assert reported != pytest.approx(float(relative_output_error(new, dense_w[name].weight, dense_grams[name][0])),
                                         rel=1e-2)


def test_error_order_admm_sparsegpt_wanda(tokenizer):
    """Summed over a model's linears, the layer errors order ADMM < SparseGPT < Wanda (the paper's
    order; the pure tests check it per problem)."""
    loaded = tiny_loaded("llama", tokenizer, seed=1)
    totals = {}
    for method in ("wanda", "sparsegpt", "admm"):
        _, _, report = prune(loaded, PruneConfig(method=method, ratio=0.5, **CALIB))
        totals[method] = sum(e["after"] for r in report["weight_update"]["per_layer"] for e in r["errors"].values())
    assert totals["admm"] < totals["sparsegpt"] < totals["wanda"], totals


def unsliced(dense, pruned, adapter, space, mask):
    """The refitted model in the dense shapes: o_proj / down_proj zero outside the kept columns,
    the sliced model's kept columns and biases inside."""
    model = copy.deepcopy(dense)
    with torch.no_grad():
        for l in range(space.n_layers):
            for which, kept in zip(("o_proj", "down_proj"), space.kept_inputs(l, mask)):
                target = adapter.output_linear(model, l, which)
                source = adapter.output_linear(pruned, l, which)
                holder = adapter.attention(pruned, l) if which == "o_proj" else adapter.mlp(pruned, l)
                bias = source.bias if source is not None else holder.bias
                target.weight.zero_()
                if source is not None:
                    target.weight[:, kept] = source.weight
                target.bias = torch.nn.Parameter(bias.detach().clone())
    return model


@pytest.mark.parametrize("how, damp", [("ls", None), ("admm", None), ("ls", 0.5)])
@pytest.mark.parametrize("arch, granularity", [("llama", "kv_group"), ("qwen2", "query_head"), ("gemma3", "kv_group")])
def test_reconstructed_structured_model_is_the_masked_model_with_refitted_weights(tokenizer, how, damp, arch,
                                                                                   granularity):
    """masked == sliced after the refit, and every layer's refit is the one its sequential inputs
    give: the o_proj and down_proj inputs of the result X (a direct full forward) and of the dense
    model X_d (another one), refitted from the dense weights towards the dense outputs X_d W^T
    (cross term X^T X_d) with the configured damping (REFIT_DAMP by default), reproduce the saved
    weights and biases."""
    from test_sequential import direct_inputs
    from test_space_masking_slicing import random_mask

    from pruner.methods import Selection
    from pruner.prune import apply
    from pruner.windows import calibration_windows

    loaded = tiny_loaded(arch, tokenizer)
    adapter = loaded.adapter
    space = PruningSpace.from_model(loaded.model, adapter, granularity)
    mask = random_mask(space, seed=2)  # layer 0 loses its attention, the last layer its MLP
    config = PruneConfig(method="magnitude", ratio=0.3, granularity=granularity, reconstruct=how,
                         **({} if damp is None else {"refit_damp": damp}), **CALIB)
    pruned, applied = apply(loaded, config, space, Selection(mask, compensate=True))
    full = unsliced(loaded.model, pruned, adapter, space, mask)
    x = ids(loaded.model)
    with torch.no_grad():
        with masked(full, adapter, space, mask):
            want = full(x).logits
        torch.testing.assert_close(pruned(x).logits, want, rtol=1e-5, atol=1e-5)

    windows = calibration_windows(tokenizer, "brown", "train", 4, 32, 0)
    refit = refit_kept_columns if how == "ls" else admm_refit_columns
    records = applied.extra["weight_update"]["per_layer"]
    for l in range(space.n_layers):
        inputs, dense_inputs = direct_inputs(full, adapter, windows, l), direct_inputs(loaded.model, adapter, windows, l)
        for which, kept in zip(("o_proj", "down_proj"), space.kept_inputs(l, mask)):
            dense = adapter.output_linear(loaded.model, l, which)
            x, x_dense = inputs[which], dense_inputs[which]
            gram, total, count = x.T @ x, x.sum(0), x.shape[0]
            w_kept, delta = refit(dense.weight, gram, total, count, kept, cross=x.T @ x_dense,
                                  target_sum=x_dense.sum(0), damp=REFIT_DAMP if damp is None else damp)
            got = adapter.output_linear(full, l, which)
            old_bias = dense.bias if dense.bias is not None else torch.zeros_like(delta)
            expected = torch.zeros_like(dense.weight)
            expected[:, kept] = w_kept
            # the same outputs on the calibration inputs (the weights themselves may differ a little
            # along directions the inputs hardly excite: fp32 vs fp64 statistics, and fp32 rounding of
            # the two hidden-state streams grows over the layers; fitting the dense layer's own output
            # on the pruned inputs instead of the dense model's output is off by ~1e-1 here)
            difference = relative_output_error(torch.cat([got.weight, (got.bias - old_bias).unsqueeze(1)], 1),
                                               torch.cat([expected, delta.unsqueeze(1)], 1),
                                               with_intercept(gram, total, count))
            assert float(difference) < 1e-6, (l, which, float(difference))
            assert (got.weight[:, ~kept] == 0).all()
            if not kept.all():  # a linear with nothing removed is left as it is
                e = records[l]["errors"][which]
                assert e["after"] <= e["before"] * (1 + 1e-6)  # the refit beats FLAP's compensation
    assert applied.extra["weight_update"]["reconstruct"] == how


@pytest.mark.parametrize("method", ["wanda-sp", "taylor"])
def test_reconstruction_lowers_the_output_error_through_prune(tokenizer, method):
    loaded = tiny_loaded("llama", tokenizer)
    base = dict(method=method, ratio=0.4, **CALIB)
    _, _, plain = prune(loaded, PruneConfig(**base))
    _, _, report = prune(loaded, PruneConfig(**base, reconstruct="ls"))
    assert "weight_update" not in plain and plain["reconstruct"] == "none"
    assert report["reconstruct"] == "ls" and not report["bias_compensation"]
    assert report["achieved_ratio"] == plain["achieved_ratio"]  # the same mask, other weights
    errors = [e for r in report["weight_update"]["per_layer"] for e in r["errors"].values()]
    assert errors and all(e["after"] < e["before"] for e in errors)


@pytest.mark.parametrize("settings, message", [
    (dict(method="admm", ratio=0.5, reconstruct="ls"), "reconstruction"),
    (dict(method="flap", ratio=0.5, sparsity_type="2:4"), "removes whole heads"),
    (dict(method="wanda", ratio=0.3, sparsity_type="2:4"), "use ratio 0.5"),
    (dict(method="wanda", ratio=0.5, sparsity_type="2-4"), "unknown sparsity type"),
    (dict(method="flap", ratio=0.5, reconstruct="exact"), "unknown reconstruction"),
    (dict(method="admm", ratio=0.5, admm_mask="ramp"), "schedule"),
    (dict(method="admm", ratio=0.5, admm_iterations=0), "iterations"),
    (dict(method="flap", ratio=0.5, reconstruct="ls", refit_damp=-0.1), "damping"),
])
def test_wrong_combinations_are_refused(settings, message):
    with pytest.raises(PrunerError, match=message):
        check_config(PruneConfig(**settings))


def test_registry_knows_the_sparse_methods():
    assert {m for m, method in METHODS.items() if method.sparse} == set(SPARSE)
    assert PruneConfig.from_dict(PruneConfig(method="admm", ratio=0.5, sparsity_type="4:8").to_dict()).sparsity_type == "4:8"


def test_a_studio_job_counts_layers_and_saves_a_dense_model_with_zeros(tmp_path, tokenizer):
    """The studio runs a layer-by-layer method like any other job: progress in layers, the
    records as they come, and a saved model that loads back with its N:M zeros."""
    from pruner.models import LoadedModel, load_model
    from pruner.studio import MODEL_SUBDIR, Studio, saved_report

    tiny = tiny_loaded("llama", tokenizer)
    loaded = LoadedModel(tiny.model, tokenizer, tiny.adapter, "tiny", torch.device("cpu"), torch.float32)
    studio = Studio(tmp_path)
    job = studio.start(loaded, PruneConfig(method="sparsegpt", ratio=0.5, sparsity_type="2:4", **CALIB))
    assert job.progress()[1] == 3
    job.wait(300)
    assert job.status == "finished", job.error
    assert job.progress() == (3, 3) and [r["layer"] for r in job.layers] == [0, 1, 2]
    report = saved_report(tmp_path / job.id)
    assert report["weight_update"]["per_layer"] == job.layers and report["sparsity_type"] == "2:4"
    saved = load_model(str(tmp_path / job.id / MODEL_SUBDIR), device="cpu", dtype="fp32")
    for l in range(3):
        for linear in saved.adapter.decoder_linears(saved.model, l).values():
            check_pattern(linear.weight, "sparsegpt", 0.5, "2:4")


def test_stop_ends_a_layer_by_layer_job_between_layers(tmp_path, tokenizer):
    from pruner.models import LoadedModel
    from pruner.studio import MODEL_SUBDIR, Studio

    tiny = tiny_loaded("llama", tokenizer)
    loaded = LoadedModel(tiny.model, tokenizer, tiny.adapter, "tiny", torch.device("cpu"), torch.float32)
    job = Studio(tmp_path).start(loaded, PruneConfig(method="wanda", ratio=0.5, **CALIB))
    job.stop()
    job.wait(300)
    assert job.status == "stopped" and len(job.layers) <= 1
    assert not (tmp_path / job.id / MODEL_SUBDIR).exists()
