"""Browser-test fixtures over tools/browser.py: the studio served by `streamlit run app.py` on a free port,
driven by a real headless Chromium through playwright, each page watched for requests off localhost and
console errors. Without Chromium or playwright the tests skip, except under CI=true, where they fail.
Screenshots go to `<repo>/screenshots/` (git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.browser import CHROMIUM, REPO_ROOT, PageWatch, StudioDidNotStart, launch_chromium, serve_studio

SCREENSHOTS = REPO_ROOT / "screenshots"


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


@pytest.fixture
def studio_url(tmp_path):
    """Base URL of a fresh studio (a new process, ~3 s) whose runs live in a temporary directory.

    One process per test keeps tests independent of each other's order: Streamlit keeps process-wide state
    (st.cache_resource, the run manager)."""
    require_browser()
    try:
        with serve_studio(tmp_path / "runs", tmp_path / "streamlit.log") as url:
            yield url
    except StudioDidNotStart as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def watch() -> PageWatch:
    """The requests and errors of the test's page; the page fixture checks them at the end of every test,
    and a test may check them sooner (after each page it opens)."""
    return PageWatch()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def page(browser, studio_url, watch, request):
    """A fresh page (1400x1000) on the studio, watched: once the test has passed, it fails if the page
    requested anything off localhost or reported an error. A failing test leaves a screenshot."""
    context = browser.new_context(base_url=studio_url, viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    watch.attach(pg)
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        try:
            save_screenshot(pg, f"FAILED-{request.node.name}")
        except Exception as exc:  # a dead page must not hide the test's own failure
            print(f"no failure screenshot: {exc}")
    context.close()
    if rep is not None and rep.passed:
        watch.assert_clean()


def save_screenshot(pg, name: str) -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def screenshot(page):
    """screenshot("name") writes screenshots/name.png of the current page."""
    return lambda name: save_screenshot(page, name)
