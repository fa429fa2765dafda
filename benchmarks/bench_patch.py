"""One DARTS search step of code written in the original style, unpatched and under fastnas.patch.

A step is what first-order DARTS does per batch: forward and backward on a
validation batch and an Adam step on the architecture weights, then forward and
backward on a training batch and an SGD step (gradient clipping, momentum, weight
decay) on the network weights. Each configuration runs in a fresh process, so the
peak resident memory (VmHWM) is its own.

    python benchmarks/bench_patch.py                # writes benchmarks/results/cpu_patch.md
    python benchmarks/bench_patch.py --batch 32 --reps 7
    python benchmarks/bench_patch.py --paired      # timings interleaved in one process, appended
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# With a fixed threshold every block above 64 KiB is its own mapping and leaves the
# resident set when freed, so VmHWM tracks what torch holds rather than what glibc
# kept around for reuse.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _setup(config: str, args):
    """A search-step closure for ``config`` on its own copy of the model and data."""
    import torch
    import torch.nn as nn

    sys.path.insert(0, str(ROOT))
    from fastnas.patch import patch
    from tests.darts_fixture import model_search

    torch.manual_seed(0)
    model = model_search.Network(args.C, 10, args.layers, nn.CrossEntropyLoss())
    report = None
    if config != "unpatched":
        # patched-<backend>[-<memory>]: the fused edge keeps pre-BN tensors (save) or nothing (recompute)
        _, backend, *memory = config.split("-")
        report = patch(model, backend=backend, memory=memory[0] if memory else "save")
    w_opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.size, args.size)
    x_train, x_val = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    y_train, y_val = torch.randint(0, 10, (args.batch,), generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    model.train()

    def step():
        a_opt.zero_grad()
        model._loss(x_val, y_val).backward()
        a_opt.step()
        w_opt.zero_grad()
        loss = model._loss(x_train, y_train)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        w_opt.step()
        return loss.item()

    return step, (len(report.patched) if report else 0)


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"median_ms": statistics.median(times), "q25_ms": q[0], "q75_ms": q[2], "reps": len(times)}


def worker(args) -> dict:
    import torch

    import fastnas

    torch.set_num_threads(args.threads)
    step, patched = _setup(args.config, args)
    before_kib = _status_kib("VmRSS")
    exact_peak = _reset_peak()
    first_loss = step()
    peak_kib = _status_kib("VmHWM")
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "config": args.config,
        "patched": patched,
        "first_loss": first_loss,
        **_summary(times),
        "rss_before_mib": before_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "step_peak_mib": (peak_kib - before_kib) / 1024 if exact_peak else None,
        "backends": fastnas.available_backends(),
    }


def paired_worker(args, configs: list[str]) -> dict:
    """Steps of every configuration interleaved in one process, so load from other
    processes falls on all of them alike; the ratios are what to read."""
    import torch

    torch.set_num_threads(args.threads)
    steps = {c: _setup(c, args)[0] for c in configs}
    for step in steps.values():
        step()
    times = {c: [] for c in configs}
    for _ in range(args.reps):
        for c, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[c].append((time.perf_counter() - t0) * 1e3)
    return {c: _summary(t) for c, t in times.items()}


def _run_worker(config: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", config] + [
        f"--{k}={getattr(args, k)}" for k in ("C", "layers", "batch", "size", "reps", "threads")
    ]
    env = {**os.environ, **MEMORY_ENV, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{config} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="each configuration runs this many times, interleaved")
    # One thread: on a shared machine OpenMP spin-waits make multi-threaded timings noise.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paired", action="store_true", help="time all configurations interleaved in one process only")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_patch.md")
    args = p.parse_args(argv)
    command_args = " ".join(argv if argv is not None else sys.argv[1:])
    if args.worker:
        args.config = args.worker
        print(json.dumps(worker(args)))
        return 0

    import torch

    sys.path.insert(0, str(ROOT))
    import fastnas

    configs = ["unpatched", "patched-reference"]
    if "cpu" in fastnas.available_backends():
        configs += ["patched-cpu-sum", "patched-cpu", "patched-cpu-recompute"]
    if args.paired:
        os.environ.update(OMP_NUM_THREADS=str(args.threads))
        res = paired_worker(args, configs)
        base = res["unpatched"]["median_ms"]
        when = datetime.datetime.now().isoformat(timespec="seconds")
        lines = [
            "",
            f"Interleaved in one process (`python benchmarks/bench_patch.py {command_args}`), "
            f"{args.reps} steps each after a warm-up, {when}, commit {_commit()}, "
            f"load average {os.getloadavg()[0]:.1f}:",
            "",
            "| configuration | step median ms (q25-q75) | speed-up |",
            "|---|---|---|",
        ]
        for c, r in res.items():
            lines.append(
                f"| {c} | {r['median_ms']:.0f} ({r['q25_ms']:.0f}-{r['q75_ms']:.0f}) | {base / r['median_ms']:.2f}x |"
            )
        print("\n".join(lines))
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
        return 0
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            r = _run_worker(config, args)
            runs[config].append(r)
            print(
                f"{config:18s} {r['median_ms']:9.1f} ms  peak RSS {r['peak_rss_mib']:7.1f} MiB  "
                f"loss {r['first_loss']:.6f}"
            )
    # The fastest round of each, since other processes only ever add time.
    best = {c: min(rs, key=lambda r: r["median_ms"]) for c, rs in runs.items()}
    base = best["unpatched"]
    load = os.getloadavg()
    lines = [
        "# fastnas.patch on the DARTS fixture: one first-order search step, CPU",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}, commit {_commit()}",
        f"- CPU: {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{args.threads} intra-op thread(s); load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        f"- model: tests/darts_fixture/model_search.py Network(C={args.C}, layers={args.layers}), "
        f"batch {args.batch}, {args.size}x{args.size}; {base['patched'] or best[configs[1]]['patched']} mixed ops",
        "- step: forward+backward on a validation batch + Adam on alphas, forward+backward on a training batch "
        "+ clipped SGD on weights",
        f"- time: median (quartiles) of {args.reps} steps after one warm-up step, the best of {args.rounds} "
        "interleaved fresh-process rounds",
        "- memory: peak resident set (VmHWM) of the process; step peak is VmHWM over the warm-up step above the "
        "resident set before it (MALLOC_MMAP_THRESHOLD_=65536)",
        f"- command: `python benchmarks/bench_patch.py {command_args}`".rstrip(),
        "",
        "| configuration | step median ms (q25-q75) | speed-up | peak RSS MiB | step peak MiB | step peak ratio "
        "| first loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        r = best[c]
        sp = r["step_peak_mib"]
        ratio = f"{sp / base['step_peak_mib']:.2f}" if sp is not None and base["step_peak_mib"] else "n/a"
        speedup = f"{base['median_ms'] / r['median_ms']:.2f}x"
        if sp is not None:
            time_cell = f"{r['median_ms']:.0f} ({r['q25_ms']:.0f}-{r['q75_ms']:.0f})"
            peaks = f"{sp:.0f} | {ratio}"
        else:
            time_cell, peaks = f"{r['median_ms']:.0f}", "n/a | n/a"
        lines.append(f"| {c} | {time_cell} | {speedup} | {r['peak_rss_mib']:.0f} | {peaks} | {r['first_loss']:.6f} |")
    lines += ["", "All rounds:", "", "| configuration | step median ms | peak RSS MiB |", "|---|---|---|"]
    for c in configs:
        for r in runs[c]:
            lines.append(f"| {c} | {r['median_ms']:.0f} | {r['peak_rss_mib']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
