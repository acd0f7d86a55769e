"""Physical slicing: turn a masked model into a smaller, faster one, and record its layout.

Attention keeps the rows of q/k/v (and their biases) of kept heads and the matching columns of
o_proj; head_dim never changes (RoPE). The MLP keeps rows of gate/up and columns of down. A
sublayer with nothing kept is replaced by a stand-in that adds only its output bias. How each of
these is done for an architecture is the adapter's business (pruner.adapters).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapters import Adapter, LayerShape
from .dispatch import empty_weights, is_dispatched, resident
from .space import Mask, PruningSpace


def slice_model(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask) -> list[LayerShape]:
    """Physically remove everything `mask` drops, in place; records the layout on the config.

    Returns the new per-layer shapes. Masked logits of the original model equal the logits
    of the sliced model (tested).
    """
    for l in range(space.n_layers):
        adapter.slice_attention(model, l, space.kept_query_heads(l, mask.heads[l]), space.kept_kv_heads(l, mask.heads[l]))
        adapter.slice_mlp(model, l, space.kept_channels(l, mask.channels[l]))
    record_layout(model, adapter)
    return adapter.layer_shapes(model)


def sliced_copy(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask) -> nn.Module:
    """A sliced deep copy; the original model is left untouched. A model loaded with a device map
    (spread over devices, parts offloaded) gives a sliced copy on the CPU, built one layer at a time."""
    if is_dispatched(model):
        return _sliced_cpu_copy(model, adapter, space, mask)
    clone = copy.deepcopy(model)
    slice_model(clone, adapter, space, mask)
    return clone


@torch.no_grad()
def _sliced_cpu_copy(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask) -> nn.Module:
    """An empty copy of the architecture, filled module by module from the dispatched model (each
    made resident in turn), every decoder layer sliced as soon as it is filled: the CPU holds the
    pruned model plus one dense layer at a time, never the whole dense model."""
    with empty_weights():
        clone = type(model)(copy.deepcopy(model.config))
    layers, clone_layers = adapter.layers(model), adapter.layers(clone)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    for name, module in model.named_modules():
        if id(module) in in_layers or not any(True for _ in module.parameters(recurse=False)):
            continue
        with resident(model, module):
            _fill(clone.get_submodule(name), module)
    for l, layer in enumerate(layers):
        with resident(model, layer):
            _fill(clone_layers[l], layer, recurse=True)
        adapter.slice_attention(clone, l, space.kept_query_heads(l, mask.heads[l]), space.kept_kv_heads(l, mask.heads[l]))
        adapter.slice_mlp(clone, l, space.kept_channels(l, mask.channels[l]))
    clone.tie_weights()
    clone.eval()
    record_layout(clone, adapter)
    return clone


def _fill(target: nn.Module, source: nn.Module, recurse: bool = False) -> None:
    """Give `target` CPU copies of `source`'s parameters (all of its subtree with `recurse`)."""
    state = {name: p.detach().to("cpu", copy=True) for name, p in source.named_parameters(recurse=recurse)}
    target.load_state_dict(state, strict=False, assign=True)


# ---- layout: per-layer kept sizes, recorded in config.json -----------------------------

def layer_layout(model: nn.Module, adapter: Adapter) -> list[dict]:
    """Per layer: kept query heads, kv heads, MLP channels and which linears carry a bias."""
    out = []
    for l, s in enumerate(adapter.layer_shapes(model)):
        biases = {name for name, lin in adapter.decoder_linears(model, l).items() if lin.bias is not None}
        biases |= {name for name, has in adapter.output_biases(model, l).items() if has}
        out.append({"n_q": s.n_q, "n_kv": s.n_kv, "d_ff": s.d_ff, "biases": sorted(biases)})
    return out


def record_layout(model: nn.Module, adapter: Adapter) -> None:
    """Store the layout on `model.config` (saved into config.json as `pruner_layout`). When
    every layer has one shape, also set the config's head counts and intermediate size so
    the directory loads with plain `from_pretrained`."""
    config = model.config
    config.head_dim = adapter.head_dim(model)
    layout = layer_layout(model, adapter)
    config.pruner_layout = layout
    first = layout[0]
    if all(e["n_q"] > 0 and e["d_ff"] > 0 for e in layout) and all(
        (e["n_q"], e["n_kv"], e["d_ff"]) == (first["n_q"], first["n_kv"], first["d_ff"]) for e in layout
    ):
        config.num_attention_heads = first["n_q"]
        config.num_key_value_heads = first["n_kv"]
        config.intermediate_size = first["d_ff"]


def apply_layout(model: nn.Module, adapter: Adapter, layout: list[dict]) -> None:
    """Reshape a freshly built (e.g. empty, meta-device) model to a recorded layout, in place,
    so a pruned state dict can be loaded into it."""
    for l, entry in enumerate(layout):
        adapter.reshape_layer(model, l, entry["n_q"], entry["n_kv"], entry["d_ff"], set(entry["biases"]))
