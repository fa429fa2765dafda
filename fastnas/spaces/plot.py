"""Pictures of cells as PNG files, drawn with Pillow alone (no graphviz, no matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

_NODE_W, _NODE_H = 70, 30
_COLOURS = {"input": (180, 220, 250), "node": (250, 235, 170), "output": (200, 240, 190)}


def _font():
    return ImageFont.load_default()


def _arrow(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], colour=(60, 60, 60)) -> None:
    draw.line([a, b], fill=colour, width=2)
    angle = math.atan2(b[1] - a[1], b[0] - a[0])
    for side in (-0.45, 0.45):
        tip = (b[0] - 10 * math.cos(angle + side), b[1] - 10 * math.sin(angle + side))
        draw.line([b, tip], fill=colour, width=2)


def _box_edge(centre: tuple[float, float], towards: tuple[float, float]) -> tuple[float, float]:
    """Where the segment from ``centre`` to ``towards`` leaves the node's box."""
    dx, dy = towards[0] - centre[0], towards[1] - centre[1]
    if dx == 0 and dy == 0:
        return centre
    scale = min(
        (_NODE_W / 2) / abs(dx) if dx else float("inf"),
        (_NODE_H / 2) / abs(dy) if dy else float("inf"),
    )
    return centre[0] + dx * scale, centre[1] + dy * scale


def draw_cell(
    title: str,
    inputs: Sequence[str],
    nodes: Sequence[str],
    edges: Sequence[tuple[int, int, str]],
    outputs: Sequence[int],
    output_name: str,
    size: tuple[int, int] = (900, 420),
) -> Image.Image:
    """One cell as an image.

    States are numbered inputs first, then ``nodes``; ``edges`` are
    (source state, target state, label); ``outputs`` are the states joined
    into the output box named ``output_name``.
    """
    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    draw.text((10, 8), title, fill="black", font=font)
    pos: list[tuple[float, float]] = []
    for i in range(len(inputs)):
        pos.append((60, height * (0.15 + 0.7 * i / max(1, len(inputs) - 1))))
    for i in range(len(nodes)):
        x = 200 + (width - 400) * i / max(1, len(nodes) - 1)
        # Alternate heights so edges that skip a node do not run through it.
        pos.append((x, height * (0.38 if i % 2 == 0 else 0.62)))
    out_pos = (width - 60, height / 2)
    labels = list(inputs) + list(nodes)

    for src, dst, label in edges:
        a, b = pos[src], pos[dst]
        start, end = _box_edge(a, b), _box_edge(b, a)
        _arrow(draw, start, end)
        # Labels sit nearer the target, where edges into one node fan apart.
        mid = (start[0] + 0.6 * (end[0] - start[0]), start[1] + 0.6 * (end[1] - start[1]))
        box = draw.textbbox(mid, label, font=font, anchor="mm")
        draw.rectangle(box, fill="white")
        draw.text(mid, label, fill=(150, 20, 20), font=font, anchor="mm")
    for s in outputs:
        _arrow(draw, _box_edge(pos[s], out_pos), _box_edge(out_pos, pos[s]), colour=(140, 140, 140))

    def node(centre, text, kind):
        x, y = centre
        box = [x - _NODE_W / 2, y - _NODE_H / 2, x + _NODE_W / 2, y + _NODE_H / 2]
        draw.rectangle(box, fill=_COLOURS[kind], outline="black")
        draw.text(centre, text, fill="black", font=font, anchor="mm")

    for i, centre in enumerate(pos):
        node(centre, labels[i], "input" if i < len(inputs) else "node")
    node(out_pos, output_name, "output")
    return img


def stack_images(images: Sequence[Image.Image], path) -> None:
    """Write ``images`` one under the other as a PNG at ``path``."""
    width = max(im.width for im in images)
    height = sum(im.height for im in images)
    canvas = Image.new("RGB", (width, height), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height
    canvas.save(path, format="PNG")
