"""Browser-test harness: the studio served by `streamlit run app.py` on a free port, driven by a real
headless Chromium through playwright. Without Chromium or playwright the tests skip, except under CI=true,
where they fail. Screenshots go to `<repo>/screenshots/` (git-ignored)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO_ROOT / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HEALTH_TIMEOUT_S = 120

# Console messages that say nothing about the studio itself; each one ignored is printed.
IGNORED_CONSOLE = [
    # the favicon; a ":material/...:" page icon is fetched from Google's font CDN, unreachable offline
    re.compile(r"favicon|fonts\.gstatic\.com/s/i/short-term/release/materialsymbols", re.I),
    # opened on a page path (/prune), Streamlit first probes /prune/_stcore/... for its base URL, then /
    re.compile(r"404 .*\(https?://[^/]+/[^ ]+/_stcore/(host-config|health)\)"),
    # Streamlit's websocket reconnecting
    re.compile(r"websocket.*(closed|reconnect|disconnect)|(closed|reconnect|disconnect).*websocket", re.I),
]


def require_browser() -> None:
    """Skip (fail under CI=true) when the browser or its driver is missing."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium, or `make browser`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -r requirements.txt)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


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


@pytest.fixture
def studio_url(tmp_path):
    """Base URL of a fresh studio (a new process, ~3 s) whose runs live in a temporary directory.

    One process per test keeps tests independent of each other's order: Streamlit keeps process-wide state
    (st.cache_resource, the run manager, and whether the first page opened was a deep link)."""
    require_browser()
    tmp = tmp_path
    port = _free_port()
    env = dict(os.environ, PRUNER_RUNS_DIR=str(tmp / "runs"), HF_HUB_OFFLINE="1")
    log_path = tmp / "streamlit.log"
    streamlit = Path(sys.executable).with_name("streamlit")
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
                pytest.fail(f"streamlit {why}:\n{log_path.read_text(errors='replace')[-4000:]}", pytrace=False)
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        print(f"\nstreamlit log tail ({log_path}):\n{log_path.read_text(errors='replace')[-2000:]}")


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


@pytest.fixture(scope="session")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Console:
    """Errors the page reported: console.error messages and uncaught exceptions."""

    def __init__(self):
        self.errors: list[str] = []

    def attach(self, page) -> None:
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(
            f"console.error: {msg.text} ({msg.location.get('url', '')}) on {page.url}"))
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc} on {page.url}"))

    def assert_clean(self) -> None:
        """Fail on any error except favicon 404s and Streamlit's websocket reconnect noise (printed)."""
        real = []
        for e in self.errors:
            if any(p.search(e) for p in IGNORED_CONSOLE):
                print(f"ignored console message: {e}")
            else:
                real.append(e)
        assert not real, "console errors:\n" + "\n".join(real)


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def page(browser, studio_url, console, request):
    """A fresh page (1400x1000) on the studio, its console collected; a failing test leaves a screenshot."""
    context = browser.new_context(base_url=studio_url, viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    console.attach(pg)
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        try:
            save_screenshot(pg, f"FAILED-{request.node.name}")
        except Exception as exc:  # a dead page must not hide the test's own failure
            print(f"no failure screenshot: {exc}")
    context.close()


def save_screenshot(pg, name: str) -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def screenshot(page):
    """screenshot("name") writes screenshots/name.png of the current page."""
    return lambda name: save_screenshot(page, name)
