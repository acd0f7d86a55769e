"""Data shaped for the studio's charts and exports: plain tensors, rows and bytes, no UI code.

Heatmaps: a snapshot holds, per layer, the keep probability of every head unit and every MLP
channel unit. Heads fit as they are (layers x units). Channels are too many to read (e.g.
30 x 1536), so each layer's probabilities are sorted in decreasing order and averaged in
`bins` equal slices: row l, column b is the mean keep probability of the b-th slice of layer
l's channels, most kept first, so a row's profile shows how many channels the layer keeps.
"""

from __future__ import annotations

import csv
import io
import math

import torch
from torch import Tensor

from .methods import METHODS


def padded_rows(rows: list[Tensor]) -> Tensor:
    """(layers, max units) with NaN where a layer has fewer units (e.g. sliced or GQA-mixed)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r.float()
    return out


def sorted_bins(probs: Tensor, bins: int) -> Tensor:
    """Mean of `bins` consecutive slices of `probs` sorted in decreasing order -> (bins,)."""
    if probs.numel() == 0:
        return torch.full((bins,), float("nan"))
    ordered = probs.double().sort(descending=True).values
    n = ordered.numel()
    edges = torch.linspace(0, n, bins + 1).round().long()
    start = edges[:-1]
    stop = torch.minimum(torch.maximum(edges[1:], start + 1), torch.tensor(n))  # at least one unit, if any is left
    sums = torch.cat([ordered.new_zeros(1), ordered.cumsum(0)])
    return ((sums[stop] - sums[start]) / (stop - start)).float()  # an empty slice (more bins than units): NaN


def heads_matrix(snapshot: dict) -> Tensor:
    """Keep probabilities, layers x head units."""
    return padded_rows(snapshot["heads"])


def channels_matrix(snapshot: dict, bins: int = 64) -> Tensor:
    """Keep probabilities, layers x `bins` sorted slices of MLP channel units."""
    rows = [sorted_bins(c, min(bins, max(1, c.numel()))) for c in snapshot["channels"]]
    return padded_rows(rows)


def binned_columns(matrix: Tensor, bins: int) -> Tensor:
    """(layers, n) -> (layers, bins): the mean of `bins` slices of consecutive units, in index order
    (unlike `channels_matrix`, which sorts: here a column is the same channels in every row and batch)."""
    n = matrix.shape[1]
    edges = torch.linspace(0, n, min(bins, n) + 1).round().long()
    return torch.stack([matrix[:, a:b].float().mean(1) for a, b in zip(edges[:-1], edges[1:])], 1)


def mask_changes(masks: list[Tensor]) -> Tensor:
    """Per consecutive pair of batches, the share of each layer's units whose keep decision changed:
    masks are 0/1 (layers, units), the result is (len(masks) - 1, layers)."""
    if len(masks) < 2:
        return torch.zeros(0, masks[0].shape[0] if masks else 0)
    return torch.stack([(a != b).float().mean(1) for a, b in zip(masks[:-1], masks[1:])])


def probe_totals(batches: list[dict]) -> dict:
    """Sums over the batches a probe job has run: wall times, time saved and their ratio, the mean
    probe FLOPs share, and the perplexities (every batch has as many tokens)."""
    if not batches:
        return {}
    n = len(batches)
    dense, probe = sum(b["dense_s"] for b in batches), sum(b["probe_s"] for b in batches)
    return {"batches": n, "dense_s": dense, "probe_s": probe, "saved_s": dense - probe,
            "time_ratio": probe / dense if dense > 0 else float("nan"),
            "probe_flops_share": sum(b["probe_flops_share"] for b in batches) / n,
            "flops_ratio": sum(b["flops_ratio"] for b in batches) / n,
            "achieved_ratio": sum(b["achieved_ratio"] for b in batches) / n,
            "dense_ppl": math.exp(sum(b["dense_nll"] for b in batches) / n),
            "probe_ppl": math.exp(sum(b["probe_nll"] for b in batches) / n)}


CURVE_FIELDS = ("step", "loss_mean", "baseline", "grad_variance", "grad_mean_square", "lr", "expected_kept_fraction",
                "target_kept_fraction", "heads_mean", "heads_entropy", "channels_mean", "channels_entropy",
                "tokens_per_s", "step_time_s")


def curves_csv(steps: list[dict]) -> str:
    """The per-step history as CSV (the K losses as loss_0..loss_{K-1})."""
    k = max((len(r["losses"]) for r in steps), default=0)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*CURVE_FIELDS, *[f"loss_{j}" for j in range(k)]])
    for r in steps:
        writer.writerow([r.get(f) for f in CURVE_FIELDS] + list(r["losses"]) + [None] * (k - len(r["losses"])))
    return out.getvalue()


def eta_seconds(steps: list[dict], done: int, total: int, window: int = 20) -> float | None:
    """Remaining steps times the mean duration of the last `window` steps."""
    recent = [r["step_time_s"] for r in steps[-window:]]
    if not recent or done >= total:
        return None if not recent else 0.0
    return (total - done) * sum(recent) / len(recent)


def format_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def heatmap_png(matrix: Tensor, title: str, xlabel: str) -> bytes:
    """A layers x units heatmap as PNG bytes (matplotlib, viridis, 0..1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.18 * matrix.shape[0] + 1.5))
    image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="keep probability")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def layer_errors(records: list[dict]) -> dict[str, list]:
    """Per-layer weight-update records -> columns for a chart: the layer, the mean over its updated
    linears of the relative output error before and after the update, and its wall time. Layers
    with nothing updated (a reconstruction that removed nothing there) are left out."""
    out = {"layer": [], "before": [], "after": [], "time_s": []}
    for r in records:
        errors = list(r["errors"].values())
        if not errors:
            continue
        out["layer"].append(r["layer"])
        out["before"].append(sum(e["before"] for e in errors) / len(errors))
        out["after"].append(sum(e["after"] for e in errors) / len(errors))
        out["time_s"].append(r["time_s"])
    return out


def run_label(settings: dict) -> str:
    """A short name of a run's method and settings: "flap 0.3 + ls", "admm 2:4", "wanda 0.5"."""
    method = settings.get("method", "?")
    sparsity = settings.get("sparsity_type", "unstructured")
    if sparsity != "unstructured":
        return f"{method} {sparsity}"
    reconstruct = settings.get("reconstruct", "none")
    return f"{method} {settings.get('ratio', '?')}" + (f" + {reconstruct}" if reconstruct != "none" else "")


def run_kind(settings: dict) -> str:
    """"pg", "unstructured / N:M", "reconstructed" or "metric", from a run's settings."""
    if settings.get("method") == "pg":
        return "pg"
    method = METHODS.get(settings.get("method"))
    if method is not None and method.sparse:
        return "unstructured / N:M"
    return "reconstructed" if settings.get("reconstruct", "none") != "none" else "metric"
