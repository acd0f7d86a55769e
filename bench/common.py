"""Shared helpers of the benchmark scripts: environment facts, JSON + Markdown results."""

from __future__ import annotations

import json
import os
import platform
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
    return " ".join([Path(sys.executable).name if "python" in sys.executable else sys.executable, "-m",
                     "bench." + Path(sys.argv[0]).stem, *sys.argv[1:]])


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
