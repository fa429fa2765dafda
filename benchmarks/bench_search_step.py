#!/usr/bin/env python
"""Search-step benchmark: one first-order DARTS step (architecture step on a
validation batch, then weight step on a training batch) of the DARTS and
PC-DARTS CIFAR networks, fused backend vs reference backend vs checkpointing.

    python benchmarks/bench_search_step.py [--device cpu|cuda] [--batch-size 64] [--reps 3] [--out DIR]

Every configuration runs in a fresh process (``python -m fastnas.bench``, the
same code as ``fastnas bench-step``), so that on the CPU the peak resident
memory above the baseline taken after the network is built belongs to that
configuration alone. Writes <device>_search_step.md/.csv under DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import fastnas  # noqa: F401
except ImportError:  # running from a clone that is not installed
    sys.path.insert(0, str(REPO))

from fastnas import bench  # noqa: E402

COLUMNS = [
    "network", "backend", "backend_used", "memory", "batch_size", "threads", "reps", "step_ms_median", "step_ms_q25",
    "step_ms_q75", "time_vs_reference", "peak_memory_mib", "memory_vs_reference", "live_peak_mib",
    "live_vs_reference", "aten_ops", "aten_ops_vs_reference",
    "fastnas_ops", "graph_step_ms_median", "graph_speedup", "graph_capture_ms", "graph_peak_memory_mib", "compiled",
    "compile_s", "note",
]  # fmt: skip
# The eager reference first: the fused engine (memory save and recompute) and
# torch.utils.checkpoint around each eager mixed op are measured against it.
DEFAULT_CONFIGS = "reference:save,auto:save,auto:recompute,auto:checkpoint"


def child_command(args, network: str, backend: str, memory: str, compiled: bool = False) -> list[str]:
    cmd = [
        sys.executable, "-m", "fastnas.bench", "--network", network, "--backend", backend, "--memory", memory,
        "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--device", args.device,
        "--channels", str(args.channels), "--layers", str(args.layers), "--warmup", str(args.warmup),
    ]  # fmt: skip
    if args.reps is not None:
        cmd += ["--reps", str(args.reps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_count_ops:
        cmd.append("--no-count-ops")
    if args.stem != "cifar":
        cmd += ["--stem", args.stem]
    if args.cuda_graph:
        cmd.append("--cuda-graph")
    if compiled:
        cmd.append("--compile")
    return cmd


# glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so the
# process's peak resident memory also counts memory that was free at the peak.
# With a fixed threshold of 128 KiB every tensor is its own mapping, returned to
# the system when freed: the peak resident memory is then the peak of live memory.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_config(args, network: str, backend: str, memory: str, compiled: bool = False) -> dict:
    row = {"network": network, "backend": backend, "memory": memory, "batch_size": args.batch_size}
    row["compiled"] = compiled
    result, why = bench.run_child(child_command(args, network, backend, memory, compiled), args.timeout)
    if result is None:
        return {**row, "note": why}
    ops = result.get("ops_per_step") or {}
    row = {**row, **result, "aten_ops": ops.get("aten"), "fastnas_ops": ops.get("fastnas")}
    if args.device == "cpu" and args.live_memory and not compiled:
        cmd = child_command(args, network, backend, memory) + ["--reps", "1", "--warmup", "0", "--no-count-ops"]
        live, why = bench.run_child(cmd, args.timeout, LIVE_MEMORY_ENV)
        if live is None:
            row["note"] = f"live-memory run {why}"
        else:
            row["live_peak_mib"] = live["peak_memory_mib"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--networks", default="darts,pc-darts")
    parser.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma list of backend:memory[:compile] (compile: the network through torch.compile)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-count-ops", action="store_true")
    parser.add_argument(
        "--stem",
        choices=("cifar", "imagenet"),
        default="cifar",
        help="imagenet: three stride-2 convolutions (use with --image-size 224)",
    )
    parser.add_argument("--cuda-graph", action="store_true", help="capture the step as a CUDA graph and replay it")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument(
        "--no-live-memory",
        dest="live_memory",
        action="store_false",
        help="CPU: skip the second run of each configuration that measures the peak of live memory",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        # So that the device line of the results names the children's thread count.
        torch.set_num_threads(args.threads)
    env = bench.environment(args.device)
    env["command"] = " ".join(["python", "benchmarks/bench_search_step.py", *(sys.argv[1:] if argv is None else argv)])
    print(json.dumps(env), flush=True)
    stem = Path(args.out) / f"{args.device}_search_step{'_' + args.tag if args.tag else ''}"
    notes = [
        f"One first-order DARTS step, batch {args.batch_size}, {args.image_size}x{args.image_size} ({args.stem} stem), "
        f"C={args.channels}, {args.layers} cells: Adam step of the architecture on a validation batch, "
        "then SGD step of the weights (grad clip 5) on a training batch; each configuration in a fresh process.",
        "Peak memory: "
        + (
            "torch.cuda.max_memory_allocated above memory_allocated after the network was built."
            if args.device == "cuda"
            else "peak resident memory (VmHWM) above resident memory after the network, optimisers and batches were "
            "built. "
            "live_peak_mib: the same in a second run of one step with glibc's mmap threshold fixed at 128 KiB "
            "(MALLOC_MMAP_THRESHOLD_=131072), so that freed tensors leave the process at once and the peak counts "
            "live memory only; that run is slower and its time is not reported."
        ),
        "Ops: ops reaching the dispatcher below autograd in one step (TorchDispatchMode), forward, backward "
        "and optimisers; fastnas_ops are the fused kernels among them.",
        "time_vs_reference and memory_vs_reference: this row over the same network with backend=reference, "
        "memory=save, not compiled.",
        "compiled rows: the network through torch.compile (static shapes, default mode), optimisers eager; "
        "compile_s is the first step, which compiles (not in the median); ops are not counted.",
    ]
    rows = []
    for network in [n.strip() for n in args.networks.split(",") if n.strip()]:
        ref = None
        for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
            backend, memory, *flags = config.split(":") + [""]
            compiled = "compile" in flags
            t0 = time.perf_counter()
            row = run_config(args, network, backend, memory or "save", compiled)
            print(
                f"{network:9s} {backend:10s} {memory or 'save':11s} "
                + (
                    f"{row['step_ms_median']:9.0f} ms  {row['peak_memory_mib']:8.0f} MiB  "
                    f"{row.get('aten_ops')} aten ops"
                    if "step_ms_median" in row
                    else row.get("note", "")
                )
                + f"  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            rows.append(row)
            if backend == "reference" and (memory or "save") == "save" and not compiled and "step_ms_median" in row:
                ref = row
        if ref is not None:
            for row in rows:
                if row["network"] == network and "step_ms_median" in row:
                    row["time_vs_reference"] = row["step_ms_median"] / ref["step_ms_median"]
                    row["memory_vs_reference"] = row["peak_memory_mib"] / max(ref["peak_memory_mib"], 1e-9)
                    if row.get("live_peak_mib") and ref.get("live_peak_mib"):
                        row["live_vs_reference"] = row["live_peak_mib"] / ref["live_peak_mib"]
                    if row.get("aten_ops") and ref.get("aten_ops"):
                        row["aten_ops_vs_reference"] = row["aten_ops"] / ref["aten_ops"]
        env["load_average_end"] = bench.load_average()
        bench.write_results(rows, COLUMNS, stem, f"fastnas search-step benchmark ({args.device})", env, notes)
    print(f"wrote {stem}.md and {stem}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
