"""Physical slicing: turn a masked model into a smaller, faster one.

Attention: keep the rows of q/k/v (and their biases) of kept heads and the matching columns
of o_proj; head_dim never changes (RoPE). MLP: keep rows of gate/up and columns of down.
A sublayer with nothing kept is replaced by a module that adds only its output bias.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .adapters import Adapter, LayerShape
from .space import Mask, PruningSpace


class RemovedAttention(nn.Module):
    """Stands in for an attention sublayer whose heads were all pruned.

    Returns o_proj's bias (or zeros). It still writes a one-channel zero entry to the KV cache
    so that the cache's sequence length stays right when this is layer 0.
    """

    def __init__(self, hidden: int, layer_idx: int, bias: Tensor | None = None):
        super().__init__()
        self.hidden, self.layer_idx = hidden, layer_idx
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, hidden_states: Tensor, past_key_values=None, **kwargs):
        if past_key_values is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 1, t, 1)
            past_key_values.update(empty, empty, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        if self.bias is not None:
            out = out + self.bias
        return out, None


class RemovedMLP(nn.Module):
    """Stands in for an MLP sublayer whose channels were all pruned: adds down_proj's bias."""

    def __init__(self, hidden: int, bias: Tensor | None = None):
        super().__init__()
        self.hidden = hidden
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        return out + self.bias if self.bias is not None else out


def _rows(linear: nn.Linear, idx: Tensor) -> nn.Linear:
    """A new linear with only the output rows `idx`."""
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[idx.to(linear.weight.device)])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[idx.to(linear.weight.device)])
    return new


def _cols(linear: nn.Linear, idx: Tensor) -> nn.Linear:
    """A new linear with only the input columns `idx`."""
    new = nn.Linear(len(idx), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, idx.to(linear.weight.device)])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def _channels_of_heads(heads: Tensor, head_dim: int) -> Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def slice_layer(model: nn.Module, adapter: Adapter, layer: int, q_heads: Tensor, kv_heads: Tensor, channels: Tensor) -> None:
    """Keep query heads `q_heads`, kv heads `kv_heads`, MLP channels `channels` of one layer, in place."""
    block = adapter.layers(model)[layer]
    attn, mlp = block.self_attn, block.mlp
    hidden = model.config.hidden_size
    if hasattr(attn, "q_proj"):
        if len(q_heads) == 0:
            block.self_attn = RemovedAttention(hidden, attn.layer_idx, attn.o_proj.bias)
        else:
            hd = adapter.head_dim(model)
            q_ch, kv_ch = _channels_of_heads(q_heads, hd), _channels_of_heads(kv_heads, hd)
            attn.q_proj = _rows(attn.q_proj, q_ch)
            attn.k_proj = _rows(attn.k_proj, kv_ch)
            attn.v_proj = _rows(attn.v_proj, kv_ch)
            attn.o_proj = _cols(attn.o_proj, q_ch)
            attn.num_key_value_groups = len(q_heads) // len(kv_heads)
    if hasattr(mlp, "down_proj"):
        if len(channels) == 0:
            block.mlp = RemovedMLP(hidden, mlp.down_proj.bias)
        else:
            mlp.gate_proj = _rows(mlp.gate_proj, channels)
            mlp.up_proj = _rows(mlp.up_proj, channels)
            mlp.down_proj = _cols(mlp.down_proj, channels)


def slice_model(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask) -> list[LayerShape]:
    """Physically remove everything `mask` drops, in place; records the layout on the config.

    Returns the new per-layer shapes. Masked logits of the original model equal the logits
    of the sliced model (tested).
    """
    for l in range(space.n_layers):
        slice_layer(model, adapter, l,
                    space.kept_query_heads(l, mask.heads[l]),
                    space.kept_kv_heads(l, mask.heads[l]),
                    space.kept_channels(l, mask.channels[l]))
    record_layout(model, adapter)
    return adapter.layer_shapes(model)


def sliced_copy(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask) -> nn.Module:
    """A sliced deep copy; the original model is left untouched."""
    clone = copy.deepcopy(model)
    slice_model(clone, adapter, space, mask)
    return clone


# ---- layout: per-layer kept sizes, recorded in config.json -----------------------------

def layer_layout(model: nn.Module, adapter: Adapter) -> list[dict]:
    """Per layer: kept query heads, kv heads, MLP channels and which linears carry a bias."""
    out = []
    for l, s in enumerate(adapter.layer_shapes(model)):
        attn, mlp = adapter.attention(model, l), adapter.mlp(model, l)
        biases = sorted(name for name, lin in adapter.decoder_linears(model, l).items() if lin.bias is not None)
        if isinstance(attn, RemovedAttention) and attn.bias is not None:
            biases.append("o_proj")
        if isinstance(mlp, RemovedMLP) and mlp.bias is not None:
            biases.append("down_proj")
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
    hidden = model.config.hidden_size
    hd = adapter.head_dim(model)
    for l, entry in enumerate(layout):
        block = adapter.layers(model)[l]
        attn, mlp = block.self_attn, block.mlp
        dev, dt = attn.q_proj.weight.device, attn.q_proj.weight.dtype
        has = set(entry["biases"])

        def linear(n_in, n_out, name):
            return nn.Linear(n_in, n_out, bias=name in has, device=dev, dtype=dt)

        if entry["n_q"] == 0:
            bias = torch.empty(hidden, device=dev, dtype=dt) if "o_proj" in has else None
            block.self_attn = RemovedAttention(hidden, attn.layer_idx, bias)
        else:
            n_q, n_kv = entry["n_q"], entry["n_kv"]
            attn.q_proj = linear(hidden, n_q * hd, "q_proj")
            attn.k_proj = linear(hidden, n_kv * hd, "k_proj")
            attn.v_proj = linear(hidden, n_kv * hd, "v_proj")
            attn.o_proj = linear(n_q * hd, hidden, "o_proj")
            attn.num_key_value_groups = n_q // n_kv
        if entry["d_ff"] == 0:
            bias = torch.empty(hidden, device=dev, dtype=dt) if "down_proj" in has else None
            block.mlp = RemovedMLP(hidden, bias)
        else:
            d_ff = entry["d_ff"]
            mlp.gate_proj = linear(hidden, d_ff, "gate_proj")
            mlp.up_proj = linear(hidden, d_ff, "up_proj")
            mlp.down_proj = linear(d_ff, hidden, "down_proj")


def add_output_bias(model: nn.Module, adapter: Adapter, layer: int, which: str, delta: Tensor) -> None:
    """Add `delta` to the output bias of o_proj or down_proj of a sliced layer (creating the
    bias if the layer had none), e.g. FLAP's compensation for removed channels."""
    block = adapter.layers(model)[layer]
    holder = block.self_attn if which == "o_proj" else block.mlp
    target = holder if isinstance(holder, (RemovedAttention, RemovedMLP)) else getattr(holder, which)
    ref = next(model.parameters())
    delta = delta.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        if target.bias is None:
            target.bias = nn.Parameter(delta.clone())
        else:
            target.bias.add_(delta)
