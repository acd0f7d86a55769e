"""Probe Pruning at inference (Le et al., ICLR 2025, arXiv 2502.15618): per batch, per block, probe,
score, slice, run, remember. The tensor math is `probe_math`; this module is its lifecycle.

For every batch the model sees inside `ProbePruner.active()` (or through `ProbePruner.forward`),
for every decoder layer from `skip_layers` on, first its attention, then its MLP:
  1. at the block's entry norm, the residual importance ||R[b, s]||_2 of the batch picks the probe
     (positions first, then samples; `probe_math.select_probe`). The full-batch variant (the
     oracle) takes every sample and position;
  2. the probe (the normed block input at those samples and positions) runs through the block
     with its true positions (`Adapter.probe_attention`: RoPE at the true position ids, causal
     among the probe tokens; `Adapter.probe_mlp`: act(gate P) * up P);
  3. its activation energy Pr = sum_b A^2 / Bp is fused with the history at the probe positions
     (reference fusion; fixed weights in the `fixed` variant; none in `full-batch`), and the PPsp
     scores of query heads (o_proj) and channels (down_proj) keep the top 1 - r' of each, with
     r' = L / (L - skip) * r (`probe_math.redistributed_ratio`; the kept channel count rounded up
     to a multiple of `mlp_multiple`, as the reference rounds to 64);
  4. the block is physically sliced to what it keeps (`Adapter.slice_query_heads`, `slice_mlp`:
     gathered rows and columns) and the whole batch runs through the sliced block;
  5. the history takes an EMA step on the kept channels, from the sliced o_proj / down_proj input.
Leaving `active()` puts every layer's full weights back.

The history starts from a dense pass over calibration windows (`calibration_history_for`).
Differences from the reference code: the history is updated after every batch (the reference
skips its first, warm-up batch; ours warms up inside `quiet()`), and r' is not rounded.

Generation (`generate`): the prompt is the probe batch (one sequence: the probe is its top half of
positions by residual norm). Its forward probes every layer and slices it; the kept structure then
serves every new token (the KV cache holds the kept heads only), and the history is calibrated on
windows of `GENERATION_HISTORY_SEQLEN` tokens (positions past them fuse with a zero history).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import probe_math as pm
from .adapters import Adapter, LayerShape, channels_of_heads
from .calibration import each_output_input
from .disk_cache import model_fingerprint
from .dispatch import model_device
from .errors import PrunerError
from .evaluate import generate as greedy_generate
from .evaluate import decode_tokens_per_s, prefill_latency, prr, side_by_side, total_params, warm_up
from .space import PruningSpace, check_ratio

VARIANTS = ("probe", "full-batch", "fixed")
GENERATION_HISTORY_SEQLEN = 128  # calibration windows for generation: prompts longer read a zero history
History = tuple[list, list]  # per layer: o_proj-input history (S, n_q * d) and down_proj-input history (S, d_ff)
_KIND = {"attention": 0, "mlp": 1}


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of Probe Pruning. Defaults are the reference's `probe-default` (positions 0.5,
    samples 0.05, layers 0-2 dense, EMA momentum 0.99) with the history calibrated on `calib_windows`
    windows of the corpus's train split.

    ratio: the share of query heads and of MLP channels removed, over the whole model (the pruned
      layers each remove r' = L / (L - skip_layers) * ratio of theirs).
    variant: `probe` (the method), `full-batch` (the oracle: the whole batch is the probe, no
      history), `fixed` (fixed fusion weights: C = a Pr + (1 - a) H with a = probe_weight).
    mlp_multiple: the kept MLP channel count is rounded up to a multiple of this, as the reference
      rounds to 64 for tensor cores (`tc_multiple`): matrix products of odd widths run far slower
      per FLOP (on this project's CPU, 853 kept channels of 1536 took longer than 896). 32 stays
      closer to the ratio (853 -> 864); 1 keeps the exact count.
    """

    ratio: float = 0.4
    variant: str = "probe"
    position_fraction: float = 0.5
    sample_fraction: float = 0.05
    skip_layers: int = 3
    probe_weight: float = 0.5
    momentum: float = 0.99
    mlp_multiple: int = 32
    data: str = "brown"
    calib_windows: int = 128
    seed: int = 0

    def validate(self) -> "ProbeConfig":
        check_ratio(self.ratio)
        if self.variant not in VARIANTS:
            raise PrunerError(f"unknown probe variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        for name in ("position_fraction", "sample_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise PrunerError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.probe_weight <= 1 or not 0 <= self.momentum <= 1:
            raise PrunerError("probe_weight and momentum must lie in [0, 1]")
        if self.skip_layers < 0 or self.calib_windows < 1 or self.mlp_multiple < 1:
            raise PrunerError("skip_layers must be >= 0, calib_windows and mlp_multiple >= 1")
        return self

    @property
    def uses_history(self) -> bool:
        return self.variant != "full-batch"


@dataclass
class BatchRecord:
    """What one probed forward decided: kept query heads and MLP channels per pruned layer
    (sorted, on the CPU), and the batch and probe sizes."""

    batch: int
    seqlen: int
    probe_batch: int
    probe_positions: int
    heads: dict[int, Tensor] = field(default_factory=dict)
    channels: dict[int, Tensor] = field(default_factory=dict)


def layer_ratio(config: ProbeConfig, n_layers: int) -> float:
    """r' = L / (L - skip) * r for the pruned layers, or a PrunerError when it cannot be reached."""
    try:
        return pm.redistributed_ratio(config.ratio, n_layers, config.skip_layers)
    except ValueError as exc:
        raise PrunerError(f"Probe Pruning: {exc}") from None


# ---- calibration history ------------------------------------------------------------------------

@torch.no_grad()
def collect_history(model: nn.Module, adapter: Adapter, windows: Tensor, layers, batch_size: int = 8,
                    progress: bool = False) -> History:
    """H[s, j] = mean over windows of x[s, j]^2 for the o_proj and down_proj inputs of `layers`,
    from one dense pass (`probe_math.accumulate_squares`); None for the other layers."""
    n = len(adapter.layers(model))
    wanted = set(layers)
    states = {"o_proj": [None] * n, "down_proj": [None] * n}

    def visit(layer: int, which: str, x: Tensor) -> None:
        if layer in wanted:
            states[which][layer] = pm.accumulate_squares(states[which][layer], x.detach())

    each_output_input(model, adapter, windows, visit, batch_size, progress, desc="probe history")
    return tuple([pm.history_from(s) if s is not None else None for s in states[w]] for w in ("o_proj", "down_proj"))


HISTORIES_KEPT = 4  # calibration histories kept in memory (about 30 MB each on the embedded model)
_HISTORIES: OrderedDict[tuple, History] = OrderedDict()
_HISTORIES_LOCK = threading.Lock()


def calibration_history_for(loaded, config: ProbeConfig, seqlen: int, progress: bool = False) -> History:
    """The calibration history of `config` for windows of `seqlen` tokens (the corpus's train split),
    remembered per model identity (`disk_cache.model_fingerprint`: the private copies of one model,
    e.g. the Compare page's and the What-if queue's, share it) for the last HISTORIES_KEPT settings.
    Pruners copy it before updating."""
    from .windows import calibration_windows

    key = (model_fingerprint(loaded.model), config.data, config.calib_windows, seqlen, config.seed,
           config.skip_layers)
    with _HISTORIES_LOCK:
        if key in _HISTORIES:
            _HISTORIES.move_to_end(key)
            return _HISTORIES[key]
    windows = calibration_windows(loaded.tokenizer, config.data, "train", config.calib_windows, seqlen, config.seed)
    n = len(loaded.adapter.layers(loaded.model))
    history = collect_history(loaded.model, loaded.adapter, windows, range(config.skip_layers, n), progress=progress)
    with _HISTORIES_LOCK:
        _HISTORIES[key] = history
        while len(_HISTORIES) > HISTORIES_KEPT:
            _HISTORIES.popitem(last=False)
    return history


# ---- the pruner ---------------------------------------------------------------------------------

class ProbePruner:
    """Probe Pruning on `model`, in place while `active()` (see the module docstring).

    history: the calibration history (`calibration_history_for`), copied; the `probe` variant
    without one fuses nothing (C = sum_s Pr); `full-batch` never uses one. `records` holds one
    `BatchRecord` per probed forward.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, config: ProbeConfig, history: History | None = None):
        self.model, self.adapter, self.config = model, adapter, config.validate()
        self.shapes: list[LayerShape] = adapter.layer_shapes(model)
        n = len(self.shapes)
        self.layer_ratio = layer_ratio(config, n)
        if config.variant == "fixed" and history is None:
            raise ValueError("the fixed-fusion variant needs a calibration history")
        self.layers = range(config.skip_layers, n)
        self.history = (list(history[0]), list(history[1])) if history and config.uses_history else None
        self.space = PruningSpace.from_model(model, adapter, "query_head")
        self.head_dim = adapter.head_dim(model)
        # PPsp needs only sum_i W_ij^4 of each o_proj / down_proj column: computed once, O(C) per batch after
        self.moments = {(l, which): pm.column_fourth_moments(adapter.output_linear(model, l, linear).weight)
                        for l in self.layers for which, linear in (("attention", "o_proj"), ("mlp", "down_proj"))}
        self.records: list[BatchRecord] = []
        self._saved: dict[tuple[int, str], dict] = {}
        self._positions: dict[int, tuple[Tensor, Tensor]] = {}
        self._reprobe, self._quiet = True, False
        self._record: BatchRecord | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    @contextmanager
    def active(self, reprobe: bool = True):
        """Probe Pruning on every forward of the model inside the block. reprobe=False probes each
        layer once (the first forward, e.g. a prompt) and keeps that structure for later forwards
        (decoding). Full weights are back on exit."""
        handles = []
        self._reprobe = reprobe
        try:
            for l in self.layers:
                layer = self.adapter.layers(self.model)[l]
                handles.append(layer.register_forward_pre_hook(self._position_hook(l), with_kwargs=True))
                attn_norm, mlp_norm = self.adapter.block_entry_norms(self.model, l)
                handles.append(attn_norm.register_forward_hook(self._entry_hook(l, "attention")))
                handles.append(mlp_norm.register_forward_hook(self._entry_hook(l, "mlp")))
            yield self
        finally:
            for h in handles:
                h.remove()
            for l, which in list(self._saved):
                self._restore(l, which)
            self._positions.clear()
            self._record = None

    @contextmanager
    def quiet(self):
        """Forwards inside record nothing and leave the history alone (warm-ups)."""
        self._quiet = True
        try:
            yield self
        finally:
            self._quiet = False

    @torch.no_grad()
    def forward(self, ids: Tensor) -> Tensor:
        """Logits (B, T, V) of one batch under Probe Pruning (probe, slice, full inference, history)."""
        with self.active():
            return self.model(ids.to(next(self.model.parameters()).device), use_cache=False).logits

    __call__ = forward

    def generate(self, tokenizer, prompt: str, max_new_tokens: int = 40, streamer=None) -> str:
        """Greedy continuation with the prompt as the probe batch; its kept structure decodes every new token."""
        with self.active(reprobe=False):
            return greedy_generate(self.model, tokenizer, prompt, max_new_tokens, streamer)

    # -- hooks ------------------------------------------------------------------------------------
    def _position_hook(self, l: int):
        def hook(module, args, kwargs):
            embeddings = kwargs.get("position_embeddings")
            if embeddings is None:
                raise PrunerError("Probe Pruning needs the decoder layers to receive position_embeddings "
                                  "(a LLaMA-layout model of transformers >= 4.48)")
            self._positions[l] = embeddings
        return hook

    def _entry_hook(self, l: int, which: str):
        def hook(module, args, output):
            if self._reprobe or (l, which) not in self._saved:
                self._probe_and_slice(l, which, args[0], output)
        return hook

    def _restore(self, l: int, which: str) -> None:
        parts = self._saved.pop((l, which), None)
        if parts is not None:
            self.adapter.restore_sublayer(self.model, l, which, parts)

    @torch.no_grad()
    def _probe_and_slice(self, l: int, which: str, residual: Tensor, x: Tensor) -> None:
        self._restore(l, which)  # the probe and the scores use the full block
        samples, positions = self.select(residual)
        probe = x.index_select(0, samples).index_select(1, positions)  # (Bp, Tp, H)
        if l == self.layers[0] and which == "attention":
            self._new_record(residual.shape[0], residual.shape[1], samples.numel(), positions.numel())
        if which == "attention":
            cos, sin = self._positions[l]
            embeddings = tuple((t.index_select(0, samples) if t.shape[0] > 1 else t).index_select(1, positions)
                               for t in (cos, sin))
            acts = self.adapter.probe_attention(self.model, l, probe, embeddings, positions)
            scores = pm.ppsp_head_scores_from(self.fused(acts, l, which, positions), self.moments[(l, which)],
                                              self.head_dim)
            kept = pm.keep_indices(scores, self.layer_ratio).to(x.device)
            kept_channels = channels_of_heads(kept, self.head_dim)
            self._saved[(l, which)] = self.adapter.sublayer_parts(self.model, l, which)
            self.adapter.slice_query_heads(self.model, l, kept)
        else:
            acts = self.adapter.probe_mlp(self.model, l, probe)
            scores = pm.ppsp_channel_scores_from(self.fused(acts, l, which, positions), self.moments[(l, which)])
            kept = kept_channels = pm.keep_indices(scores, self.layer_ratio, self.config.mlp_multiple).to(x.device)
            self._saved[(l, which)] = self.adapter.sublayer_parts(self.model, l, which)
            self.adapter.slice_mlp(self.model, l, kept)
        if self._record is not None:
            getattr(self._record, "heads" if which == "attention" else "channels")[l] = kept.cpu()
        if self.history is not None and not self._quiet:
            self._update_once(l, which, kept_channels)

    def _new_record(self, batch: int, seqlen: int, probe_batch: int, probe_positions: int) -> None:
        self._record = None
        if not self._quiet:
            self._record = BatchRecord(batch, seqlen, probe_batch, probe_positions)
            self.records.append(self._record)

    def _update_once(self, l: int, which: str, kept_channels: Tensor) -> None:
        """History EMA step from the next input of the sliced o_proj / down_proj (this batch's)."""
        linear = self.adapter.output_linear(self.model, l, "o_proj" if which == "attention" else "down_proj")
        k = _KIND[which]

        def hook(module, args):
            handle.remove()
            self.history[k][l] = pm.update_history(self.history[k][l], args[0], kept_channels, self.config.momentum)

        handle = linear.register_forward_pre_hook(hook)

    # -- decisions (public for tests and views) ---------------------------------------------------
    def select(self, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Probe samples and positions of a batch from the residual (B, T, H) entering a block."""
        b, t = residual.shape[:2]
        if self.config.variant == "full-batch":
            return torch.arange(b, device=residual.device), torch.arange(t, device=residual.device)
        samples, positions = pm.select_probe(pm.residual_importance(residual), self.config.position_fraction,
                                             self.config.sample_fraction)
        return samples, positions

    def fused(self, acts: Tensor, l: int, which: str, positions: Tensor) -> Tensor:
        """Channel importance C (C,) of the probe activations `acts` (Bp, Tp, C) of layer l's block."""
        energy = pm.probe_channel_energy(acts)
        history = self.history[_KIND[which]][l] if self.history is not None else None
        if self.config.variant == "fixed":
            return pm.fuse_fixed(energy, history, positions, self.config.probe_weight)
        return pm.fuse_with_history(energy, history, positions)

    # -- accounting ---------------------------------------------------------------------------------
    def kept_shapes(self, record: BatchRecord) -> list[LayerShape]:
        """Per layer, the sizes the batch ran with (k/v heads: those the kept query heads use)."""
        out = []
        for l, s in enumerate(self.shapes):
            if l in record.heads:
                q = record.heads[l]
                n_kv = int(torch.unique(q // s.group_size).numel())
                out.append(LayerShape(int(q.numel()), n_kv, s.head_dim, int(record.channels[l].numel())))
            else:
                out.append(s)
        return out

    def flops(self, record: BatchRecord) -> dict:
        """Analytic FLOPs of one batch (probe_math.dense_flops / probe_flops, decoder layers only):
        dense forward, probe, pruned forward; probe_share = probe / dense, flops_ratio = (pruned + probe) / dense."""
        b, t, hidden = record.batch, record.seqlen, self.space.hidden
        dense = probe = pruned = 0
        for l, (s, kept) in enumerate(zip(self.shapes, self.kept_shapes(record))):
            dense += pm.dense_flops(b, t, hidden, s.n_q, s.n_kv, s.head_dim, s.d_ff)["total"]
            pruned += pm.dense_flops(b, t, hidden, kept.n_q, kept.n_kv, kept.head_dim, kept.d_ff)["total"]
            if l in record.heads:
                probe += pm.probe_flops(b, t, record.probe_batch, record.probe_positions, hidden, s.n_q, s.n_kv,
                                        s.head_dim, s.d_ff)["total"]
        return {"dense": dense, "probe": probe, "pruned": pruned, "probe_share": probe / dense,
                "flops_ratio": (pruned + probe) / dense}

    def achieved_ratio(self, record: BatchRecord) -> float:
        """Share of decoder-linear parameters the batch did not use (k/v heads no kept query head uses count as removed)."""
        kept = sum(self.space.layer_params(s, l) for l, s in enumerate(self.kept_shapes(record)))
        return 1 - kept / self.space.decoder_linear_params()

    def keep_masks(self, record: BatchRecord) -> tuple[Tensor, Tensor]:
        """(layers, n_q) and (layers, d_ff) 0/1 float: what the batch kept (skipped layers keep everything)."""
        n_q, d_ff = max(s.n_q for s in self.shapes), max(s.d_ff for s in self.shapes)
        heads, channels = torch.zeros(len(self.shapes), n_q), torch.zeros(len(self.shapes), d_ff)
        for l, s in enumerate(self.shapes):
            heads[l, record.heads[l] if l in record.heads else torch.arange(s.n_q)] = 1
            channels[l, record.channels[l] if l in record.channels else torch.arange(s.d_ff)] = 1
        return heads, channels


# ---- evaluation --------------------------------------------------------------------------------

def dense_forward(model: nn.Module):
    """f(ids) -> logits of a plain (dense or statically pruned) model."""
    def forward(ids: Tensor) -> Tensor:
        return model(ids, use_cache=False).logits
    return forward


def decoder_params(model: nn.Module, adapter: Adapter) -> int:
    return PruningSpace.from_model(model, adapter).decoder_linear_params()


def evaluate_dynamic(loaded, windows: Tensor, batch_size: int, pruners: dict[str, ProbePruner],
                     static: dict[str, nn.Module] | None = None, warmup: bool | None = None, on_batch=None,
                     should_stop=None, progress: bool = False) -> dict:
    """Dense, every probe pruner and every static model on the same batches, one after another per
    batch (`evaluate.side_by_side`), so their wall times are comparable. warmup (default: on CUDA
    devices) first calls every forward once, untimed, on a short window (pruners stay `quiet()`).

    Returns {"rows": one per name (dense first): ppl, seconds, time_ratio = seconds / dense seconds,
    prr = (ppl - dense ppl) / (1 - time_ratio), the same from CPU time (cpu_seconds,
    cpu_time_ratio, prr_cpu: see `side_by_side`), achieved_ratio; probe rows add the mean analytic
    probe_flops_share and flops_ratio and the per-layer ratio r'}, "batches": per batch and name
    the seconds and mean NLL, and for probe rows the kept sizes}. on_batch(index, batch_entry) is
    called after each batch; should_stop() ends the loop early.
    """
    static = static or {}
    forwards = {"dense": dense_forward(loaded.model)}
    forwards.update({name: p.forward for name, p in pruners.items()})
    forwards.update({name: dense_forward(m) for name, m in static.items()})
    if len(forwards) != 1 + len(pruners) + len(static):
        raise ValueError("names of pruners and static models must be distinct and not 'dense'")
    device = next(loaded.model.parameters()).device
    if warmup if warmup is not None else device.type == "cuda":
        with ExitStack() as stack:
            for p in pruners.values():
                stack.enter_context(p.quiet())
            warm_up(forwards, windows[:1, : min(windows.shape[1], 32)].to(device))
    batches = []

    def batch_done(index: int, entry: dict) -> None:
        for name, p in pruners.items():
            record = p.records[-1]
            entry[name] |= {"flops": p.flops(record), "achieved_ratio": p.achieved_ratio(record)}
        batches.append(entry)
        if on_batch is not None:
            on_batch(index, entry)

    results = side_by_side(forwards, windows, batch_size, device, on_batch=batch_done, should_stop=should_stop,
                           progress=progress)
    return {"rows": summary_rows(loaded, results, batches, pruners, static), "batches": batches}


def summary_rows(loaded, results: dict, batches: list[dict], pruners: dict, static: dict) -> list[dict]:
    dense = results["dense"]
    total = decoder_params(loaded.model, loaded.adapter)
    rows = []
    for name, r in results.items():
        time_ratio = r["seconds"] / dense["seconds"] if dense["seconds"] > 0 else float("nan")
        cpu_ratio = r["cpu_seconds"] / dense["cpu_seconds"] if dense["cpu_seconds"] > 0 else float("nan")
        row = {"name": name, "ppl": r["ppl"], "nll": r["nll"], "seconds": r["seconds"], "time_ratio": time_ratio,
               "prr": None if name == "dense" else prr(r["ppl"], dense["ppl"], time_ratio),
               "cpu_seconds": r["cpu_seconds"], "cpu_time_ratio": cpu_ratio,
               "prr_cpu": None if name == "dense" else prr(r["ppl"], dense["ppl"], cpu_ratio),
               "windows": r["windows"], "tokens": r["tokens"], "batches": r["batches"], "achieved_ratio": 0.0}
        if name in pruners:
            p = pruners[name]
            per = [b[name] for b in batches]
            row |= {"kind": f"dynamic ({p.config.variant})", "ratio": p.config.ratio, "layer_ratio": p.layer_ratio,
                    "achieved_ratio": _mean([b["achieved_ratio"] for b in per]),
                    "probe_flops_share": _mean([b["flops"]["probe_share"] for b in per]),
                    "flops_ratio": _mean([b["flops"]["flops_ratio"] for b in per])}
        elif name in static:
            row |= {"kind": "static", "achieved_ratio": 1 - decoder_params(static[name], loaded.adapter) / total}
        else:
            row["kind"] = "dense"
        rows.append(row)
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def build_pruner(loaded, config: ProbeConfig, seqlen: int, progress: bool = False) -> ProbePruner:
    """A ProbePruner on `loaded.model` with the calibration history for `seqlen`-token windows
    (none for the full-batch variant)."""
    layer_ratio(config.validate(), len(loaded.adapter.layers(loaded.model)))  # fail before calibrating
    history = calibration_history_for(loaded, config, seqlen, progress) if config.uses_history else None
    return ProbePruner(loaded.model, loaded.adapter, config, history)


def static_baselines(loaded, config: ProbeConfig, methods, progress: bool = False) -> dict[str, nn.Module]:
    """Statically pruned copies at the same ratio through the methods' registry (`prune.prune`)."""
    from .config import PruneConfig
    from .prune import prune

    out = {}
    for method in methods:
        pruned, _, _ = prune(loaded, PruneConfig(method=method, ratio=config.ratio, data=config.data, seed=config.seed,
                                                 calib_windows=config.calib_windows))
        out[method] = pruned
    return out


def dynamic_eval(loaded, windows: Tensor, config: ProbeConfig, batch_size: int, baselines=(),
                 progress: bool = False) -> dict:
    """`eval --dynamic probe`: perplexity with Probe Pruning on, next to dense and the static
    `baselines` at the same ratio, all through `evaluate_dynamic`. The probe row's numbers are
    also the report's top level (ppl, nll, windows, tokens, seqlen)."""
    start = time.perf_counter()
    pruner = build_pruner(loaded, config, windows.shape[1], progress)
    static = static_baselines(loaded, config, baselines, progress)
    name = "probe" if config.variant == "probe" else f"probe-{config.variant}"
    result = evaluate_dynamic(loaded, windows, batch_size, {name: pruner}, static, progress=progress)
    row = next(r for r in result["rows"] if r["name"] == name)
    return {"ppl": row["ppl"], "nll": row["nll"], "windows": row["windows"], "tokens": row["tokens"],
            "seqlen": int(windows.shape[1]), "dynamic": dataclasses.asdict(config), "rows": result["rows"],
            "batch_size": batch_size, "wall_time_s": time.perf_counter() - start}


def dynamic_card(loaded, pruner: ProbePruner, windows: Tensor, batch_size: int = 8) -> dict:
    """`evaluate.model_card` of a model under Probe Pruning (`pruner` hooks `loaded.model`, a private copy):
    parameters: all of them less the decoder-linear ones a batch of `windows` ran without (mean over batches);
    perplexity of `windows` in batches of `batch_size` (probe, slice, full inference per batch);
    prefill_s of a 1 x 128 prompt, the probe included; decode_tokens_per_s on the structure the prompt's
    probe chose (as `generate --dynamic probe` decodes)."""
    unused_shares = []  # the probe alone: Compare measures the dense model on its own
    result = side_by_side({"probe": pruner.forward}, windows, batch_size, model_device(loaded.model),
                          on_batch=lambda index, entry: unused_shares.append(pruner.achieved_ratio(pruner.records[-1])))
    with pruner.active(), pruner.quiet():  # random timing prompts stay out of the history
        prefill_s = prefill_latency(loaded.model, 128)
    with pruner.active(reprobe=False), pruner.quiet():
        decode = decode_tokens_per_s(loaded.model)
    unused = _mean(unused_shares) * decoder_params(loaded.model, loaded.adapter)
    return {"parameters": total_params(loaded.model) - unused, "perplexity": result["probe"]["ppl"],
            "prefill_s": prefill_s, "decode_tokens_per_s": decode}


__all__ = ["VARIANTS", "BatchRecord", "ProbeConfig", "ProbePruner", "build_pruner", "calibration_history_for",
           "collect_history", "dynamic_card", "dynamic_eval", "evaluate_dynamic", "static_baselines"]
