"""The pictures a search writes: every edge's architecture weights per epoch, and the curves.

The figures are checked as the data they draw (sections, panels, lines and
their points), not as pixels; the PNG files only have to exist and open.
"""

import json
import os

import pytest
from PIL import Image
from search_helpers import interrupt_at, run, tiny_config, tiny_dataset

from fastnas.cli import main
from fastnas.search import SearchConfig, Searcher
from fastnas.search.plots import (
    ARCH_WEIGHTS_NAME,
    CURVES_NAME,
    arch_weight_figure,
    curve_figure,
    read_log,
)
from fastnas.spaces import DARTS_PRIMITIVES

pytestmark = pytest.mark.usefixtures("one_thread")


def lines_of(section):
    return [[line.name for line in panel.lines] for panel in section.panels]


def assert_pictures(out):
    for name in (ARCH_WEIGHTS_NAME, CURVES_NAME):
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200


def test_darts_search_draws_every_edge_and_the_curves(tmp_path):
    out = str(tmp_path / "run")
    result, _ = run(tiny_config("darts", epochs=2), out)
    assert_pictures(out)
    history = read_log(out)
    assert history == json.loads(json.dumps(result.history))
    sections = arch_weight_figure(history)
    assert [s.title for s in sections] == ["normal cell", "reduction cell"]
    for section, cell in zip(sections, ("normal", "reduce")):
        # A row per node (2, 3, 4, 5 incoming edges), a panel per edge, a line per candidate.
        assert [len(row) for row in section.rows] == [2, 3, 4, 5]
        assert section.panels[0].title == "c_{k-2} -> 0" and section.panels[-1].title == "2 -> 3"
        assert lines_of(section) == [list(DARTS_PRIMITIVES)] * 14
        assert [name for name, _, _ in section.legend] == list(DARTS_PRIMITIVES)
        skip = section.panels[4].lines[DARTS_PRIMITIVES.index("skip_connect")]
        assert skip.xs == [1.0, 2.0]
        assert skip.ys == [h["arch_weights"][cell][4][DARTS_PRIMITIVES.index("skip_connect")] for h in history]
        assert skip.width > section.panels[4].lines[0].width  # skip connections stand out
    (curves,) = curve_figure(history)
    loss, acc = curves.rows[0]
    assert [line.name for line in loss.lines] == ["train", "search val", "val"]
    assert [line.name for line in acc.lines] == ["train", "search val", "val"]
    assert loss.lines[0].ys == [h["train_loss"] for h in history]
    assert acc.lines[2].ys == [h["val_acc"] for h in history]
    assert [line.name for line in curves.rows[1][0].lines] == ["entropy normal", "entropy reduce"]


def test_pictures_follow_each_epoch_and_a_resumed_run_continues_them(tmp_path, monkeypatch):
    out = str(tmp_path / "cut")
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_config("darts", epochs=3), out)
    # Interrupted in its third epoch: the pictures show the two it finished.
    assert_pictures(out)
    (curves,) = curve_figure(read_log(out))
    assert curves.rows[0][0].lines[0].xs == [1.0, 2.0]
    Searcher.resume(out, dataset=tiny_dataset(), progress=False).run()
    history = read_log(out)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    (curves,) = curve_figure(history)
    assert all(line.xs == [1.0, 2.0, 3.0] for line in curves.rows[0][0].lines)
    for section in arch_weight_figure(history):
        assert all(line.xs == [1.0, 2.0, 3.0] for panel in section.panels for line in panel.lines)


def test_p_darts_lines_end_where_candidates_are_pruned(tmp_path):
    out = str(tmp_path / "run")
    run(tiny_config("p-darts", stage_keep=(5, 3)), out)
    history = read_log(out)
    normal = arch_weight_figure(history)[0]
    assert len(normal.panels) == 14
    for panel in normal.panels:
        points = {line.name: line.xs for line in panel.lines}
        assert len(points) == 8  # every candidate drawn, for the epochs it was searched
        assert sum(xs == [1.0, 2.0, 3.0] for xs in points.values()) == 3  # kept to the last stage
        assert sorted(len(xs) for xs in points.values()) == [1, 1, 1, 2, 2, 3, 3, 3]


def test_nb201_and_single_path_searches(tmp_path):
    out = str(tmp_path / "gdas")
    run(tiny_config("gdas", space="nb201", init_channels=4, layers=1), out)
    (cell,) = arch_weight_figure(read_log(out))
    assert [len(row) for row in cell.rows] == [1, 2, 3]
    assert [p.title for p in cell.panels] == ["0 -> 1", "0 -> 2", "1 -> 2", "0 -> 3", "1 -> 3", "2 -> 3"]
    assert all(len(names) == 5 for names in lines_of(cell))

    # A single-path supernet has no architecture weights: its curves only.
    out = str(tmp_path / "spos")
    cfg = SearchConfig.create("spos", dataset="digits", space="nb201", init_channels=4, batch_size=8, epochs=1)
    Searcher(cfg, out_dir=out, dataset=tiny_dataset(), progress=False).run()
    assert os.path.exists(os.path.join(out, CURVES_NAME)) and not os.path.exists(os.path.join(out, ARCH_WEIGHTS_NAME))
    (curves,) = curve_figure(read_log(out))
    assert [line.name for line in curves.rows[0][0].lines] == ["train", "val"]


def test_plot_command_redraws_a_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    run(tiny_config("darts"), out)
    for name in (ARCH_WEIGHTS_NAME, CURVES_NAME):
        os.remove(os.path.join(out, name))
    assert main(["plot", out]) == 0
    assert_pictures(out)
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "cannot read the log" in capsys.readouterr().err
