"""The studio in a real headless browser: every page renders without a console error or a request off
this machine (the page fixture checks both at the end of every test, the tests after each page too), and a
policy-gradient run is started, watched live, paused, resumed, stopped, reloaded, then compared, on a slow
CPU."""

from __future__ import annotations

import base64
import re

import pytest

from tools.browser import REPO_ROOT, set_number, wait_for_app_idle

STEP_RE = re.compile(r"step (\d+) / (\d+)")
SNAPSHOT_RE = re.compile(r"snapshot at step (\d+)")
MODEL_LOAD_S = 180  # the first model load on a 2-core CPU
FIRST_STEP_S = 480  # Start to the first PG step: calibration for the initialisation takes minutes on a busy CPU
STEP_S = 90  # a step or two later


def expect(locator):
    """playwright's expect, imported late: without playwright the harness skips (or fails under CI)."""
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def read_number(page, key: str, pattern: re.Pattern) -> int | None:
    """The first number `pattern` finds in the container with key `key`, or None (absent, or mid-rerun)."""
    from playwright.sync_api import Error

    loc = page.locator(f".st-key-{key}").first
    try:
        if not loc.count():
            return None
        match = pattern.search(loc.inner_text(timeout=2000))
    except Error:
        return None
    return int(match.group(1)) if match else None


def read_step(page) -> int | None:
    return read_number(page, "run_progress", STEP_RE)


# In the page: the first number `src` (a regex) finds in the text of `sel`, once above `previous`.
NUMBER_ABOVE_JS = """([sel, src, previous]) => {
    const el = document.querySelector(sel);
    const m = el && new RegExp(src).exec(el.innerText);
    return m && Number(m[1]) > previous ? {n: Number(m[1])} : null;
}"""


def wait_for_increase(page, key: str, pattern: re.Pattern, previous: int, timeout: float) -> int:
    """Wait until the first number `pattern` finds in the container with key `key` is above `previous`."""
    from playwright.sync_api import TimeoutError

    try:
        found = page.wait_for_function(NUMBER_ABOVE_JS, arg=[f".st-key-{key}", pattern.pattern, previous],
                                       polling=250, timeout=timeout * 1000)
    except TimeoutError:
        pytest.fail(f"{key}: expected a number above {previous} within {timeout:.0f}s, "
                    f"last saw {read_number(page, key, pattern)}")
    return found.json_value()["n"]


def wait_for_step_increase(page, previous: int, timeout: float) -> int:
    """Wait until "step N / M" in run_progress shows N > previous; return N."""
    return wait_for_increase(page, "run_progress", STEP_RE, previous, timeout)


def wait_for_snapshot_increase(page, previous: int, timeout: float) -> int:
    return wait_for_increase(page, "heads_heatmap", SNAPSHOT_RE, previous, timeout)


# Each page, by its path, a text it shows once drawn, and its icon.
PAGES = [("/", "Prunable units", "database"), ("/prune", "Press Start to prune", "content_cut"),
         ("/compare", "Prompt", "compare_arrows"), ("/whatif", "What-if", "tune"), ("/runs", "No runs yet", "history")]


def favicon_url(icon: str) -> str:
    """The data: URL Streamlit makes of app_pages/icons/<icon>.svg, app.py's page_icon."""
    svg = (REPO_ROOT / "app_pages" / "icons" / f"{icon}.svg").read_bytes()
    return "data:image/svg+xml;base64," + base64.b64encode(svg).decode()


def test_every_page_stays_on_this_machine(page, watch, screenshot):
    for path, text, icon in PAGES:
        page.goto(path)
        expect(page.locator('[data-testid="stMain"]')).to_contain_text(text, timeout=MODEL_LOAD_S * 1000)
        wait_for_app_idle(page, timeout=MODEL_LOAD_S)
        expect(page.locator("link[rel='shortcut icon']")).to_have_attribute("href", favicon_url(icon))
        watch.assert_clean()
    screenshot("app-start")
    # a quick run, shown on Prune: its status, progress and report
    page.goto("/prune")
    method = page.get_by_label("Method", exact=True)
    expect(method).to_have_value("pg", timeout=60_000)
    wait_for_app_idle(page)
    method.click()
    page.get_by_role("option", name="magnitude", exact=True).click()
    expect(method).to_have_value("magnitude")
    wait_for_app_idle(page)
    page.get_by_role("button", name="Start", exact=True).click()
    expect(page.locator('[data-testid="stMain"]')).to_contain_text(re.compile(r"is\s+finished"), timeout=MODEL_LOAD_S * 1000)
    wait_for_app_idle(page, timeout=MODEL_LOAD_S)
    watch.assert_clean()


def test_studio_full_flow(page, watch, screenshot):
    # A deep link on a fresh server: the app's st.navigation must be in charge (the page titles), not
    # Streamlit's listing of a pages/ folder, which would run the page script without app.py.
    page.goto("/runs")
    expect(page.get_by_role("link", name=re.compile("Model & data"))).to_be_visible(timeout=60_000)
    expect(page.get_by_role("link", name=re.compile("What-if"))).to_be_visible()
    wait_for_app_idle(page)
    page.goto("/")  # the default page, Model & data
    expect(page.locator('[data-testid="stMain"]')).to_contain_text("Prunable units", timeout=MODEL_LOAD_S * 1000)
    wait_for_app_idle(page, timeout=MODEL_LOAD_S)
    screenshot("model")
    watch.assert_clean()

    # ---- start a small PG run ----
    page.goto("/prune")
    expect(page.get_by_label("Method", exact=True)).to_have_value("pg", timeout=60_000)
    wait_for_app_idle(page)
    for label, value in [("Steps", 60), ("Batch size", 1), ("Sequence length", 32), ("Snapshot every", 2),
                         ("Evaluate every", 20), ("Calibration windows", 8)]:
        set_number(page, label, value)
    wait_for_app_idle(page)
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_url(re.compile(r"[?&]run=[^&]+"), timeout=MODEL_LOAD_S * 1000)
    run_id = re.search(r"[?&]run=([^&]+)", page.url).group(1)

    progress = page.locator(".st-key-run_progress")
    # The run's status line, read from the whole page: while a fragment rerun hands over to a full one,
    # Streamlit shows the old and the new status container side by side for a moment.
    status = page.locator('[data-testid="stMain"]')
    expect(status).to_contain_text(run_id, timeout=60_000)
    first = wait_for_step_increase(page, 0, FIRST_STEP_S)
    step = wait_for_step_increase(page, first, STEP_S)
    step = wait_for_step_increase(page, step, STEP_S)
    expect(progress).to_contain_text("/ 60")

    snap = read_number(page, "heads_heatmap", SNAPSHOT_RE)
    if snap is None:
        snap = wait_for_snapshot_increase(page, -1, STEP_S)
    snap = wait_for_snapshot_increase(page, snap, STEP_S * 2)
    snap = wait_for_snapshot_increase(page, snap, STEP_S * 2)
    expect(page.locator(".st-key-loss_chart").locator("svg.chart").first).to_be_attached()
    # the page's markdown keeps the SVG whole: hover titles, and text decoded from its character references
    expect(page.locator(".st-key-heads_heatmap svg.chart title").first).to_have_text(
        re.compile(r"^layer 0, head unit 0: \d\.\d{3}$"))
    expect(page.locator(".st-key-loss_chart svg.chart text.title").first).to_have_text("Loss of sampled masks")
    expect(status).to_contain_text(re.compile(r"is\s+running"))

    # ---- pause: the step stands still ----
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(status).to_contain_text(re.compile(r"is\s+paused"), timeout=STEP_S * 1000)
    paused_at = read_step(page)  # "paused" shows once a step in flight has landed, with that step
    page.wait_for_timeout(3000)  # not a wait for something: three polls of the page (one a second) must not move it
    assert read_step(page) == paused_at, "the step moved while paused"

    # ---- resume: it moves again ----
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(status).to_contain_text(re.compile(r"is\s+running"), timeout=60_000)
    wait_for_step_increase(page, paused_at, STEP_S)

    # ---- stop ----
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(status).to_contain_text(re.compile(r"is\s+stopped"), timeout=STEP_S * 1000)
    wait_for_app_idle(page, timeout=STEP_S)
    stopped_at = read_step(page)
    assert stopped_at is not None and stopped_at > paused_at
    screenshot("prune-stopped")
    watch.assert_clean()

    # ---- reload: the same run, not a new one ----
    page.reload()
    assert f"run={run_id}" in page.url
    expect(status).to_contain_text(re.compile(r"is\s+stopped"), timeout=60_000)
    wait_for_app_idle(page)  # while a script run goes, Streamlit may still show the last run's elements
    expect(status).to_contain_text(run_id)
    expect(progress).to_contain_text(f"step {stopped_at} / 60", timeout=60_000)

    # ---- compare the dense and the pruned model ----
    # A run turns "stopped" only once its model is saved, so Compare lists it at once.
    pruned = page.get_by_role("combobox", name="Pruned model", exact=True)  # the selected option is its value
    page.goto("/compare")
    expect(page.get_by_label("Prompt", exact=True)).to_be_visible(timeout=MODEL_LOAD_S * 1000)
    wait_for_app_idle(page, timeout=MODEL_LOAD_S)
    expect(pruned).to_have_value(re.compile(re.escape(run_id)))
    page.get_by_role("button", name="Generate", exact=True).click()
    for key in ("dense_output", "pruned_output"):
        expect(page.locator(f".st-key-{key}")).to_have_text(re.compile(r"\S"), timeout=MODEL_LOAD_S * 1000)
    wait_for_app_idle(page, timeout=MODEL_LOAD_S)
    screenshot("compare")
    watch.assert_clean()

    # ---- the remaining pages ----
    page.goto("/whatif")
    expect(page.locator('[data-testid="stMain"]')).to_contain_text("What-if", timeout=60_000)
    wait_for_app_idle(page, timeout=MODEL_LOAD_S)
    screenshot("whatif")
    watch.assert_clean()
    page.goto("/runs")
    expect(page.locator('[data-testid="stMain"]')).to_contain_text(run_id, timeout=60_000)
    wait_for_app_idle(page)
    screenshot("runs")
    watch.assert_clean()
