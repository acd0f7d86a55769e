"""Serve the studio on a free localhost port and open it in Debian's headless Chromium (playwright).
Used by the browser tests and by bench/studio_latency.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HEALTH_TIMEOUT_S = 120


class StudioDidNotStart(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.read().decode().strip() == "ok"
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue



@contextlib.contextmanager
def serve_studio(runs_dir: Path, log_path: Path):
    """`streamlit run app.py` with its runs in `runs_dir`; yields the base URL once healthy."""
    port = _free_port()
    env = dict(os.environ, PRUNER_RUNS_DIR=str(runs_dir), HF_HUB_OFFLINE="1")
    streamlit = Path(sys.executable).with_name("streamlit")
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(streamlit), "run", "app.py", "--server.headless", "true", "--server.address", "localhost",
             "--server.port", str(port), "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else "never became healthy"
                raise StudioDidNotStart(f"streamlit {why}:\n{Path(log_path).read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        print(f"\nstreamlit log tail ({log_path}):\n{Path(log_path).read_text(errors='replace')[-2000:]}")


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def set_number(page, label: str, value) -> None:
    """Type `value` into the number input labelled `label`, submit it, and wait until it shows."""
    from playwright.sync_api import expect

    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Enter")
    expect(field).to_have_value(str(value))
