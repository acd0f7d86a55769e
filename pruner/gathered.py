"""Gathered forwards: a mask's forward on only the weights it keeps, so that a mask keeping a
fraction f of the decoder-linear parameters costs about f of their compute.

For one mask, each decoder layer's linears are swapped, just before the layer runs and back just
after, for gathered copies of their kept parts (pruner.adapters.Adapter.gather_attention /
gather_mlp): the rows of q/k/v of the kept heads and the matching columns of o, the rows of
gate/up and the columns of down of the kept channels, cut into one workspace that every layer
reuses. Nothing is deep-copied and the model is as before on exit. The result is the
masked forward of pruner.masking, up to rounding:

    o(x * m)                       = o[:, kept] x[kept]                       (plain masks)
    o(x * m + mu * (1 - m))        = o[:, kept] x[kept] + o[:, removed] mu[removed]
                                                                              (bias compensation:
                                     a per-mask output bias o @ (mu * (1 - m)))

A sublayer with no unit kept becomes a stand-in that adds its output bias. A query_head mask
may keep different counts in the kv groups of a layer; the groups are padded to one count with
removed heads whose o columns are zero (PruningSpace.gathered_query_heads); the kept MLP channels
are padded to a multiple of CHANNEL_MULTIPLE the same way (PruningSpace.gathered_channels). A layer whose weights
are offloaded (not resident before the forward, accelerate's `meta` placeholders) runs masked
instead, through the same hooks as pruner.masking, with the same result.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .adapters import Adapter, Swaps
from .dispatch import model_device
from .masking import expand_unit_mask, layer_hooks
from .space import Mask, PruningSpace

FORWARD_MODES = ("auto", "gathered", "masked")
# Gathered MLPs compute a multiple of this many channels (padded with removed ones, their down
# columns zero): on this project's CPU a product 576 -> 771 took 1.4x as long as 576 -> 784.
CHANNEL_MULTIPLE = 16


def resolve_forward_mode(mode: str, device: torch.device) -> str:
    """`auto` -> masked on CUDA, gathered elsewhere: a step of K = 2 masks x 8 x 128 tokens took
    0.053 s masked against 0.131 s gathered at SmolLM2-135M's shapes on an H200, and 0.106 s against
    0.205 s at LLaMA-2-7B's (bench/results/pg_scale_gpu_smollm2.md, pg_scale_gpu_modes.md), while on the
    2-core CPU gathered took 0.71x of K dense forwards and masked 1.10x (pg_speed_skipping.md)."""
    if mode == "auto":
        return "masked" if torch.device(device).type == "cuda" else "gathered"
    return mode


def compensation_bias(weight: Tensor, fill: Tensor, channel_mask: Tensor) -> Tensor:
    """o @ (mu * (1 - m)): the output the removed input channels give at their means, (out,)."""
    keep = channel_mask.to(device=weight.device, dtype=torch.float32)
    return (weight.float() @ (fill.to(weight.device).float() * (1 - keep))).to(weight.dtype)


class Workspace:
    """Flat buffers (one per device and dtype) that one layer's gathered weights are cut from.

    Layers run one after the other, so each layer's gather reuses the same memory: a forward
    allocates about one layer's weights once instead of fresh copies of every layer (on a CPU,
    fresh large allocations cost page faults that rival the copies themselves)."""

    def __init__(self):
        self.buffers: dict[tuple, Tensor] = {}
        self.used: dict[tuple, int] = {}

    def reset(self) -> None:
        """The previous layer is done with its slices."""
        self.used.clear()

    def select(self, weight: Tensor, dim: int, index: Tensor) -> Tensor:
        """weight.index_select(dim, index), written into the workspace."""
        shape = list(weight.shape)
        shape[dim] = len(index)
        n = shape[0] * shape[1]
        key = (weight.device, weight.dtype)
        start = self.used.get(key, 0)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < start + n:  # grow; slices handed out keep the old one alive
            buffer = torch.empty(max(2 * (start + n), 1 << 16), device=weight.device, dtype=weight.dtype)
            self.buffers[key], start = buffer, 0
        self.used[key] = start + n
        return torch.index_select(weight, dim, index, out=buffer[start:start + n].view(shape))


@contextmanager
def gathered(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask,
             fill: tuple[list[Tensor], list[Tensor]] | None = None):
    """Run `model` on only the weights `mask` (one mask, no batch dimension) keeps, inside the
    block. `fill`: per layer the o_proj and down_proj input means that removed channels take
    (bias compensation), else zero. The same losses as `masking.masked(model, ..., mask, fill)`.

    Example: `with gathered(model, adapter, space, mask): logits = model(ids).logits`.
    """
    swaps, handles, workspace = [], [], Workspace()
    layers = adapter.layers(model)
    try:
        for l in range(space.n_layers):
            if adapter.is_offloaded(model, l):
                handles += layer_hooks(model, adapter, space, mask, fill, l, model_device(model))
                continue
            swaps.append(Swaps())
            gather = _layer_gather(model, adapter, space, mask, fill, l, swaps[-1], workspace)
            handles.append(layers[l].register_forward_pre_hook(gather))
            handles.append(layers[l].register_forward_hook(_undo(swaps[-1])))
        yield model
    finally:
        for h in handles:
            h.remove()
        for s in swaps:
            s.undo()


def _undo(swaps: Swaps):
    def hook(module, args, output):
        swaps.undo()
    return hook


def _layer_gather(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask, fill, l: int,
                  swaps: Swaps, workspace: Workspace):
    """A pre-hook of decoder layer l that swaps its gathered weights in just before it runs (the
    forward hook `_undo` swaps them out after), so consecutive layers share one workspace."""
    def hook(module, args):
        workspace.reset()
        _gather_layer(model, adapter, space, mask, fill, l, swaps, workspace)
    return hook


@torch.no_grad()
def _gather_layer(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask, fill, l: int,
                  swaps: Swaps, workspace: Workspace) -> None:
    shape = space.shapes[l]
    if shape.n_q and mask.heads[l].numel():
        heads, live = space.gathered_query_heads(l, mask.heads[l])
        kv = torch.unique(heads // shape.group_size) if len(heads) else heads
        extra = None
        if fill is not None:
            channel_mask = expand_unit_mask(mask.heads[l].float(), space.head_unit_of_channel(l))
            extra = compensation_bias(adapter.output_linear(model, l, "o_proj").weight, fill[0][l], channel_mask)
        adapter.gather_attention(model, l, heads, kv, swaps, live=live, extra_bias=extra, select=workspace.select)
    if shape.d_ff and mask.channels[l].numel():
        channels, live = space.gathered_channels(l, mask.channels[l], CHANNEL_MULTIPLE)
        extra = None
        if fill is not None:
            channel_mask = expand_unit_mask(mask.channels[l].float(), space.channel_unit_of_channel(l))
            extra = compensation_bias(adapter.output_linear(model, l, "down_proj").weight, fill[1][l], channel_mask)
        adapter.gather_mlp(model, l, channels, swaps, live=live, extra_bias=extra, select=workspace.select)
