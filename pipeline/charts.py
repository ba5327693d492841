"""Static SVG line charts that open anywhere (no plotting library, no web page, no network).

`dvc plots show` renders an HTML page that loads its charting library from the web; these files are
for everyone else: a browser, an image viewer, a README. One <polyline class="series"> per named
series, with its name in data-name, so tests can read them back.
"""

from __future__ import annotations

from html import escape

import numpy as np

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 680, 380, 70, 150, 40, 50


def line_chart_svg(series: dict[str, tuple[list, list]], title: str, xlabel: str, ylabel: str,
                   bounds: tuple[float, float, float, float] | None = None, diagonal: bool = False) -> str:
    """series: name -> (xs, ys). bounds: (x0, x1, y0, y1), else the data's range. diagonal: draw y = x
    dashed (the perfect-calibration line of a reliability diagram)."""
    points = [(float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys) if np.isfinite(y)]
    if bounds is None:
        xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
        pad = 0.05 * (max(ys) - min(ys) or 1.0)
        bounds = (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, min(ys) - pad, max(ys) + pad)
    x0, x1, y0, y1 = bounds
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + plot_w * (x - x0) / (x1 - x0)

    def py(y: float) -> float:
        return TOP + plot_h * (1 - (y - y0) / (y1 - y0))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{LEFT + plot_w / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    base = TOP + plot_h
    parts.append(f'<line x1="{LEFT}" y1="{base}" x2="{LEFT + plot_w}" y2="{base}" stroke="black"/>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="black"/>')
    for tick in np.linspace(x0, x1, 5):
        parts.append(f'<text x="{px(tick):.2f}" y="{base + 16}" text-anchor="middle">{tick:.3g}</text>')
    for tick in np.linspace(y0, y1, 5):
        parts.append(f'<line x1="{LEFT}" y1="{py(tick):.2f}" x2="{LEFT + plot_w}" y2="{py(tick):.2f}" '
                     f'stroke="#e5e5e5"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{py(tick) + 4:.2f}" text-anchor="end">{tick:.3g}</text>')
    if diagonal:
        parts.append(f'<line x1="{px(x0):.2f}" y1="{py(y0):.2f}" x2="{px(x1):.2f}" y2="{py(y1):.2f}" '
                     f'stroke="#888" stroke-dasharray="4 4"/>')
    for index, (name, (xs, ys)) in enumerate(series.items()):
        color = COLORS[index % len(COLORS)]
        kept = [(px(float(x)), py(float(y))) for x, y in zip(xs, ys) if np.isfinite(y)]
        coords = " ".join(f"{x:.2f},{y:.2f}" for x, y in kept)
        parts.append(f'<polyline class="series" data-name="{escape(name)}" points="{coords}" fill="none" '
                     f'stroke="{color}" stroke-width="2"/>')
        if len(kept) <= 30:  # few points (a reliability diagram): mark each
            parts.extend(f'<circle cx="{x:.2f}" cy="{y:.2f}" r="3" fill="{color}"/>' for x, y in kept)
        legend_y = TOP + 10 + 18 * index
        parts.append(f'<line x1="{WIDTH - RIGHT + 12}" y1="{legend_y}" x2="{WIDTH - RIGHT + 32}" y2="{legend_y}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{WIDTH - RIGHT + 38}" y="{legend_y + 4}">{escape(name)}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(xlabel)}</text>')
    parts.append(f'<text x="16" y="{TOP + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {TOP + plot_h / 2})">{escape(ylabel)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
