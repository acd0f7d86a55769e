"""Loading and saving models: the embedded default, local checkpoints, our pruned models, hub ids.

A pruned directory is a plain HF checkpoint (safetensors + config.json + tokenizer) whose
config records `pruner_layout` (per-layer kept sizes). `load_model` rebuilds those shapes;
when every layer has one shape the directory also loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import disk_cache
from .adapters import Adapter, adapter_for
from .dispatch import empty_weights
from .errors import PrunerError
from .hub import hub_reachable
from .paths import embedded_model_dir
from .slicing import apply_layout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EMBEDDED = "embedded"
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # torch.save files: unpickling them can run code
REPORT_FILE = "report.json"


@dataclass
class LoadedModel:
    """A causal LM ready to prune: model, tokenizer, adapter and where it came from."""

    model: nn.Module
    tokenizer: object
    adapter: Adapter
    spec: str
    device: torch.device
    dtype: torch.dtype


def private_copy(loaded: LoadedModel) -> LoadedModel:
    """The same model as new module objects over the same weight tensors: hooks, swapped-in
    gathered weights and anything else a job sets on its modules never reach the shared model,
    and nothing is copied (a job never writes into weights; slicing works on a deep copy)."""
    model = loaded.model
    disk_cache.model_fingerprint(model)  # once per shared model; its copies inherit it
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, shared)
    disk_cache.share_fingerprint(clone, model)
    return dataclasses.replace(loaded, model=clone)


def pick_device(device: str | None = None) -> torch.device:
    """`cuda` when present, else `cpu`; an explicit choice wins."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise PrunerError(f"unknown device {device!r}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PrunerError(f"device {device!r} asked for, but no CUDA device is available here: use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise PrunerError(f"device {device!r} asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU (exact, and bf16 matmuls are not faster everywhere), bf16 on GPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise PrunerError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def is_pruned_dir(path: Path) -> bool:
    """True for a directory this library wrote (its config records a pruner layout)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "pruner_layout" in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec.rstrip(os.sep) and spec.count("/") != 1


def resolve_spec(spec: str) -> tuple[str, str]:
    """-> (kind, location) with kind in {'local', 'hub'}; `embedded` becomes its prepared directory."""
    if spec == EMBEDDED:
        path = embedded_model_dir()
        if not (path / "config.json").is_file():
            raise PrunerError(
                "the embedded model is not prepared yet: run `make app` (or `.venv/bin/python -m pruner setup`)"
            )
        return "local", str(path)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PrunerError(f"{spec!r} is a directory but holds no config.json: it is not a model checkpoint")
        pickled = [p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern)]
        if pickled and not any(path.glob("*.safetensors")):
            raise PrunerError(f"{spec!r} holds only pickled weights ({', '.join(sorted(pickled)[:3])}), which can run "
                              "code and are never read: convert them to safetensors (model.safetensors)")
        return "local", str(path)
    if path.exists() or _looks_like_path(spec):
        raise PrunerError(f"no model directory at {spec!r}: give `embedded`, a local checkpoint directory, or a hub id")
    if spec.count("/") != 1:
        raise PrunerError(
            f"unknown model {spec!r}: give `embedded` (SmolLM2-135M-Instruct, offline), "
            "a local checkpoint directory, or a hub id like `HuggingFaceTB/SmolLM2-360M`"
        )
    return "hub", spec


def load_model(
    spec: str = EMBEDDED,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM for pruning (eval mode, safetensors only).

    `device_map` ("auto", or an explicit {module name: device} map) spreads a model that does not
    fit one device over the GPUs, offloading to the CPU and then to `offload_folder` (default: a
    fresh folder under the cache, removed at exit) where they are full (accelerate's dispatch;
    `max_memory` as accelerate takes it). `device` must then stay auto."""
    from transformers import AutoTokenizer

    from .dispatch import check_device_map, model_device

    kind, location = resolve_spec(spec)
    check_device_map(device_map)
    if device_map is not None and device not in (None, "auto"):
        raise PrunerError(f"--device {device} and a device map exclude each other: the map places the model")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    dispatch = {}
    if device_map is not None:
        dispatch = {"device_map": device_map, "max_memory": max_memory,
                    "offload_folder": str(offload_folder or _offload_folder())}
    # Where the hub cannot be reached, use only the local HF cache (no retries, a fast clear error).
    local_only = kind == "hub" and not hub_reachable()
    try:
        if kind == "local" and is_pruned_dir(Path(location)):
            model = load_pruned(Path(location), dt, trust_remote_code)
            if dispatch:
                model = _dispatch(model, **dispatch)
        else:
            model = _from_pretrained(location, dt, trust_remote_code, local_only, **dispatch)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_only)
    except PrunerError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a bad checkpoint makes the loaders raise, the user hears why
        if kind == "hub":
            raise PrunerError(
                f"could not load {spec!r} from the model hub"
                + (" (the hub is unreachable from here and the model is not in the local HF cache)" if local_only
                   else f" ({type(exc).__name__}: {str(exc).splitlines()[0]})")
                + ". Offline, use `embedded` or a local checkpoint directory."
            ) from exc
        if not trust_remote_code and "trust_remote_code" in str(exc):
            raise PrunerError(f"the model at {location!r} needs code shipped with it, which is never run unasked: "
                              "pass --trust-remote-code (trust_remote_code=True) only if you trust its author") from None
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PrunerError(f"could not load the model at {location!r} ({type(exc).__name__}: {reason}): "
                          "is it a complete checkpoint with safetensors weights?") from None
    adapter = adapter_for(model)
    if dispatch:
        model.eval()
        dev = model_device(model)
    else:
        model.to(dev).eval()
    return LoadedModel(model, tokenizer, adapter, spec, dev, dt)


def _offload_folder() -> Path:
    """A fresh folder for weights accelerate offloads to disk, removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    from .paths import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="offload-", dir=cache_dir()))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _dispatch(model: nn.Module, device_map, max_memory, offload_folder) -> nn.Module:
    """Place an already loaded model (a pruned directory) by a device map, as from_pretrained does."""
    from accelerate import dispatch_model, infer_auto_device_map

    if not isinstance(device_map, dict):
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=model._no_split_modules or [])
    model.hf_device_map = device_map
    return dispatch_model(model, device_map, offload_dir=offload_folder)


def read_config(spec: str, trust_remote_code: bool = False):
    """A local model's config alone (no weights read), to check a request before loading; None for a
    hub id or a config that cannot be read here (loading the model then says why)."""
    from transformers import AutoConfig

    kind, location = resolve_spec(spec)
    if kind != "local":
        return None
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - load_model reports a damaged config with its reason
        return None


def _from_pretrained(location: str, dtype: torch.dtype, trust_remote_code: bool, local_only: bool = False,
                     **dispatch) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, local_files_only=local_only,
        **dispatch)


def load_pruned(path: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a pruned model's per-layer shapes from `pruner_layout`, then load its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    layout = config.pruner_layout
    with empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        adapter = adapter_for(model)
        apply_layout(model, adapter, layout)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise PrunerError(f"{path} has no .safetensors weights")
    try:
        result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    except RuntimeError as exc:  # shapes that differ from the recorded layout
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), "")[:200]
        raise PrunerError(f"{path}: weights do not match the recorded layout ({first})") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied and not k.startswith("lm_head")]
    if missing or result.unexpected_keys:
        raise PrunerError(f"{path}: weights do not match the recorded layout (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    if "lm_head.weight" in result.missing_keys:
        model.tie_weights()
    return model


RUN_SUBDIR = "run"  # a policy-gradient run's checkpoints inside an output directory


def holds_run(path: Path) -> bool:
    """A directory holding a search's checkpoints (an interrupted run that can be resumed)."""
    from .pg.checkpoint import has_checkpoint

    return has_checkpoint(path / RUN_SUBDIR) or (path / RUN_SUBDIR / "status.json").is_file()


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Check, before any work, that `out` can receive a pruned model: it is writable, and it holds
    neither someone else's files nor an earlier pruned model (unless `overwrite`). A folder with
    only a search's checkpoints (`run/`) is fine: that is where the search continues. Also
    finishes or undoes a save that a kill interrupted (fileio.recover)."""
    from .fileio import check_writable, recover

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunerError(f"{out} exists and is not a directory: choose another --out")
    check_writable(out.parent if not out.exists() else out)
    recover(out)
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    if is_pruned_dir(out):
        raise PrunerError(f"{out} already holds a pruned model: choose another --out, or pass --overwrite to replace it")
    if not holds_run(out) or any(p.name != RUN_SUBDIR for p in out.iterdir()):
        raise PrunerError(f"{out} exists, is not empty and was not written by pruner: choose another --out or pass --overwrite")


def save_pruned(model: nn.Module, tokenizer, out: Path, report: dict | None = None, overwrite: bool = False) -> Path:
    """Write safetensors weights, config (with `pruner_layout`), tokenizer and report.json to `out`.

    Published in one swap (fileio.publish_dir): until the new folder is complete, `out` keeps its
    earlier content, and a search's checkpoint folder (`run/`) is carried over into the new one.
    `out` is checked with `prepare_output_dir` (callers check it before any work, too).
    """
    from .fileio import publish_dir

    prepare_output_dir(Path(out), overwrite)

    def build(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if report is not None:
            (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))

    return publish_dir(Path(out), build, keep=(RUN_SUBDIR,))


def model_summary(loaded: LoadedModel, granularity: str = "auto") -> dict:
    """Architecture, head/channel counts, parameter counts and the prunable units with their costs.
    A value that is the same in every layer is given once, else as a per-layer list."""
    from .evaluate import total_params
    from .space import UNIT_GRANULARITIES, PruningSpace, describe_units

    space = PruningSpace.from_model(loaded.model, loaded.adapter, granularity)
    shapes, units = space.shapes, space.describe()
    first = next((s for s in shapes if s.n_q), shapes[0])

    def one_or_list(values):
        return values[0] if len(set(values)) == 1 else values

    return {
        "architecture": loaded.adapter.name,
        "model_class": type(loaded.model).__name__,
        "layers": space.n_layers,
        "hidden_size": space.hidden,
        "heads": one_or_list([s.n_q for s in shapes]),
        "kv_heads": one_or_list([s.n_kv for s in shapes]),
        "head_dim": shapes[0].head_dim,
        "intermediate_size": one_or_list([s.d_ff for s in shapes]),
        "total_params": total_params(loaded.model),
        "decoder_linear_params": space.decoder_linear_params(),
        "units": units | {"head_unit_cost": one_or_list(units["head_unit_cost"]),
                          "channel_unit_cost": one_or_list(units["channel_unit_cost"])},
        "granularity": space.granularity,
        "attention_unit_by_granularity": {g: describe_units(first, g) for g in UNIT_GRANULARITIES},
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
    }
