"""Measurement helpers shared by the benchmarks and by ``fastnas bench-step``.

Timing: median and quartiles. CPU uses ``time.perf_counter`` around each call
after a warm-up; CUDA uses ``triton.testing.do_bench`` (CUDA events, L2 flushed
between calls), falling back to plain CUDA events when triton is missing.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated
before the call. On the CPU torch has no allocator statistics, so the figure is
the process's peak resident memory (VmHWM) above its resident memory just before
the call; see ``peak_memory`` for when that is honest.

Op counts: a ``TorchDispatchMode`` that counts every op reaching the dispatcher
below autograd, so composite ops are counted as the kernels they decompose to and
the autograd engine's backward ops are counted too.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# glibc keeps freed blocks below its (self-raising) mmap threshold resident for
# reuse, so in a process that has already run other measurements a later peak
# can hide inside pages that an earlier one touched. A fixed threshold makes
# every block above 64 KiB its own mapping that leaves RSS when freed, so
# resident memory then tracks the bytes torch holds. It must be in the
# environment when the process starts; children that measure CPU memory get it.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

REPO_ROOT = Path(__file__).resolve().parents[2]


def steady_cpu_allocator() -> str:
    """Make glibc keep freed memory for reuse; return a note for the result header.

    By default glibc hands large freed blocks back to the kernel depending on its
    history (a self-raising mmap threshold, heap trimming), so the same op can pay
    for zeroing fresh pages on one run and not on the next: timings moved 2-3x
    with what the process had done before. Fixed, high thresholds keep freed
    blocks in the heap, as a caching allocator does on a GPU, so that timings
    measure the ops rather than page faults. Eager and fused runs share it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default allocator"
    m_trim_threshold, m_mmap_threshold = -1, -3
    limit = 1 << 30
    if libc.mallopt(m_mmap_threshold, limit) and libc.mallopt(m_trim_threshold, limit):
        return "glibc mallopt: mmap and trim thresholds 1 GiB (freed memory reused, no page-fault noise)"
    return "default allocator"


# --- timing ------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def quartiles(samples_ms: Sequence[float]) -> Timing:
    if len(samples_ms) == 1:
        (t,) = samples_ms
        return Timing(t, t, t, 1)
    q25, q50, q75 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Timing(q50, q25, q75, len(samples_ms))


def time_cpu(
    fn: Callable[[], object],
    *,
    setup: Callable[[], object] | None = None,
    warmup: int = 3,
    min_reps: int = 20,
    max_reps: int = 2000,
    min_time_s: float = 1.0,
) -> Timing:
    """Time ``fn`` on the CPU: at least ``min_reps`` calls and ``min_time_s`` seconds of them.

    ``setup``, when given, runs untimed before every call (to build the graph a
    backward-only measurement consumes).
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max_reps and (len(samples) < min_reps or spent < min_time_s):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        spent += samples[-1] / 1e3
    return quartiles(samples)


def time_cuda(
    fn: Callable[[], object],
    *,
    setup: Callable[[], object] | None = None,
    warmup_ms: float = 25,
    rep_ms: float = 100,
) -> Timing:
    """Time ``fn`` on the current CUDA device; kernels launched inside are what count.

    Without ``setup``: ``triton.testing.do_bench``. With it (it must stay out of
    the timing, which do_bench cannot do), CUDA events around each call, with the
    L2 cache flushed before each as do_bench does.
    """
    do_bench = None
    if setup is None:
        try:
            from triton.testing import do_bench
        except Exception:
            pass
    if do_bench is not None:
        q50, q25, q75 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
        # do_bench picks its repetition count from rep_ms; report the same estimate.
        return Timing(q50, q25, q75, max(1, int(rep_ms / max(q50, 1e-3))))
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    setup = setup or (lambda: None)
    for _ in range(3):
        setup()
        fn()
    torch.cuda.synchronize()
    events = []
    deadline = time.perf_counter() + max(rep_ms, warmup_ms) / 1e3
    while len(events) < 10 or (time.perf_counter() < deadline and len(events) < 1000):
        setup()
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
        if len(events) % 10 == 0:
            end.synchronize()
    torch.cuda.synchronize()
    return quartiles([s.elapsed_time(e) for s, e in events])


def time_fn(fn: Callable[[], object], device: str | torch.device, **kwargs) -> Timing:
    """``time_cuda`` for CUDA devices, ``time_cpu`` otherwise; options the other lacks are dropped."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, **{k: v for k, v in kwargs.items() if k in ("setup", "warmup_ms", "rep_ms")})
    keep = ("setup", "warmup", "min_reps", "max_reps", "min_time_s")
    return time_cpu(fn, **{k: v for k, v in kwargs.items() if k in keep})


# --- memory ------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """Resident memory of this process now, or None off Linux."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (since start or the last reset)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    # ru_maxrss is KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_memory_is_exact() -> bool:
    """Whether this process started with the allocator setting that makes RSS deltas honest."""
    return all(os.environ.get(k) == v for k, v in CPU_MEMORY_ENV.items())


def peak_memory(
    fn: Callable[[], object], device: str | torch.device, setup: Callable[[], object] | None = None
) -> int | None:
    """Peak bytes held while ``fn`` runs, above what was held just before it.

    CUDA: the caching allocator's own peak counter, exact. CPU: VmHWM minus VmRSS
    around the call, which is honest only in a process started with
    ``CPU_MEMORY_ENV`` (see there) or in a fresh process that freed nothing large
    before; None when the peak cannot be reset here. ``setup`` runs first, outside
    the measurement.
    """
    device = torch.device(device)
    if setup is not None:
        setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not reset_peak_rss():
        return None
    before = rss_bytes()
    fn()
    if before is None:
        return None
    return max(0, peak_rss_bytes() - before)


# --- op counts -----------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher below autograd, by qualified name."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name()] += 1
        return func(*args, **(kwargs or {}))

    def total(self, namespace: str | None = None) -> int:
        if namespace is None:
            return sum(self.counts.values())
        return sum(n for name, n in self.counts.items() if name.startswith(namespace + "::"))


def count_ops(fn: Callable[[], object]) -> OpCounter:
    """Run ``fn`` once under an ``OpCounter`` and return it."""
    with OpCounter() as counter:
        fn()
    return counter


def run_child(cmd: Sequence[str], timeout: float, env: dict | None = None) -> tuple[dict | None, str]:
    """Run a benchmark child (``python -m fastnas.bench ...``) from the repository root.

    Returns its last JSON line, or None and why not: the timeout, or the exit
    status with the last line of stderr (an exception's message).
    """
    try:
        # From the repository root ``-m fastnas.bench`` finds this checkout, installed or not.
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
                              env=None if env is None else {**os.environ, **env})  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"failed (exit {proc.returncode}): {err[:200]}"
    return json.loads(lines[-1]), ""


# --- environment, bandwidth, result files --------------------------------------------


def git_commit(root: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def environment(device: str | torch.device) -> dict:
    """What a result depends on: device, versions, commit, date, backends."""
    from fastnas import backends
    from fastnas._version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__})"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "triton": triton_version,
        "python": platform.python_version(),
        "fastnas": __version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "available_backends": ",".join(backends.available_backends()),
        "load_average": load_average(),
    }


def load_average() -> str:
    """1, 5 and 15-minute load: other work on a shared machine skews CPU timings."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def copy_bandwidth(device: str | torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, min_time_s=0.5, min_reps=5)
    return 2 * n * 4 / (timing.median_ms / 1e3)


def write_results(
    rows: Sequence[dict], columns: Sequence[str], stem: Path, title: str, env: dict, notes: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write ``rows`` as ``stem.csv`` and a ``stem.md`` table headed by ``env``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        f.write("".join(f"# {k}: {v}\n" for k, v in env.items()))
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c)) for c in columns})
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [""] + list(notes) + ([""] if notes else [])
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)
