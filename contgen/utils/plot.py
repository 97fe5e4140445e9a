"""A small line chart drawn with Pillow (a dependency already; no plotting library is), for sweep results."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def line_plot(lines: dict[str, list[tuple]], path: str | Path, xlabel: str, ylabel: str, title: str,
              size: tuple[int, int] = (640, 420)) -> Path:
    """One polyline with markers per entry of ``lines`` ({name: [(x, y), ...]}), a legend and ticks. Numeric x values
    go on a linear axis, ticked at each value; otherwise (e.g. schedule names) each value gets an evenly spaced slot."""
    font = ImageFont.load_default()
    xs = list(dict.fromkeys(x for pts in lines.values() for x, _ in pts))
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    pos = {x: float(x) if numeric else float(i) for i, x in enumerate(xs)}
    ys = [float(y) for pts in lines.values() for _, y in pts]
    (x0, x1), (y0, y1) = _span(list(pos.values())), _span(ys)
    w, h = size
    left, right, top, bottom = 70, w - 20, 30, h - 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    d.rectangle([left, top, right, bottom], outline="black")
    for x in xs:  # a sweep has few x values: a tick at each
        d.line([px(pos[x], y0), (px(pos[x], y0)[0], bottom + 4)], fill="black")
        d.text((px(pos[x], y0)[0], bottom + 6), f"{x:g}" if numeric else str(x), fill="black", font=font, anchor="ma")
    for v in _ticks(y0, y1):
        d.line([(left - 4, px(x0, v)[1]), (left, px(x0, v)[1])], fill="black")
        d.text((left - 6, px(x0, v)[1]), f"{v:.4g}", fill="black", font=font, anchor="rm")
    d.text(((left + right) / 2, h - 18), xlabel, fill="black", font=font, anchor="ma")
    d.text((8, top - 20), ylabel, fill="black", font=font)
    d.text(((left + right) / 2, 8), title, fill="black", font=font, anchor="ma")
    for k, (name, pts) in enumerate(lines.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [px(pos[x], float(y)) for x, y in sorted(pts, key=lambda p: pos[p[0]])]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for cx, cy in points:
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        d.line([(right - 120, top + 12 + 14 * k), (right - 100, top + 12 + 14 * k)], fill=colour, width=2)
        d.text((right - 95, top + 12 + 14 * k), name, fill="black", font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _span(values: list[float]) -> tuple[float, float]:
    """The axis range: the data's, widened by 5% (or by 1 around a single value) so no point sits on the frame."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 if hi > lo else 1.0
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """``n`` evenly spaced values inside (lo, hi)."""
    step = (hi - lo) / n
    return [lo + step * (i + 0.5) for i in range(n)]
