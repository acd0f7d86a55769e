"""Evaluation: perplexity, generation, prefill latency, decode speed, parameter counts."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .dispatch import model_device


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
    """Mean next-token cross-entropy of each sequence in `windows` (B, T) -> (B,), in fp32.

    Logits are computed only at the T-1 positions that predict a token (`logits_to_keep`), so
    they come out contiguous and the vocabulary projection skips the last position."""
    ids = windows.to(model_device(model))
    positions = torch.arange(ids.shape[1] - 1, device=ids.device)
    logits = model(ids, use_cache=False, logits_to_keep=positions).logits  # (B, T-1, V)
    b, n, v = logits.shape
    return F.cross_entropy(logits.reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none").view(b, n).mean(1)


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
    device = model_device(model)
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
    device = model_device(model)
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
    device = model_device(model)
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


def model_card(model: nn.Module, windows: Tensor) -> dict:
    """What Compare shows of a model: parameters (tied counted once), perplexity of `windows`,
    median prefill seconds of a 1 x 128 prompt, greedy decoding tokens per second."""
    return {"parameters": total_params(model), "perplexity": perplexity(model, windows)["ppl"],
            "prefill_s": prefill_latency(model, 128), "decode_tokens_per_s": decode_tokens_per_s(model)}


@torch.no_grad()
def warm_up(forwards: dict, ids: Tensor) -> None:
    """One untimed call of every forward (lazy initialisation, kernel selection)."""
    for forward in forwards.values():
        forward(ids)
    _sync(ids.device)


@torch.no_grad()
def side_by_side(forwards: dict, windows: Tensor, batch_size: int, device: torch.device | str = "cpu",
                 on_batch=None, should_stop=None, progress: bool = False) -> dict:
    """Perplexity and wall time of several forwards on the same batches: for each batch of
    `windows` (W, T), every forward f(ids) -> logits (B, T, V) runs in turn, timed alone (the
    device synchronised around it), so the load of a shared machine falls on all of them alike.

    Returns per name: ppl = exp(mean token NLL), nll, seconds (wall time, summed over the timed
    forwards), cpu_seconds (this process's CPU time over the same forwards: on a CPU shared with
    other work it measures the forward's own effort where the wall time also counts waiting;
    meaningless for GPU forwards), windows, tokens, batches. on_batch(index, {name: {"seconds",
    "cpu_seconds", "nll"}}) after each batch; should_stop() is asked before each batch.
    """
    device = torch.device(device)
    totals = {name: {"nll_sum": 0.0, "seconds": 0.0, "cpu_seconds": 0.0} for name in forwards}
    windows_done = 0
    starts = range(0, len(windows), batch_size)
    for index, start in enumerate(tqdm(starts, desc="batches", disable=not progress, leave=False)):
        if should_stop is not None and should_stop():
            break
        ids = windows[start:start + batch_size].to(device)
        entry = {}
        for name, forward in forwards.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            logits = forward(ids)
            _sync(device)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            nll = token_nll(logits, ids).double().sum().item()
            del logits
            totals[name]["nll_sum"] += nll
            totals[name]["seconds"] += seconds
            totals[name]["cpu_seconds"] += cpu_seconds
            entry[name] = {"seconds": seconds, "cpu_seconds": cpu_seconds,
                           "nll": nll / (ids.shape[0] * (ids.shape[1] - 1))}
        windows_done += ids.shape[0]
        if on_batch is not None:
            on_batch(index, entry)
    tokens = windows_done * (windows.shape[1] - 1)
    out = {}
    for name, t in totals.items():
        nll = t["nll_sum"] / tokens if tokens else float("nan")
        out[name] = {"ppl": math.exp(nll) if tokens else float("nan"), "nll": nll, "seconds": t["seconds"],
                     "cpu_seconds": t["cpu_seconds"], "windows": windows_done, "tokens": tokens, "batches": math.ceil(windows_done / batch_size)}
    return out


def prr(ppl: float, dense_ppl: float, time_ratio: float) -> float | None:
    """Performance-runtime ratio (Probe Pruning, Sec. 5): perplexity increase per unit of relative
    runtime reduction, (ppl - dense ppl) / (1 - time_ratio) with time_ratio = pruned / dense wall
    time; lower is better. None when the pruned forward is not faster (no reduction to divide by)."""
    reduction = 1 - time_ratio
    return (ppl - dense_ppl) / reduction if reduction > 0 else None


def total_params(model: nn.Module) -> int:
    """All parameters, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())
