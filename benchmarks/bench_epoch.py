#!/usr/bin/env python
"""One whole epoch of a first-order DARTS search, end to end, fused vs eager.

    python benchmarks/bench_epoch.py [--device cuda] [--images 50000] [--configs reference,auto] [--out DIR]

CIFAR-10-shaped data (3x32x32, 10 classes) of random values, split half and half
between the weights and the architecture as DARTS does (25,000 + 25,000 by
default): ``fastnas.search.Searcher`` runs one epoch of the DARTS CIFAR search
network (8 cells, C=16, batch 64) with data loading, both steps, the schedule,
the evaluation and the log, exactly as ``fastnas search`` does, minus the
checkpoint file. Each configuration runs in a fresh process:

- ``reference``: the eager candidate modules (the baseline);
- ``reference-graph``: the same under a CUDA graph (the fair comparison on a GPU);
- ``auto`` / ``auto-recompute``: the fused engine, ``memory`` save or recompute, with
  the default CUDA-graph decision (captured on CUDA wherever that works).

Writes <device>_epoch.md/.csv under DIR: seconds per epoch (training steps and
the evaluation), images per second, peak memory, the last training loss.
"""

from __future__ import annotations

import argparse
import csv
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

CONFIGS = {
    "reference": dict(backend="reference", memory="save", cuda_graph=False),
    "reference-graph": dict(backend="reference", memory="save", cuda_graph=True),
    "auto": dict(backend=None, memory="save", cuda_graph=None),
    "auto-recompute": dict(backend=None, memory="recompute", cuda_graph=None),
}
COLUMNS = ["config", "cuda_graph", "epoch_s", "train_s", "images_per_s", "speedup", "peak_memory_mib", "train_loss"]


def run_one(args) -> dict:
    """The child: one epoch of one configuration; prints a JSON line."""
    import torch
    from torch.utils.data import TensorDataset

    from fastnas.search import SearchConfig, Searcher

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    info = {"num_classes": 10, "in_channels": 3, "image_size": args.image_size}
    config = SearchConfig.create(
        "darts", dataset="cifar10", device=args.device, epochs=1, batch_size=args.batch_size,
        init_channels=args.channels, layers=args.layers, image_size=args.image_size, **CONFIGS[args.config],
    )  # fmt: skip
    searcher = Searcher(config, dataset=(TensorDataset(images, labels), info), progress=False)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        bench.reset_peak_rss()
    start = time.perf_counter()
    result = searcher.run()
    elapsed = time.perf_counter() - start
    record = result.history[-1]
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = bench.peak_rss_bytes() / 2**20
    return {
        "config": args.config,
        "cuda_graph": searcher.cuda_graph,
        "epoch_s": elapsed,
        "train_s": record["time_s"],
        "images_per_s": record["images_per_s"],
        "peak_memory_mib": peak,
        "train_loss": record["train_loss"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--configs", default="reference,auto", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--images", type=int, default=50000, help="images in all, split half and half")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--config", help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args(argv)
    if args.config is not None:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    command = ["python", "benchmarks/bench_epoch.py", *(sys.argv[1:] if argv is None else argv)]
    env = bench.environment(args.device)
    env["command"] = " ".join(command)
    print(json.dumps(env), flush=True)
    rows = []
    for config in args.configs.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", config]
        for flag in ("device", "images", "batch_size", "image_size", "channels", "layers", "threads"):
            value = getattr(args, flag)
            if value is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(value)]
        row, why = bench.run_child(cmd, args.timeout)
        row = row or {"config": config, "note": why}
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next((r for r in rows if r["config"] == "reference" and "epoch_s" in r), None)
    for row in rows:
        if base is not None and "epoch_s" in row:
            row["speedup"] = base["epoch_s"] / row["epoch_s"]
    _write(Path(args.out) / f"{args.device}_epoch", env, args, rows)
    return 0 if all("epoch_s" in r for r in rows) else 1


def _write(stem: Path, env: dict, args, rows: list[dict]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + ["note"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# One epoch of a first-order DARTS search, {args.device}",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        f"- data: {args.images} random CIFAR-shaped images ({args.images // 2} + {args.images - args.images // 2}), "
        f"batch {args.batch_size}, C={args.channels}, {args.layers} cells",
        "- epoch_s: Searcher.run() of one epoch (loading, both steps, schedule, evaluation); train_s: the steps",
        "",
        "| configuration | CUDA graph | epoch s | train s | images/s | speed-up | peak MiB | train loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "epoch_s" not in r:
            lines.append(f"| {r['config']} | | {r.get('note', 'failed')} | | | | | |")
            continue
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        lines.append(
            f"| {r['config']} | {r['cuda_graph']} | {r['epoch_s']:.1f} | {r['train_s']:.1f} | "
            f"{r['images_per_s']:.0f} | {speedup} | {r['peak_memory_mib']:.0f} | {r['train_loss']:.4f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
