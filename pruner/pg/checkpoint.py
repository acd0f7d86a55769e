"""Checkpoints of a search that cannot carry code: tensors in safetensors, everything else JSON.

One file, `checkpoint.safetensors`, written atomically: the keep probabilities, the sampler's
generator state and the probability snapshots as tensors; step, baseline, settings and the
per-step history as JSON in the file's metadata. Reading it runs nothing (no pickle), and every
field is checked, so a damaged or crafted file is a clear error. A `checkpoint.pt` of older
versions is a pickle and is refused, never opened.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import PrunerError
from .config import with_added_knobs

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"
FORMAT = 1
META_KEY = "pruner_checkpoint"


@dataclass
class Checkpoint:
    """Everything needed to continue a search on the same trajectory."""

    step: int
    s_h: Tensor  # (N_head_units,) float64 keep probabilities
    s_c: Tensor  # (N_channel_units,)
    baseline: float | None
    generator: Tensor  # uint8 state of the mask sampler
    config: dict  # PGConfig as a dict
    ratio: float
    seed: int
    settings: dict = field(default_factory=dict)  # the whole PruneConfig and model spec, to resume
    status: str = "running"
    history: dict = field(default_factory=lambda: {"steps": [], "snapshots": [], "evals": []})
    best: dict | None = None  # {"step", "ppl", "mask": (N_units,) bool}: the best hard mask on held-out blocks


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` to run_dir/checkpoint.safetensors (temporary sibling, then rename)."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"s_h": ckpt.s_h.double().contiguous(), "s_c": ckpt.s_c.double().contiguous(),
               "generator": ckpt.generator.contiguous()}
    if ckpt.best is not None:
        tensors["best_mask"] = ckpt.best["mask"].to(torch.uint8).contiguous()
    snapshot_steps = []
    for i, snap in enumerate(ckpt.history["snapshots"]):
        snapshot_steps.append(snap["step"])
        for kind in ("heads", "channels"):
            for l, t in enumerate(snap[kind]):
                tensors[f"snapshot.{i}.{kind}.{l}"] = t.float().contiguous().clone()
    meta = {"format": FORMAT, "step": ckpt.step, "baseline": ckpt.baseline, "config": ckpt.config,
            "ratio": ckpt.ratio, "seed": ckpt.seed, "settings": ckpt.settings, "status": ckpt.status,
            "best": None if ckpt.best is None else {"step": ckpt.best["step"], "ppl": ckpt.best["ppl"]},
            "steps": ckpt.history["steps"], "evals": ckpt.history["evals"], "snapshot_steps": snapshot_steps,
            "layers": len(ckpt.history["snapshots"][0]["heads"]) if ckpt.history["snapshots"] else 0}
    path = run_dir / CHECKPOINT
    tmp = run_dir / f".{CHECKPOINT}.pruner-{uuid.uuid4().hex[:8]}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT).is_file() or (Path(run_dir) / LEGACY_CHECKPOINT).is_file()


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint in run_dir, None if there is none; PrunerError if it is damaged, not ours, or
    an old pickle (`checkpoint.pt`, never opened: a crafted one could run code)."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not path.is_file():
        if (run_dir / LEGACY_CHECKPOINT).exists():
            raise PrunerError(f"{run_dir / LEGACY_CHECKPOINT} is a pickled checkpoint of an older version; pickles "
                              "can run code, so it is not opened: start a new run")
        return None
    try:
        return _read(path)
    except PrunerError as exc:
        raise PrunerError(f"{path}: {exc}; start a new run or restore the file") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure of a file on disk is the user's damaged file
        raise PrunerError(f"the checkpoint {path} is damaged or incomplete ({type(exc).__name__}): "
                          "start a new run or restore the file") from None


def _read(path: Path) -> Checkpoint:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[META_KEY])
        names = set(f.keys())
        tensors = {name: f.get_tensor(name) for name in names}
    _check(meta.get("format") == FORMAT, "unknown checkpoint format")
    for key, kind in (("step", int), ("config", dict), ("ratio", float), ("seed", int), ("settings", dict),
                      ("status", str), ("steps", list), ("evals", list), ("snapshot_steps", list), ("layers", int)):
        _check(isinstance(meta.get(key), kind) and not isinstance(meta.get(key), bool), f"field {key!r} is missing or mistyped")
    _check(meta["baseline"] is None or isinstance(meta["baseline"], float), "field 'baseline' is mistyped")
    for name in ("s_h", "s_c"):
        t = tensors.get(name)
        _check(t is not None and t.dim() == 1 and t.dtype == torch.float64, f"tensor {name!r} is missing or mistyped")
        _check(bool(torch.isfinite(t).all() and ((t >= 0) & (t <= 1)).all()), f"tensor {name!r} holds values outside [0, 1]")
    gen = tensors.get("generator")
    _check(gen is not None and gen.dtype == torch.uint8 and gen.dim() == 1, "the generator state is missing")
    snapshots = []
    for i, step in enumerate(meta["snapshot_steps"]):
        snap = {"step": step}
        for kind in ("heads", "channels"):
            parts = [tensors.get(f"snapshot.{i}.{kind}.{l}") for l in range(meta["layers"])]
            _check(all(p is not None for p in parts), f"snapshot {i} is incomplete")
            snap[kind] = parts
        snapshots.append(snap)
    _check(meta["baseline"] is None or math.isfinite(meta["baseline"]), "the baseline is not finite")
    best = _best(meta.get("best"), tensors.get("best_mask"))
    return Checkpoint(step=meta["step"], s_h=tensors["s_h"], s_c=tensors["s_c"], baseline=meta["baseline"],
                      generator=gen, config=with_added_knobs(meta["config"]), ratio=meta["ratio"], seed=meta["seed"],
                      settings=meta["settings"], status=meta["status"],
                      history={"steps": meta["steps"], "snapshots": snapshots, "evals": meta["evals"]}, best=best)


def _best(meta: dict | None, mask: Tensor | None) -> dict | None:
    """The best-so-far record, checked (checkpoints written before it existed have none)."""
    if meta is None:
        _check(mask is None, "a best mask without its record")
        return None
    _check(isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("ppl"), float)
           and math.isfinite(meta["ppl"]), "field 'best' is mistyped")
    _check(mask is not None and mask.dim() == 1 and mask.dtype == torch.uint8 and bool((mask <= 1).all()),
           "the best mask is missing or mistyped")
    return {"step": meta["step"], "ppl": meta["ppl"], "mask": mask.bool()}


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise PrunerError(f"the checkpoint is damaged: {what}")


def read_settings(run_dir: Path) -> dict:
    """The settings a run was started with (model spec and its PruneConfig as a dict)."""
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        raise PrunerError(f"no checkpoint in {run_dir}: nothing to resume")
    return ckpt.settings
