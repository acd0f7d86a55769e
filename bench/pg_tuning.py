"""What the policy-gradient search needs on a small model: a grid over its knobs at one ratio.

Each row is one PG run (from the given init) and the test perplexity of its sliced model,
beside the metric baselines at the same ratio.

    .venv/bin/python -m bench.pg_tuning --ratio 0.3 --grid '{"lr": [0.02, 0.1], "steps": [500]}'
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

from bench.common import markdown_table, write_results
from bench.quality import METRICS, evaluate
from pruner.corpus import load_text
from pruner.models import load_model
from pruner.config import PruneConfig
from pruner.pg.config import PGConfig
from pruner.prune import prune
from pruner.windows import tokenize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="brown")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--granularity", default="kv_group")
    ap.add_argument("--base", default="{}", help="JSON of PGConfig fields shared by all runs")
    ap.add_argument("--grid", default='{"lr": [0.02, 0.1]}', help="JSON: PGConfig field -> list of values")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--name", default="pg_tuning")
    args = ap.parse_args()

    loaded = load_model(args.model, device=args.device, dtype="fp32")
    test_ids = tokenize(loaded.tokenizer, load_text(args.data, "test"))
    max_windows = {args.seqlen: args.max_windows} if args.max_windows else {}
    base = dict(ratio=args.ratio, granularity=args.granularity, data=args.data)
    rows = []
    for method in METRICS:
        t0 = time.perf_counter()
        pruned, _, report = prune(loaded, PruneConfig(method=method, **base))
        rows.append({"run": method, "wall_time_s": time.perf_counter() - t0,
                     **evaluate(pruned, test_ids, [args.seqlen], max_windows)})
        print(rows[-1], flush=True)
    grid = json.loads(args.grid)
    for values in itertools.product(*grid.values()):
        knobs = {**json.loads(args.base), **dict(zip(grid, values))}
        pg = PGConfig(**knobs)
        t0 = time.perf_counter()
        pruned, _, report = prune(loaded, PruneConfig(method="pg", pg=pg, **base))
        rows.append({"run": "pg " + json.dumps(knobs), "wall_time_s": time.perf_counter() - t0,
                     "final_val_ppl": report["pg"]["validation_ppl"][-1]["ppl"],
                     **evaluate(pruned, test_ids, [args.seqlen], max_windows)})
        print(rows[-1], flush=True)
    key = f"ppl@{args.seqlen}"
    md = (f"### Policy-gradient settings at ratio {args.ratio} ({args.model}, {args.data} test, seqlen {args.seqlen})\n\n"
          + markdown_table(rows, ["run", key, "final_val_ppl", "wall_time_s"],
                           {key: "{:.2f}", "final_val_ppl": "{:.2f}", "wall_time_s": "{:.1f}"}))
    write_results(args.name, {"rows": rows, "args": vars(args),
                              "pg_defaults": dataclasses.asdict(PGConfig())}, md)


if __name__ == "__main__":
    main()
