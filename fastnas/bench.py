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

import argparse
import contextlib
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

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def _quartiles(samples_ms: Sequence[float]) -> Timing:
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
    return _quartiles(samples)


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
    return _quartiles([s.elapsed_time(e) for s, e in events])


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


# --- the search-step benchmark -------------------------------------------------------

NETWORKS = {"darts": None, "pc-darts": 4}


def add_bench_step_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``fastnas bench-step`` (one configuration, in this process)."""
    parser.add_argument(
        "--network", choices=sorted(NETWORKS), default="darts", help="DARTS or PC-DARTS (K=4) CIFAR network"
    )
    parser.add_argument("--backend", default="auto", help="fused-op backend: auto, reference, cpu, cuda, triton")
    parser.add_argument(
        "--memory",
        default="save",
        choices=("save", "recompute", "checkpoint"),
        help="what each edge keeps for backward: save, recompute (fused engine) or checkpoint (eager modules)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (2 with --host)")
    parser.add_argument("--image-size", type=int, default=None, help="default 32 (8 with --host)")
    parser.add_argument(
        "--stem",
        choices=("cifar", "imagenet"),
        default="cifar",
        help="imagenet: three stride-2 convolutions, for 224x224 inputs",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--channels", type=int, default=16, help="initial channels C")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=None, help="default 10 (1000 with --imagenet)")
    parser.add_argument("--no-count-ops", dest="count_ops", action="store_false", help="skip the op-counting step")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; 1 with --host)"
    )
    parser.add_argument(
        "--host",
        action="store_true",
        help="host cost: a step small enough that arithmetic is negligible (batch 2, 8x8, one thread unless "
        "given); median host ms per step and torch.profiler op events per step",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time the step captured once as a CUDA graph and replayed (CUDA only); reports both",
    )
    parser.add_argument(
        "--partial-channels", type=int, default=None, help="K of PC-DARTS (default: the network's, 4 for pc-darts)"
    )
    parser.add_argument(
        "--imagenet",
        action="store_true",
        help="ImageNet memory mode: one step at 224x224 (8 cells, C=16, 1000 classes, batch 4 unless given) of "
        "PC-DARTS' K=2 network run eagerly and of fastnas's PC-DARTS and full DARTS space, each in a fresh "
        "process; live memory per image and the projected largest batch",
    )
    parser.add_argument(
        "--imagenet-memory", default="save,recompute", help="ImageNet mode: the memory modes of the fused rows"
    )
    parser.add_argument(
        "--device-memory", type=float, default=80.0, help="ImageNet mode: device memory in GiB for the projection"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="ImageNet mode: seconds for each row")
    parser.add_argument(
        "--out", default=None, help="ImageNet mode: also write <device>_imagenet_memory.md/.csv in this folder"
    )
    return parser


def _build_network(args, device):
    from fastnas.spaces.darts import SearchNetwork

    return SearchNetwork(
        C=args.channels,
        num_classes=args.num_classes,
        layers=args.layers,
        stem=getattr(args, "stem", "cifar"),
        partial_channels=NETWORKS[args.network]
        if getattr(args, "partial_channels", None) is None
        else args.partial_channels,
        backend=None if args.backend == "auto" else args.backend,
        memory=args.memory,
    ).to(device)


def make_search_step(
    net, device, batch_size: int, image_size: int, num_classes: int, seed: int = 0, cuda_graph: bool = False
):
    """One first-order DARTS step as a closure: arch step on a val batch, then weight step.

    Hyper-parameters are the DARTS paper's; the batches are fixed random data, as
    the step's cost does not depend on the pixels. The closure returns the
    training loss as a tensor. With ``cuda_graph`` the step is captured here
    (warm-up steps included, the model restored after them) and each call
    replays it; the returned loss is then the graph's static output, which the
    next call overwrites.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, image_size, image_size)
    x_train = torch.randn(shape, generator=gen).to(device)
    x_val = torch.randn(shape, generator=gen).to(device)
    y_train = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    y_val = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    arch_params = list(net.arch_parameters())
    weight_params = list(net.weight_parameters())
    arch_opt = torch.optim.Adam(arch_params, lr=3e-4, betas=(0.5, 0.999), weight_decay=1e-3, capturable=cuda_graph)
    weight_opt = torch.optim.SGD(weight_params, lr=0.025, momentum=0.9, weight_decay=3e-4)
    loss_fn = torch.nn.functional.cross_entropy
    net.train()

    # Profiler regions (nothing when no profiler runs): what profiler_events splits the
    # events by. Not in a captured step, which replays kernels only.
    if cuda_graph:
        network = optimizer = contextlib.nullcontext()
    else:
        network, optimizer = (torch.profiler.record_function(name) for name in STEP_REGIONS)

    def step_on(x_train, y_train, x_val, y_val) -> torch.Tensor:
        with optimizer:
            arch_opt.zero_grad(set_to_none=True)
        with network:
            loss_fn(net(x_val), y_val).backward()
        with optimizer:
            arch_opt.step()
            weight_opt.zero_grad(set_to_none=True)
        with network:
            loss = loss_fn(net(x_train), y_train)
            loss.backward()
        with optimizer:
            torch.nn.utils.clip_grad_norm_(weight_params, 5.0)
            weight_opt.step()
        return loss.detach()

    if cuda_graph:
        from fastnas.search.cuda_graph import GraphedStep

        graphed = GraphedStep(
            step_on, (x_train, y_train, x_val, y_val), modules=[net], optimizers=[arch_opt, weight_opt]
        )
        graphed.capture()

        def graph_step() -> torch.Tensor:
            return graphed.replay()

        graph_step.graphed = graphed
        return graph_step

    def step() -> torch.Tensor:
        return step_on(x_train, y_train, x_val, y_val)

    return step


def run_bench_step(args: argparse.Namespace) -> dict:
    """Time one configuration of the search step in this process; print and return JSON.

    Peak memory on the CPU is this process's peak resident memory above its
    resident memory after the network, optimisers and batches exist: honest when
    this process has freed nothing large before, i.e. a fresh process per
    configuration (as benchmarks/bench_search_step.py runs it).
    """
    if getattr(args, "imagenet", False):
        from fastnas.bench_memory import imagenet_memory

        return imagenet_memory(args)
    device = torch.device(args.device)
    host = getattr(args, "host", False)
    for name, default in (HOST_DEFAULTS if host else STEP_DEFAULTS).items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return _run_host_step(args, device) if host else _run_bench_step(args, device)
    finally:
        torch.set_num_threads(threads)


# What a step measures by default, and in host-cost mode: a step whose arithmetic is
# negligible, so that its time is the host's (Python, dispatch, autograd, launches).
STEP_DEFAULTS = {"batch_size": 64, "image_size": 32, "num_classes": 10}
HOST_DEFAULTS = {"batch_size": 2, "image_size": 8, "threads": 1, "num_classes": 10}
# The profiler regions of make_search_step: forward and backward of both halves, and
# the optimisers (zero_grad, Adam, gradient clipping, SGD).
STEP_REGIONS = ("fastnas.step.network", "fastnas.step.optimizer")


def profiler_events(fn: Callable[[], object]) -> dict:
    """The op events ``torch.profiler`` records in one call of ``fn`` (every operator call
    at every level, nested ones included, and autograd's node evaluations): in all, and
    under each of make_search_step's regions (the region markers not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()

    def size(event) -> int:
        return 1 + sum(size(child) for child in event.cpu_children)

    counts = {"total": len(events) - sum(e.name in STEP_REGIONS for e in events)}
    for region in STEP_REGIONS:
        counts[region.rsplit(".", 1)[-1]] = sum(size(e) - 1 for e in events if e.name == region)
    return counts


def host_cost(step: Callable[[], object], reps: int, warmup: int) -> dict:
    """Median (and quartiles) host milliseconds per call of ``step`` on the CPU, and its
    profiler op events (one more call)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    timing = _quartiles(times)
    events = profiler_events(step)
    return {
        "host_ms_median": timing.median_ms,
        "host_ms_q25": timing.q25_ms,
        "host_ms_q75": timing.q75_ms,
        "reps": len(times),
        "profiler_events": events["total"],
        "network_events": events["network"],
        "optimizer_events": events["optimizer"],
    }


def _run_host_step(args: argparse.Namespace, device: torch.device) -> dict:
    from fastnas import backends

    if device.type != "cpu":
        raise ValueError("fastnas bench-step --host measures the host on the CPU; use --device cpu")
    torch.manual_seed(args.seed)
    net = _build_network(args, device)
    step = make_search_step(net, device, args.batch_size, args.image_size, args.num_classes, args.seed)
    result = {
        "mode": "host",
        "network": args.network,
        "backend": args.backend,
        "backend_used": backends.resolve("darts_edge", device, None if args.backend == "auto" else args.backend),
        "memory": args.memory,
        "device": device_name(device),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "channels": args.channels,
        "layers": args.layers,
        "threads": torch.get_num_threads(),
        **host_cost(step, args.reps if args.reps is not None else 10, max(args.warmup, 1)),
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    print(json.dumps(result), flush=True)
    return result


def _run_bench_step(args: argparse.Namespace, device: torch.device) -> dict:
    from fastnas import backends

    cuda_graph = getattr(args, "cuda_graph", False)
    if cuda_graph:
        from fastnas.search.cuda_graph import check_runtime_supported

        check_runtime_supported(device)
    torch.manual_seed(args.seed)
    reps = args.reps if args.reps is not None else (20 if device.type == "cuda" else 3)
    net = _build_network(args, device)
    step = make_search_step(net, device, args.batch_size, args.image_size, args.num_classes, args.seed)
    resolved = backends.resolve("darts_edge", device, None if args.backend == "auto" else args.backend)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        baseline = rss_bytes() or 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    counter = None
    for i in range(args.warmup):
        if i == 0 and args.count_ops:
            # The warm-up step is untimed anyway; counting there saves a step,
            # which on a CPU costs seconds.
            counter = count_ops(step)
        else:
            step()
    sync()
    times = []
    loss = float("nan")
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = peak_rss_bytes() - baseline

    ops = None
    if args.count_ops:
        if counter is None:
            counter = count_ops(step)
        ops = {"total": counter.total(), "aten": counter.total("aten"), "fastnas": counter.total("fastnas")}

    timing = _quartiles(times)
    result = {
        "network": args.network,
        "backend": args.backend,
        "backend_used": resolved,
        "memory": args.memory,
        "device": device_name(device),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "channels": args.channels,
        "layers": args.layers,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "step_ms_median": timing.median_ms,
        "step_ms_q25": timing.q25_ms,
        "step_ms_q75": timing.q75_ms,
        "peak_memory_mib": peak / 2**20,
        "peak_memory_kind": "max_memory_allocated above baseline"
        if device.type == "cuda"
        else "peak RSS above baseline",
        "ops_per_step": ops,
        "ops_counted_by": (
            "TorchDispatchMode, one step (the first), forward and backward of both halves plus optimisers"
        ),
        "loss": float(loss),
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    if cuda_graph:
        result.update(_time_graph_step(args, net, device, reps, timing))
    print(json.dumps(result), flush=True)
    return result


def _time_graph_step(args: argparse.Namespace, net, device: torch.device, reps: int, eager: Timing) -> dict:
    """The same step captured as a CUDA graph and replayed, timed as the eager one was."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    step = make_search_step(net, device, args.batch_size, args.image_size, args.num_classes, args.seed, cuda_graph=True)
    torch.cuda.synchronize(device)
    capture_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize(device)
    times = []
    loss = float("nan")
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    timing = _quartiles(times)
    return {
        "graph_step_ms_median": timing.median_ms,
        "graph_step_ms_q25": timing.q25_ms,
        "graph_step_ms_q75": timing.q75_ms,
        "graph_speedup": eager.median_ms / timing.median_ms,
        "graph_capture_ms": capture_ms,
        "graph_warmup_steps": step.graphed.warmup_steps,
        "graph_peak_memory_mib": (torch.cuda.max_memory_allocated(device) - baseline) / 2**20,
        "graph_loss": float(loss),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastnas.bench``: the search-step benchmark for one configuration."""
    from fastnas.search.errors import SearchError

    parser = add_bench_step_args(argparse.ArgumentParser(prog="python -m fastnas.bench", description=__doc__))
    try:
        run_bench_step(parser.parse_args(argv))
    except SearchError as exc:
        print(f"python -m fastnas.bench: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
