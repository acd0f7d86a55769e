"""Models spread over devices: where a model takes its inputs, and reading weights that accelerate
keeps offloaded (on the `meta` device between forwards) when a model is loaded with a device map."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where a model takes its inputs: the device of its first resident parameter (a model
    dispatched with accelerate keeps offloaded weights on `meta`), else the CPU."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
