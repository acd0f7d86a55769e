"""Steps to quality of the studio's default search: the validation perplexity of the current hard
mask against steps and seconds.

The run is the Prune page's default (PruneConfig(method="pg", calib_windows=32) with every
PGConfig default: ratio 0.3, metric init, bias compensation, gathered forwards; --set changes a
knob), its hard mask evaluated every --eval-every steps (and before the first step) on the
validation windows the studio evaluates (`PGRun.evaluate_hard_mask`, validation split only; the
test split is not read). Seconds are the search's own step times (evaluations left out) and the
wall clock with them.

    .venv/bin/python -m bench.pg_convergence --threads 1 --eval-every 20
    .venv/bin/python -m bench.pg_convergence --set batch_size=1 --set sampling=antithetic --name pg_conv_anti
    .venv/bin/python -m bench.pg_convergence --compare pg_conv_moving pg_conv_anti --name pg_convergence_variants

--compare reads earlier results of this script (bench/results/NAME.json) and writes one table of
their curves side by side: perplexity against steps, and the search seconds each reached it in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from bench.common import RESULTS, markdown_table, write_results
from pruner.config import PruneConfig
from pruner.methods.pg import build_run
from pruner.models import load_model
from pruner.pg.config import PGConfig
from pruner.space import PruningSpace

WITHIN = 0.10  # issue target: within 10% of the reference run's validation perplexity


def first_within(rows: list[dict], reference: float, within: float) -> dict | None:
    """The first evaluation whose perplexity is at most (1 + within) x reference."""
    return next((r for r in rows if r["ppl"] <= (1.0 + within) * reference), None)


def knob_values(assignments: list[str]) -> dict:
    """{"batch_size": 1, ...} from ["batch_size=1", ...], each value typed as its PGConfig default."""
    defaults = dataclasses.asdict(PGConfig())
    values = {}
    for text in assignments:
        name, _, value = text.partition("=")
        if name not in defaults:
            raise SystemExit(f"--set {text}: no policy-gradient knob {name!r}")
        kind = type(defaults[name])
        values[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return values


def compare(names: list[str], out: str) -> None:
    """One table of several runs' validation curves (rows: evaluated steps; per run its perplexity and
    the search seconds at that step), with each run's settings that differ from the studio's."""
    runs = {n: json.loads((RESULTS / f"{n}.json").read_text()) for n in names}
    steps = sorted({r["step"] for run in runs.values() for r in run["rows"]})
    rows = []
    for step in steps:
        row = {"step": step}
        for n, run in runs.items():
            hit = next((r for r in run["rows"] if r["step"] == step), None)
            row[f"{n} ppl"] = hit["ppl"] if hit else ""
            row[f"{n} s"] = hit["search_s"] if hit else ""
        rows.append(row)
    columns = ["step"] + [f"{n} {k}" for n in runs for k in ("ppl", "s")]
    formats = {c: "{:.1f}" for c in columns[1:]}
    lines = [f"- `{n}`: {', '.join(run['args'].get('set') or []) or 'the studio defaults'}; {run['steps_done']} of "
             f"{run['pg']['steps']} steps, start {run['rows'][0]['ppl']:.2f}, best {min(r['ppl'] for r in run['rows']):.2f}, "
             f"last {run['final_ppl']:.2f}; load average before/after {run['load_average']['before'][0]:.1f}/"
             f"{run['load_average']['after'][0]:.1f}; `{run['command']}`" for n, run in runs.items()]
    first = next(iter(runs.values()))
    md = "\n".join([
        f"### Steps to quality of policy-gradient settings ({first['args']['model']}, {first['device']}, ratio "
        f"{PruneConfig().ratio}, validation perplexity of the hard mask on "
        f"{first['pg']['eval_windows']} windows)",
        "",
        "`ppl`: validation perplexity of the current hard mask at that step (step 0: the initialisation); "
        "`s`: the search's own seconds to that step (evaluations left out). Every choice here reads the "
        "validation split only.",
        "",
        markdown_table(rows, columns, formats),
        "",
        *lines,
    ])
    write_results(out, {"runs": names, "rows": rows}, md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="brown")
    ap.add_argument("--steps", type=int, default=PGConfig().steps, help="search steps (the studio's default)")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop the search after this much wall time (the curve so far is written)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                    help="a policy-gradient knob changed from the studio's default (repeatable), e.g. batch_size=1")
    ap.add_argument("--compare", nargs="+", default=None, metavar="RESULT",
                    help="instead of a run: one table of these earlier results (bench/results/RESULT.json)")
    ap.add_argument("--name", default="pg_convergence")
    args = ap.parse_args()
    if args.compare:
        return compare(args.compare, args.name)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device)
    base = PruneConfig(method="pg", calib_windows=32)  # the Prune page's defaults
    changed = knob_values(args.set)
    config = dataclasses.replace(base, pg=dataclasses.replace(base.pg, steps=args.steps, eval_every=args.eval_every,
                                                              checkpoint_every=10**6, **changed)).validate()
    space = PruningSpace.from_model(loaded.model, loaded.adapter, config.granularity)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    run = build_run(loaded, space, config)
    setup_s = time.perf_counter() - t0
    rows = [{"step": 0, "ppl": run.evaluate_hard_mask(), "search_s": 0.0, "wall_s": 0.0}]
    search = {"s": 0.0}
    t1 = time.perf_counter()

    def progress(record: dict) -> None:
        search["s"] += record["step_time_s"]
        evals = run.history.evals
        if evals and evals[-1]["step"] == record["step"]:
            rows.append({"step": record["step"], "ppl": evals[-1]["ppl"], "search_s": search["s"],
                         "wall_s": time.perf_counter() - t1, "loss_mean": record["loss_mean"],
                         "expected_kept": record["expected_kept_fraction"]})
            print(rows[-1], flush=True)
        if args.max_minutes is not None and time.perf_counter() - t1 > 60 * args.max_minutes:
            if not evals or evals[-1]["step"] != record["step"]:  # end on an evaluated step
                rows.append({"step": record["step"], "ppl": run.evaluate_hard_mask(), "search_s": search["s"],
                             "wall_s": time.perf_counter() - t1, "loss_mean": record["loss_mean"],
                             "expected_kept": record["expected_kept_fraction"]})
            run.stop()

    run.run(progress)
    stopped = run.step < config.pg.steps
    load = {"before": load_before, "after": os.getloadavg()}
    final = rows[-1]["ppl"]
    for r in rows:
        r["over_final"] = r["ppl"] / final
    hit = first_within(rows, final, WITHIN)
    md = "\n".join([
        f"### Steps to quality of the studio's default search ({args.model}, {loaded.device}, ratio {config.ratio}, "
        f"K={config.pg.samples}, B={config.pg.batch_size} x {config.pg.seqlen}, init {config.pg.init}, "
        f"{config.pg.forward_mode} forwards, sampling {config.pg.sampling}, baseline {config.pg.baseline}, "
        f"lr {config.pg.lr:g}{', changed: ' + ', '.join(args.set) if args.set else ''})",
        "",
        f"Validation perplexity of the current hard mask on {len(run.valid)} validation windows of "
        f"{config.pg.seqlen} tokens, every {args.eval_every} steps. `search_s`: the steps' own seconds; "
        f"`wall_s`: with the evaluations. Setup (tokens, calibration, init scores) {setup_s:.1f} s.",
        "",
        markdown_table(rows, ["step", "ppl", "over_final", "search_s", "wall_s"],
                       {"ppl": "{:.3f}", "over_final": "{:.3f}", "search_s": "{:.1f}", "wall_s": "{:.1f}"}),
        "",
        (f"- Stopped after {run.step} of {config.pg.steps} steps (--max-minutes {args.max_minutes}): the last "
         "row is the hard mask at that step, not the end of the schedule." if stopped else
         f"- The whole schedule of {config.pg.steps} steps ran."),
        (f"- Within {WITHIN:.0%} of this run's last validation perplexity ({final:.3f} at step {rows[-1]['step']}) "
         f"from step {hit['step']} ({hit['search_s']:.1f} s of search)." if hit else "- never within 10% of the last evaluation"),
        f"- Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load['before'])}, after "
        f"{tuple(round(x, 2) for x in load['after'])}: a shared machine; seconds vary with its load.",
    ])
    write_results(args.name, {"args": vars(args), "pg": dataclasses.asdict(config.pg), "device": str(loaded.device), "setup_s": setup_s, "rows": rows,
                              "final_ppl": final, "steps_done": run.step, "stopped": stopped, "first_within_10pct": hit, "load_average": load}, md)
    print(md)


if __name__ == "__main__":
    main()
