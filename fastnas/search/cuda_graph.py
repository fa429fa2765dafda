"""A whole search step captured once as a CUDA graph and replayed.

At CIFAR sizes a DARTS step (architecture step on a validation batch, weight
step on a training batch) launches thousands of small kernels, and the GPU
waits on the CPU that launches them. With static shapes the whole step, both
forward/backward passes and both optimizer steps, can be captured once with
``torch.cuda.CUDAGraph`` and replayed as one launch.

``GraphedStep(fn, example_inputs, modules, optimizers)`` wraps a step
``fn(*inputs) -> tensor(s)``. Each call copies the new batch into static input
buffers, replays the graph and returns the step's static outputs, which the
next call overwrites (read or clone them before then).

What a captured step must respect, and how this module handles it:

* Warm-up: the step first runs ``warmup_steps`` times eagerly on a side stream
  (lazy initialisation, Triton compilation and autotuning, cuDNN plans, the
  optimizers' first-step state must all happen outside capture). Those steps
  change the model, so the parameters, buffers and optimizer state are
  snapshotted before and restored after: the first replay computes exactly the
  step the eager loop would. Optimizer state created by the warm-up is reset to
  zeros, which is the fresh state of Adam/AdamW and of SGD without dampening
  (a zero momentum buffer gives ``buf = grad`` on the first step, as SGD's
  ``buf = grad.clone()`` does). SGD with dampening is refused.
* Host syncs: none may happen in the step (no ``.item()``, ``float(t)``,
  ``.tolist()``, data-dependent Python branching on tensor values). Warm-up
  steps after the first run under ``torch.cuda.set_sync_debug_mode("error")``,
  so a synchronising op is named before capture is even tried.
* Optimizers: Adam/AdamW must be ``capturable=True`` (their step count stays
  on the device; ``set_capturable`` switches an optimizer and its loaded state).
  SGD needs nothing.
* Hyper-parameters: the learning rate and every other Python number in the
  optimizers' param groups are baked into the graph as constants. Each call
  compares them with those captured and captures again when any changed, so a
  per-epoch cosine schedule costs one capture per epoch. Python values the
  step closes over (the searcher's ``train_arch``) are part of ``key``.
* Shapes: the captured shapes are fixed. A batch of another shape or dtype is
  run eagerly through ``fn`` (counted in ``eager_calls``), never replayed. The
  searcher's loaders use ``drop_last=True``, so there it never happens.
* Random numbers: PyTorch registers the default CUDA generator with every
  capture; kernels drawing from it (dropout) get fresh numbers on each replay
  and advance the generator as eager code would. The generator state is
  restored after the warm-up, so the warm-up draws nothing from the stream.
  Explicit ``torch.Generator`` objects are not registered; steps that use them,
  or that sample on the host (GDAS' Gumbel resampling loop), cannot be captured.
* Gradient clipping: ``clip_grad_norm_`` without ``error_if_nonfinite`` stays on
  the device and is capturable.
* AMP: bf16 autocast works (with ``cache_enabled=False``); fp16 with a
  GradScaler does not (its inf checks and scale updates sync with the host).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from fastnas.errors import SearchError

WARMUP_STEPS = 3

# Memory modes whose backward cannot be captured, and why. torch.utils.checkpoint
# saves the CUDA RNG state in forward (torch.cuda.get_rng_state), which raises
# during capture.
UNSUPPORTED_MEMORY = {
    "checkpoint": "torch.utils.checkpoint reads the CUDA RNG state in forward, which is not allowed during capture",
}


class CUDAGraphError(SearchError):
    """A CUDA-graph step was asked for where capture cannot work; the message says why."""


def unsupported_reasons(config) -> list[str]:
    """Every setting of ``config`` that rules out capturing its step, each with why."""
    reasons = []
    if not str(config.device).startswith("cuda"):
        reasons.append(f"it needs a CUDA device (--device cuda), got --device {config.device}")
    if config.search_method.cuda_graph_unsupported:
        reasons.append(config.search_method.cuda_graph_unsupported)
    if config.amp == "fp16":
        reasons.append("--amp fp16 needs a GradScaler, whose inf checks sync with the host every step; use --amp bf16")
    if config.memory in UNSUPPORTED_MEMORY:
        reasons.append(f"--memory {config.memory}: {UNSUPPORTED_MEMORY[config.memory]}")
    if config.world_size > 1:
        reasons.append(_DDP_REASON)
    return reasons


def check_search_supported(config) -> None:
    """Raise CUDAGraphError naming every setting of ``config`` that rules out ``--cuda-graph``.

    The run-time conditions (a visible GPU, one process) are checked by
    ``check_runtime_supported``.
    """
    reasons = unsupported_reasons(config)
    if reasons:
        raise CUDAGraphError("--cuda-graph cannot be used here: " + "; ".join(reasons))


def decide(config, device: torch.device, world_size: int) -> tuple[bool, str | None]:
    """Whether a search captures its step: ``config.cuda_graph`` True or False as asked,
    None (the default) wherever capture works. Returns (capture, why not when a CUDA
    search does not capture by default, else None)."""
    if config.cuda_graph is not None:
        return bool(config.cuda_graph), None
    if torch.device(device).type != "cuda":
        return False, None
    reasons = unsupported_reasons(config)
    if world_size > 1:
        reasons.append(_DDP_REASON)
    if reasons:
        return False, "; ".join(dict.fromkeys(reasons))
    return True, None


_DDP_REASON = (
    "several processes (DDP) are not supported: DDP's gradient buckets and the architecture gradients' "
    "all-reduce are not captured here; run one process"
)


def check_runtime_supported(device: torch.device, world_size: int = 1) -> None:
    """Raise CUDAGraphError unless ``device`` is a visible CUDA device in a single process."""
    if torch.device(device).type != "cuda":
        raise CUDAGraphError(f"--cuda-graph needs a CUDA device, got {device}")
    if not torch.cuda.is_available():
        raise CUDAGraphError("--cuda-graph needs a CUDA GPU, and torch sees none")
    if world_size > 1:
        raise CUDAGraphError(f"--cuda-graph cannot be used here: {_DDP_REASON} (running {world_size})")


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Make an optimizer that has the option (Adam, AdamW, ...) capturable or not, state included.

    ``load_state_dict`` takes the flag from the checkpoint's param groups and
    leaves the step count where that flag wants it (on the device when
    capturable, on the CPU otherwise); this puts both where ``capturable`` wants
    them, so checkpoints load into either mode.
    """
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        group["capturable"] = capturable
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                device = p.device if capturable else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


def hyperparameters(optimizers: Iterable[torch.optim.Optimizer]) -> tuple:
    """Every Python value in the optimizers' param groups: what a capture bakes in."""
    key = []
    for opt in optimizers:
        for group in opt.param_groups:
            for name in sorted(group):
                if name == "params":
                    continue
                value = group[name]
                # A tensor hyper-parameter is read by address inside the graph.
                key.append((name, ("tensor", id(value)) if torch.is_tensor(value) else _hashable(value)))
    return tuple(key)


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _check_optimizer(opt: torch.optim.Optimizer) -> None:
    for group in opt.param_groups:
        if "capturable" in group and not group["capturable"]:
            raise CUDAGraphError(
                f"{type(opt).__name__} must be built with capturable=True (or switched with set_capturable) "
                "to be captured in a CUDA graph"
            )
        if group.get("dampening", 0) and isinstance(opt, torch.optim.SGD):
            raise CUDAGraphError("SGD with dampening is not supported: its first step is not a step from zero state")


def _outputs(out) -> tuple[torch.Tensor, ...]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for k, t in enumerate(outs):
        if not torch.is_tensor(t):
            raise CUDAGraphError(
                f"the captured step must return tensors, but output {k} is a {type(t).__name__}; "
                "a Python number would be read from the device, a host sync"
            )
    return tuple(outs)


class GraphedStep:
    """``fn`` captured as a CUDA graph; call it like ``fn`` with same-shaped batches.

    Args:
        fn: the step, ``fn(*inputs)`` returning a tensor or a tuple of tensors.
            Everything it does must be capturable (see the module's notes).
        example_inputs: tensors shaped and typed like every batch; their values
            feed the warm-up steps. They are copied, not kept.
        modules: modules whose parameters and buffers the step changes.
        optimizers: optimizers the step steps.
        key: Python values ``fn`` depends on besides the optimizers'
            hyper-parameters; the caller builds a new GraphedStep when they change.
        warmup_steps: eager steps on a side stream before each capture.

    Returns from a call the static outputs of the replay (tensors the next
    call overwrites), or ``fn``'s own outputs for a batch of another shape.
    ``captures`` counts captures, ``eager_calls`` the batches run eagerly.
    """

    def __init__(
        self,
        fn: Callable[..., object],
        example_inputs: Sequence[torch.Tensor],
        modules: Sequence[nn.Module] = (),
        optimizers: Sequence[torch.optim.Optimizer] = (),
        key: object = None,
        warmup_steps: int = WARMUP_STEPS,
    ):
        if not example_inputs:
            raise ValueError("GraphedStep needs at least one example input")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        device = self._device(example_inputs, modules)
        for opt in optimizers:
            _check_optimizer(opt)
        self.fn = fn
        self.device = device
        self.modules = list(modules)
        self.optimizers = list(optimizers)
        self.key = key
        self.warmup_steps = warmup_steps
        self.static_inputs = [torch.empty_like(x, device=device) for x in example_inputs]
        for static, x in zip(self.static_inputs, example_inputs):
            static.copy_(x)
        self.static_outputs: tuple[torch.Tensor, ...] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self._captured_hyperparameters = None
        self._returns_tuple = True
        self.captures = 0
        self.eager_calls = 0

    @staticmethod
    def _device(example_inputs, modules) -> torch.device:
        """The CUDA device the step runs on; CUDAGraphError if anything is elsewhere."""
        device = example_inputs[0].device if example_inputs[0].is_cuda else None
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                if not t.is_cuda:
                    raise CUDAGraphError(
                        f"every parameter and buffer must be on a CUDA device, found one on {t.device}"
                    )
                device = device or t.device
        if device is None:
            raise CUDAGraphError("GraphedStep needs CUDA tensors: no input, parameter or buffer is on a CUDA device")
        check_runtime_supported(device)
        return device

    # --- calling --------------------------------------------------------------------

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"GraphedStep: expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        if not self._fits(inputs):
            self.eager_calls += 1
            with _quiet_capturable_warning():
                return self.fn(*(x.to(self.device, non_blocking=True) for x in inputs))
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x, non_blocking=True)
        return self.replay()

    def replay(self):
        """Run the step on what the static inputs hold now, capturing first if needed."""
        if self.graph is None or hyperparameters(self.optimizers) != self._captured_hyperparameters:
            self.capture()
        self.graph.replay()
        return self.static_outputs if self._returns_tuple else self.static_outputs[0]

    def _fits(self, inputs) -> bool:
        return all(x.shape == s.shape and x.dtype == s.dtype for x, s in zip(inputs, self.static_inputs))

    # --- capture --------------------------------------------------------------------

    def capture(self) -> None:
        """Warm up on a side stream, restore the state, then capture ``fn`` on the static inputs."""
        for opt in self.optimizers:
            _check_optimizer(opt)
        # Release the previous graph's memory before the new capture takes its own.
        self.graph, self.static_outputs = None, None
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        snapshot = self._snapshot()
        rng = torch.cuda.get_rng_state(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), _quiet_capturable_warning():
            for i in range(self.warmup_steps):
                # The first step may sync legitimately (lazy init, autotuning).
                with _sync_errors(enabled=i > 0):
                    _outputs(self.fn(*self.static_inputs))
        torch.cuda.current_stream(self.device).wait_stream(side)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self._restore(snapshot)
        del snapshot
        torch.cuda.set_rng_state(rng, self.device)
        torch.cuda.synchronize(self.device)

        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads (a data loader's pin-memory thread) may make
            # CUDA calls while this one captures, as torch.compile's CUDA graphs allow.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.fn(*self.static_inputs)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            raise CUDAGraphError(
                f"capturing the step as a CUDA graph failed: {str(exc).splitlines()[0]}. "
                "The step probably syncs with the host, uses CPU tensors, or calls something that cannot be captured"
            ) from exc
        self._returns_tuple = isinstance(out, (tuple, list))
        self.static_outputs = _outputs(out)
        self.graph = graph
        self._captured_hyperparameters = hyperparameters(self.optimizers)
        self.captures += 1

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = []
        for m in self.modules:
            tensors += [p.data for p in m.parameters()]
            tensors += [b for b in m.buffers()]
        return tensors

    def _snapshot(self) -> dict:
        """Copies of everything the step changes; optimizer state by (optimizer, param, name)."""
        tensors = self._state_tensors()
        opt_state = {}
        for i, opt in enumerate(self.optimizers):
            for p, state in opt.state.items():
                for name, value in state.items():
                    if torch.is_tensor(value):
                        opt_state[(i, id(p), name)] = value.clone()
        return {"tensors": [t.clone() for t in tensors], "optimizer": opt_state}

    @torch.no_grad()
    def _restore(self, snapshot: dict) -> None:
        # In place: the graph will read and write these very tensors.
        for t, saved in zip(self._state_tensors(), snapshot["tensors"]):
            t.copy_(saved)
        for i, opt in enumerate(self.optimizers):
            for p, state in opt.state.items():
                for name, value in state.items():
                    if not torch.is_tensor(value):
                        continue
                    saved = snapshot["optimizer"].get((i, id(p), name))
                    if saved is None:
                        # Created by the warm-up: reset to the fresh state (see the module's notes).
                        value.zero_()
                    else:
                        value.copy_(saved)


@contextlib.contextmanager
def _sync_errors(enabled: bool):
    """Turn a host sync into an error that names the problem."""
    if not enabled:
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as exc:
        if "synchroniz" in str(exc):
            raise CUDAGraphError(
                f"the step syncs with the host ({str(exc).splitlines()[0]}), so it cannot be captured as a CUDA "
                "graph; remove .item(), float(tensor), .tolist(), .cpu() and Python branches on tensor values"
            ) from exc
        raise
    finally:
        torch.cuda.set_sync_debug_mode(old)


@contextlib.contextmanager
def _quiet_capturable_warning():
    # Capturable optimizers warn when they step outside capture, as warm-up steps do.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        yield
