"""Token windows: exact shapes, determinism, local randomness, and the C4 document protocol."""

import logging

import pytest
import torch

from pruner import windows
from pruner.errors import PrunerError
from pruner.paths import embedded_model_dir
from pruner.windows import calibration_windows, document_windows, eval_windows, random_windows, tokenize


class WordTokenizer:
    """One id per whitespace-separated word; remembers the keyword arguments it was called with."""

    def __init__(self):
        self.vocab, self.calls = {}, []

    def __call__(self, text, **kwargs):
        self.calls.append(kwargs)
        return {"input_ids": [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]}


def contiguous(rows: torch.Tensor) -> bool:
    return bool((rows[:, 1:] - rows[:, :-1] == 1).all())


def test_tokenize_adds_nothing():
    tokenizer = WordTokenizer()
    ids = tokenize(tokenizer, "a b a c\n\nb")
    assert ids.dtype == torch.long and ids.tolist() == [0, 1, 0, 2, 1]
    assert tokenizer.calls == [{"add_special_tokens": False, "return_tensors": None, "verbose": False}]


def test_eval_windows_drop_the_remainder():
    ids = torch.arange(10)
    assert eval_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert eval_windows(ids, 5).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert eval_windows(ids, 3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert eval_windows(ids, 3, max_windows=50).shape == (3, 3)
    assert eval_windows(ids, 10).shape == (1, 10)


def test_eval_windows_errors():
    with pytest.raises(PrunerError, match="text too short: 9 tokens, fewer than one window of 10"):
        eval_windows(torch.arange(9), 10)
    with pytest.raises(PrunerError, match="seqlen"):
        eval_windows(torch.arange(9), 1)
    with pytest.raises(PrunerError, match="max_windows"):
        eval_windows(torch.arange(9), 3, max_windows=0)


def test_random_windows_are_deterministic_slices():
    ids = torch.arange(1000) + 7
    first = random_windows(ids, 16, 32, seed=3)
    assert first.shape == (16, 32) and first.dtype == torch.long
    assert contiguous(first) and first.min() >= 7 and first.max() <= 1006
    assert torch.equal(first, random_windows(ids, 16, 32, seed=3))
    assert not torch.equal(first, random_windows(ids, 16, 32, seed=4))


def test_random_windows_edges():
    ids = torch.arange(8)
    assert random_windows(ids, 3, 8, seed=0).tolist() == [list(range(8))] * 3
    with pytest.raises(PrunerError, match="text too short: 8 tokens"):
        random_windows(ids, 3, 9, seed=0)
    with pytest.raises(PrunerError, match="at least 1"):
        random_windows(ids, 0, 4, seed=0)


def test_document_protocol_skips_short_documents():
    lengths = [3, 50, 10, 60, 11]
    docs = [torch.arange(n) + 1000 * k for k, n in enumerate(lengths)]
    picked = document_windows(docs, 40, 10, seed=1)
    assert picked.shape == (40, 10) and contiguous(picked)
    sources = set((picked[:, 0] // 1000).tolist())
    assert sources <= {1, 3, 4} and len(sources) > 1
    assert (picked[(picked[:, 0] // 1000) == 4] == torch.arange(10) + 4000).all()
    assert torch.equal(picked, document_windows(docs, 40, 10, seed=1))
    assert not torch.equal(picked, document_windows(docs, 40, 10, seed=2))


def test_document_protocol_errors():
    with pytest.raises(PrunerError, match="no document is longer than one window of 10"):
        document_windows([torch.arange(10), torch.arange(4)], 2, 10, seed=0)
    with pytest.raises(PrunerError, match="no documents"):
        document_windows([], 2, 10, seed=0)


def test_global_rng_untouched():
    state = torch.get_rng_state()
    random_windows(torch.arange(100), 5, 10, seed=0)
    document_windows([torch.arange(30), torch.arange(5)], 5, 10, seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_calibration_windows_from_a_text_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(" ".join(f"w{i}" for i in range(200)), encoding="utf-8")
    picked = calibration_windows(WordTokenizer(), str(path), "train", 6, 16, seed=0)
    assert picked.shape == (6, 16) and contiguous(picked)
    assert torch.equal(picked, calibration_windows(WordTokenizer(), str(path), "train", 6, 16, seed=0))


def number_tokenizer(text, **kwargs):
    """Ids are the numbers written in the text, so they do not depend on tokenisation order."""
    return {"input_ids": [int(word) for word in text.split()]}


def test_calibration_windows_use_the_document_protocol_for_c4(monkeypatch):
    docs = ["5 6", " ".join(str(100 + i) for i in range(40)), " ".join(str(200 + i) for i in range(30))]
    monkeypatch.setattr(windows, "load_documents", lambda corpus, split: docs)
    picked = calibration_windows(number_tokenizer, "c4", "train", 5, 8, seed=0)
    expected = document_windows([tokenize(number_tokenizer, doc) for doc in docs], 5, 8, seed=0)
    assert torch.equal(picked, expected) and contiguous(picked) and picked.min() >= 100


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.skipif(not (embedded_model_dir() / "tokenizer.json").is_file(),
                    reason="embedded model not prepared (make test prepares it)")
@pytest.mark.parametrize("quiet", [True, False])
def test_real_tokenizer_long_text_is_quiet(quiet):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(), model_max_length=16)
    text = "\n\n".join(["The jury said it did find that the election was fair."] * 20)
    collect, logger = Collect(), logging.getLogger("transformers")
    logger.addHandler(collect)
    try:
        ids = tokenize(tokenizer, text) if quiet else torch.tensor(tokenizer(text)["input_ids"])
    finally:
        logger.removeHandler(collect)
    assert ids.dim() == 1 and ids.numel() > 16
    # The unquiet call shows the check can see the warning.
    assert any("longer than the specified maximum" in m for m in collect.messages) is not quiet
    if quiet:
        assert ids.tolist() == tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def test_windows_start_with_bos_where_the_tokenizer_adds_one(tmp_path):
    """A tokenizer that prepends BOS gets BOS + (seqlen - 1) text tokens in every kind of window;
    one that adds none gets plain text windows."""
    from tiny_models import tiny_corpus, word_tokenizer

    from pruner.pg.run import training_blocks
    from pruner.windows import bos_id, corpus_windows

    path = tiny_corpus(tmp_path / "c.txt", words=3000)
    with_bos, plain = word_tokenizer(bos=True), word_tokenizer(bos=False)
    assert bos_id(with_bos) == 1 and bos_id(plain) is None and bos_id(WordTokenizer()) is None
    text_ids = tokenize(plain, windows.load_text(str(path), "test"))
    for tokenizer, bos in ((with_bos, 1), (plain, None)):
        ev = corpus_windows(tokenizer, str(path), "test", 16)
        cal = calibration_windows(tokenizer, str(path), "train", 5, 16, seed=0)
        blocks = training_blocks(tokenize(tokenizer, windows.load_text(str(path), "train")), 16, 0, bos_id(tokenizer))
        for rows in (ev, cal, blocks):
            assert rows.shape[1] == 16
            assert bool((rows[:, 0] == 1).all()) == (bos == 1)
            assert not bool((rows[:, 1:] == 1).any())  # BOS only in front: every target is a text token
        n = 15 if bos else 16
        assert ev.shape[0] == len(text_ids) // n
        torch.testing.assert_close(ev[:, 16 - n:].flatten(), text_ids[: ev.shape[0] * n])
