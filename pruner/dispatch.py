"""Models spread over devices: loaded with an accelerate device map (`device_map="auto"`, CPU or
disk offload where the devices are full), where such a model takes its inputs, and reading
weights that accelerate keeps offloaded.

A dispatched model runs through accelerate's hooks: each offloaded module's weights sit on the
`meta` device and are brought in just before the module runs. Forwards, masked forwards and
calibration go through those hooks unchanged; code that reads weights directly (metric scores,
bias compensation, slicing) wraps the read in `resident(model, module)`.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .errors import PrunerError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

_EMPTY = threading.local()  # .depth > 0: this thread builds modules with empty weights
_INSTALLED = threading.Lock()
_plain_register_parameter = None


def _register_parameter(module: nn.Module, name: str, param) -> None:
    """nn.Module.register_parameter, then the parameter on `meta` inside `empty_weights` (this thread)."""
    _plain_register_parameter(module, name, param)
    if param is not None and getattr(_EMPTY, "depth", 0):
        p = module._parameters[name]
        kwargs = {**p.__dict__, "requires_grad": p.requires_grad}
        module._parameters[name] = type(p)(p.to("meta"), **kwargs)


@contextmanager
def empty_weights():
    """Modules built in this thread inside the block get their parameters on the `meta` device (no
    memory, no initialisation), to be filled by `load_state_dict(..., assign=True)`; buffers stay real
    (rotary tables are computed at construction). Like accelerate's `init_empty_weights(include_buffers=
    False)`, except that other threads are untouched: that one swaps nn.Module.register_parameter for
    every thread while it runs, so a model loaded by one page would empty the weights a background
    job assigns meanwhile, and two overlapping loads could leave the swap in place for good."""
    global _plain_register_parameter
    with _INSTALLED:
        if _plain_register_parameter is None:
            _plain_register_parameter = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter
    _EMPTY.depth = getattr(_EMPTY, "depth", 0) + 1
    try:
        yield
    finally:
        _EMPTY.depth -= 1


def model_device(model: nn.Module) -> torch.device:
    """Where a model takes its inputs: the device of its first resident parameter (a model
    dispatched with accelerate keeps offloaded weights on `meta`), else the CPU."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def is_dispatched(model: nn.Module) -> bool:
    """True for a model loaded with a device map (accelerate's hooks place or offload its parts)."""
    return bool(getattr(model, "hf_device_map", None))


def _offloads(module: nn.Module) -> bool:
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


@contextmanager
def resident(model: nn.Module, module: nn.Module):
    """Inside the block every weight of `module` (a part of `model`) is a real tensor: the
    offloaded parts of it, or the offloaded part that contains it, are brought to their execution
    device, and sent back on exit. Nothing happens for a model that is not dispatched."""
    if not is_dispatched(model):
        yield module
        return
    from accelerate.utils import align_module_device

    inside = {id(m) for m in module.modules()}
    with ExitStack() as stack:
        for m in model.modules():
            if _offloads(m) and (id(m) in inside or any(sub is module for sub in m.modules())):
                stack.enter_context(align_module_device(m))
        yield module


def parse_max_memory(text: str | None) -> dict | None:
    """`0=20GiB,1=20GiB,cpu=64GiB` -> {0: "20GiB", 1: "20GiB", "cpu": "64GiB"} (accelerate's form)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not value.strip() or not (key.isdigit() or key in ("cpu", "disk")):
            raise PrunerError(f"bad --max-memory entry {part.strip()!r}: write DEVICE=SIZE pairs such as "
                              "0=20GiB,cpu=64GiB (DEVICE a CUDA index, cpu or disk)")
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def check_device_map(device_map: str | dict | None) -> None:
    if device_map is not None and not isinstance(device_map, dict) and device_map not in DEVICE_MAPS:
        raise PrunerError(f"unknown device map {device_map!r}: choose one of {', '.join(DEVICE_MAPS)}")
