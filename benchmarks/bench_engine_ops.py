#!/usr/bin/env python
"""Benchmark of the memory engine's ops, each pass on its own: multi_depthwise (also
against aten's depthwise convolutions, cuDNN on the GPU), stacked_batch_norm,
pool_batch_norm_stats, darts_sum and partial_channel_node_sum, forward,
backward, and both (fwd+bwd: the forward through autograd, then the gradients, as a
training step runs them), and the whole DARTS and partial-channel edge (fwd+bwd),
every fused backend against the eager reference and ``torch.compile`` of it
(fullgraph, static shapes, compiled before the timing) in the same run. A compiled
backward alone is the compiled forward's own backward graph where ``autograd.grad``
of a graph built outside cannot be compiled (the node sum).

    python benchmarks/bench_engine_ops.py [--device cpu|cuda] [--quick] [--case TEXT]
        [--impls cuda,triton,eager,aten] [--batch N] [--dtype fp32|bf16] [--out DIR]

Writes <device>_engine_ops.md/.csv under DIR (default benchmarks/results),
rewritten after every case so a run cut short keeps what it measured. A row is
one (case, implementation, pass). "vs eager" is the eager reference's median
over the row's; for multi_depthwise, "vs aten" is that of J aten depthwise
convolutions after one ReLU (how the eager DARTS candidates start; cuDNN on the
GPU), forward alone and backward alone (its autograd graph built once, untimed).
On CUDA, "bw" is the minimal bytes a pass must move (each input read once, each
output written once) over its median time, and "of copy" that as a fraction of
a 1 GiB device-to-device copy measured in the same run.

Sizes are the search's: the DARTS CIFAR network (C = 16, 32, 64 at 32x32,
16x16, 8x8, batch 64) and the ImageNet stem (C = 48 and 96 at 56x56 and 28x28,
batch 32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fastnas  # noqa: F401
except ImportError:  # running from a clone that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from fastnas import backends, bench
from fastnas.ops.darts_sum import darts_sum, darts_sum_backward, pool_batch_norm_stats
from fastnas.ops.multi_depthwise import multi_depthwise, multi_depthwise_backward
from fastnas.ops.partial_channel_node_sum import partial_channel_node_sum
from fastnas.ops.stacked_batch_norm import stacked_batch_norm_backward, stacked_batch_norm_stats

COLUMNS = [
    "case", "dtype", "impl", "pass", "median_ms", "q25_ms", "q75_ms", "reps", "vs_eager", "vs_aten", "bw_gbs",
    "of_copy", "note",
]  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DARTS = [(3, 1), (5, 1), (3, 2), (5, 2)]  # the DARTS depthwise candidates: (kernel size, dilation)


@dataclass
class Case:
    """One benchmark case: for each implementation, a function per pass, and the bytes each pass moves."""

    op: str  # the op whose backends are benchmarked
    label: str
    passes: dict  # pass name -> function of the implementation name returning a closure to time
    bytes: dict  # pass name -> minimal bytes moved
    aten: dict = field(default_factory=dict)  # pass name -> closure (multi_depthwise only)
    # pass name -> closure of the compiled reference, where compiling the pass's closure is not how a
    # compile user runs it (a backward alone: the compiled forward's own backward graph)
    compiled: dict = field(default_factory=dict)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(shape, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def _train_pass(forward, inputs, grads):
    """The fwd+bwd pass of an op with autograd: ``forward(impl)`` on inputs that require a gradient,
    then ``torch.autograd.grad`` of its output, as a training step runs it."""
    return lambda impl: lambda: torch.autograd.grad(forward(impl), inputs, grads)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def depthwise_case(n, c, h, stride, device, dtype, per_candidate=False) -> Case:
    cands = DARTS if not per_candidate else [(3, 1), (5, 1)]
    j = len(cands)
    x = _randn((j, c, n, h, h) if per_candidate else (n, c, h, h), device, dtype)
    ws = [_randn((c, 1, k, k), device, dtype, seed=1 + i) for i, (k, _) in enumerate(cands)]
    ds = [d for _, d in cands]
    mean = rstd = None
    if per_candidate:
        mean = _randn((j, c), device, torch.float32, seed=9) * 0.1
        rstd = _randn((j, c), device, torch.float32, seed=10).abs() + 0.5
    ho = (h - 1) // stride + 1
    g = _randn((j, c, n, ho, ho), device, dtype, seed=11)
    label = f"multi_depthwise {'2nd stage bn ' if per_candidate else ''}J={j} {n}x{c}x{h}x{h} s{stride}"
    xg, *wg = _leaves(x, *ws)
    passes = {
        "fwd": lambda impl: lambda: multi_depthwise(x, ws, ds, stride, mean, rstd, backend=impl),
        "bwd": lambda impl: lambda: multi_depthwise_backward(g, x, ws, ds, stride, mean, rstd, backend=impl),
        "fwd+bwd": _train_pass(
            lambda impl: multi_depthwise(xg, wg, ds, stride, mean, rstd, backend=impl), [xg, *wg], g
        ),
    }
    out_bytes = _nbytes(g)
    case = Case("multi_depthwise", label, passes, {"fwd": _nbytes(x) + out_bytes, "bwd": out_bytes + 2 * _nbytes(x)})
    if not per_candidate:
        case.aten = _aten_depthwise(x, ws, ds, stride, g)
    return case


def _aten_depthwise(x, ws, ds, stride, g):
    """J aten depthwise convolutions of relu(x): forward, and backward of a graph built once."""
    xg = x.detach().clone().requires_grad_()
    wg = [w.detach().clone().requires_grad_() for w in ws]
    grads = [gj.transpose(0, 1).contiguous() for gj in g]  # aten's outputs are (N, C, Ho, Wo)

    def forward(inp, weights):
        a = F.relu(inp)
        return [
            F.conv2d(a, w, stride=stride, padding=d * (w.shape[-1] - 1) // 2, dilation=d, groups=a.shape[1])
            for w, d in zip(weights, ds)
        ]

    outs = forward(xg, wg)

    def fwd():
        with torch.no_grad():
            return forward(x, ws)

    def bwd():
        return torch.autograd.grad(outs, [xg, *wg], grads, retain_graph=True)

    return {"fwd": fwd, "bwd": bwd}


def batch_norm_case(j, c, n, h, device, dtype) -> Case:
    z = _randn((j, c, n, h, h), device, dtype) + 1.0
    g = _randn(z.shape, device, dtype, seed=1)
    mean, rstd, _ = stacked_batch_norm_stats(z, backend="reference")

    def both(impl):  # the statistics, then the backward from them, as the fused edge calls them
        def call():
            m, r, _ = stacked_batch_norm_stats(z, backend=impl)
            return stacked_batch_norm_backward(g, z, m, r, backend=impl)

        return call

    passes = {
        "fwd": lambda impl: lambda: stacked_batch_norm_stats(z, backend=impl),
        "bwd": lambda impl: lambda: stacked_batch_norm_backward(g, z, mean, rstd, backend=impl),
        "fwd+bwd": both,
    }
    return Case("stacked_batch_norm_stats", f"stacked_batch_norm J={j} {c}x{n}x{h}x{h}", passes,
                {"fwd": _nbytes(z), "bwd": 3 * _nbytes(z)})  # fmt: skip


def darts_sum_case(n, c, h, jz, stride, device, dtype) -> Case:
    ho = (h - 1) // stride + 1
    x = _randn((n, c, h, h), device, dtype)
    z = _randn((jz, c, n, ho, ho), device, dtype, seed=1)
    stat = torch.float32
    mean = _randn((jz + 2, c), device, stat, seed=2) * 0.1
    rstd = _randn((jz + 2, c), device, stat, seed=3).abs() + 0.5
    coef = _randn((jz + 3,), device, stat, seed=4).softmax(0)
    g = _randn((n, c, ho, ho), device, dtype, seed=5)
    skip = stride == 1
    args = (x, z, mean, rstd, coef, stride, True, True, skip)
    xg, zg, cg = _leaves(x, z, coef)
    passes = {
        "stats": lambda impl: lambda: pool_batch_norm_stats(x, stride, backend=impl),
        "fwd": lambda impl: lambda: darts_sum(*args, backend=impl),
        "bwd": lambda impl: lambda: darts_sum_backward(g, *args, True, backend=impl),
        "fwd+bwd": _train_pass(
            lambda impl: darts_sum(xg, zg, mean, rstd, cg, stride, True, True, skip, backend=impl), [xg, zg, cg], g
        ),
    }
    sizes = {
        "stats": _nbytes(x),
        "fwd": _nbytes(x, z, g),  # the output is g's size
        "bwd": _nbytes(g, x, z) + _nbytes(z, x),  # reads, then grad_z and grad_x
    }
    return Case("darts_sum", f"darts_sum Jz={jz} {n}x{c}x{h}x{h} s{stride}", passes, sizes)


def node_case(n, c, h, strides, device, dtype, k=4) -> Case:
    cp = c // k
    mixed = [_randn((n, cp, h, h), device, dtype, seed=e).requires_grad_() for e in range(len(strides))]
    full = [_randn((n, c, s * h, s * h), device, dtype, seed=10 + e) for e, s in enumerate(strides)]
    bypass = [f[:, cp:].requires_grad_() for f in (t.detach() for t in full)]
    weights = _randn((len(strides),), device, torch.float32, seed=20).softmax(0).requires_grad_()
    g = _randn((n, c, h, h), device, dtype, seed=21)
    inputs = [*mixed, *bypass, weights]
    held = {}

    def forward(impl):
        return partial_channel_node_sum(mixed, bypass, weights, k, strides, backend=impl)

    def fwd(impl):
        return lambda: forward(impl)

    def backward_of(key, forward_fn):
        # Backward alone: the graph of one untimed forward, kept for the timed calls.
        held[key] = forward_fn()
        return lambda: torch.autograd.grad(held[key], inputs, g, retain_graph=True)

    def compiled_bwd():
        # What a compile user's backward is: the compiled forward's own backward graph.
        torch._dynamo.reset()
        return backward_of("compile", torch.compile(lambda: forward("reference"), fullgraph=True, dynamic=False))

    read = _nbytes(*mixed) + sum(b.numel() * b.element_size() for b in bypass)
    sizes = {"fwd": read + _nbytes(g), "bwd": _nbytes(g) + 2 * read}
    label = f"partial_channel_node_sum E={len(strides)} strides {''.join(map(str, strides))} {n}x{c}x{h}x{h}"
    passes = {
        "fwd": fwd,
        "bwd": lambda impl: backward_of(impl, lambda: forward(impl)),
        "fwd+bwd": _train_pass(forward, inputs, g),
    }
    return Case("partial_channel_node_sum", label, passes=passes, bytes=sizes, compiled={"bwd": compiled_bwd})


def edge_case(n, c, h, stride, device, dtype, groups=None) -> Case:
    """A whole DARTS edge (all eight candidates; with ``groups``, PC-DARTS' partial-channel edge) in
    training mode, forward and backward together: the eager candidate modules (also compiled)
    against the fused edge."""
    from fastnas.nn import MixedOp, PartialChannelMixedOp
    from fastnas.spaces.darts import DARTS_PRIMITIVES

    x = _randn((n, c, h, h), device, dtype).requires_grad_()
    w = _randn((len(DARTS_PRIMITIVES),), device, torch.float32, seed=1).softmax(0).requires_grad_()
    ho = (h - 1) // stride + 1
    g = _randn((n, c, ho, ho), device, dtype, seed=2)

    def step(impl):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if groups is None:
                edge = MixedOp(c, stride, DARTS_PRIMITIVES, backend=impl)
            else:
                edge = PartialChannelMixedOp(c, stride, DARTS_PRIMITIVES, groups, backend=impl)
        edge = edge.to(device=device, dtype=dtype).train()
        inputs = [x, w, *edge.parameters()]
        return lambda: torch.autograd.grad(edge(x, w), inputs, g)

    kind = "darts_edge" if groups is None else f"partial-channel edge K={groups}"
    return Case("darts_edge", f"{kind} (8 candidates) {n}x{c}x{h}x{h} s{stride}", {"fwd+bwd": step}, {})


def cases(device: str, dtype: torch.dtype, quick: bool, batch: int | None) -> list[Case]:
    b64, b32 = batch or 64, batch or 32
    out = [
        depthwise_case(b64, 16, 32, 1, device, dtype),
        depthwise_case(b64, 16, 32, 2, device, dtype),
        depthwise_case(b32, 48, 56, 1, device, dtype),
    ]
    if not quick:
        out += [
            depthwise_case(b64, 32, 16, 1, device, dtype),
            depthwise_case(b64, 32, 16, 2, device, dtype),
            depthwise_case(b64, 64, 8, 1, device, dtype),
            depthwise_case(b64, 16, 32, 1, device, dtype, per_candidate=True),
            depthwise_case(b32, 48, 56, 2, device, dtype),
            depthwise_case(b32, 96, 28, 1, device, dtype),
        ]
    out += [
        batch_norm_case(6, 16, b64, 32, device, dtype),
        darts_sum_case(b64, 16, 32, 4, 1, device, dtype),
        node_case(b64, 16, 16, [2, 2, 1, 1, 1], device, dtype),
        edge_case(b64, 16, 32, 1, device, dtype),
        edge_case(b64, 16, 32, 1, device, dtype, groups=4),
    ]
    if not quick:
        out += [
            darts_sum_case(b64, 16, 32, 5, 2, device, dtype),
            node_case(b64, 16, 32, [1, 1, 1, 1], device, dtype),
            edge_case(b64, 16, 32, 2, device, dtype),
            edge_case(b64, 32, 16, 1, device, dtype),
        ]
    return out


def compiled(fn):
    """``torch.compile`` of a pass of the eager reference (fullgraph, static shapes), compiled by a
    first call here, outside the timing."""
    torch._dynamo.reset()
    fn = torch.compile(fn, fullgraph=True, dynamic=False)
    # A backward pass of the reference is torch.autograd.grad of its forward: traced into the
    # graph where this torch can (trace_autograd_ops), else the pass reports why it cannot.
    config = torch._dynamo.config
    patch = config.patch(trace_autograd_ops=True) if hasattr(config, "trace_autograd_ops") else contextlib.nullcontext()
    with patch:
        fn()

    def call():
        with patch:
            return fn()

    return call


def implementations(op: str, device: str, requested: str | None) -> list[str]:
    if requested:
        return [s.strip() for s in requested.split(",") if s.strip()]
    fused = [name for name in backends.runnable(op, device) if name != "reference"]
    if device == "cpu":
        fused = [name for name in fused if name != "triton"]  # the interpreter is not a contender
    return ["eager", "compile", *fused, "aten"]


def run(args) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible; use --device cpu", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    env = bench.environment(device)
    env["command"] = " ".join(["python", "benchmarks/bench_engine_ops.py", *args.argv])
    copy_bw = bench.copy_bandwidth(device) if device == "cuda" else None
    if copy_bw:
        env["copy_bandwidth"] = f"{copy_bw / 1e9:.0f} GB/s (1 GiB device-to-device copy, read+write)"
    print(json.dumps(env, indent=1), flush=True)
    stem = Path(args.out) / f"{device}_engine_ops{'_' + args.tag if args.tag else ''}"
    kw = {"min_time_s": 0.3 if args.quick else 1.0, "min_reps": 5} if device == "cpu" else {}
    rows: list[dict] = []
    for case in cases(device, dtype, args.quick, args.batch):
        if args.case and args.case not in case.label:
            continue
        print(f"\n== {case.label} {args.dtype}", flush=True)
        medians: dict[tuple[str, str], float] = {}
        for impl in implementations(case.op, device, args.impls):
            for name, make in case.passes.items():
                if impl == "aten":
                    fn = case.aten.get(name)
                    if fn is None:
                        continue
                else:
                    try:
                        if impl == "compile" and name in case.compiled:
                            fn = case.compiled[name]()
                        else:
                            fn = make("reference" if impl in ("eager", "compile") else impl)
                            if impl == "compile":
                                fn = compiled(fn)
                    except Exception as exc:
                        rows.append({"case": case.label, "dtype": args.dtype, "impl": impl, "pass": name,
                                     "note": f"failed: {type(exc).__name__}: {exc}"[:200]})  # fmt: skip
                        continue
                row = {"case": case.label, "dtype": args.dtype, "impl": impl, "pass": name}
                try:
                    t = bench.time_fn(fn, device, **kw)
                except Exception as exc:
                    row["note"] = f"failed: {type(exc).__name__}: {exc}"[:200]
                    rows.append(row)
                    print(f"  {impl:8s} {name:5s} {row['note']}", flush=True)
                    continue
                row.update(t.as_dict())
                medians[(impl, name)] = t.median_ms
                if ("eager", name) in medians:
                    row["vs_eager"] = medians[("eager", name)] / t.median_ms
                if copy_bw and name in case.bytes:
                    bw = case.bytes[name] / (t.median_ms / 1e3)
                    row.update(bw_gbs=bw / 1e9, of_copy=bw / copy_bw)
                rows.append(row)
                extra = f"  {row['bw_gbs']:.0f} GB/s ({row['of_copy']:.0%} of copy)" if "bw_gbs" in row else ""
                print(
                    f"  {impl:8s} {name:5s} {t.median_ms:9.3f} ms [{t.q25_ms:.3f}, {t.q75_ms:.3f}]{extra}", flush=True
                )
        for row in rows:
            if row["case"] == case.label and ("aten", row["pass"]) in medians and "median_ms" in row:
                row["vs_aten"] = medians[("aten", row["pass"])] / row["median_ms"]
        env["load_average_end"] = bench.load_average()
        bench.write_results(rows, COLUMNS, stem, f"fastnas memory-engine ops benchmark ({device})", env)
    print(f"\nwrote {stem}.md and {stem}.csv")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="three depthwise sizes and one case per other op")
    parser.add_argument("--case", default=None, help="only cases whose label contains this text")
    parser.add_argument(
        "--impls", default=None, help="comma list of backends, 'eager', 'compile', 'aten' (default: all here)"
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=None, help="batch size of every case (default: 64, 32 for 56x56)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
