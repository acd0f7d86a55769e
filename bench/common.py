"""Shared helpers of the benchmark scripts: environment facts, JSON + Markdown results."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """What the numbers were measured on."""
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def command() -> str:
    """The command line that produced a result, quoted so it can be pasted back into a shell."""
    return shlex.join(["python", "-m", "bench." + Path(sys.argv[0]).stem, *sys.argv[1:]])


def markdown_table(rows: list[dict], columns: list[str], fmt: dict | None = None) -> str:
    fmt = fmt or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(fmt[c].format(v) if c in fmt and isinstance(v, (int, float)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """bench/results/NAME.json (payload + environment + command) and NAME.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"command": command(), "environment": environment(), **payload}
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=float))
    md_path.write_text(f"{markdown}\n\nCommand: `{payload['command']}`  \n"
                       f"Environment: {json.dumps(payload['environment'])}\n")
    return json_path, md_path


def _worker(init, work, jobs, results) -> None:
    """A pool process: `init()` once (e.g. load the model), then `work(state, job)` for each job."""
    state = init()
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            results.put(("row", work(state, job)))
        except Exception as exc:  # noqa: BLE001 - one failed job is reported, the others go on
            import traceback

            results.put(("error", {"job": job, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}))


def run_jobs(jobs: list[dict], init, work, workers: int = 1, on_row=None, deadline_s: float | None = None) -> list[dict]:
    """Run `work(state, job)` for every job, in `workers` processes (spawned; each runs `init()`
    once) or inline when workers == 1. `on_row(rows)` after each result (to save partial results).
    Jobs not started before `deadline_s` seconds are skipped (and named in the log)."""
    rows: list[dict] = []
    start = time.time()
    if workers <= 1:
        state = init()
        for job in jobs:
            if deadline_s is not None and time.time() - start > deadline_s:
                print(f"deadline: skipped {job}", flush=True)
                continue
            rows.append(work(state, job))
            if on_row:
                on_row(rows)
        return rows
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(init, work, queue, results), daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    pending = list(jobs)
    in_flight = 0
    for _ in range(min(workers, len(pending))):
        queue.put(pending.pop(0))
        in_flight += 1
    import queue as queues

    while in_flight:
        try:
            kind, item = results.get(timeout=5)
        except queues.Empty:
            if not any(p.is_alive() for p in procs):
                print("every worker died: giving up on the remaining jobs", flush=True)
                break
            continue
        in_flight -= 1
        if kind == "row":
            rows.append(item)
            if on_row:
                on_row(rows)
        else:
            print(f"job failed: {item['job']}: {item['error']}\n{item['trace']}", flush=True)
        if pending and (deadline_s is None or time.time() - start <= deadline_s):
            queue.put(pending.pop(0))
            in_flight += 1
    for job in pending:
        print(f"deadline: skipped {job}", flush=True)
    for _ in procs:
        queue.put(None)
    for p in procs:
        p.join(timeout=30)
    return rows


def print_row(row: dict) -> None:
    """One result row as a JSON line of its own: progress bars end their lines with carriage returns
    on stderr, so the row starts with a newline to be found by `grep '^{'` in a combined log."""
    print("\n" + json.dumps(row), flush=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


# Shapes of real models, for timing on random weights built from a config (no download): the time
# of a forward does not depend on the weights' values.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
}


def random_llama(shape: str, device, dtype, max_positions: int = 4096):
    """A Llama model of one of SHAPES with random weights (seed 0), in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_positions)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()

