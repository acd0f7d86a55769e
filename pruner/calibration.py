"""Calibration statistics of the activations entering o_proj and down_proj.

One dense pass over calibration windows accumulates, per input channel j, the token count,
sum x_j and sum x_j^2 (fp64). That is all the metric baselines need:
||X_j||_2 = sqrt(sum x^2) (Wanda-sp), Var(X_j) and mean(X_j) (FLAP).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .dispatch import model_device


@dataclass
class InputStats:
    """Running per-channel moments of a linear layer's input."""

    count: int
    total: Tensor  # (C,) sum of x
    total_sq: Tensor  # (C,) sum of x^2

    @classmethod
    def empty(cls, channels: int) -> "InputStats":
        return cls(0, torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64))

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.count += x.shape[0]
        self.total += x.sum(0).cpu()
        self.total_sq += x.pow(2).sum(0).cpu()

    @property
    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)

    @property
    def var(self) -> Tensor:
        """Population variance over tokens, E[x^2] - E[x]^2."""
        return (self.total_sq / max(self.count, 1) - self.mean.pow(2)).clamp(min=0)

    @property
    def l2(self) -> Tensor:
        """||X_j||_2 over all calibration tokens."""
        return self.total_sq.sqrt()


def input_means(stats: tuple[list[InputStats], list[InputStats]]) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, the mean o_proj and down_proj inputs (float32): the `fill` of pruner.masking."""
    attn, mlp = stats
    return [s.mean.float() for s in attn], [s.mean.float() for s in mlp]


@torch.no_grad()
def each_output_input(model: nn.Module, adapter: Adapter, windows: Tensor, visit, batch_size: int = 8,
                      progress: bool = False, desc: str = "calibration") -> None:
    """One dense pass over `windows` in batches; `visit(layer, which, x)` sees the input x (B, T, C)
    of every o_proj (`which="o_proj"`) and down_proj as it is computed. Hooks are removed on exit."""
    handles = []

    def recorder(layer: int, which: str):
        def hook(module, args):
            visit(layer, which, args[0])
        return hook

    for l in range(len(adapter.layers(model))):
        for which in ("o_proj", "down_proj"):
            linear = adapter.output_linear(model, l, which)
            if linear is not None:
                handles.append(linear.register_forward_pre_hook(recorder(l, which)))
    device = model_device(model)
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
            model(windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def collect_input_stats(model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int = 8,
                        progress: bool = False) -> tuple[list[InputStats], list[InputStats]]:
    """Per layer: stats of the o_proj input (n_q*head_dim channels) and down_proj input (d_ff)."""
    n_layers = len(adapter.layers(model))
    outputs = [(adapter.output_linear(model, l, "o_proj"), adapter.output_linear(model, l, "down_proj"))
               for l in range(n_layers)]
    attn = [InputStats.empty(o.in_features if o is not None else 0) for o, _ in outputs]
    mlp = [InputStats.empty(d.in_features if d is not None else 0) for _, d in outputs]
    stats = {"o_proj": attn, "down_proj": mlp}
    each_output_input(model, adapter, windows, lambda l, which, x: stats[which][l].add(x), batch_size, progress)
    return attn, mlp


_STATS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def calibration_stats(loaded, config) -> tuple[list[InputStats], list[InputStats]]:
    """Input statistics of o_proj/down_proj over the config's calibration windows (train split).

    Remembered per model object and calibration setting (models are never modified in place), so
    pruning the same model again at another ratio costs no forward passes; and cached on disk
    (pruner.disk_cache) per model, corpus text and setting, so another process, or the studio
    after a restart, reads them back instead of calibrating again."""
    from . import disk_cache
    from .corpus import load_documents, load_text
    from .windows import bos_id, calibration_windows

    setting = (config.data, config.calib_windows, config.calib_seqlen, config.seed)
    per_model = _STATS_CACHE.setdefault(loaded.model, {})
    if setting not in per_model:
        text = "\n\n".join(load_documents(config.data, "train")) if config.data == "c4" else load_text(config.data, "train")
        key = {"model": disk_cache.model_fingerprint(loaded.model), "tokenizer": disk_cache.tokenizer_fingerprint(
            loaded.tokenizer), "text": disk_cache.text_fingerprint(text), "corpus": config.data,
            "windows": config.calib_windows, "seqlen": config.calib_seqlen, "seed": config.seed,
            "bos": bos_id(loaded.tokenizer)}  # windows start with BOS where the tokenizer adds one
        cached = key["tokenizer"] is not None
        stats = stats_from_tensors(disk_cache.load("calibration", key)) if cached else None
        if stats is None:
            windows = calibration_windows(loaded.tokenizer, config.data, "train", config.calib_windows,
                                          config.calib_seqlen, config.seed)
            stats = collect_input_stats(loaded.model, loaded.adapter, windows, progress=True)
            if cached:
                disk_cache.save("calibration", key, *stats_to_tensors(stats))
        per_model[setting] = stats
    return per_model[setting]


def stats_to_tensors(stats: tuple[list[InputStats], list[InputStats]]) -> tuple[dict[str, Tensor], dict]:
    """The statistics as named fp64 tensors plus their token counts (JSON)."""
    tensors, counts = {}, {}
    for kind, per_layer in zip(("attn", "mlp"), stats):
        counts[kind] = [s.count for s in per_layer]
        for l, s in enumerate(per_layer):
            tensors[f"{kind}.{l}.total"], tensors[f"{kind}.{l}.total_sq"] = s.total, s.total_sq
    return tensors, {"counts": counts}


def stats_from_tensors(found) -> tuple[list[InputStats], list[InputStats]] | None:
    """The inverse of `stats_to_tensors` for a cache hit; None for a miss or a malformed entry."""
    if found is None:
        return None
    tensors, extra = found
    try:
        out = []
        for kind in ("attn", "mlp"):
            out.append([InputStats(int(n), tensors[f"{kind}.{l}.total"].double(), tensors[f"{kind}.{l}.total_sq"].double())
                        for l, n in enumerate(extra["counts"][kind])])
        return out[0], out[1]
    except (KeyError, TypeError, ValueError):
        return None
