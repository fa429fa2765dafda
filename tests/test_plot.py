"""cells.png is legible: no two edges run along one another, no label touches another label, edge or box.

The drawing code returns what it drew where (edge paths as polylines, label
boxes); these tests check that geometry on every cell structure the searches
can produce, and draw the pictures the searches write.
"""

import itertools
import random

import pytest
import torch
from genotypes import DARTS_V1, DARTS_V2, P_DARTS, PC_DARTS
from PIL import Image

from fastnas.spaces import Genotype, NB201Arch, SearchNetwork, plot_genotype, plot_nb201
from fastnas.spaces.plot import assign_tracks, layout_cell

EPS = 1e-6

# The worst cases: every edge from c_{k-1} into consecutive nodes, and every edge from one input.
FROM_PREVIOUS = Genotype(
    normal=[("sep_conv_3x3", 1), ("dil_conv_5x5", 0)] + [("sep_conv_5x5", 1), ("skip_connect", 2)]
    + [("dil_conv_3x3", 1), ("max_pool_3x3", 3)] + [("avg_pool_3x3", 1), ("sep_conv_3x3", 4)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 1)] * 4, reduce_concat=[2, 3, 4, 5],
)  # fmt: skip
OPS = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "max_pool_3x3", "avg_pool_3x3", "skip_connect"]


def every_darts_cell():
    """All 180 ways the four nodes can pick two different earlier states, with varied operations."""
    choices = [list(itertools.combinations(range(2 + i), 2)) for i in range(4)]
    for k, picks in enumerate(itertools.product(*choices)):
        yield [(OPS[(k + e) % len(OPS)], j) for e, j in enumerate(j for pair in picks for j in pair)]


# --- geometry ---------------------------------------------------------------------------


def segments(edge):
    return list(zip(edge.points, edge.points[1:]))


def boxes_overlap(a, b):
    return a[0] < b[2] - EPS and b[0] < a[2] - EPS and a[1] < b[3] - EPS and b[1] < a[3] - EPS


def segment_enters_box(p, q, box):
    """Whether segment pq passes through the inside of ``box`` (Liang-Barsky clipping)."""
    x0, y0, x1, y1 = box[0] + EPS, box[1] + EPS, box[2] - EPS, box[3] - EPS
    dx, dy = q[0] - p[0], q[1] - p[1]
    lo, hi = 0.0, 1.0
    for step, gap in ((-dx, p[0] - x0), (dx, x1 - p[0]), (-dy, p[1] - y0), (dy, y1 - p[1])):
        if step == 0:
            if gap < 0:
                return False
            continue
        t = gap / step
        if step < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
    return lo < hi


def run_along(s, t):
    """Whether segments s and t lie on one line and share more than a point."""
    (a, b), (c, d) = s, t
    ux, uy = b[0] - a[0], b[1] - a[1]
    cross = lambda px, py: ux * (py - a[1]) - uy * (px - a[0])  # noqa: E731
    if abs(cross(*c)) > EPS or abs(cross(*d)) > EPS:
        return False
    length2 = ux * ux + uy * uy
    if length2 == 0:
        return False
    proj = sorted(((c[0] - a[0]) * ux + (c[1] - a[1]) * uy) / length2 for c in (c, d))
    return min(1.0, proj[1]) - max(0.0, proj[0]) > EPS


def on_path(point, edge):
    x, y = point
    return any(
        min(p[0], q[0]) - EPS <= x <= max(p[0], q[0]) + EPS and min(p[1], q[1]) - EPS <= y <= max(p[1], q[1]) + EPS
        for p, q in segments(edge)
    )


def assert_legible(g):
    width, height = g.size
    labelled = [e for e in g.edges if e.label_box is not None]
    for e in g.edges:
        assert all(0 <= x <= width and 0 <= y <= height for x, y in e.points), (g.title, e)
        # A path touches its own two boxes at its ends and enters no box.
        for p, q in segments(e):
            for box in g.boxes:
                assert not segment_enters_box(p, q, box), (g.title, e.source, e.target, box)
    for e, f in itertools.combinations(g.edges, 2):
        for s, t in itertools.product(segments(e), segments(f)):
            assert not run_along(s, t), f"{g.title}: edges {e.source}->{e.target} and {f.source}->{f.target} overlap"
    for e in labelled:
        box = e.label_box
        assert 0 <= box[0] and box[2] <= width and 0 <= box[1] and box[3] <= height
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        assert on_path(centre, e), f"{g.title}: label {e.label} is not on its edge"
        for node_box in g.boxes:
            assert not boxes_overlap(box, node_box), f"{g.title}: label {e.label} covers a node"
        for f in g.edges:
            if f is not e:
                for p, q in segments(f):
                    assert not segment_enters_box(p, q, box), (
                        f"{g.title}: edge {f.source}->{f.target} crosses label {e.label} of {e.source}->{e.target}"
                    )
    for e, f in itertools.combinations(labelled, 2):
        assert not boxes_overlap(e.label_box, f.label_box), f"{g.title}: labels {e.label} and {f.label} overlap"


# --- tests ------------------------------------------------------------------------------


def test_the_checks_catch_overlaps():
    assert run_along(((0, 0), (10, 0)), ((5, 0), (20, 0)))
    assert not run_along(((0, 0), (10, 0)), ((10, 0), (20, 0)))
    assert not run_along(((0, 0), (10, 0)), ((5, -5), (5, 5)))
    assert segment_enters_box((5, -5), (5, 5), (0, -1, 10, 1))
    assert not segment_enters_box((5, 1), (5, 5), (0, -1, 10, 1))
    assert boxes_overlap((0, 0, 10, 10), (9, 9, 20, 20)) and not boxes_overlap((0, 0, 10, 10), (10, 0, 20, 10))


def test_nested_spans_stack_and_disjoint_spans_share_a_track():
    assert assign_tracks([(0, 2), (1, 2), (2, 4), (0, 4)]) == [1, 0, 0, 2]


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2, PC_DARTS, P_DARTS, FROM_PREVIOUS], ids=lambda g: "")
def test_published_and_worst_case_cells_are_legible(genotype, tmp_path):
    geometries = plot_genotype(genotype, tmp_path / "cells.png")
    assert [g.title for g in geometries] == ["normal cell", "reduction cell"]
    for g in geometries:
        assert len([e for e in g.edges if e.label]) == 8 and len(g.edges) == 12
        assert_legible(g)
    with Image.open(tmp_path / "cells.png") as im:
        assert im.format == "PNG" and im.height == sum(g.size[1] for g in geometries)


def test_every_darts_cell_structure_is_legible():
    for gene in every_darts_cell():
        edges = [(j, 2 + pos // 2, op) for pos, (op, j) in enumerate(gene)]
        assert_legible(layout_cell("cell", ["c_{k-2}", "c_{k-1}"], list("0123"), edges, [2, 3, 4, 5], "c_{k}"))


def test_cells_of_searched_networks_are_legible(tmp_path):
    torch.manual_seed(0)
    net = SearchNetwork(C=4, layers=3, num_classes=3)
    for _ in range(10):
        with torch.no_grad():
            for p in net.arch_parameters():
                p.normal_()
        for g in plot_genotype(net.genotype(), tmp_path / "cells.png"):
            assert_legible(g)


def test_every_nb201_cell_is_legible(tmp_path):
    rng = random.Random(0)
    ops = ["skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
    # Drawn edges are the ones that are not none: every subset of the six.
    for keep in itertools.product([False, True], repeat=6):
        it = iter(keep)
        nodes = [[(rng.choice(ops) if next(it) else "none", j) for j in range(i)] for i in range(1, 4)]
        (g,) = plot_nb201(NB201Arch(nodes), tmp_path / "cell.png")
        assert len(g.edges) == sum(keep)
        assert_legible(g)
