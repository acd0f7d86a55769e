"""Evaluation: perplexity, generation, prefill latency, decode speed, parameter counts."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def check_context(config, tokens: int, what: str) -> None:
    """PrunerError when `tokens` exceed the maximum positions that a model's config (`model.config`,
    or one read alone with `models.read_config`) gives; nothing when it gives none."""
    from .errors import PrunerError

    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise PrunerError(f"{what} needs {tokens} positions, but the model takes at most {limit}")


def token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """Next-token cross-entropy in fp32: logits (B, T, V), ids (B, T) -> (B, T-1)."""
    b, t, v = logits.shape
    flat = logits[:, :-1].reshape(-1, v).float()  # row-major: cross_entropy's fast path
    return F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="none").view(b, t - 1)


@torch.no_grad()
def window_losses(model: nn.Module, windows: Tensor) -> Tensor:
    """Mean next-token cross-entropy of each sequence in `windows` (B, T) -> (B,), in fp32."""
    ids = windows.to(next(model.parameters()).device)
    return token_nll(model(ids, use_cache=False).logits, ids).mean(1)


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8, progress: bool = False) -> dict:
    """ppl = exp(mean token cross-entropy) over non-overlapping windows (W, seqlen).

    Every window predicts its seqlen - 1 next tokens; windows all have one length, so the
    mean over windows of the per-window mean equals the mean over all predicted tokens.
    """
    losses = []
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        losses.append(window_losses(model, windows[start:start + batch_size]).double().cpu())
    nll = torch.cat(losses).mean().item()
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "windows": int(windows.shape[0]),
        "tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
        "seqlen": int(windows.shape[1]),
    }


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40, streamer=None) -> str:
    """Greedy continuation of `prompt` (deterministic); tokens go to `streamer` as they come."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_latency(model: nn.Module, seqlen: int = 128, batch: int = 1, repeats: int = 5, vocab: int | None = None) -> float:
    """Median seconds of one forward over a (batch, seqlen) prompt, after one warm-up."""
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module, prompt_len: int = 32, new_tokens: int = 32) -> float:
    """Greedy decoding speed with the KV cache, tokens per second (prefill excluded)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    _sync(device)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False)
    _sync(device)
    t2 = time.perf_counter()
    return new_tokens / max((t2 - t1) - (t1 - t0), 1e-9)


def total_params(model: nn.Module) -> int:
    """All parameters, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())
