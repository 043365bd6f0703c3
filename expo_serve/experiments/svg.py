"""Small server-side SVG charts for the dashboard: forest plots, lines, dose–response, heatmap.

Drawn in Python so the page needs no chart library, no CDN and no network. Every chart is an
<svg class="plot" data-plot=KIND data-points=N>, and every drawn datum carries class="mark", so a
browser test can see that a plot holds data.
"""
from __future__ import annotations

import math
from html import escape
from typing import Sequence

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]
WIDTH, HEIGHT = 560, 240
MARGIN = {"left": 64, "right": 16, "top": 28, "bottom": 40}


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.ceil(lo / step) * step
    ticks, value = [], start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.4g}"


class Frame:
    """Maps data to pixels inside the margins, and draws axes."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float], width: int = WIDTH,
                 height: int = HEIGHT, pad: float = 0.05):
        self.width, self.height = width, height
        self.x0, self.x1 = _padded(x_range, pad)
        self.y0, self.y1 = _padded(y_range, pad)

    def x(self, value: float) -> float:
        span = self.width - MARGIN["left"] - MARGIN["right"]
        return MARGIN["left"] + (value - self.x0) / (self.x1 - self.x0) * span

    def y(self, value: float) -> float:
        span = self.height - MARGIN["top"] - MARGIN["bottom"]
        return self.height - MARGIN["bottom"] - (value - self.y0) / (self.y1 - self.y0) * span

    def axes(self, x_label: str, y_label: str, x_ticks: bool = True, y_ticks: bool = True,
             x_format=fmt, y_format=fmt) -> list[str]:
        left, bottom = MARGIN["left"], self.height - MARGIN["bottom"]
        parts = [f'<line x1="{left}" y1="{bottom}" x2="{self.width - MARGIN["right"]}" y2="{bottom}" class="axis"/>',
                 f'<line x1="{left}" y1="{MARGIN["top"]}" x2="{left}" y2="{bottom}" class="axis"/>']
        if x_ticks:
            for t in nice_ticks(self.x0, self.x1):
                px = self.x(t)
                parts.append(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" class="axis"/>'
                             f'<text x="{px:.1f}" y="{bottom + 16}" class="tick" text-anchor="middle">{escape(x_format(t))}</text>')
        if y_ticks:
            for t in nice_ticks(self.y0, self.y1):
                py = self.y(t)
                parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{self.width - MARGIN["right"]}" y2="{py:.1f}" class="grid"/>'
                             f'<text x="{left - 6}" y="{py + 4:.1f}" class="tick" text-anchor="end">{escape(y_format(t))}</text>')
        parts.append(f'<text x="{(left + self.width - MARGIN["right"]) / 2:.1f}" y="{self.height - 6}" class="label" '
                     f'text-anchor="middle">{escape(x_label)}</text>')
        parts.append(f'<text x="14" y="{(MARGIN["top"] + bottom) / 2:.1f}" class="label" text-anchor="middle" '
                     f'transform="rotate(-90 14 {(MARGIN["top"] + bottom) / 2:.1f})">{escape(y_label)}</text>')
        return parts


def _padded(r: tuple[float, float], pad: float) -> tuple[float, float]:
    lo, hi = r
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 1.0
    if hi - lo < 1e-12:
        return lo - 0.5 if lo == 0 else lo - abs(lo) * 0.1, hi + 0.5 if hi == 0 else hi + abs(hi) * 0.1
    span = hi - lo
    return lo - span * pad, hi + span * pad


def _svg(kind: str, points: int, title: str, body: list[str], width: int = WIDTH, height: int = HEIGHT) -> str:
    return (f'<svg class="plot" data-plot="{kind}" data-points="{points}" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}">'
            f'<text x="{MARGIN["left"]}" y="16" class="title">{escape(title)}</text>{"".join(body)}</svg>')


def empty(kind: str, title: str, message: str) -> str:
    return _svg(kind, 0, title, [f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" class="empty" text-anchor="middle">'
                                 f'{escape(message)}</text>'])


def forest(title: str, rows: Sequence[tuple[str, float | None, tuple[float, float] | None]], x_label: str,
           reference: float | None = None, kind: str = "forest", colors: Sequence[int] | None = None) -> str:
    """One row per label: a point with its interval; an optional vertical reference line.

    Row i is drawn in palette colour colors[i] (default i), so arms keep their colour across charts."""
    usable = [(i, r) for i, r in enumerate(rows) if r[1] is not None]
    if not usable:
        return empty(kind, title, "no data yet")
    values = [r[1] for _, r in usable] + [v for _, r in usable if r[2] for v in r[2]]
    if reference is not None:
        values.append(reference)
    height = max(HEIGHT, MARGIN["top"] + MARGIN["bottom"] + 34 * len(rows))
    frame = Frame((min(values), max(values)), (0, len(rows)), height=height, pad=0.08)
    body = frame.axes(x_label, "", y_ticks=False)
    if reference is not None:
        px = frame.x(reference)
        body.append(f'<line x1="{px:.1f}" y1="{MARGIN["top"]}" x2="{px:.1f}" y2="{height - MARGIN["bottom"]}" class="ref"/>')
    for i, (label, value, ci) in enumerate(rows):
        py = frame.y(len(rows) - i - 0.5)
        body.append(f'<text x="{MARGIN["left"] - 6}" y="{py + 4:.1f}" class="tick" text-anchor="end">{escape(label)}</text>')
        if value is None:
            continue
        if ci is not None:
            body.append(f'<line x1="{frame.x(ci[0]):.1f}" y1="{py:.1f}" x2="{frame.x(ci[1]):.1f}" y2="{py:.1f}" '
                        f'stroke="{color(colors[i] if colors else i)}" stroke-width="3" class="mark ci"/>')
        body.append(f'<circle cx="{frame.x(value):.1f}" cy="{py:.1f}" r="5" fill="{color(colors[i] if colors else i)}" class="mark">'
                    f'<title>{escape(label)}: {fmt(value)}'
                    + (f' [{fmt(ci[0])}, {fmt(ci[1])}]' if ci else '') + '</title></circle>')
    return _svg(kind, len(usable), title, body, height=height)


def lines(title: str, series: Sequence[tuple[str, Sequence[float], Sequence[float | None]]], x_label: str,
          y_label: str, y_range: tuple[float, float] | None = None, step: bool = False, kind: str = "line",
          x_format=fmt) -> str:
    """Lines over a shared numeric x axis; gaps where y is None; a legend under the title."""
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None]
    if not points:
        return empty(kind, title, "no data yet")
    xs_all, ys_all = [p[0] for p in points], [p[1] for p in points]
    frame = Frame((min(xs_all), max(xs_all)), y_range or (min(ys_all), max(ys_all)))
    body = frame.axes(x_label, y_label, x_format=x_format)
    for i, (name, xs, ys) in enumerate(series):
        segments, current = [], []
        previous = None
        for x, y in zip(xs, ys):
            if y is None:
                if current:
                    segments.append(current)
                current, previous = [], None
                continue
            if step and previous is not None:
                current.append((x, previous))
            current.append((x, y))
            previous = y
        if current:
            segments.append(current)
        for seg in segments:
            path = " ".join(f"{'M' if j == 0 else 'L'}{frame.x(x):.1f},{frame.y(y):.1f}" for j, (x, y) in enumerate(seg))
            body.append(f'<path d="{path}" fill="none" stroke="{color(i)}" stroke-width="2" class="mark"/>')
        lx = MARGIN["left"] + 8 + i * 96
        body.append(f'<rect x="{lx}" y="{MARGIN["top"] - 4}" width="10" height="3" fill="{color(i)}"/>'
                    f'<text x="{lx + 14}" y="{MARGIN["top"]}" class="legend">{escape(name)}</text>')
    return _svg(kind, len(points), title, body)


def dose_response(title: str, points: Sequence[tuple[str, float, float | None, tuple[float, float] | None]],
                  y_label: str) -> str:
    """Metric against α: each arm a point with its interval, joined in α order."""
    usable = sorted([p for p in points if p[2] is not None], key=lambda p: p[1])
    if not usable:
        return empty("dose", title, "no data yet")
    ys = [p[2] for p in usable] + [v for p in usable if p[3] for v in p[3]]
    frame = Frame((min(p[1] for p in usable), max(p[1] for p in usable)), (min(ys), max(ys)))
    body = frame.axes("α", y_label)
    path = " ".join(f"{'M' if j == 0 else 'L'}{frame.x(p[1]):.1f},{frame.y(p[2]):.1f}" for j, p in enumerate(usable))
    body.append(f'<path d="{path}" fill="none" stroke="#888" stroke-dasharray="4 3"/>')
    for i, (label, alpha, mean, ci) in enumerate(usable):
        px = frame.x(alpha)
        if ci is not None:
            body.append(f'<line x1="{px:.1f}" y1="{frame.y(ci[0]):.1f}" x2="{px:.1f}" y2="{frame.y(ci[1]):.1f}" '
                        f'stroke="{color(i)}" stroke-width="3" class="mark ci"/>')
        body.append(f'<circle cx="{px:.1f}" cy="{frame.y(mean):.1f}" r="5" fill="{color(i)}" class="mark">'
                    f'<title>{escape(label)} (α={fmt(alpha)}): {fmt(mean)}</title></circle>'
                    f'<text x="{px + 7:.1f}" y="{frame.y(mean) - 7:.1f}" class="tick">{escape(label)}</text>')
    return _svg("dose", len(usable), title, body)


def heatmap(title: str, names: Sequence[str], rates: Sequence[Sequence[float | None]],
            games: Sequence[Sequence[int]]) -> str:
    """Row arm's win rate against column arm (ties count half), with the number of battles."""
    k = len(names)
    cell = 56
    left, top = 110, 48
    width, height = max(WIDTH, left + cell * k + 20), top + cell * k + 20
    body, filled = [], 0
    for j, name in enumerate(names):
        body.append(f'<text x="{left + cell * j + cell / 2:.1f}" y="{top - 8}" class="tick" text-anchor="middle">{escape(name)}</text>')
    for i, row_name in enumerate(names):
        body.append(f'<text x="{left - 6}" y="{top + cell * i + cell / 2 + 4:.1f}" class="tick" text-anchor="end">{escape(row_name)}</text>')
        for j in range(k):
            x, y = left + cell * j, top + cell * i
            rate = rates[i][j]
            if i == j or rate is None:
                body.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" fill="#eee"/>')
                continue
            filled += 1
            # Blue for winning, red for losing, white at 50%.
            strength = abs(rate - 0.5) * 2
            fill = (f"rgba(78,121,167,{0.15 + 0.85 * strength:.2f})" if rate >= 0.5
                    else f"rgba(225,87,89,{0.15 + 0.85 * strength:.2f})")
            body.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" fill="{fill}" class="mark">'
                        f'<title>{escape(row_name)} vs {escape(names[j])}: {rate:.0%} of {games[i][j]}</title></rect>'
                        f'<text x="{x + cell / 2 - 1:.1f}" y="{y + cell / 2:.1f}" class="cell" text-anchor="middle">{rate:.0%}</text>'
                        f'<text x="{x + cell / 2 - 1:.1f}" y="{y + cell / 2 + 13:.1f}" class="cellsub" text-anchor="middle">n={games[i][j]}</text>')
    if not filled:
        return empty("heatmap", title, "no battles voted yet")
    return _svg("heatmap", filled, title, body, width=width, height=height)
