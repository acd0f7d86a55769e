"""Weight updates after pruning: unstructured / N:M methods, and reconstruction after structured ones.

Part 1 (unstructured / N:M): magnitude, Wanda, SparseGPT, ADMM with the paper's gradual mask and
ADMM with the released code's re-selection, at every --sparsities (unstructured) and --nm pattern,
each linear of every layer pruned on sequential calibration inputs.
Part 2 (structured): every --structured method at every --ratios, applied as it is and with
`--reconstruct` ls and admm (the same mask, chosen once; the refit on sequential inputs).

Perplexity on the test split of --data (--split validation to make a choice, such as the calibration
size) at each --seqlens (all windows unless --max-windows), the calibration windows from the train split. Wall time is that of the pruning itself (selection,
weight update / refit, building the model), not of the evaluation. Results are written after every
row, so an interrupted run keeps what it measured.

Full protocol (a GPU run):
    python -m bench.unstructured
Reduced protocol on a shared CPU (stated in the results):
    python -m bench.unstructured --calib-windows 64 --seqlens 128 --max-windows 128 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench.common import markdown_table, print_row, write_results
from pruner.config import PruneConfig
from pruner.evaluate import perplexity
from pruner.models import load_model
from pruner.prune import apply, report, select
from pruner.sparsity_masks import parse_sparsity_type
from pruner.windows import corpus_windows

SPARSE = {  # row name -> (method, PruneConfig overrides)
    "magnitude": ("magnitude-unstructured", {}),
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "admm-gradual": ("admm", {"admm_mask": "gradual"}),
    "admm-reselect": ("admm", {"admm_mask": "reselect"}),
}
STRUCTURED = {  # row name: (method, PruneConfig overrides)
    "magnitude": ("magnitude", {}),
    "wanda-sp": ("wanda-sp", {}),
    "wanda-sp-sequential": ("wanda-sp", {"wanda_sp_stats": "sequential"}),
    "flap": ("flap", {}),
    "taylor": ("taylor", {}),
}
RECONSTRUCT = ("none", "ls", "admm")
REFIT_LABELS = {"refit_damp": "damp {:g}", "admm_iterations": "{} iterations"}  # a refit's non-default settings


def evaluate(model, tokenizer, data, split, seqlens, max_windows) -> dict:
    out = {}
    for seqlen in seqlens:
        windows = corpus_windows(tokenizer, data, split, seqlen, max_windows)
        out[f"ppl@{seqlen}"] = perplexity(model, windows, batch_size=max(1, 2048 // seqlen))["ppl"]
    return out


def mean_errors(result: dict) -> dict:
    """Mean over layers and linears of the relative output error before and after the update."""
    update = result.get("weight_update")
    if not update:
        return {}
    errors = [e for r in update["per_layer"] for e in r["errors"].values()]
    if not errors:
        return {}
    return {"layer_error_before": sum(e["before"] for e in errors) / len(errors),
            "layer_error_after": sum(e["after"] for e in errors) / len(errors)}


def timed_prune(loaded, config):
    """select + apply + report, timed; returns (pruned, result, seconds)."""
    start = time.perf_counter()
    space, selection = select(loaded, config)
    pruned, selection = apply(loaded, config, space, selection)
    seconds = time.perf_counter() - start
    return pruned, report(loaded, config, space, selection, pruned, seconds), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="brown")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sparse", nargs="*", default=list(SPARSE), choices=list(SPARSE))
    ap.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.6, 0.7])
    ap.add_argument("--nm", nargs="*", default=["2:4"], help="N:M patterns (at ratio 1 - N/M)")
    ap.add_argument("--structured", nargs="*", default=["magnitude", "wanda-sp", "flap", "taylor"], choices=list(STRUCTURED))
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--reconstruct", nargs="*", default=list(RECONSTRUCT), choices=list(RECONSTRUCT))
    ap.add_argument("--refit-damps", type=float, nargs="+", default=None,
                    help="each reconstruction at each of these dampings (PruneConfig.refit_damp; default: its "
                         "default alone)")
    ap.add_argument("--admm-iterations", type=int, nargs="+", default=None,
                    help="iterations of the structured ADMM refit to compare (default: PruneConfig's)")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--split", default="test", choices=["validation", "test"],
                    help="where perplexity is measured: validation to make a choice (calibration size, damping), "
                         "test for the final evaluation only")
    ap.add_argument("--max-windows", type=int, default=None, help="the first N windows at each seqlen (default all)")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--name", default="unstructured")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device, dtype="fp32")
    base = dict(data=args.data, calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen)
    rows = [{"family": "dense", "method": "dense", "setting": "-", "reconstruct": "-", "achieved_ratio": 0.0,
             "wall_time_s": 0.0,
             **evaluate(loaded.model, loaded.tokenizer, args.data, args.split, args.seqlens, args.max_windows)}]
    per_layer = {}

    def record(row: dict, result: dict) -> None:
        rows.append(row)
        if "weight_update" in result:
            per_layer[f"{row['method']}@{row['setting']}@{row['reconstruct']}"] = result["weight_update"]["per_layer"]
        print_row(row)
        write_report(rows, per_layer, args)

    settings = [(s, "unstructured", f"{round(100 * s)}%") for s in args.sparsities]
    settings += [(parse_sparsity_type(nm).nm_sparsity, nm, nm) for nm in args.nm]
    for ratio, sparsity_type, label in settings:
        for name in args.sparse:
            method, overrides = SPARSE[name]
            config = PruneConfig(method=method, ratio=ratio, sparsity_type=sparsity_type, **base, **overrides)
            pruned, result, seconds = timed_prune(loaded, config)
            record({"family": "unstructured", "method": name, "setting": label, "reconstruct": "-",
                    "achieved_ratio": result["achieved_ratio"], "wall_time_s": seconds, **mean_errors(result),
                    **evaluate(pruned, loaded.tokenizer, args.data, args.split, args.seqlens, args.max_windows)}, result)
            del pruned

    for ratio in args.ratios:
        for method in args.structured:
            name, overrides = STRUCTURED[method]
            config = PruneConfig(method=name, ratio=ratio, **base, **overrides)
            start = time.perf_counter()
            space, selection = select(loaded, config)
            select_seconds = time.perf_counter() - start
            refits = [(how, damp, iters) for how in args.reconstruct  # None: the default
                      for damp in ((args.refit_damps or [None]) if how != "none" else [None])
                      for iters in ((args.admm_iterations or [None]) if how == "admm" else [None])]
            for how, damp, iters in refits:
                chosen = {k: v for k, v in (("refit_damp", damp), ("admm_iterations", iters)) if v is not None}
                applied_config = dataclasses.replace(config, reconstruct=how, **chosen)
                start = time.perf_counter()
                pruned, applied = apply(loaded, applied_config, space, selection)
                seconds = select_seconds + time.perf_counter() - start
                result = report(loaded, applied_config, space, applied, pruned, seconds)
                label = how + "".join(f" ({REFIT_LABELS[k].format(v)})" for k, v in chosen.items())
                record({"family": "structured", "method": method, "setting": f"{ratio:g}", "reconstruct": label,
                        "achieved_ratio": result["achieved_ratio"], "wall_time_s": seconds, **mean_errors(result),
                        **evaluate(pruned, loaded.tokenizer, args.data, args.split, args.seqlens, args.max_windows)}, result)
                del pruned


def targets(rows: list[dict], key: str) -> list[str]:
    """The issue's targets, checked on the measured rows: ADMM < SparseGPT < Wanda at every
    unstructured / N:M setting, and every reconstruction below its method's plain result."""
    lines = []
    by = {(r["family"], r["method"], r["setting"], r["reconstruct"]): r[key] for r in rows if key in r}
    for setting in dict.fromkeys(r["setting"] for r in rows if r["family"] == "unstructured"):
        got = [by.get(("unstructured", m, setting, "-")) for m in ("admm-gradual", "sparsegpt", "wanda")]
        if None not in got:
            ok = got[0] < got[1] < got[2]
            lines.append(f"- {setting}: ADMM {got[0]:.2f} < SparseGPT {got[1]:.2f} < Wanda {got[2]:.2f}: "
                         f"{'yes' if ok else 'NO'}")
    for (family, method, setting, how), value in by.items():
        if family == "structured" and how != "none" and (family, method, setting, "none") in by:
            plain = by[(family, method, setting, "none")]
            lines.append(f"- {method} at {setting} with {how}: {value:.2f} vs {plain:.2f} without: "
                         f"{'lower' if value < plain else 'NOT lower'}")
    return lines


def write_report(rows, per_layer, args) -> None:
    key = f"ppl@{args.seqlens[0]}"
    ppl = [f"ppl@{s}" for s in args.seqlens]
    fmt = {"achieved_ratio": "{:.3f}", "wall_time_s": "{:.1f}", "layer_error_before": "{:.4f}",
           "layer_error_after": "{:.4f}", **{c: "{:.2f}" for c in ppl}}
    columns = ["method", "setting", "reconstruct", "achieved_ratio", *ppl, "layer_error_before", "layer_error_after",
               "wall_time_s"]
    protocol = (f"{args.model}, {args.data}: calibration {args.calib_windows} train windows of {args.calib_seqlen} "
                f"tokens; perplexity on the {args.split} split, "
                + ("all windows" if args.max_windows is None else f"the first {args.max_windows} windows")
                + f" at seqlen {', '.join(map(str, args.seqlens))}")
    md = (f"### Weight updates after pruning ({protocol})\n\n"
          "Unstructured / N:M rows: `setting` is the fraction of every decoder linear's weights set to zero "
          "(or the N:M pattern); the saved models are dense with zeros (no smaller, no faster on dense "
          "kernels). Structured rows: `setting` is the fraction of decoder-linear parameters removed; "
          "`reconstruct` refits the kept o_proj / down_proj columns and their bias on sequential inputs "
          "(none: the method as it is, FLAP with its bias compensation). `layer_error_*`: mean over layers "
          "and linears of ||XW'-XW||^2/||XW||^2 on the calibration inputs before / after the weight update.\n\n"
          + markdown_table(rows, columns, fmt)
          + f"\n\nTargets ({key}):\n" + "\n".join(targets(rows, key)))
    write_results(args.name, {"rows": rows, "per_layer": per_layer, "args": vars(args)}, md)


if __name__ == "__main__":
    main()
