"""One entry point for every pruning method: choose a mask, slice, report."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import PrunerError
from .evaluate import total_params
from .methods import METHODS, Selection
from .models import LoadedModel
from .pg_run import PGConfig, read_settings
from .selection import achieved_ratio
from .slicing import add_output_bias, record_layout, sliced_copy
from .space import Mask, PruningSpace, check_granularity, check_ratio


@dataclass(frozen=True)
class PruneConfig:
    """Settings shared by all methods. `ratio` is the fraction of decoder-linear parameters removed."""

    method: str = "magnitude"
    ratio: float = 0.3
    granularity: str = "kv_group"
    data: str = "brown"
    seed: int = 0
    calib_windows: int = 128
    calib_seqlen: int = 128
    pg: PGConfig = field(default_factory=PGConfig)
    run_dir: str | None = None  # policy gradient: where checkpoints go (resumable)

    def validate(self) -> "PruneConfig":
        if self.method not in METHODS:
            raise PrunerError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        check_ratio(self.ratio)
        check_granularity(self.granularity)
        if self.calib_windows < 1 or self.calib_seqlen < 2:
            raise PrunerError("calibration needs at least one window of at least 2 tokens")
        if self.method == "pg":
            self.pg.validate()
        return self


def config_from_run(run_dir) -> PruneConfig:
    """The PruneConfig a policy-gradient run was started with, from its checkpoint (to resume it)."""
    settings = read_settings(run_dir)
    return PruneConfig(method="pg", ratio=settings["ratio"], granularity=settings["granularity"],
                       data=settings["data"], seed=settings["seed"], calib_windows=settings["calib_windows"],
                       pg=PGConfig(**settings["pg"]), run_dir=str(run_dir)).validate()


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


def prune(loaded: LoadedModel, config: PruneConfig, method: MethodFn | None = None):
    """Select a mask with `config.method`, slice a copy of the model, and report.

    Returns (pruned model, selection, report). The loaded model is never modified.
    """
    config.validate()
    start = time.perf_counter()
    space = PruningSpace.from_model(loaded.model, loaded.adapter, config.granularity)
    selection = (method or METHODS[config.method])(loaded, space, config)
    mask = selection.mask
    pruned = sliced_copy(loaded.model, loaded.adapter, space, mask)
    for layer, which, delta in selection.bias_updates:
        add_output_bias(pruned, loaded.adapter, layer, which, delta)
    if selection.bias_updates:
        record_layout(pruned, loaded.adapter)
    report = {
        "method": config.method,
        "model": loaded.spec,
        "settings": dataclasses.asdict(config),
        "params_before": total_params(loaded.model),
        "params_after": total_params(pruned),
        "decoder_linear_params_before": space.decoder_linear_params(),
        "decoder_linear_params_after": space.kept_params(mask),
        "target_ratio": config.ratio,
        "achieved_ratio": achieved_ratio(space, mask),
        "per_layer": per_layer_report(space, mask),
        "wall_time_s": time.perf_counter() - start,
    } | selection.extra
    return pruned, selection, report
