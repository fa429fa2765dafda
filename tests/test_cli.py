"""The fastnas command: a search end to end on the digits, and its error messages."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastnas.cli import main
from fastnas.spaces import genotype_from_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# C=4, 3 cells, 10% of the digits: four steps of 16 images.
SMALL = ["--epochs", "1", "--layers", "3", "--init-channels", "4", "--batch-size", "16", "--fraction", "0.1",
         "--no-progress"]  # fmt: skip


@pytest.fixture(autouse=True)
def keep_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def run_cli(args, cwd):
    """``python -m fastnas ARGS`` in a fresh process: (exit code, stdout + stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "fastnas", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def test_search_end_to_end_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", *SMALL, "--out", str(out)]) == 0
    for name in ("genotype.json", "cells.png", "log.jsonl", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    genotype_from_dict(json.loads((out / "genotype.json").read_text()))
    assert (out / "cells.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert {"train_loss", "val_acc", "arch_weights", "entropy", "genotype"} <= set(records[0])
    assert "genotype:" in capsys.readouterr().out

    # A finished search resumes to the same result; a conflicting option is refused.
    assert main(["search", "--resume", str(out), "--no-progress"]) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    assert main(["search", "--resume", str(out), "--method", "gdas", "--no-progress"]) == 1
    assert "method='darts'" in capsys.readouterr().err
    # Starting again over a finished search would overwrite it.
    assert main(["search", *SMALL, "--out", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    assert main(["search", "--resume", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err
    assert main(["search", "--resume", str(tmp_path / "nothing")]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_unknown_method_exits_nonzero_without_traceback(tmp_path):
    code, text = run_cli(["search", "--method", "enas"], tmp_path)
    assert code != 0
    assert "invalid choice: 'enas'" in text and "Traceback" not in text


def test_missing_data_folder_exits_nonzero_without_traceback(tmp_path):
    code, text = run_cli(["search", "--dataset", "cifar10", "--data", str(tmp_path / "missing"), "--no-progress"],
                         tmp_path)  # fmt: skip
    assert code == 1
    assert "error" in text and "missing" in text and "Traceback" not in text
    # Nothing was written for the failed search.
    assert not (tmp_path / "runs").exists()


def test_info_and_bench_step_are_delegated(capsys):
    assert main(["info"]) == 0
    assert "reference" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["bench-step", "--help"])
    assert exc.value.code == 0
    assert "--network" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is visible")
@pytest.mark.parametrize("extra", [[], ["--imagenet"]])
def test_bench_step_without_a_gpu_says_so_in_one_line(extra, capsys):
    assert main(["bench-step", "--device", "cuda", *extra]) == 1
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err


def test_help_names_every_method(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = capsys.readouterr().out
    for method in ("darts", "darts-2nd", "pc-darts", "p-darts", "gdas"):
        assert method in text
    assert "paper" in text or "papers" in text


@pytest.mark.parametrize("method", ["amended-darts", "la-darts", "scalable-darts"])
def test_darts_family_methods_from_the_command_line(method, tmp_path, capsys):
    extra = []
    if method == "la-darts":
        model = str(tmp_path / "latency.pt")
        assert main(["latency-model", "--samples", "5", "--init-channels", "4", "--layers", "2", "--warmup", "0",
                     "--repeats", "1", "--rounds", "1", "--no-progress", "--out", model]) == 0  # fmt: skip
        extra = ["--latency-model", model, "--latency-weight", "0.1"]
    if method == "scalable-darts":
        extra = ["--activations", "relu,swish"]
    out = tmp_path / "run"
    assert main(["search", "--method", method, *SMALL, *extra, "--out", str(out)]) == 0
    genotype = genotype_from_dict(json.loads((out / "genotype.json").read_text()))
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    if method == "la-darts":
        assert record["predicted_latency_ms"] > 0
    if method == "scalable-darts":
        assert set(record["arch_weights"]) == {"normal", "reduce", "activations_normal", "activations_reduce"}
        convs = [op for op, _ in genotype.normal + genotype.reduce if "conv" in op]
        assert all(op.endswith("_swish") or not op.endswith(("_relu6", "_elu")) for op in convs)
        # fastnas train builds the genotype with its activations.
        train = tmp_path / "train"
        args = ["train", str(out), "--epochs", "1", "--init-channels", "4", "--layers", "3", "--batch-size", "16",
                "--fraction", "0.1", "--no-progress", "--out", str(train)]  # fmt: skip
        assert main(args) == 0
        assert "test accuracy:" in capsys.readouterr().out
