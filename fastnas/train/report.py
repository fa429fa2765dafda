"""What a trained network costs: parameters, FLOPs per image and measured inference latency."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

LATENCY_WARMUP = 5
LATENCY_MIN_REPEATS = 10
LATENCY_MAX_REPEATS = 100
LATENCY_BUDGET_S = 5.0
# "wall": elapsed time; "cpu": the CPU time of the calling thread, which on a busy shared
# machine is what a one-thread CPU forward takes on an idle one (the wall clock there
# also counts the time other processes hold the cores).
CLOCKS = ("wall", "cpu")


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(parameters of the network that infers, parameters of its auxiliary head).

    The papers count the first (DARTS ``count_parameters_in_MB`` leaves the head out).
    """
    total = auxiliary = 0
    for name, p in net.named_parameters():
        if name.startswith("auxiliary_head."):
            auxiliary += p.numel()
        else:
            total += p.numel()
    return total, auxiliary


def _images(batch: int, in_channels: int, image_size: int, device) -> torch.Tensor:
    return torch.randn(batch, in_channels, image_size, image_size, device=device)


@torch.no_grad()
def count_flops(net: nn.Module, in_channels: int, image_size: int, device) -> int:
    """FLOPs of one image through ``net`` in eval mode, as ``torch.utils.flop_counter`` counts them.

    The counter takes a multiply-add as 2 FLOPs and counts convolutions and
    matrix products (pooling, batch norm and additions are free), so half of it
    is the multiply-adds the NAS papers report as FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = net.training
    net.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            net(_images(1, in_channels, image_size, device))
    finally:
        net.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(
    net: nn.Module,
    batch: int,
    in_channels: int,
    image_size: int,
    device,
    autocast,
    *,
    warmup: int = LATENCY_WARMUP,
    min_repeats: int = LATENCY_MIN_REPEATS,
    max_repeats: int = LATENCY_MAX_REPEATS,
    budget_s: float = LATENCY_BUDGET_S,
    clock: str = "wall",
) -> dict:
    """Median time of an eval-mode forward of ``batch`` images on ``device``, after ``warmup`` runs.

    Repeats until ``max_repeats`` runs or ``budget_s`` seconds, and at least
    ``min_repeats`` times. ``autocast`` is the context the training ran its
    forwards in (mixed precision or none). ``clock`` is one of ``CLOCKS``; "cpu"
    needs a CPU device and one torch thread.
    """
    device = torch.device(device)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("the cpu clock times one CPU thread: it needs a CPU device and torch.set_num_threads(1)")
    now = time.thread_time if clock == "cpu" else time.perf_counter
    was_training = net.training
    net.eval()
    x = _images(batch, in_channels, image_size, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    try:
        with autocast():
            for _ in range(warmup):
                net(x)
            sync()
            start = time.perf_counter()
            while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
                t0 = now()
                net(x)
                sync()
                times.append(now() - t0)
    finally:
        net.train(was_training)
    return {
        "latency_ms": 1000 * statistics.median(times),
        "latency_batch_size": batch,
        "latency_repeats": len(times),
        "latency_device": str(device),
        "latency_clock": clock,
    }


def format_report(report: dict) -> str:
    """The report as a few lines for the terminal."""
    lines = [
        f"architecture: {report['architecture']}",
        f"test accuracy: {100 * report['test_accuracy']:.2f}% ({report['test_images']} {report['dataset']} "
        f"test images, after {report['epochs']} epochs)",
        f"parameters: {report['parameters'] / 1e6:.3f}M"
        + (f" (+{report['auxiliary_parameters'] / 1e6:.3f}M auxiliary head)" if report["auxiliary_parameters"] else ""),
        f"FLOPs per image: {report['flops_per_image'] / 1e6:.2f}M ({report['multiply_adds_per_image'] / 1e6:.2f}M "
        f"multiply-adds) at {report['image_size']}x{report['image_size']}",
        f"inference latency: {report['latency_ms']:.3f} ms median for a batch of {report['latency_batch_size']} on "
        f"{report['latency_device']} ({report['latency_repeats']} runs)",
        f"training time: {report['train_time_s']:.1f} s",
    ]
    return "\n".join(lines)
