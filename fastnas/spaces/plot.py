"""Pictures of cells as PNG files, drawn with Pillow alone (no graphviz, no matplotlib).

A cell is laid out so that nothing overlaps, by construction rather than by
luck. The states stand in one row, left to right: the cell inputs, the
intermediate nodes, the output. Every labelled edge leaves its source from a
port on top of the box, rises to a track of its own height, runs right and
drops into a port on top of its target; edges into the output run below the
row the same way. Then

- tracks are given out as intervals: two edges share one only if their spans
  of columns do not overlap, so horizontal runs never lie on one another, and
  an edge that spans another runs above it;
- ports are distinct points along a box, so vertical runs never lie on one
  another; incoming ports sit left of outgoing ones and are ordered by track,
  so edges at one node do not cross;
- a label sits on its own edge's track in the gap just left of the target box.
  Vertical runs stand only above boxes, never in gaps, and a gap is wider than
  any label, so no label touches another edge; labels in one gap are on
  different tracks, spaced more than a label's height apart.

``layout_cell`` returns that geometry (edge paths as polylines, label boxes),
which the tests check, and ``render_cell`` draws it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

Point = tuple[float, float]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1

FONT_SIZE = 14
MARGIN = 24
NODE_HEIGHT = 32
NODE_PADDING = 14  # text to box side
MIN_NODE_WIDTH = 56
PORT_SPACING = 14
PORT_MARGIN = 10  # outermost port to box side
LABEL_PADDING = 4  # text to label box side
GAP_MARGIN = 10  # label box to the boxes on either side of its gap
TRACK_SPACING = 28
TITLE_HEIGHT = 30
ARROW_LENGTH = 9

_FILL = {"input": (193, 230, 193), "node": (190, 222, 240), "output": (240, 232, 175)}
_EDGE_COLOUR = (55, 55, 55)
_OUTPUT_EDGE_COLOUR = (150, 150, 150)
_LABEL_COLOUR = (150, 25, 25)


@dataclass
class EdgePath:
    """One drawn edge: states ``source`` -> ``target`` (``target`` = number of states: the output box)."""

    source: int
    target: int
    label: str | None
    points: list[Point]
    label_box: Box | None = None


@dataclass
class CellGeometry:
    """Where everything of one cell picture is: node boxes (states, then the output), edge paths, labels."""

    title: str
    size: tuple[int, int]
    names: list[str]
    kinds: list[str]
    boxes: list[Box]
    edges: list[EdgePath] = field(default_factory=list)


@functools.cache
def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[float, float]:
    x0, y0, x1, y1 = font.getbbox(text)
    return x1 - x0, y1 - y0


def assign_tracks(spans: Sequence[tuple[int, int]]) -> list[int]:
    """A track (0 = nearest the row) per column span ``(first, last)``.

    Spans that overlap get different tracks (sharing an end column is fine: an
    edge ends at that box's left ports and the next starts at its right ones),
    and a span that contains another gets a higher track than it, so edges nest.
    """

    def overlap(a, b):
        return not (a[1] <= b[0] or b[1] <= a[0])

    def contains(outer, inner):
        return outer != inner and outer[0] <= inner[0] and inner[1] <= outer[1]

    tracks: list[int | None] = [None] * len(spans)
    for e in sorted(range(len(spans)), key=lambda e: (spans[e][1] - spans[e][0], spans[e])):
        done = [f for f in range(len(spans)) if tracks[f] is not None]
        track = 1 + max((tracks[f] for f in done if contains(spans[e], spans[f])), default=-1)
        while any(tracks[f] == track and overlap(spans[e], spans[f]) for f in done):
            track += 1
        tracks[e] = track
    return tracks


def _port_order(node: int, edges: Sequence[tuple[int, int]], tracks: Sequence[int]) -> list[int]:
    """Indices of the edges meeting ``node``, in port order left to right.

    Incoming edges first, lowest track first (a higher one passes over the
    lower ones' drops); then outgoing edges, highest track first (it rises
    before the lower ones leave).
    """
    incoming = sorted((e for e, (s, t) in enumerate(edges) if t == node), key=lambda e: tracks[e])
    outgoing = sorted((e for e, (s, t) in enumerate(edges) if s == node), key=lambda e: -tracks[e])
    return incoming + outgoing


def _ports(box: Box, count: int) -> list[float]:
    """``count`` x positions along ``box``, PORT_SPACING apart, centred."""
    x0, _, x1, _ = box
    start = (x0 + x1) / 2 - (count - 1) * PORT_SPACING / 2
    return [start + k * PORT_SPACING for k in range(count)]


def layout_cell(
    title: str,
    inputs: Sequence[str],
    nodes: Sequence[str],
    edges: Sequence[tuple[int, int, str]],
    outputs: Sequence[int],
    output_name: str | None,
) -> CellGeometry:
    """Where every box, edge and label of a cell goes.

    States are numbered inputs first, then ``nodes``; ``edges`` are
    (source state, target state, label) with source < target; ``outputs`` are
    the states joined into the output box ``output_name`` (None: no output box).
    """
    font = _font()
    names = list(inputs) + list(nodes)
    kinds = ["input"] * len(inputs) + ["node"] * len(nodes)
    if output_name is not None:
        names.append(output_name)
        kinds.append("output")
    out = len(inputs) + len(nodes)
    for s, t, _ in edges:
        if not 0 <= s < t < out:
            raise ValueError(f"edge {s} -> {t}: an edge goes from a state to a later one of the {out} states")

    top = [(s, t) for s, t, _ in edges]
    bottom = [(s, out) for s in outputs] if output_name is not None else []
    top_tracks, bottom_tracks = assign_tracks(top), assign_tracks(bottom)
    top_ports = [_port_order(n, top, top_tracks) for n in range(len(names))]
    bottom_ports = [_port_order(n, bottom, bottom_tracks) for n in range(len(names))]

    label_w = max((_text_size(font, label)[0] for _, _, label in edges), default=0) + 2 * LABEL_PADDING
    label_h = _text_size(font, "Mg_{}")[1] + 2 * LABEL_PADDING
    gap = label_w + 2 * GAP_MARGIN
    widths = [
        max(
            _text_size(font, name)[0] + 2 * NODE_PADDING,
            MIN_NODE_WIDTH,
            (max(len(top_ports[n]), len(bottom_ports[n])) - 1) * PORT_SPACING + 2 * PORT_MARGIN,
        )
        for n, name in enumerate(names)
    ]
    top_levels = max(top_tracks, default=-1) + 1
    bottom_levels = max(bottom_tracks, default=-1) + 1
    row_top = TITLE_HEIGHT + MARGIN + top_levels * TRACK_SPACING + label_h / 2
    row_bottom = row_top + NODE_HEIGHT
    boxes, x = [], MARGIN
    for w in widths:
        boxes.append((x, row_top, x + w, row_bottom))
        x += w + gap
    width = int(math.ceil(max(x - gap + MARGIN, _text_size(font, title)[0] + 2 * MARGIN)))
    height = int(math.ceil(row_bottom + bottom_levels * TRACK_SPACING + MARGIN))

    def port_x(side_ports, node, edge):
        return _ports(boxes[node], len(side_ports[node]))[side_ports[node].index(edge)]

    paths = []
    for e, (s, t, label) in enumerate(edges):
        y = row_top - (top_tracks[e] + 1) * TRACK_SPACING
        xs, xt = port_x(top_ports, s, e), port_x(top_ports, t, e)
        # The label goes in the gap just left of the target, on this edge's track.
        cx = (boxes[t - 1][2] + boxes[t][0]) / 2
        w, h = _text_size(font, label)[0] + 2 * LABEL_PADDING, label_h
        box = (cx - w / 2, y - h / 2, cx + w / 2, y + h / 2)
        paths.append(EdgePath(s, t, label, [(xs, row_top), (xs, y), (xt, y), (xt, row_top)], box))
    for e, (s, t) in enumerate(bottom):
        y = row_bottom + (bottom_tracks[e] + 1) * TRACK_SPACING
        xs, xt = port_x(bottom_ports, s, e), port_x(bottom_ports, t, e)
        paths.append(EdgePath(s, t, None, [(xs, row_bottom), (xs, y), (xt, y), (xt, row_bottom)]))
    return CellGeometry(title, (width, height), names, kinds, boxes, paths)


def _arrow(draw: ImageDraw.ImageDraw, points: Sequence[Point], colour) -> None:
    draw.line(list(points), fill=colour, width=2, joint="curve")
    (ax, ay), (bx, by) = points[-2], points[-1]
    angle = math.atan2(by - ay, bx - ax)
    tip = [
        (bx - ARROW_LENGTH * math.cos(angle + side), by - ARROW_LENGTH * math.sin(angle + side)) for side in (-0.4, 0.4)
    ]
    draw.polygon([(bx, by), *tip], fill=colour)


def render_cell(geometry: CellGeometry) -> Image.Image:
    """Draw a laid-out cell: edges, then label boxes over their own edges, then the nodes."""
    font = _font()
    img = Image.new("RGB", geometry.size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN, MARGIN / 2), geometry.title, fill="black", font=font)
    for edge in geometry.edges:
        _arrow(draw, edge.points, _EDGE_COLOUR if edge.label is not None else _OUTPUT_EDGE_COLOUR)
    for edge in geometry.edges:
        if edge.label_box is not None:
            draw.rectangle(edge.label_box, fill="white", outline=(200, 200, 200))
            cx = (edge.label_box[0] + edge.label_box[2]) / 2
            cy = (edge.label_box[1] + edge.label_box[3]) / 2
            draw.text((cx, cy), edge.label, fill=_LABEL_COLOUR, font=font, anchor="mm")
    for name, kind, box in zip(geometry.names, geometry.kinds, geometry.boxes):
        draw.rounded_rectangle(box, radius=6, fill=_FILL[kind], outline="black", width=1)
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), name, fill="black", font=font, anchor="mm")
    return img


def save_cells(geometries: Sequence[CellGeometry], path) -> None:
    """Draw ``geometries`` one under the other into a PNG at ``path``."""
    images = [render_cell(g) for g in geometries]
    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height for im in images)), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height
    canvas.save(path, format="PNG")
