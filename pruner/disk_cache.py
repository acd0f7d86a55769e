"""Derived data cached on disk: work that depends only on a model, a tokenizer, a corpus and a
few settings (calibration statistics, a corpus split's token ids) is done once and read back.

An entry is one safetensors file under `paths.cache_dir()/derived/<kind>/`, named by the hash of
its key; the key itself (a JSON object: fingerprints of the model / tokenizer / text, and the
settings) is stored in the file's metadata and must equal the one asked for, so a hash collision
or a stale file is a miss, never a wrong answer. Files are written atomically (a temporary
sibling, then a rename); a damaged or unreadable one is a miss. Reading safetensors and JSON
runs no code. Under torch.distributed only rank 0 writes.

Fingerprints:
- model: sha256 over its config (JSON), every tensor's name, shape and dtype, and for each tensor
  up to 4096 of its values at an even stride (all of a smaller tensor): any other checkpoint,
  fine-tune, pruned copy or dtype reads as another model;
- tokenizer: sha256 of its serialised fast tokenizer (vocabulary, merges, normalisation), else
  of its class, name and vocabulary;
- text: sha256 of the UTF-8 text.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn

from . import distributed
from .paths import cache_dir

FORMAT = 1
META_KEY = "pruner_cache"
SAMPLES = 4096

_MODELS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_TOKENIZERS: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def derived_dir() -> Path:
    return cache_dir() / "derived"


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """The model's identity (see the module docstring); remembered per model object, which the
    library never changes in place. Offloaded tensors (on `meta`) count by name, shape and dtype."""
    if model in _MODELS:
        return _MODELS[model]
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES]
        h.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    _MODELS[model] = h.hexdigest()
    return _MODELS[model]


def share_fingerprint(copy: nn.Module, original: nn.Module) -> None:
    """`copy` holds the same weights as `original` (a view-sharing copy): same identity."""
    if original in _MODELS:
        _MODELS[copy] = _MODELS[original]


def tokenizer_fingerprint(tokenizer) -> str | None:
    """None for a tokenizer that shows neither a serialisation nor a vocabulary: no identity, no cache."""
    try:
        return _TOKENIZERS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        text = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
                           sorted(tokenizer.get_vocab().items())])
    else:
        return None
    value = _sha(text.encode())
    try:
        _TOKENIZERS[tokenizer] = value
    except TypeError:
        pass
    return value


def text_fingerprint(text: str) -> str:
    return _sha(text.encode("utf-8"))


def _path(kind: str, key: dict) -> tuple[Path, str]:
    blob = json.dumps({"format": FORMAT, "kind": kind, **key}, sort_keys=True)
    return derived_dir() / kind / f"{_sha(blob.encode())}.safetensors", blob


def load(kind: str, key: dict) -> tuple[dict[str, Tensor], dict] | None:
    """The tensors and extra metadata stored under `key`, or None (absent, stale or damaged)."""
    from safetensors import safe_open

    path, blob = _path(kind, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            if json.dumps(meta.get("key"), sort_keys=True) != json.dumps(json.loads(blob), sort_keys=True):
                return None
            return {name: f.get_tensor(name) for name in f.keys()}, meta.get("extra", {})
    except Exception:  # noqa: BLE001 - a damaged cache file is a miss; the caller recomputes and rewrites it
        return None


def save(kind: str, key: dict, tensors: dict[str, Tensor], extra: dict | None = None) -> None:
    """Store `tensors` (and JSON-able `extra`) under `key`; rank 0 only, atomic, best effort (a
    cache folder that cannot be written only costs the recomputation next time)."""
    from safetensors.torch import save_file

    if not distributed.current().is_main:
        return
    path, blob = _path(kind, key)
    tmp = path.with_name(f".{path.name}.pruner-{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={META_KEY: json.dumps({"key": json.loads(blob), "extra": extra or {}})})
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
