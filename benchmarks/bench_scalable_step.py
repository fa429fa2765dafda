#!/usr/bin/env python
"""One training step of the Scalable-DARTS supernet, fused vs the eager candidate modules.

    python benchmarks/bench_scalable_step.py [--threads 1] [--channels 8] [--layers 5] [--batch-size 16]
        [--image-size 16] [--reps 5] [--device cpu]

The factorised supernet (``fastnas.spaces.darts.factorized``: the DARTS candidates,
each convolution once per activation of Scalable-DARTS' default set) runs forward and
backward on random data, first with ``backend="reference"`` (every candidate an eager
module), then with the automatic backend (the fused edge, whose depthwise prologue
applies every activation). Prints the median step time of each after two warm-up
steps, how many edges ran fused, and the eager/fused ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastnas.spaces.darts.factorized import FactorizedSearchNetwork


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    times = {}
    for name, backend in (("eager", "reference"), ("fused", None)):
        torch.manual_seed(0)
        net = FactorizedSearchNetwork(C=args.channels, num_classes=10, layers=args.layers, backend=backend).to(device)

        def step(net=net):
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(2):
            step()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
        reasons = [m.fused_reason for m in net.modules() if hasattr(m, "fused_reason")]
        fused = sum(r is None for r in reasons)
        print(f"{name}: {1000 * times[name]:.1f} ms per step, {fused} of {len(reasons)} edges fused")
    print(f"eager / fused step time: {times['eager'] / times['fused']:.2f}x")


if __name__ == "__main__":
    main()
