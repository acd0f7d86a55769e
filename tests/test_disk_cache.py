"""Derived data cached on disk: token ids per tokenizer and text, calibration statistics per
model, corpus and setting; hits are exact, anything else that changes is a miss, damage is a miss;
the studio's private copy shares weights without sharing hooks or swaps."""

import dataclasses

import pytest
import torch
from tiny_models import tiny_model

from pruner import calibration, disk_cache, windows
from pruner.adapters import adapter_for
from pruner.config import PruneConfig
from pruner.evaluate import window_losses
from pruner.gathered import gathered
from pruner.models import LoadedModel
from pruner.space import PruningSpace
from pruner.models import private_copy

WORDS = "the jury said county report vote budget was good late high small of that a court mayor".split()


def word_tokenizer():
    """A word-level fast tokenizer of a few words (ids below the tiny models' vocabulary of 97)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_cache, "derived_dir", lambda: tmp_path / "derived")
    monkeypatch.setattr(windows, "_IDS", {})
    return tmp_path / "derived"


def corpus(tmp_path, n=400, name="text.txt"):
    g = torch.Generator().manual_seed(len(name))
    path = tmp_path / name
    path.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)))
    return str(path)


def refuse(*args, **kwargs):
    raise AssertionError("recomputed instead of read from the cache")


def test_a_split_is_tokenised_once_then_read_back(tmp_path, cache, monkeypatch):
    tok, text = word_tokenizer(), corpus(tmp_path)
    ids = windows.corpus_ids(tok, text, "train")
    assert ids.dtype == torch.long and torch.equal(ids, windows.tokenize(tok, windows.load_text(text, "train")))
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 1
    monkeypatch.setattr(windows, "_IDS", {})  # a new process: only the disk remains
    monkeypatch.setattr(windows, "tokenize", refuse)
    assert torch.equal(windows.corpus_ids(tok, text, "train"), ids)
    # another text is another entry; a damaged entry is recomputed
    monkeypatch.undo()
    monkeypatch.setattr(disk_cache, "derived_dir", lambda: cache)
    other = corpus(tmp_path, 300, "other.txt")
    assert torch.equal(windows.corpus_ids(tok, other, "train"), windows.tokenize(tok, windows.load_text(other, "train")))
    for f in (cache / "tokens").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:40])
    monkeypatch.setattr(windows, "_IDS", {})
    assert torch.equal(windows.corpus_ids(tok, text, "train"), ids)


def test_calibration_statistics_are_cached_per_model_corpus_and_setting(tmp_path, cache, monkeypatch):
    tok, text = word_tokenizer(), corpus(tmp_path)
    model = tiny_model("llama")
    loaded = LoadedModel(model, tok, adapter_for(model), "tiny", torch.device("cpu"), torch.float32)
    config = PruneConfig(method="flap", ratio=0.3, data=text, calib_windows=4, calib_seqlen=16)
    attn, mlp = calibration.calibration_stats(loaded, config)
    assert len(list((cache / "calibration").glob("*.safetensors"))) == 1

    # the same weights in another model object (a new process, a private copy): read back exactly
    twin = tiny_model("llama")
    twin_loaded = dataclasses.replace(loaded, model=twin)
    with monkeypatch.context() as m:
        m.setattr(calibration, "collect_input_stats", refuse)
        attn2, mlp2 = calibration.calibration_stats(twin_loaded, config)
    for a, b in zip(attn + mlp, attn2 + mlp2):
        assert a.count == b.count and torch.equal(a.total, b.total) and torch.equal(a.total_sq, b.total_sq)

    # other weights, another setting, another text: each is computed anew
    changed = tiny_model("llama")
    with torch.no_grad():
        adapter_for(changed).output_linear(changed, 1, "down_proj").weight.mul_(1.5)
    assert disk_cache.model_fingerprint(changed) != disk_cache.model_fingerprint(twin)
    for other_loaded, other_config in ((dataclasses.replace(loaded, model=changed), config),
                                       (twin_loaded, dataclasses.replace(config, calib_windows=5)),
                                       (twin_loaded, dataclasses.replace(config, data=corpus(tmp_path, 400, "b.txt")))):
        calibration.calibration_stats(other_loaded, other_config)
    assert len(list((cache / "calibration").glob("*.safetensors"))) == 4


def test_the_private_copy_shares_weights_but_not_its_swaps(tmp_path, cache):
    model = tiny_model("qwen2")
    loaded = LoadedModel(model, word_tokenizer(), adapter_for(model), "tiny", torch.device("cpu"), torch.float32)
    mine = private_copy(loaded)
    assert mine.model is not model
    assert all(a is b for a, b in zip(mine.model.parameters(), model.parameters()))  # nothing copied
    assert disk_cache.model_fingerprint(mine.model) == disk_cache.model_fingerprint(model)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = window_losses(model, ids)
    space = PruningSpace.from_model(model, loaded.adapter, "kv_group")
    mask = space.unflatten(torch.tensor([1.0, 0.0] * 3), (torch.arange(120) % 3 == 0).float())
    seen = []  # the shared model's losses, computed while the copy's layer 1 runs on swapped-in weights

    def meanwhile(module, args):
        assert tuple(module.weight.shape) == (48, 24)
        seen.append(window_losses(model, ids))

    handle = mine.adapter.output_linear(mine.model, 1, "o_proj").register_forward_pre_hook(meanwhile)
    with gathered(mine.model, mine.adapter, space, mask):
        pruned = window_losses(mine.model, ids)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], dense)  # the shared model stayed dense
    assert not torch.allclose(pruned, dense)
