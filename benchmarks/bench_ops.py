#!/usr/bin/env python
"""Benchmark of the fused ops: every available backend vs the eager reference vs
torch.compile of the reference, forward, backward and both, in one run.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--quick] [--out DIR]

Writes <device>_ops.md and <device>_ops.csv under DIR (default benchmarks/results),
rewritten after every case so an interrupted run keeps what it measured. Ratios
("vs eager") are eager-reference time over this row's time, from the same run.
On CUDA, "bw" is the minimal bytes the op must move over its time, and
"of copy" that bandwidth as a fraction of a device-to-device copy measured in
the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import fastnas  # noqa: F401
except ImportError:  # running from a clone that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from fastnas import backends, bench
from fastnas.ops import (
    mixed_sum,
    mixed_sum_reference,
    partial_channel_mixed_sum,
    partial_channel_mixed_sum_reference,
)

MODES = ("fwd", "bwd", "full")
COLUMNS = [
    "op", "K", "xs", "bypass", "pool", "dtype", "impl", "mode",
    "median_ms", "q25_ms", "q75_ms", "reps", "peak_mib", "vs_eager", "bw_gbs", "of_copy", "note",
]  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    op: str  # "mixed_sum" or "partial_channel_mixed_sum"
    K: int
    xs: tuple[int, ...]
    bypass: tuple[int, ...] | None = None
    pool: bool = False
    groups: int = 4
    dtype: str = "fp32"
    # The acceptance size: fused fwd+bwd must be >= 2x eager on the CPU.
    target: bool = False

    def label(self) -> str:
        s = f"{self.op} K={self.K} xs {'x'.join(map(str, self.xs))} {self.dtype}"
        if self.bypass is not None:
            s += f" bypass {'x'.join(map(str, self.bypass))}" + (" pool" if self.pool else "")
        return s


def cases(device: str, quick: bool) -> list[Case]:
    ms, pc = "mixed_sum", "partial_channel_mixed_sum"
    out = [
        Case(ms, 8, (64, 16, 32, 32), target=True),
        Case(pc, 8, (64, 16, 32, 32), (64, 48, 32, 32), target=True),
        Case(pc, 8, (64, 16, 16, 16), (64, 48, 32, 32), pool=True),
    ]
    if not quick:
        out += [
            # A deep-stage edge: few pixels, more channels.
            Case(ms, 8, (64, 64, 8, 8)),
            # One call summing every edge and candidate into a node (5 edges x 8).
            Case(ms, 40, (16, 16, 32, 32)),
            # The PC-DARTS C=16 CIFAR edge: 1/4 of the channels through the candidates.
            Case(pc, 8, (64, 4, 32, 32), (64, 12, 32, 32)),
        ]
    if device == "cuda":
        big = [
            Case(ms, 8, (256, 64, 32, 32)),
            Case(pc, 8, (256, 64, 32, 32), (256, 192, 32, 32)),
            Case(pc, 8, (256, 64, 16, 16), (256, 192, 32, 32), pool=True),
        ]
        # Large sizes first: the bandwidth target is about them, and a time-boxed
        # run should have them even if it is cut short.
        out = big + [Case(**{**asdict(c), "dtype": "bf16"}) for c in big] + out
        if not quick:
            out.append(Case(ms, 8, (64, 16, 32, 32), dtype="bf16"))
    return out


def make_inputs(case: Case, device: str, seed: int = 0):
    torch.manual_seed(seed)
    dtype = DTYPES[case.dtype]
    xs = [torch.randn(case.xs, device=device, dtype=dtype, requires_grad=True) for _ in range(case.K)]
    # Architecture weights stay fp32 under mixed precision.
    weights = torch.randn(case.K, device=device).softmax(0).requires_grad_()
    bypass = None
    if case.bypass is not None:
        bypass = torch.randn(case.bypass, device=device, dtype=dtype, requires_grad=True)
    return xs, weights, bypass


def op_fn(case: Case, impl: str):
    """A function of (xs, weights, bypass) computing the case's op with ``impl``."""
    if case.op == "mixed_sum":
        if impl in ("eager", "compile"):
            return lambda xs, w, b: mixed_sum_reference(xs, w)
        return lambda xs, w, b: mixed_sum(xs, w, backend=impl)
    groups, pool = case.groups, case.pool
    if impl in ("eager", "compile"):
        return lambda xs, w, b: partial_channel_mixed_sum_reference(xs, w, b, groups, pool)
    return lambda xs, w, b: partial_channel_mixed_sum(xs, w, b, groups, pool, backend=impl)


def minimal_bytes(case: Case, mode: str) -> int:
    """Bytes any implementation must read and write (each tensor touched once per pass)."""
    item = DTYPES[case.dtype].itemsize
    n_x = math.prod(case.xs)
    if case.op == "mixed_sum":
        fwd = (case.K + 1) * n_x
        bwd = n_x + 2 * case.K * n_x  # grad out; xs again for the weights' gradient; grad xs
    else:
        n_b = math.prod(case.bypass)
        n_b_out = n_b // 4 if case.pool else n_b
        n_out = n_x + n_b_out
        fwd = case.K * n_x + n_b + n_out
        # The pooled bypass is read again to find the argmax.
        bwd = n_out + 2 * case.K * n_x + n_b + (n_b if case.pool else 0)
    return item * {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def implementations(device: str, requested: str | None) -> list[str]:
    if requested:
        return [s.strip() for s in requested.split(",") if s.strip()]
    # Both ops of this benchmark have the same implementations.
    fused = [name for name in backends.runnable("mixed_sum", device) if name != "reference"]
    if device == "cpu":
        # The Triton interpreter is a correctness tool, not a contender on speed.
        fused = [name for name in fused if name != "triton"]
    return fused + ["eager", "compile"]


class Prepared:
    """The three timed closures of one (case, impl), built once; compile happens here."""

    def __init__(self, case: Case, impl: str, device: str):
        self.xs, self.w, self.b = make_inputs(case, device)
        self.inputs = self.xs + [self.w] + ([self.b] if self.b is not None else [])
        fn = op_fn(case, impl)
        if impl == "compile":
            torch._dynamo.reset()
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        self.fn = fn
        # The first calls compile (forward and backward graphs), outside any timing.
        out = self.call()
        self.grad = torch.randn_like(out)
        torch.autograd.grad(out, self.inputs, self.grad)
        self.out = out.detach()

    def call(self):
        return self.fn(self.xs, self.w, self.b)

    def closure(self, mode: str):
        """(fn, setup) for ``mode``; setup, run untimed before each call, may be None.

        Backward alone is timed on a graph built by an untimed forward each time,
        not with retain_graph: compiled backwards that donate their buffers refuse
        a retained graph, and a retained graph is not what training runs.
        """
        if mode == "fwd":
            return self.call, None
        if mode == "full":
            return (lambda: torch.autograd.grad(self.call(), self.inputs, self.grad)), None
        held: list[torch.Tensor] = []

        def setup():
            held[:] = [self.call()]

        return (lambda: torch.autograd.grad(held.pop(), self.inputs, self.grad)), setup


def check_against(out: torch.Tensor, ref: torch.Tensor) -> str:
    tol = 1e-4 if out.dtype == torch.float32 else 2e-2
    if out.shape != ref.shape:
        return f"MISMATCH shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item() or 1.0
    return "" if err <= tol * scale else f"MISMATCH max abs err {err:.3g}"


def memory_child(case: Case, device: str, impls: list[str]) -> dict:
    """Peak bytes per (impl, mode) for one case, measured in this (fresh) process."""
    result: dict[str, dict[str, int | None]] = {}
    for impl in impls:
        try:
            prep = Prepared(case, impl, device)
        except Exception:
            continue
        result[impl] = {}
        for mode in MODES:
            fn, setup = prep.closure(mode)
            try:
                result[impl][mode] = bench.peak_memory(fn, device, setup)
            except Exception:
                result[impl][mode] = None
        del prep
    return result


def cpu_memory(case: Case, impls: list[str], timeout: float) -> dict:
    """Run ``memory_child`` in a fresh process started with ``bench.CPU_MEMORY_ENV``."""
    env = {**os.environ, **bench.CPU_MEMORY_ENV}
    cmd = [sys.executable, __file__, "--memory-child", json.dumps(asdict(case)), "--impls", ",".join(impls)]
    cmd += ["--threads", str(torch.get_num_threads())]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        return json.loads(last) if proc.returncode == 0 and last else {}
    except (subprocess.SubprocessError, json.JSONDecodeError, OSError):
        return {}


def run(args) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible; use --device cpu", file=sys.stderr)
        return 2
    impls = implementations(device, args.impls)
    env = bench.environment(device)
    if device == "cpu":
        env["cpu_allocator"] = bench.steady_cpu_allocator()
    env["command"] = " ".join(["python", "benchmarks/bench_ops.py", *args.argv])
    copy_bw = bench.copy_bandwidth(device) if device == "cuda" else None
    if copy_bw:
        env["copy_bandwidth"] = f"{copy_bw / 1e9:.0f} GB/s (1 GiB device-to-device copy, read+write)"
    env["cpu_memory"] = (
        "peak RSS above RSS before the call, in a fresh process per case with "
        + " ".join(f"{k}={v}" for k, v in bench.CPU_MEMORY_ENV.items())
        if device == "cpu"
        else "torch.cuda.max_memory_allocated above memory_allocated before the call"
    )
    print(json.dumps(env, indent=1), flush=True)
    out_dir = Path(args.out)
    stem = out_dir / f"{device}_ops{'_' + args.tag if args.tag else ''}"
    kw = {"min_time_s": 0.3 if args.quick else 1.0} if device == "cpu" else {}
    rows: list[dict] = []
    summary: list[str] = []

    for case in cases(device, args.quick):
        if args.case and args.case not in case.label():
            continue
        print(f"\n== {case.label()}", flush=True)
        mem = cpu_memory(case, impls, timeout=args.memory_timeout) if device == "cpu" and not args.no_memory else {}
        ref_out, eager_ms = None, {}
        case_rows = []
        for impl in ["eager"] + [i for i in impls if i != "eager"]:
            if impl not in impls and impl == "eager":
                continue
            base = {
                "op": case.op, "K": case.K, "xs": "x".join(map(str, case.xs)),
                "bypass": "x".join(map(str, case.bypass)) if case.bypass else "",
                "pool": "yes" if case.pool else "", "dtype": case.dtype, "impl": impl,
            }  # fmt: skip
            try:
                prep = Prepared(case, impl, device)
            except Exception as exc:
                note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                if args.verbose:
                    traceback.print_exc()
                print(f"  {impl:8s} {note}", flush=True)
                case_rows += [{**base, "mode": m, "note": note} for m in MODES]
                continue
            note = ""
            if impl == "eager":
                ref_out = prep.out
            elif ref_out is not None:
                note = check_against(prep.out, ref_out)
            for mode in MODES:
                fn, setup = prep.closure(mode)
                try:
                    t = bench.time_fn(fn, device, setup=setup, **kw)
                except Exception as exc:
                    case_rows.append({**base, "mode": mode, "note": f"failed: {type(exc).__name__}: {exc}"[:200]})
                    continue
                row = {**base, "mode": mode, **t.as_dict(), "note": note}
                if impl == "eager":
                    eager_ms[mode] = t.median_ms
                if mode in eager_ms:
                    row["vs_eager"] = eager_ms[mode] / t.median_ms
                if device == "cuda":
                    peak = bench.peak_memory(fn, device, setup)
                    bw = minimal_bytes(case, mode) / (t.median_ms / 1e3)
                    row.update(bw_gbs=bw / 1e9, of_copy=bw / copy_bw)
                else:
                    peak = mem.get(impl, {}).get(mode)
                row["peak_mib"] = None if peak is None else peak / 2**20
                case_rows.append(row)
                extra = f" {row['bw_gbs']:.0f} GB/s ({row['of_copy']:.0%} of copy)" if "bw_gbs" in row else ""
                print(
                    f"  {impl:8s} {mode:4s} {t.median_ms:9.3f} ms [{t.q25_ms:.3f}, {t.q75_ms:.3f}]"
                    f"  {row.get('vs_eager', float('nan')):5.2f}x eager"
                    f"  peak {row['peak_mib'] if row['peak_mib'] is not None else float('nan'):8.1f} MiB{extra} {note}",
                    flush=True,
                )
            del prep
        rows += case_rows
        for row in case_rows:
            if case.target and row["mode"] == "full" and row["impl"] not in ("eager",) and "vs_eager" in row:
                verdict = "meets" if row["vs_eager"] >= 2.0 else "below"
                summary.append(
                    f"- {case.label()}, fwd+bwd: **{row['impl']} {row['vs_eager']:.2f}x** vs eager "
                    f"({verdict} the 2x target)"
                )
        notes = ["Ratios vs eager, fwd+bwd, at the issue's target sizes:", ""] + (summary or ["- (none yet)"])
        env["load_average_end"] = bench.load_average()
        bench.write_results(rows, COLUMNS, stem, f"fastnas ops benchmark ({device})", env, notes)

    print(
        "\n" + "\n".join(["TARGETS (fused fwd+bwd vs eager reference, goal >= 2x):"] + (summary or ["  none measured"]))
    )
    print(f"\nwrote {stem}.md and {stem}.csv")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the target sizes only, shorter timing")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument(
        "--impls", default=None, help="comma list of backends, 'eager', 'compile' (default: all that run here)"
    )
    parser.add_argument("--case", default=None, help="only cases whose label contains this text")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--memory-timeout", type=float, default=300.0)
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        case = Case(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.memory_child).items()})
        print(json.dumps(memory_child(case, args.device, implementations(args.device, args.impls))))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
