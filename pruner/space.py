"""The pruning space: units, their exact parameter costs, and masks over them.

Granularities (attention units / MLP units):
- `kv_group`   one unit per key/value head with all query heads that share it / one per MLP channel
               (the policy-gradient paper's units);
- `query_head` one unit per query head / one per MLP channel; a hard mask keeps the same
               number of query heads in every group of a layer so grouped attention still works;
- `block`      one unit per attention sublayer / one per MLP sublayer (whole-sublayer removal).

"Decoder-linear parameters" are the weights and biases of q, k, v, o, gate, up, down in every
layer; the pruning ratio is the fraction of them removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapters import Adapter, LayerShape
from .errors import PrunerError

UNIT_GRANULARITIES = ("kv_group", "query_head", "block")
GRANULARITIES = ("auto", *UNIT_GRANULARITIES)


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise PrunerError(f"unknown granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    return granularity


def resolve_granularity(shapes, granularity: str) -> str:
    """`auto`: kv groups where every layer has at least two k/v heads; else query heads, since a
    kv group that is a whole attention sublayer cannot be pruned partly (uniform methods could not
    prune attention at all, and global ones would remove whole sublayers)."""
    check_granularity(granularity)
    if granularity != "auto":
        return granularity
    return "kv_group" if all(s.n_kv >= 2 for s in shapes if s.n_q) else "query_head"


def describe_units(shape: LayerShape, granularity: str) -> str:
    """What one attention unit is at `granularity`, in words, for a layer of `shape`."""
    if granularity == "kv_group":
        return (f"one k/v head with its {shape.group_size} query heads "
                f"(1/{shape.n_kv} of a layer's attention)" + (": the whole sublayer" if shape.n_kv == 1 else ""))
    if granularity == "query_head":
        return f"one query head (1/{shape.n_q} of a layer's query heads; k/v heads stay while any query head uses them)"
    return "a whole attention sublayer / a whole MLP sublayer"


def check_ratio(ratio: float) -> float:
    if not 0.0 < ratio < 1.0:
        raise PrunerError(f"ratio must lie strictly between 0 and 1 (the fraction of decoder-linear parameters removed), got {ratio}")
    return ratio


@dataclass(frozen=True)
class LayerBiases:
    """Which prunable linears of a layer carry a bias (Qwen2: q/k/v; FLAP adds o/down)."""

    q: bool = False
    k: bool = False
    v: bool = False
    o: bool = False
    gate: bool = False
    up: bool = False
    down: bool = False


@dataclass(frozen=True)
class Mask:
    """Keep decisions per layer: heads[l] has one entry per attention unit of layer l,
    channels[l] one per MLP unit. Entries are 0/1 (bool or float); a leading batch
    dimension (B, n) gives each sequence of a batch its own mask."""

    heads: tuple[Tensor, ...]
    channels: tuple[Tensor, ...]


def attention_params(shape: LayerShape, hidden: int, b: LayerBiases) -> int:
    """Exact parameters of an attention sublayer with `shape`'s kept heads.
    A removed sublayer keeps only o's bias (it still adds it to the residual)."""
    hd = shape.head_dim
    q = shape.n_q * hd * (hidden + b.q)
    kv = shape.n_kv * hd * (2 * hidden + b.k + b.v)
    o = shape.n_q * hd * hidden + hidden * b.o
    return q + kv + o


def mlp_params(shape: LayerShape, hidden: int, b: LayerBiases) -> int:
    """Exact parameters of an MLP sublayer with `shape.d_ff` kept channels."""
    return shape.d_ff * (3 * hidden + b.gate + b.up) + hidden * b.down


@dataclass(frozen=True)
class PruningSpace:
    """Units of a model at one granularity, with exact parameter costs.

    Built from the model's current weights, so an already-pruned model is a valid space.
    """

    granularity: str
    hidden: int
    shapes: tuple[LayerShape, ...]
    biases: tuple[LayerBiases, ...]

    @classmethod
    def from_model(cls, model: nn.Module, adapter: Adapter, granularity: str = "auto") -> "PruningSpace":
        shapes = tuple(adapter.layer_shapes(model))
        granularity = resolve_granularity(shapes, granularity)
        biases = []
        for i in range(len(shapes)):
            lin = adapter.decoder_linears(model, i)
            has = {name: (lin[name].bias is not None) if name in lin else False for name in
                   ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
            outputs = adapter.output_biases(model, i)
            biases.append(LayerBiases(
                q=has["q_proj"], k=has["k_proj"], v=has["v_proj"], o=outputs["o_proj"],
                gate=has["gate_proj"], up=has["up_proj"], down=outputs["down_proj"],
            ))
        return cls(granularity, model.config.hidden_size, shapes, tuple(biases))

    @property
    def n_layers(self) -> int:
        return len(self.shapes)

    # ---- units -------------------------------------------------------------------------
    def n_head_units(self, layer: int) -> int:
        s = self.shapes[layer]
        if self.granularity == "kv_group":
            return s.n_kv
        if self.granularity == "query_head":
            return s.n_q
        return 1 if s.n_q else 0

    def n_channel_units(self, layer: int) -> int:
        d_ff = self.shapes[layer].d_ff
        return d_ff if self.granularity != "block" else (1 if d_ff else 0)

    def head_unit_cost(self, layer: int) -> float:
        """Parameters removed per attention unit. For `query_head` the shared k/v heads are
        amortised over their group (exact when a whole group goes)."""
        s, b, h = self.shapes[layer], self.biases[layer], self.hidden
        if self.granularity == "block":
            return float(attention_params(s, h, b) - attention_params(_no_attention(s), h, b))
        per_q = s.head_dim * (2 * h + b.q)
        per_kv = s.head_dim * (2 * h + b.k + b.v)
        if self.granularity == "kv_group":
            return float(s.group_size * per_q + per_kv)
        return per_q + per_kv / s.group_size

    def attention_params_keeping(self, layer: int, k: int) -> int:
        """Exact attention parameters of `layer` when k of its attention units are kept
        (for `query_head`, k must be a multiple of the kv heads: the same count per group)."""
        s = self.shapes[layer]
        if self.granularity == "kv_group":
            n_q, n_kv = k * s.group_size, k
        elif self.granularity == "query_head":
            n_q, n_kv = k, (s.n_kv if k else 0)
        else:
            n_q, n_kv = (s.n_q, s.n_kv) if k else (0, 0)
        return attention_params(LayerShape(n_q, n_kv, s.head_dim, s.d_ff), self.hidden, self.biases[layer])

    def channel_unit_cost(self, layer: int) -> float:
        s, b, h = self.shapes[layer], self.biases[layer], self.hidden
        if self.granularity == "block":
            return float(mlp_params(s, h, b) - mlp_params(_no_mlp(s), h, b))
        return float(3 * h + b.gate + b.up)

    def unit_costs(self) -> tuple[Tensor, Tensor]:
        """Flat cost vectors (head units of all layers, channel units of all layers)."""
        heads = [torch.full((self.n_head_units(l),), self.head_unit_cost(l)) for l in range(self.n_layers)]
        chans = [torch.full((self.n_channel_units(l),), self.channel_unit_cost(l)) for l in range(self.n_layers)]
        return torch.cat(heads).double(), torch.cat(chans).double()

    def unflatten(self, heads: Tensor, channels: Tensor) -> Mask:
        """Split flat vectors (..., N) of all layers' units back into per-layer pieces."""
        h_sizes = [self.n_head_units(l) for l in range(self.n_layers)]
        c_sizes = [self.n_channel_units(l) for l in range(self.n_layers)]
        return Mask(tuple(torch.split(heads, h_sizes, -1)), tuple(torch.split(channels, c_sizes, -1)))

    def full_mask(self) -> Mask:
        return Mask(
            tuple(torch.ones(self.n_head_units(l), dtype=torch.bool) for l in range(self.n_layers)),
            tuple(torch.ones(self.n_channel_units(l), dtype=torch.bool) for l in range(self.n_layers)),
        )

    # ---- parameter counts --------------------------------------------------------------
    def layer_params(self, shape: LayerShape, layer: int) -> int:
        return attention_params(shape, self.hidden, self.biases[layer]) + mlp_params(shape, self.hidden, self.biases[layer])

    def decoder_linear_params(self) -> int:
        return sum(self.layer_params(s, l) for l, s in enumerate(self.shapes))

    def kept_params(self, mask: Mask) -> int:
        return sum(self.layer_params(s, l) for l, s in enumerate(self.kept_shapes(mask)))

    # ---- mask -> kept structure ---------------------------------------------------------
    def kept_query_heads(self, layer: int, head_mask: Tensor) -> Tensor:
        """Indices of kept query heads, sorted, so that new head j uses new kv head j // G'."""
        s = self.shapes[layer]
        keep = head_mask.bool()
        if self.granularity == "kv_group":
            keep = keep.repeat_interleave(s.group_size)
        elif self.granularity == "block":
            keep = keep.expand(s.n_q) if s.n_q else keep
        else:
            per_group = keep.view(s.n_kv, s.group_size).sum(1)
            if (per_group != per_group[0]).any():
                raise PrunerError(
                    f"layer {layer}: a query_head mask must keep the same number of query heads in "
                    f"every key/value group (kept per group: {per_group.tolist()})"
                )
        return keep.nonzero().flatten()

    def gathered_query_heads(self, layer: int, head_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The query heads a gathered forward computes for any sampled head mask, and which of them
        are kept: (heads, live), heads sorted with the same count c in every kv group that keeps one
        (grouped attention needs it), so new head j uses new kv head j // c.

        kv_group and block masks keep whole groups (live is all True). A query_head mask may keep
        unequal counts per group (a Bernoulli sample does): each kept group is padded up to the
        largest count with its first removed heads, whose outputs are then discarded (live False).
        No head kept gives empty tensors (the sublayer is removed)."""
        s = self.shapes[layer]
        if self.granularity != "query_head":
            heads = self.kept_query_heads(layer, head_mask)
            return heads, torch.ones(len(heads), dtype=torch.bool)
        keep = head_mask.bool().view(s.n_kv, s.group_size)
        count = int(keep.sum(1).max()) if keep.numel() else 0
        # within each group: kept heads first, then removed ones, each in index order
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        chosen = order[:, :count]
        live = keep.gather(1, chosen)
        groups = keep.any(1)
        heads = (chosen + torch.arange(s.n_kv).unsqueeze(1) * s.group_size)[groups]
        heads, perm = heads.flatten().sort()
        return heads, live[groups].flatten()[perm]

    def kept_kv_heads(self, layer: int, head_mask: Tensor) -> Tensor:
        s = self.shapes[layer]
        q = self.kept_query_heads(layer, head_mask)
        return torch.unique(q // s.group_size) if len(q) else q

    def gathered_channels(self, layer: int, channel_mask: Tensor, multiple: int = 1) -> tuple[Tensor, Tensor]:
        """The MLP channels a gathered forward computes for `channel_mask`, and which of them are
        kept: (channels, live). The kept channels come first; the count is padded up to a multiple of
        `multiple` (at most d_ff) with the first removed channels, whose outputs are then discarded
        (live False): matrix products of such widths run faster per FLOP than odd ones. No channel
        kept gives empty tensors (the sublayer is removed)."""
        kept = self.kept_channels(layer, channel_mask)
        d_ff = self.shapes[layer].d_ff
        width = min(-(-len(kept) // multiple) * multiple, d_ff) if len(kept) else 0
        removed = torch.ones(d_ff, dtype=torch.bool)
        removed[kept] = False
        channels = torch.cat([kept, removed.nonzero().flatten()[:width - len(kept)]])
        live = torch.arange(width) < len(kept)
        return channels, live

    def kept_channels(self, layer: int, channel_mask: Tensor) -> Tensor:
        keep = channel_mask.bool()
        if self.granularity == "block":
            keep = keep.expand(self.shapes[layer].d_ff) if self.shapes[layer].d_ff else keep
        return keep.nonzero().flatten()

    def kept_inputs(self, layer: int, mask: Mask) -> tuple[Tensor, Tensor]:
        """Which input channels of o_proj (n_q * head_dim) and of down_proj (d_ff) `mask` keeps in
        `layer`, as bool vectors: the columns that stay when the layer is sliced."""
        s = self.shapes[layer]
        attn = torch.zeros(s.n_q * s.head_dim, dtype=torch.bool)
        for h in self.kept_query_heads(layer, mask.heads[layer]).tolist():
            attn[h * s.head_dim:(h + 1) * s.head_dim] = True
        mlp = torch.zeros(s.d_ff, dtype=torch.bool)
        mlp[self.kept_channels(layer, mask.channels[layer])] = True
        return attn, mlp

    def kept_shapes(self, mask: Mask) -> list[LayerShape]:
        out = []
        for l, s in enumerate(self.shapes):
            n_q = len(self.kept_query_heads(l, mask.heads[l]))
            n_kv = len(self.kept_kv_heads(l, mask.heads[l]))
            d_ff = len(self.kept_channels(l, mask.channels[l]))
            out.append(LayerShape(n_q=n_q, n_kv=n_kv, head_dim=s.head_dim, d_ff=d_ff))
        return out

    # ---- unit -> activation channels (for masked forwards) -------------------------------
    def head_unit_of_channel(self, layer: int) -> Tensor:
        """For each input channel of o_proj (n_q * head_dim), the index of its attention unit."""
        s = self.shapes[layer]
        q_head = torch.arange(s.n_q).repeat_interleave(s.head_dim)
        if self.granularity == "kv_group":
            return q_head // s.group_size
        if self.granularity == "block":
            return torch.zeros_like(q_head)
        return q_head

    def channel_unit_of_channel(self, layer: int) -> Tensor:
        """For each input channel of down_proj (d_ff), the index of its MLP unit."""
        d_ff = self.shapes[layer].d_ff
        return torch.zeros(d_ff, dtype=torch.long) if self.granularity == "block" else torch.arange(d_ff)

    def describe(self) -> dict:
        heads, chans = self.unit_costs()
        return {
            "granularity": self.granularity,
            "head_units": int(heads.numel()),
            "channel_units": int(chans.numel()),
            "head_unit_cost": [self.head_unit_cost(l) for l in range(self.n_layers)],
            "channel_unit_cost": [self.channel_unit_cost(l) for l in range(self.n_layers)],
            "decoder_linear_params": self.decoder_linear_params(),
        }


def _no_attention(s: LayerShape) -> LayerShape:
    return LayerShape(0, 0, s.head_dim, s.d_ff)


def _no_mlp(s: LayerShape) -> LayerShape:
    return LayerShape(s.n_q, s.n_kv, s.head_dim, 0)
