"""The studio under load: resident memory of the server while a headless browser makes 100 rapid What-if
changes and two short policy-gradient runs, with a refresh of each running run.

    .venv/bin/python -m bench.studio_soak

The studio runs as `streamlit run app.py` on localhost; headless Chromium drives it (playwright). A thread
samples the RSS of the server process and its children (psutil) every SAMPLE_S seconds throughout.
Measured:
- before: the server at rest after a first What-if result (model loaded, calibration statistics computed);
- one What-if prune: the peak while a single What-if computation runs alone, at the two ends of the
  soak's range (the largest pruned copy, ratio 0.05, and the smallest, ratio 0.8); the steady state
  of one prune is the larger of these peaks;
- the soak: 100 What-if changes (ratio, metric, granularity) a fraction of a second apart, without waiting
  for results, split around two PG runs that are started, refreshed (the form must show the run's own
  settings, not the defaults) and watched to their end, with What-if changes made while each runs;
- after: the server at rest once the last change has its result.
Targets (issue "The studio under load"): peak <= 1.5 x one What-if prune; after within 10% of before.
With --max-minutes, the soak stops there and writes what it measured so far, marked incomplete.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import markdown_table, write_results
from tools.browser import PageWatch, choose, launch_chromium, set_number, studio_process, toggle, wait_for_app_idle

SAMPLE_S = 0.2
LONG_MS = 3_600_000  # a shared, busy 2-core machine: one What-if computation has taken 10 minutes
REST_S = 6.0  # seconds of rest sampled for "before" and "after"
GIB = 2 ** 30
METRICS = ["flap", "wanda-sp", "magnitude"]
GRANULARITIES = ["kv_group", "query_head", "block"]
RATIO_MIN, RATIO_MAX, RATIO_STEP = 0.05, 0.8, 0.05
# Short PG runs: a few steps of two 32-token sequences from a random initialisation without bias
# compensation (no calibration pass); all of these differ from the form's defaults.
PG_SETTINGS = {"Steps": 8, "Batch size": 2, "Sequence length": 32, "Calibration windows": 8}
PG_CHOICES = {"Initialisation": "random"}
PG_TOGGLES = {"Bias compensation": False}


class Sampler:
    """RSS of a process and its children, sampled in a thread, each sample tagged with the current phase."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, str, int]] = []
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def rss(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, self.phase, self.rss()))
            except psutil.NoSuchProcess:
                return
            self._stop.wait(SAMPLE_S)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def since(self, t: float) -> list[int]:
        return [r for s, _, r in self.samples if s >= t]

    def now(self) -> float:
        return time.monotonic() - self.t0

    def peak(self, phase_prefix: str) -> int:
        return max(r for _, p, r in self.samples if p.startswith(phase_prefix))


DEADLINE: list[float] = []  # time.monotonic() at which --max-minutes ends, if set


def long_ms() -> float:
    """The timeout of a long wait in ms: LONG_MS, or less where --max-minutes ends sooner."""
    if not DEADLINE:
        return LONG_MS
    return max(1.0, min(LONG_MS, (DEADLINE[0] - time.monotonic()) * 1000))


def rest(sampler: Sampler, phase: str) -> int:
    """Median RSS over REST_S seconds with nothing going on."""
    sampler.phase = phase
    t = sampler.now()
    time.sleep(REST_S)
    return int(statistics.median(sampler.since(t)))


# ---- the What-if page ------------------------------------------------------------------------------

def ratio_thumb(page, label: str = "Ratio"):
    """The slider labelled `label` (its accessible name repeats the label, so found by aria-label)."""
    return page.locator(f'input[type="range"][aria-label="{label}"]')


def current_ratio(page, label: str = "Ratio") -> float:
    return float(ratio_thumb(page, label).input_value())


def pick(page, label: str, option: str) -> None:
    """Choose `option` in the selectbox `label` (no waiting for the app)."""
    box = page.get_by_label(label, exact=True)
    box.click()
    page.get_by_role("option", name=option, exact=True).click()


def settled(page, timeout_s: float | None = None) -> str:
    """Wait until the What-if page shows the result of the setting its widgets show, with nothing
    left to compute; return the chart's title (method, ratio, granularity)."""
    from playwright.sync_api import expect

    timeout_s = long_ms() / 1000 if timeout_s is None else timeout_s
    page.get_by_label("Metric", exact=True).wait_for(timeout=timeout_s * 1000)  # a cold page loads the model first
    wait_for_app_idle(page, timeout=timeout_s)
    method = page.get_by_label("Metric", exact=True).input_value()
    granularity = page.get_by_label("Granularity", exact=True).input_value()
    wanted = f"({method}, ratio {current_ratio(page):.2f}, {granularity})"
    chart = page.locator(".st-key-whatif_layers svg .title").filter(has_text=wanted).first
    chart.wait_for(timeout=timeout_s * 1000)
    expect(page.locator(".st-key-whatif_working")).to_have_count(0, timeout=timeout_s * 1000)
    wait_for_app_idle(page, timeout=timeout_s)
    return chart.text_content()


def one_prune(page, sampler: Sampler, method: str, ratio: float, granularity: str) -> int:
    """Move the page to one setting, wait for its result; the peak RSS meanwhile."""
    sampler.phase = f"single {method} {ratio:.2f} {granularity}"
    t = sampler.now()
    set_whatif(page, method, ratio, granularity)
    title = settled(page)
    assert f"({method}, ratio {ratio:.2f}, {granularity})" in title, title
    return max(sampler.since(t))


def set_whatif(page, method: str, ratio: float, granularity: str) -> None:
    if page.get_by_label("Metric", exact=True).input_value() != method:
        pick(page, "Metric", method)
        wait_for_app_idle(page)
    if page.get_by_label("Granularity", exact=True).input_value() != granularity:
        pick(page, "Granularity", granularity)
        wait_for_app_idle(page)
    thumb = ratio_thumb(page)
    while abs(current_ratio(page) - ratio) > 1e-6:
        thumb.press("ArrowRight" if current_ratio(page) < ratio else "ArrowLeft")
        wait_for_app_idle(page)


def rapid_changes(page, rng: random.Random, count: int, gap_s: float) -> list[str]:
    """`count` quick What-if changes, `gap_s` apart, never waiting for a result."""
    done = []
    thumb = ratio_thumb(page)
    for _ in range(count):
        roll = rng.random()
        if roll < 0.7:
            value = current_ratio(page)
            key = "ArrowLeft" if value >= RATIO_MAX - 1e-6 or (value > RATIO_MIN + 1e-6 and rng.random() < 0.5) \
                else "ArrowRight"
            thumb.press(key)
            done.append(f"ratio {key[5:].lower()}")
        elif roll < 0.85:
            option = rng.choice([m for m in METRICS if m != page.get_by_label("Metric", exact=True).input_value()])
            pick(page, "Metric", option)
            done.append(f"metric {option}")
        else:
            now = page.get_by_label("Granularity", exact=True).input_value()
            option = rng.choice([g for g in GRANULARITIES if g != now])
            pick(page, "Granularity", option)
            done.append(f"granularity {option}")
        page.wait_for_timeout(gap_s * 1000)
    return done


# ---- a PG run on the Prune page -----------------------------------------------------------------

def start_pg(page, base: str, ratio_presses: int) -> str:
    """Start a short PG run with non-default settings; return its id."""
    page.goto(f"{base}/prune")
    page.get_by_role("button", name="Start", exact=True).wait_for(timeout=long_ms())
    wait_for_app_idle(page)
    for label, value in PG_SETTINGS.items():
        set_number(page, label, value)
    for label, option in PG_CHOICES.items():
        choose(page, label, option)
    for label in PG_TOGGLES:
        toggle(page, label)
    wait_for_app_idle(page)
    thumb = ratio_thumb(page, "Pruning ratio")
    for _ in range(ratio_presses):
        thumb.press("ArrowRight")
        wait_for_app_idle(page)
    page.get_by_role("button", name="Start", exact=True).click()
    page.wait_for_url(re.compile(r"[?&]run=[^&]+"), timeout=long_ms())
    run_id = re.search(r"[?&]run=([^&]+)", page.url).group(1)
    # refresh while it runs (or, should its few steps be over already, once it has ended)
    page.locator(".st-key-run_status").filter(has_text=re.compile("running|finished|failed")).first.wait_for(
        timeout=long_ms())
    return run_id


def form_after_refresh(page, run_id: str) -> dict:
    """Reload the running run's page and read its form: the run's settings, not the defaults."""
    from playwright.sync_api import expect

    page.reload()
    # the whole page: while a fragment rerun hands over to a full one, two status lines show for a moment
    expect(page.locator('[data-testid="stMain"]')).to_contain_text(run_id, timeout=long_ms())
    wait_for_app_idle(page, timeout=long_ms() / 1000)
    shown = {label: page.get_by_label(label, exact=True).input_value() for label in [*PG_SETTINGS, *PG_CHOICES]}
    shown |= {label: page.get_by_role("checkbox", name=label, exact=True).is_checked() for label in PG_TOGGLES}
    shown["Pruning ratio"] = ratio_thumb(page, "Pruning ratio").input_value()
    shown["status"] = page.locator(".st-key-run_status").last.inner_text().strip().splitlines()[0]
    return shown


def wait_run_ended(page, base: str, run_id: str) -> str:
    page.goto(f"{base}/prune?run={run_id}")
    ended = page.locator(".st-key-run_status").filter(has_text=re.compile("finished|stopped|failed")).first
    ended.wait_for(timeout=long_ms())
    wait_for_app_idle(page, timeout=long_ms() / 1000)
    return ended.inner_text().strip().splitlines()[0]


def pg_run(page, base: str, sampler: Sampler, rng: random.Random, n: int, changes: int, gap_s: float) -> dict:
    """A PG run: start, refresh (check the form), What-if changes while it runs, wait for its end."""
    sampler.phase = f"pg run {n}"
    run_id = start_pg(page, base, ratio_presses=2 * n)  # ratio 0.40, then 0.50
    form = form_after_refresh(page, run_id)
    expected = PG_SETTINGS | PG_CHOICES | PG_TOGGLES | {"Pruning ratio": round(0.3 + 0.1 * n, 2)}
    shown_ok = all(form[k] == v if isinstance(v, (str, bool)) else abs(float(form[k]) - v) < 1e-9
                   for k, v in expected.items())
    page.goto(f"{base}/whatif")
    page.get_by_label("Metric", exact=True).wait_for(timeout=long_ms())
    wait_for_app_idle(page, timeout=long_ms() / 1000)
    sampler.phase = f"pg run {n} + whatif changes"
    done = rapid_changes(page, rng, changes, gap_s)
    wait_for_app_idle(page, timeout=long_ms() / 1000)
    working = page.locator(".st-key-whatif_working")
    waiting_text = working.first.inner_text() if working.count() else ""
    sampler.phase = f"pg run {n}"
    final = wait_run_ended(page, base, run_id)
    return {"run": run_id, "form_after_refresh": form, "form_expected": expected, "form_shows_run_settings": shown_ok,
            "whatif_while_running": waiting_text, "whatif_changes": done, "final_status": final}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=100, help="What-if changes in all (a tenth while each run goes)")
    ap.add_argument("--gap", type=float, default=0.15, help="seconds between two What-if changes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (e.g. MALLOC_ARENA_MAX=2)")
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="stop after this long and write what was measured so far, marked incomplete (0: no limit)")
    ap.add_argument("--name", default="studio_soak")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    env = dict(item.split("=", 1) for item in args.env)
    t_start = time.monotonic()
    m: dict = {"singles": [], "runs": [], "changes": []}  # filled as the soak goes
    stopped_in = None
    if args.max_minutes > 0:
        DEADLINE.append(t_start + args.max_minutes * 60)
    with tempfile.TemporaryDirectory() as tmp, \
            studio_process(Path(tmp) / "runs", Path(tmp) / "streamlit.log", env) as (base, proc), \
            sync_playwright() as p:
        sampler = Sampler(proc.pid).start()
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        watch = PageWatch()
        watch.attach(page)
        try:
            measure(page, base, sampler, rng, args, m)
        except Exception:  # a wait cut short by --max-minutes (playwright's timeout, expect's assertion)
            if not DEADLINE or time.monotonic() < DEADLINE[0]:
                raise
            stopped_in = sampler.phase
        finally:
            sampler.stop()
        with contextlib.suppress(Exception):
            browser.close()
        log = (Path(tmp) / "streamlit.log").read_text(errors="replace")
    wall = time.monotonic() - t_start
    write(args, m, sampler, log, env, load_before, wall, stopped_in)
    if stopped_in is None:
        watch.assert_clean()


def measure(page, base: str, sampler: Sampler, rng: random.Random, args, m: dict) -> None:
    """The soak's phases, each measurement stored in `m` as soon as it is made."""
    sampler.phase = "cold: first What-if result"
    page.goto(f"{base}/whatif")
    m["first"] = settled(page)
    m["before"] = rest(sampler, "rest before")
    for method, ratio, granularity in [("magnitude", 0.05, "kv_group"), ("flap", 0.8, "block")]:
        m["singles"].append({"setting": f"{method} {ratio:.2f} {granularity}",
                             "peak_gib": one_prune(page, sampler, method, ratio, granularity) / GIB})
    m["steady"] = max(s["peak_gib"] for s in m["singles"]) * GIB
    m["before_soak"] = rest(sampler, "rest before soak")
    m["soak_start"] = sampler.now()
    during_runs = args.changes // 10  # changes made while each run goes
    rest_changes = args.changes - 2 * during_runs
    blocks = [rest_changes // 3, rest_changes // 3, rest_changes - 2 * (rest_changes // 3)]
    for n in range(3):
        sampler.phase = f"soak changes {n + 1}"
        page.goto(f"{base}/whatif")
        page.get_by_label("Metric", exact=True).wait_for(timeout=long_ms())
        wait_for_app_idle(page, timeout=long_ms() / 1000)
        m["changes"] += rapid_changes(page, rng, blocks[n], args.gap)
        if n < 2:
            run = pg_run(page, base, sampler, rng, n + 1, during_runs, args.gap)
            m["changes"] += run["whatif_changes"]
            m["runs"].append(run)
    sampler.phase = "soak: last result"
    m["last"] = settled(page)
    m["soak_peak"] = max(sampler.since(m["soak_start"]))
    m["after"] = rest(sampler, "rest after")


def write(args, m: dict, sampler: Sampler, log: str, env: dict, load_before, wall: float, stopped_in) -> None:
    """JSON + Markdown of what was measured (all of it, or up to the phase --max-minutes stopped)."""
    gib = lambda key: m[key] / GIB if key in m else None  # noqa: E731
    computed = len(re.findall(r"^whatif: computed.*$", log, re.M))
    phases = {}
    for _, phase, rss in sampler.samples:
        phases[phase] = max(phases.get(phase, 0), rss)
    complete = stopped_in is None
    changes, runs, singles = m["changes"], m["runs"], m["singles"]
    if "soak_start" in m and "soak_peak" not in m:  # stopped during the soak: its peak so far
        m["soak_peak"] = max(sampler.since(m["soak_start"]), default=0)
    peak_ratio = m["soak_peak"] / m["steady"] if "soak_peak" in m else None
    after_ratio = m["after"] / m["before_soak"] if "after" in m else None
    result = {
        "complete": complete, "stopped_in_phase": stopped_in, "max_minutes": args.max_minutes,
        "rss_before_gib": gib("before"), "rss_before_soak_gib": gib("before_soak"), "rss_after_gib": gib("after"),
        "one_whatif_prune_peak_gib": gib("steady"), "single_prunes": singles, "soak_peak_gib": gib("soak_peak"),
        "overall_peak_gib": max((r for _, _, r in sampler.samples), default=0) / GIB,
        "peak_over_one_prune": peak_ratio, "after_over_before": after_ratio,
        "target_peak_met": peak_ratio <= 1.5 if complete else None,
        "target_after_met": abs(after_ratio - 1) <= 0.10 if complete else None,
        "whatif_changes": len(changes), "whatif_computations": computed,
        "whatif_computation_log": re.findall(r"^whatif: computed.*$", log, re.M), "pg_runs": runs,
        "first_result": m.get("first"), "last_result": m.get("last"), "wall_s": wall, "server_env": env,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "peak_by_phase_gib": {k: v / GIB for k, v in phases.items()},
        "samples": [(round(t, 2), phase, round(r / GIB, 4)) for t, phase, r in sampler.samples],
    }
    measured = [("RSS at rest after the first What-if result", "before"),
                *((f"peak of one What-if prune alone: {s['setting']}", s["peak_gib"] * GIB) for s in singles),
                ("steady state of one What-if prune (the larger of the above)", "steady"),
                ("RSS at rest before the soak", "before_soak"),
                (f"peak during the soak ({len(changes)} What-if changes, {len(runs)} PG runs)"
                 + ("" if complete else ", so far"), "soak_peak"),
                ("RSS at rest after the soak", "after")]
    rows = [{"measurement": label, "GiB": (value / GIB) if not isinstance(value, str) else gib(value)}
            for label, value in measured if not isinstance(value, str) or value in m]
    rows += [{"measurement": f"peak in phase: {phase}", "GiB": v / GIB} for phase, v in phases.items()] \
        if not complete else []
    head = f"### Studio under load (headless Chromium, studio on localhost{', ' + str(env) if env else ''})\n\n"
    if not complete:
        head += (f"**Incomplete: stopped by --max-minutes {args.max_minutes:g} in the phase \"{stopped_in}\"; "
                 "the targets are not judged.**\n\n")
    md = (head + markdown_table(rows, ["measurement", "GiB"], {"GiB": "{:.3f}"}) + "\n\n"
          + (f"- peak / one prune: **{peak_ratio:.2f}x** (target <= 1.5x: "
             f"{'met' if result['target_peak_met'] else 'MISSED'})\n" if complete else "")
          + (f"- after / before: **{after_ratio:.3f}** (target within 10%: "
             f"{'met' if result['target_after_met'] else 'MISSED'})\n" if complete else "")
          + f"- {len(changes)} What-if changes {args.gap:.2f} s apart made {computed} computations (a newer change "
          "replaces queued ones; one computation at a time)\n"
          + "".join(f"- PG run {i + 1} `{r['run']}`: form after a refresh shows the run's settings: "
                    f"{r['form_shows_run_settings']} ({ {k: r['form_after_refresh'][k] for k in r['form_expected']} }); "
                    f"What-if while it ran: \"{r['whatif_while_running'].strip()}\"\n" for i, r in enumerate(runs))
          + "".join(f"- {line}\n" for line in result["whatif_computation_log"])
          + f"- wall time {wall:.0f} s; load average of this shared machine {load_before[0]:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after\n\nRSS is the server's (`streamlit run app.py`) and its children's, sampled "
            f"every {SAMPLE_S} s (psutil). Before and after are medians over {REST_S:.0f} s at rest. The steady "
            "state of one What-if prune is the larger peak of a single computation (prune, then perplexity on "
            "16 validation windows) at the two ends of the soak's range.")
    write_results(args.name, result, md)
    print(md)


if __name__ == "__main__":
    main()
