"""Token windows for evaluation and calibration: pure functions on 1-D token-id tensors.

Protocols:
- evaluation: the split's text is tokenised once, cut into non-overlapping windows of `seqlen`
  tokens from the start, the remainder dropped (the standard WikiText-2 perplexity protocol);
- calibration: `n` windows of `seqlen` tokens at uniformly random starts in the tokenised text,
  or for C4 the SparseGPT/Wanda protocol (a random document longer than `seqlen`, a random window
  inside it, repeated `n` times).
Randomness always comes from a local `torch.Generator` seeded by the caller: the global RNG is
never read or advanced, and the same seed gives the same windows. `corpus_ids` tokenises a split
once (in memory and on disk).

BOS: where a tokenizer starts every encoding with a beginning-of-sequence token (Llama-2, Gemma and
others: `tokenizer(text).input_ids[0] == bos_token_id`), the model never sees text without it, so
every window here is BOS + (seqlen - 1) text tokens (pass `bos=bos_id(tokenizer)`). The loss is
taken on the text tokens only: position 0 is never a target. Tokenizers that add no BOS (the
embedded SmolLM2) get plain windows of seqlen text tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from .corpus import load_documents, load_text
from .errors import PrunerError


def tokenize(tokenizer, text: str) -> Tensor:
    """The whole text tokenised in one call, no special tokens added: a 1-D LongTensor.

    `verbose=False` silences the "sequence length is longer than the specified maximum" warning:
    the ids are cut into windows afterwards, never fed to the model whole.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors=None, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


_IDS: dict[tuple[str, str], Tensor] = {}  # (tokenizer, text) fingerprints -> ids, the last few splits
_IDS_KEPT = 8


def corpus_ids(tokenizer, corpus: str, split: str) -> Tensor:
    """`tokenize` of a corpus split, done once per tokenizer and text: remembered in this process
    and cached on disk (pruner.disk_cache, keyed by the tokenizer's and the text's fingerprints).
    The returned tensor is shared: never change it in place."""
    from . import disk_cache

    text = load_text(corpus, split)
    key = {"tokenizer": disk_cache.tokenizer_fingerprint(tokenizer), "text": disk_cache.text_fingerprint(text)}
    if key["tokenizer"] is None:  # a tokenizer without an identity is not cached
        return tokenize(tokenizer, text)
    memo = (key["tokenizer"], key["text"])
    if memo not in _IDS:
        hit = disk_cache.load("tokens", key)
        if hit is not None and hit[0].get("ids") is not None and hit[0]["ids"].dim() == 1:
            ids = hit[0]["ids"].long()
        else:
            ids = tokenize(tokenizer, text)
            small = ids.numel() == 0 or int(ids.max()) < 2**31
            disk_cache.save("tokens", key, {"ids": ids.int() if small else ids})
        while len(_IDS) >= _IDS_KEPT:
            _IDS.pop(next(iter(_IDS)))
        _IDS[memo] = ids
    return _IDS[memo]


def bos_id(tokenizer) -> int | None:
    """The BOS id where the tokenizer prepends it by default (`tokenizer(text).input_ids` starts with
    it), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def with_bos(rows: Tensor, bos: int | None) -> Tensor:
    """Rows of text tokens (W, T) -> (W, T + 1) with BOS in front; unchanged when bos is None."""
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], 1)


def text_length(seqlen: int, bos: int | None) -> int:
    """Text tokens per window of seqlen tokens (one fewer with a BOS)."""
    return seqlen - 1 if bos is not None else seqlen


def check_window_args(seqlen: int, n: int | None = None, name: str = "n") -> None:
    """PrunerError unless seqlen >= 2 and (when given) the window count n >= 1."""
    if seqlen < 2:
        raise PrunerError(f"seqlen must be at least 2 tokens, got {seqlen}")
    if n is not None and n < 1:
        raise PrunerError(f"{name} must be at least 1, got {n}")


def check_ids(ids: Tensor) -> None:
    """Token ids must be a 1-D tensor (a programming error otherwise, not a user one)."""
    if ids.dim() != 1:
        raise ValueError(f"expected 1-D token ids, got shape {tuple(ids.shape)}")


def too_short(n_tokens: int, seqlen: int) -> PrunerError:
    """The error for a text that cannot hold one window."""
    return PrunerError(f"text too short: {n_tokens} tokens, fewer than one window of {seqlen} tokens "
                       "(use a longer text or a smaller seqlen)")


def eval_windows(ids: Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None) -> Tensor:
    """Non-overlapping windows from the start, remainder dropped: LongTensor[W, seqlen].

    W = len(ids) // n with n = seqlen text tokens (seqlen - 1 after a BOS), or the first
    `max_windows` of them when given.
    """
    check_window_args(seqlen, max_windows, "max_windows")
    check_ids(ids)
    n = text_length(seqlen, bos)
    count = ids.numel() // n if n else 0
    if count == 0:
        raise too_short(ids.numel(), seqlen)
    if max_windows is not None:
        count = min(count, max_windows)
    return with_bos(ids[:count * n].reshape(count, n).clone(), bos)


def random_windows(ids: Tensor, n: int, seqlen: int, seed: int, bos: int | None = None) -> Tensor:
    """n windows with starts uniform in [0, len(ids) - seqlen]: LongTensor[n, seqlen] (BOS first when given)."""
    check_window_args(seqlen, n)
    check_ids(ids)
    length = text_length(seqlen, bos)
    if ids.numel() < length or length < 1:
        raise too_short(ids.numel(), seqlen)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (n,), generator=generator)
    return with_bos(ids[starts[:, None] + torch.arange(length)], bos)


def document_windows(docs_token_ids: Sequence[Tensor], n: int, seqlen: int, seed: int, bos: int | None = None) -> Tensor:
    """The C4 calibration protocol (SparseGPT/Wanda): LongTensor[n, seqlen].

    n times: pick a random document until one is longer than seqlen tokens, then take the window
    starting uniformly in [0, len(doc) - seqlen - 1]. Documents are only indexed when picked, so a
    lazily tokenised sequence works. PrunerError when no document is long enough.
    """
    check_window_args(seqlen, n)
    if len(docs_token_ids) == 0:
        raise PrunerError("no documents to draw calibration windows from")
    if bos is not None:
        return with_bos(document_windows(docs_token_ids, n, seqlen - 1, seed), bos)
    generator = torch.Generator().manual_seed(seed)
    too_short_docs: set[int] = set()
    windows = []
    while len(windows) < n:
        index = int(torch.randint(0, len(docs_token_ids), (1,), generator=generator))
        doc = docs_token_ids[index]
        if doc.numel() <= seqlen:
            too_short_docs.add(index)
            if len(too_short_docs) == len(docs_token_ids):
                raise PrunerError(f"no document is longer than one window of {seqlen} tokens")
            continue
        start = int(torch.randint(0, doc.numel() - seqlen, (1,), generator=generator))
        windows.append(doc[start:start + seqlen])
    return torch.stack(windows)


class LazyTokenized(Sequence):
    """Documents tokenised on first access (C4's shard holds far more than calibration needs)."""

    def __init__(self, tokenizer, docs: list[str]):
        self.tokenizer, self.docs, self.cache = tokenizer, docs, {}

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> Tensor:
        if index not in self.cache:
            self.cache[index] = tokenize(self.tokenizer, self.docs[index])
        return self.cache[index]


_WINDOWS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def calibration_windows(tokenizer, corpus: str, split: str, n: int, seqlen: int, seed: int) -> Tensor:
    """n calibration windows of seqlen tokens from a corpus split: LongTensor[n, seqlen].

    c4 uses the document protocol over its documents; every other corpus draws random windows
    from its tokenised text. Remembered per tokenizer object and arguments (the same seed gives
    the same windows, and tokenising a corpus takes seconds): treat the result as read-only.
    """
    check_window_args(seqlen, n)
    try:
        per_tokenizer = _WINDOWS_CACHE.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced is not remembered
        per_tokenizer = {}
    key = (corpus, split, n, seqlen, seed)
    if key not in per_tokenizer:
        bos = bos_id(tokenizer)
        if corpus == "c4":
            windows = document_windows(LazyTokenized(tokenizer, load_documents(corpus, split)), n, seqlen, seed, bos)
        else:
            windows = random_windows(corpus_ids(tokenizer, corpus, split), n, seqlen, seed, bos)
        per_tokenizer[key] = windows
    return per_tokenizer[key]


def corpus_windows(tokenizer, corpus: str, split: str, seqlen: int, max_windows: int | None = None) -> Tensor:
    """The evaluation windows of a corpus split: tokenised once (`corpus_ids`), non-overlapping, BOS
    first where the tokenizer adds one (`eval_windows`)."""
    return eval_windows(corpus_ids(tokenizer, corpus, split), seqlen, max_windows, bos_id(tokenizer))
