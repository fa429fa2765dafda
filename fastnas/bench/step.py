"""The search-step benchmark of ``fastnas bench-step`` (and ``python -m fastnas.bench``).

One configuration of the DARTS or PC-DARTS search step, eager against fused, in
this process: time, peak memory and dispatcher op counts; ``--host`` measures the
host's share of a step, ``--imagenet`` live memory per image (``fastnas.bench.memory``),
``--emulate-launches`` device launches per step (``fastnas.bench.emulation``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence

import torch

from fastnas.bench.measure import (
    Timing,
    count_ops,
    device_name,
    git_commit,
    peak_rss_bytes,
    quartiles,
    reset_peak_rss,
    rss_bytes,
)
from fastnas.run.loop import weight_sgd

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
        "--compile",
        action="store_true",
        help="run the network through torch.compile (static shapes); the first step, which compiles, is "
        "reported apart as compile_s, and ops are not counted",
    )
    parser.add_argument(
        "--partial-channels", type=int, default=None, help="K of PC-DARTS (default: the network's, 4 for pc-darts)"
    )
    parser.add_argument(
        "--emulate-launches",
        action="store_true",
        help="device launches per step: the fused network's in the host emulation of the CUDA kernels (built "
        "on first use from tests/cuda_emulation) against eager's kernel-running ops, and their ratio; CPU "
        "tensors, batch 2 at 8x8 unless given",
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


def build_step_network(args, device):
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
    net,
    device,
    batch_size: int,
    image_size: int,
    num_classes: int,
    seed: int = 0,
    cuda_graph: bool = False,
    compiled: bool = False,
):
    """One first-order DARTS step as a closure: arch step on a val batch, then weight step.

    Hyper-parameters are the DARTS paper's; the batches are fixed random data, as
    the step's cost does not depend on the pixels. The closure returns the
    training loss as a tensor. With ``cuda_graph`` the step is captured here
    (warm-up steps included, the model restored after them) and each call
    replays it; the returned loss is then the graph's static output, which the
    next call overwrites. With ``compiled`` the forward runs through
    ``torch.compile(net)`` (the optimisers stay eager); the first call compiles.
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
    weight_opt = weight_sgd(weight_params, lr=0.025, momentum=0.9, weight_decay=3e-4)
    loss_fn = torch.nn.functional.cross_entropy
    net.train()
    model = torch.compile(net, dynamic=False) if compiled else net

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
            loss_fn(model(x_val), y_val).backward()
        with optimizer:
            arch_opt.step()
            weight_opt.zero_grad(set_to_none=True)
        with network:
            loss = loss_fn(model(x_train), y_train)
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
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        from fastnas.errors import RunError

        raise RunError(f"--device {args.device}: torch sees no CUDA GPU here")
    if getattr(args, "imagenet", False):
        from fastnas.bench.memory import imagenet_memory

        return imagenet_memory(args)
    if getattr(args, "emulate_launches", False):
        from fastnas.bench.emulation import run_emulated_launches

        return run_emulated_launches(args)
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
    timing = quartiles(times)
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
    net = build_step_network(args, device)
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
    net = build_step_network(args, device)
    compiled = getattr(args, "compile", False)
    if compiled and cuda_graph:
        from fastnas.errors import RunError

        raise RunError("--compile and --cuda-graph time different steps; give one of them")
    step = make_search_step(
        net, device, args.batch_size, args.image_size, args.num_classes, args.seed, compiled=compiled
    )
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
    compile_s = None
    if compiled:
        # The first step compiles the forward and backward graphs; timed apart. Counting
        # ops under the dispatch mode would trace the compiled code again.
        args.count_ops = False
        t0 = time.perf_counter()
        step()
        sync()
        compile_s = time.perf_counter() - t0
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

    timing = quartiles(times)
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
        "compiled": compiled,
        "compile_s": compile_s,
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
    timing = quartiles(times)
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
    from fastnas.errors import RunError

    parser = add_bench_step_args(argparse.ArgumentParser(prog="python -m fastnas.bench", description=__doc__))
    try:
        run_bench_step(parser.parse_args(argv))
    except RunError as exc:
        print(f"python -m fastnas.bench: error: {exc}", file=sys.stderr)
        return 1
    return 0
