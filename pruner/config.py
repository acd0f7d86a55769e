"""The settings of one pruning: `PruneConfig`, shared by every method, with the search's knobs nested.

A config travels as a plain dict (`to_dict`) into run records and checkpoints, and comes back with
`PruneConfig.from_dict`, which refuses unknown or missing fields instead of guessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import PrunerError
from .pg.config import PGConfig
from .space import check_granularity, check_ratio


@dataclass(frozen=True)
class PruneConfig:
    """Settings shared by all methods. `ratio` is the fraction of decoder-linear parameters removed."""

    method: str = "magnitude"
    ratio: float = 0.3
    granularity: str = "auto"  # kv_group where layers have >= 2 k/v heads, else query_head
    data: str = "brown"
    seed: int = 0
    calib_windows: int = 128
    calib_seqlen: int = 128
    pg: PGConfig = field(default_factory=PGConfig)
    run_dir: str | None = None  # policy gradient: where checkpoints go (resumable)

    def validate(self) -> "PruneConfig":
        check_ratio(self.ratio)
        check_granularity(self.granularity)
        if self.calib_windows < 1 or self.calib_seqlen < 2:
            raise PrunerError("calibration needs at least one window (calib_windows, --calib-windows) of at least 2 "
                              f"tokens (calib_seqlen), got {self.calib_windows} of {self.calib_seqlen}")
        if self.method == "pg":
            self.pg.validate()
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
            return cls(**{k: v for k, v in d.items() if k != "pg"}, pg=PGConfig(**pg)).validate()
        except (TypeError, AttributeError) as exc:
            raise PrunerError(f"settings are not a pruning configuration ({exc})") from None
