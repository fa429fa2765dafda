"""One search step of DARTS-family code in each style fastnas.patch takes, unpatched and patched.

A step is what first-order DARTS does per batch: forward and backward on a
validation batch and an Adam step on the architecture weights, then forward and
backward on a training batch and an SGD step (gradient clipping, momentum, weight
decay) on the network weights. Each configuration runs in a fresh process, so the
peak resident memory (VmHWM) is its own; configurations alternate round by round,
so that load from other processes falls on all of them alike.

Styles (``--styles``, default all; the models are the test fixtures):

    darts                 tests/darts_fixture: the original DARTS search model
    ops-list              tests/renamed_fixture: candidates under ``ops``
    pools-without-bn      the same under ``layers``, summed in a loop, pools with no batch norm
    affine-bn             candidates with affine batch norms (the fused sum only)
    bn-no-running-stats   candidates under ``candidate_ops`` whose batch norms keep no running statistics
    nb201-darts           tests/autodl_fixture: NAS-Bench-201 cells summing their edges inline (DARTS)
    nb201-gdas            the same cells' GDAS hard-sample forward_gdas
    nasnet-darts          AutoDL's NASNet-space cells, mixed ops summing in forward_darts

Each style's section of the result file is rewritten by a run that measures it, and
left as it was otherwise.

    python benchmarks/bench_patch.py                      # every style -> benchmarks/results/cpu_patch.md
    python benchmarks/bench_patch.py --styles darts --reps 2 --rounds 1 --threads 2
    python benchmarks/bench_patch.py --paired --styles darts   # timings interleaved in one process, appended
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


# style: (model built from args, its description for the result file)
STYLES = {
    "darts": "tests/darts_fixture/model_search.py Network(C={C}, layers={layers})",
    "ops-list": "tests/renamed_fixture/model_search.py Network(C={C}, layers={layers}, steps=4, mixed=MixedOp)",
    "pools-without-bn": "tests/renamed_fixture/model_search.py Network(C={C}, layers={layers}, steps=4, "
    "mixed=MixedLayer, pool_bn=False)",
    "affine-bn": "tests/renamed_fixture/model_search.py Network(C={C}, layers={layers}, steps=4, mixed=MixedOp, "
    "affine=True)",
    "bn-no-running-stats": "tests/renamed_fixture/model_search.py Network(C={C}, layers={layers}, steps=4, "
    "mixed=MixedEdge, track=False)",
    "nb201-darts": "tests/autodl_fixture/search_models.py TinyNetworkDarts(C={C}, N={N}, max_nodes=4, "
    "NAS_BENCH_201, affine=False, track_running_stats=True)",
    "nb201-gdas": "tests/autodl_fixture/search_models.py TinyNetworkGDAS(C={C}, N={N}, max_nodes=4, "
    "NAS_BENCH_201, affine=False, track_running_stats=True)",
    "nasnet-darts": "tests/autodl_fixture/search_models.py NASNetworkDARTS(C={C}, N={nasnet_N}, steps=4, "
    "multiplier=4, stem_multiplier=3, DARTS_SPACE, affine=False, track_running_stats=True)",
}


def _model(style: str, args):
    import torch.nn as nn

    from tests.autodl_fixture import search_models
    from tests.autodl_fixture.cell_operations import DARTS_SPACE, NAS_BENCH_201
    from tests.darts_fixture import model_search
    from tests.renamed_fixture import model_search as renamed

    loss = nn.CrossEntropyLoss()
    if style == "darts":
        return model_search.Network(args.C, 10, args.layers, loss)
    options = {
        "ops-list": dict(mixed=renamed.MixedOp),
        "pools-without-bn": dict(mixed=renamed.MixedLayer, pool_bn=False),
        "affine-bn": dict(mixed=renamed.MixedOp, affine=True),
        "bn-no-running-stats": dict(mixed=renamed.MixedEdge, track=False),
    }
    if style in options:
        return renamed.Network(args.C, 10, args.layers, loss, steps=4, **options[style])
    if style in ("nb201-darts", "nb201-gdas"):
        cls = search_models.TinyNetworkDarts if style == "nb201-darts" else search_models.TinyNetworkGDAS
        return cls(args.C, args.N, 4, 10, NAS_BENCH_201, affine=False, track_running_stats=True)
    if style == "nasnet-darts":
        return search_models.NASNetworkDARTS(args.C, args.nasnet_N, 4, 4, 3, 10, DARTS_SPACE, False, True)
    raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")


def _configs(style: str, backends: list[str]) -> list[str]:
    configs = ["unpatched"]
    if style == "darts":
        configs.append("patched-reference")
        if "cpu" in backends:
            configs += ["patched-cpu-sum", "patched-cpu", "patched-cpu-recompute"]
    elif "cpu" in backends:
        configs.append("patched-cpu")
    return configs


def _setup(config: str, args):
    """A search-step closure for ``config`` on its own copy of the model and data."""
    import torch
    import torch.nn as nn

    sys.path.insert(0, str(ROOT))
    from fastnas.patch import patch

    torch.manual_seed(0)
    model = _model(args.style, args)
    report = None
    if config != "unpatched":
        # patched-<backend>[-<memory>]: the fused edge keeps pre-BN tensors (save) or nothing (recompute)
        _, backend, *memory = config.split("-")
        report = patch(model, backend=backend, memory=memory[0] if memory else "save")
    if hasattr(model, "get_alphas"):
        alphas = list(model.get_alphas())
    else:
        alphas = list(model.arch_parameters())
    arch = {id(a) for a in alphas}
    weights = [p for p in model.parameters() if id(p) not in arch]
    w_opt = torch.optim.SGD(weights, 0.025, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(alphas, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.size, args.size)
    x_train, x_val = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    y_train, y_val = torch.randint(0, 10, (args.batch,), generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    model.train()
    step_seed = iter(range(1 << 30))

    def loss_of(x, y):
        torch.manual_seed(next(step_seed))  # GDAS samples in forward: the same draws in every configuration
        out = model(x)
        return nn.functional.cross_entropy(out[1] if isinstance(out, tuple) else out, y)

    def step():
        a_opt.zero_grad()
        loss_of(x_val, y_val).backward()
        a_opt.step()
        w_opt.zero_grad()
        loss = loss_of(x_train, y_train)
        loss.backward()
        nn.utils.clip_grad_norm_(weights, 5.0)
        w_opt.step()
        return loss.item()

    how = sorted({op.how.split(" (")[0] for op in report.patched}) if report else []
    return step, (len(report.patched) if report else 0), how


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"median_ms": statistics.median(times), "q25_ms": q[0], "q75_ms": q[2], "reps": len(times)}


def worker(args) -> dict:
    import torch

    import fastnas

    torch.set_num_threads(args.threads)
    step, patched, how = _setup(args.config, args)
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
        "how": how,
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
        f"--{k}={getattr(args, k)}"
        for k in ("style", "C", "layers", "N", "nasnet_N", "batch", "size", "reps", "threads")
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


_HEADER = [
    "# fastnas.patch: one first-order search step of each style of search code, CPU",
    "",
    "- step: forward+backward on a validation batch + Adam on the architecture weights, forward+backward on a "
    "training batch + clipped SGD on the other weights",
    "- time: median (quartiles) of the timed steps after one warm-up step, the best of the interleaved "
    "fresh-process rounds; speed-up: unpatched over patched, from the same run",
    "- memory: peak resident set (VmHWM) of the process; step peak is VmHWM over the warm-up step above the "
    "resident set before it (MALLOC_MMAP_THRESHOLD_=65536)",
    "- how: how the patched weighted sums run in training (`fused edge`, `fused edge on part` of the candidates "
    "with the fused sum of the others, or `fused sum` over the candidate modules' outputs), from the report",
    "- each section is rewritten by the run that measures its style; the sections were measured at different "
    "times, under different machine load",
]
_BEGIN, _END = "<!-- style: {} -->", "<!-- end of style: {} -->"


def _sections(text: str) -> dict[str, str]:
    """The style sections of an existing result file."""
    found = {}
    for style in STYLES:
        begin, end = _BEGIN.format(style), _END.format(style)
        if begin in text and end in text:
            found[style] = text[text.index(begin) : text.index(end) + len(end)]
    return found


def _section(style: str, args, runs: dict[str, list[dict]], command_args: str) -> str:
    import torch

    configs = list(runs)
    # The fastest round of each, since other processes only ever add time.
    best = {c: min(rs, key=lambda r: r["median_ms"]) for c, rs in runs.items()}
    base = best["unpatched"]
    load = os.getloadavg()
    patched = max(r["patched"] for r in best.values())
    model = STYLES[style].format(C=args.C, layers=args.layers, N=args.N, nasnet_N=args.nasnet_N)
    lines = [
        _BEGIN.format(style),
        f"## {style}",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}, commit {_commit()}",
        f"- CPU: {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{args.threads} intra-op thread(s); load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        f"- model: {model}, batch {args.batch}, {args.size}x{args.size}; {patched} modules patched",
        f"- timed steps: {args.reps} per process, best of {args.rounds} round(s)",
        f"- command: `python benchmarks/bench_patch.py {command_args}`".rstrip(),
        "",
        "| configuration | how | step median ms (q25-q75) | speed-up | peak RSS MiB | step peak MiB | step peak ratio "
        "| first loss |",
        "|---|---|---|---|---|---|---|---|",
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
        how = ", ".join(r.get("how") or []) or "-"
        lines.append(
            f"| {c} | {how} | {time_cell} | {speedup} | {r['peak_rss_mib']:.0f} | {peaks} | {r['first_loss']:.6f} |"
        )
    if args.rounds > 1:
        lines += ["", "All rounds:", "", "| configuration | step median ms | peak RSS MiB |", "|---|---|---|"]
        for c in configs:
            for r in runs[c]:
                lines.append(f"| {c} | {r['median_ms']:.0f} | {r['peak_rss_mib']:.0f} |")
    lines.append(_END.format(style))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--style", default="darts", help=argparse.SUPPRESS)
    p.add_argument("--styles", default=",".join(STYLES), help=f"comma-separated, of: {', '.join(STYLES)}")
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8, help="cells of the DARTS-space networks")
    p.add_argument("--N", type=int, default=5, help="search cells per stage of the NAS-Bench-201 network")
    p.add_argument("--nasnet_N", type=int, default=2, help="N of AutoDL's NASNet-space network (3N cells)")
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

    sys.path.insert(0, str(ROOT))
    import fastnas

    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        p.error(f"unknown style(s) {', '.join(unknown)}; choose from {', '.join(STYLES)}")
    if args.paired:
        os.environ.update(OMP_NUM_THREADS=str(args.threads))
        for style in styles:
            args.style = style
            configs = _configs(style, fastnas.available_backends())
            res = paired_worker(args, configs)
            base = res["unpatched"]["median_ms"]
            when = datetime.datetime.now().isoformat(timespec="seconds")
            lines = [
                "",
                f"{style}, interleaved in one process (`python benchmarks/bench_patch.py {command_args}`), "
                f"{args.reps} steps each after a warm-up, {when}, commit {_commit()}, "
                f"load average {os.getloadavg()[0]:.1f}:",
                "",
                "| configuration | step median ms (q25-q75) | speed-up |",
                "|---|---|---|",
            ]
            for c, r in res.items():
                lines.append(
                    f"| {c} | {r['median_ms']:.0f} ({r['q25_ms']:.0f}-{r['q75_ms']:.0f}) | "
                    f"{base / r['median_ms']:.2f}x |"
                )
            print("\n".join(lines))
            with open(args.out, "a") as f:
                f.write("\n".join(lines) + "\n")
        return 0
    sections = _sections(args.out.read_text()) if args.out.exists() else {}
    for style in styles:
        args.style = style
        configs = _configs(style, fastnas.available_backends())
        runs: dict[str, list[dict]] = {c: [] for c in configs}
        for _ in range(args.rounds):
            for config in configs:
                r = _run_worker(config, args)
                runs[config].append(r)
                print(
                    f"{style:20s} {config:22s} {r['median_ms']:9.1f} ms  peak RSS {r['peak_rss_mib']:7.1f} MiB  "
                    f"loss {r['first_loss']:.6f}  {', '.join(r['how'])}",
                    flush=True,
                )
        sections[style] = _section(style, args, runs, command_args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        body = [sections[s] for s in STYLES if s in sections]
        args.out.write_text("\n".join(_HEADER) + "\n\n" + "\n\n".join(body) + "\n")
        print(f"wrote {args.out} ({style})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
