#!/usr/bin/env python
"""The largest search-step batch that fits on this GPU, per configuration.

    python benchmarks/largest_batch.py --from benchmarks/results/cuda_search_step.csv [--verify all]

Activation memory of a search step grows linearly with the batch, so each row's
peak memory above the network's (measured by bench_search_step.py at one batch)
gives a per-sample cost and, with the GPU's free memory, an estimated largest
batch. ``--verify NETWORK:BACKEND:MEMORY,...`` (or ``all``) then runs one step at each
estimate in a fresh process to check it fits, stepping down to 90% and 80% of it
when it does not. Writes cuda_largest_batch.md under --out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
try:
    import fastnas  # noqa: F401
except ImportError:  # running from a clone that is not installed
    sys.path.insert(0, str(REPO))

from fastnas import bench  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="a cuda_search_step.csv")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument(
        "--verify", default="", help="comma list of NETWORK:BACKEND:MEMORY (or 'all') to run once at the estimate"
    )
    parser.add_argument("--step-timeout", type=float, default=240.0, help="seconds for each verification run")
    parser.add_argument("--headroom", type=float, default=0.9, help="fraction of free memory to plan for")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("largest_batch.py needs a CUDA GPU", file=sys.stderr)
        return 1
    source = Path(args.source)
    if not source.is_file():
        print(f"no such file: {source}", file=sys.stderr)
        return 1
    free, total = torch.cuda.mem_get_info()
    usable_mib = free * args.headroom / 2**20
    rows = [r for r in csv.DictReader(source.open()) if r.get("peak_memory_mib")]
    lines = [
        f"# Largest search-step batch on {torch.cuda.get_device_name(0)}",
        "",
        f"Free memory {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; planned with {args.headroom:.0%} of it. "
        "Estimate: usable memory / (peak memory at the measured batch / that batch), since activation memory "
        "is linear in the batch.",
        "",
        "| network | backend | memory | measured batch | peak MiB | MiB per sample | estimated largest batch |",
        "|---|---|---|---|---|---|---|",
    ]
    estimates = {}
    for r in rows:
        batch = int(r["batch_size"])
        per_sample = float(r["peak_memory_mib"]) / batch
        est = int(usable_mib // per_sample)
        estimates[f"{r['network']}:{r['backend']}:{r['memory']}"] = est
        lines.append(
            f"| {r['network']} | {r['backend']} | {r['memory']} | {batch} | {float(r['peak_memory_mib']):.0f} "
            f"| {per_sample:.1f} | {est} |"
        )
    wanted = list(estimates) if args.verify == "all" else [v for v in args.verify.split(",") if v]
    if wanted:
        lines += [
            "",
            "Verification: one search step at the estimate in a fresh process; on failure at 90% and 80% of it.",
            "",
            "| configuration | batch | result | step ms | peak MiB |",
            "|---|---|---|---|---|",
        ]
    for key in wanted:
        est = estimates.get(key)
        if est is None:
            lines.append(f"| {key} | | no such row in {source} | | |")
            continue
        for batch in dict.fromkeys(max(1, int(est * f)) for f in (1.0, 0.9, 0.8)):
            row = _run_once(key, batch, args.step_timeout)
            lines.append(f"| {key} | {batch} | {row['result']} | {row.get('ms', '')} | {row.get('mib', '')} |")
            print(lines[-1], flush=True)
            if row["result"] == "fits":
                break
    text = "\n".join(lines) + "\n"
    out = Path(args.out) / "cuda_largest_batch.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


def _run_once(key: str, batch: int, timeout: float) -> dict:
    """One search step of ``key`` at ``batch`` in a fresh process: fits, out of memory, or another failure."""
    network, backend, memory = key.split(":")
    cmd = [
        sys.executable, "-m", "fastnas.bench", "--network", network, "--backend", backend, "--memory", memory,
        "--batch-size", str(batch), "--device", "cuda", "--reps", "1", "--warmup", "0", "--no-count-ops",
    ]  # fmt: skip
    out, why = bench.run_child(cmd, timeout)
    if out is not None:
        return {"result": "fits", "ms": f"{out['step_ms_median']:.0f}", "mib": f"{out['peak_memory_mib']:.0f}"}
    return {"result": "out of memory" if "out of memory" in why.lower() else why}


if __name__ == "__main__":
    sys.exit(main())
