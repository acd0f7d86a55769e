"""Studio latency in a real browser: Start to the first plotted point (model already loaded), and
page refresh while a run is going. With --screenshots, also the README's pictures of every page.

    .venv/bin/python -m bench.studio_latency --screenshots
    .venv/bin/python -m bench.studio_latency --fresh-cache   # the first run of a new install: nothing cached

The studio runs as `streamlit run app.py` on localhost; headless Chromium drives it (playwright).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import markdown_table, write_results
from pruner.paths import cache_dir
from pruner.pg.config import PGConfig
from tools.browser import (REPO_ROOT, PageWatch, choose, launch_chromium, serve_studio, set_number, toggle,
                           wait_for_app_idle)

ASSETS = REPO_ROOT / "assets"
STEP_RE = re.compile(r"step (\d+) / (\d+)")
WIDE, TALL = {"width": 1400, "height": 1000}, {"width": 1400, "height": 2600}
LONG_MS = 900_000
LOSS_POINT = ".st-key-loss_chart svg .point"  # a sample loss drawn (the axes come before it)
PG = PGConfig()  # the form's defaults


def step_of(page) -> int:
    match = STEP_RE.search(page.locator(".st-key-run_progress").first.inner_text())
    return int(match.group(1)) if match else -1


def wait_for_step(page, at_least: int) -> None:
    while True:
        try:
            if step_of(page) >= at_least:
                return
        except Exception:  # noqa: BLE001 - mid-rerun the element may be replaced
            pass
        page.wait_for_timeout(250)


def start_to_first_point(page, base: str, settings: dict, choices: dict) -> tuple[float, float, str]:
    """Seconds from the Start click to the run's page showing a step, and to the loss chart."""
    page.goto(f"{base}/prune")
    page.get_by_role("button", name="Start", exact=True).wait_for(timeout=LONG_MS)
    for label, option in choices.items():
        if label == "toggle":
            toggle(page, option)
        else:
            choose(page, label, option)
    for label, value in settings.items():
        set_number(page, label, value)
    t0 = time.perf_counter()
    page.get_by_role("button", name="Start", exact=True).click()
    page.locator(".st-key-run_progress").first.wait_for(timeout=LONG_MS)
    wait_for_step(page, 1)
    first_step = time.perf_counter() - t0
    page.locator(LOSS_POINT).first.wait_for(timeout=LONG_MS)
    first_point = time.perf_counter() - t0
    return first_step, first_point, re.search(r"run=([^&]+)", page.url).group(1)


def refresh_latency(page, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds from reload to the run's status and progress shown, and to its sample losses drawn."""
    shown, drawn = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        page.reload()
        page.locator(".st-key-run_progress").first.wait_for(timeout=LONG_MS)
        shown.append(time.perf_counter() - t0)
        page.locator(LOSS_POINT).first.wait_for(timeout=LONG_MS)
        drawn.append(time.perf_counter() - t0)
        wait_for_app_idle(page, timeout=LONG_MS / 1000)
    return shown, drawn


def bare_page(page, base: str, repeats: int) -> list[float]:
    """Seconds from opening the Runs page (a title and a table, no chart) to its title: what any
    Streamlit page costs on this machine, the floor under a refresh."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        page.goto(f"{base}/runs")
        page.get_by_role("heading", name="Runs").first.wait_for(timeout=LONG_MS)
        out.append(time.perf_counter() - t0)
        wait_for_app_idle(page, timeout=LONG_MS / 1000)
    return out


def refresh_rows(page, repeats: int, when: str) -> list[dict]:
    shown, drawn = refresh_latency(page, repeats)
    return [{"measurement": f"page refresh {when}: status and progress shown (median of {repeats})",
             "seconds": statistics.median(shown), "all_s": shown},
            {"measurement": f"page refresh {when}: sample losses drawn (median of {repeats})",
             "seconds": statistics.median(drawn), "all_s": drawn}]


def stop_run(page) -> None:
    page.get_by_role("button", name="Stop", exact=True).click()
    page.locator(".st-key-run_status").filter(has_text=re.compile("stopped|finished")).first.wait_for(timeout=LONG_MS)


def screenshots(page, base: str, run_id: str) -> None:
    """Every page, for the README (assets/)."""
    ASSETS.mkdir(exist_ok=True)
    page.set_viewport_size(WIDE)
    page.goto(f"{base}/")
    page.get_by_text("Prunable units").first.wait_for(timeout=LONG_MS)
    page.screenshot(path=str(ASSETS / "studio-model.png"))
    page.goto(f"{base}/compare")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator(".st-key-compare_table").first.wait_for(timeout=LONG_MS)  # a rerun may show two at once
    wait_for_app_idle(page, timeout=LONG_MS / 1000)
    page.screenshot(path=str(ASSETS / "studio-compare.png"), full_page=True)
    page.goto(f"{base}/whatif")
    page.locator(".st-key-whatif_layers svg.chart").first.wait_for(timeout=LONG_MS)
    page.get_by_role("button", name="Run sweep", exact=True).click()
    page.locator(".st-key-sweep_chart svg.chart").first.wait_for(timeout=LONG_MS)
    page.set_viewport_size({"width": 1400, "height": 1500})
    page.wait_for_timeout(300)  # the layout settles at the new size
    page.screenshot(path=str(ASSETS / "studio-whatif.png"))
    page.set_viewport_size(WIDE)
    page.goto(f"{base}/runs")
    page.locator(".st-key-runs_table").first.wait_for(timeout=LONG_MS)
    wait_for_app_idle(page, timeout=LONG_MS / 1000)
    page.screenshot(path=str(ASSETS / "studio-runs.png"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5, help="page refreshes measured while a run goes")
    ap.add_argument("--screenshots", action="store_true", help="also write assets/studio-*.png")
    ap.add_argument("--screenshot-steps", type=int, default=40, help="steps to let the run make before its picture")
    ap.add_argument("--fresh-cache", action="store_true",
                    help="start with an empty derived-data cache (tokenisation and calibration happen in the run)")
    ap.add_argument("--name", default="studio_latency")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    if args.fresh_cache:  # a cache folder of its own, with the prepared model and corpus linked in
        cache = Path(tempfile.mkdtemp(prefix="studio-latency-cache-"))
        for name in ("models", "corpora"):
            (cache / name).symlink_to(cache_dir() / name)
        os.environ["PRUNER_CACHE"] = str(cache)
    cache_state = "empty (a fresh cache folder)" if args.fresh_cache else "as left by earlier runs"
    load = [os.getloadavg()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, serve_studio(Path(tmp) / "runs", Path(tmp) / "streamlit.log") as base, \
            sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport=TALL)
        watch = PageWatch()
        watch.attach(page)
        t0 = time.perf_counter()
        page.goto(f"{base}/")
        page.get_by_text("Prunable units").first.wait_for(timeout=LONG_MS)
        rows.append({"measurement": "first page with the model loaded (cold process)",
                     "seconds": time.perf_counter() - t0})
        cases = [
            ("Start -> first step / loss point, PG random init, no bias compensation (no calibration)",
             {"Steps": 400}, {"Initialisation": "random", "toggle": "Bias compensation"}),
            ("Start -> first step / loss point, PG defaults (metric init, 32 calibration windows)",
             {"Steps": 400}, {}),
            ("Start -> first step / loss point, PG defaults again (corpus tokenised, calibration done before)",
             {"Steps": 400}, {}),
        ]
        for i, (name, settings, picks) in enumerate(cases):
            first_step, first_point, run_id = start_to_first_point(page, base, settings, picks)
            rows.append({"measurement": name, "seconds": first_point, "first_step_s": first_step})
            if i == len(cases) - 1:
                rows += refresh_rows(page, args.repeats, "while the run goes")
                if args.screenshots:
                    wait_for_step(page, args.screenshot_steps)
                    page.set_viewport_size(TALL)
                    page.wait_for_timeout(300)  # the layout settles at the new size
                    page.screenshot(path=str(ASSETS / "studio-prune.png"))
            stop_run(page)
            if i == len(cases) - 1:  # the same page once the run has stopped: rendering alone
                rows += refresh_rows(page, args.repeats, "of the same run once stopped")
                times = bare_page(page, base, args.repeats)
                rows.append({"measurement": f"a page without charts (Runs), to its title "
                                            f"(median of {args.repeats})",
                             "seconds": statistics.median(times), "all_s": times})
        load.append(os.getloadavg())
        md = ("### Studio latency (headless Chromium, studio on localhost, same machine)\n\n"
              + (f"Derived-data cache (token ids, calibration statistics) at the start: {cache_state}. "
                 f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load[0])}, after "
                 f"{tuple(round(x, 2) for x in load[1])}.\n\n")
              + markdown_table(rows, ["measurement", "seconds", "first_step_s"],
                               {"seconds": "{:.2f}", "first_step_s": "{:.2f}"})
              + "\n\nA run's first point needs its first step: the forward passes of K masks on one batch "
                f"(defaults: K={PG.samples}, {PG.batch_size} x {PG.seqlen} tokens), after tokenising the corpus and, "
                "for a metric initialisation, calibrating; it counts once a sample loss is drawn. Charts are inline "
                "SVG drawn on the server (app_pages/charts.py): the browser loads no charting script. The page polls "
                "the run every second. A refresh while a run goes shares the 2 cores with the run's forward passes; "
                "the same refresh once it has stopped is the rendering alone. A page without charts is the floor: "
                "what Streamlit itself takes on this machine.")
        write_results(args.name, {"rows": rows, "cache": cache_state, "load_average": load}, md)
        if args.screenshots:  # after the results are written: a picture that fails loses no measurement
            screenshots(page, base, run_id)
        browser.close()
    watch.assert_clean()  # after the results are written: nothing off localhost, no console error


if __name__ == "__main__":
    main()
