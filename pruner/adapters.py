"""Per-architecture adapters: which tensors of a decoder layer are heads and MLP channels, and how
a layer is sliced, removed or rebuilt.

Everything architecture-specific lives here. The rest of the library asks an adapter for a
layer's projections, its output linears (where masks and bias compensation act) and its kept
sizes, read off the weights themselves, so nothing hard-codes head_dim, layer or head counts, and
already-pruned models (whose layers differ in shape) are handled like dense ones.

A new architecture of the LLaMA layout is one more `Adapter(...)` line in `ADAPTERS`; a different
layout is a subclass that overrides the accessors and the four slicing methods.

Probe Pruning (pruner.probe) asks an adapter three more things: where each block's residual
enters (`block_entry_norms`), how a block acts on a few probe tokens (`probe_attention`,
`probe_mlp`), and how to slice a layer for one batch and put it back (`slice_query_heads`,
`slice_mlp`, `sublayer_parts`, `restore_sublayer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import PrunerError
from .probe_math import probe_attention_output

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


class Swaps:
    """Attributes replaced for a while (weights, biases, submodules, head counts) and put back by
    `undo`, last first. Nothing is copied: the originals are held and restored as they were."""

    def __init__(self):
        self._undo: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def tensor(self, module: nn.Module, name: str, value: Tensor | None) -> None:
        """Stand `value` in for the parameter `name` of `module` (a view: no copy is made)."""
        self.set(module, name, None if value is None else nn.Parameter(value, requires_grad=False))

    def undo(self) -> None:
        while self._undo:
            obj, name, value = self._undo.pop()
            setattr(obj, name, value)


def _with_bias(bias: Tensor | None, extra: Tensor | None) -> Tensor | None:
    """bias + extra, either may be missing; a plain tensor (never the parameter itself)."""
    if extra is None:
        return None if bias is None else bias.detach()
    return extra if bias is None else bias.detach() + extra.to(bias.dtype)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding `weight` (out, in) and `bias` as they are. Built without running
    nn.Linear.__init__, whose random initialisation would cost more than the slicing itself
    (Probe Pruning slices once per batch)."""
    new = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(new)
    new.in_features, new.out_features = weight.shape[1], weight.shape[0]
    new.weight = nn.Parameter(weight.detach())
    new.register_parameter("bias", nn.Parameter(bias.detach()) if bias is not None else None)
    return new


def _rows(linear: nn.Linear, idx: Tensor) -> nn.Linear:
    """A new linear with only the output rows `idx` (copied)."""
    idx = idx.to(linear.weight.device)
    bias = linear.bias.index_select(0, idx) if linear.bias is not None else None
    return _linear(linear.weight.index_select(0, idx), bias)


def _cols(linear: nn.Linear, idx: Tensor) -> nn.Linear:
    """A new linear with only the input columns `idx` (copied; the bias is kept whole)."""
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return _linear(linear.weight.index_select(1, idx.to(linear.weight.device)), bias)


class HeadGather(nn.Module):
    """A key or value projection whose output heads are then gathered: output head j is input
    head `heads[j]`. Under grouped-query attention, query heads kept unevenly across groups each
    get their own copy of their key/value head (as the reference's `repeat_kv(heads_to_preserve)`),
    so the attention runs with one key/value head per query head and no regrouping."""

    def __init__(self, linear: nn.Linear, heads: Tensor, head_dim: int):
        super().__init__()
        self.linear = linear
        self.register_buffer("channels", channels_of_heads(heads, head_dim).to(linear.weight.device),
                             persistent=False)

    # in/out_features, weight and bias are the stored projection's (its parameters), so that
    # shapes and parameter counts read off a layer count each key/value head once
    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Tensor | None:
        return self.linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).index_select(-1, self.channels)


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
    mlp_entry_norm: str = "post_attention_layernorm"  # the norm between the residual and the MLP

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
        q_ch, kv_ch = channels_of_heads(q_heads, hd), channels_of_heads(kv_heads, hd)
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

    def slice_query_heads(self, model: nn.Module, i: int, q_heads: Tensor) -> None:
        """Keep any non-empty set of query heads of layer i (sorted), in place: q rows and o columns of
        those heads, k/v rows of the key/value heads they use. When every used key/value head
        serves the same number of kept query heads this is `slice_attention`; otherwise k/v are
        gathered per query head (`HeadGather`) and the layer runs as multi-head attention."""
        attn = self.attention(model, i)
        group = attn.num_key_value_groups
        kv_of_q = q_heads // group
        kv_heads, counts = torch.unique(kv_of_q, return_counts=True)
        if bool((counts == counts[0]).all()):
            self.slice_attention(model, i, q_heads, kv_heads)
            return
        hd = self.head_dim(model)
        q_ch, kv_ch = channels_of_heads(q_heads, hd), channels_of_heads(kv_heads, hd)
        position = torch.searchsorted(kv_heads, kv_of_q)  # each kept query head's k/v head after slicing
        attn.q_proj, attn.o_proj = _rows(attn.q_proj, q_ch), _cols(attn.o_proj, q_ch)
        attn.k_proj = HeadGather(_rows(attn.k_proj, kv_ch), position, hd)
        attn.v_proj = HeadGather(_rows(attn.v_proj, kv_ch), position, hd)
        attn.num_key_value_groups = 1

    def sublayer_parts(self, model: nn.Module, i: int, which: str) -> dict:
        """The modules (and the grouping) that slicing replaces in layer i's attention
        (`which="attention"`) or MLP, to hand back to `restore_sublayer`."""
        if which == "attention":
            attn = self.attention(model, i)
            return {name: getattr(attn, name) for name in (*ATTENTION_LINEARS, "num_key_value_groups")}
        mlp = self.mlp(model, i)
        return {name: getattr(mlp, name) for name in MLP_LINEARS}

    def restore_sublayer(self, model: nn.Module, i: int, which: str, parts: dict) -> None:
        """Put back what `sublayer_parts` returned (undoes `slice_query_heads` / `slice_mlp`)."""
        holder = self.attention(model, i) if which == "attention" else self.mlp(model, i)
        for name, value in parts.items():
            setattr(holder, name, value)

    # ---- probing (Probe Pruning) ------------------------------------------------------------------
    def block_entry_norms(self, model: nn.Module, i: int) -> tuple[nn.Module, nn.Module]:
        """The norms whose input is the residual entering layer i's attention and MLP, and whose
        output is that block's input (the probe is taken from the output)."""
        layer = self.layers(model)[i]
        return layer.input_layernorm, getattr(layer, self.mlp_entry_norm)

    def probe_attention(self, model: nn.Module, i: int, x: Tensor, position_embeddings: tuple[Tensor, Tensor],
                        positions: Tensor) -> Tensor:
        """Layer i's attention on probe tokens only: x (Bp, Tp, H) the normed block input at true
        positions `positions` (Tp,), position_embeddings the (cos, sin) of those positions
        ((1 or Bp), Tp, d). q/k/v (with q_norm/k_norm where the family has them), RoPE, then
        `probe_attention_output` with the layer's scaling, sliding window and logit cap.
        Returns the pre-o_proj activation (Bp, Tp, n_q * d); o_proj is not run."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = self.attention(model, i)
        shape = (*x.shape[:-1], -1, self.head_dim(model))
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(model.config, "sliding_window", None)
        return probe_attention_output(q, k, v, positions, attn.scaling, window,
                                      getattr(attn, "attn_logit_softcapping", None))

    def probe_mlp(self, model: nn.Module, i: int, x: Tensor) -> Tensor:
        """Layer i's MLP up to down_proj on probe tokens x (Bp, Tp, H): act(gate x) * up x, (Bp, Tp, d_ff)."""
        mlp = self.mlp(model, i)
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)

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

    # ---- gathered forwards (pruner.gathered): swap kept rows / columns in for one forward ------
    def is_offloaded(self, model: nn.Module, i: int) -> bool:
        """True when layer i's weights are not resident (accelerate offload keeps them on `meta`
        between forwards): they cannot be gathered beforehand."""
        return any(p.device.type == "meta" for p in self.layers(model)[i].parameters())

    def gather_attention(self, model: nn.Module, i: int, q_heads: Tensor, kv_heads: Tensor, swaps: Swaps,
                         live: Tensor | None = None, extra_bias: Tensor | None = None,
                         select: Callable[[Tensor, int, Tensor], Tensor] = Tensor.index_select) -> None:
        """Until `swaps.undo()`, layer i's attention computes only query heads `q_heads` (sorted, the
        same count per kept kv head) and kv heads `kv_heads`, on gathered copies of their rows of
        q/k/v and columns of o (`select(weight, dim, index)` makes them). `live` (per kept query
        head): False heads are computed but their o columns are zero. `extra_bias` (hidden,) is
        added to o's output. No head kept: the sublayer is a `RemovedAttention` adding o's bias
        (+ extra_bias)."""
        block = self.layers(model)[i]
        attn = block.self_attn
        if not hasattr(attn, "q_proj"):
            return
        if len(q_heads) == 0:
            standin = RemovedAttention(model.config.hidden_size, attn.layer_idx)
            standin.bias = _with_bias(attn.o_proj.bias, extra_bias)  # a plain tensor: nothing to offload
            swaps.set(block, "self_attn", standin)
            return
        hd = self.head_dim(model)
        device = attn.q_proj.weight.device
        q_ch, kv_ch = channels_of_heads(q_heads, hd).to(device), channels_of_heads(kv_heads, hd).to(device)
        for linear, idx in ((attn.q_proj, q_ch), (attn.k_proj, kv_ch), (attn.v_proj, kv_ch)):
            swaps.tensor(linear, "weight", select(linear.weight, 0, idx))
            if linear.bias is not None:
                swaps.tensor(linear, "bias", linear.bias.index_select(0, idx))
        o = attn.o_proj
        weight = select(o.weight, 1, q_ch)
        if live is not None and not bool(live.all()):
            weight.mul_(live.to(device).repeat_interleave(hd).to(weight.dtype))
        swaps.tensor(o, "weight", weight)
        if extra_bias is not None:
            swaps.tensor(o, "bias", _with_bias(o.bias, extra_bias))
        swaps.set(attn, "num_key_value_groups", len(q_heads) // len(kv_heads))

    def gather_mlp(self, model: nn.Module, i: int, channels: Tensor, swaps: Swaps,
                   live: Tensor | None = None, extra_bias: Tensor | None = None,
                   select: Callable[[Tensor, int, Tensor], Tensor] = Tensor.index_select) -> None:
        """Until `swaps.undo()`, layer i's MLP computes only `channels`, on gathered rows of gate/up
        and columns of down (made by `select`). `live` (per channel): False channels are computed
        but their down columns are zero. `extra_bias` is added to down's output. None kept: a
        `RemovedMLP`."""
        block = self.layers(model)[i]
        mlp = block.mlp
        if not hasattr(mlp, "down_proj"):
            return
        if len(channels) == 0:
            standin = RemovedMLP(model.config.hidden_size)
            standin.bias = _with_bias(mlp.down_proj.bias, extra_bias)
            swaps.set(block, "mlp", standin)
            return
        idx = channels.to(mlp.down_proj.weight.device)
        for linear in (mlp.gate_proj, mlp.up_proj):
            swaps.tensor(linear, "weight", select(linear.weight, 0, idx))
            if linear.bias is not None:
                swaps.tensor(linear, "bias", linear.bias.index_select(0, idx))
        down = select(mlp.down_proj.weight, 1, idx)
        if live is not None and not bool(live.all()):
            down.mul_(live.to(down.device, down.dtype))
        swaps.tensor(mlp.down_proj, "weight", down)
        if extra_bias is not None:
            swaps.tensor(mlp.down_proj, "bias", _with_bias(mlp.down_proj.bias, extra_bias))

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


def channels_of_heads(heads: Tensor, head_dim: int) -> Tensor:
    """The o_proj input channels (or q/k/v output rows) of `heads`: h * head_dim + 0..head_dim-1."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


ADAPTERS = (
    Adapter("llama", ("llama",), "LLaMA 1/2/3, SmolLM2, TinyLlama: no biases by default"),
    Adapter("mistral", ("mistral",), "sliding-window attention; same layout as LLaMA"),
    Adapter("qwen2", ("qwen2",), "biases on q/k/v, none on o"),
    Adapter("gemma3", ("gemma3_text",), "q_norm/k_norm over head_dim, explicit head_dim, sandwich norms",
            mlp_entry_norm="pre_feedforward_layernorm"),
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
