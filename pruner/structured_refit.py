"""Weight reconstruction after a structured mask (`PruneConfig.reconstruct`): once a method has
chosen which heads and channels go, refit the kept input columns of o_proj and down_proj, and
their bias, so that each layer's output stays as close as it can to the dense one.

For each layer, in order, on sequential calibration inputs (pruner.sequential: a layer sees the
outputs of the already refitted layers before it):
  1. collect the o_proj input statistics (G = X^T X, sum x, N), refit o_proj;
  2. collect the down_proj input statistics through the refitted attention, refit down_proj;
  3. run the layer: its outputs are the next layer's inputs.
A refit solves  min ||X_K W'_K^T + 1 b^T - X W^T||^2  over the kept columns K and an intercept b
(pruner.reconstruction): "ls" directly (`refit_kept_columns`, ridge towards W_K), "admm" by the
paper's fixed-mask iterations (`admm_refit_columns`). The removed columns become zero and b is
added to the layer's bias, so a sublayer with nothing kept keeps its mean output W mu as a bias.
The model keeps its dense shapes (masked == sliced: slicing it afterwards drops the zero columns
and gives the same logits).

Each layer's record holds, per refitted linear, the relative output error
||X W'^T + b - X W^T||^2 / ||X W^T||^2 on these inputs before the refit (the removed columns
zeroed, plus FLAP's bias W_R mu_R when the selection compensates) and after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .reconstruction import admm_refit_columns, refit_kept_columns, relative_output_error, with_intercept
from .scores import flap_bias
from .sequential import InputGram, SequentialInputs
from .space import Mask, PruningSpace

REFITS = ("ls", "admm")


def _with_bias(weight: Tensor, bias: Tensor) -> Tensor:
    return torch.cat([weight.double(), bias.double().unsqueeze(1)], 1)


@torch.no_grad()
def refit_linear(linear: nn.Linear, inputs: InputGram, kept: Tensor, how: str, compensate: bool,
                 admm_iterations: int = 20) -> tuple[Tensor, Tensor, dict]:
    """The refitted weight (dense shape, removed columns zero) and bias delta of one output linear,
    with its relative output error before and after."""
    w = linear.weight.detach()  # (d_out, d_in)
    kept = kept.to(w.device)
    args = (w, inputs.gram, inputs.total, inputs.count, kept)
    w_kept, delta = refit_kept_columns(*args) if how == "ls" else admm_refit_columns(*args, iterations=admm_iterations)
    new = torch.zeros_like(w)
    new[:, kept] = w_kept
    gram = with_intercept(inputs.gram, inputs.total, inputs.count)
    dense = _with_bias(w, torch.zeros(w.shape[0], device=w.device))
    before_bias = flap_bias(w, inputs.mean, ~kept) if compensate else torch.zeros(w.shape[0], device=w.device)
    errors = {"before": float(relative_output_error(_with_bias(w * kept, before_bias), dense, gram)),
              "after": float(relative_output_error(_with_bias(new, delta), dense, gram))}
    return new, delta, errors


def refit_structured(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask, windows: Tensor,
                     how: str, compensate: bool = False, admm_iterations: int = 20, batch_size: int = 8,
                     on_layer: Callable[[dict], None] | None = None) -> list[dict]:
    """Refit o_proj and down_proj of every layer of `model` (in place, dense shapes) for `mask`;
    returns one record per layer: {"layer", "errors": {linear: {"before", "after"}}, "time_s"}."""
    walk = SequentialInputs(model, adapter, windows, batch_size)
    records = []
    for l in tqdm(range(walk.n_layers), desc=f"refit ({how}) by layer", leave=False):
        start = time.perf_counter()
        errors = {}
        for which, kept in zip(("o_proj", "down_proj"), space.kept_inputs(l, mask)):
            linear = adapter.output_linear(model, l, which)
            if linear is None or bool(kept.all()):
                continue  # a removed sublayer, or nothing removed: nothing to refit
            inputs = walk.collect([which])[which]
            new, delta, errors[which] = refit_linear(linear, inputs, kept, how, compensate, admm_iterations)
            with torch.no_grad():
                linear.weight.copy_(new)
            adapter.add_output_bias(model, l, which, delta)
        walk.advance()
        records.append({"layer": l, "errors": errors, "time_s": time.perf_counter() - start})
        if on_layer is not None:
            on_layer(records[-1])
    return records
