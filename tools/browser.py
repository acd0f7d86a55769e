"""The studio in a real browser: `streamlit run app.py` on a free localhost port, Debian's headless Chromium
driven by playwright, and a watch that checks that the page asks nothing of any other host and reports no
error. Used by the browser tests (tests/e2e) and by bench/studio_latency.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HEALTH_TIMEOUT_S = 120
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
LOCAL_SCHEMES = {"data", "blob"}  # inlined content, no request on the wire

# Console errors that say nothing about the studio; each one ignored is printed.
IGNORED_CONSOLE = [
    # opened on a page path (/prune), Streamlit first probes /prune/_stcore/... for its base URL, then /
    re.compile(r"404 .*\(https?://[^/]+/[^ ]+/_stcore/(host-config|health)\)"),
    # Streamlit's websocket reconnecting
    re.compile(r"websocket.*(closed|reconnect|disconnect)|(closed|reconnect|disconnect).*websocket", re.I),
]


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
    with studio_process(runs_dir, log_path) as (url, _):
        yield url


@contextlib.contextmanager
def studio_process(runs_dir: Path, log_path: Path, env: dict | None = None):
    """Like `serve_studio`, with more environment variables `env`; yields (base URL, the server's Popen)."""
    port = _free_port()
    env = dict(os.environ, PRUNER_RUNS_DIR=str(runs_dir), HF_HUB_OFFLINE="1", **(env or {}))
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
        yield url, proc
    finally:
        _stop(proc)
        print(f"\nstreamlit log tail ({log_path}):\n{Path(log_path).read_text(errors='replace')[-2000:]}")


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def set_number(page, label: str, value) -> None:
    """Type `value` into the number input labelled `label`, submit it, and wait until it shows."""
    from playwright.sync_api import expect

    field = page.get_by_label(label, exact=True)
    field.wait_for(state="attached")
    folded = field.locator("xpath=ancestor::details[1]")  # inside an st.expander: open it first
    if folded.count() and folded.get_attribute("open") is None:
        folded.locator("xpath=./summary").click()
    expect(field).to_be_visible()
    field.fill(str(value))
    field.press("Enter")
    expect(field).to_have_value(str(value))


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the selectbox labelled `label`, and wait until the app has taken it."""
    from playwright.sync_api import expect

    box = page.get_by_label(label, exact=True)
    box.click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)
    wait_for_app_idle(page)


def toggle(page, label: str) -> None:
    """Flip a checkbox, by its label."""
    from playwright.sync_api import expect

    box = page.get_by_role("checkbox", name=label, exact=True)
    was = box.is_checked()
    page.get_by_text(label, exact=True).click()
    expect(box).to_be_checked(checked=not was)
    wait_for_app_idle(page)


def wait_for_app_idle(page, timeout: float = 60) -> None:
    """Wait until Streamlit's "Running..." status widget is gone (the script run ended)."""
    from playwright.sync_api import expect

    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout * 1000)
    expect(page.locator('[data-testid="stStatusWidget"]')).to_have_count(0, timeout=timeout * 1000)


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or parts.hostname in LOCAL_HOSTS


class PageWatch:
    """What a page did: every request it made and every error it reported (console.error, uncaught
    exceptions), each with the page's URL at the time. `assert_clean` fails on a request to any host
    but this machine, and on any error but the harmless ones in IGNORED_CONSOLE (printed)."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []  # (page URL, request URL)
        self.errors: list[str] = []

    def attach(self, page) -> None:
        page.on("request", lambda req: self.requests.append((page.url, req.url)))
        page.on("console", lambda msg: msg.type == "error" and self._error(
            f"console.error: {msg.text} ({msg.location.get('url', '')}) on {page.url}"))
        page.on("pageerror", lambda exc: self._error(f"pageerror: {exc} on {page.url}"))

    def _error(self, text: str) -> None:
        if any(p.search(text) for p in IGNORED_CONSOLE):
            print(f"ignored console message: {text}")
        else:
            self.errors.append(text)

    def external_requests(self) -> list[str]:
        return [f"{url} (on {on})" for on, url in self.requests if not is_local(url)]

    def assert_clean(self) -> None:
        external, errors = self.external_requests(), self.errors
        assert not external and not errors, (
            "the studio must stay on this machine, without console errors:\n"
            + "".join(f"request off localhost: {u}\n" for u in external)
            + "".join(f"{e}\n" for e in errors))
