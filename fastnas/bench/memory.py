"""``fastnas bench-step --imagenet``: live memory per image of a search step at 224x224.

Each configuration runs one training step (forward, backward and both optimisers,
as ``fastnas bench-step``) in a fresh process, at two batch sizes B and 2B, so that
each peak is its own: on CUDA ``max_memory_allocated`` above the allocations before
the step, on the CPU the peak resident memory above what was resident before it,
with glibc's mmap threshold fixed (``fastnas.bench.measure.CPU_MEMORY_ENV``). A step's
peak is a fixed part (gradients and optimiser state of the parameters, buffers)
plus a part linear in the batch (the activations), so the difference of the two
peaks over B is the memory per image and the rest the fixed part; a device of
``--device-memory`` GiB then fits (device - fixed) / per-image images: the
projected largest batch.

The baseline is PC-DARTS' ImageNet search network (K=2) run eagerly, the network
PC-DARTS searches ImageNet with; beside it the same network and the full DARTS
space fused, in the memory modes asked for.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastnas.bench import measure as bench

# What the ImageNet mode measures unless told otherwise: the PC-DARTS ImageNet search
# network's shape (8 cells, C=16, 1000 classes, 224x224, the three-convolution stem).
# (Channels and layers are bench-step's own defaults, 16 and 8.)
IMAGENET_DEFAULTS = {"batch_size": 4, "image_size": 224, "num_classes": 1000}


@dataclass(frozen=True)
class Config:
    label: str
    network: str
    partial_channels: int | None
    backend: str
    memory: str


def configs(backend: str, memories: Sequence[str]) -> list[Config]:
    """The baseline (PC-DARTS K=2 eager), then each fused network in each memory mode."""
    rows = [Config("PC-DARTS K=2, eager (baseline)", "pc-darts", 2, "reference", "save")]
    for memory in memories:
        rows.append(Config(f"fastnas PC-DARTS K=2, {memory}", "pc-darts", 2, backend, memory))
    for memory in memories:
        rows.append(Config(f"fastnas DARTS full space, {memory}", "darts", None, backend, memory))
    return rows


def projected_batch(device_memory_gib: float, per_image_mib: float, fixed_mib: float = 0.0) -> int:
    """Images whose step fits in ``device_memory_gib``: ``fixed_mib`` plus ``per_image_mib`` each."""
    if not per_image_mib > 0:
        return 0
    return max(0, math.floor((device_memory_gib * 1024 - max(fixed_mib, 0.0)) / per_image_mib))


def _child_args(args: argparse.Namespace, cfg: Config, batch_size: int) -> list[str]:
    pc = [] if cfg.partial_channels is None else ["--partial-channels", str(cfg.partial_channels)]
    return [
        sys.executable, "-m", "fastnas.bench", "--network", cfg.network, *pc, "--backend", cfg.backend,
        "--memory", cfg.memory, "--stem", "imagenet", "--batch-size", str(batch_size),
        "--image-size", str(args.image_size), "--channels", str(args.channels), "--layers", str(args.layers),
        "--num-classes", str(args.num_classes), "--device", args.device, "--warmup", "0", "--reps", "1",
        "--no-count-ops", "--seed", str(args.seed),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip


def imagenet_memory(args: argparse.Namespace) -> dict:
    """Run every configuration in a fresh process; print the table and JSON; return the JSON."""
    for name, default in IMAGENET_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    memories = [m for m in args.imagenet_memory.split(",") if m]
    for m in memories:
        if m not in ("save", "recompute"):
            raise ValueError(f"--imagenet-memory takes save and recompute, got {m!r}")
    env = bench.CPU_MEMORY_ENV if torch.device(args.device).type == "cpu" else None
    rows, baseline = [], None
    b = args.batch_size
    for cfg in configs(args.backend, memories):
        row = {**asdict(cfg), "peak_mib": None, "per_image_mib": None, "vs_baseline": None, "largest_batch": None}
        results = []
        for batch in (b, 2 * b):
            result, why = bench.run_child(_child_args(args, cfg, batch), timeout=args.timeout, env=env)
            if result is None:
                row["note"] = f"batch {batch}: {why}"
                break
            results.append(result)
        if len(results) == 2:
            small, large = (r["peak_memory_mib"] for r in results)
            per_image = (large - small) / b
            fixed = small - b * per_image
            if baseline is None and per_image > 0:
                baseline = per_image
            row.update(
                peak_mib=small, peak_2b_mib=large, per_image_mib=per_image, fixed_mib=fixed,
                backend_used=results[0]["backend_used"], vs_baseline=per_image / baseline if baseline else None,
                largest_batch=projected_batch(args.device_memory, per_image, fixed),
                step_ms=results[0]["step_ms_median"],
            )  # fmt: skip
        rows.append(row)
        print(_format_row(row), file=sys.stderr, flush=True)
    out = {
        "mode": "imagenet memory",
        "device": bench.device_name(args.device),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "channels": args.channels,
        "layers": args.layers,
        "num_classes": args.num_classes,
        "device_memory_gib": args.device_memory,
        "memory_kind": "max_memory_allocated above baseline"
        if torch.device(args.device).type == "cuda"
        else "peak RSS above baseline, MALLOC_MMAP_THRESHOLD_=65536, fresh process per row",
        "rows": rows,
        "torch": torch.__version__,
        "commit": bench.git_commit(),
    }
    print(format_table(out))
    if getattr(args, "out", None):
        stem = Path(args.out) / f"{torch.device(args.device).type}_imagenet_memory"
        notes = [
            f"`fastnas bench-step --imagenet` at batches {b} and {2 * b}, {args.image_size}x{args.image_size}, "
            f"C={args.channels}, {args.layers} cells, {args.num_classes} classes; {out['memory_kind']}. Per image: "
            "the difference of the two peaks over the batch; fixed: the rest; largest batch: (device - fixed) / "
            f"per image in {args.device_memory:g} GiB.",
        ]
        columns = ["label", "per_image_mib", "vs_baseline", "fixed_mib", "largest_batch", "peak_mib", "peak_2b_mib",
                   "step_ms", "backend_used", "note"]  # fmt: skip
        md, _ = bench.write_results(rows, columns, stem, "Search-step memory per image at ImageNet size",
                                    bench.environment(args.device), notes)  # fmt: skip
        print(f"wrote {md}", file=sys.stderr)
    print(json.dumps(out), flush=True)
    return out


def _format_row(row: dict) -> str:
    if row["per_image_mib"] is None:
        return f"{row['label']}: {row.get('note', 'no result')}"
    return f"{row['label']}: {row['per_image_mib']:.1f} MiB per image"


def format_table(out: dict) -> str:
    """The rows as a markdown table."""
    b = out["batch_size"]
    lines = [
        f"| network ({out['image_size']}x{out['image_size']}, batches {b} and {2 * b}) | MiB per image "
        f"| vs baseline | fixed MiB | largest batch in {out['device_memory_gib']:g} GiB |",
        "|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        if r["per_image_mib"] is None:
            lines.append(f"| {r['label']} | {r.get('note', '')} | | | |")
        else:
            vs = "" if r["vs_baseline"] is None else f"{r['vs_baseline']:.3f}"
            lines.append(
                f"| {r['label']} | {r['per_image_mib']:.1f} | {vs} | {r['fixed_mib']:.0f} | {r['largest_batch']:,} |"
            )
    return "\n".join(lines)
