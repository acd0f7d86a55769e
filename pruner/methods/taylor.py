"""LLM-Pruner's first-order Taylor importance (Ma et al., NeurIPS 2023), as its reference code runs it
(`hf_prune.py --pruner_type taylor`, block-wise, `--taylor param_first`, group reduction `sum`):

    salience(w) = |w * dL/dw|         one backward pass of the mean LM loss over calibration windows
    unit score  = sum of the salience of every weight (and bias) the unit owns:
                  attention: the q rows and o_proj columns of its query heads, plus, for a kv group,
                  its k and v rows; MLP channel: its gate row, up row and down_proj column
    selection   = the same ratio in every pruned layer; the first 4 and the last 2 layers stay dense
                  and the others prune more, so the model loses `ratio` of its parameters in all

Differences from the reference, deliberate: calibration on the chosen corpus's train split (the
reference: 10 BookCorpus windows of 64 tokens), per-layer counts that match the parameter budget
(the reference rounds heads down per layer: `n_pruned // head_dim`), and kv groups for grouped-query
attention (the reference's LLaMA-3 path misattributes query heads to kv heads).
"""

from __future__ import annotations

import torch

from ..budget import keep_fraction, uniform_mask
from ..dispatch import model_device
from ..evaluate import token_nll
from ..scores import taylor_salience
from ..space import PruningSpace
from ..windows import calibration_windows
from .base import Method, Selection, UnitScores

DENSE_FIRST, DENSE_LAST = 4, 2  # layers the reference leaves unpruned (block_*_layer_start 4, end L - 2)


def _salience_sum(linear, dim: int) -> torch.Tensor:
    """Per output row (dim=1) or per input column (dim=0): the summed |w * grad| (bias with its row)."""
    s = taylor_salience(linear.weight, linear.weight.grad).sum(dim)
    if dim == 1 and linear.bias is not None:
        s = s + taylor_salience(linear.bias, linear.bias.grad)
    return s.cpu()


def accumulate_gradients(loaded, config) -> None:
    """dL/dw of the mean token cross-entropy over the calibration windows, left in `.grad`."""
    windows = calibration_windows(loaded.tokenizer, config.data, "train", config.calib_windows, config.calib_seqlen,
                                  config.seed)
    model, batch = loaded.model, 8
    device = model_device(model)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for start in range(0, len(windows), batch):
            ids = windows[start:start + batch].to(device)
            loss = token_nll(model(ids, use_cache=False).logits, ids).mean() * len(ids) / len(windows)
            loss.backward()


def unit_scores(loaded, space: PruningSpace, config) -> UnitScores:
    """Per layer: the Taylor importance of each attention unit and MLP unit (gradients are freed after)."""
    accumulate_gradients(loaded, config)
    heads, channels = [], []
    try:
        for l, s in enumerate(space.shapes):
            lin = loaded.adapter.decoder_linears(loaded.model, l)
            hd = s.head_dim
            q = (_salience_sum(lin["q_proj"], 1) + _salience_sum(lin["o_proj"], 0)).view(s.n_q, hd).sum(1)
            kv = (_salience_sum(lin["k_proj"], 1) + _salience_sum(lin["v_proj"], 1)).view(s.n_kv, hd).sum(1)
            if space.granularity == "kv_group":
                heads.append(q.view(s.n_kv, s.group_size).sum(1) + kv)
            elif space.granularity == "query_head":
                heads.append(q)
            else:
                heads.append((q.sum() + kv.sum()).view(1))
            ch = _salience_sum(lin["gate_proj"], 1) + _salience_sum(lin["up_proj"], 1) + _salience_sum(lin["down_proj"], 0)
            channels.append(ch.sum().view(1) if space.granularity == "block" else ch)
    finally:
        loaded.model.zero_grad(set_to_none=True)
    return heads, channels


def dense_layers(n_layers: int) -> tuple[int, ...]:
    """The layers the reference leaves dense, where the model is deep enough to spare them."""
    if n_layers <= DENSE_FIRST + DENSE_LAST + 1:
        return ()
    return (*range(DENSE_FIRST), *range(n_layers - DENSE_LAST, n_layers))


def select(loaded, space: PruningSpace, config) -> Selection:
    heads, channels = unit_scores(loaded, space, config)
    dense = dense_layers(space.n_layers) if space.granularity != "block" else ()
    mask = uniform_mask(space, heads, channels, keep_fraction(config.ratio), dense_layers=dense)
    return Selection(mask, extra={"dense_layers": list(dense)})


METHOD = Method("taylor", "LLM-Pruner's first-order Taylor importance |w * dL/dw| per unit, uniform per layer "
                          "(first 4 and last 2 layers dense); one backward pass", select, unit_scores=unit_scores)
