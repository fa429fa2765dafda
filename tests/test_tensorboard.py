"""--tensorboard: the log's scalars as TensorBoard event files, read back with tensorboard's own reader."""

import sys

import pytest
import torch
from search_helpers import interrupt_at, run, tiny_config, tiny_dataset
from torch.utils.data import TensorDataset

from fastnas.cli import main
from fastnas.run import scalars as scalars_module
from fastnas.search import SearchConfig, Searcher, SearchError
from fastnas.spaces import DARTS_PRIMITIVES, genotype_to_dict
from fastnas.train import TrainConfig, Trainer, TrainError

NB201_ARCH = "|skip_connect~0|+|none~0|none~1|+|none~0|none~1|none~2|"
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


pytestmark = pytest.mark.usefixtures("one_thread")


def read_events(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_search_writes_losses_accuracies_and_every_edge_weight(tmp_path):
    tb = tmp_path / "tb"
    result, _ = run(tiny_config("darts", epochs=2, tensorboard=str(tb)))
    events = read_events(tb)
    for tag in ("loss/train", "loss/search_val", "loss/val", "accuracy/train", "accuracy/search_val",
                "accuracy/val", "entropy/normal", "entropy/reduce", "search/lr"):  # fmt: skip
        assert [step for step, _ in events[tag]] == [1, 2], tag
    arch = sorted(tag for tag in events if tag.startswith("arch_weights/"))
    assert len(arch) == 2 * 14 * len(DARTS_PRIMITIVES)
    assert "arch_weights/normal/c_k-2_to_0/skip_connect" in arch and "arch_weights/reduce/2_to_3/none" in arch
    assert all(len(events[tag]) == 2 for tag in arch)
    k = DARTS_PRIMITIVES.index("skip_connect")
    for (_, value), record in zip(events["arch_weights/normal/1_to_3/skip_connect"], result.history):
        assert value == pytest.approx(record["arch_weights"]["normal"][12][k], rel=1e-6)
    assert [v for _, v in events["loss/val"]] == pytest.approx([r["val_loss"] for r in result.history], rel=1e-6)


def test_resume_may_change_the_folder_and_continues_the_steps(tmp_path, monkeypatch):
    out, first, second = tmp_path / "run", tmp_path / "tb1", tmp_path / "tb2"
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_config("darts", epochs=2, tensorboard=str(first)), str(out))
    Searcher.resume(str(out), {"tensorboard": str(second)}, dataset=tiny_dataset(), progress=False).run()
    assert [step for step, _ in read_events(first)["loss/train"]] == [1]
    assert [step for step, _ in read_events(second)["loss/train"]] == [2]
    # Resumed without the option, it keeps writing where the run began.
    Searcher.resume(str(out), dataset=tiny_dataset(), progress=False)  # no conflict


def test_nb201_gdas_and_training(tmp_path):
    tb = tmp_path / "gdas"
    run(tiny_config("gdas", space="nb201", init_channels=4, layers=1, tensorboard=str(tb)))
    events = read_events(tb)
    assert len([t for t in events if t.startswith("arch_weights/cell/")]) == 6 * 5
    assert "arch_weights/cell/0_to_1/nor_conv_3x3" in events and "search/tau" in events

    from genotypes import DARTS_V2

    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
    test = TensorDataset(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
    info = {"num_classes": 4, "in_channels": 3, "image_size": 8}
    tb = tmp_path / "train"
    config = TrainConfig.create(
        "darts", "digits", genotype=genotype_to_dict(DARTS_V2), epochs=2, batch_size=16, init_channels=4, layers=2,
        tensorboard=str(tb),
    )  # fmt: skip
    Trainer(config, dataset=(train, test, info), progress=False).run()
    events = read_events(tb)
    for tag in ("loss/train", "loss/test", "accuracy/train", "accuracy/test", "training/lr"):
        assert [step for step, _ in events[tag]] == [1, 2], tag


def test_without_tensorboard_the_option_fails_clearly(monkeypatch, capsys, tmp_path):
    # An import that fails, as where the package is not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    reason = scalars_module.missing_reason()
    assert reason is not None and "pip install tensorboard" in reason
    with pytest.raises(SearchError, match="--tensorboard needs the tensorboard package"):
        SearchConfig.create("darts", tensorboard=str(tmp_path))
    with pytest.raises(TrainError, match="--tensorboard needs the tensorboard package"):
        TrainConfig.create("nb201", "digits", genotype={"arch": NB201_ARCH}, tensorboard=str(tmp_path))
    assert main(["search", "--tensorboard", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--tensorboard needs the tensorboard package" in err and len(err.splitlines()) == 1
    # Without the option nothing asks for the package.
    assert SearchConfig.create("darts").tensorboard is None
