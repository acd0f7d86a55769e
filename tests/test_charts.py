"""The studio's SVG charts: ticks, data-to-pixel mapping, escaping, heatmap coverage and size bounds."""

import html
import math
import re
import xml.etree.ElementTree as ET

import pytest
import torch

from app_pages import charts
from app_pages.charts import BOTTOM, HEIGHT, LEFT, RIGHT, TOP, WIDTH, Series

NS = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    assert "\n" not in svg  # one line: a blank line would end Streamlit's markdown HTML block
    return ET.fromstring(svg)


def numbers(d: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", d)]


@pytest.mark.parametrize("lo, hi, step", [(0, 1, 0.2), (0, 10, 2), (3.1, 4.4, 0.2), (0, 237, 50), (0.7, 0.75, 0.01)])
def test_nice_ticks_are_round_and_cover_the_range(lo, hi, step):
    ticks = charts.nice_ticks(lo, hi)
    assert all(lo - 1e-9 <= t <= hi + 1e-9 for t in ticks)
    gaps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert gaps == {step}
    assert ticks[0] - lo < step and hi - ticks[-1] < step


def test_decade_ticks_and_their_labels():
    assert charts.decade_ticks(1e-4, 1e-1) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert len(charts.decade_ticks(1e-12, 1e3)) <= 8  # many decades: every other one
    assert charts.power_label(1e-3) == "10⁻³" and charts.power_label(100.0) == "100"


def test_text_is_escaped_for_html_and_streamlit_markdown():
    raw = "a_b *c* $d$ :red[e] <f> & \"g\" 'h' | ~ ` \\"
    escaped = charts.text(raw)
    assert not set(escaped) & set("<>\"'_*$[]|~`\\")
    assert html.unescape(escaped) == raw
    svg = charts.line_chart([Series(raw, [0, 1], [1, 2])], raw, raw, raw)
    assert parse(svg).find(f"{NS}text").text == raw  # XML reads the references back to the text


def test_line_chart_maps_data_to_the_plot_area():
    svg = charts.line_chart([Series("s", [0, 5, 10], [0.0, 0.5, 1.0])], "t", "x", "y", y_range=(0.0, 1.0))
    bottom = HEIGHT - BOTTOM - charts.LEGEND_ROW  # one legend row under the plot
    (line,) = [p for p in parse(svg).iter(f"{NS}path") if p.get("class") == "line"]
    assert numbers(line.get("d")) == pytest.approx([LEFT, bottom, (LEFT + WIDTH - RIGHT) / 2, (bottom + TOP) / 2,
                                                    WIDTH - RIGHT, TOP], abs=0.06)


def test_log_axis_places_decades_evenly_and_breaks_lines_at_missing_values():
    s = Series("s", [0, 1, 2, 3, 4], [1.0, 10.0, None, 0.0, 100.0])  # None and 0 cannot be drawn on a log axis
    root = parse(charts.line_chart([s], "t", "x", "y", log_y=True))
    lines = [numbers(p.get("d")) for p in root.iter(f"{NS}path") if p.get("class") == "line"]
    assert len(lines) == 2  # 1 -> 10, then 100 alone
    (y1, y10), y100 = lines[0][1::2], lines[1][1]
    assert y1 - y10 == pytest.approx(y10 - y100, abs=0.1)  # range 1..100: one decade is half the plot


def test_markers_of_a_small_series_each_show_their_values():
    s = Series("runs", [0.2, 0.3], [80.0, 120.0], mode="markers", symbol="star", labels=["run_a", "run_b"])
    root = parse(charts.line_chart([s], "t", "ratio", "ppl"))
    tips = [t.text for t in root.iter(f"{NS}title")]
    assert "runs: run_a, ratio 0.2, 80" in tips and "runs: run_b, ratio 0.3, 120" in tips


def test_a_long_run_stays_small():
    n = 20_000  # a long search: K = 2 sample losses per step
    steps = [{"step": i, "losses": [3.0 + math.sin(i), 3.1], "loss_mean": 3.05, "baseline": 3.0} for i in range(n)]
    from app_pages.common import loss_figure
    svg = loss_figure(steps)
    root = parse(svg)
    assert len(svg) < 80_000
    assert len(list(root.iter(f"{NS}title"))) <= 3 * (charts.HOVER_POINTS + 2)  # hover targets and the legend
    cloud = [p for p in root.iter(f"{NS}path") if p.get("class") == "point"]
    assert len(cloud) == 1 and cloud[0].get("d").count("h0") == pytest.approx(charts.MAX_POINTS, rel=0.01)


def test_viridis_endpoints():
    assert charts.viridis(0.0) == "#440154" and charts.viridis(1.0) == "#fde725"
    assert charts.viridis(-1.0) == charts.viridis(0.0) and charts.viridis(2.0) == charts.viridis(1.0)


def test_small_heatmap_has_one_titled_cell_per_value():
    m = torch.tensor([[0.0, 1.0, 0.25], [0.5, 0.75, 1.0]])
    root = parse(charts.heatmap(m, "t", "unit"))
    cells = [r for r in root.iter(f"{NS}rect") if r.get("class") == "cell"]
    assert len(cells) == 6
    first = next(c for c in cells if (c.get("x"), c.get("y")) == ("1", "0"))
    assert first.get("fill") == "#fde725" and first.find(f"{NS}title").text == "layer 0, unit 1: 1.000"


def test_heatmap_leaves_missing_units_blank():
    small = torch.tensor([[0.2, float("nan")], [0.5, 0.9]])  # a layer with fewer units (views.padded_rows)
    root = parse(charts.heatmap(small, "t", "unit"))
    assert len([r for r in root.iter(f"{NS}rect") if r.get("class") == "cell"]) == 3
    large = torch.rand(30, 64)
    large[3, 40:] = float("nan")
    root = parse(charts.heatmap(large, "t", "bin"))
    drawn = sum(float(w) - 0.02 for p in root.iter(f"{NS}path") if p.get("class") == "cell"
                for w in re.findall(r"h([\d.]+)v", p.get("d")))
    assert drawn == pytest.approx(30 * 64 - 24)
    assert any(t.text.startswith("layer 3: mean ") and "nan" not in t.text for t in root.iter(f"{NS}title"))


@pytest.mark.parametrize("sorted_rows", [True, False])
def test_large_heatmap_covers_every_cell_once(sorted_rows):
    torch.manual_seed(0)
    m = torch.rand(30, 64)
    if sorted_rows:
        m = m.sort(1, descending=True).values
    svg = charts.heatmap(m, "t", "channel bin", cell="bin")
    root = parse(svg)
    covered = torch.zeros(30, 64, dtype=torch.int64)
    for p in root.iter(f"{NS}path"):
        if p.get("class") != "cell":
            continue
        level = next(k for k in range(charts.LEVELS) if charts.viridis(k / (charts.LEVELS - 1)) == p.get("fill"))
        for j, i, w in re.findall(r"M(\d+) (\d+)h([\d.]+)v", p.get("d")):
            j, i, w = int(j), int(i), round(float(w) - 0.02)
            covered[i, j:j + w] += 1
            assert torch.all((m[i, j:j + w] * (charts.LEVELS - 1)).round() == level)  # each run is one level
    assert torch.all(covered == 1)
    rows = [t.text for t in root.iter(f"{NS}title")]
    assert len(rows) == 30 and rows[0].startswith("layer 0: mean ")
    assert len(svg) < 60_000


def test_bar_heights_are_proportional():
    root = parse(charts.bar_chart([0, 1, 2], {"kept": [0.25, 0.5, 1.0]}, "t", "layer", "kept", y_range=(0.0, 1.0)))
    heights = [float(r.get("height")) for r in root.iter(f"{NS}rect") if r.get("class") == "bar"]
    assert heights[1] == pytest.approx(2 * heights[0], abs=0.1) and heights[2] == pytest.approx(4 * heights[0], abs=0.1)


def test_empty_data_draws_empty_axes():
    """A run's page before its first step, a layer-by-layer run before its first layer."""
    for svg in (charts.line_chart([], "t", "x", "y", log_y=True),
                charts.line_chart([Series("s", [], [])], "t", "x", "y"),
                charts.bar_chart([], {"a": []}, "t", "x", "y"), charts.heatmap([], "t", "x")):
        assert parse(svg).find(f"{NS}text").text == "t"


def test_the_perplexity_chart_stars_the_mask_a_search_returns():
    from app_pages.common import ppl_figure

    evals = [{"step": 40, "ppl": 120.0, "holdout_ppl": 90.0, "best_step": 40, "best_holdout_ppl": 90.0},
             {"step": 80, "ppl": 125.0, "holdout_ppl": 95.0, "best_step": 40, "best_holdout_ppl": 90.0}]
    root = parse(ppl_figure(evals))
    stars = [p.find(f"{NS}title").text for p in root.iter(f"{NS}polygon") if p.get("class") == "point"]
    assert sorted(stars) == ["best on held-out (the result)", "best on held-out (the result): step 40, 120"]
    texts = " ".join(t.text or "" for t in root.iter(f"{NS}text"))
    assert "held-out calibration blocks" in texts and "validation" in texts
    plain = parse(ppl_figure([{"step": 40, "ppl": 120.0}]))  # result=last: validation alone, no star
    assert not [p for p in plain.iter(f"{NS}polygon") if p.get("class") == "point"]
