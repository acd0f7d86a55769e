"""What every pruning method returns, and how a method is described to the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from ..space import Mask

UnitScores = tuple[list[Tensor], list[Tensor]]  # per layer: attention-unit scores, MLP-unit scores


@dataclass
class Selection:
    """A method's decision: the hard mask, whether the removed channels' mean contribution is kept
    as a bias when the mask is applied (FLAP's compensation), and anything worth reporting."""

    mask: Mask
    compensate: bool = False
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method. `select(loaded, space, config)` returns a Selection; metric methods
    also give `unit_scores(loaded, space, config)`, which the policy-gradient search can start from."""

    name: str
    summary: str
    select: Callable
    uses_data: bool = True
    unit_scores: Callable | None = None
