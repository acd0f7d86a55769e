"""Which policy-gradient setting to make the default: an ablation judged on the VALIDATION split.

Each variant changes one thing (or a combination) against the base setting; every variant runs
with several seeds; the one with the lowest mean log validation perplexity (Brown validation, all
windows of 128 tokens) is `chosen` and written into the results, for `bench.quality --pg-from`.
The test split is never read here.

    python -m bench.pg_tuning --ratios 0.4 --seeds 0 1 --workers 12 \\
        --base '{"steps": 1000, "batch_size": 8}' --name pg_tuning_gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time

import torch

from bench.common import markdown_table, mean_std, print_row, run_jobs, write_results

# name -> PGConfig overrides on top of the base (the defaults: FLAP start, antithetic pairs scored with
# DisARM, which ignores the baseline knob, separate budgets, bias compensation). Listed longest first:
# jobs start in this order.
VARIANTS = {
    "twice the steps": {"steps": 2.0},
    "K=8": {"samples": 8},
    "default": {},
    "last mask": {"result": "last"},
    "independent, leave-one-out": {"sampling": "independent", "baseline": "loo"},
    "exact estimator": {"estimator": "exact"},
    "joint budget": {"budget": "joint"},
    "mask start, joint budget": {"init": "mask", "budget": "joint"},
    "lr x3": {"lr": 3.0},
    "lr x3, last mask": {"lr": 3.0, "result": "last"},
    "lr x10": {"lr": 10.0},
    "lr /3": {"lr": 1 / 3},
    "init taylor": {"init_metric": "taylor"},
    "init wanda-sp": {"init_metric": "wanda-sp"},
    "no bias compensation": {"bias_compensation": False},
}
# Masks without a search, on the same calibration windows: the metrics alone (what a search has to
# beat) and "search start", the hard mask of the base setting's initial probabilities (one step at a
# learning rate too small to change it), which tells the start's share of a search's result.
STARTS = ("flap", "taylor", "search start")
START_OF_SEARCH = {"steps": 1, "lr": 1e-8}
SCALED = ("steps", "lr")  # variant values for these multiply the base value


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="brown")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--starts", nargs="*", default=list(STARTS), choices=list(STARTS),
                    help="metrics evaluated alone beside the searches (not candidates)")
    ap.add_argument("--base", default="{}", help="JSON of PGConfig overrides shared by every variant")
    ap.add_argument("--granularity", default="auto")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--val-windows", type=int, default=None, help="validation windows (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--deadline-s", type=float, default=None)
    ap.add_argument("--name", default="pg_tuning")
    return ap.parse_args(argv)


def variant_config(base: dict, overrides: dict) -> dict:
    """The PGConfig fields of a variant: scaled knobs multiply the base, others replace it."""
    from pruner.pg.config import PGConfig

    full = dataclasses.asdict(PGConfig(**base))
    for key, value in overrides.items():
        if key in SCALED:
            full[key] = type(full[key])(full[key] * value) if key == "steps" else full[key] * value
        else:
            full[key] = value
    return full


def load_state(model: str, device: str, workers: int) -> dict:
    from pruner.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, workers)))
    return {"loaded": load_model(model, device=device, dtype="fp32"), "windows": None}


def do_job(state, job: dict) -> dict:
    from pruner.config import PruneConfig
    from pruner.evaluate import perplexity
    from pruner.pg.config import PGConfig
    from pruner.prune import prune
    from pruner.windows import corpus_windows

    loaded = state["loaded"]
    if state["windows"] is None:
        state["windows"] = corpus_windows(loaded.tokenizer, job["data"], "validation", 128, job["val_windows"])
    t0 = time.perf_counter()
    search = "pg" in job
    config = PruneConfig(method="pg" if search else job["variant"], ratio=job["ratio"], granularity=job["granularity"],
                         data=job["data"], seed=job["seed"], calib_windows=job["calib_windows"],
                         pg=PGConfig(**job["pg"]) if search else PGConfig())
    pruned, _, report = prune(loaded, config)
    row = {k: job[k] for k in ("variant", "ratio", "seed")} | {
        "val_ppl@128": perplexity(pruned, state["windows"], batch_size=64)["ppl"],
        "achieved_ratio": report["achieved_ratio"], "wall_time_s": time.perf_counter() - t0,
        "best_step": report["pg"]["best_step"] if search else None,
        "search_curve": report["pg"]["validation_ppl"] if search else None}
    print_row({k: v for k, v in row.items() if k != "search_curve"})
    return row


def summarize(rows, args) -> tuple[list[dict], str | None]:
    """Mean and std per (variant or start, ratio); the chosen variant has the lowest mean log
    validation perplexity over the ratios (starts are shown, never chosen)."""
    table = []
    for variant in [*args.variants, *args.starts]:
        for ratio in args.ratios:
            vals = [r["val_ppl@128"] for r in rows if r["variant"] == variant and r["ratio"] == ratio]
            if vals:
                mean, std = mean_std(vals)
                table.append({"variant": variant, "ratio": ratio, "seeds": len(vals), "val_ppl@128": mean,
                              "std": std, "log_mean": sum(math.log(v) for v in vals) / len(vals)})
    scores = {}
    for variant in args.variants:
        logs = [e["log_mean"] for e in table if e["variant"] == variant]
        if len(logs) == len(args.ratios):
            scores[variant] = sum(logs) / len(logs)
    return table, (min(scores, key=scores.get) if scores else None)


def main(argv=None) -> None:
    args = parse_args(argv)
    base = json.loads(args.base)
    configs = {v: variant_config(base, VARIANTS[v]) for v in args.variants}
    common = {"data": args.data, "granularity": args.granularity, "calib_windows": args.calib_windows,
              "val_windows": args.val_windows}
    jobs = [{**common, "variant": v, "ratio": r, "seed": s, "pg": configs[v]}
            for s in args.seeds for r in args.ratios for v in args.variants]
    starts = {m: ({"pg": {**variant_config(base, {}), **START_OF_SEARCH}} if m == "search start" else {})
              for m in args.starts}
    jobs += [{**common, "variant": m, "ratio": r, "seed": s, **starts[m]}
             for s in args.seeds for r in args.ratios for m in args.starts]

    def save(rows):
        table, chosen = summarize(rows, args)
        shown = [{**e, "variant": e["variant"] + (" (no search)" if e["variant"] in args.starts else ""),
                  "val_ppl@128": f"{e['val_ppl@128']:.1f} ± {e['std']:.1f}"} for e in table]
        md = (markdown_table(shown, ["variant", "ratio", "seeds", "val_ppl@128"])
              + f"\n\nChosen (lowest mean log validation perplexity over the ratios): **{chosen}** = "
              f"`{json.dumps(VARIANTS.get(chosen, {}))}` on top of the base `{json.dumps(base)}`. "
              "Steps and lr of a variant multiply the base values.")
        write_results(args.name, {"rows": rows, "summary": table, "chosen": chosen,
                                  "chosen_config": configs.get(chosen), "base": base, "variants": VARIANTS,
                                  "args": vars(args)}, md)

    rows = run_jobs(jobs, functools.partial(load_state, args.model, args.device, args.workers), do_job, args.workers,
                    save, args.deadline_s)
    save(rows)
    print(summarize(rows, args)[1])


if __name__ == "__main__":
    main()
