"""Weight reconstruction after a structured mask (`PruneConfig.reconstruct`): once a method has
chosen which heads and channels go, refit the kept input columns of o_proj and down_proj, and
their bias, so that each layer's output stays as close as it can to the dense one.

For each layer, in order, on sequential calibration inputs (pruner.sequential: a layer sees the
outputs of the already refitted layers before it):
  1. collect the o_proj input statistics (G = X^T X, sum x, N), refit o_proj;
  2. collect the down_proj input statistics through the refitted attention, refit down_proj;
  3. run the layer: its outputs are the next layer's inputs.
The target is the dense model's output: the walk also runs the dense model alongside
(`SequentialInputs(dense_reference=True)`), giving for each linear the inputs X_d the dense model
feeds it for the same tokens and the cross products X^T X_d. A refit solves
    min ||X_K W'_K^T + 1 b^T - X_d W^T||^2
over the kept columns K and an intercept b (pruner.reconstruction): "ls" directly
(`refit_kept_columns`, a ridge towards W_K of the same weight for every kept input), "admm" by the
paper's fixed-mask iterations on the kept block (`admm_refit_columns`, the paper's damping: each
input's weight in the ridge proportional to its own variance), both with the cross term. So a
layer may also correct what the earlier pruned layers changed in its inputs, instead of reproducing
the dense layer's response to already changed inputs (target X W^T). The damping
(`config.REFIT_DAMP`, a ridge towards W_K) trades fitting the calibration windows against staying
at the method's own weights: on validation, "ls" with damping 0.01 overfits 32 calibration
windows at ratios 0.2 and 0.3; of 0.1, 0.3 and 1, 0.3 gives both refits the lowest mean log
perplexity over FLAP, Taylor and Wanda-sp at 0.2-0.4 (bench/results/
structured_refit_damping_validation_c32*.md, structured_ls_damping_validation_c32_mid.md,
structured_admm_kept_block_*validation_c32.md).
The removed columns become zero and b is added to the layer's bias, so a sublayer with nothing
kept keeps its mean output W mu_d as a bias. The model keeps its dense shapes (masked == sliced:
slicing it afterwards drops the zero columns and gives the same logits).

Each layer's record holds, per refitted linear, the relative output error
||X W'^T + b - X_d W^T||^2 / ||X_d W^T||^2 on these inputs before the refit (the removed columns
zeroed, plus FLAP's bias W_R mu_dR when the selection compensates) and after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .config import REFIT_DAMP
from .errors import PrunerError
from .reconstruction import admm_refit_columns, refit_kept_columns, relative_error_to_target
from .scores import flap_bias
from .sequential import InputGram, SequentialInputs
from .space import Mask, PruningSpace

REFITS = ("ls", "admm")


@torch.no_grad()
def refit_linear(linear: nn.Linear, inputs: InputGram, kept: Tensor, how: str, compensate: bool,
                 admm_iterations: int = 20, damp: float = REFIT_DAMP) -> tuple[Tensor, Tensor, dict]:
    """The refitted weight (dense shape, removed columns zero) and bias delta of one output linear
    towards the dense model's outputs X_d W^T (`inputs` from a walk with the dense reference), with
    its relative output error before and after. damp: the ridge's weight."""
    if inputs.cross is None:
        raise PrunerError("a structured refit needs the dense model's inputs (SequentialInputs(dense_reference=True))")
    w = linear.weight.detach()  # (d_out, d_in)
    kept = kept.to(w.device)
    args = (w, inputs.gram, inputs.total, inputs.count, kept)
    target = {"cross": inputs.cross, "target_sum": inputs.dense_total, "damp": damp}
    w_kept, delta = (refit_kept_columns(*args, **target) if how == "ls"
                     else admm_refit_columns(*args, iterations=admm_iterations, **target))
    new = torch.zeros_like(w)
    new[:, kept] = w_kept
    zero_b = torch.zeros(w.shape[0], device=w.device)
    before_bias = flap_bias(w, inputs.dense_total / inputs.count, ~kept) if compensate else zero_b  # dense means
    moments = (w, inputs.gram, inputs.cross, inputs.dense_gram, inputs.total, inputs.dense_total, inputs.count)
    errors = {"before": float(relative_error_to_target(w * kept, before_bias, *moments)),
              "after": float(relative_error_to_target(new, delta, *moments))}
    return new, delta, errors


def refit_structured(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask, windows: Tensor,
                     how: str, compensate: bool = False, admm_iterations: int = 20, batch_size: int = 8,
                     damp: float = REFIT_DAMP, on_layer: Callable[[dict], None] | None = None) -> list[dict]:
    """Refit o_proj and down_proj of every layer of `model` (in place, dense shapes; `model` must
    arrive dense, its layers are the dense reference as the walk reaches them) for `mask`;
    returns one record per layer: {"layer", "errors": {linear: {"before", "after"}}, "time_s"}."""
    walk = SequentialInputs(model, adapter, windows, batch_size, dense_reference=True)
    records = []
    for l in tqdm(range(walk.n_layers), desc=f"refit ({how}) by layer", leave=False):
        start = time.perf_counter()
        errors = {}
        for which, kept in zip(("o_proj", "down_proj"), space.kept_inputs(l, mask)):
            linear = adapter.output_linear(model, l, which)
            if linear is None or bool(kept.all()):
                continue  # a removed sublayer, or nothing removed: nothing to refit
            inputs = walk.collect([which])[which]
            new, delta, errors[which] = refit_linear(linear, inputs, kept, how, compensate, admm_iterations, damp)
            with torch.no_grad():
                linear.weight.copy_(new)
            adapter.add_output_bias(model, l, which, delta)
        walk.advance()
        records.append({"layer": l, "errors": errors, "time_s": time.perf_counter() - start})
        if on_layer is not None:
            on_layer(records[-1])
    return records
