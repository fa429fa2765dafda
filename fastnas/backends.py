"""Which implementation of the fused ops runs: the backend registry.

Backends:
  reference  eager PyTorch, the oracle; always available.
  cpu        C++ kernels of fastnas._C for CPU tensors.
  cuda       CUDA kernels of fastnas._C for CUDA tensors.
  triton     Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Choice, first match wins: the ``backend=`` argument of an op, the innermost
``use_backend(...)`` context, the FASTNAS_BACKEND variable, else automatic.
Automatic choice picks the fastest backend that works for the tensors' device
and quietly falls back to the reference; naming a backend that cannot run
raises with the reason. Nothing here raises at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
AUTO = "auto"

_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastnas_backend", default=None)


@functools.cache
def _load_extension():
    """Import fastnas._C once; return (module or None, reason it failed)."""
    try:
        # Importing it registers the C++ ops with torch.library.
        return importlib.import_module("fastnas._C"), ""
    except Exception as exc:  # ImportError, undefined symbols, ABI mismatch...
        return None, f"fastnas._C failed to import: {type(exc).__name__}: {exc}"


def extension():
    """The loaded fastnas._C module, or None."""
    return _load_extension()[0]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401

        from fastnas import kernels  # noqa: F401

        return ""
    except Exception as exc:
        return f"triton failed to import: {type(exc).__name__}: {exc}"


def _status_uncached() -> dict[str, str]:
    """Map backend name to '' if it works here, else the reason it does not."""
    C, c_err = _load_extension()
    status = {"reference": ""}
    status["cpu"] = c_err
    if C is None:
        status["cuda"] = c_err
    elif not C.build_info()["cuda"]:
        status["cuda"] = "fastnas._C was built without CUDA kernels (no nvcc, CPU-only torch, or FASTNAS_CUDA=0)"
    elif not torch.cuda.is_available():
        status["cuda"] = "no CUDA GPU is visible to torch"
    else:
        status["cuda"] = ""
    err = _triton_import_error()
    if err:
        status["triton"] = err
    elif not (torch.cuda.is_available() or triton_interpret()):
        status["triton"] = "no CUDA GPU is visible (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
    else:
        status["triton"] = ""
    return status


def backend_status() -> dict[str, str]:
    """Map every backend to '' when it works here, else why it does not."""
    return _status_uncached()


def available_backends() -> list[str]:
    """Names of the backends that work on this machine."""
    return [name for name, why in backend_status().items() if not why]


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"unknown fastnas backend {name!r}; choose one of {', '.join(BACKENDS)} or {AUTO!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the fused ops inside the block on backend ``name`` ('auto' to choose)."""
    token = _chosen.set(_check_name(name))
    try:
        yield
    finally:
        _chosen.reset(token)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for, by argument, context or FASTNAS_BACKEND; 'auto' if none."""
    if backend is not None:
        return _check_name(backend)
    chosen = _chosen.get()
    if chosen is not None:
        return chosen
    env = os.environ.get("FASTNAS_BACKEND", "")
    if env:
        try:
            return _check_name(env)
        except ValueError as exc:
            raise ValueError(f"FASTNAS_BACKEND: {exc}") from None
    return AUTO


def _serves(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    return False


def resolve(device: torch.device, backend: str | None = None) -> str:
    """Pick the backend for tensors on ``device``."""
    name = requested_backend(backend)
    status = backend_status()
    if name == AUTO:
        order = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
        for candidate in order:
            if not status[candidate] and _serves(candidate, device):
                return candidate
        return "reference"
    if status[name]:
        raise RuntimeError(f"fastnas backend {name!r} was requested but is not available: {status[name]}")
    if not _serves(name, device):
        raise RuntimeError(f"fastnas backend {name!r} cannot run on {device.type} tensors")
    return name
