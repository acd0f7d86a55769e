"""`eval --dynamic probe` and `generate --dynamic probe` on the embedded model, and their bad input."""

import json

import pytest
import torch

from pruner import probe_math as pm
from pruner.cli import main
from pruner.paths import embedded_model_dir

pytestmark = pytest.mark.skipif(not (embedded_model_dir() / "config.json").is_file(),
                                reason="embedded model not prepared (make test prepares it)")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A short text (the start of Brown's validation split): calibrating on all of Brown's train split
    would spend most of these tests tokenising it."""
    from pruner.corpus import load_text

    path = tmp_path_factory.mktemp("data") / "short.txt"
    path.write_text(load_text("brown", "validation")[:20000])
    return str(path)


def cli(capsys, *args, expect=0):
    """The command line in this process (`pruner.cli.main`): exit status, stdout, stderr."""
    code = main(list(args))
    out = capsys.readouterr()
    assert code == expect, f"exit {code}\nstdout:{out.out}\nstderr:{out.err[-3000:]}"
    return out


def test_eval_dynamic_probe_next_to_dense_and_a_static_baseline(capsys, text_file):
    out = json.loads(cli(capsys, "eval", "--data", text_file, "--dynamic", "probe", "--ratio", "0.4", "--seqlen", "32", "--max-windows", "2",
                         "--batch-size", "2", "--calib-windows", "2", "--baselines", "wanda-sp", "--json").out)
    rows = {r["name"]: r for r in out["rows"]}
    assert list(rows) == ["dense", "probe", "wanda-sp"]
    probe = rows["probe"]
    assert out["ppl"] == probe["ppl"] and out["windows"] == 2 and out["tokens"] == 2 * 31
    assert probe["ppl"] > rows["dense"]["ppl"] and rows["dense"]["time_ratio"] == 1.0
    assert probe["layer_ratio"] == pytest.approx(30 / 27 * 0.4)
    assert 0.35 < probe["achieved_ratio"] < 0.4  # query heads only: k/v of the grouped attention stay
    assert rows["wanda-sp"]["achieved_ratio"] == pytest.approx(0.4, abs=0.01)
    # the analytic probe share of one batch of 2 x 32: probe 1 x 16 against 2 x 32 tokens
    assert 0.1 < probe["probe_flops_share"] < 0.2
    for row in (probe, rows["wanda-sp"]):
        assert row["seconds"] > 0 and (row["prr"] is None or row["prr"] == pytest.approx(
            (row["ppl"] - rows["dense"]["ppl"]) / (1 - row["time_ratio"])))


def test_generate_dynamic_probe_keeps_the_prompts_structure(capsys, text_file):
    out = json.loads(cli(capsys, "generate", "--data", text_file, "--dynamic", "probe", "--ratio", "0.3", "--prompt", "The history of the printing",
                         "--max-new-tokens", "5", "--calib-windows", "2", "--json").out)
    assert out["completion"].strip()
    keep = pm.keep_count(9, 30 / 27 * 0.3)
    assert set(out["kept_query_heads"]) == {str(l) for l in range(3, 30)}
    assert set(out["kept_query_heads"].values()) == {keep}
    assert set(out["kept_mlp_channels"].values()) == {pm.keep_count(1536, 30 / 27 * 0.3, 32)}
    assert pm.keep_count(1536, 30 / 27 * 0.3, 32) % 32 == 0


@pytest.mark.parametrize("args, message", [
    (["eval", "--ratio", "0.4"], "--dynamic probe only"),
    (["eval", "--dynamic", "probe"], "needs --ratio"),
    (["eval", "--dynamic", "probe", "--ratio", "0.3", "--baselines", "nope"], "unknown method"),
    (["generate", "--dynamic", "probe", "--ratio", "1.5", "--prompt", "x"], "ratio"),
])
def test_bad_dynamic_input_is_a_one_line_error(capsys, args, message):
    lines = cli(capsys, *args, expect=2).err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]


def test_generation_with_the_probe_equals_greedy_decoding_under_its_masks(text_file):
    """The product's path (ProbePruner.generate: prompt probed once, structure kept, KV cache of the
    kept heads) against plain greedy decoding of the masked full model."""
    from pruner.masking import masked
    from pruner.models import load_model
    from pruner.probe import ProbeConfig, build_pruner
    from pruner.space import Mask, PruningSpace

    torch.set_num_threads(1)
    loaded = load_model("embedded", device="cpu", dtype="fp32")
    pruner = build_pruner(loaded, ProbeConfig(ratio=0.3, calib_windows=2, data=text_file), 32)
    prompt = "The jury said the election was"
    text = pruner.generate(loaded.tokenizer, prompt, 6)
    assert len(pruner.records) == 1
    heads, channels = pruner.keep_masks(pruner.records[0])
    space = PruningSpace.from_model(loaded.model, loaded.adapter, "query_head")
    from pruner.evaluate import generate

    with masked(loaded.model, loaded.adapter, space, Mask(tuple(heads), tuple(channels))):
        expected = generate(loaded.model, loaded.tokenizer, prompt, 6)
    assert text == expected
