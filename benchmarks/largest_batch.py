#!/usr/bin/env python
"""The largest search-step batch that fits on this GPU, per configuration.

    python benchmarks/largest_batch.py --from benchmarks/results/cuda_search_step.csv [--verify darts:auto:recompute]

Activation memory of a search step grows linearly with the batch, so each row's
peak memory above the network's (measured by bench_search_step.py at one batch)
gives a per-sample cost and, with the GPU's free memory, an estimated largest
batch. ``--verify NETWORK:BACKEND:MEMORY`` then runs one step at that estimate in
a fresh process to check it fits. Writes cuda_largest_batch.md under --out.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="a cuda_search_step.csv")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--verify", default="", help="NETWORK:BACKEND:MEMORY to run once at its estimate")
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
    if args.verify:
        network, backend, memory = args.verify.split(":")
        est = estimates.get(args.verify)
        if est is None:
            lines.append(f"\nverify {args.verify}: no such row in {source}")
        else:
            cmd = [
                sys.executable, "-m", "fastnas.bench", "--network", network, "--backend", backend, "--memory", memory,
                "--batch-size", str(est), "--device", "cuda", "--reps", "1", "--warmup", "0", "--no-count-ops",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            ok = proc.returncode == 0
            tail = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["no output"])[-1]
            lines.append(
                f"\nverify: {args.verify} at batch {est}: {'ran' if ok else 'FAILED'} (exit {proc.returncode}); "
                f"last line: {tail[:400]}"
            )
    text = "\n".join(lines) + "\n"
    out = Path(args.out) / "cuda_largest_batch.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
