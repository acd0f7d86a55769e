"""One entry point for every method: `select` a mask, `apply` it (slice and compensate), report.

    pruned, selection, report = prune(loaded, PruneConfig(method="flap", ratio=0.3))

The loaded model is never modified: `apply` works on a copy. A structured method's selection is
sliced (plus FLAP's bias compensation, or with `config.reconstruct` a refit of the kept columns on
sequential calibration inputs, pruner.structured_refit); an unstructured / N:M method's selection
carries the new weights, which are written into the copy (its mask removes nothing).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .budget import budget_report
from .calibration import calibration_stats
from .config import PruneConfig
from .dispatch import resident
from .evaluate import total_params
from .methods import Selection, check_config, get_method
from .scores import flap_bias
from .slicing import record_layout, slice_model, sliced_copy
from .space import Mask, PruningSpace
from .structured_refit import refit_structured
from .windows import calibration_windows

OnLayer = Callable[[dict], None]


def select(loaded, config: PruneConfig, space: PruningSpace | None = None,
           on_layer: OnLayer | None = None) -> tuple[PruningSpace, Selection]:
    """The method's decision for `config` (the loaded model is not changed). Layer-by-layer methods
    call `on_layer` with each finished layer's record."""
    method = get_method(config.method)
    check_config(config)
    space = space or PruningSpace.from_model(loaded.model, loaded.adapter, config.granularity)
    if method.sparse:
        return space, method.select(loaded, space, config, on_layer=on_layer)
    return space, method.select(loaded, space, config)


def compensation(loaded, space: PruningSpace, mask: Mask, stats) -> list[tuple[int, str, Tensor]]:
    """FLAP's bias compensation for any mask: for o_proj and down_proj, W[:, removed] @ mean(X[removed])
    over the removed input columns, as (layer, which, delta) to add to the sliced layer's bias."""
    updates = []
    for l in range(space.n_layers):
        attn_kept, mlp_kept = space.kept_inputs(l, mask)
        for which, removed, stat in (("o_proj", ~attn_kept, stats[0][l]), ("down_proj", ~mlp_kept, stats[1][l])):
            if removed.any():
                with resident(loaded.model, loaded.adapter.layers(loaded.model)[l]):
                    weight = loaded.adapter.output_linear(loaded.model, l, which).weight
                    updates.append((l, which, flap_bias(weight, stat.mean, removed).cpu()))
    return updates


def apply(loaded, config: PruneConfig, space: PruningSpace, selection: Selection, stats=None,
          on_layer: OnLayer | None = None) -> tuple[nn.Module, Selection]:
    """The pruned copy of the model, and the selection as applied.

    - `selection.weights` (unstructured / N:M methods): a copy with those weights written in.
    - otherwise a sliced copy under `selection.mask`, with the removed channels' mean output added as
      a bias when `selection.compensate` (means from `stats`, by default the config's calibration
      statistics);
    - with `config.reconstruct` ("ls" or "admm") instead: the kept columns of o_proj and down_proj and
      their bias refitted layer by layer on sequential calibration inputs (the refit's intercept
      takes the place of the compensation), then sliced. The returned selection's `extra` then
      holds the per-layer errors under "weight_update"; `on_layer` sees each layer's record.
    """
    if selection.weights is not None:
        pruned = sliced_copy(loaded.model, loaded.adapter, space, selection.mask)
        with torch.no_grad():
            for (layer, name), weight in selection.weights.items():
                loaded.adapter.decoder_linears(pruned, layer)[name].weight.copy_(weight)
        return pruned, selection
    if config.reconstruct != "none":
        return _reconstructed(loaded, config, space, selection, on_layer)
    pruned = sliced_copy(loaded.model, loaded.adapter, space, selection.mask)
    if selection.compensate:
        stats = stats or calibration_stats(loaded, config)
        for layer, which, delta in compensation(loaded, space, selection.mask, stats):
            loaded.adapter.add_output_bias(pruned, layer, which, delta)
        record_layout(pruned, loaded.adapter)
    return pruned, selection


def _reconstructed(loaded, config: PruneConfig, space: PruningSpace, selection: Selection,
                   on_layer: OnLayer | None) -> tuple[nn.Module, Selection]:
    """A copy refitted for the selection's mask (pruner.structured_refit), then sliced."""
    start = time.perf_counter()
    windows = calibration_windows(loaded.tokenizer, config.data, "train", config.calib_windows,
                                  config.calib_seqlen, config.seed)
    model = copy.deepcopy(loaded.model)
    records = refit_structured(model, loaded.adapter, space, selection.mask, windows, config.reconstruct,
                               selection.compensate, config.admm_iterations, damp=config.refit_damp,
                               on_layer=on_layer)
    slice_model(model, loaded.adapter, space, selection.mask)
    update = {"reconstruct": config.reconstruct, "per_layer": records, "time_s": time.perf_counter() - start}
    return model, dataclasses.replace(selection, extra={**selection.extra, "weight_update": update})


def per_layer_report(space: PruningSpace, mask: Mask) -> list[dict]:
    rows = []
    for l, (before, after) in enumerate(zip(space.shapes, space.kept_shapes(mask))):
        rows.append({
            "layer": l,
            "query_heads": after.n_q, "query_heads_before": before.n_q,
            "kv_heads": after.n_kv, "kv_heads_before": before.n_kv,
            "mlp_channels": after.d_ff, "mlp_channels_before": before.d_ff,
            "attention_kept": after.n_q > 0, "mlp_kept": after.d_ff > 0,
            "kept_fraction": space.layer_params(after, l) / space.layer_params(before, l),
        })
    return rows


def report(loaded, config: PruneConfig, space: PruningSpace, selection: Selection, pruned: nn.Module,
           wall_time_s: float) -> dict:
    """What the pruning did: parameters before and after, ratios, per-layer kept sizes, time (and,
    after a weight update, the per-layer errors under "weight_update")."""
    if selection.weights is not None:
        return sparse_report(loaded, config, space, selection, pruned, wall_time_s)
    return {
        "method": config.method,
        "model": loaded.spec,
        "settings": config.to_dict(),
        "params_before": total_params(loaded.model),
        "params_after": total_params(pruned),
        "decoder_linear_params_before": space.decoder_linear_params(),
        "decoder_linear_params_after": space.kept_params(selection.mask),
        **budget_report(space, selection.mask, config.ratio),
        "bias_compensation": selection.compensate and config.reconstruct == "none",
        "reconstruct": config.reconstruct,
        "per_layer": per_layer_report(space, selection.mask),
        "wall_time_s": wall_time_s,
    } | selection.extra


def nonzero_decoder_params(model: nn.Module, adapter) -> int:
    """Non-zero weights of the decoder linears plus their biases."""
    count = 0
    for l in range(len(adapter.layers(model))):
        for linear in adapter.decoder_linears(model, l).values():
            count += int(torch.count_nonzero(linear.weight)) + (linear.bias.numel() if linear.bias is not None else 0)
    return count


def sparse_report(loaded, config: PruneConfig, space: PruningSpace, selection: Selection, pruned: nn.Module,
                  wall_time_s: float) -> dict:
    """The report of an unstructured / N:M pruning: nothing is removed (parameters and shapes stay),
    `achieved_ratio` is the fraction of decoder-linear parameters that are zero, each layer's row
    has its zero fraction and time, and "weight_update" its per-linear errors."""
    nonzero = nonzero_decoder_params(pruned, loaded.adapter)
    total = space.decoder_linear_params()
    rows = [{"layer": r["layer"], "kept_fraction": 1.0 - r["zero_fraction"], "zero_fraction": r["zero_fraction"],
             "time_s": r["time_s"]} for r in selection.extra["weight_update"]["per_layer"]]
    return {
        "method": config.method,
        "model": loaded.spec,
        "settings": config.to_dict(),
        "sparsity_type": config.sparsity_type,
        "params_before": total_params(loaded.model),
        "params_after": total_params(pruned),
        "decoder_linear_params_before": total,
        "decoder_linear_params_after": total,
        "decoder_linear_nonzero_after": nonzero,
        "target_ratio": config.ratio,
        "achieved_ratio": 1.0 - nonzero / total,
        "storage": "dense safetensors with zeros: unstructured and N:M sparsity do not shrink the model or "
                   "speed anything up on dense kernels",
        "per_layer": rows,
        "wall_time_s": wall_time_s,
    } | selection.extra


def prune(loaded, config: PruneConfig, on_layer: OnLayer | None = None):
    """Select with `config.method`, apply to a copy, report: returns (pruned model, selection, report).
    `on_layer` sees each finished layer of a layer-by-layer method or of a reconstruction."""
    start = time.perf_counter()
    space, selection = select(loaded, config, on_layer=on_layer)
    pruned, selection = apply(loaded, config, space, selection, on_layer=on_layer)
    return pruned, selection, report(loaded, config, space, selection, pruned, time.perf_counter() - start)
