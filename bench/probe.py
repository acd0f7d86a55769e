"""Probe Pruning against dense and the static baselines, every forward timed side by side.

For each batch of test windows, one after another: the dense forward, then at each ratio Wanda-sp
and FLAP (static, sliced through `prune()`), full-batch probing (the oracle) and Probe Pruning
(with the calibration history), and with --matched the two static methods again at the share of
decoder-linear parameters Probe Pruning actually removes (it keeps k/v of grouped attention whole
and layers 0-2 dense, so it removes less than its nominal ratio). Reported per row: perplexity,
forward time against dense (summed over the same batches), PRR = (ppl - dense ppl) / (1 - time
ratio), the probe's analytic share of the dense FLOPs, and the decoder-linear parameters removed.

The defaults are the full protocol (embedded model, Brown test split, whole, 20 sequences of 128
tokens per batch, ratios 0.2 and 0.4); --max-batches runs the first N batches only, --max-minutes
the first batches that start within a wall-time budget (the count is in the results).

    python -m bench.probe --ratios 0.2 0.4 --batch-size 20 --matched
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import markdown_table, write_results
from pruner import probe_math as pm
from pruner.models import load_model
from pruner.probe import (ProbeConfig, ProbePruner, calibration_history_for, evaluate_dynamic, layer_ratio,
                          static_baselines)
from pruner.windows import corpus_windows

STATIC = ("wanda-sp", "flap")


def analytic_probe_share(loaded, config: ProbeConfig, batch: int, seqlen: int) -> float:
    """Probe FLOPs / dense decoder FLOPs for a batch of `batch` x `seqlen` (probe_math counters)."""
    shapes = loaded.adapter.layer_shapes(loaded.model)
    hidden = loaded.model.config.hidden_size
    bp, tp = pm.probe_count(batch, config.sample_fraction, 1), pm.probe_count(seqlen, config.position_fraction, 2)
    dense = sum(pm.dense_flops(batch, seqlen, hidden, s.n_q, s.n_kv, s.head_dim, s.d_ff)["total"] for s in shapes)
    probe = sum(pm.probe_flops(batch, seqlen, bp, tp, hidden, s.n_q, s.n_kv, s.head_dim, s.d_ff)["total"]
                for s in shapes[config.skip_layers:])
    return probe / dense


def nominal_removed(loaded, pruner: ProbePruner) -> float:
    """Decoder-linear parameters Probe Pruning removes when its kept query heads use every k/v head."""
    from pruner.adapters import LayerShape

    space, r = pruner.space, pruner.layer_ratio
    kept = 0
    for l, s in enumerate(space.shapes):
        if l in pruner.layers:
            s = LayerShape(pm.keep_count(s.n_q, r), s.n_kv, s.head_dim,
                           pm.keep_count(s.d_ff, r, pruner.config.mlp_multiple))
        kept += space.layer_params(s, l)
    return 1 - kept / space.decoder_linear_params()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="brown")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--max-batches", type=int, default=None, help="only the first N test batches (default: all)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new batch once this many minutes have passed since the start (default: no limit)")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--matched", action="store_true", help="also the static methods at PP's removed share")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--name", default="probe")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    windows = corpus_windows(loaded.tokenizer, args.data, "test", args.seqlen)
    total_windows = int(windows.shape[0])
    if args.max_batches:
        windows = windows[: args.max_batches * args.batch_size]
    pruners, static, labels = {}, {}, {}
    for ratio in args.ratios:
        for variant, label in (("full-batch", "full-batch probing"), ("probe", "PP")):
            config = ProbeConfig(ratio=ratio, variant=variant, data=args.data, calib_windows=args.calib_windows)
            layer_ratio(config, len(loaded.adapter.layers(loaded.model)))
            history = calibration_history_for(loaded, config, args.seqlen, progress=True) if config.uses_history else None
            name = f"{variant}@{ratio}"
            pruners[name] = ProbePruner(loaded.model, loaded.adapter, config, history)
            labels[name] = (label, ratio)
        base = ProbeConfig(ratio=ratio, data=args.data, calib_windows=args.calib_windows)
        for method, model in static_baselines(loaded, base, STATIC, progress=True).items():
            static[f"{method}@{ratio}"] = model
            labels[f"{method}@{ratio}"] = (method, ratio)
        if args.matched:
            removed = round(nominal_removed(loaded, pruners[f"probe@{ratio}"]), 3)
            matched = ProbeConfig(ratio=removed, data=args.data, calib_windows=args.calib_windows)
            for method, model in static_baselines(loaded, matched, STATIC, progress=True).items():
                static[f"{method}@{removed} (PP's share)"] = model
                labels[f"{method}@{removed} (PP's share)"] = (f"{method} at PP's removed share", ratio)
    setup_s = time.perf_counter() - t0
    print(f"setup {setup_s:.0f} s; {len(windows)} windows in batches of {args.batch_size}", flush=True)

    def report(index, entry):
        print(f"batch {index}: " + ", ".join(f"{k} {v['seconds']:.2f}s wall {v['cpu_seconds']:.2f}s cpu"
                                            for k, v in entry.items()), flush=True)

    def out_of_time() -> bool:
        return args.max_minutes is not None and time.perf_counter() - t0 > 60 * args.max_minutes

    # warm-up: every forward once, untimed, on a short window, so no first call pays for lazy set-ups
    result = evaluate_dynamic(loaded, windows, args.batch_size, pruners, static, warmup=True, on_batch=report,
                              should_stop=out_of_time, progress=True)
    rows = []
    for row in result["rows"]:
        label, ratio = labels.get(row["name"], ("dense", 0.0))
        rows.append({"method": label, "ratio": ratio, **{k: v for k, v in row.items() if k != "name"}, "name": row["name"]})
    shares = [{"batch": b, "seqlen": t, **{f"probe share @{r}": analytic_probe_share(
        loaded, ProbeConfig(ratio=r), b, t) for r in args.ratios[:1]}} for b in (8, 20) for t in (128, 1024)]
    write(args, rows, shares, result["batches"], total_windows, setup_s, time.perf_counter() - t0)


def verdicts(rows: list[dict], ratios) -> list[str]:
    """The issue's targets, checked on these rows."""
    out = []
    by = {(r["method"], r["ratio"]): r for r in rows}
    for ratio in ratios:
        pp = by.get(("PP", ratio))
        if pp is None:
            continue
        for method in STATIC:
            other = by.get((method, ratio))
            if other:
                ok = pp["ppl"] < other["ppl"]
                out.append(f"- ratio {ratio}: PP perplexity {pp['ppl']:.2f} {'<' if ok else '>='} {method} "
                           f"{other['ppl']:.2f}: {'met' if ok else 'NOT met'}")
        share = pp["probe_flops_share"]
        out.append(f"- ratio {ratio}: probe FLOPs share {100 * share:.2f}% "
                   f"{'<=' if share <= 0.02 else '>'} 2%: {'met' if share <= 0.02 else 'NOT met'}")
        bound = 1 - ratio / 2
        for key, what in (("time_ratio", "wall"), ("cpu_time_ratio", "CPU")):
            value = pp[key]
            out.append(f"- ratio {ratio}: PP forward {what}-time ratio {value:.3f} {'<' if value < bound else '>='} "
                       f"1 - ratio/2 = {bound:.2f}: {'met' if value < bound else 'NOT met'}")
    return out


def write(args, rows, shares, batches, total_windows, setup_s, wall_s) -> None:
    columns = ["method", "ratio", "achieved_ratio", "ppl", "time_ratio", "prr", "cpu_time_ratio", "prr_cpu",
               "probe_flops_share", "flops_ratio", "seconds"]
    fmt = {"achieved_ratio": "{:.3f}", "ppl": "{:.2f}", "time_ratio": "{:.3f}", "prr": "{:.1f}",
           "cpu_time_ratio": "{:.3f}", "prr_cpu": "{:.1f}", "probe_flops_share": "{:.4f}", "flops_ratio": "{:.3f}",
           "seconds": "{:.1f}"}
    n_batches = rows[0]["batches"]
    scope = (f"{rows[0]['windows']} of the {total_windows} test windows ({n_batches} batches of {args.batch_size})"
             if rows[0]["windows"] < total_windows else f"all {total_windows} test windows ({n_batches} batches of "
                                                           f"{args.batch_size})")
    md = (f"### Probe Pruning vs static pruning ({args.model}, {args.data} test, seqlen {args.seqlen})\n\n"
          f"Evaluated on {scope}; every forward of a batch runs one after another (dense first), so the "
          "time ratios are measured side by side. `ratio`: the nominal pruning ratio (PP: share of query heads "
          "and MLP channels, layers 0-2 dense and the rest at L/(L-3) r; static: share of decoder-linear "
          f"parameters); PP's kept MLP channels are rounded up to a multiple of {ProbeConfig().mlp_multiple}; "
          f"{args.calib_windows} calibration windows (train split) for the probe history and the static methods; "
          "`achieved_ratio`: decoder-linear parameters not used. `time_ratio`: forward wall time / "
          "dense (PP: probe, scoring, slicing and history update included). `prr`: (ppl - dense ppl) / "
          "(1 - time_ratio), empty when not faster. `cpu_time_ratio`, `prr_cpu`: the same from this process's "
          "CPU time (on a CPU shared with other work the wall time also counts waiting for the cores; the CPU "
          "time is the forward's own effort; on a GPU only the wall time means anything). "
          "`probe_flops_share`, `flops_ratio`: analytic, decoder layers only.\n\n"
          + markdown_table([{k: ("" if v is None else v) for k, v in r.items()} for r in rows], columns, fmt)
          + "\n\nTargets of the issue:\n" + "\n".join(verdicts(rows, args.ratios))
          + "\n\nAnalytic probe share of the dense decoder FLOPs by batch shape (positions 0.5, samples 0.05):\n\n"
          + markdown_table(shares, list(shares[0]), {k: "{:.4f}" for k in shares[0] if k.startswith("probe")})
          + f"\n\nSetup (load, calibration, static pruning) {setup_s:.0f} s; whole run {wall_s:.0f} s.")
    write_results(args.name, {"args": vars(args), "rows": rows, "probe_share_by_shape": shares, "batches": batches},
                  md)
    print(md)


if __name__ == "__main__":
    main()
