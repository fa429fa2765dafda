"""Pictures of what a search did, drawn from its log with Pillow alone (as ``fastnas.spaces.plot``).

``arch_weights.png``: every edge's architecture weights (softmax) over the
epochs, one small panel per edge, a node's incoming edges in one row, a
section per cell (normal, reduction; Scalable-DARTS' activation factors too),
each candidate one line in the same colour everywhere and a legend per
section. ``skip_connect`` is drawn thick and red, so a DARTS cell that skip
connections take over shows at a glance.

``curves.png``: the training and validation loss and accuracy per epoch (and
the architecture's mean entropy per cell, where the log has it).

Both are computed first as data (``arch_weight_figure``, ``curve_figure``:
sections of panels of lines, what the tests check) and then rendered. The
search writes them after every epoch, atomically, beside ``log.jsonl``;
``redraw(run_dir)`` (``fastnas plot RUN_DIR``) draws them again from a run
folder's log.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from fastnas.run.loop import LOG_NAME
from fastnas.spaces.plot import _font, _text_size

ARCH_WEIGHTS_NAME = "arch_weights.png"
CURVES_NAME = "curves.png"

FONT_SIZE = 12
TITLE_SIZE = 15
MARGIN = 16
PANEL_SIZE = (190, 120)  # the plotting area of an edge's panel
CURVE_PANEL_SIZE = (420, 260)
AXIS_LEFT = 50  # tick labels left of the plotting area
AXIS_BOTTOM = 20
PANEL_TITLE = 18
PANEL_GAP = 14
LEGEND_SWATCH = 22
MAX_MARKERS = 40  # epochs up to which each point is also drawn as a dot
GROUP_WIDTH = 7  # panels per row when the rows of a matrix have no grouping

# Colours by candidate name, so that an operation has the same colour on every edge.
_COLOURS = {
    "none": (160, 160, 160),
    "skip_connect": (214, 39, 40),
    "max_pool_3x3": (31, 119, 180),
    "avg_pool_3x3": (23, 190, 207),
    "sep_conv_3x3": (44, 160, 44),
    "sep_conv_5x5": (0, 100, 0),
    "dil_conv_3x3": (255, 127, 14),
    "dil_conv_5x5": (148, 103, 189),
    "nor_conv_1x1": (44, 160, 44),
    "nor_conv_3x3": (0, 100, 0),
}
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (0, 100, 0), (120, 120, 220),
]  # fmt: skip
_WIDE = {"skip_connect": 3}
_GRID = (228, 228, 228)
_AXIS = (90, 90, 90)


@dataclass
class Line:
    """One series: ``ys[i]`` at epoch ``xs[i]``; NaN values leave a gap."""

    name: str
    xs: list[float]
    ys: list[float]
    colour: tuple[int, int, int] = (0, 0, 0)
    width: int = 2


@dataclass
class Panel:
    title: str
    lines: list[Line]
    y_range: tuple[float, float] | None = None  # None: fitted to the data
    x_range: tuple[float, float] = (1.0, 1.0)
    y_label: str = ""


@dataclass
class Section:
    """A titled block of panels in rows, with one legend for all of them."""

    title: str
    rows: list[list[Panel]]
    legend: list[tuple[str, tuple[int, int, int], int]] = field(default_factory=list)
    panel_size: tuple[int, int] = PANEL_SIZE
    subtitle: str = ""
    axis_left: int = AXIS_LEFT  # room for the tick labels left of each plotting area
    x_label: str = ""  # under each panel's tick labels

    @property
    def panels(self) -> list[Panel]:
        return [p for row in self.rows for p in row]


# --- the data -------------------------------------------------------------------------


def _colour(name: str, names: Sequence[str]) -> tuple[int, int, int]:
    if name in _COLOURS:
        return _COLOURS[name]
    others = [n for n in names if n not in _COLOURS]
    return _PALETTE[others.index(name) % len(_PALETTE)] if name in others else _PALETTE[0]


def compact_labels(labels: dict) -> dict:
    """``arch_weight_labels`` for the log: a candidate list shared by every row is written once."""
    out = {}
    for key, spec in labels.items():
        candidates = [list(c) for c in spec["candidates"]]
        shared = all(c == candidates[0] for c in candidates)
        out[key] = dict(spec, candidates=candidates[0] if shared and candidates else candidates)
    return out


def _row_candidates(spec: dict, rows: int) -> list[list[str]]:
    candidates = spec.get("candidates") or []
    if candidates and isinstance(candidates[0], str):
        return [list(candidates)] * rows
    return [list(c) for c in candidates]


def _section_title(key: str) -> str:
    titles = {"normal": "normal cell", "reduce": "reduction cell", "cell": "cell"}
    if key.startswith("activations_"):
        return f"{titles.get(key[len('activations_') :], key)}: activations"
    return titles.get(key, key)


def arch_weight_figure(history: Sequence[dict]) -> list[Section]:
    """Per matrix of architecture weights (normal, reduce, ...) a section of one panel per edge.

    Each panel has a line per candidate of that edge over the epochs whose
    record holds it (P-DARTS prunes candidates between stages). Rows and
    candidates are named by each record's ``arch_labels``; a log without them
    gets numbered rows and candidates. Vectors (PC-DARTS' edge betas) are left out.
    """
    records = [r for r in history if isinstance(r.get("arch_weights"), dict)]
    if not records:
        return []
    last_epoch = float(history[-1].get("epoch", len(history)))
    first_epoch = float(records[0].get("epoch", 1))
    keys = [k for k, w in records[-1]["arch_weights"].items() if w and isinstance(w[0], list)]
    sections = []
    for key in keys:
        # (edge, candidate name) -> points; the labels of the last record name the edges.
        points: dict[tuple[int, str], tuple[list[float], list[float]]] = {}
        names_seen: list[str] = []
        spec: dict = {}
        for r in records:
            weights = r["arch_weights"].get(key)
            if not weights or not isinstance(weights[0], list):
                continue
            spec = (r.get("arch_labels") or {}).get(key) or {}
            candidates = _row_candidates(spec, len(weights))
            for e, row in enumerate(weights):
                names = candidates[e] if e < len(candidates) else [str(k) for k in range(len(row))]
                for name, value in zip(names, row):
                    xs, ys = points.setdefault((e, name), ([], []))
                    xs.append(float(r.get("epoch", len(xs) + 1)))
                    ys.append(float(value))
                    if name not in names_seen:
                        names_seen.append(name)
        edges = len(records[-1]["arch_weights"][key])
        row_titles = spec.get("rows") or [f"edge {e}" for e in range(edges)]
        groups = spec.get("groups") or [
            list(range(s, min(s + GROUP_WIDTH, edges))) for s in range(0, edges, GROUP_WIDTH)
        ]
        # One weight axis for the whole section, so that panels compare; zoomed in while the
        # weights are still close to uniform (short searches), else 0 to 1.
        values = [y for xs, ys in points.values() for y in ys]
        y_range = (0.0, 1.0) if max(values) - min(values) > 0.25 else _padded(min(values), max(values))
        rows = []
        for group in groups:
            row = []
            for e in group:
                lines = [
                    Line(name, *points[(e, name)], _colour(name, names_seen), _WIDE.get(name, 2))
                    for name in names_seen
                    if (e, name) in points
                ]
                row.append(Panel(row_titles[e], lines, y_range, (first_epoch, last_epoch), "weight"))
            rows.append(row)
        legend = [(name, _colour(name, names_seen), _WIDE.get(name, 2)) for name in names_seen]
        subtitle = "softmax weight of each candidate per epoch; one panel per edge (source -> node), a row per node"
        sections.append(Section(_section_title(key), rows, legend, subtitle=subtitle))
    return sections


def _padded(lo: float, hi: float) -> tuple[float, float]:
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.01, 1e-3)
    return (max(0.0, lo - pad), min(1.0, hi + pad))


def curve_figure(history: Sequence[dict]) -> list[Section]:
    """Loss and accuracy per epoch: training, the architecture step's validation batches
    (``search val``) and the evaluation of the validation half (``val``); the mean entropy of
    the architecture weights per cell where the log has it."""
    if not history:
        return []
    xs = [float(r.get("epoch", i + 1)) for i, r in enumerate(history)]
    x_range = (xs[0], xs[-1])
    series = (("train", "train_{}", (31, 119, 180)), ("search val", "search_val_{}", (255, 127, 14)),
              ("val", "val_{}", (44, 160, 44)))  # fmt: skip
    panels, legend = [], {}
    for quantity, title, y_range in (("loss", "loss", None), ("acc", "accuracy", (0.0, 1.0))):
        lines = []
        for name, pattern, colour in series:
            key = pattern.format(quantity)
            if any(key in r for r in history):
                ys = [_number(r.get(key)) for r in history]
                lines.append(Line(name, xs, ys, colour))
                legend[name] = (name, colour, 2)
        panels.append(Panel(title, lines, y_range, x_range, title))
    rows = [panels]
    entropy_keys = [k for k in (history[-1].get("entropy") or {})]
    if entropy_keys:
        names = [f"entropy {k}" for k in entropy_keys]
        lines = [
            Line(name, xs, [_number((r.get("entropy") or {}).get(k)) for r in history], _PALETTE[3 + i % 6])
            for i, (k, name) in enumerate(zip(entropy_keys, names))
        ]
        for line in lines:
            legend[line.name] = (line.name, line.colour, 2)
        rows.append([Panel("architecture entropy (nats)", lines, None, x_range, "nats")])
    subtitle = "per epoch; search val: the architecture step's validation batches; val: the validation half, eval mode"
    return [Section("search curves", rows, list(legend.values()), CURVE_PANEL_SIZE, subtitle, 72, "epoch")]


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# --- drawing --------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * step:
            step *= m
            break
    first = math.ceil(lo / step - 1e-9) * step
    ticks = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    # A range just around one round number would get a single tick: take finer ones.
    return ticks if len(ticks) >= 2 or count > 16 else _nice_ticks(lo, hi, 2 * count)


def _fmt(value: float, step: float) -> str:
    """``value`` with the decimals that tell ticks ``step`` apart."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 3
    if step > 0 and round(step, decimals) != round(step, decimals + 1):
        decimals += 1
    return f"{value:.{decimals}f}"


def _y_range(panel: Panel) -> tuple[float, float]:
    if panel.y_range is not None:
        return panel.y_range
    values = [y for line in panel.lines for y in line.ys if math.isfinite(y)]
    if not values:
        return (0.0, 1.0)
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    return (min(0.0, lo) if lo >= 0 and lo < pad else lo - pad, hi + pad)


def _draw_panel(draw: ImageDraw.ImageDraw, origin: tuple[float, float], section: Section, panel: Panel) -> None:
    font, title_font = _font(FONT_SIZE), _font(FONT_SIZE + 1)
    size = section.panel_size
    x0, y0 = origin[0] + section.axis_left, origin[1] + PANEL_TITLE
    w, h = size
    draw.text((x0 + w / 2, origin[1] + PANEL_TITLE / 2), panel.title, fill="black", font=title_font, anchor="mm")
    (xl, xh), (yl, yh) = panel.x_range, _y_range(panel)
    if xh <= xl:
        xl, xh = xl - 0.5, xh + 0.5

    def to_px(x, y):
        return (x0 + (x - xl) / (xh - xl) * w, y0 + h - (y - yl) / (yh - yl) * h)

    y_ticks = _nice_ticks(yl, yh, 4 if h > 150 else 3)
    for t in y_ticks:
        _, py = to_px(xl, t)
        draw.line([(x0, py), (x0 + w, py)], fill=_GRID)
        step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 0.0
        draw.text((x0 - 4, py), _fmt(t, step), fill=_AXIS, font=font, anchor="rm")
    x_ticks = [t for t in _nice_ticks(xl, xh, 6 if w > 300 else 3) if t == int(t)] or [xl]
    for t in x_ticks:
        px, _ = to_px(t, yl)
        draw.line([(px, y0 + h), (px, y0 + h + 3)], fill=_AXIS)
        draw.text((px, y0 + h + 5), _fmt(t, 1.0), fill=_AXIS, font=font, anchor="mt")
    if section.x_label:
        draw.text((x0 + w / 2, y0 + h + AXIS_BOTTOM + 2), section.x_label, fill=_AXIS, font=font, anchor="mt")
    draw.rectangle([x0, y0, x0 + w, y0 + h], outline=_AXIS)
    # Thin lines first, so that a thick one (skip_connect) stays on top.
    for line in sorted(panel.lines, key=lambda line: line.width):
        segment: list[tuple[float, float]] = []
        points = [to_px(x, y) for x, y in zip(line.xs, line.ys) if math.isfinite(y)]
        for x, y in zip(line.xs, line.ys):
            if math.isfinite(y):
                segment.append(to_px(x, y))
                continue
            if len(segment) > 1:
                draw.line(segment, fill=line.colour, width=line.width, joint="curve")
            segment = []
        if len(segment) > 1:
            draw.line(segment, fill=line.colour, width=line.width, joint="curve")
        if len(line.xs) <= MAX_MARKERS:
            r = line.width + 0.5
            for px, py in points:
                draw.ellipse([px - r, py - r, px + r, py + r], fill=line.colour)


def _legend_rows(legend, width: float, font) -> list[list[tuple[str, tuple[int, int, int], int, float]]]:
    rows, row, x = [], [], 0.0
    for name, colour, line_width in legend:
        item = LEGEND_SWATCH + 6 + _text_size(font, name)[0] + 18
        if row and x + item > width:
            rows.append(row)
            row, x = [], 0.0
        row.append((name, colour, line_width, item))
        x += item
    if row:
        rows.append(row)
    return rows


def render(sections: Sequence[Section]) -> Image.Image:
    """Draw ``sections`` one under the other: title, legend, then the panels row by row."""
    font, title_font = _font(FONT_SIZE), _font(TITLE_SIZE)
    line_h = _text_size(font, "Mg")[1] + 8
    cell_sizes = [(s.panel_size[0] + s.axis_left + PANEL_GAP,
                   s.panel_size[1] + PANEL_TITLE + AXIS_BOTTOM + (line_h if s.x_label else 0) + PANEL_GAP)
                  for s in sections]  # fmt: skip
    widths = [max(len(row) for row in s.rows) * cw for s, (cw, _) in zip(sections, cell_sizes)]
    width = int(max(widths, default=200) + 2 * MARGIN)
    legends = [_legend_rows(s.legend, width - 2 * MARGIN, font) for s in sections]
    heights = [TITLE_SIZE + 12 + (line_h if s.subtitle else 0) + len(lg) * line_h + 6 + len(s.rows) * ch
               for s, lg, (_, ch) in zip(sections, legends, cell_sizes)]  # fmt: skip
    img = Image.new("RGB", (width, int(sum(heights) + 2 * MARGIN)), "white")
    draw = ImageDraw.Draw(img)
    y = MARGIN
    for section, legend, (cw, ch), height in zip(sections, legends, cell_sizes, heights):
        draw.text((MARGIN, y), section.title, fill="black", font=title_font)
        ly = y + TITLE_SIZE + 12
        if section.subtitle:
            draw.text((MARGIN, ly + line_h / 2), section.subtitle, fill=_AXIS, font=font, anchor="lm")
            ly += line_h
        for row in legend:
            x = MARGIN
            for name, colour, line_width, item in row:
                cy = ly + line_h / 2
                draw.line([(x, cy), (x + LEGEND_SWATCH, cy)], fill=colour, width=line_width + 1)
                draw.text((x + LEGEND_SWATCH + 6, cy), name, fill="black", font=font, anchor="lm")
                x += item
            ly += line_h
        py = ly + 6
        for row in section.rows:
            for i, panel in enumerate(row):
                _draw_panel(draw, (MARGIN + i * cw, py), section, panel)
            py += ch
        y += height
    return img


def save_figure(sections: Sequence[Section], path: str) -> None:
    """Render ``sections`` into a PNG at ``path``, atomically (an interrupted write keeps the old one)."""
    from fastnas.run.checkpoint import atomic_write

    image = render(sections)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_search_plots(out_dir: str, history: Sequence[dict]) -> list[str]:
    """Write ``curves.png`` and, where the log has architecture weights, ``arch_weights.png``
    to ``out_dir``; returns the names written."""
    written = []
    for name, figure in ((CURVES_NAME, curve_figure(history)), (ARCH_WEIGHTS_NAME, arch_weight_figure(history))):
        if figure:
            save_figure(figure, os.path.join(out_dir, name))
            written.append(name)
    return written


def read_log(run_dir: str) -> list[dict]:
    """The epoch records of a search's ``log.jsonl``."""
    path = os.path.join(run_dir, LOG_NAME)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def redraw(run_dir: str) -> list[str]:
    """Draw a run folder's pictures again from its ``log.jsonl``; returns the names written."""
    return write_search_plots(run_dir, read_log(run_dir))
