"""Smoke tests of the benchmark harness: helpers, the ops benchmark's pieces and
the search-step benchmark on a tiny network. Correctness of timings is not
tested (they depend on the machine), only that the harness measures what it says.
"""

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from fastnas import backends, bench

REPO = Path(__file__).resolve().parent.parent


def _load_bench_ops():
    spec = importlib.util.spec_from_file_location("bench_ops", REPO / "benchmarks" / "bench_ops.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules["bench_ops"] = module
    spec.loader.exec_module(module)
    return module


def test_time_cpu_quartiles_and_untimed_setup():
    calls = {"setup": 0, "fn": 0}

    def setup():
        calls["setup"] += 1

    def fn():
        calls["fn"] += 1

    t = bench.time_cpu(fn, setup=setup, warmup=2, min_reps=7, min_time_s=0.0)
    assert t.reps == 7 and calls["fn"] == 9 and calls["setup"] == 9
    assert 0 <= t.q25_ms <= t.median_ms <= t.q75_ms


def test_time_fn_cpu_drops_cuda_options():
    t = bench.time_fn(lambda: None, "cpu", rep_ms=5, min_reps=3, min_time_s=0.0)
    assert t.reps == 3


def test_peak_memory_cpu_sees_a_large_allocation():
    if not bench.reset_peak_rss():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    nbytes = 96 * 2**20
    # Filled, so its pages become resident; large enough to be its own mapping.
    peak = bench.peak_memory(lambda: torch.ones(nbytes // 4), "cpu")
    assert peak is not None and peak >= 0.9 * nbytes


def test_count_ops_counts_aten_and_fused_ops():
    xs = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, requires_grad=True)

    from fastnas.ops import mixed_sum

    def step():
        mixed_sum(xs, w).sum().backward()

    counter = bench.count_ops(step)
    assert counter.total("aten") > 0
    if backends.resolve("darts_edge", "cpu") == "cpu":
        assert counter.counts["fastnas::mixed_sum"] == 1
        assert counter.counts["fastnas::mixed_sum_backward"] == 1
    assert counter.total() == counter.total("aten") + counter.total("fastnas")


def test_write_results(tmp_path):
    env = {"device": "test", "commit": bench.git_commit()}
    rows = [{"a": 1, "b": 0.12345}, {"a": 2, "b": float("nan"), "c": "ignored"}]
    md, csv_path = bench.write_results(rows, ["a", "b"], tmp_path / "x", "title", env, ["a note"])
    text = md.read_text()
    assert "- device: test" in text and "| a | b |" in text and "| 1 | 0.123 |" in text and "a note" in text
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "# device: test" and "a,b" in lines and "2," in lines


def test_environment_names_versions():
    env = bench.environment("cpu")
    for key in ("device", "torch", "triton", "commit", "date", "available_backends"):
        assert env[key]


def test_ops_benchmark_pieces_on_a_tiny_case():
    bo = _load_bench_ops()
    case = bo.Case("partial_channel_mixed_sum", 3, (2, 4, 3, 3), (2, 4, 6, 6), pool=True)
    # fwd: 3 inputs + pooled-from bypass + output; bwd: grad out, xs twice, bypass twice.
    n_x, n_b, n_out = 2 * 4 * 9, 2 * 4 * 36, 2 * 8 * 9
    assert bo.minimal_bytes(case, "fwd") == 4 * (3 * n_x + n_b + n_out)
    assert bo.minimal_bytes(case, "bwd") == 4 * (n_out + 2 * 3 * n_x + 2 * n_b)
    impls = [i for i in bo.implementations("cpu", None) if i != "compile"]
    assert "eager" in impls and "compile" in bo.implementations("cpu", None)
    ref = bo.Prepared(case, "eager", "cpu")
    for impl in impls:
        prep = bo.Prepared(case, impl, "cpu")
        assert bo.check_against(prep.out, ref.out) == ""
        for mode in bo.MODES:
            fn, setup = prep.closure(mode)
            t = bench.time_cpu(fn, setup=setup, warmup=1, min_reps=2, min_time_s=0.0)
            assert t.median_ms > 0


def test_run_bench_step_tiny(capsys):
    pytest.importorskip("fastnas.spaces.darts")
    parser = bench.add_bench_step_args(argparse.ArgumentParser())
    args = parser.parse_args(
        "--network pc-darts --channels 4 --layers 2 --batch-size 2 --image-size 8 "
        "--reps 1 --warmup 0 --threads 1 --device cpu".split()
    )
    threads = torch.get_num_threads()
    result = bench.run_bench_step(args)
    assert torch.get_num_threads() == threads
    assert result["network"] == "pc-darts" and result["reps"] == 1
    assert result["step_ms_median"] > 0 and math.isfinite(result["loss"])
    assert result["ops_per_step"]["aten"] > 100
    assert result["backend_used"] in backends.available_backends()
    assert '"step_ms_median"' in capsys.readouterr().out


def test_search_step_benchmark_script_tiny(tmp_path):
    """The script end to end: a fresh process per configuration, ratios against the
    reference row, and the live-memory run (fixed mmap threshold) on the CPU."""
    import subprocess

    cmd = [
        sys.executable, str(REPO / "benchmarks" / "bench_search_step.py"), "--networks", "darts",
        "--configs", "reference:save,auto:recompute", "--channels", "4", "--layers", "2", "--batch-size", "2",
        "--image-size", "8", "--reps", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path), "--tag", "tiny",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import csv

    rows = list(
        csv.DictReader(line for line in (tmp_path / "cpu_search_step_tiny.csv").open() if not line.startswith("#"))
    )
    assert [(r["backend"], r["memory"]) for r in rows] == [("reference", "save"), ("auto", "recompute")]
    for r in rows:
        assert not r["note"], r["note"]
        assert float(r["step_ms_median"]) > 0 and float(r["live_peak_mib"]) >= 0
        assert int(r["aten_ops"]) > 100
    assert float(rows[0]["time_vs_reference"]) == 1.0
    if float(rows[0]["live_peak_mib"]) > 0:  # a tiny step may stay inside memory the process already had
        assert float(rows[0]["live_vs_reference"]) == 1.0
    assert float(rows[1]["aten_ops_vs_reference"]) > 0
    assert "MALLOC_MMAP_THRESHOLD_" in (tmp_path / "cpu_search_step_tiny.md").read_text()


def test_epoch_benchmark_script_tiny(tmp_path):
    """One whole (tiny) search epoch per configuration, in fresh processes, with speed-ups
    against the eager reference measured in the same run."""
    import csv
    import subprocess

    cmd = [
        sys.executable, str(REPO / "benchmarks" / "bench_epoch.py"), "--configs", "reference,auto,auto-recompute",
        "--images", "32", "--batch-size", "8", "--image-size", "8", "--channels", "4", "--layers", "2",
        "--threads", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "cpu_epoch.csv").open()))
    assert [r["config"] for r in rows] == ["reference", "auto", "auto-recompute"]
    for r in rows:
        assert not r["note"], r["note"]
        assert float(r["epoch_s"]) > 0 and float(r["images_per_s"]) > 0 and math.isfinite(float(r["train_loss"]))
        assert r["cuda_graph"] == "False"  # on the CPU the default never captures
    assert float(rows[0]["speedup"]) == 1.0
    assert "| auto-recompute | False |" in (tmp_path / "cpu_epoch.md").read_text()


def test_host_benchmark_script_tiny(tmp_path):
    """benchmarks/bench_host.py end to end on a tiny network: every configuration in one
    process, interleaved, ratios against the eager reference, profiler events split
    into the network and the optimisers."""
    import csv
    import subprocess

    cmd = [
        sys.executable, str(REPO / "benchmarks" / "bench_host.py"), "--networks", "darts,pc-darts",
        "--configs", "original,reference,save,recompute,save-composite,save-kept-preprocess", "--channels", "4",
        "--layers", "2", "--reps", "2", "--warmup", "1", "--out", str(tmp_path), "--tag", "tiny",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(line for line in (tmp_path / "cpu_host_cost_tiny.csv").open() if not line[0] == "#"))
    got = {(r["network"], r["config"]): r for r in rows}
    assert len(rows) == 12 and got[("pc-darts", "original")]["note"]
    fused = "cpu" in backends.available_backends()
    for (network, config), r in got.items():
        if network == "pc-darts" and config == "original":
            continue
        assert not r["note"], r["note"]
        assert float(r["host_ms_median"]) > 0 and int(r["profiler_events"]) > 1000
        assert int(r["network_events"]) + int(r["optimizer_events"]) <= int(r["profiler_events"])
        # Each fused edge (DARTS) or node (PC-DARTS) is one op per direction, and so is each of
        # a cell's two preprocessings where it is recomputed (relu_conv_bn): 2 cells, 2 steps.
        edges = 2 * 14 * 2 * 2 if network == "darts" else 2 * 4 * 2 * 2
        if config in ("save", "recompute") and fused:
            assert int(r["fastnas_ops"]) == edges + 2 * 2 * 2 * 2
        if config == "save-kept-preprocess" and fused:
            assert int(r["fastnas_ops"]) == edges
        if config == "save-composite" and fused:  # the Python composite: a dozen building blocks per edge
            assert int(r["fastnas_ops"]) > 5 * int(got[(network, "save")]["fastnas_ops"])
    assert float(got[("darts", "reference")]["time_vs_reference"]) == 1.0
    assert float(got[("darts", "original")]["loss"]) > 0
    assert "profiler_events" in (tmp_path / "cpu_host_cost_tiny.md").read_text()


def test_bench_step_host_mode_tiny(capsys):
    parser = bench.add_bench_step_args(argparse.ArgumentParser())
    args = parser.parse_args("--host --channels 4 --layers 2 --reps 2 --warmup 1 --device cpu".split())
    threads = torch.get_num_threads()
    result = bench.run_bench_step(args)
    assert torch.get_num_threads() == threads
    assert result["mode"] == "host" and result["batch_size"] == 2 and result["image_size"] == 8
    assert result["threads"] == 1 and result["reps"] == 2
    assert result["host_ms_median"] > 0 and result["profiler_events"] > result["network_events"] > 0
    assert '"host_ms_median"' in capsys.readouterr().out


def test_bench_step_imagenet_memory_mode_tiny(capsys, tmp_path):
    """--imagenet: the PC-DARTS K=2 eager baseline and the fused rows, each in a fresh process, with the
    memory per image and the projected batch (tiny shapes here; the mode's own defaults are 224x224)."""
    from fastnas.bench import memory as bench_memory

    parser = bench.add_bench_step_args(argparse.ArgumentParser())
    args = parser.parse_args(
        "--imagenet --imagenet-memory save --image-size 32 --batch-size 2 --channels 4 --layers 2 "
        "--num-classes 5 --device cpu --device-memory 1 --out".split()
        + [str(tmp_path)]
    )
    result = bench.run_bench_step(args)
    assert [(r["network"], r["partial_channels"], r["backend"]) for r in result["rows"]] == [
        ("pc-darts", 2, "reference"), ("pc-darts", 2, "auto"), ("darts", None, "auto")
    ]  # fmt: skip
    for r in result["rows"]:
        assert r["per_image_mib"] is not None, r.get("note")
        # Batches 2 and 4: the difference over 2 per image, the rest fixed.
        assert r["per_image_mib"] == pytest.approx((r["peak_2b_mib"] - r["peak_mib"]) / 2)
        assert r["fixed_mib"] + 2 * r["per_image_mib"] == pytest.approx(r["peak_mib"])
        assert r["largest_batch"] == bench_memory.projected_batch(1, r["per_image_mib"], r["fixed_mib"])
    assert result["num_classes"] == 5
    out = capsys.readouterr().out
    assert "| PC-DARTS K=2, eager (baseline) |" in out and "largest batch in 1 GiB" in out
    assert "| fastnas DARTS full space, save |" in (tmp_path / "cpu_imagenet_memory.md").read_text()


def test_projected_batch():
    from fastnas.bench.memory import projected_batch

    assert projected_batch(80, 9.2) == 8904 and projected_batch(80, 0) == 0
    assert projected_batch(1, 10, fixed_mib=24) == 100 and projected_batch(1, 10, fixed_mib=2048) == 0
    with pytest.raises(ValueError, match="save and recompute"):
        parser = bench.add_bench_step_args(argparse.ArgumentParser())
        bench.run_bench_step(parser.parse_args("--imagenet --imagenet-memory checkpoint".split()))


def test_engine_ops_compile_column_matches_eager():
    """bench_engine_ops' compile column: the compiled reference of a forward and of a backward pass
    gives the eager reference's values (compiled before the timing)."""
    spec = importlib.util.spec_from_file_location("bench_engine_ops", REPO / "benchmarks" / "bench_engine_ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine_ops"] = module  # its dataclasses look the module up while built
    spec.loader.exec_module(module)
    case = module.batch_norm_case(2, 3, 2, 5, "cpu", torch.float32)
    assert "compile" in module.implementations(case.op, "cpu", None)
    for make in case.passes.values():
        want = make("reference")()
        got = module.compiled(make("reference"))()
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_engine_ops_node_sum_passes_match_eager():
    """The node sum's compiled backward alone (its compiled forward's backward graph) and every op's
    fwd+bwd pass, fused and compiled, give the eager reference's gradients."""
    spec = importlib.util.spec_from_file_location("bench_engine_ops", REPO / "benchmarks" / "bench_engine_ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine_ops"] = module
    spec.loader.exec_module(module)
    node = module.node_case(2, 8, 4, [2, 1], "cpu", torch.float32)
    want = node.passes["bwd"]("reference")()
    for got in (node.compiled["bwd"](), node.passes["bwd"]("cpu")):
        for g, w in zip(got(), want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    cases = [node, module.depthwise_case(2, 3, 6, 1, "cpu", torch.float32)]
    cases += [module.darts_sum_case(2, 3, 6, 4, 1, "cpu", torch.float32)]
    for case in cases:
        make = case.passes["fwd+bwd"]
        want = make("reference")()
        for got in (make("cpu")(), module.compiled(make("reference"))()):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_repo_root_is_the_repository():
    """Child benchmark processes run from the repository root, and the commit is read there."""
    assert (bench.REPO_ROOT / "setup.py").is_file() and (bench.REPO_ROOT / "fastnas").is_dir()
