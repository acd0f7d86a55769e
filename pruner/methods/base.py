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
    as a bias when the mask is applied (FLAP's compensation), and anything worth reporting.

    `weights`, from the unstructured / N:M methods: new weights of decoder linears by (layer, linear
    name), in the model's own shapes with zeros where weights were pruned; `apply` writes them into
    its copy. Their mask removes no unit."""

    mask: Mask
    compensate: bool = False
    extra: dict = field(default_factory=dict)
    weights: dict[tuple[int, str], Tensor] | None = None


@dataclass(frozen=True)
class Method:
    """A registered method. `select(loaded, space, config)` returns a Selection; metric methods
    also give `unit_scores(loaded, space, config)`, which the policy-gradient search can start from.

    `sparse` methods zero single weights (unstructured or N:M, `config.sparsity_type`) instead of
    removing units, layer by layer: their `select` also takes `on_layer`, called with each
    finished layer's record."""

    name: str
    summary: str
    select: Callable
    uses_data: bool = True
    unit_scores: Callable | None = None
    sparse: bool = False
