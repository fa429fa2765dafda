"""A scatter plot of supernet scores against stand-alone accuracies, as a PNG drawn with Pillow."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from fastnas.spaces.plot import _font, _text_size

WIDTH, HEIGHT = 720, 560
LEFT, RIGHT, TOP, BOTTOM = 86, 24, 64, 70
TICKS = 5
POINT = 4
_AXIS = (40, 40, 40)
_GRID = (225, 225, 225)
_POINT = (31, 119, 180)
_TOP = (214, 39, 40)


def _ticks(lo: float, hi: float, n: int = TICKS) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (m * step) <= n:
            step *= m
            break
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _range(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.06 or max(abs(hi) * 0.05, 0.01)
    return lo - pad, hi + pad


def save_scatter(
    x: Sequence[float],
    y: Sequence[float],
    path,
    *,
    title: str,
    x_label: str,
    y_label: str,
    highlight: Sequence[int] = (),
    percent: bool = True,
) -> None:
    """Write a PNG scatter of (x[i], y[i]); ``highlight`` indices are drawn larger, in red."""
    if len(x) != len(y) or not x:
        raise ValueError("a scatter plot needs two equally long, non-empty series")
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(13)
    x0, x1 = _range(x)
    y0, y1 = _range(y)
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(v):
        return LEFT + (v - x0) / (x1 - x0) * pw

    def py(v):
        return TOP + ph - (v - y0) / (y1 - y0) * ph

    def label(v):
        return f"{100 * v:.1f}" if percent else f"{v:.3g}"

    for t in _ticks(x0, x1):
        draw.line([(px(t), TOP), (px(t), TOP + ph)], fill=_GRID)
        w, h = _text_size(small, label(t))
        draw.text((px(t) - w / 2, TOP + ph + 8), label(t), fill=_AXIS, font=small)
    for t in _ticks(y0, y1):
        draw.line([(LEFT, py(t)), (LEFT + pw, py(t))], fill=_GRID)
        w, h = _text_size(small, label(t))
        draw.text((LEFT - w - 8, py(t) - h / 2 - 2), label(t), fill=_AXIS, font=small)
    draw.rectangle([LEFT, TOP, LEFT + pw, TOP + ph], outline=_AXIS)
    marked = set(highlight)
    for i, (a, b) in enumerate(zip(x, y)):
        if i not in marked:
            draw.ellipse([px(a) - POINT, py(b) - POINT, px(a) + POINT, py(b) + POINT], fill=_POINT)
    for i in highlight:
        r = POINT + 2
        draw.ellipse([px(x[i]) - r, py(y[i]) - r, px(x[i]) + r, py(y[i]) + r], fill=_TOP, outline=_AXIS)
    w, _ = _text_size(font, title)
    draw.text(((WIDTH - w) / 2, 14), title, fill=_AXIS, font=font)
    if highlight:
        note = "red: the supernet's top " + str(len(highlight))
        w, _ = _text_size(small, note)
        draw.text(((WIDTH - w) / 2, 38), note, fill=_TOP, font=small)
    w, _ = _text_size(font, x_label)
    draw.text((LEFT + (pw - w) / 2, HEIGHT - 32), x_label, fill=_AXIS, font=font)
    w, h = _text_size(font, y_label)
    label_image = Image.new("RGB", (int(w) + 8, int(h) + 10), "white")
    ImageDraw.Draw(label_image).text((4, 0), y_label, fill=_AXIS, font=font)
    rotated = label_image.rotate(90, expand=True)
    image.paste(rotated, (8, int(TOP + (ph - rotated.height) / 2)))
    image.save(path)
