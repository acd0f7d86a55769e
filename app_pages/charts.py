"""Charts as inline SVG, drawn on the server: the browser has no charting script to load or run, so a
chart is on screen as soon as the page's text is. Hovering a point, bar or cell shows its values (SVG
<title>, the browser's own tooltip).

Pure functions, data in and one line of SVG out (no Streamlit here; `common.draw` puts a chart in the
page). Text takes the page's font and colour (`currentColor`), so light and dark themes both read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# the viewBox, in px at which text is drawn at its size: the chart scales to its column's width, text
# with it, so a chart's width is about that of where it is shown (WIDTH: half the page, WIDE: all of it)
WIDTH, WIDE, HEIGHT = 480, 960, 300
LEFT, RIGHT, TOP, BOTTOM = 62, 18, 34, 40  # plot margins: y tick labels, title, x tick labels and axis title
LEGEND_ROW = 18
SMALL = 11  # font size of labels
CHAR_W = 6.4  # approximate width of one character at SMALL px, for laying out the legend
MAX_POINTS = 800  # a series with more points is thinned evenly for drawing (a chart stays a few kB)
HOVER_POINTS = 40  # points per series that show their values on hover (every marker of a smaller series)
HOVER_CELLS = 400  # a heatmap with more cells shows one summary per row on hover
LEVELS = 48  # colour levels of a larger heatmap (cells of one level are one path)
PALETTE = ("#3b6fd4", "#e8743b", "#19a979", "#945ecf", "#ed4a7b", "#13a4b4", "#bf8a00", "#6c8893")
# matplotlib's viridis at 0, 1/8, ..., 1: cells are coloured by linear interpolation between these
VIRIDIS = ((68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
           (92, 200, 99), (170, 220, 50), (253, 231, 37))
# HTML's special characters and those Streamlit's markdown reads inside a line (emphasis, code, links,
# tables, strikethrough, $math$, :icon: codes) become character references: text stays text
_ESCAPES = {c: f"&#{ord(c)};" for c in "&<>\"'\\`*_[]$:~|"}


@dataclass(frozen=True)
class Series:
    """One trace of a line chart. mode: "lines", "markers" or "lines+markers"; symbol: circle, diamond,
    star or cross; labels: per-point hover text added to the point's values."""
    name: str
    x: Sequence[float]
    y: Sequence[float | None]
    mode: str = "lines"
    dash: bool = False
    color: str | None = None
    symbol: str = "circle"
    size: float = 3.0
    opacity: float = 1.0
    labels: Sequence[str] | None = None


def text(s) -> str:
    """`s` safe inside SVG placed in Streamlit markdown: HTML-escaped, markdown characters as entities."""
    return "".join(_ESCAPES.get(c, c) for c in str(s))


def number(v: float) -> str:
    """A short label for a value: 3 significant digits, thousands separated, tiny and huge in e-notation."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    if a >= 1e6 or a < 1e-3:
        return f"{v:.2e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")
    if a >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round ticks (1, 2 or 5 times a power of ten apart, the step nearest (hi - lo) / n) in [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda step: abs(math.log(step / raw)))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def decade_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten in [lo, hi] (both > 0), at most about 6 of them (every other decade beyond)."""
    a, b = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    every = max(1, math.ceil((b - a + 1) / 6))
    return [10.0 ** e for e in range(a, b + 1, every)]


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def power_label(v: float) -> str:
    """10⁻³ for 0.001; plain for 1 to 1000."""
    e = round(math.log10(v))
    return number(v) if 0 <= e <= 3 else "10" + str(e).translate(_SUPERSCRIPT)


class _Scale:
    """Maps data to plot coordinates along one axis (linear, or log10)."""

    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool = False):
        self.log = log
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
        self.a, self.b = a, b

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        return self.a + (t - self.lo) / (self.hi - self.lo) * (self.b - self.a)


def _finite(v, log: bool) -> bool:
    return v is not None and math.isfinite(v) and (v > 0 or not log)


def _range(values: list[float], log: bool, pad: float = 0.05) -> tuple[float, float]:
    """Data range with a margin; log ranges snap outwards to decades."""
    if not values:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(values), max(values)
    if log:
        return 10.0 ** math.floor(math.log10(lo) + 1e-9), 10.0 ** math.ceil(math.log10(hi) - 1e-9 + (lo == hi))
    if lo == hi:
        return lo - (abs(lo) or 1) * 0.5, hi + (abs(hi) or 1) * 0.5
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _legend(names: list[tuple[str, str, str]], y0: float, width: float) -> tuple[list[str], float]:
    """Legend items (name, colour, kind: line / dash / marker:<symbol> / bar) in rows under the plot; returns the
    SVG parts and the height they take."""
    parts, x, y = [], LEFT, y0
    for name, color, kind in names:
        w = 26 + CHAR_W * len(name)
        if x + w > width - RIGHT and x > LEFT:
            x, y = LEFT, y + LEGEND_ROW
        if kind == "bar":
            parts.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="14" height="10" fill="{color}"/>')
        elif kind.startswith("marker"):
            parts.append(_marker(kind.partition(":")[2] or "circle", x + 7, y - 4, 4, color, 1, text(name)))
        else:
            dash = ' stroke-dasharray="4 3"' if kind == "dash" else ""
            parts.append(f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 16:.1f}" y2="{y - 4:.1f}" '
                         f'stroke="{color}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{x + 20:.1f}" y="{y:.1f}" font-size="{SMALL}" fill="currentColor">{text(name)}</text>')
        x += w + 14
    return parts, (y - y0 + LEGEND_ROW) if names else 0


def _frame(title: str, xlabel: str, ylabel: str, plot_bottom: float, width: float) -> list[str]:
    """Title, axis titles (x under the tick labels, y rotated at the left)."""
    mid_y = (TOP + plot_bottom) / 2
    return [f'<text x="4" y="18" font-size="14" font-weight="600" fill="currentColor" class="title">'
            f'{text(title)}</text>',
            f'<text x="{(LEFT + width - RIGHT) / 2:.1f}" y="{plot_bottom + 32:.1f}" font-size="{SMALL}" '
            f'text-anchor="middle" fill="currentColor" opacity="0.8">{text(xlabel)}</text>',
            f'<text transform="translate(12 {mid_y:.1f}) rotate(-90)" font-size="{SMALL}" text-anchor="middle" '
            f'fill="currentColor" opacity="0.8">{text(ylabel)}</text>']


def _svg(parts: list[str], width: float, height: float, key: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart chart-{text(key)}" viewBox="0 0 {width:.0f} '
            f'{height:.0f}" width="100%" role="img" style="max-width:100%;height:auto;overflow:visible">'
            + "".join(parts) + "</svg>")


def _axes(xs: _Scale, ys: _Scale, xticks, yticks, ylabels, bottom: float, width: float, xlabels=None) -> list[str]:
    """Grid lines at the y ticks, tick labels on both axes, and the x axis line."""
    parts = []
    for v, label in zip(yticks, ylabels):
        y = ys(v)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{width - RIGHT}" y2="{y:.1f}" stroke="currentColor" '
                     f'stroke-opacity="0.12"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="{SMALL}" text-anchor="end" '
                     f'fill="currentColor" opacity="0.75">{text(label)}</text>')
    for v, label in zip(xticks, xlabels or [number(v) for v in xticks]):
        x = xs(v)
        parts.append(f'<text x="{x:.1f}" y="{bottom + 15:.1f}" font-size="{SMALL}" text-anchor="middle" '
                     f'fill="currentColor" opacity="0.75">{text(label)}</text>')
    parts.append(f'<line x1="{LEFT}" y1="{bottom:.1f}" x2="{width - RIGHT}" y2="{bottom:.1f}" '
                 f'stroke="currentColor" stroke-opacity="0.4"/>')
    return parts


def _marker(symbol: str, x: float, y: float, r: float, color: str, opacity: float, title: str) -> str:
    tip = f"<title>{title}</title>"
    common = f'fill="{color}" fill-opacity="{opacity:g}" class="point"'
    if symbol == "diamond":
        return (f'<path d="M{x:.1f} {y - r:.1f}L{x + r:.1f} {y:.1f}L{x:.1f} {y + r:.1f}L{x - r:.1f} {y:.1f}Z" '
                f'{common}>{tip}</path>')
    if symbol == "star":
        pts = " ".join(f"{x + (r if i % 2 == 0 else r / 2.3) * math.sin(i * math.pi / 5):.1f},"
                       f"{y - (r if i % 2 == 0 else r / 2.3) * math.cos(i * math.pi / 5):.1f}" for i in range(10))
        return f'<polygon points="{pts}" {common}>{tip}</polygon>'
    if symbol == "cross":
        d = r * 0.75
        return (f'<path d="M{x - d:.1f} {y - d:.1f}L{x + d:.1f} {y + d:.1f}M{x - d:.1f} {y + d:.1f}L{x + d:.1f} '
                f'{y - d:.1f}" stroke="{color}" stroke-width="2.5" fill="none" class="point">{tip}</path>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:g}" {common}>{tip}</circle>'


def _thinned(n: int, most: int = MAX_POINTS) -> list[int]:
    """At most about `most` evenly spaced indices of range(n), the last one included."""
    step = max(1, math.ceil(n / most))
    return list(range(0, n, step)) + ([n - 1] if n and (n - 1) % step else [])


def line_chart(series: Sequence[Series], title: str, xlabel: str, ylabel: str, *, log_y: bool = False,
               y_range: tuple[float, float] | None = None, hlines: Sequence[tuple[float, str]] = (),
               width: float = WIDTH, height: float = HEIGHT, key: str = "line") -> str:
    """Lines and/or markers of every series on shared axes; `hlines`: dashed reference lines (y, label).
    Points that are None, not finite, or not positive on a log axis are left out (lines break there)."""
    drawable = [[(x, y, label)  # per series, the points drawn: (x, y, hover label)
                 for x, y, label in zip(s.x, s.y, s.labels if s.labels is not None else [None] * len(s.x))
                 if _finite(y, log_y) and x is not None] for s in series]
    legend = [(s.name, s.color or PALETTE[i % len(PALETTE)],
               f"marker:{s.symbol}" if s.mode == "markers" else ("dash" if s.dash else "line"))
              for i, s in enumerate(series)]
    legend_parts, legend_h = _legend(legend, 0, width)
    bottom = height - BOTTOM - legend_h
    xs_all = [x for shown in drawable for x, _, _ in shown]
    ys_all = [y for shown in drawable for _, y, _ in shown] + [y for y, _ in hlines if _finite(y, log_y)]
    x_lo, x_hi = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    y_lo, y_hi = y_range or _range(ys_all, log_y)
    xs = _Scale(x_lo, x_hi, LEFT, width - RIGHT)
    ys = _Scale(y_lo, y_hi, bottom, TOP, log=log_y)
    yticks = decade_ticks(y_lo, y_hi) if log_y else nice_ticks(y_lo, y_hi)
    xticks = nice_ticks(x_lo, x_hi, 6)
    parts = _frame(title, xlabel, ylabel, bottom, width)
    parts += _axes(xs, ys, xticks, yticks, [power_label(v) if log_y else number(v) for v in yticks], bottom,
                   width)

    def tip(name: str, x: float, y: float, label: str | None) -> str:
        return text(f"{name}: {label + ', ' if label else ''}{xlabel} {number(x)}, {number(y)}")

    for (name, color, _), s, shown in zip(legend, series, drawable):
        if "lines" in s.mode:
            dash = ' stroke-dasharray="5 4"' if s.dash else ""
            for segment in _segments(s, log_y):
                d = "M" + "L".join(f"{xs(x):.1f} {ys(y):.1f}" for x, y in (segment[i] for i in _thinned(len(segment))))
                parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.8" '
                             f'stroke-opacity="{s.opacity:g}"{dash} class="line"/>')
        if "markers" in s.mode and (len(shown) <= HOVER_POINTS or s.symbol != "circle" or s.labels is not None):
            parts += [_marker(s.symbol, xs(x), ys(y), s.size, color, s.opacity, tip(name, x, y, label))
                      for x, y, label in shown]
            continue  # every marker shows its own values
        if "markers" in s.mode:  # a cloud: one path of round dots (zero-length segments with round caps)
            d = "".join(f"M{xs(x):.1f} {ys(y):.1f}h0" for x, y, _ in (shown[i] for i in _thinned(len(shown))))
            parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{2 * s.size:g}" '
                         f'stroke-linecap="round" stroke-opacity="{s.opacity:g}" class="point"/>')
        for i in _thinned(len(shown), HOVER_POINTS):  # invisible targets that show values under the pointer
            x, y, label = shown[i]
            parts.append(f'<circle cx="{xs(x):.1f}" cy="{ys(y):.1f}" r="5" fill-opacity="0">'
                         f'<title>{tip(name, x, y, label)}</title></circle>')
    for y, label in hlines:
        if _finite(y, log_y):
            parts.append(f'<line x1="{LEFT}" y1="{ys(y):.1f}" x2="{width - RIGHT}" y2="{ys(y):.1f}" '
                         f'stroke="currentColor" stroke-opacity="0.6" stroke-dasharray="6 4"/>')
            parts.append(f'<text x="{width - RIGHT - 2}" y="{ys(y) - 4:.1f}" font-size="{SMALL}" text-anchor="end" '
                         f'fill="currentColor" opacity="0.8">{text(label)}</text>')
    parts += [f'<g transform="translate(0 {bottom + BOTTOM + 6:.1f})">'] + legend_parts + ["</g>"]
    return _svg(parts, width, height, key)


def _segments(s: Series, log: bool) -> list[list[tuple[float, float]]]:
    """Runs of consecutive drawable points of a series (a missing value breaks the line)."""
    out, run = [], []
    for x, y in zip(s.x, s.y):
        if _finite(y, log) and x is not None:
            run.append((x, y))
        elif run:
            out.append(run)
            run = []
    return out + ([run] if run else [])


def bar_chart(x: Sequence, groups: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str, *,
              y_range: tuple[float, float] | None = None, width: float = WIDTH, height: float = HEIGHT,
              key: str = "bars") -> str:
    """Grouped bars: one slot per x (categories, in order), one bar per group in each slot."""
    names = list(groups)
    legend_parts, legend_h = _legend([(n, PALETTE[i % len(PALETTE)], "bar") for i, n in enumerate(names)]
                                     if len(names) > 1 else [], 0, width)
    bottom = height - BOTTOM - legend_h
    values = [v for n in names for v in groups[n] if v is not None and math.isfinite(v)]
    top = max(values, default=0.0)
    lo, hi = y_range or (min([0.0, *values]), top * 1.05 if top > 0 else 1.0)
    n = max(len(x), 1)
    xs = _Scale(-0.5, n - 0.5, LEFT, width - RIGHT)
    ys = _Scale(lo, hi, bottom, TOP)
    yticks = nice_ticks(lo, hi)
    step = max(1, math.ceil(n / 16))
    xticks = list(range(0, len(x), step))
    parts = _frame(title, xlabel, ylabel, bottom, width)
    parts += _axes(xs, ys, xticks, yticks, [number(v) for v in yticks], bottom, width, [str(x[i]) for i in xticks])
    slot = (width - RIGHT - LEFT) / n * 0.8
    bar_w = slot / max(len(names), 1)
    for g, name in enumerate(names):
        color = PALETTE[g % len(PALETTE)]
        for i, v in enumerate(groups[name]):
            if v is None or not math.isfinite(v):
                continue
            left = xs(i) - slot / 2 + g * bar_w
            top, base = ys(max(min(v, hi), lo)), ys(max(lo, 0.0) if lo <= 0 <= hi else lo)
            tip = text(f"{name}: {xlabel} {x[i]}, {number(v)}" if len(names) > 1 else f"{xlabel} {x[i]}: {number(v)}")
            parts.append(f'<rect x="{left:.1f}" y="{min(top, base):.1f}" width="{max(bar_w - 0.6, 0.6):.1f}" '
                         f'height="{abs(base - top):.1f}" fill="{color}" class="bar"><title>{tip}</title></rect>')
    parts += [f'<g transform="translate(0 {bottom + BOTTOM + 6:.1f})">'] + legend_parts + ["</g>"]
    return _svg(parts, width, height, key)


def viridis(t: float) -> str:
    """The viridis colour at t in [0, 1] (clipped), as #rrggbb."""
    t = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    f = t - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(VIRIDIS[i], VIRIDIS[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(matrix, title: str, xlabel: str, ylabel: str = "layer", *, zmin: float = 0.0, zmax: float = 1.0,
            scale_title: str = "keep p", cell: str | None = None, width: float = WIDTH, key: str = "heatmap") -> str:
    """A rows x columns grid (row 0 at the top) coloured by viridis from zmin to zmax, with a colour bar.
    Hovering a cell shows "<ylabel> i, <cell> j: value" (cell: a short name for a column, else xlabel)."""
    cell = cell or xlabel
    rows = [list(map(float, r)) for r in (matrix.tolist() if hasattr(matrix, "tolist") else matrix)]
    n_r, n_c = len(rows), max((len(r) for r in rows), default=0)
    height = max(HEIGHT, 14 * n_r + 80)
    right = width - RIGHT - 56  # room for the colour bar
    bottom = height - BOTTOM
    cw, ch = (right - LEFT) / max(n_c, 1), (bottom - TOP) / max(n_r, 1)
    parts = _frame(title, xlabel, ylabel, bottom, width)
    # the grid in cell units (a nested viewBox stretched over the plot area): short coordinates
    parts.append(f'<svg x="{LEFT}" y="{TOP}" width="{right - LEFT:.1f}" height="{bottom - TOP:.1f}" '
                 f'viewBox="0 0 {max(n_c, 1)} {max(n_r, 1)}" preserveAspectRatio="none" shape-rendering="crispEdges">')
    span = (zmax - zmin) or 1.0
    if n_r * n_c <= HOVER_CELLS:  # every cell shows its value
        for i, row in enumerate(rows):
            for j, z in enumerate(row):
                if not math.isfinite(z):  # no unit there (a layer with fewer units): left blank
                    continue
                parts.append(f'<rect x="{j}" y="{i}" width="1.02" height="1.02" fill="{viridis((z - zmin) / span)}" '
                             f'class="cell"><title>{text(f"{ylabel} {i}, {cell} {j}: {z:.3f}")}</title></rect>')
    else:  # colours quantised to LEVELS, each level one path of horizontal runs; a summary per row
        runs: dict[int, list[str]] = {}
        for i, row in enumerate(rows):
            levels = [round(min(max((z - zmin) / span, 0.0), 1.0) * (LEVELS - 1)) if math.isfinite(z) else None
                      for z in row]
            j = 0
            while j < len(levels):
                k = j
                while k + 1 < len(levels) and levels[k + 1] == levels[j]:
                    k += 1
                if levels[j] is not None:
                    runs.setdefault(levels[j], []).append(f"M{j} {i}h{k - j + 1.02:g}v1.02h-{k - j + 1.02:g}z")
                j = k + 1
        parts += [f'<path d="{"".join(d)}" fill="{viridis(level / (LEVELS - 1))}" class="cell"/>'
                  for level, d in sorted(runs.items())]
        for i, row in enumerate(rows):
            row = [z for z in row if math.isfinite(z)] or [math.nan]
            tip = text(f"{ylabel} {i}: mean {sum(row) / len(row):.3f}, min {min(row):.3f}, max {max(row):.3f}")
            parts.append(f'<rect x="0" y="{i}" width="{n_c}" height="1" fill-opacity="0"><title>{tip}</title></rect>')
    parts.append("</svg>")
    for i in range(0, n_r, max(1, math.ceil(n_r / 12))):
        parts.append(f'<text x="{LEFT - 6}" y="{TOP + (i + 0.5) * ch + 4:.1f}" font-size="{SMALL}" '
                     f'text-anchor="end" fill="currentColor" opacity="0.75">{i}</text>')
    for j in range(0, n_c, max(1, math.ceil(n_c / 10))):
        parts.append(f'<text x="{LEFT + (j + 0.5) * cw:.1f}" y="{bottom + 15:.1f}" font-size="{SMALL}" '
                     f'text-anchor="middle" fill="currentColor" opacity="0.75">{j}</text>')
    bar_x, steps = right + 14, 24
    bh = (bottom - TOP) / steps
    for k in range(steps):  # top = zmax
        parts.append(f'<rect x="{bar_x}" y="{TOP + k * bh:.2f}" width="12" height="{bh + 0.3:.2f}" '
                     f'fill="{viridis(1 - (k + 0.5) / steps)}"/>')
    for v in nice_ticks(zmin, zmax, 4):
        y = bottom - (v - zmin) / span * (bottom - TOP)
        parts.append(f'<text x="{bar_x + 16}" y="{y + 4:.1f}" font-size="{SMALL}" fill="currentColor" '
                     f'opacity="0.75">{text(number(v))}</text>')
    parts.append(f'<text x="{bar_x}" y="{TOP - 6}" font-size="{SMALL}" fill="currentColor" '
                 f'opacity="0.8">{text(scale_title)}</text>')
    return _svg(parts, width, height, key)
