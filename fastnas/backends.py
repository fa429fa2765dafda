"""Which implementation of the fused ops runs: the backend registry.

Backends:
  reference  eager PyTorch, the oracle; implements every op, on any device.
  cpu        C++ kernels of fastnas._C for CPU tensors.
  cuda       CUDA C++ kernels of fastnas._C for CUDA tensors.
  triton     Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Each op declares its implementations once, when its module is imported
(``fastnas.ops._registry.register_op``): ``register(op, "triton")`` for
Python-side kernels, ``register_cpp(op)`` for the C++ ones, which reads from the
dispatcher whether fastnas._C holds a CPU and a CUDA kernel for the op (so a
stale build that lacks an op is never mistaken for one that has it). Whether a
backend works on this machine is computed once (``refresh()`` recomputes it,
for tests).

Choice, first match wins: the ``backend=`` argument of an op, the innermost
``use_backend(...)`` context, the FASTNAS_BACKEND variable, else automatic.
Automatic choice picks, for the op and the tensors' device, the first backend
that implements the op and works here (``cpu`` on CPU tensors; ``cuda``, then
``triton``, on CUDA tensors), and quietly falls back to the reference. Naming a
backend that cannot run the op on that device raises with the reason. Nothing
here raises at import.
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
# Automatic choice, per device type, fastest first; the reference comes last everywhere.
_PREFERENCE = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

_chosen: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastnas_backend", default=None)
# op name -> backends that implement it (the reference implements every op).
_python_impls: dict[str, set[str]] = {}
_cpp_ops: set[str] = set()
# (op, device type, requested backend) -> the backend that runs.
_resolved: dict[tuple[str, str, str], str] = {}


# --- the extension and the machine -------------------------------------------------


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


def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401

        from fastnas import kernels  # noqa: F401

        return ""
    except Exception as exc:
        return f"triton failed to import: {type(exc).__name__}: {exc}"


@functools.cache
def _machine_status() -> dict[str, str]:
    C, c_err = _load_extension()
    status = {"reference": "", "cpu": c_err}
    if C is None:
        status["cuda"] = c_err
    elif not C.build_info()["cuda"]:
        status["cuda"] = (
            "fastnas._C was built without CUDA kernels (no GPU visible at build time and FASTNAS_CUDA=1 not set,"
            " no nvcc, CPU-only torch, or FASTNAS_CUDA=0)"
        )
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
    """Map every backend to '' when it works on this machine, else why it does not.

    Computed once; ``refresh()`` computes it again.
    """
    return dict(_machine_status())


def available_backends() -> list[str]:
    """Names of the backends that work on this machine."""
    return [name for name, why in backend_status().items() if not why]


def refresh() -> None:
    """Forget what was computed about this machine and the choices made (tests)."""
    _load_extension.cache_clear()
    _machine_status.cache_clear()
    _resolved.clear()


# --- what implements each op ---------------------------------------------------------


def register(op: str, *names: str) -> None:
    """Declare that the backends ``names`` implement ``op`` from Python: Triton kernels,
    or a composite of other ops (``darts_edge`` on the ``cpu`` building blocks)."""
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"register({op!r}): unknown backend {name!r}")
    _python_impls.setdefault(op, set()).update(names)
    _resolved.clear()


def register_cpp(op: str, *companions: str) -> bool:
    """Declare that fastnas._C may hold kernels of ``fastnas::<op>``: ``cpu`` and ``cuda``
    implement it where the dispatcher has a CPU or a CUDA kernel for it.

    ``companions`` are the schemas that come with the op (its backward). Returns
    whether the extension is loaded and defines all of them, so that the caller
    can register their fake implementations and autograd (a build older than the
    op lacks them)."""
    _cpp_ops.add(op)
    _resolved.clear()
    return extension() is not None and all(_has_schema(name) for name in (op, *companions))


def _has_schema(op: str) -> bool:
    return bool(torch._C._jit_get_schemas_for_operator(f"fastnas::{op}"))


def _has_cpp_kernel(op: str, dispatch_key: str) -> bool:
    if extension() is None or op not in _cpp_ops:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnas::{op}", dispatch_key)
    except RuntimeError:  # the schema itself is missing: a build older than the op
        return False


def cpp_backends(op: str) -> frozenset[str]:
    """The backends ('cpu', 'cuda') whose C++ kernels implement ``op`` in this build."""
    return frozenset(name for name in ("cpu", "cuda") if _has_cpp_kernel(op, name.upper()))


def implementations(op: str) -> list[str]:
    """The backends that implement ``op`` in this build, whether or not they work on this machine."""
    names = {"reference"} | _python_impls.get(op, set()) | cpp_backends(op)
    return [name for name in BACKENDS if name in names]


def registered_ops() -> list[str]:
    return sorted(set(_python_impls) | _cpp_ops)


def runnable(op: str, device: torch.device | str) -> list[str]:
    """The backends that can run ``op`` on tensors on ``device`` here, the reference included."""
    device_type = device if isinstance(device, str) else device.type
    status = backend_status()
    return [name for name in implementations(op) if not status[name] and _serves(name, device_type)]


def _serves(name: str, device_type: str) -> bool:
    if name == "reference":
        return True
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpret())
    return name == device_type


# --- the choice ----------------------------------------------------------------------


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


def _choose(op: str, device_type: str, name: str) -> str:
    status = backend_status()
    impls = implementations(op)
    if name == AUTO:
        for candidate in _PREFERENCE.get(device_type, ()):
            if candidate in impls and not status[candidate] and _serves(candidate, device_type):
                return candidate
        return "reference"
    if status[name]:
        raise RuntimeError(f"fastnas backend {name!r} was requested but is not available: {status[name]}")
    if not _serves(name, device_type):
        raise RuntimeError(f"fastnas backend {name!r} cannot run on {device_type} tensors")
    if name not in impls:
        raise RuntimeError(
            f"fastnas backend {name!r} has no kernel for {op} (implemented by: {', '.join(impls)}); "
            "choose one of those or 'auto'"
        )
    return name


def _resolve(op: str, device_type: str, backend: str | None) -> str:
    name = requested_backend(backend)
    key = (op, device_type, name)
    chosen = _resolved.get(key)
    if chosen is None:
        chosen = _resolved[key] = _choose(op, device_type, name)
    return chosen


@torch.compiler.assume_constant_result
def _resolve_constant(op: str, device_type: str, backend: str | None) -> str:
    return _resolve(op, device_type, backend)


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """The backend that runs ``op`` on tensors on ``device``, given ``backend`` (None:
    the context, FASTNAS_BACKEND, or automatic). Raises when a backend named
    explicitly cannot run the op there. A constant to torch.compile (no graph break)."""
    device_type = device if isinstance(device, str) else device.type
    return _resolve_constant(op, device_type, backend)
