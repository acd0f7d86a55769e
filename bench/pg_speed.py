"""Speed and memory of one policy-gradient step beside plain inference of the dense model.

Speed: a PG step (K masks sampled, their forwards, gradient, projection) is timed interleaved, in
one loop, with K plain no-grad forwards of the dense model on the same (B, T) batch, with one
plain forward of the K*B batch, and with the step's forwards alone (`sample_losses`); medians and
IQRs over the repeats. The step runs with the default `forward_mode` (auto: gathered on a CPU, each
mask on only its kept weights; masked on CUDA) unless --forward-mode says otherwise.

Compute skipping: at expected kept fractions from 0.9 to 0.1 (pruning ratio 1 - f, random init
projected onto the budget), a gathered step and a masked step (the same seed, so the same masks)
are timed interleaved with K plain forwards of the same batch; the ratio step / K forwards against
f is the curve, next to the share of the forward's matmul FLOPs that a kept fraction f leaves
(decoder linears scale with f, the LM head does not). The step is also timed with fp32 and with
bf16 forwards (`forward_dtype`), next to plain forwards in the same precision. The step's work
outside the model (sampling, gradient, projection, record; mask stacking and hooks) is timed
alone too, without a forward, since it is smaller than the forwards' spread.

Memory: every workload runs in a fresh process of this script, so peaks do not mix:
(a) plain inference, a no-grad forward of the K*B sequences; (b) a few PG steps;
(c) one forward + backward of the dense model on the B sequences. On CPU the peak resident set
(VmHWM from /proc, reset after the model and the run are built; `ru_maxrss` is recorded too), on
CUDA `max_memory_allocated`; both as absolute peaks and as peaks above the loaded baseline.

    .venv/bin/python -m bench.pg_speed               # torch's default threads
    .venv/bin/python -m bench.pg_speed --threads 1   # stable timings on a machine shared with other jobs
    .venv/bin/python -m bench.pg_speed --threads 1 --only skipping --name pg_speed_skipping   # the curve alone
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import markdown_table, write_results
from pruner.evaluate import token_nll, window_losses
from pruner.gathered import FORWARD_MODES, resolve_forward_mode
from pruner.masking import masked, stack_masks
from pruner.models import load_model
from pruner.methods.pg import build_run
from pruner.pg.config import PGConfig
from pruner.pg.run import PGRun
from pruner.config import PruneConfig
from pruner.space import PruningSpace

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("inference", "pg", "backward")
DTYPES = ("fp32", "bf16")
SPEED_TARGET = 1.10  # a PG step costs at most 10% more than K plain forwards
SKIP_TARGET = 0.65  # at expected kept fraction 0.5, a gathered step costs at most 0.65x of K plain forwards
CURVE = (0.9, 0.7, 0.5, 0.3, 0.1)  # expected kept fractions of the compute-skipping curve
SECTIONS = ("speed", "dtypes", "skipping", "memory")
MEMORY_TARGET = 1.25  # a PG run needs at most 1.25x the memory of plain inference


# ---- building blocks ------------------------------------------------------------------------

def make_run(loaded, args, forward_dtype: str, ratio: float = 0.3, forward_mode: str | None = None) -> PGRun:
    """A PG run at `ratio` (0.3: expected kept fraction 0.7) with no checkpoints. init "random"
    needs no calibration pass (every other init scores units with a metric first); the step's cost
    does not depend on the init. Measured without bias compensation (the reference's forward:
    inputs times masks; compensation adds one matrix-vector product per layer and mask)."""
    space = PruningSpace.from_model(loaded.model, loaded.adapter, "kv_group")
    pg = PGConfig(batch_size=args.batch_size, seqlen=args.seqlen, samples=args.samples, init="random",
                  steps=10**6, forward_dtype=forward_dtype, bias_compensation=False,
                  forward_mode=forward_mode or args.forward_mode)
    return build_run(loaded, space, PruneConfig(method="pg", ratio=ratio, data=args.data, pg=pg), run_dir=None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def dense_losses(run: PGRun, ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean NLL of the unmasked model on `ids` (N, T), in the run's precision."""
    with run._autocast():  # the same autocast and loss as the step's forwards: only the masks differ
        return window_losses(run.model, ids)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn(), the device synchronised before both clock reads."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def spread(xs: list[float]) -> dict:
    """Median, quartiles and IQR of a sample."""
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(xs)}


def speed_series(run: PGRun, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Interleaved timings, one of each per repeat and the order rotated every repeat:
    `step`      run.do_step() (samples K masks, masked forward of K*B sequences, update);
    `k_forwards` K plain forwards of the step's (B, T) batch, one after the other;
    `kb_forward` one plain forward of the K*B sequences (the step's forward without masks);
    `masked_forward` run.sample_losses on K fresh masks (the step's forwards in its forward_mode)."""
    k, device = run.config.samples, run.device
    s = torch.cat([run.s_h, run.s_c])

    def jobs(batch):
        return {
            "step": run.do_step,
            "k_forwards": lambda: [dense_losses(run, batch).cpu() for _ in range(k)],
            "kb_forward": lambda: dense_losses(run, batch.repeat(k, 1)).cpu(),
            "masked_forward": lambda: run.sample_losses(
                torch.bernoulli(s.expand(k, -1).float(), generator=torch.Generator().manual_seed(0)), batch),
        }

    times = {name: [] for name in jobs(run.batch_at(0))}
    for i in range(warmup + repeats):
        batch = run.batch_at(run.step)  # the batch the next step reads
        todo = list(jobs(batch).items())
        shift = i % len(todo)
        for name, fn in todo[shift:] + todo[:shift]:
            t = timed(fn, device)
            if i >= warmup:
                times[name].append(t)
    return times


def mask_setup(run: PGRun, masks: torch.Tensor) -> None:
    """What the step's forwards add before and after the model runs: K flat masks unflattened;
    masked: stacked to one row per sequence, expanded to channels, hooks registered and removed;
    gathered: per mask, the kept rows and columns of every layer copied and swapped in, then out."""
    n_h, b = len(run.s_h), run.config.batch_size
    per_mask = [run.space.unflatten(m[:n_h], m[n_h:]) for m in masks]
    if run.forward_mode == "gathered":
        for mask in per_mask:
            with run._under(mask):
                pass
        return
    with masked(run.model, run.adapter, run.space, stack_masks(per_mask, repeats=b)):
        pass


def overhead_series(run: PGRun, repeats: int) -> dict[str, list[float]]:
    """The step's work outside the model, timed with no forward (too small to read off the
    difference of two noisy forward timings): `update` is do_step with `sample_losses` answering
    random losses (mask sampling, gradient, projection, record); `mask_setup` as above."""
    k, device = run.config.samples, run.device
    gen = torch.Generator().manual_seed(0)
    s = torch.cat([run.s_h, run.s_c]).float()
    run.sample_losses = lambda masks, batch: 3 + torch.rand(len(masks), generator=gen, dtype=torch.float64)
    try:
        update = [timed(run.do_step, device) for _ in range(repeats)]
    finally:
        del run.sample_losses  # back to the class's method
    setup = [timed(lambda: mask_setup(run, torch.bernoulli(s.expand(k, -1), generator=gen)), device)
             for _ in range(repeats)]
    return {"update": update, "mask_setup": setup}


# ---- compute skipping: step cost against kept fraction -----------------------------------------

def variant(run: PGRun, ratio: float, forward_mode: str) -> PGRun:
    """A run like `run` (same model, batches, seed and knobs) at another ratio and forward mode."""
    config = dataclasses.replace(run.config, forward_mode=forward_mode)
    return PGRun(run.model, run.adapter, run.space, ratio, config, run.seed, run.blocks, run.valid, holdout=run.holdout)


def matmul_share(run: PGRun, kept: float) -> float:
    """The share of a dense forward's weight-matmul FLOPs left at kept fraction `kept`: decoder
    linears scale with it, the LM head does not (attention scores and elementwise work left out)."""
    decoder = run.space.decoder_linear_params()
    head = run.model.get_output_embeddings().weight.numel()
    return (kept * decoder + head) / (decoder + head)


def skipping_series(base: PGRun, kept: float, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """At expected kept fraction `kept`: a gathered step, a masked step (from the gathered run's state
    each repeat: the same masks) and K plain forwards of the same batch, interleaved, the order
    rotated every repeat; also the expected kept fraction before each step and the largest gap
    between the two steps' losses."""
    runs = {mode: variant(base, 1.0 - kept, mode) for mode in ("gathered", "masked")}
    k, device = base.config.samples, base.device
    times = {"gathered_step": [], "masked_step": [], "k_forwards": [], "expected_kept": [], "loss_gap": []}
    losses = {}

    def step(mode):
        return lambda: losses.__setitem__(mode, runs[mode].do_step()["losses"])

    for i in range(warmup + repeats):
        g, m = runs["gathered"], runs["masked"]
        m.s_h, m.s_c, m.baseline, m.step = g.s_h, g.s_c, g.baseline, g.step  # both draw the same masks
        m.generator.set_state(g.generator.get_state())
        batch = g.batch_at(g.step)
        if i >= warmup:
            times["expected_kept"].append(g.expected_kept_fraction())
        todo = [("gathered_step", step("gathered")), ("masked_step", step("masked")),
                ("k_forwards", lambda: [dense_losses(base, batch).cpu() for _ in range(k)])]
        shift = i % len(todo)
        for name, fn in todo[shift:] + todo[:shift]:
            t = timed(fn, device)
            if i >= warmup:
                times[name].append(t)
        if i >= warmup:  # the same masks in both modes: their losses agree up to rounding
            times["loss_gap"].append(max(abs(a - b) for a, b in zip(losses["gathered"], losses["masked"])))
    return times


def skipping_rows(curve: dict[float, dict[str, list[float]]], base: PGRun) -> list[dict]:
    rows = []
    for kept, series in curve.items():
        med = {name: statistics.median(ts) for name, ts in series.items()}
        paired = [g / f for g, f in zip(series["gathered_step"], series["k_forwards"])]
        rows.append({"expected_kept": med["expected_kept"], "gathered_step_s": med["gathered_step"],
                     "masked_step_s": med["masked_step"], "k_forwards_s": med["k_forwards"],
                     "gathered_over_k_forwards": med["gathered_step"] / med["k_forwards"],
                     "paired_ratio": statistics.median(paired),
                     "masked_over_k_forwards": med["masked_step"] / med["k_forwards"],
                     "gathered_over_masked": med["gathered_step"] / med["masked_step"],
                     "matmul_share": matmul_share(base, kept), "repeats": len(series["k_forwards"]),
                     "max_loss_gap": max(series["loss_gap"])})
    return rows


def skipping_markdown(rows: list[dict], args, device: str) -> list[str]:
    f3 = "{:.3f}"
    at_half = next((r for r in rows if abs(r["expected_kept"] - 0.5) < 0.02), None)
    lines = [f"### Compute skipping: step cost against kept fraction ({args.model}, {device}, B={args.batch_size}, "
             f"T={args.seqlen}, K={args.samples}, {torch.get_num_threads()} torch thread(s))", "",
             "Medians over interleaved repeats, seconds. `gathered`: each sampled mask runs on only its kept "
             "weights (`forward_mode=gathered`, the default on a CPU); `masked`: all K masks in one batched forward of the "
             "full model. `paired`: median of per-repeat ratios gathered step / K forwards. `matmul share`: the "
             "dense forward's weight-matmul FLOPs left at that kept fraction (decoder linears x f, LM head whole), "
             "the ideal ratio. `max loss gap`: the largest difference between the gathered and the masked "
             "step's losses of the same masks.", "",
             markdown_table(rows, ["expected_kept", "gathered_step_s", "masked_step_s", "k_forwards_s",
                                   "gathered_over_k_forwards", "paired_ratio", "masked_over_k_forwards",
                                   "matmul_share", "max_loss_gap", "repeats"],
                            {c: f3 for c in ("expected_kept", "gathered_step_s", "masked_step_s", "k_forwards_s",
                                             "gathered_over_k_forwards", "paired_ratio", "masked_over_k_forwards",
                                             "matmul_share")} | {"max_loss_gap": "{:.1e}"})]
    if at_half:
        lines += ["", f"- At expected kept fraction {at_half['expected_kept']:.3f}: gathered step / K plain forwards "
                      f"**{at_half['gathered_over_k_forwards']:.3f}x** (paired {at_half['paired_ratio']:.3f}x); "
                      f"target <= {SKIP_TARGET:.2f}x: **{verdict(at_half['gathered_over_k_forwards'], SKIP_TARGET)}**. "
                      f"The masked step at the same masks: {at_half['masked_over_k_forwards']:.3f}x."]
    return lines


# ---- memory probes: one workload per fresh process --------------------------------------------

def rss_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process in KiB (Linux), None elsewhere."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak(device: torch.device) -> bool:
    """Start a new high-water mark here: CUDA peak stats, or the kernel's VmHWM (clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_now(device: torch.device) -> int:
    """Bytes in use now: CUDA allocated memory, or the resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    rss = rss_kib("VmRSS")
    return 1024 * rss if rss is not None else 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_peak(device: torch.device) -> int:
    """Bytes at the high-water mark since reset_peak (or since start where it could not reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = rss_kib("VmHWM")
    return 1024 * hwm if hwm is not None else 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@torch.no_grad()
def make_resident(model) -> None:
    """Read every weight once: loaded safetensors stay memory-mapped and are paged in lazily, so
    without this the first forward's page-ins would count as the workload's memory."""
    for p in model.parameters():
        p.sum()


def backward_pass(run: PGRun, batch: torch.Tensor) -> None:
    """One forward + backward of the dense model on (B, T), parameters requiring grad as loaded."""
    ids = batch.to(run.device)
    with run._autocast():
        logits = run.model(ids, use_cache=False).logits
    token_nll(logits, ids).mean().backward()


def probe_memory(args) -> dict:
    """Load the model (weights made resident), build the same run in every probe, then measure one
    workload's peak: absolute, above the loaded model, and above the state just before the workload
    (model + run: token blocks, and what tokenising the corpus left allocated)."""
    loaded = load_model(args.model, device=args.device, dtype="fp32")
    device = loaded.device
    make_resident(loaded.model)
    gc.collect()
    loaded_bytes = memory_now(device)
    run = make_run(loaded, args, "auto")
    batch = run.batch_at(0)
    work = {
        "inference": lambda: [dense_losses(run, batch.repeat(args.samples, 1)).cpu() for _ in range(args.memory_steps)],
        "pg": lambda: [run.do_step() for _ in range(args.memory_steps)],
        "backward": lambda: backward_pass(run, batch),
    }[args.memory_probe]
    gc.collect()
    before_bytes = memory_now(device)
    was_reset = reset_peak(device)
    work()
    sync(device)
    peak = memory_peak(device)
    return {"workload": args.memory_probe, "device": str(device), "peak_bytes": peak,
            "loaded_bytes": loaded_bytes, "before_workload_bytes": before_bytes,
            "peak_above_loaded_bytes": peak - loaded_bytes, "peak_above_before_bytes": peak - before_bytes,
            "peak_was_reset": was_reset,
            "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "requires_grad_params": sum(p.numel() for p in run.model.parameters() if p.requires_grad)}


def probe_args(args, workload: str) -> list[str]:
    """The command line of a fresh process measuring `workload` with this run's settings."""
    return [sys.executable, "-m", "bench.pg_speed", "--model", args.model, "--data", args.data,
            "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen), "--samples", str(args.samples),
            "--memory-steps", str(args.memory_steps), "--device", args.device, "--threads", str(args.threads),
            "--memory-probe", workload]


def measure_memory(args) -> dict[str, dict]:
    """Each workload's probe in its own process; the last stdout line is its JSON result."""
    out = {}
    for workload in WORKLOADS:
        proc = subprocess.run(probe_args(args, workload), cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {workload!r} failed:\n{proc.stderr[-3000:]}")
        out[workload] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(workload, out[workload], flush=True)
    return out


# ---- report ------------------------------------------------------------------------------------

def verdict(ratio: float, target: float) -> str:
    return f"met (<= {target:.2f}x)" if ratio <= target else f"missed (> {target:.2f}x)"


def speed_rows(series: dict[str, list[float]], k: int, b: int, mode: str) -> list[dict]:
    forwards = (f"K={k} gathered forwards of {b} sequences" if mode == "gathered"
                else f"one masked forward of {k * b} sequences")
    labels = {
        "step": f"PG step (K={k} masks, {forwards}, update)",
        "masked_forward": f"its forwards alone (`sample_losses`, {mode})",
        "k_forwards": f"K={k} plain forwards of the same {b} sequences",
        "kb_forward": f"one plain forward of {k * b} sequences",
    }
    return [{"measurement": labels[name], **{f"{key}_s": v for key, v in spread(series[name]).items() if key != "n"}}
            for name in labels]


def ratios(series: dict[str, list[float]]) -> dict[str, float]:
    """Medians of the step over its comparisons (IQRs alone do not give a ratio's spread, so
    also the median of the per-repeat ratios, each repeat's measurements taken back to back)."""
    med = {name: statistics.median(ts) for name, ts in series.items()}
    per_repeat = [s / f for s, f in zip(series["step"], series["k_forwards"])]
    return {"step_over_k_forwards": med["step"] / med["k_forwards"],
            "step_over_k_forwards_paired": statistics.median(per_repeat),
            "step_over_kb_forward": med["step"] / med["kb_forward"],
            "masked_over_kb_forward": med["masked_forward"] / med["kb_forward"],
            "step_over_masked_forward": med["step"] / med["masked_forward"]}


def memory_rows(memory: dict[str, dict], k: int, b: int) -> list[dict]:
    labels = {"inference": f"plain inference, no-grad forward of {k * b} sequences",
              "pg": f"PG steps (K={k}, B={b})",
              "backward": f"one forward + backward of the dense model on {b} sequences"}
    mib = 2**20
    return [{"workload": labels[w], "peak_MiB": m["peak_bytes"] / mib, "loaded_MiB": m["loaded_bytes"] / mib,
             "before_MiB": m["before_workload_bytes"] / mib, "peak_above_loaded_MiB": m["peak_above_loaded_bytes"] / mib,
             "peak_above_before_MiB": m["peak_above_before_bytes"] / mib} for w, m in memory.items()]


def memory_ratios(memory: dict[str, dict]) -> dict[str, float]:
    pg, inf, bwd = memory["pg"], memory["inference"], memory["backward"]
    return {"pg_over_inference": pg["peak_bytes"] / inf["peak_bytes"],
            "pg_over_inference_above_loaded": pg["peak_above_loaded_bytes"] / inf["peak_above_loaded_bytes"],
            "pg_over_backward": pg["peak_bytes"] / bwd["peak_bytes"],
            "pg_over_backward_above_loaded": pg["peak_above_loaded_bytes"] / bwd["peak_above_loaded_bytes"],
            "pg_over_inference_above_before": pg["peak_above_before_bytes"] / inf["peak_above_before_bytes"],
            "pg_over_backward_above_before": pg["peak_above_before_bytes"] / bwd["peak_above_before_bytes"]}


def breakdown(series: dict[str, list[float]]) -> list[str]:
    """step / K forwards - 1 split into three parts, as fractions of the K forwards (medians):
    batching (one K*B forward instead of K), the mask hooks, and sampling + update."""
    med = {name: statistics.median(ts) for name, ts in series.items()}
    base = med["k_forwards"]
    parts = {"one batched forward instead of K": med["kb_forward"] - base,
             "the step's forwards (gathered or masked) minus one plain forward of K*B": med["masked_forward"] - med["kb_forward"],
             "sampling, gradient, projection, record (step minus its forwards)": med["step"] - med["masked_forward"]}
    return ["Where the step's difference to K plain forwards comes from (medians, share of the K forwards):", ""] + [
        f"- {label}: {delta / base:+.1%}" for label, delta in parts.items()]


def overhead_lines(overhead: dict[str, list[float]], series: dict[str, list[float]]) -> list[str]:
    base = statistics.median(series["k_forwards"])
    labels = {"update": "sampling, gradient, projection, record",
              "mask_setup": "mask setup (gathered: copying kept rows and columns in and out; masked: stacking, hooks)"}
    return [f"- measured alone, without a forward, {labels[n]}: {1e3 * statistics.median(ts):.2f} ms per step "
            f"({statistics.median(ts) / base:.2%} of the K forwards)" for n, ts in overhead.items()]


def dtype_rows(by_dtype: dict[str, dict[str, list[float]]]) -> list[dict]:
    rows = []
    for dtype, series in by_dtype.items():
        med = {name: statistics.median(ts) for name, ts in series.items()}
        rows.append({"forward_dtype": dtype, "step_s": med["step"], "k_forwards_s": med["k_forwards"],
                     "kb_forward_s": med["kb_forward"], "step_over_k_forwards": med["step"] / med["k_forwards"],
                     "repeats": len(series["step"])})
    if "fp32" in by_dtype:
        for row in rows:
            row["step_vs_fp32"] = row["step_s"] / rows[0]["step_s"]
    return rows


def load_line(load: dict) -> str:
    return (f"Load average (1, 5, 15 min) before the timings {tuple(round(x, 2) for x in load['before'])}, "
            f"after {tuple(round(x, 2) for x in load['after'])}: on a shared machine absolute seconds "
            "vary with the load; the interleaved ratios are the result.")


def markdown(args, device: str, speed: dict, speed_ratios: dict, overhead: dict, by_dtype: dict, memory: dict,
             mem_ratios: dict, load: dict) -> str:
    k, b = args.samples, args.batch_size
    f3, f2 = "{:.3f}", "{:.2f}"
    speed_ok = speed_ratios["step_over_k_forwards"] <= SPEED_TARGET
    mem_ok = mem_ratios["pg_over_inference"] <= MEMORY_TARGET
    lines = [
        f"### Speed and memory of a policy-gradient step ({args.model}, {device}, B={b}, T={args.seqlen}, K={k})",
        "",
        f"Seconds over {args.repeats} interleaved repeats (median, quartiles, IQR), forward_mode `{args.forward_mode}` "
        f"at expected kept fraction 0.7 (ratio 0.3), forward precision `auto` "
        f"({'bf16 autocast' if device.startswith('cuda') else 'fp32'}), {torch.get_num_threads()} torch thread(s):",
        "",
        markdown_table(speed_rows(speed, k, b, args.forward_mode), ["measurement", "median_s", "q1_s", "q3_s", "iqr_s"],
                       {c: f3 for c in ("median_s", "q1_s", "q3_s", "iqr_s")}),
        "",
        f"- PG step / K plain forwards: **{speed_ratios['step_over_k_forwards']:.3f}x** (median of per-repeat "
        f"ratios {speed_ratios['step_over_k_forwards_paired']:.3f}x); target <= {SPEED_TARGET:.2f}x: "
        f"**{verdict(speed_ratios['step_over_k_forwards'], SPEED_TARGET)}**.",
        f"- PG step / one plain forward of the K*B batch: {speed_ratios['step_over_kb_forward']:.3f}x "
        f"(its forwards / plain: {speed_ratios['masked_over_kb_forward']:.3f}x; step / its forwards: "
        f"{speed_ratios['step_over_masked_forward']:.3f}x, i.e. sampling, gradient and projection).",
        "",
        "Forward precision of the step (`PGConfig.forward_dtype`), medians in seconds:",
        "",
        markdown_table(dtype_rows(by_dtype), ["forward_dtype", "step_s", "k_forwards_s", "kb_forward_s",
                                              "step_over_k_forwards", "step_vs_fp32", "repeats"],
                       {"step_s": f3, "k_forwards_s": f3, "kb_forward_s": f3, "step_over_k_forwards": f2,
                        "step_vs_fp32": f2}),
        "",
        f"Peak memory, each workload in a fresh process ({'max_memory_allocated' if device.startswith('cuda') else 'peak RSS, VmHWM reset after loading'}):",
        "",
        markdown_table(memory_rows(memory, k, b), ["workload", "peak_MiB", "loaded_MiB", "before_MiB",
                                                   "peak_above_loaded_MiB", "peak_above_before_MiB"],
                       dict.fromkeys(["peak_MiB", "loaded_MiB", "before_MiB", "peak_above_loaded_MiB",
                                      "peak_above_before_MiB"], "{:.0f}")),
        "",
        "`loaded`: right after loading, weights paged in; `before`: after building the run (corpus tokenised, "
        "blocks cut), just before the workload.",
        "",
        f"- PG / inference: **{mem_ratios['pg_over_inference']:.3f}x** absolute peak "
        f"({mem_ratios['pg_over_inference_above_loaded']:.3f}x above the loaded model, "
        f"{mem_ratios['pg_over_inference_above_before']:.3f}x above the pre-workload state); target <= {MEMORY_TARGET:.2f}x: "
        f"**{verdict(mem_ratios['pg_over_inference'], MEMORY_TARGET)}**.",
        f"- PG / one backward pass: {mem_ratios['pg_over_backward']:.3f}x absolute peak "
        f"({mem_ratios['pg_over_backward_above_loaded']:.3f}x above the loaded model, "
        f"{mem_ratios['pg_over_backward_above_before']:.3f}x above the pre-workload state).",
    ]
    lines += ["", *breakdown(speed), *overhead_lines(overhead, speed), "",
              load_line(load)]
    if not (speed_ok and mem_ok):
        lines += ["", "At least one target is missed on this machine (see the ratios above)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="brown")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--samples", type=int, default=2, help="K masks per step")
    ap.add_argument("--forward-mode", default=PGConfig().forward_mode, choices=FORWARD_MODES,
                    help="the step's forward in the speed, precision and memory sections")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype-repeats", type=int, default=5, help="repeats for the other forward precision")
    ap.add_argument("--overhead-repeats", type=int, default=50, help="repeats of the step's work without a forward")
    ap.add_argument("--curve", type=float, nargs="+", default=list(CURVE), help="expected kept fractions to time")
    ap.add_argument("--curve-repeats", type=int, default=8, help="repeats per kept fraction of the curve")
    ap.add_argument("--memory-steps", type=int, default=3, help="PG steps (and inference forwards) per memory probe")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 keeps CPU timings stable on a busy machine")
    ap.add_argument("--only", choices=["skipping"], help="run only this section (results under --name)")
    ap.add_argument("--name", default="pg_speed")
    ap.add_argument("--memory-probe", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(probe_memory(args)), flush=True)
        return

    loaded = load_model(args.model, device=args.device, dtype="fp32")
    device = str(loaded.device)
    args.forward_mode = resolve_forward_mode(args.forward_mode, loaded.device)
    auto = "bf16" if loaded.device.type == "cuda" else "fp32"
    load_before = os.getloadavg()
    base = make_run(loaded, args, auto)
    curve = {}
    for kept in args.curve:
        curve[kept] = skipping_series(base, kept, args.curve_repeats)
        print("kept", kept, {n: spread(ts)["median"] for n, ts in curve[kept].items()}, flush=True)
    skip_rows = skipping_rows(curve, base)
    skip_md = skipping_markdown(skip_rows, args, device)
    payload = {"args": vars(args), "device": device, "auto_forward_dtype": auto,
               "targets": {"step_over_k_forwards": SPEED_TARGET, "pg_over_inference_memory": MEMORY_TARGET,
                           "gathered_step_over_k_forwards_at_half": SKIP_TARGET},
               "skipping": skip_rows, "skipping_s": {str(k): v for k, v in curve.items()}}
    if args.only == "skipping":
        load = {"before": load_before, "after": os.getloadavg()}
        md = "\n".join(skip_md + ["", load_line(load)])
        write_results(args.name, payload | {"load_average": load}, md)
        print(md)
        return
    by_dtype = {}
    for dtype in sorted(DTYPES, key=lambda d: d != auto):  # the default precision first
        run = make_run(loaded, args, dtype)
        by_dtype[dtype] = speed_series(run, args.repeats if dtype == auto else args.dtype_repeats)
        print(dtype, {n: spread(ts)["median"] for n, ts in by_dtype[dtype].items()}, flush=True)
    by_dtype = {d: by_dtype[d] for d in DTYPES}
    load_after = os.getloadavg()
    speed = by_dtype[auto]
    speed_ratios = ratios(speed)
    overhead = overhead_series(make_run(loaded, args, auto), args.overhead_repeats)
    print("overhead", {n: spread(ts)["median"] for n, ts in overhead.items()}, flush=True)
    memory = measure_memory(args)
    mem_ratios = memory_ratios(memory)
    load = {"before": load_before, "after": load_after}
    md = markdown(args, device, speed, speed_ratios, overhead, by_dtype, memory, mem_ratios, load)
    md = md + "\n\n" + "\n".join(skip_md)
    write_results(args.name, payload | {
        "speed_ratios": speed_ratios, "speed": {n: spread(ts) for n, ts in speed.items()},
        "timings_s": by_dtype, "overhead_s": overhead, "memory": memory, "memory_ratios": mem_ratios,
        "load_average": load,
    }, md)
    print(md)


if __name__ == "__main__":
    main()
