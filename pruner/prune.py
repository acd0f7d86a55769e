"""One entry point for every method: `select` a mask, `apply` it (slice and compensate), report.

    pruned, selection, report = prune(loaded, PruneConfig(method="flap", ratio=0.3))

The loaded model is never modified: `apply` slices a copy.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .budget import budget_report
from .calibration import calibration_stats
from .config import PruneConfig
from .dispatch import resident
from .evaluate import total_params
from .methods import Selection, get_method
from .scores import flap_bias
from .slicing import record_layout, sliced_copy
from .space import Mask, PruningSpace


def select(loaded, config: PruneConfig, space: PruningSpace | None = None) -> tuple[PruningSpace, Selection]:
    """The method's decision for `config` (nothing is changed)."""
    method = get_method(config.method)
    config.validate()
    space = space or PruningSpace.from_model(loaded.model, loaded.adapter, config.granularity)
    return space, method.select(loaded, space, config)


def compensation(loaded, space: PruningSpace, mask: Mask, stats) -> list[tuple[int, str, Tensor]]:
    """FLAP's bias compensation for any mask: for o_proj and down_proj, W[:, removed] @ mean(X[removed])
    over the removed input columns, as (layer, which, delta) to add to the sliced layer's bias."""
    updates = []
    for l in range(space.n_layers):
        head_dim = space.shapes[l].head_dim
        attn_removed = torch.ones(space.shapes[l].n_q * head_dim, dtype=torch.bool)
        for h in space.kept_query_heads(l, mask.heads[l]).tolist():
            attn_removed[h * head_dim:(h + 1) * head_dim] = False
        mlp_removed = torch.ones(space.shapes[l].d_ff, dtype=torch.bool)
        mlp_removed[space.kept_channels(l, mask.channels[l])] = False
        for which, removed, stat in (("o_proj", attn_removed, stats[0][l]), ("down_proj", mlp_removed, stats[1][l])):
            if removed.any():
                with resident(loaded.model, loaded.adapter.layers(loaded.model)[l]):
                    weight = loaded.adapter.output_linear(loaded.model, l, which).weight
                    updates.append((l, which, flap_bias(weight, stat.mean, removed).cpu()))
    return updates


def apply(loaded, config: PruneConfig, space: PruningSpace, selection: Selection, stats=None) -> nn.Module:
    """A sliced copy of the model under `selection.mask`, with the removed channels' mean output
    added as a bias when `selection.compensate` (means from `stats`, by default the config's
    calibration statistics)."""
    pruned = sliced_copy(loaded.model, loaded.adapter, space, selection.mask)
    if selection.compensate:
        stats = stats or calibration_stats(loaded, config)
        for layer, which, delta in compensation(loaded, space, selection.mask, stats):
            loaded.adapter.add_output_bias(pruned, layer, which, delta)
        record_layout(pruned, loaded.adapter)
    return pruned


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
    """What the pruning did: parameters before and after, ratios, per-layer kept sizes, time."""
    return {
        "method": config.method,
        "model": loaded.spec,
        "settings": config.to_dict(),
        "params_before": total_params(loaded.model),
        "params_after": total_params(pruned),
        "decoder_linear_params_before": space.decoder_linear_params(),
        "decoder_linear_params_after": space.kept_params(selection.mask),
        **budget_report(space, selection.mask, config.ratio),
        "bias_compensation": selection.compensate,
        "per_layer": per_layer_report(space, selection.mask),
        "wall_time_s": wall_time_s,
    } | selection.extra


def prune(loaded, config: PruneConfig):
    """Select with `config.method`, apply to a copy, report: returns (pruned model, selection, report)."""
    start = time.perf_counter()
    space, selection = select(loaded, config)
    pruned = apply(loaded, config, space, selection)
    return pruned, selection, report(loaded, config, space, selection, pruned, time.perf_counter() - start)
