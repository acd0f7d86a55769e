"""Shared by the unstructured / N:M methods (magnitude-unstructured, wanda, sparsegpt, admm): prune
every decoder linear (q, k, v, o, gate, up, down) of a copy of the model layer by layer on
sequential calibration inputs, each linear by the method's `rule`.

A rule maps (W (d_out, d_in), the input statistics of W, config) to (W', keep-mask): W' is zero
outside the mask. All linears of a layer are pruned on the inputs of the layer as the already
pruned layers before it produce them, then the layer's outputs are recomputed with its new weights,
as the SparseGPT, Wanda and ADMM reference code do. The result keeps every shape: a dense model
with zeros (no dense kernel runs faster for them), carried to `apply` as `Selection.weights`.

The per-layer records hold, per linear, the relative output error ||X W'^T - X W^T||^2 / ||X W^T||^2
on its calibration inputs before the weight update (the final mask on the original weights) and
after it (W'), and the layer's wall time (statistics, pruning and its output pass).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..reconstruction import relative_output_error
from ..sequential import InputGram, SequentialInputs
from ..space import PruningSpace
from ..windows import calibration_windows
from .base import Selection

Rule = Callable[[Tensor, InputGram, object], tuple[Tensor, Tensor]]


def sparse_select(loaded, space: PruningSpace, config, rule: Rule,
                  on_layer: Callable[[dict], None] | None = None) -> Selection:
    """Prune every decoder linear of a copy of `loaded.model` with `rule`; the new weights travel in
    the Selection (the mask removes no unit: nothing is sliced)."""
    windows = calibration_windows(loaded.tokenizer, config.data, "train", config.calib_windows,
                                  config.calib_seqlen, config.seed)
    model, adapter = copy.deepcopy(loaded.model), loaded.adapter
    walk = SequentialInputs(model, adapter, windows)
    records = []
    for l in tqdm(range(walk.n_layers), desc=f"{config.method} by layer", leave=False):
        start = time.perf_counter()
        inputs = walk.collect()
        errors, zeros, total = {}, 0, 0
        for name, linear in adapter.decoder_linears(model, l).items():
            w = linear.weight.detach()
            gram = inputs[name].gram
            new, keep = rule(w, inputs[name], config)
            keep = keep.to(w.device)
            errors[name] = {"before": float(relative_output_error(w * keep, w, gram)),
                            "after": float(relative_output_error(new, w, gram))}
            with torch.no_grad():
                linear.weight.copy_(new)
            zeros += int((linear.weight == 0).sum())
            total += w.numel()
        walk.advance()
        records.append({"layer": l, "errors": errors, "zero_fraction": zeros / max(total, 1),
                        "time_s": time.perf_counter() - start})
        if on_layer is not None:
            on_layer(records[-1])
    weights = {(l, name): linear.weight.detach()
               for l in range(space.n_layers) for name, linear in adapter.decoder_linears(model, l).items()}
    return Selection(space.full_mask(), weights=weights, extra={"weight_update": {
        "sparsity_type": config.sparsity_type, "per_layer": records,
        "note": "unstructured / N:M sparsity: the model is saved as dense safetensors with zeros; it is as "
                "large and, on dense kernels, as fast as the dense model"}})
