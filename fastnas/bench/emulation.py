"""Device launches per search step, counted in the host emulation of the CUDA kernels.

The CUDA kernels compiled for the host (``csrc/cuda/emulation.h``, with the sources
in ``tests/cuda_emulation``, never part of ``fastnas._C``) are built here on first
use by ``torch.utils.cpp_extension.load`` into ``build/cuda_emulation``: they are the
``fastnas_emu`` ops, and ``emulated_cpu()`` makes them the CPU kernels of the
``fastnas`` ops too, whole-edge and node orchestration included, so that a network
on CPU tensors runs the code a GPU runs. The emulation counts its ``launch()`` calls.

``LaunchCounter`` counts what a step asks of the device: the emulated launches plus
every ATen op that runs a kernel, wherever it is called from (Python, or the C++ of
a fastnas op, whose calls it follows inside). Views, allocations and metadata are
not launches; composite ops count as what they decompose to; a ``_foreach`` op counts
the kernels CUDA's multi-tensor apply launches for its lists. Every other ATen op is
one launch, on the fused network and the eager one alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastnas.bench.measure import REPO_ROOT, git_commit

SOURCES = REPO_ROOT / "tests" / "cuda_emulation"
BUILD = REPO_ROOT / "build" / "cuda_emulation"
# The namespaces whose ops hold launches rather than being one: the counter follows
# their C++ inside.
CONTAINERS = ("fastnas", "fastnas_emu")
# ATen ops that launch nothing: allocations, metadata, a scalar read back is a copy
# and counts.
NOT_LAUNCHES = frozenset(
    f"aten::{name}"
    for name in (
        "empty",
        "empty_strided",
        "empty_like",
        "new_empty",
        "new_empty_strided",
        "resize_",
        "set_",
        "lift_fresh",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "is_same_size",
        "_has_same_storage_numel",
    )
)
# CUDA's multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): tensors and
# 64 Ki-element chunks per launch, by the number of tensor lists.
FOREACH_CHUNK = 65536
FOREACH_MAX_TENSORS = (110, 64, 48, 36, 30)
FOREACH_MAX_BLOCKS = 320


class EmulationUnavailable(RuntimeError):
    """The emulation cannot be built or loaded here; the message says why."""


def load_emulation():
    """Build (once; minutes the first time) and load the emulation; ``torch.ops.fastnas_emu``."""
    if hasattr(torch.ops, "fastnas_emu") and hasattr(torch.ops.fastnas_emu, "launches"):
        return torch.ops.fastnas_emu
    from fastnas import backends

    if backends.extension() is None:
        raise EmulationUnavailable("fastnas._C is not built (the emulated ops copy its schemas)")
    if not SOURCES.is_dir():
        raise EmulationUnavailable(f"its sources are not here ({SOURCES}): it runs from a source checkout")
    from torch.utils.cpp_extension import load

    BUILD.mkdir(parents=True, exist_ok=True)
    try:
        load(
            name="fastnas_cuda_emulation",
            sources=sorted(str(p) for p in SOURCES.glob("*.cpp")),
            extra_include_paths=[str(REPO_ROOT / "csrc")],
            extra_cflags=["-O2", "-std=c++20", "-DFASTNAS_CUDA_EMULATION", "-Wno-unknown-pragmas"],
            build_directory=str(BUILD),
            is_python_module=False,
        )
    except Exception as exc:  # a compiler error, no compiler, no ninja
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        first_error = next((line for line in lines if "error" in line.lower()), lines[-1])
        raise EmulationUnavailable(f"building it in {BUILD} failed: {first_error[:300]}") from exc
    return torch.ops.fastnas_emu


@contextlib.contextmanager
def emulated_cpu() -> Iterator:
    """The fastnas ops' CPU kernels are the emulated CUDA ones inside; yields ``torch.ops.fastnas_emu``."""
    ops = load_emulation()
    ops.emulate_cpu(True)
    try:
        yield ops
    finally:
        ops.emulate_cpu(False)


def foreach_launches(args) -> int:
    """The kernels multi_tensor_apply launches for a _foreach op's tensor lists (one at least)."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    depth = min(len(lists), len(FOREACH_MAX_TENSORS))
    max_tensors = FOREACH_MAX_TENSORS[depth - 1]
    launches = tensors = blocks = 0
    for t in lists[0]:
        if t.numel() == 0:
            continue
        tensors += 1
        chunks = math.ceil(t.numel() / FOREACH_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            tensors_full = tensors == max_tensors and chunk == chunks - 1
            if tensors_full or blocks == FOREACH_MAX_BLOCKS:
                launches += 1
                blocks = 0
                if tensors_full or chunk == chunks - 1:
                    tensors = 0
                else:
                    tensors = 1  # the tensor continues in the next launch
    return max(1, launches + (blocks > 0))


class LaunchCounter(TorchDispatchMode):
    """Counts the device launches of what runs under it (see the module's docstring).

    ``aten``: launches of ATen ops by name; ``callers``: the same launches by the
    innermost fastnas op that called them ("python" outside any); ``containers``:
    calls of the fastnas ops (not launches); ``emulated``: ``launch()`` calls of the
    emulation meanwhile.
    """

    def __init__(self):
        super().__init__()
        self.aten: Counter[str] = Counter()
        self.callers: Counter[str] = Counter()
        self.containers: Counter[str] = Counter()
        self.emulated = 0
        self._emu = getattr(torch.ops, "fastnas_emu", None)
        self._start = 0
        self._inside = ["python"]

    def __enter__(self):
        if self._emu is not None and hasattr(self._emu, "launches"):
            self._start = self._emu.launches()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self._emu is not None and hasattr(self._emu, "launches"):
            self.emulated += self._emu.launches() - self._start
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        if func.namespace in CONTAINERS and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"):
            self.containers[name] += 1
            self._inside.append(name)
            try:
                # Straight to the kernel, with this mode on for the ATen and fastnas ops it calls.
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
            finally:
                self._inside.pop()
        if func.namespace == "aten":
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
            if not func.is_view and name.split(".")[0] not in NOT_LAUNCHES:
                n = foreach_launches(args) if name.startswith("aten::_foreach_") else 1
                self.aten[name] += n
                self.callers[self._inside[-1]] += n
        else:
            self.aten[name] += 1
            self.callers[self._inside[-1]] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return self.emulated + sum(self.aten.values())


def count_launches(fn: Callable[[], object]) -> LaunchCounter:
    """Run ``fn`` once under a ``LaunchCounter`` and return it."""
    with LaunchCounter() as counter:
        fn()
    return counter


def step_launches(args: argparse.Namespace, backend: str, memory: str, emulate: bool) -> tuple[LaunchCounter, float]:
    """Device launches of one search step (the second: the first, on the CPU kernels,
    creates the optimisers' state), in the emulation when ``emulate``, and its loss."""
    from fastnas.bench.step import build_step_network, make_search_step

    net_args = argparse.Namespace(**{**vars(args), "backend": backend, "memory": memory})
    torch.manual_seed(args.seed)
    net = build_step_network(net_args, torch.device("cpu"))
    step = make_search_step(net, torch.device("cpu"), args.batch_size, args.image_size, args.num_classes, args.seed)
    step()
    loss = torch.tensor(float("nan"))

    def run():
        nonlocal loss
        loss = step()

    with emulated_cpu() if emulate else contextlib.nullcontext():
        counter = count_launches(run)
    return counter, float(loss)


# The batch of --emulate-launches: tiny, as the emulation runs kernels thread by thread
# and launches per step do not depend on sizes (the network's cells are what count).
EMULATE_DEFAULTS = {"batch_size": 2, "image_size": 8, "num_classes": 10}
TARGET = 0.1


def run_emulated_launches(args: argparse.Namespace) -> dict:
    """``fastnas bench-step --emulate-launches``: device launches per step of the fused
    network in the emulation against eager's; prints and returns JSON."""
    from fastnas.errors import RunError

    if torch.device(args.device).type != "cpu":
        raise RunError("--emulate-launches runs the emulated CUDA kernels on CPU tensors; use --device cpu")
    if args.memory not in ("save", "recompute"):
        raise RunError(
            f"--emulate-launches counts the fused engine's memory modes save and recompute, not {args.memory}"
        )
    if args.backend not in ("auto", "cpu", "cuda"):
        raise RunError(f"--emulate-launches counts the C++ kernels' launches, not backend {args.backend!r}")
    for name, default in EMULATE_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    try:
        load_emulation()
    except EmulationUnavailable as exc:
        raise RunError(f"--emulate-launches: the CUDA emulation is unavailable: {exc}") from None
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        eager, eager_loss = step_launches(args, "reference", "save", emulate=False)
        fused, fused_loss = step_launches(args, "cpu", args.memory, emulate=True)
    finally:
        torch.set_num_threads(threads)
    result = {
        "mode": "emulated-launches",
        "network": args.network,
        "memory": args.memory,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "channels": args.channels,
        "layers": args.layers,
        "fused_launches": fused.total,
        "fused_kernel_launches": fused.emulated,
        "fused_aten_launches": sum(fused.aten.values()),
        "eager_launches": eager.total,
        "ratio": fused.total / eager.total,
        "target_ratio": TARGET,
        "meets_target": fused.total <= TARGET * eager.total,
        "fused_aten_top": dict(fused.aten.most_common(12)),
        "fused_aten_by_caller": dict(fused.callers.most_common()),
        "fused_op_calls": dict(fused.containers),
        "eager_top": dict(eager.aten.most_common(8)),
        "fused_loss": fused_loss,
        "eager_loss": eager_loss,
        "counted_by": "one step (the second) of each network; emulated launch() calls plus ATen ops that run "
        "a kernel (not views, allocations or metadata; _foreach ops by CUDA's multi-tensor chunks)",
        "torch": torch.__version__,
        "commit": git_commit(),
    }
    print(json.dumps(result), flush=True)
    return result


def emulation_requested() -> bool:
    """Whether FASTNAS_CUDA_EMULATION asks for the emulation (the tests' switch)."""
    return os.environ.get("FASTNAS_CUDA_EMULATION", "0") not in ("", "0")
