"""The settings of one pruning: `PruneConfig`, shared by every method, with the search's knobs nested.

A config travels as a plain dict (`to_dict`) into run records and checkpoints, and comes back with
`PruneConfig.from_dict`, which refuses unknown or missing fields instead of guessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import PrunerError
from .pg.config import PGConfig, with_added_knobs
from .space import check_granularity, check_ratio
from .sparsity_masks import parse_sparsity_type, resolve_sparsity

RECONSTRUCT = ("none", "ls", "admm")
# The refits' default damping (PruneConfig.refit_damp), chosen on validation for ls and admm alike (README
# "Unstructured and N:M sparsity with weight updates"): of 0.1, 0.3 and 1, the lowest mean log perplexity over
# FLAP, Taylor and Wanda-sp at 0.2-0.4 with 32 calibration windows; much less overfits them.
REFIT_DAMP = 0.3
ADMM_MASKS = ("gradual", "reselect")
WANDA_SP_STATS = ("dense", "sequential")


@dataclass(frozen=True)
class PruneConfig:
    """Settings shared by all methods. `ratio` is the fraction of decoder-linear parameters removed;
    for the unstructured / N:M methods (admm, sparsegpt, wanda, magnitude-unstructured) it is the
    fraction of every decoder linear's weights set to zero (1 - N/M for N:M).

    sparsity_type: those methods' pattern, "unstructured", "2:4" or "4:8" (any "N:M").
    reconstruct: after a structured method chose its mask, refit the kept columns of o_proj and
        down_proj and their bias on sequential calibration inputs: "ls" (least squares with an
        intercept) or "admm" (the ADMM fixed-mask update); "none" keeps the method's own result.
    admm_mask: the ADMM method's mask schedule, "gradual" (the paper's cubic ramp) or "reselect"
        (the released code: the full-sparsity mask re-chosen during the first iterations).
    admm_iterations: ADMM iterations (the paper: 20; the mask ramps over the first min(15, this)); also
        those of the "admm" refit, whose penalty follows its damping so that 20 converge.
    refit_damp: the damping of a `reconstruct` refit, a ridge towards the original weights: "ls" adds
        this fraction of the kept inputs' mean variance to each one's; "admm" (the paper's damping in
        its normalised coordinates) adds this fraction of each kept input's own variance.
    wanda_sp_stats: Wanda-sp's input norms, "dense" (from the dense model, reused at every ratio) or
        "sequential" (the reference's order: each layer's on the outputs of the pruned layers before it).
    """

    method: str = "magnitude"
    ratio: float = 0.3
    granularity: str = "auto"  # kv_group where layers have >= 2 k/v heads, else query_head
    data: str = "brown"
    seed: int = 0
    calib_windows: int = 128
    calib_seqlen: int = 128
    pg: PGConfig = field(default_factory=PGConfig)
    run_dir: str | None = None  # policy gradient: where checkpoints go (resumable)
    sparsity_type: str = "unstructured"
    reconstruct: str = "none"
    admm_mask: str = "gradual"
    admm_iterations: int = 20
    wanda_sp_stats: str = "dense"
    refit_damp: float = REFIT_DAMP

    def validate(self) -> "PruneConfig":
        check_ratio(self.ratio)
        check_granularity(self.granularity)
        if self.calib_windows < 1 or self.calib_seqlen < 2:
            raise PrunerError("calibration needs at least one window (calib_windows, --calib-windows) of at least 2 "
                              f"tokens (calib_seqlen), got {self.calib_windows} of {self.calib_seqlen}")
        if self.method == "pg":
            self.pg.validate()
        kind = parse_sparsity_type(self.sparsity_type)
        if kind.is_nm and abs(self.ratio - kind.nm_sparsity) > 1e-6:
            raise PrunerError(f"{kind} sparsity zeroes {kind.nm_sparsity:g} of every linear's weights: "
                              f"use ratio {kind.nm_sparsity:g} (got {self.ratio:g})")
        resolve_sparsity(self.ratio, kind)
        if self.reconstruct not in RECONSTRUCT:
            raise PrunerError(f"unknown reconstruction {self.reconstruct!r}: choose one of {', '.join(RECONSTRUCT)}")
        if self.admm_mask not in ADMM_MASKS:
            raise PrunerError(f"unknown ADMM mask schedule {self.admm_mask!r}: choose one of {', '.join(ADMM_MASKS)}")
        if self.wanda_sp_stats not in WANDA_SP_STATS:
            raise PrunerError(f"unknown Wanda-sp statistics {self.wanda_sp_stats!r}: choose one of "
                              f"{', '.join(WANDA_SP_STATS)}")
        if not 0 <= self.refit_damp <= 100:
            raise PrunerError(f"the refit's damping must lie in [0, 100], got {self.refit_damp}")
        if not 1 <= self.admm_iterations <= 10_000:
            raise PrunerError(f"ADMM iterations must lie in [1, 10000], got {self.admm_iterations}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        """The inverse of `to_dict`; PrunerError for a dict that is not one (unknown, missing or
        mistyped fields), e.g. a damaged run record."""
        try:
            outer = {f.name for f in dataclasses.fields(cls)}
            inner = {f.name for f in dataclasses.fields(PGConfig)}
            pg = d.get("pg", {})
            unknown = (set(d) - outer) | (set(pg) - inner if isinstance(pg, dict) else {"pg"})
            if unknown:
                raise PrunerError(f"unknown settings {sorted(unknown)}")
            return cls(**{k: v for k, v in d.items() if k != "pg"}, pg=PGConfig(**with_added_knobs(pg))).validate()
        except (TypeError, AttributeError) as exc:
            raise PrunerError(f"settings are not a pruning configuration ({exc})") from None
