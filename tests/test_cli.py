"""The CLI contract on the embedded model, and its errors (exit status 2, nothing half-written)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruner.paths import embedded_model_dir

REPO = Path(__file__).resolve().parent.parent
needs_embedded = pytest.mark.skipif(not (embedded_model_dir() / "config.json").is_file(),
                                    reason="embedded model not prepared (make test prepares it)")


def cli(*args, expect=0):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "pruner", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:{proc.stdout}\nstderr:{proc.stderr[-3000:]}"
    return proc


def cli_json(*args):
    out = cli(*args, "--json").stdout
    return json.loads(out)  # exactly one JSON object on stdout


@needs_embedded
def test_info_embedded():
    info = cli_json("info", "--model", "embedded")
    assert info["architecture"] == "llama"
    assert (info["layers"], info["heads"], info["kv_heads"], info["head_dim"], info["intermediate_size"]) == (30, 9, 3, 64, 1536)
    assert info["total_params"] == 134_515_008
    assert info["decoder_linear_params"] == 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536)


@needs_embedded
def test_eval_embedded_brown():
    res = cli_json("eval", "--model", "embedded", "--data", "brown", "--seqlen", "64", "--max-windows", "3")
    assert {"ppl", "windows", "tokens", "seqlen", "data"} <= res.keys()
    assert res["windows"] == 3 and res["seqlen"] == 64 and res["tokens"] == 3 * 63 and res["data"] == "brown"
    assert 5 < res["ppl"] < 500


@needs_embedded
def test_prune_magnitude_then_eval_and_generate(tmp_path):
    out = tmp_path / "pruned"
    report = cli_json("prune", "--model", "embedded", "--method", "magnitude", "--ratio", "0.25", "--out", str(out))
    assert {"method", "settings", "params_before", "params_after", "achieved_ratio", "per_layer", "wall_time_s"} <= report.keys()
    assert report["method"] == "magnitude" and abs(report["achieved_ratio"] - 0.25) < 0.01
    assert len(report["per_layer"]) == 30
    row = report["per_layer"][0]
    assert {"query_heads", "kv_heads", "mlp_channels", "attention_kept", "mlp_kept"} <= row.keys()
    assert json.loads((out / "report.json").read_text())["achieved_ratio"] == report["achieved_ratio"]
    info = cli_json("info", "--model", str(out))
    assert info["total_params"] == report["params_after"]
    gen = cli_json("generate", "--model", str(out), "--prompt", "The jury said", "--max-new-tokens", "5")
    assert gen["prompt"] == "The jury said" and isinstance(gen["completion"], str)
    # an earlier pruned model is replaced only with --overwrite
    before = (out / "model.safetensors").read_bytes()
    proc = cli("prune", "--ratio", "0.3", "--out", str(out), "--json", expect=2)
    assert "--overwrite" in proc.stderr and (out / "model.safetensors").read_bytes() == before
    again = cli_json("prune", "--ratio", "0.3", "--out", str(out), "--overwrite")
    assert json.loads((out / "report.json").read_text())["achieved_ratio"] == again["achieved_ratio"]
    assert abs(again["achieved_ratio"] - 0.3) < 0.01


@pytest.mark.parametrize("args, message", [
    (["info", "--model", "./no/such/dir"], "no model directory"),
    (["info", "--model", "not-a-model-name"], "unknown model"),
    (["info", "--model", "someorg/some-model"], "embedded"),
    (["prune", "--ratio", "1.5", "--out", "/tmp/never-written"], "between 0 and 1"),
    (["prune", "--ratio", "0", "--out", "/tmp/never-written"], "between 0 and 1"),
    (["prune", "--ratio", "0.3", "--granularity", "neuron", "--out", "/tmp/never-written"], "granularity"),
    (["prune", "--ratio", "0.3", "--method", "oracle", "--out", "/tmp/never-written"], "unknown method"),
    (["eval", "--data", "no-such-corpus"], "brown"),
    (["info", "--granularity", "neuron"], "granularity"),
])
def test_bad_input_exits_2_with_a_clear_message(args, message):
    proc = cli(*args, expect=2)
    assert message in proc.stderr and proc.stdout == ""
    assert not Path("/tmp/never-written").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    proc = cli("info", "--model", str(tmp_path / "gpt2"), expect=2)
    assert "unsupported architecture" in proc.stderr and "llama" in proc.stderr


@needs_embedded
def test_text_too_short_and_dir_not_ours(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    proc = cli("eval", "--data", str(short), "--seqlen", "128", expect=2)
    assert "too short" in proc.stderr
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    proc = cli("prune", "--ratio", "0.3", "--out", str(theirs), expect=2)
    assert "--overwrite" in proc.stderr and sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


@needs_embedded
def test_embedded_masked_equals_sliced():
    """The embedded model itself: masked logits equal sliced logits at fp32 tolerance."""
    from test_space_masking_slicing import random_mask

    from pruner.masking import masked
    from pruner.models import load_model
    from pruner.slicing import sliced_copy
    from pruner.space import PruningSpace

    loaded = load_model("embedded", device="cpu", dtype="fp32")
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    for granularity in ("kv_group", "query_head"):
        space = PruningSpace.from_model(loaded.model, loaded.adapter, granularity)
        mask = random_mask(space, seed=7)
        with torch.no_grad():
            with masked(loaded.model, loaded.adapter, space, mask):
                expected = loaded.model(ids).logits
            got = sliced_copy(loaded.model, loaded.adapter, space, mask)(ids).logits
        # 30 layers of fp32 matmuls of other shapes: differences of a few 1e-4 on logits of size ~20
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
