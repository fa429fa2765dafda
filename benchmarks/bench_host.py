#!/usr/bin/env python
"""Host-cost benchmark: one first-order DARTS search step (architecture step, then
weight step, as ``fastnas.bench.make_search_step``) small enough that arithmetic is
negligible (batch 2, 8x8 inputs, one thread), so that its time is what the host
spends around the kernels: Python, dispatch, autograd, allocation.

    python benchmarks/bench_host.py [--networks darts,pc-darts] [--reps 15] [--out DIR]

Per network: the original DARTS search model run eagerly (tests/darts_fixture, DARTS
only), fastnas's eager reference (the candidate modules), and the fused engine with
memory "save" and "recompute", each also with the C++ edge and node ops set aside
(``*-composite``: the Python composite of the same building blocks), and "save" with
the cells' input preprocessing kept for backward instead of recomputed. Every
configuration is built in one process and their timed steps are interleaved round by
round, so that load from other processes falls on all of them alike; the median over
the rounds is reported, with the ratio to the eager reference of the same run. Op
events are those ``torch.profiler`` records in one step (every operator call, nested
ones included, and autograd's node evaluations), split into the network's forward and
backward and the optimisers. Writes cpu_host_cost[_TAG].md/.csv under DIR.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import fastnas  # noqa: F401
except ImportError:  # running from a clone that is not installed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fastnas import backends, bench  # noqa: E402

COLUMNS = [
    "network", "config", "backend_used", "host_ms_median", "host_ms_q25", "host_ms_q75", "time_vs_reference",
    "profiler_events", "events_vs_reference", "network_events", "optimizer_events", "aten_ops", "fastnas_ops",
    "loss", "note",
]  # fmt: skip
# config -> (backend, memory); "original" is the original DARTS code's own model;
# "*-composite" the fused engine with the C++ edge and node ops set aside, i.e. the
# Python composite of the same building blocks (what ran before those ops);
# "save-kept-preprocess" the fused engine with the cells' input preprocessing kept for
# backward instead of recomputed (by fastnas.ops.relu_conv_bn: what recomputing costs).
CONFIGS = {
    "original": (None, None),
    "reference": ("reference", "save"),
    "save": ("auto", "save"),
    "recompute": ("auto", "recompute"),
    "save-composite": ("auto", "save"),
    "recompute-composite": ("auto", "recompute"),
    "save-kept-preprocess": ("auto", "save"),
}
DEFAULT_CONFIGS = ",".join(CONFIGS)


def _original_model(args):
    """The original DARTS search model (tests/darts_fixture), with the parameter groups
    make_search_step asks for."""
    sys.path.insert(0, str(REPO))
    from tests.darts_fixture import model_search

    model = model_search.Network(args.channels, args.num_classes, args.layers, torch.nn.CrossEntropyLoss())
    arch = model.arch_parameters()
    model.weight_parameters = lambda: list(model.parameters())  # its alphas are not module parameters
    model.arch_parameters = lambda: arch
    return model


def build(args, network: str, config: str):
    """The step closure of one configuration, or None and why not."""
    torch.manual_seed(args.seed)
    if config == "original":
        if network != "darts":
            return None, "the original code's model is the DARTS one"
        model = _original_model(args)
    else:
        backend, memory = CONFIGS[config]
        step_args = argparse.Namespace(
            network=network, channels=args.channels, num_classes=args.num_classes, layers=args.layers,
            stem="cifar", backend=backend, memory=memory,
        )  # fmt: skip
        model = bench.build_step_network(step_args, "cpu")
        if config == "save-kept-preprocess":
            from fastnas.nn.cell import Cell

            for cell in model.modules():
                if isinstance(cell, Cell):
                    cell._recompute_preprocess = lambda s: False
    step = bench.make_search_step(model, "cpu", args.batch_size, args.image_size, args.num_classes, args.seed)
    return (_composite(step) if config.endswith("-composite") else step), ""


def _composite(step):
    """``step`` with the C++ edge and node ops set aside for its duration."""
    import importlib

    modules = [importlib.import_module(f"fastnas.ops.{name}") for name in ("darts_edge", "partial_channel_node")]

    def run():
        saved = [m._CPP_BACKENDS for m in modules]
        for m in modules:
            m._CPP_BACKENDS = set()
        try:
            return step()
        finally:
            for m, backends_before in zip(modules, saved):
                m._CPP_BACKENDS = backends_before

    return run


def run_network(args, network: str, configs: list[str]) -> list[dict]:
    steps, rows = {}, {}
    for config in configs:
        step, why = build(args, network, config)
        backend = CONFIGS[config][0]
        used = (
            "eager"
            if backend is None
            else backends.resolve("darts_edge", "cpu", None if backend == "auto" else backend)
        )
        rows[config] = {"network": network, "config": config, "backend_used": used, "note": why}
        if step is not None:
            steps[config] = step
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    gc.collect()
    times = {config: [] for config in steps}
    for _ in range(args.reps):
        for config, step in steps.items():
            t0 = time.perf_counter()
            loss = step()
            times[config].append((time.perf_counter() - t0) * 1e3)
            rows[config]["loss"] = float(loss)
    for config, step in steps.items():
        q25, q50, q75 = (
            statistics.quantiles(times[config], n=4, method="inclusive") if args.reps > 1 else [times[config][0]] * 3
        )
        events = bench.profiler_events(step)
        counter = bench.count_ops(step)
        rows[config].update(
            host_ms_median=q50, host_ms_q25=q25, host_ms_q75=q75, profiler_events=events["total"],
            network_events=events["network"], optimizer_events=events["optimizer"],
            aten_ops=counter.total("aten"), fastnas_ops=counter.total("fastnas"),
        )  # fmt: skip
    ref = rows.get("reference", {})
    for row in rows.values():
        if "host_ms_median" in row and "host_ms_median" in ref:
            row["time_vs_reference"] = row["host_ms_median"] / ref["host_ms_median"]
            row["events_vs_reference"] = row["profiler_events"] / ref["profiler_events"]
    return [rows[c] for c in configs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", default="darts,pc-darts")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--batch-size", type=int, default=bench.HOST_DEFAULTS["batch_size"])
    parser.add_argument("--image-size", type=int, default=bench.HOST_DEFAULTS["image_size"])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=bench.HOST_DEFAULTS["threads"])
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (one step of every configuration each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    torch.set_num_threads(args.threads)
    env = bench.environment("cpu")
    env["command"] = " ".join(["python", "benchmarks/bench_host.py", *(sys.argv[1:] if argv is None else argv)])
    print(json.dumps(env), flush=True)
    rows = []
    for network in [n.strip() for n in args.networks.split(",") if n.strip()]:
        for row in run_network(args, network, configs):
            rows.append(row)
            print(
                f"{network:9s} {row['config']:10s} "
                + (
                    f"{row['host_ms_median']:8.1f} ms  {row.get('time_vs_reference', float('nan')):.3f}  "
                    f"{row['profiler_events']:7d} events  {row.get('events_vs_reference', float('nan')):.3f}"
                    if "host_ms_median" in row
                    else row["note"]
                ),
                flush=True,
            )
    env["load_average_end"] = bench.load_average()
    notes = [
        f"One first-order DARTS search step (Adam step of the architecture on a validation batch, then SGD step of "
        f"the weights with gradient clipping on a training batch), batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}, C={args.channels}, {args.layers} cells, {args.threads} thread(s): "
        "arithmetic is negligible, the time is the host's.",
        f"host_ms: median (quartiles) over {args.reps} rounds after {args.warmup} warm-up steps; in each round every "
        "configuration takes one step, so load from other processes falls on all alike. time_vs_reference: over "
        "the eager reference (fastnas's candidate modules) of the same run. original: the original DARTS search "
        "model (tests/darts_fixture/model_search.py), eager. save/recompute: the fused engine, each edge (DARTS) or "
        "node (PC-DARTS) one C++ op per direction; *-composite: the same with those ops set aside, i.e. the Python "
        "composite of the same building blocks; save-kept-preprocess: save with the cells' input preprocessing kept "
        "for backward, not recomputed (fastnas.ops.relu_conv_bn).",
        "profiler_events: op events torch.profiler records in one step (every operator call at every level, nested "
        "ones included, and autograd's node evaluations); network_events under the forward and backward passes, "
        "optimizer_events under zero_grad, gradient clipping and the optimiser steps. aten_ops, fastnas_ops: ops "
        "reaching the dispatcher below autograd (TorchDispatchMode), as in cpu_search_step.",
    ]
    stem = Path(args.out) / f"cpu_host_cost{'_' + args.tag if args.tag else ''}"
    bench.write_results(rows, COLUMNS, stem, "fastnas host-cost benchmark (cpu)", env, notes)
    print(f"wrote {stem}.md and {stem}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
