"""Quality of every structured method under the project's protocol.

Protocol (README "How we measure"): calibration and search read the train split; every choice is
made on the validation split (here: which metric initialises `pg-init` at each ratio, the metric
with the lowest mean validation perplexity); the test split is read only for the final numbers,
on all of it (Brown test: 1035 windows of 128 tokens, 129 of 1024), the same windows for every
method; every method that draws calibration data runs with several seeds (mean and sample std).
Two domains: "brown" (calibrate and search on Brown train, evaluate on Brown test) and
"cross-genre" (calibrate and search on the informative genres' train documents, evaluate on the
imaginative genres' test documents, never seen: see pruner.corpus.BROWN_GENRES).

    python -m bench.quality --methods flap taylor pg-init pg-random --workers 3 \\
        --pg-from bench/results/pg_tuning_gpu.json \\
        --reuse bench/results/quality_gpu_metrics.json bench/results/quality_gpu_taylor.json --name quality_gpu

Jobs run in `--workers` processes (each loads the model once): on one GPU a 135M model leaves
most of the device idle, so a few searches share it. Three at a time on an H200 took about 25 s each
for 300 steps of 8 sequences (one alone: 0.053 s a step); twelve timing processes side by side, with
no thread limit, slowed each step about 90 times. `--reuse` takes the rows of the deterministic jobs
(dense and the metrics, per method, ratio, seed and domain) from earlier result files run with the
same settings, instead of running them again: they reproduce to the last digit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import torch

from bench.common import markdown_table, mean_std, print_row, run_jobs, write_results

METRICS = ("magnitude", "wanda-sp", "flap", "taylor")
DETERMINISTIC = {"magnitude"}
DOMAINS = {"brown": ("brown", "brown"), "cross-genre": ("brown:informative", "brown:imaginative")}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--max-windows", type=int, nargs="+", default=None,
                    help="per seqlen, the number of test windows (default: the whole split)")
    ap.add_argument("--val-windows", type=int, default=128, help="validation windows of 128 tokens for choices")
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    ap.add_argument("--methods", nargs="+", default=[*METRICS, "pg-random", "pg-init"])
    ap.add_argument("--granularity", default="auto")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--pg", default="{}", help="JSON of PGConfig overrides, e.g. '{\"steps\": 1000}'")
    ap.add_argument("--pg-from", default=None, metavar="JSON",
                    help="start from the setting a bench.pg_tuning result chose on validation (--pg on top)")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="JSON",
                    help="earlier bench.quality results whose dense and metric rows stand in for those jobs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--deadline-s", type=float, default=None, help="start no job after this many seconds")
    ap.add_argument("--name", default="quality")
    return ap.parse_args(argv)


# ---- one job, in a worker ---------------------------------------------------------------------

def load_state(model: str, device: str, workers: int) -> dict:
    """A worker's state: the model (fp32: evaluations are exact; searches autocast to bf16 on CUDA)
    and its cache of evaluation windows."""
    from pruner.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, workers)))
    return {"loaded": load_model(model, device=device, dtype="fp32"), "windows": {}}


def windows_of(state, corpus: str, split: str, seqlen: int, limit: int | None):
    from pruner.windows import corpus_windows

    key = (corpus, split, seqlen, limit)
    if key not in state["windows"]:
        state["windows"][key] = corpus_windows(state["loaded"].tokenizer, corpus, split, seqlen, limit)
    return state["windows"][key]


def evaluate(state, model, corpus: str, split: str, seqlens, limits) -> dict:
    from pruner.evaluate import perplexity

    return {f"ppl@{s}": perplexity(model, windows_of(state, corpus, split, s, limits.get(s)),
                                   batch_size=max(1, 8192 // s))["ppl"] for s in seqlens}


def do_job(state, job: dict) -> dict:
    """Prune with one (method, ratio, seed, domain), then validation and test perplexity."""
    from pruner.config import PruneConfig
    from pruner.pg.config import PGConfig
    from pruner.prune import prune

    loaded = state["loaded"]
    calib, evaluation = DOMAINS[job["domain"]]
    t0 = time.perf_counter()
    if job["method"] == "dense":
        model, report = loaded.model, {"achieved_ratio": 0.0}
    else:
        pg = PGConfig(**job.get("pg", {}))
        config = PruneConfig(method=job["base_method"], ratio=job["ratio"], granularity=job["granularity"],
                             data=calib, seed=job["seed"], calib_windows=job["calib_windows"], pg=pg)
        model, _, report = prune(loaded, config)
    wall = time.perf_counter() - t0
    row = {k: job[k] for k in ("method", "ratio", "seed", "domain")} | {
        "achieved_ratio": report["achieved_ratio"], "wall_time_s": wall,
        "val_ppl@128": evaluate(state, model, calib, "validation", [128], {128: job["val_windows"]})["ppl@128"],
        **evaluate(state, model, evaluation, "test", job["seqlens"], job["limits"])}
    if "pg" in report:
        row["pg_validation_ppl"] = report["pg"]["validation_ppl"]
    if job.get("init_metric"):
        row["init_metric"] = job["init_metric"]
    print_row({k: v for k, v in row.items() if k != "pg_validation_ppl"})
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


# ---- the plan -----------------------------------------------------------------------------------

def jobs_for(args, methods, pg: dict, init_metric: dict | None = None) -> list[dict]:
    common = {"granularity": args.granularity, "calib_windows": args.calib_windows, "seqlens": args.seqlens,
              "limits": dict(zip(args.seqlens, args.max_windows)) if args.max_windows else {},
              "val_windows": args.val_windows}
    jobs = []
    for domain in args.domains:
        for method in methods:
            if method == "dense":
                jobs.append({**common, "method": "dense", "ratio": 0.0, "seed": 0, "domain": domain})
                continue
            for ratio in args.ratios:
                for seed in ([0] if method in DETERMINISTIC else args.seeds):
                    job = {**common, "method": method, "ratio": ratio, "seed": seed, "domain": domain,
                           "base_method": "pg" if method.startswith("pg") else method}
                    if method == "pg-random":
                        job["pg"] = pg | {"init": "random"}
                    elif method == "pg-init":
                        job["init_metric"] = init_metric[(domain, ratio)]
                        job["pg"] = pg | {"init_metric": job["init_metric"]}
                    jobs.append(job)
    return jobs


SAME_SETTINGS = ("model", "granularity", "calib_windows", "seqlens", "max_windows", "val_windows")


def reused_rows(args) -> dict[tuple, dict]:
    """Dense and metric rows of earlier result files run with the same settings (SAME_SETTINGS), by
    job_key; a file run with other settings is refused, since its rows would not be comparable."""
    rows = {}
    for path in args.reuse:
        earlier = json.loads(Path(path).read_text())
        differ = [k for k in SAME_SETTINGS if earlier["args"].get(k) != getattr(args, k)]
        if differ:
            raise SystemExit(f"--reuse {path}: run with other {', '.join(differ)}")
        for row in earlier["rows"]:
            if row["method"] == "dense" or row["method"] in METRICS:
                rows[job_key(row)] = row
    return rows


def job_key(job: dict) -> tuple:
    return job["method"], job["ratio"], job["seed"], job["domain"]


def best_metrics(rows, args) -> dict:
    """Per (domain, ratio): the metric with the lowest mean VALIDATION perplexity (the pg-init start)."""
    out = {}
    for domain in args.domains:
        for ratio in args.ratios:
            scores = {}
            for m in METRICS:
                vals = [r["val_ppl@128"] for r in rows if r["method"] == m and r["ratio"] == ratio and r["domain"] == domain]
                if vals:
                    scores[m] = sum(math.log(v) for v in vals) / len(vals)
            out[(domain, ratio)] = min(scores, key=scores.get) if scores else "flap"
    return out


def summarize(rows, args) -> list[dict]:
    """Mean and std over seeds per (domain, method, ratio)."""
    table = []
    keys = sorted({(r["domain"], r["method"], r["ratio"]) for r in rows},
                  key=lambda k: (args.domains.index(k[0]), k[2], order(k[1])))
    for domain, method, ratio in keys:
        group = [r for r in rows if (r["domain"], r["method"], r["ratio"]) == (domain, method, ratio)]
        entry = {"domain": domain, "method": method, "ratio": ratio, "seeds": len(group),
                 "achieved_ratio": sum(r["achieved_ratio"] for r in group) / len(group),
                 "wall_time_s": sum(r["wall_time_s"] for r in group) / len(group)}
        for key in ["val_ppl@128", *[f"ppl@{s}" for s in args.seqlens]]:
            mean, std = mean_std([r[key] for r in group])
            entry[key], entry[f"{key}_std"] = mean, std
        if group[0].get("init_metric"):
            entry["init_metric"] = ",".join(sorted({r["init_metric"] for r in group}))
        table.append(entry)
    return table


def order(method: str) -> int:
    names = ["dense", *METRICS, "pg-random", "pg-init"]
    return names.index(method) if method in names else len(names)


def markdown(table, args, pg: dict) -> str:
    parts = []
    for domain in args.domains:
        calib, evaluation = DOMAINS[domain]
        rows = []
        for e in (e for e in table if e["domain"] == domain):
            row = {"method": e["method"] + (f" ({e['init_metric']})" if e.get("init_metric") else ""),
                   "ratio": e["ratio"], "seeds": e["seeds"], "achieved": f"{e['achieved_ratio']:.3f}",
                   "validation@128": fmt(e, "val_ppl@128"), "wall s": f"{e['wall_time_s']:.1f}"}
            for s in args.seqlens:
                row[f"test@{s}"] = fmt(e, f"ppl@{s}")
            rows.append(row)
        columns = ["method", "ratio", "seeds", "achieved", *[f"test@{s}" for s in args.seqlens], "validation@128", "wall s"]
        parts.append(f"### {domain}: calibrate and search on `{calib}` train, test on `{evaluation}` test\n\n"
                     + markdown_table(rows, columns))
    return ("\n\n".join(parts) + f"\n\nPerplexity mean ± sample std over seeds (calibration windows and search "
            f"samples differ per seed). Test windows: {args.max_windows or 'all'} at seqlens {args.seqlens}. "
            f"pg-init starts from the metric with the lowest validation perplexity at its ratio (in brackets). "
            f"PG settings: `{json.dumps(pg)}`")


def fmt(entry: dict, key: str) -> str:
    mean, std = entry[key], entry[f"{key}_std"]
    digits = 1 if mean < 1000 else 0
    return f"{mean:,.{digits}f} ± {std:,.{digits}f}" if entry["seeds"] > 1 else f"{mean:,.{digits}f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    from pruner.pg.config import PGConfig

    chosen = (json.loads(Path(args.pg_from).read_text()).get("chosen_config") or {}) if args.pg_from else {}
    pg = dataclasses.asdict(PGConfig(**{**chosen, **json.loads(args.pg)}))
    init, rows, start = functools.partial(load_state, args.model, args.device, args.workers), [], time.time()

    def save(partial):
        table = summarize(rows + partial, args)
        write_results(args.name, {"rows": rows + partial, "summary": table, "pg": pg, "args": vars(args)},
                      markdown(table, args, pg))

    metrics = [m for m in args.methods if m in METRICS]
    planned, reused = jobs_for(args, ["dense", *metrics], pg), reused_rows(args)
    rows += [reused[job_key(job)] for job in planned if job_key(job) in reused]
    rows += run_jobs([job for job in planned if job_key(job) not in reused], init, do_job, args.workers, save,
                     args.deadline_s)
    choice = best_metrics(rows, args)
    remaining = None if args.deadline_s is None else max(0.0, args.deadline_s - (time.time() - start))
    searches = [m for m in args.methods if m.startswith("pg")]
    rows += run_jobs(jobs_for(args, searches, pg, choice), init, do_job, args.workers, save, remaining)
    save([])
    print(markdown(summarize(rows, args), args, pg))


if __name__ == "__main__":
    main()
