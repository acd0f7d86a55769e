"""The studio in a real headless browser: pages render without console errors, and a policy-gradient run
is started, watched live, paused, resumed, stopped, reloaded, then compared, on a slow CPU."""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.harness import set_number

STEP_RE = re.compile(r"step (\d+) / (\d+)")
SNAPSHOT_RE = re.compile(r"snapshot at step (\d+)")
MODEL_LOAD_S = 180  # the first model load on a 2-core CPU
FIRST_STEP_S = 480  # Start to the first PG step: calibration for the initialisation takes minutes on a busy CPU
STEP_S = 90  # a step or two later


def expect(locator):
    """playwright's expect, imported late: without playwright the harness skips (or fails under CI)."""
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def wait_for_app_idle(page, timeout: float = 60) -> None:
    """Wait until Streamlit's "Running..." status widget is gone (the script run ended)."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout * 1000)
    expect(page.locator('[data-testid="stStatusWidget"]')).to_have_count(0, timeout=timeout * 1000)


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


def wait_for_increase(page, key: str, pattern: re.Pattern, previous: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = read_number(page, key, pattern)
        if seen is not None and seen > previous:
            return seen
        page.wait_for_timeout(500)
    pytest.fail(f"{key}: expected a number above {previous} within {timeout:.0f}s, last saw {seen}")


def wait_for_step_increase(page, previous: int, timeout: float) -> int:
    """Poll "step N / M" in run_progress until N > previous; return N."""
    return wait_for_increase(page, "run_progress", STEP_RE, previous, timeout)


def wait_for_snapshot_increase(page, previous: int, timeout: float) -> int:
    return wait_for_increase(page, "heads_heatmap", SNAPSHOT_RE, previous, timeout)


def test_app_starts_without_console_errors(page, console, screenshot):
    page.goto("/")
    expect(page.get_by_role("link", name=re.compile("Prune"))).to_be_visible(timeout=60_000)
    wait_for_app_idle(page)
    screenshot("app-start")
    console.assert_clean()


def test_studio_full_flow(page, console, screenshot):
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
    status = page.locator(".st-key-run_status")
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
    expect(page.locator(".st-key-loss_chart").locator(".js-plotly-plot, .main-svg").first).to_be_attached()
    expect(status).to_contain_text("running")

    # ---- pause: the step stands still ----
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(status).to_contain_text("paused", timeout=STEP_S * 1000)
    page.wait_for_timeout(1000)  # a step in flight when Pause was pressed may still land
    paused_at = read_step(page)
    page.wait_for_timeout(3000)
    assert read_step(page) == paused_at, "the step moved while paused"

    # ---- resume: it moves again ----
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(status).to_contain_text("running", timeout=60_000)
    wait_for_step_increase(page, paused_at, STEP_S)

    # ---- stop ----
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(status).to_contain_text("stopped", timeout=STEP_S * 1000)
    wait_for_app_idle(page, timeout=STEP_S)
    stopped_at = read_step(page)
    assert stopped_at is not None and stopped_at > paused_at
    screenshot("prune-stopped")

    # ---- reload: the same run, not a new one ----
    page.reload()
    assert f"run={run_id}" in page.url
    expect(status).to_contain_text("stopped", timeout=60_000)
    wait_for_app_idle(page)  # while a script run goes, Streamlit may still show the last run's elements
    expect(status).to_contain_text(run_id)
    expect(progress).to_contain_text(f"step {stopped_at} / 60")

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

    # ---- the remaining pages ----
    page.goto("/whatif")
    expect(page.locator('[data-testid="stMain"]')).to_contain_text("What-if", timeout=60_000)
    wait_for_app_idle(page, timeout=MODEL_LOAD_S)
    screenshot("whatif")
    page.goto("/runs")
    expect(page.locator('[data-testid="stMain"]')).to_contain_text(run_id, timeout=60_000)
    wait_for_app_idle(page)
    screenshot("runs")

    console.assert_clean()
