#!/usr/bin/env python
"""Data-pipeline benchmark: can the loader of an ImageNet-style folder keep the search step fed?

    python benchmarks/bench_data.py [--data FOLDER] [--device cpu|cuda] [--batch-size 32]
        [--image-size 224] [--workers 0,auto] [--decode cpu|cuda|dali] [--network pc-darts|darts] [--out DIR]

Two figures on the same machine and batch:

* the pipeline alone: images per second of a search loader (``fastnas.run.data.SearchLoader``,
  keyed random resized crops and flips, as a search reads its halves) iterated without
  training, for each ``--workers`` setting, after a warm-up batch that starts the workers;
* the search step's consumption: images per second of fused first-order search steps of
  the ImageNet supernet (PC-DARTS K=2, or DARTS' full channels with ``memory="recompute"``)
  on fixed batches; while the architecture trains, a step takes a weights' batch and an
  architecture batch, so the loader must deliver twice the step's training images.

``headroom`` = pipeline images/s over the images/s the step takes (both batches): above 1
the step never waits for data. Without ``--data`` a folder of JPEGs of ImageNet's typical
size (500x375, quality 90) is written to a temporary folder first. Writes
``<device>_data.md``/``.csv`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import fastnas  # noqa: F401
except ImportError:  # running from a clone that is not installed
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastnas import bench  # noqa: E402

COLUMNS = ["what", "workers", "decode", "batch_size", "image_size", "batches", "seconds", "images_per_s", "headroom"]


def write_folder(root: Path, classes: int, per_class: int, size: tuple[int, int]) -> Path:
    """An ImageNet-style folder of noise-and-gradient JPEGs (not compressible to nothing)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.normal(0, 40, size=(h, w, 3)).astype(np.float32)
                pixels = np.clip(ramp * (c + 1) / classes + noise + 60, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.JPEG", quality=90)
    return root


def time_pipeline(train_set, batch_size: int, workers: int, decode: str, device, batches: int) -> dict:
    from fastnas.run.data import SearchLoader

    loader = SearchLoader(
        train_set, range(len(train_set)), batch_size, seed=0, workers=workers,
        pin_memory=torch.device(device).type == "cuda", decode=decode, device=device,
    )  # fmt: skip
    if len(loader) < batches + 1:
        raise SystemExit(f"the folder holds {len(loader)} batches of {batch_size}; need {batches + 1} (one warm-up)")
    it = loader.batches(0)
    next(it)  # starts the workers
    start = time.perf_counter()
    for _ in range(batches):
        x, _y = next(it)
        x = x.to(device, non_blocking=True)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(batches=batches, seconds=seconds, images_per_s=batches * batch_size / seconds)


def time_step(args, num_classes: int) -> dict:
    from fastnas.spaces.darts import SearchNetwork

    torch.manual_seed(0)
    net = SearchNetwork(
        C=args.channels, num_classes=num_classes, layers=args.layers, stem="imagenet",
        partial_channels=2 if args.network == "pc-darts" else None,
        edge_normalization=args.network == "pc-darts",
        memory="save" if args.network == "pc-darts" else "recompute",
    ).to(args.device)  # fmt: skip
    step = bench.make_search_step(net, args.device, args.batch_size, args.image_size, num_classes)
    cpu = dict(warmup=1, min_reps=args.steps, min_time_s=0.0) if args.device == "cpu" else {}
    timing = bench.time_fn(step, args.device, **cpu)
    seconds = timing.median_ms / 1000
    return dict(batches=1, seconds=seconds, images_per_s=args.batch_size / seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="an ImageNet-style folder (root/train/<class>/*.JPEG)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", default="0,auto", help="comma-separated worker counts; auto = the search's default")
    p.add_argument("--decode", default="cpu", choices=("cpu", "cuda", "dali"))
    p.add_argument("--batches", type=int, default=8, help="timed batches of the pipeline")
    p.add_argument("--network", default="pc-darts", choices=("pc-darts", "darts"))
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed search steps at least (CPU)")
    p.add_argument("--classes", type=int, default=10, help="classes of the generated folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the step")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from fastnas.data import load_dataset
    from fastnas.data.pipeline import check_decode
    from fastnas.run.data import default_workers

    check_decode(args.decode, "imagenet", args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            per_class = -(-(args.batches + 1) * args.batch_size // args.classes)
            root = write_folder(Path(tmp), args.classes, per_class, (500, 375))
        train_set, _test, info = load_dataset("imagenet", root=root, image_size=args.image_size)
        rows = []
        for w in args.workers.split(","):
            workers = default_workers("imagenet") if w == "auto" else int(w)
            row = time_pipeline(train_set, args.batch_size, workers, args.decode, args.device, args.batches)
            rows.append(dict(what="pipeline alone", workers=workers, decode=args.decode, **row))
    step = time_step(args, info["num_classes"])
    # While the architecture trains a step takes two batches: the weights' and the architecture's.
    needed = 2 * step["images_per_s"]
    for row in rows:
        row.update(batch_size=args.batch_size, image_size=args.image_size, headroom=row["images_per_s"] / needed)
    step_name = f"{args.network} search step ({args.layers} cells, C={args.channels}; training images)"
    rows.append(dict(what=step_name, batch_size=args.batch_size, image_size=args.image_size, **step))
    env = bench.environment(args.device)
    env["torch threads"] = torch.get_num_threads()
    notes = [
        "headroom: the pipeline's images/s over the 2 x batch images the step takes per step while the "
        "architecture trains; above 1 the step never waits for data.",
    ]
    md, _csv = bench.write_results(
        rows, COLUMNS, Path(args.out) / f"{torch.device(args.device).type}_data", "Data pipeline vs search step", env,
        notes,
    )  # fmt: skip
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
