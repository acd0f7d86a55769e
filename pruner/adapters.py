"""Per-architecture adapters: which tensors of a decoder layer are heads and MLP channels, and how
a layer is sliced, removed or rebuilt.

Everything architecture-specific lives here. The rest of the library asks an adapter for a
layer's projections, its output linears (where masks and bias compensation act) and its kept
sizes, read off the weights themselves, so nothing hard-codes head_dim, layer or head counts, and
already-pruned models (whose layers differ in shape) are handled like dense ones.

A new architecture of the LLaMA layout is one more `Adapter(...)` line in `ADAPTERS`; a different
layout is a subclass that overrides the accessors and the four slicing methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import PrunerError

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
OUTPUTS = ("o_proj", "down_proj")  # the linears whose inputs are masked and whose bias compensates


@dataclass(frozen=True)
class LayerShape:
    """Kept sizes of one decoder layer. n_q == 0 means the attention sublayer is removed,
    d_ff == 0 the MLP sublayer."""

    n_q: int
    n_kv: int
    head_dim: int
    d_ff: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_q // self.n_kv if self.n_kv else 0


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


@dataclass(frozen=True)
class Adapter:
    """How one architecture family names and reshapes its decoder parts.

    All supported families share the LLaMA layout (`model.layers[i].self_attn.{q,k,v,o}_proj`,
    `model.layers[i].mlp.{gate,up,down}_proj`); they differ in biases and per-head norms, which
    live on the weights, so slicing and parameter costs stay exact without per-family code.
    """

    name: str
    model_types: tuple[str, ...]
    notes: str

    # ---- reading ------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def attention(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i].self_attn

    def mlp(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i].mlp

    def head_dim(self, model: nn.Module) -> int:
        config = model.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def layer_shape(self, model: nn.Module, i: int) -> LayerShape:
        """Read a layer's kept sizes off its weights (a removed sublayer reads as 0)."""
        head_dim = self.head_dim(model)
        attn, mlp = self.attention(model, i), self.mlp(model, i)
        n_q = attn.q_proj.out_features // head_dim if hasattr(attn, "q_proj") else 0
        n_kv = attn.k_proj.out_features // head_dim if hasattr(attn, "k_proj") else 0
        d_ff = mlp.down_proj.in_features if hasattr(mlp, "down_proj") else 0
        return LayerShape(n_q=n_q, n_kv=n_kv, head_dim=head_dim, d_ff=d_ff)

    def layer_shapes(self, model: nn.Module) -> list[LayerShape]:
        return [self.layer_shape(model, i) for i in range(len(self.layers(model)))]

    def decoder_linears(self, model: nn.Module, i: int) -> dict[str, nn.Linear]:
        """The prunable linears of layer i that still exist, by name."""
        attn, mlp = self.attention(model, i), self.mlp(model, i)
        found = {name: getattr(attn, name) for name in ATTENTION_LINEARS if hasattr(attn, name)}
        found.update({name: getattr(mlp, name) for name in MLP_LINEARS if hasattr(mlp, name)})
        return found

    def output_linear(self, model: nn.Module, i: int, which: str) -> nn.Linear | None:
        """o_proj (`which="o_proj"`) or down_proj of layer i, None where that sublayer is removed:
        their inputs carry the head and channel units."""
        holder = self.attention(model, i) if which == "o_proj" else self.mlp(model, i)
        return getattr(holder, which, None)

    def output_biases(self, model: nn.Module, i: int) -> dict[str, bool]:
        """Whether each output of layer i adds a bias (a removed sublayer's stand-in may)."""
        out = {}
        for which, holder in (("o_proj", self.attention(model, i)), ("down_proj", self.mlp(model, i))):
            linear = getattr(holder, which, None)
            out[which] = (linear.bias if linear is not None else getattr(holder, "bias", None)) is not None
        return out

    def input_groups(self, model: nn.Module, i: int) -> list[tuple[str, ...]]:
        """The existing linears of layer i grouped by the tensor they read: q/k/v read the normed
        hidden states, gate/up the normed residual, o_proj and down_proj each their own input. One
        group shares one set of input statistics (pruner.sequential)."""
        present = self.decoder_linears(model, i)
        groups = (ATTENTION_LINEARS[:3], ("o_proj",), MLP_LINEARS[:2], ("down_proj",))
        return [kept for kept in (tuple(n for n in g if n in present) for g in groups) if kept]

    def run_layer(self, layer: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
        """A decoder layer (one of `layers(model)`, or a copy of one) on `hidden` (B, T, H) with the
        keyword arguments the decoder passed it (position embeddings, attention mask, ...): its
        output hidden states."""
        out = layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # ---- reshaping ----------------------------------------------------------------------------
    def slice_attention(self, model: nn.Module, i: int, q_heads: Tensor, kv_heads: Tensor) -> None:
        """Keep query heads `q_heads` and key/value heads `kv_heads` of layer i (sorted, so new head j
        uses new kv head j // G'); none kept replaces the sublayer by `RemovedAttention`."""
        block = self.layers(model)[i]
        attn = block.self_attn
        if not hasattr(attn, "q_proj"):
            return
        if len(q_heads) == 0:
            block.self_attn = RemovedAttention(model.config.hidden_size, attn.layer_idx, attn.o_proj.bias)
            return
        hd = self.head_dim(model)
        q_ch, kv_ch = _channels_of_heads(q_heads, hd), _channels_of_heads(kv_heads, hd)
        attn.q_proj, attn.k_proj, attn.v_proj = _rows(attn.q_proj, q_ch), _rows(attn.k_proj, kv_ch), _rows(attn.v_proj, kv_ch)
        attn.o_proj = _cols(attn.o_proj, q_ch)
        attn.num_key_value_groups = len(q_heads) // len(kv_heads)

    def slice_mlp(self, model: nn.Module, i: int, channels: Tensor) -> None:
        """Keep MLP channels `channels` of layer i; none kept replaces the sublayer by `RemovedMLP`."""
        block = self.layers(model)[i]
        mlp = block.mlp
        if not hasattr(mlp, "down_proj"):
            return
        if len(channels) == 0:
            block.mlp = RemovedMLP(model.config.hidden_size, mlp.down_proj.bias)
            return
        mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, channels), _rows(mlp.up_proj, channels)
        mlp.down_proj = _cols(mlp.down_proj, channels)

    def reshape_layer(self, model: nn.Module, i: int, n_q: int, n_kv: int, d_ff: int, biases: set[str]) -> None:
        """Give a freshly built (e.g. meta-device) layer the recorded kept sizes and biases, so a
        pruned state dict loads into it."""
        block = self.layers(model)[i]
        attn = block.self_attn
        hidden, hd = model.config.hidden_size, self.head_dim(model)
        dev, dt = attn.q_proj.weight.device, attn.q_proj.weight.dtype

        def linear(n_in, n_out, name):
            return nn.Linear(n_in, n_out, bias=name in biases, device=dev, dtype=dt)

        def bias(name):
            return torch.empty(hidden, device=dev, dtype=dt) if name in biases else None

        if n_q == 0:
            block.self_attn = RemovedAttention(hidden, attn.layer_idx, bias("o_proj"))
        else:
            attn.q_proj, attn.k_proj = linear(hidden, n_q * hd, "q_proj"), linear(hidden, n_kv * hd, "k_proj")
            attn.v_proj, attn.o_proj = linear(hidden, n_kv * hd, "v_proj"), linear(n_q * hd, hidden, "o_proj")
            attn.num_key_value_groups = n_q // n_kv
        if d_ff == 0:
            block.mlp = RemovedMLP(hidden, bias("down_proj"))
        else:
            mlp = block.mlp
            mlp.gate_proj, mlp.up_proj = linear(hidden, d_ff, "gate_proj"), linear(hidden, d_ff, "up_proj")
            mlp.down_proj = linear(d_ff, hidden, "down_proj")

    def add_output_bias(self, model: nn.Module, i: int, which: str, delta: Tensor) -> None:
        """Add `delta` to the output bias of o_proj or down_proj of layer i, creating the bias where
        there was none (a removed sublayer's stand-in carries it too)."""
        holder = self.attention(model, i) if which == "o_proj" else self.mlp(model, i)
        target = holder if isinstance(holder, (RemovedAttention, RemovedMLP)) else getattr(holder, which)
        ref = next(model.parameters())
        delta = delta.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if target.bias is None:
                target.bias = nn.Parameter(delta.clone())
            else:
                target.bias.add_(delta)


def _channels_of_heads(heads: Tensor, head_dim: int) -> Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


ADAPTERS = (
    Adapter("llama", ("llama",), "LLaMA 1/2/3, SmolLM2, TinyLlama: no biases by default"),
    Adapter("mistral", ("mistral",), "sliding-window attention; same layout as LLaMA"),
    Adapter("qwen2", ("qwen2",), "biases on q/k/v, none on o"),
    Adapter("gemma3", ("gemma3_text",), "q_norm/k_norm over head_dim, explicit head_dim, sandwich norms"),
)


def supported_architectures() -> list[str]:
    return [a.name for a in ADAPTERS]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a loaded causal LM, or a PrunerError naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise PrunerError(
        f"unsupported architecture {model_type!r}: supported are "
        f"{', '.join(supported_architectures())} (decoder-only causal LMs of the LLaMA layout)"
    )
