"""What the fused ops share in Python: dtypes, the accumulation rule, argument checks, autograd plumbing.

Every op has one check function (in its own module) built from the checks here.
The op's public entry calls it, and so does every fake implementation of the
op's C++ and Triton ops, so eager calls, fake tensors and ``torch.compile`` all
see one error for one mistake. (The C++ ops keep their own ``TORCH_CHECK``s for
callers of ``torch.ops.fastnas.*``.)

The checks are ``torch._check_type`` / ``_check_value`` / ``_check_index``
(TypeError, ValueError, IndexError) with a message built only on failure, that
names the argument and its value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Upper bound on the candidates summed in one call: the CUDA kernels take the
# input pointers as a kernel argument, whose size is bounded.
MAX_INPUTS = 128

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOAT_DTYPE_NAMES = "float32, float16, bfloat16 or float64"
# Batch statistics and the coefficients that scale them.
STAT_DTYPES = (torch.float32, torch.float64)
STAT_DTYPE_NAMES = "float32 or float64"


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the ops (and their references) accumulate in: fp64 for fp64, fp32 for every narrower float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` ("cpu", "cuda") in this thread."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch without the device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a convolution of ``x`` in, or None where it leaves ``x`` as it is
    (autocast off, or a float64 or non-float ``x``, which autocast never casts)."""
    device_type = x.device.type
    if not autocast_on(device_type) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch before get_autocast_dtype
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


# --- the checks -------------------------------------------------------------------------


def _fail(error: type[Exception], cond, message: Callable[[], str]) -> None:
    """The slow path of the checks below: ``cond`` is False, or symbolic."""
    if torch.compiler.is_compiling():
        # Dynamo traces this code, and torch._check* there wants a message closure
        # of constants (these capture the tensors they describe): a failed
        # condition raises the error itself, a symbolic one is guarded on.
        if not cond:
            raise error(message())
        return
    torch._check_with(error, cond, message)


# A condition that holds is a Python True: settled without a further call, as
# the checks run on every eager call of an op.
def check_type(cond, message: Callable[[], str]) -> None:
    """``torch._check_type``: TypeError(message()) unless ``cond``."""
    if cond is not True:
        _fail(TypeError, cond, message)


def check_value(cond, message: Callable[[], str]) -> None:
    """``torch._check_value``: ValueError(message()) unless ``cond``."""
    if cond is not True:
        _fail(ValueError, cond, message)


def check_index(cond, message: Callable[[], str]) -> None:
    """``torch._check_index``: IndexError(message()) unless ``cond``."""
    if cond is not True:
        _fail(IndexError, cond, message)


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


# Types, dtypes and devices are never symbolic: the helpers that test them test
# first and make the message only on failure. Shapes may be symbolic (fake
# tensors, dynamic shapes): they go through check_value.


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        check_type(False, lambda: f"{op}: {name} must be a tensor, got {type(t).__name__}")


def _first(items, ok) -> int:
    """The index of the first item that is not ``ok``."""
    return next(i for i, item in enumerate(items) if not ok(item))


def check_tensor_list(op: str, name: str, ts, kind: str = "a list or tuple of tensors") -> list[torch.Tensor]:
    """``ts`` as a list, each element a tensor."""
    if isinstance(ts, torch.Tensor) or not isinstance(ts, Sequence):
        check_type(False, lambda: f"{op}: {name} must be {kind}, got {type(ts).__name__}")
    ts = list(ts)
    if not all(isinstance(t, torch.Tensor) for t in ts):
        i = _first(ts, lambda t: isinstance(t, torch.Tensor))
        check_type(False, lambda: f"{op}: {name}[{i}] is a {type(ts[i]).__name__}, not a tensor")
    return ts


def check_same_shapes(op: str, name: str, ts, first: int = 0) -> None:
    """``ts[first + 1:]`` have the shape of ``ts[first]``."""
    ref = ts[first].shape

    def message():
        i = first + 1 + _first(ts[first + 1 :], lambda t: t.shape == ref)
        return f"{op}: {name}[{i}] has shape {tuple(ts[i].shape)} but {name}[{first}] has shape {tuple(ref)}"

    check_value(all(t.shape == ref for t in ts[first + 1 :]), message)


def check_dtypes(op: str, name: str, ts, other: str, dtype: torch.dtype) -> None:
    """Every ``ts[i]`` has ``dtype``, the dtype of the argument ``other``."""
    if not all(t.dtype == dtype for t in ts):
        i = _first(ts, lambda t: t.dtype == dtype)
        check_type(False, lambda: f"{op}: {name}[{i}] has dtype {ts[i].dtype} but {other} has dtype {dtype}")


def check_devices(op: str, name: str, ts, other: str, device: torch.device) -> None:
    """Every ``ts[i]`` is on ``device``; ``other`` says whose device it is ("x is", "xs[0] is")."""
    if not all(t.device == device for t in ts):
        i = _first(ts, lambda t: t.device == device)
        check_value(False, lambda: f"{op}: {name}[{i}] is on {ts[i].device} but {other} on {device}")


def check_int_list(op: str, name: str, values) -> list:
    if isinstance(values, torch.Tensor) or not isinstance(values, Sequence):
        check_type(False, lambda: f"{op}: {name} must be a list of ints, got {type(values).__name__}")
    return list(values)


def check_dtype(op: str, name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES, names: str = FLOAT_DTYPE_NAMES) -> None:
    if t.dtype not in dtypes:
        check_type(False, lambda: f"{op}: {name} has dtype {t.dtype}; expected {names}")


def check_same_dtype(op: str, name: str, t: torch.Tensor, other: str, dtype: torch.dtype) -> None:
    """``t`` has ``dtype``, the dtype of the argument ``other``."""
    if t.dtype != dtype:
        check_type(False, lambda: f"{op}: {name} has dtype {t.dtype} but {other} has dtype {dtype}")


def check_device(op: str, name: str, t: torch.Tensor, other: str, device: torch.device) -> None:
    """``t`` is on ``device``; ``other`` says whose device it is ("x is", "xs are")."""
    if t.device != device:
        check_value(False, lambda: f"{op}: {name} is on {t.device} but {other} on {device}")


def check_flag(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        check_type(False, lambda: f"{op}: {name} must be a bool, got {type(value).__name__}")


def check_groups(op: str, groups, channels: int) -> None:
    """The channel shuffle's ``groups`` divides the ``channels`` it shuffles."""
    check_type(is_int(groups), lambda: f"{op}: groups must be an int, got {type(groups).__name__}")
    check_value(
        groups >= 1 and channels % groups == 0,
        lambda: f"{op}: groups={groups} must be >= 1 and divide the {channels} output channels",
    )


def check_grad_flags(op: str, name: str, flags, count: int, what: str) -> None:
    """One ``*_need_grad`` flag per input."""
    check_value(len(flags) == count, lambda: f"{op}: {name} has {len(flags)} entries but {what} {count}")


# --- autograd plumbing -------------------------------------------------------------------


def grad_flags(xs: Sequence[torch.Tensor]) -> list[bool]:
    return [bool(x.requires_grad) for x in xs]


def fill_grads(flags: Sequence[bool], packed: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Spread the gradients computed for the inputs that need one over all K slots."""
    it = iter(packed)
    return [next(it) if need else None for need in flags]
