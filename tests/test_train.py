"""fastnas train: the evaluation networks against the papers' figures, the training loop, the command and its errors."""

import json
import os
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from genotypes import DARTS_V2
from torch.utils.flop_counter import FlopCounterMode

from fastnas.cli import main
from fastnas.nn.operations import drop_path
from fastnas.spaces import NB201Arch, genotype_to_dict
from fastnas.spaces.darts import Genotype
from fastnas.spaces.darts.eval_network import EvalCell, NetworkCIFAR, NetworkImageNet
from fastnas.spaces.nb201.eval_network import NB201Network
from fastnas.train import TrainConfig, Trainer, build_eval_network
from fastnas.train.augment import Cutout, cutout_at, tensor_augmentation
from fastnas.train.report import count_flops, count_parameters
from fastnas.train.trainer import classification_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB201_BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
NB201_LARGEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
# C=4, 3 cells, 10% of the digits: nine steps of 16 images.
TINY = ["--epochs", "1", "--init-channels", "4", "--layers", "3", "--batch-size", "16", "--fraction", "0.1",
        "--no-progress"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def genotype_file(tmp_path):
    path = tmp_path / "darts_v2.json"
    path.write_text(json.dumps(genotype_to_dict(DARTS_V2)))
    return path


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def strip_times(records):
    return [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in records]


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


# --- the networks -----------------------------------------------------------------------


def test_darts_networks_have_the_papers_parameter_counts():
    with torch.device("meta"):
        cifar = NetworkCIFAR(36, 10, 20, True, DARTS_V2)
        imagenet = NetworkImageNet(48, 1000, 14, True, DARTS_V2)
    # DARTS (second order) reports 3.3M parameters on CIFAR-10 and 4.7M on ImageNet, auxiliary head left out.
    params, aux = count_parameters(cifar)
    assert round(params / 1e6, 1) == 3.3 and aux > 0
    assert round(count_parameters(imagenet)[0] / 1e6, 1) == 4.7


def test_nb201_network_has_the_benchmarks_size_and_flops():
    with torch.device("meta"):
        net = NB201Network(NB201Arch.from_string(NB201_LARGEST), C=16, N=5, num_classes=10)
    # NAS-Bench-201's figures for its largest CIFAR-10 cell: 1.531546 MB parameters, 220.11968 M FLOPs
    # (multiply-adds); flop_counter counts two per multiply-add.
    assert count_parameters(net) == (1_531_546, 0)
    assert count_flops(net, 3, 32, "meta") == 2 * 220_119_680


def test_flops_are_flop_counters():
    torch.manual_seed(0)
    net = NetworkCIFAR(4, 10, 3, False, DARTS_V2).eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 8, 8))
    assert count_flops(net, 3, 8, "cpu") == counter.get_total_flops() > 0


def test_network_outputs_and_auxiliary_head():
    torch.manual_seed(0)
    net = NetworkCIFAR(4, 10, 5, True, DARTS_V2)
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    assert [cell.reduction for cell in net.cells] == [False, True, False, True, False]
    net.eval()
    assert net(torch.randn(2, 3, 32, 32))[1] is None
    imagenet = NetworkImageNet(8, 7, 3, True, DARTS_V2)
    logits, aux = imagenet(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 7) and aux.shape == (1, 7)
    nb201 = NB201Network(NB201Arch.from_string(NB201_BEST), C=4, N=1, num_classes=5)
    logits, aux = nb201(torch.randn(2, 3, 8, 8))
    assert logits.shape == (2, 5) and aux is None and len(nb201.cells) == 5


def test_nodes_that_reach_no_output_are_found():
    from fastnas.spaces.darts.eval_network import unused_states

    assert unused_states(DARTS_V2.normal, DARTS_V2.normal_concat) == set()
    # Node 1 (state 3) is not joined into the output and no later node takes it; node 0 (state 2) feeds node 3.
    gene = [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 2), ("skip_connect", 1)] + DARTS_V2.normal[4:]
    assert unused_states(gene, [4, 5]) == {3}
    assert unused_states(gene[:6] + [("skip_connect", 0), ("skip_connect", 1)], [4, 5]) == {2, 3}
    net = NetworkCIFAR(4, 10, 3, False, Genotype(gene, [4, 5], DARTS_V2.reduce, DARTS_V2.reduce_concat))
    assert net.has_unused_parameters() and not NetworkCIFAR(4, 10, 3, False, DARTS_V2).has_unused_parameters()


# --- the training recipe ------------------------------------------------------------------


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.randn(4000, 2, 3, 3)
    y = drop_path(x, 0.3)
    dropped = (y == 0).flatten(1).all(1)
    assert abs(dropped.float().mean() - 0.3) < 0.03
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.7)
    assert drop_path(x, 0.0) is x


def test_drop_path_spares_identity_edges():
    skips = Genotype([("skip_connect", 0), ("skip_connect", 1)] * 2, [2, 3], [("skip_connect", 0)] * 4, [2, 3])
    convs = Genotype([("sep_conv_3x3", 0), ("sep_conv_3x3", 1)] * 2, [2, 3], [("skip_connect", 0)] * 4, [2, 3])
    x0, x1 = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    for genotype, random in ((skips, False), (convs, True)):
        cell = EvalCell(genotype.normal, genotype.normal_concat, 4, 4, 4, False, False)
        for m in cell.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()  # running statistics would change between the two calls
        a, b = cell(x0, x1, 0.9), cell(x0, x1, 0.9)
        assert torch.equal(a, b) != random


def test_drop_path_rises_linearly_to_the_final_probability():
    config = TrainConfig.create("darts", "cifar10", genotype=genotype_to_dict(DARTS_V2), epochs=10)
    trainer = Trainer(config)
    assert [trainer.drop_path_prob(e) for e in (0, 5, 9)] == pytest.approx([0.0, 0.1, 0.18])


def test_auxiliary_loss_weight_and_label_smoothing():
    torch.manual_seed(0)
    logits, aux, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    expected = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
    torch.testing.assert_close(classification_loss(logits, aux, y, 0.4), expected)
    torch.testing.assert_close(classification_loss(logits, None, y, 0.4), F.cross_entropy(logits, y))
    # DARTS' CrossEntropyLabelSmooth: (1 - eps) on the target, eps / classes everywhere.
    targets = torch.zeros(6, 5).scatter_(1, y[:, None], 1) * 0.9 + 0.1 / 5
    smooth = (-targets * logits.log_softmax(1)).mean(0).sum()
    torch.testing.assert_close(classification_loss(logits, None, y, 0.4, label_smoothing=0.1), smooth)


def settings(config, *names):
    return tuple(getattr(config, name) for name in names)


def test_papers_defaults():
    genotype = genotype_to_dict(DARTS_V2)
    cifar = TrainConfig.create("darts", "cifar10", genotype=genotype)
    assert settings(cifar, "init_channels", "layers", "auxiliary", "auxiliary_weight") == (36, 20, True, 0.4)
    assert settings(cifar, "drop_path_prob", "cutout", "epochs", "batch_size") == (0.2, 16, 600, 96)
    assert settings(cifar, "lr", "lr_schedule", "weight_decay", "grad_clip") == (0.025, "cosine", 3e-4, 5.0)
    imagenet = TrainConfig.create("darts", "imagenet", genotype=genotype)
    assert settings(imagenet, "init_channels", "layers", "label_smoothing", "epochs") == (48, 14, 0.1, 250)
    assert settings(imagenet, "lr", "lr_schedule", "lr_gamma", "weight_decay") == (0.1, "exponential", 0.97, 3e-5)
    nb201 = TrainConfig.create("nb201", "cifar10", genotype={"arch": NB201_BEST})
    assert settings(nb201, "init_channels", "layers", "epochs", "batch_size", "nesterov") == (16, 5, 200, 256, True)
    assert settings(nb201, "lr", "weight_decay", "cutout", "grad_clip") == (0.1, 5e-4, 0, None)
    digits = TrainConfig.create("darts", "digits", genotype=genotype)
    assert settings(digits, "flip", "auxiliary", "image_size") == (False, False, 8)


def darts_cutout_mask(h, w, y, x, length):
    """The mask of DARTS' utils.Cutout for a given centre (the oracle)."""
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.0
    return torch.from_numpy(mask)


@pytest.mark.parametrize("size,length", [(32, 16), (8, 2), (9, 5)])
def test_cutout_is_dartss(size, length):
    image = torch.rand(3, size, size) + 1
    for y in range(size):
        for x in range(size):
            expected = image * darts_cutout_mask(size, size, y, x, length)
            assert torch.equal(cutout_at(image, y, x, length), expected), (y, x)
    # Applied every time, centred anywhere: squares clipped at the borders occur, whole ones too.
    torch.manual_seed(0)
    erased = {int((Cutout(length)(image) == 0).sum()) // 3 for _ in range(500)}
    side = 2 * (length // 2)
    assert min(erased) > 0 and max(erased) == side * side and min(erased) < side * side


def test_crop_pads_with_black_and_digits_are_not_flipped():
    torch.manual_seed(0)
    image = torch.full((3, 8, 8), 5.0)
    augment = tensor_augmentation(8, 1, flip=False, cutout=0, fill=[-0.8, -0.8, -0.8])
    values = torch.cat([augment(image).unique() for _ in range(20)]).unique()
    assert values.tolist() == pytest.approx([-0.8, 5.0])
    asymmetric = torch.arange(64.0).view(1, 8, 8).expand(3, 8, 8)
    assert torch.equal(tensor_augmentation(8, 0, flip=False, cutout=0, fill=[0.0] * 3)(asymmetric), asymmetric)


# --- the command --------------------------------------------------------------------------


def test_train_end_to_end_through_the_cli(tmp_path, genotype_file, capsys):
    out = tmp_path / "train"
    assert main(["train", str(genotype_file), *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed and "FLOPs per image" in printed and "latency" in printed
    report = json.loads((out / "report.json").read_text())
    assert [r["epoch"] for r in read_log(out)] == [1]
    assert report["test_accuracy"] == read_log(out)[0]["test_acc"] and report["test_images"] == 359
    assert report["space"] == "darts" and report["genotype"] == genotype_to_dict(DARTS_V2)
    assert report["latency_ms"] > 0 and report["latency_batch_size"] == 1 and report["latency_device"] == "cpu"
    config = TrainConfig.create("darts", "digits", genotype=report["genotype"], init_channels=4, layers=3)
    net = build_eval_network(config, 10, 3).eval()
    assert report["parameters"] == sum(p.numel() for p in net.parameters())
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 8, 8))
    assert report["flops_per_image"] == counter.get_total_flops() == 2 * report["multiply_adds_per_image"]
    # An existing training is never overwritten.
    assert main(["train", str(genotype_file), *TINY, "--out", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err


def test_resume_is_exact(tmp_path, genotype_file, monkeypatch):
    args = [str(genotype_file), *TINY, "--epochs", "3"]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    assert main(["train", *args, "--out", str(whole)]) == 0

    epoch = Trainer._epoch

    def interrupted(self, model, net, parts, train_set, test_set, e):
        if e == 2:
            raise KeyboardInterrupt
        return epoch(self, model, net, parts, train_set, test_set, e)

    monkeypatch.setattr(Trainer, "_epoch", interrupted)
    assert main(["train", *args, "--out", str(parted)]) == 130
    assert len(read_log(parted)) == 2 and not (parted / "report.json").exists()
    monkeypatch.undo()
    assert main(["train", "--resume", str(parted), "--no-progress"]) == 0
    assert strip_times(read_log(parted)) == strip_times(read_log(whole))
    a, b = (torch.load(f / "checkpoint.pt", weights_only=True)["model"] for f in (whole, parted))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nb201_string_trains_with_bf16(tmp_path, capsys):
    out = tmp_path / "nb"
    args = ["train", NB201_BEST, "--space", "nb201", *TINY, "--layers", "1", "--amp", "bf16", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["space"] == "nb201" and report["architecture"] == NB201_BEST and report["amp"] == "bf16"
    assert 0.0 <= report["test_accuracy"] <= 1.0


def test_imagenet_folder_trains_with_pixel_augmentation(tmp_path, genotype_file):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / "imagenet" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "train"
    args = ["train", str(genotype_file), "--dataset", "imagenet", "--data", str(tmp_path / "imagenet"),
            "--image-size", "32", "--no-auxiliary", "--init-channels", "8", "--layers", "3", "--epochs", "1",
            "--batch-size", "4", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "imagenet" and report["test_images"] == 4 and report["image_size"] == 32


def test_search_prints_the_train_command_and_train_reads_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    search = ["--epochs", "1", "--layers", "3", "--init-channels", "4", "--batch-size", "16", "--fraction", "0.1"]
    assert main(["search", *search, "--no-progress", "--out", "found"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "fastnas train" in line]
    assert lines == ["train it from scratch: fastnas train found"]
    command = shlex.split(lines[0].split(": ", 1)[1])
    assert main([*command[1:], *TINY]) == 0
    report = json.loads((tmp_path / "runs" / "train-found" / "report.json").read_text())
    assert report["dataset"] == "digits"
    assert report["genotype"] == json.loads((tmp_path / "found" / "genotype.json").read_text())


def test_train_command_names_the_device_and_processes_of_the_search():
    from fastnas.cli import _train_command

    assert _train_command("runs/my run", "cpu", 1) == "fastnas train 'runs/my run'"
    assert _train_command("out", "cuda", 2) == "torchrun --nproc_per_node 2 -m fastnas train out --device cuda"


# --- errors -------------------------------------------------------------------------------


def error_cases(tmp_path, genotype_file):
    darts = genotype_to_dict(DARTS_V2)
    corrupt_run = tmp_path / "corrupt_run"
    corrupt_run.mkdir()
    write_json(corrupt_run / "genotype.json", darts)
    (corrupt_run / "checkpoint.pt").write_bytes(b"\x00garbage")
    corrupt_training = tmp_path / "corrupt_training"
    corrupt_training.mkdir()
    (corrupt_training / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    return [
        ([str(tmp_path / "missing.json")], "neither a file, a folder nor"),
        ([str(tmp_path / "bad.json")], "is not valid JSON"),
        ([write_json(tmp_path / "other.json", {"layers": 3})], "holds neither a DARTS genotype"),
        ([write_json(tmp_path / "op.json", dict(darts, normal=[["sep_conv_9x9", 0]] + darts["normal"][1:]))],
         "unknown primitive(s) ['sep_conv_9x9']"),
        ([write_json(tmp_path / "edges.json", dict(darts, normal=darts["normal"][:7]))], "has 7 edges"),
        ([write_json(tmp_path / "state.json", dict(darts, normal=[["sep_conv_3x3", 4]] + darts["normal"][1:]))],
         "cannot take input state 4"),
        ([str(genotype_file), "--space", "nb201"], "holds a DARTS genotype, but --space nb201 was asked for"),
        ([write_json(tmp_path / "nb.json", {"arch": NB201_BEST}), "--space", "darts"],
         "holds a NAS-Bench-201 architecture, but --space darts"),
        ([NB201_BEST, "--space", "darts"], "holds a NAS-Bench-201 architecture, but --space darts"),
        (["|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|", "--space", "nb201"], "has 2 nodes and 3 edges"),
        (["|nor_conv_3x3~0|+|conv_9x9~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|none~2|"],
         "unknown primitive(s) ['conv_9x9']"),
        (["|nor_conv_3x3~0|+|nor_conv_3x3|"], "malformed NAS-Bench-201 string"),
        ([str(tmp_path / "empty_run")], "holds no genotype.json"),
        ([str(corrupt_run)], "is corrupt, truncated or not a checkpoint"),
        (["--resume", str(corrupt_training)], "is corrupt, truncated or not a checkpoint"),
        (["--resume", str(tmp_path / "nowhere")], "no checkpoint at"),
        ([], "give the architecture to train"),
        ([str(genotype_file), "--auxiliary"], "auxiliary head needs images of at least 32x32"),
    ]  # fmt: skip


def test_every_error_is_one_line_without_traceback(tmp_path, genotype_file, capsys):
    for args, message in error_cases(tmp_path, genotype_file):
        assert main(["train", *args, "--no-progress"]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("fastnas train: error: ") and err.count("\n") == 1, err
        assert message in err, (message, err)
        assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


NO_TORCHVISION = """
import sys
from fastnas.cli import main
import fastnas.search, fastnas.train
code = main(["train", "missing.json"])
sys.exit(code if "torchvision" not in sys.modules else 99)
"""


def test_a_real_process_fails_cleanly_and_needs_no_torchvision_until_it_trains(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", NO_TORCHVISION], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("fastnas train: error:") and "Traceback" not in proc.stderr


# --- several processes ----------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from torch.utils.data import TensorDataset
    from fastnas.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    genotype, out = json.loads(sys.argv[1]), sys.argv[2]
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g))
    test = TensorDataset(torch.randn(21, 3, 8, 8, generator=g), torch.randint(0, 4, (21,), generator=g))
    info = {"num_classes": 4, "in_channels": 3, "image_size": 8}
    config = TrainConfig.create("darts", "digits", genotype=genotype, epochs=2, batch_size=16, init_channels=4,
                                layers=3)
    trainer = Trainer(config, dataset=(train, test, info), progress=False)
    result = trainer.run()
    torch.save({"state": trainer.net.state_dict(), "history": result.history, "world": config.world_size},
               os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
    """
)


@pytest.mark.slow
def test_two_gloo_processes_train_identical_weights(tmp_path):
    script = tmp_path / "run_train.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(genotype_to_dict(DARTS_V2)), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k
    assert strip_times(ranks[0]["history"]) == strip_times(ranks[1]["history"])
    # Every test image counted once over the two ranks: accuracies are multiples of 1/21.
    assert all(abs(r["test_acc"] * 21 - round(r["test_acc"] * 21)) < 1e-9 for r in ranks[0]["history"])
