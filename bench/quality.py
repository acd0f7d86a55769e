"""Quality of every method at several pruning ratios: perplexity of the sliced model.

Calibration and search use the train split; perplexity is measured on the test split at each
seqlen. "pg-random" runs the reference policy-gradient search (masks scored with removed channels
at zero) from random probabilities; "pg-init" starts it (sigmap) from the metric that scored best
at that ratio; "pg-init+bias" searches with FLAP's bias compensation (`PGConfig.bias_compensation`:
every sampled mask is scored, and the result saved, with removed channels at their calibration
means). Two derived rows reuse an earlier row's mask instead of searching again: "flap-nobias" is
FLAP's mask without its bias compensation, "pg-init+posthoc" the pg-init mask with the
compensation added after the search.

    .venv/bin/python -m bench.quality --ratios 0.2 0.3 0.4 0.5 --methods magnitude wanda-sp flap pg-random pg-init pg-init+bias"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from bench.common import RESULTS, markdown_table, write_results
from pruner.corpus import load_text
from pruner.evaluate import perplexity
from pruner.config import PruneConfig
from pruner.methods import Selection
from pruner.models import load_model
from pruner.pg.config import PGConfig
from pruner.prune import apply, prune, report, select
from pruner.windows import eval_windows, tokenize

METRICS = ("magnitude", "wanda-sp", "flap")
DERIVED = {"flap-nobias": ("flap", False), "pg-init+posthoc": ("pg-init", True)}


def derived_prune(loaded, config, selection: Selection, with_bias: bool):
    """`selection`'s mask applied again, with FLAP's bias compensation for it or with none."""
    derived = dataclasses.replace(selection, compensate=with_bias)
    space, _ = select(loaded, dataclasses.replace(config, method="magnitude"))
    pruned, derived = apply(loaded, config, space, derived)
    return pruned, derived, report(loaded, config, space, derived, pruned, 0.0)


def evaluate(model, test_ids, seqlens, max_windows) -> dict:
    out = {}
    for seqlen in seqlens:
        windows = eval_windows(test_ids, seqlen, max_windows.get(seqlen))
        out[f"ppl@{seqlen}"] = perplexity(model, windows, batch_size=max(1, 2048 // seqlen))["ppl"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="brown")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--max-windows", type=int, nargs="+", default=None,
                    help="per seqlen, the number of test windows (default: all)")
    ap.add_argument("--methods", nargs="+", default=[*METRICS, "pg-random", "pg-init"])
    ap.add_argument("--granularity", default="kv_group")
    ap.add_argument("--pg", default="{}", help="JSON of PGConfig overrides, e.g. '{\"steps\": 1000, \"lr\": 0.1}'")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--name", default="quality")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine earlier result files (e.g. ratios run on separate calls) instead of running")
    args = ap.parse_args()
    if args.merge:
        return merge(args)

    loaded = load_model(args.model, device=args.device, dtype="fp32")
    test_ids = tokenize(loaded.tokenizer, load_text(args.data, "test"))
    max_windows = dict(zip(args.seqlens, args.max_windows)) if args.max_windows else {}
    pg_config = PGConfig(**json.loads(args.pg))
    rows = [{"method": "dense", "ratio": 0.0, "achieved_ratio": 0.0, "wall_time_s": 0.0,
             **evaluate(loaded.model, test_ids, args.seqlens, max_windows)}]
    print(rows[-1], flush=True)
    per_layer = {}
    for ratio in args.ratios:
        best_metric, best_ppl = None, float("inf")
        selections, walls, configs = {}, {}, {}
        for method in args.methods:
            base = dict(ratio=ratio, granularity=args.granularity, data=args.data, calib_windows=args.calib_windows)
            derived = None
            if method in DERIVED:
                source, with_bias = DERIVED[method]
                if source not in selections:
                    raise SystemExit(f"{method} reuses {source}'s mask: list {source} before it in --methods")
                derived = (selections[source], with_bias)
                config = configs[source]
            elif method.startswith("pg"):
                init = dataclasses.replace(pg_config, init="random") if method.startswith("pg-random") else \
                    dataclasses.replace(pg_config, init_metric=best_metric or pg_config.init_metric)
                # the reference scores masks with removed channels at zero; "+bias" with their means
                init = dataclasses.replace(init, bias_compensation=method.endswith("+bias"))
                config = PruneConfig(method="pg", pg=init, **base)
            else:
                config = PruneConfig(method=method, **base)
            t0 = time.perf_counter()
            pruned, selection, result = derived_prune(loaded, config, *derived) if derived else prune(loaded, config)
            wall = time.perf_counter() - t0 + (walls[DERIVED[method][0]] if derived else 0.0)
            selections[method], walls[method], configs[method] = selection, wall, config
            row = {"method": method, "ratio": ratio, "achieved_ratio": result["achieved_ratio"], "wall_time_s": wall,
                   **evaluate(pruned, test_ids, args.seqlens, max_windows)}
            if method.startswith("pg-init"):
                row["init_metric"] = config.pg.init_metric
            if "pg" in result:
                row["pg_validation_ppl"] = result["pg"]["validation_ppl"]
            rows.append(row)
            per_layer[f"{method}@{ratio}"] = [r["kept_fraction"] for r in result["per_layer"]]
            print({k: v for k, v in row.items() if k != "pg_validation_ppl"}, flush=True)
            key = f"ppl@{args.seqlens[0]}"
            if method in METRICS and row[key] < best_ppl:
                best_metric, best_ppl = method, row[key]
            del pruned
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    write_report(rows, per_layer, dataclasses.asdict(pg_config), args, {"args": vars(args)})


def write_report(rows, per_layer, pg: dict, args, extra: dict) -> None:
    columns = ["method", "ratio", "achieved_ratio", *[f"ppl@{s}" for s in args.seqlens], "wall_time_s"]
    fmt = {"achieved_ratio": "{:.3f}", "wall_time_s": "{:.1f}", **{f"ppl@{s}": "{:.2f}" for s in args.seqlens}}
    md = (f"### Perplexity after pruning ({args.model}, {args.data} test, granularity {args.granularity})\n\n"
          + markdown_table(rows, columns, fmt)
          + f"\n\nPG settings: `{json.dumps(pg)}`"
          + "\n\nCalibration statistics are computed once per model and setting and reused, so the first "
            "method that needs them (wanda-sp) carries the calibration time in its wall time; pg-init also "
            "reuses them for its initialisation.")
    write_results(args.name, {"rows": rows, "per_layer_kept_fraction": per_layer, "pg": pg, **extra}, md)
    plot(rows, per_layer, args)


def merge(args) -> None:
    """One table and plot from several result files of the same settings: the dense row once, and
    each (method, ratio) from the first file that has it (a rerun must agree; it is checked)."""
    parts = [json.loads(open(path).read()) for path in args.merge]
    rows, seen, methods = [parts[0]["rows"][0]], {}, []
    key = f"ppl@{parts[0]['args']['seqlens'][0]}"
    for part in parts:
        for row in part["rows"][1:]:
            name = (row["method"], row["ratio"])
            if name in seen:
                if abs(seen[name][key] - row[key]) > 1e-6 * seen[name][key]:
                    print(f"note: {name} differs between files: {seen[name][key]:.3f} vs {row[key]:.3f}")
                continue
            seen[name] = row
            rows.append(row)
            if row["method"] not in methods:
                methods.append(row["method"])
    rows = rows[:1] + sorted(rows[1:], key=lambda r: (r["ratio"], methods.index(r["method"])))
    per_layer = {k: v for p in parts for k, v in p["per_layer_kept_fraction"].items()}
    first = parts[0]["args"]
    for name in ("model", "data", "granularity", "seqlens"):
        setattr(args, name, first[name])
    args.methods = methods
    write_report(rows, per_layer, parts[0]["pg"], args,
                 {"merged_from": [{"command": p["command"], "environment": p["environment"]} for p in parts]})


def plot(rows, per_layer, args) -> None:
    """Perplexity vs ratio per method, and the per-layer kept fraction of the PG results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"ppl@{args.seqlens[0]}"
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    for method in args.methods:
        pts = [(r["ratio"], r[key]) for r in rows if r["method"] == method]
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.axhline(rows[0][key], color="grey", ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("pruning ratio (decoder-linear parameters removed)")
    ax.set_ylabel(f"perplexity ({args.data} test, seqlen {args.seqlens[0]})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}_ppl.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    shown = "pg-init+bias" if any(k.startswith("pg-init+bias@") for k in per_layer) else "pg-init"
    for name, fractions in sorted(per_layer.items()):
        if name.split("@")[0] == shown:
            ax.plot(range(len(fractions)), fractions, marker=".", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction of decoder-linear parameters")
    ax.set_title("Per-layer sparsity found by policy gradient")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}_layers.png", dpi=120)


if __name__ == "__main__":
    main()
