"""Per-architecture adapters: which tensors of a decoder layer are heads and MLP channels.

Everything architecture-specific lives here; the rest of the library asks an adapter for
a layer's projections and reads head counts from the weights themselves, so nothing
hard-codes head_dim, layer counts or head counts, and already-pruned models (whose layers
differ in shape) are handled like dense ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import PrunerError

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


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


@dataclass(frozen=True)
class Adapter:
    """How one architecture family names its decoder parts.

    All supported families share the LLaMA layout (`model.layers[i].self_attn.{q,k,v,o}_proj`,
    `model.layers[i].mlp.{gate,up,down}_proj`); they differ in biases and per-head norms, which
    the adapter records so that slicing and parameter costs stay exact.
    """

    name: str
    model_types: tuple[str, ...]
    notes: str

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
