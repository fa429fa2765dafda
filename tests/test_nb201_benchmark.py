"""NAS-Bench-201 ground truth: a small benchmark file in the package's own format, read by
rank-eval, train and select (--benchmark), and the errors of a missing, corrupt or partial file."""

import io
import json
import os
import random
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from fastnas.cli import main
from fastnas.spaces.nb201 import NB201_PRIMITIVES, NB201Arch, NB201Encoding, nb201_edges
from fastnas.spaces.nb201.benchmark import BenchmarkError, BenchmarkMetric, NB201Benchmark, benchmark_string

api = pytest.importorskip("nas_201_api")

SEEDS = (777, 888)
# (dataset, evaluation set) of the trials written for each schedule.
SETS = {"cifar10-valid": ("x-valid", "ori-test"), "cifar100": ("x-valid", "x-test")}
OFFSETS = {"x-valid": 0.0, "ori-test": 0.5, "x-test": 0.25}


def final_accuracy(base: float, hp: str, dataset: str, set_name: str, seed: int) -> float:
    """The accuracy (percent) a trial of the file reaches after its last epoch; every choice moves it."""
    return (
        base
        + OFFSETS[set_name]
        + (1.0 if hp == "200" else 0.0)
        + (2.0 if dataset == "cifar100" else 0.0)
        + (0.125 if seed == SEEDS[1] else 0.0)
    )


def expected_accuracy(base: float, dataset="cifar10-valid", set_name="x-valid", hp="200") -> float:
    """The mean over the file's trials, as a fraction."""
    return sum(final_accuracy(base, hp, dataset, set_name, s) for s in SEEDS) / len(SEEDS) / 100


def _trial(arch: str, hp: str, dataset: str, seed: int, base: float):
    epochs = 3  # the schedule's name is the key ("12", "200"); three epochs keep the file small
    trial = api.ResultsCount(
        dataset, None, {e: 40.0 + e for e in range(epochs)}, {e: 2.0 - 0.5 * e for e in range(epochs)}, 0.1, 10.0,
        {"name": "infer.tiny", "channel": 16, "num_cells": 5, "arch_str": arch, "class_num": 10}, seed, epochs,
        [0.01],
    )  # fmt: skip
    accs, losses, times = {}, {}, {}
    for set_name in SETS[dataset]:
        final = final_accuracy(base, hp, dataset, set_name, seed)
        for e in range(epochs):
            # Earlier epochs are lower: the reader must take the last one.
            accs[f"{set_name}@{e}"] = final - 10.0 * (epochs - 1 - e)
            losses[f"{set_name}@{e}"] = 1.0
            times[f"{set_name}@{e}"] = 0.5
    trial.update_eval(accs, losses, times)
    return trial


def write_benchmark(path, cells: dict, unevaluated=()) -> None:
    """A benchmark file as the package loads it: ``{"meta_archs", "arch2infos", "evaluated_indexes"}``,
    each evaluated cell's ``ArchResults`` state for the 12-epoch ("less") and 200-epoch ("full")
    schedules. ``cells`` maps an architecture string to its base accuracy (percent)."""
    meta_archs = list(cells) + list(unevaluated)
    arch2infos = {}
    for index, (arch, base) in enumerate(cells.items()):
        states = {}
        for key, hp in (("less", "12"), ("full", "200")):
            results = api.ArchResults(index, arch)
            for dataset in SETS:
                for seed in SEEDS:
                    results.update(dataset, seed, _trial(arch, hp, dataset, seed, base))
            states[key] = results.state_dict()
        arch2infos[index] = states
    torch.save({"meta_archs": meta_archs, "arch2infos": arch2infos, "evaluated_indexes": list(range(len(cells)))}, path)


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


CELL_A = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|"
CELL_B = "|skip_connect~0|+|none~0|nor_conv_3x3~1|+|nor_conv_1x1~0|skip_connect~1|avg_pool_3x3~2|"
CELL_C = "|avg_pool_3x3~0|+|nor_conv_1x1~0|none~1|+|skip_connect~0|nor_conv_3x3~1|none~2|"


@pytest.fixture
def bench_file(tmp_path):
    path = tmp_path / "NAS-Bench-201-tiny.pth"
    write_benchmark(path, {CELL_A: 80.0, CELL_B: 70.0}, unevaluated=[CELL_C])
    return str(path)


# --- the cell string ----------------------------------------------------------------------------


def test_fastnas_cells_are_the_packages_strings():
    """A gene vector's string parses, in the package, to the same edges and operations."""
    encoding = NB201Encoding()
    rng = random.Random(1)
    assert NB201_PRIMITIVES == ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]
    for _ in range(50):
        genes = encoding.sample(rng)
        text = benchmark_string(encoding.to_arch(genes))
        assert text == encoding.describe(genes)
        nodes = api.NASBench201API.str2lists(text)
        matrix = api.NASBench201API.str2matrix(text)
        for g, (i, j) in zip(genes, nb201_edges()):
            assert (NB201_PRIMITIVES[g], j) in nodes[i - 1]
            # The package numbers the operations in the same order as fastnas' candidates.
            assert matrix[i, j] == g
    # Inputs given out of order are put in the benchmark's order.
    shuffled = NB201Arch([[("nor_conv_3x3", 0)], [("nor_conv_1x1", 1), ("skip_connect", 0)],
                          [("nor_conv_3x3", 2), ("avg_pool_3x3", 0), ("none", 1)]])  # fmt: skip
    assert benchmark_string(shuffled) == CELL_A
    assert benchmark_string({"arch": CELL_A}) == CELL_A
    with pytest.raises(BenchmarkError, match="does not have"):
        benchmark_string(CELL_A.replace("nor_conv_1x1", "sep_conv_3x3"))
    with pytest.raises(BenchmarkError, match="not a NAS-Bench-201 cell"):
        benchmark_string("|nor_conv_3x3|")


# --- the reader ---------------------------------------------------------------------------------


def test_reader_takes_the_chosen_accuracy_of_each_cell(bench_file):
    bench = NB201Benchmark(bench_file)
    assert bench.index(CELL_A) == 0 and bench.index(CELL_B) == 1
    assert bench.accuracy(CELL_A) == pytest.approx(expected_accuracy(80.0))
    assert bench.accuracy(NB201Arch.from_string(CELL_B)) == pytest.approx(expected_accuracy(70.0))
    cases = [
        (BenchmarkMetric("cifar10-valid", "test"), ("cifar10-valid", "ori-test", "200")),
        (BenchmarkMetric("cifar10-valid", "valid", 12), ("cifar10-valid", "x-valid", "12")),
        (BenchmarkMetric("cifar100", "valid"), ("cifar100", "x-valid", "200")),
        (BenchmarkMetric("cifar100", "test", 12), ("cifar100", "x-test", "12")),
    ]
    for metric, (dataset, set_name, hp) in cases:
        value = NB201Benchmark(bench_file, metric).accuracy(CELL_A)
        assert value == pytest.approx(expected_accuracy(80.0, dataset, set_name, hp)), metric
    assert "cifar10-valid valid accuracy after 200 epochs" in bench.describe()


def test_reader_errors(bench_file, tmp_path, monkeypatch):
    with pytest.raises(BenchmarkError, match="no NAS-Bench-201 benchmark file at"):
        NB201Benchmark(str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a benchmark")
    with pytest.raises(BenchmarkError, match="not a readable NAS-Bench-201 benchmark file"):
        NB201Benchmark(str(corrupt))
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(BenchmarkError, match="not a readable NAS-Bench-201 benchmark file"):
        NB201Benchmark(str(other))
    bench = NB201Benchmark(bench_file)
    absent = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    with pytest.raises(BenchmarkError, match=r"is not in the benchmark file .*\(3 architectures\)"):
        bench.accuracy(absent)
    with pytest.raises(BenchmarkError, match="has no results"):
        bench.accuracy(CELL_C)
    with pytest.raises(BenchmarkError, match="no ImageNet16-120 results"):
        NB201Benchmark(bench_file, BenchmarkMetric("ImageNet16-120")).accuracy(CELL_A)
    with pytest.raises(BenchmarkError, match="has no 'valid' accuracy"):
        BenchmarkMetric("cifar10", "valid")
    monkeypatch.setitem(sys.modules, "nas_201_api", None)
    with pytest.raises(BenchmarkError, match="pip install nas-bench-201"):
        NB201Benchmark(bench_file)


def test_fastnas_imports_without_the_package():
    code = (
        "import sys; sys.modules['nas_201_api'] = None\n"
        "import fastnas, fastnas.cli, fastnas.tools.rank_eval, fastnas.spaces.nb201.benchmark\n"
        "fastnas.cli.build_parser()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- the commands -------------------------------------------------------------------------------


def _sampled_cells(architectures: int, seed: int = 0) -> list[str]:
    """The cells rank-eval draws with these settings (its own sampler)."""
    from fastnas.data import load_dataset
    from fastnas.tools.rank_eval import RankEvalSettings, Setting, _sample_architectures, _search_config

    settings = RankEvalSettings(architectures=architectures, seed=seed)
    config = _search_config(settings, Setting("base"))
    _train, _test, info = load_dataset("digits", seed=config.seed)
    encoding, archs = _sample_architectures(settings, config, info)
    return [encoding.describe(genes) for genes in archs]


RANK_EVAL = ("rank-eval", "--architectures", "3", "--epochs", "1", "--bn-batches", "1", "--no-progress")


def test_rank_eval_reads_the_benchmark(tmp_path):
    cells = _sampled_cells(3)
    bases = dict(zip(cells, (91.0, 85.5, 88.25)))
    bench = tmp_path / "bench.pth"
    write_benchmark(bench, bases)
    out = str(tmp_path / "re")
    code, stdout, err = run_cli(*RANK_EVAL, "--out", out, "--benchmark", str(bench))
    assert code == 0, err
    assert "| base | spos |" in stdout and "sparse tau-b" in stdout
    assert "standalone.json" not in stdout and not os.path.exists(os.path.join(out, "standalone.json"))
    with open(os.path.join(out, "pairs-base.json")) as f:
        pairs = json.load(f)["pairs"]
    assert sorted(p["description"] for p in pairs) == sorted(cells)
    for p in pairs:
        assert p["standalone_accuracy"] == pytest.approx(expected_accuracy(bases[p["description"]]))
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["benchmark"] == {"file": str(bench), "dataset": "cifar10-valid", "set": "valid", "epochs": 200}
    row = report["settings"][0]
    assert "sparse_kendall_tau" in row and "sparse_kendall_tau_b" in row
    assert os.path.getsize(os.path.join(out, "scatter-base.png")) > 1000
    # The test accuracy of the 12-epoch schedule, on request.
    code, _, err = run_cli(
        *RANK_EVAL, "--out", out, "--benchmark", str(bench), "--benchmark-set", "test", "--benchmark-epochs", "12"
    )
    assert code == 0, err
    with open(os.path.join(out, "pairs-base.json")) as f:
        pairs = json.load(f)["pairs"]
    for p in pairs:
        expected = expected_accuracy(bases[p["description"]], "cifar10-valid", "ori-test", "12")
        assert p["standalone_accuracy"] == pytest.approx(expected)


def test_rank_eval_benchmark_errors(tmp_path, monkeypatch):
    cells = _sampled_cells(3)
    out = str(tmp_path / "re")

    def fails(*extra):
        code, _, err = run_cli(*RANK_EVAL, "--out", out, *extra)
        assert code == 1 and err.startswith("fastnas rank-eval: error:") and "Traceback" not in err, err
        assert err.count("\n") == 1, err
        return err

    assert "no NAS-Bench-201 benchmark file at" in fails("--benchmark", str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 not a benchmark")
    assert "not a readable NAS-Bench-201 benchmark file" in fails("--benchmark", str(corrupt))
    partial = tmp_path / "partial.pth"
    write_benchmark(partial, {cells[0]: 90.0, cells[2]: 80.0})
    err = fails("--benchmark", str(partial))
    assert f"{cells[1]} is not in the benchmark file" in err
    assert "nb201 space" in fails("--benchmark", str(partial), "--space", "darts")
    monkeypatch.setitem(sys.modules, "nas_201_api", None)
    assert "pip install nas-bench-201" in fails("--benchmark", str(partial))
    # Nothing was trained for any of these.
    assert not os.path.exists(os.path.join(out, "supernet-base", "checkpoint.pt"))


def test_train_reports_the_benchmark_beside_its_own(tmp_path, bench_file):
    out = str(tmp_path / "train")
    args = ("train", CELL_A, "--space", "nb201", "--epochs", "1", "--init-channels", "4", "--layers", "1",
            "--batch-size", "128", "--no-progress", "--out", out)  # fmt: skip
    code, stdout, err = run_cli(*args, "--benchmark", bench_file)
    assert code == 0, err
    assert "test accuracy:" in stdout
    line = "NAS-Bench-201 (NAS-Bench-201-tiny.pth), cifar10-valid valid accuracy after 200 epochs: "
    assert f"{line}{100 * expected_accuracy(80.0):.2f}%" in stdout
    # A cell the file lacks ends the command before any training.
    code, _, err = run_cli(*args[:1], CELL_C, *args[2:-1], str(tmp_path / "c"), "--benchmark", bench_file)
    assert code == 1 and "has no results" in err
    assert not os.path.exists(tmp_path / "c" / "checkpoint.pt")


def test_select_reports_the_best_cells_benchmark_accuracy(tmp_path):
    run = str(tmp_path / "spos")
    code, _, err = run_cli(
        "search", "--method", "spos", "--space", "nb201", "--epochs", "1", "--init-channels", "4", "--out", run,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    select = ("select", run, "--strategy", "random", "--candidates", "3", "--bn-batches", "1", "--no-progress",
              "--out", str(tmp_path / "sel"))  # fmt: skip
    code, stdout, err = run_cli(*select)
    assert code == 0, err
    with open(tmp_path / "sel" / "genotype.json") as f:
        best = json.load(f)["arch"]
    bench = tmp_path / "bench.pth"
    write_benchmark(bench, {CELL_C: 60.0, best: 77.0} if best != CELL_C else {best: 77.0})
    code, stdout, err = run_cli(*select, "--benchmark", str(bench), "--benchmark-dataset", "cifar100")
    assert code == 0, err
    assert f"best: {best}" in stdout
    expected = 100 * expected_accuracy(77.0, "cifar100", "x-valid")
    assert f"NAS-Bench-201 (bench.pth), cifar100 valid accuracy after 200 epochs: {expected:.2f}%" in stdout
    # A missing file ends the command before the selection.
    other = str(tmp_path / "sel2")
    code, _, err = run_cli(*select[:-1], other, "--benchmark", str(tmp_path / "missing.pth"))
    assert code == 1 and "no NAS-Bench-201 benchmark file at" in err
    assert not os.path.exists(os.path.join(other, "select-random.json"))
