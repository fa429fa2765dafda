#!/usr/bin/env python
"""Benchmark of multi_depthwise: the four DARTS depthwise candidates (3x3, 5x5,
3x3 dilation 2, 5x5 dilation 2) of one edge input in one fused call, against
four aten conv2d(groups=C) after one relu, in the same run.

    python benchmarks/bench_multi_depthwise.py [--device cpu|cuda] [--batch 64] [--channels 16]
        [--size 32] [--stride 1 2] [--backend cpu|triton|...] [--threads T] [--min-time 1.0]

Forward: the op's output. Forward+backward: the output, then the gradient of the
input (pre-ReLU) and of the four weights, given a fixed output gradient; the
fused op runs multi_depthwise then multi_depthwise_backward, aten runs autograd.
Prints a markdown table; "speed-up" is the aten time over the fused time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import fastnas  # noqa: F401
except ImportError:  # running from a clone that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from fastnas import backends, bench
from fastnas.ops.multi_depthwise import multi_depthwise, multi_depthwise_backward

DARTS_CANDIDATES = [(3, 1), (5, 1), (3, 2), (5, 2)]


def make_inputs(args, stride, device):
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.size, args.size)
    x = torch.randn(shape, generator=gen).to(device)
    weights = [torch.randn(args.channels, 1, k, k, generator=gen).to(device) for k, _ in DARTS_CANDIDATES]
    dilations = [d for _, d in DARTS_CANDIDATES]
    out_size = (args.size - 1) // stride + 1
    grad_out = torch.randn(len(weights), args.channels, args.batch, out_size, out_size, generator=gen).to(device)
    return x, weights, dilations, grad_out


def aten_fns(x, weights, dilations, stride, grad_out):
    xg = x.detach().clone().requires_grad_()
    wg = [w.detach().clone().requires_grad_() for w in weights]
    # aten's outputs are (N, C, Ho, Wo); the same gradient, in that layout.
    grads = [g.transpose(0, 1).contiguous() for g in grad_out]

    def forward(x_, ws):
        a = F.relu(x_)
        return [
            F.conv2d(a, w, stride=stride, padding=d * (w.shape[-1] - 1) // 2, dilation=d, groups=a.shape[1])
            for w, d in zip(ws, dilations)
        ]

    def fwd():
        with torch.no_grad():
            return forward(x, weights)

    def full():
        outs = forward(xg, wg)
        return torch.autograd.grad(outs, [xg, *wg], grads)

    return fwd, full


def fused_fns(x, weights, dilations, stride, grad_out, backend):
    def fwd():
        return multi_depthwise(x, weights, dilations, stride, backend=backend)

    def full():
        out = multi_depthwise(x, weights, dilations, stride, backend=backend)
        return out, multi_depthwise_backward(grad_out, x, weights, dilations, stride, backend=backend)

    return fwd, full


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default=None, help="fused backend (default: automatic for the device)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--stride", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per measurement (CPU)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    note = bench.steady_cpu_allocator() if device.type == "cpu" else "CUDA caching allocator"
    backend = backends.resolve("multi_depthwise", device, args.backend)
    env = bench.environment(device)
    print(f"# multi_depthwise, 4 DARTS candidates, x {args.batch}x{args.channels}x{args.size}x{args.size} fp32\n")
    for k, v in env.items():
        print(f"- {k}: {v}")
    print(f"- fused backend: {backend}")
    print(f"- allocator: {note}\n")
    print("| stride | pass | aten ms (q25-q75) | fused ms (q25-q75) | speed-up |")
    print("|---|---|---|---|---|")
    timing = dict(min_time_s=args.min_time, min_reps=5, warmup=2)
    for stride in args.stride:
        x, weights, dilations, grad_out = make_inputs(args, stride, device)
        aten_fwd, aten_full = aten_fns(x, weights, dilations, stride, grad_out)
        fused_fwd, fused_full = fused_fns(x, weights, dilations, stride, grad_out, backend)
        for name, a_fn, f_fn in (("fwd", aten_fwd, fused_fwd), ("fwd+bwd", aten_full, fused_full)):
            a = bench.time_fn(a_fn, device, **timing)
            f = bench.time_fn(f_fn, device, **timing)
            print(
                f"| {stride} | {name} | {a.median_ms:.2f} ({a.q25_ms:.2f}-{a.q75_ms:.2f}) "
                f"| {f.median_ms:.2f} ({f.q25_ms:.2f}-{f.q75_ms:.2f}) | {a.median_ms / f.median_ms:.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
