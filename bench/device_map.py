"""A model bigger than its device: the same checkpoint loaded whole on one device and with a device
map that offloads part of it (`--device-map auto` with a `--max-memory` that leaves only some
layers on the device), side by side in one process.

Measured: where the map put the modules; the largest logit difference between the two loads on
one batch; seconds per policy-gradient step (K masks, gathered forwards; offloaded layers run
masked through accelerate's hooks) and peak device memory of each; and a short search on each
that is sliced and saved (the dispatched one built on the CPU a layer at a time), whose per-layer
kept sizes must agree, the saved model reloaded and its logits compared with the whole model's
pruned copy.

    .venv/bin/python -m bench.device_map --model DIR --max-memory 0=2GiB,cpu=64GiB
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import markdown_table, write_results
from pruner.config import PruneConfig
from pruner.dispatch import parse_max_memory
from pruner.evaluate import window_losses
from pruner.methods.pg import build_run
from pruner.models import load_model, save_pruned
from pruner.pg.config import PGConfig
from pruner.prune import prune
from pruner.space import PruningSpace


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_seconds(loaded, args, steps: int) -> list[float]:
    space = PruningSpace.from_model(loaded.model, loaded.adapter, "kv_group")
    pg = PGConfig(batch_size=args.batch_size, seqlen=args.seqlen, samples=args.samples, init="random",
                  steps=10**6, bias_compensation=False)
    run = build_run(loaded, space, PruneConfig(method="pg", ratio=0.5, data=args.data, pg=pg))
    run.do_step()  # warm-up
    out = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        run.do_step()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def measure(loaded, args, ids, folder: Path, name: str) -> dict:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        logits = loaded.model(ids.to(loaded.device)).logits.float().cpu()
        loss = float(window_losses(loaded.model, ids).mean())
    times = step_seconds(loaded, args, args.steps)
    pg = PGConfig(steps=args.search_steps, samples=args.samples, batch_size=args.batch_size, seqlen=args.seqlen,
                  init="random", eval_every=args.search_steps, eval_windows=2, bias_compensation=True)
    pruned, _, report = prune(loaded, PruneConfig(method="pg", ratio=0.5, data=args.data, calib_windows=8, pg=pg))
    save_pruned(pruned, loaded.tokenizer, folder / name, report)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"logits": logits, "loss": loss, "step_s": times, "peak_bytes": peak, "report": report,
            "saved": folder / name}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="brown")
    ap.add_argument("--max-memory", default="0=2GiB,cpu=64GiB", help="the map's budget per device")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed PG steps of each load")
    ap.add_argument("--search-steps", type=int, default=3, help="steps of the search that is sliced and saved")
    ap.add_argument("--name", default="device_map")
    args = ap.parse_args()

    ids = torch.randint(0, 1000, (2, args.seqlen), generator=torch.Generator().manual_seed(0))
    folder = Path(tempfile.mkdtemp(prefix="device-map-"))
    whole = load_model(args.model)
    results = {"whole": measure(whole, args, ids, folder, "whole")}
    device = str(whole.device)
    del whole
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mapped = load_model(args.model, device_map="auto", max_memory=parse_max_memory(args.max_memory),
                        offload_folder=folder / "offload")
    placement = collections.Counter(str(v) for v in mapped.model.hf_device_map.values())
    results["mapped"] = measure(mapped, args, ids, folder, "mapped")
    w, m = results["whole"], results["mapped"]
    again = load_model(str(m["saved"]), device="cpu", dtype="fp32")
    ref = load_model(str(w["saved"]), device="cpu", dtype="fp32")
    with torch.no_grad():
        reload_diff = float((again.model(ids).logits - ref.model(ids).logits).abs().max())
    same_layers = ([r["mlp_channels"] for r in w["report"]["per_layer"]] == [r["mlp_channels"] for r in m["report"]["per_layer"]]
                   and [r["kv_heads"] for r in w["report"]["per_layer"]] == [r["kv_heads"] for r in m["report"]["per_layer"]])
    rows = []
    for name, r in (("whole on one device", w), (f"device map auto, max memory {args.max_memory}", m)):
        rows.append({"load": name, "step_s_median": statistics.median(r["step_s"]),
                     "peak_device_GiB": (r["peak_bytes"] or 0) / 2**30, "dense_loss": r["loss"]})
    summary = {
        "placement": dict(placement),
        "max_abs_logit_diff": float((w["logits"] - m["logits"]).abs().max()),
        "same_per_layer_kept_sizes": same_layers,
        "reloaded_vs_whole_pruned_max_abs_logit_diff": reload_diff,
        "step_slowdown": rows[1]["step_s_median"] / rows[0]["step_s_median"],
    }
    md = "\n".join([
        f"### A model bigger than its device ({args.model}, {device}, B={args.batch_size}, T={args.seqlen}, K={args.samples})",
        "",
        f"Placement of the dispatched load (modules per device): {dict(placement)}.",
        "",
        markdown_table(rows, ["load", "step_s_median", "peak_device_GiB", "dense_loss"],
                       {"step_s_median": "{:.3f}", "peak_device_GiB": "{:.2f}", "dense_loss": "{:.5f}"}),
        "",
        f"- Largest logit difference, dispatched vs whole: {summary['max_abs_logit_diff']:.3g}.",
        f"- A PG step through the dispatched model: {summary['step_slowdown']:.2f}x the step on one device "
        "(offloaded layers stream their weights in and run masked).",
        f"- A {args.search_steps}-step search sliced and saved from each: same per-layer kept sizes: "
        f"{same_layers}; the dispatched save reloads, largest logit difference to the whole model's pruned "
        f"save {reload_diff:.3g}.",
    ])
    write_results(args.name, {"args": vars(args), "device": device, "rows": rows, **summary}, md)
    print(md)


if __name__ == "__main__":
    main()
