"""Masked forward passes: weights untouched, masks multiply activations.

- attention: the unit mask is expanded to every channel of the pre-`o_proj` activation
  (query heads x head_dim) and multiplies it;
- MLP: the mask multiplies `act(gate(x)) * up(x)` before `down_proj`.

A mask entry may carry a leading batch dimension, so K sampled masks can run in one
batched forward (sequence b uses mask b).

With `fill` (per layer, the mean input of o_proj and of down_proj on calibration data), a
removed channel is replaced by its mean instead of zero: W (x*m + mu*(1-m)) =
W[:, kept] x[kept] + W[:, removed] mu[removed], exactly the sliced layer with FLAP's bias
compensation added.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .adapters import Adapter
from .dispatch import model_device
from .space import Mask, PruningSpace


def expand_unit_mask(unit_mask: Tensor, unit_of_channel: Tensor) -> Tensor:
    """(..., n_units) -> (..., n_channels) by gathering each channel's unit."""
    return unit_mask.index_select(-1, unit_of_channel.to(unit_mask.device))


def _scale_input(channel_mask: Tensor, fill: Tensor | None = None):
    """A forward pre-hook on a linear's input (B, T, C): x * m, or x * m + fill * (1 - m) with a
    fill (C,); the channel mask m is (C,) or (B, C)."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        m = channel_mask.to(device=x.device, dtype=x.dtype)  # no-op unless a dispatched layer runs elsewhere
        if m.dim() == 2:
            if m.shape[0] != x.shape[0]:
                raise ValueError(f"a batched mask has {m.shape[0]} rows for a batch of {x.shape[0]} sequences")
            m = m.unsqueeze(1)
        if fill is None:
            return (x * m, *args[1:])
        return (x * m + fill.to(device=x.device, dtype=x.dtype) * (1 - m), *args[1:])

    return hook


@contextmanager
def masked(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask | None,
           fill: tuple[list[Tensor], list[Tensor]] | None = None):
    """Run `model` under `mask` inside the block; hooks are removed on exit. `fill`: per layer the
    o_proj and down_proj input means that removed channels take (bias compensation), else zero.

    Example: `with masked(model, adapter, space, mask): logits = model(ids).logits`.
    """
    handles = []
    device = model_device(model)
    try:
        if mask is not None:
            for l in range(space.n_layers):
                handles += layer_hooks(model, adapter, space, mask, fill, l, device)
        yield model
    finally:
        for h in handles:
            h.remove()


def layer_hooks(model: nn.Module, adapter: Adapter, space: PruningSpace, mask: Mask, fill, l: int,
                device: torch.device) -> list:
    """The pre-hooks of layer l that apply `mask` (and `fill`) to the o_proj / down_proj inputs;
    returns their handles."""
    handles = []
    o_proj, down_proj = adapter.output_linear(model, l, "o_proj"), adapter.output_linear(model, l, "down_proj")
    if o_proj is not None and mask.heads[l].shape[-1]:
        m = expand_unit_mask(mask.heads[l].float(), space.head_unit_of_channel(l)).to(device)
        mu = fill[0][l].to(device) if fill else None
        handles.append(o_proj.register_forward_pre_hook(_scale_input(m, mu)))
    if down_proj is not None and mask.channels[l].shape[-1]:
        m = expand_unit_mask(mask.channels[l].float(), space.channel_unit_of_channel(l)).to(device)
        mu = fill[1][l].to(device) if fill else None
        handles.append(down_proj.register_forward_pre_hook(_scale_input(m, mu)))
    return handles


def stack_masks(masks: list[Mask], repeats: int = 1) -> Mask:
    """K masks -> one batched mask of K * repeats rows (mask k for rows k*repeats ... )."""
    def stack(parts):
        return torch.stack([p.float() for p in parts]).repeat_interleave(repeats, 0)

    n_layers = len(masks[0].heads)
    return Mask(
        tuple(stack([m.heads[l] for m in masks]) for l in range(n_layers)),
        tuple(stack([m.channels[l] for m in masks]) for l in range(n_layers)),
    )
