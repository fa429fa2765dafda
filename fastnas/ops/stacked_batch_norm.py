"""Batch norm (no affine) of J stacked candidates at once, and its running statistics.

Stacked tensors are channel-major, ``(J, C, *rest)`` contiguous: candidate j is
a (C, M) matrix with M = prod(rest), and the statistics of (j, c) are those of
one contiguous row of M values.

  stacked_batch_norm_stats(z, eps) -> (mean, rstd, var), each (J, C)
      batch statistics of every candidate; var is the biased variance and
      rstd = 1 / sqrt(var + eps). fp32 (fp64 for fp64 inputs), accumulated per
      chunk and combined with Chan's formula, so rows of 64K values with large
      means stay accurate; a fixed order makes them bit-identical run to run.
  stacked_batch_norm_backward(grad_yhat, z, mean, rstd) -> grad_z
      training-mode batch-norm backward: with yhat = (z - mean) * rstd,
      grad_z = rstd * (g - mean_M(g) - yhat * mean_M(g * yhat)).
  update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count)
      nn.BatchNorm2d's training-mode buffer update for the candidates ``rows``.

Ops registered with torch.library:
  fastnas::stacked_batch_norm_stats / _backward                C++ (CPU, CUDA)
  fastnas::stacked_batch_norm_stats_triton / _backward_triton  Triton
  fastnas::update_running_stats                                C++ (CPU, CUDA), one implementation
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastnas import backends

_STATS = "stacked_batch_norm_stats"
_BACKWARD = "stacked_batch_norm_backward"
_UPDATE = "update_running_stats"

_Z_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_Z_DTYPE_NAMES = "float32, float64, float16 or bfloat16"
_STAT_DTYPES = (torch.float32, torch.float64)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the eager references (the oracle) -------------------------------------------


def stacked_batch_norm_stats_reference(
    z: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(j, c) mean, rstd and biased variance of ``z`` (J, C, *rest)."""
    j, c = z.shape[:2]
    rows = z.reshape(j, c, math.prod(z.shape[2:])).to(_accumulate_dtype(z.dtype))
    var, mean = torch.var_mean(rows, dim=2, correction=0)
    return mean, torch.rsqrt(var + eps), var


def stacked_batch_norm_backward_reference(
    grad_yhat: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """Gradient of batch norm (training mode, no affine) with respect to ``z``."""
    shape = (z.shape[0], z.shape[1], math.prod(z.shape[2:]))
    acc = _accumulate_dtype(z.dtype)
    g = grad_yhat.reshape(shape).to(acc)
    r = rstd.to(acc).unsqueeze(-1)
    yhat = (z.reshape(shape).to(acc) - mean.to(acc).unsqueeze(-1)) * r
    grad = r * (g - g.mean(-1, keepdim=True) - yhat * (g * yhat).mean(-1, keepdim=True))
    return grad.to(z.dtype).reshape(z.shape)


def update_running_stats_reference(
    running_mean: Sequence[torch.Tensor],
    running_var: Sequence[torch.Tensor],
    num_batches_tracked: Sequence[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    rows: Sequence[int],
    momentum: float,
    count: int,
) -> None:
    """nn.BatchNorm2d's buffer update, one candidate at a time, in place."""
    for i, r in enumerate(rows):
        rm, rv = running_mean[i], running_var[i]
        rm.copy_((1 - momentum) * rm + momentum * mean[r].to(rm.dtype))
        rv.copy_((1 - momentum) * rv + momentum * (var[r] * count / (count - 1)).to(rv.dtype))
        num_batches_tracked[i].add_(1)


# --- argument checks ----------------------------------------------------------------


def _check_z(op: str, z) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{op}: z must be a tensor, got {type(z).__name__}")
    if z.dim() < 2:
        raise ValueError(f"{op}: z must be (J, C, *rest) with at least 2 dims, got shape {tuple(z.shape)}")
    if z.dtype not in _Z_DTYPES:
        raise TypeError(f"{op}: z has dtype {z.dtype}; expected {_Z_DTYPE_NAMES}")
    if z.shape[0] * z.shape[1] > 0 and z.numel() == 0:
        raise ValueError(f"{op}: z has shape {tuple(z.shape)}: no values to normalise each (j, c) over")


def _check_stat(op: str, name: str, t, z: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(z.shape[:2]):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected (J, C) = {tuple(z.shape[:2])}")
    if t.dtype not in _STAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected float32 or float64")
    if t.device != z.device:
        raise ValueError(f"{op}: {name} is on {t.device} but z is on {z.device}")


def _check_backward(grad_yhat, z, mean, rstd) -> None:
    _check_z(_BACKWARD, z)
    if not isinstance(grad_yhat, torch.Tensor):
        raise TypeError(f"{_BACKWARD}: grad_yhat must be a tensor, got {type(grad_yhat).__name__}")
    if grad_yhat.shape != z.shape:
        raise ValueError(f"{_BACKWARD}: grad_yhat has shape {tuple(grad_yhat.shape)} but z has {tuple(z.shape)}")
    if grad_yhat.dtype != z.dtype:
        raise TypeError(f"{_BACKWARD}: grad_yhat has dtype {grad_yhat.dtype} but z has {z.dtype}")
    if grad_yhat.device != z.device:
        raise ValueError(f"{_BACKWARD}: grad_yhat is on {grad_yhat.device} but z is on {z.device}")
    _check_stat(_BACKWARD, "mean", mean, z)
    _check_stat(_BACKWARD, "rstd", rstd, z)


def _check_update(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count) -> None:
    op = _UPDATE
    for name, lst in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("num_batches_tracked", num_batches_tracked),
        ("rows", rows),
    ):
        if isinstance(lst, torch.Tensor) or not isinstance(lst, Sequence):
            raise TypeError(f"{op}: {name} must be a list, got {type(lst).__name__}")
    n = len(rows)
    for name, lst in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("num_batches_tracked", num_batches_tracked),
    ):
        if len(lst) != n:
            raise ValueError(f"{op}: {name} has {len(lst)} tensors but rows has {n} entries")
    for name, t in (("mean", mean), ("var", var)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a (J, C) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if mean.shape != var.shape:
        raise ValueError(f"{op}: mean has shape {tuple(mean.shape)} but var has {tuple(var.shape)}")
    if mean.device != var.device:
        raise ValueError(f"{op}: mean is on {mean.device} but var is on {var.device}")
    j, c = mean.shape
    for i, r in enumerate(rows):
        if isinstance(r, bool) or not isinstance(r, int):
            raise TypeError(f"{op}: rows[{i}] is a {type(r).__name__}, not an int")
        if not 0 <= r < j:
            raise IndexError(f"{op}: rows[{i}]={r} is out of range for mean and var with J={j} rows")
    for name, lst in (("running_mean", running_mean), ("running_var", running_var)):
        for i, t in enumerate(lst):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] is a {type(t).__name__}, not a tensor")
            if tuple(t.shape) != (c,):
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)}; expected ({c},)")
            if not t.is_floating_point():
                raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}; expected a floating dtype")
            if t.device != mean.device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but mean is on {mean.device}")
    for i, t in enumerate(num_batches_tracked):
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            raise ValueError(f"{op}: num_batches_tracked[{i}] must be a one-element tensor")
        if t.device != mean.device:
            raise ValueError(f"{op}: num_batches_tracked[{i}] is on {t.device} but mean is on {mean.device}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"{op}: count={count!r} must be an int >= 2 (the unbiased variance divides by count - 1)")


# --- the public ops ---------------------------------------------------------------


def stacked_batch_norm_stats(
    z: torch.Tensor, eps: float = 1e-5, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics of J stacked candidates: (mean, rstd, var), each (J, C).

    ``z``: (J, C, *rest), any strides. The statistics are fp32 (fp64 for fp64
    ``z``); ``var`` is biased and ``rstd = 1 / sqrt(var + eps)``.
    """
    _check_z(_STATS, z)
    name = backends.resolve("stacked_batch_norm_stats", z.device, backend)
    if name == "reference":
        return stacked_batch_norm_stats_reference(z, eps)
    if name == "triton":
        return torch.ops.fastnas.stacked_batch_norm_stats_triton(z, eps)
    return torch.ops.fastnas.stacked_batch_norm_stats(z, eps)


def stacked_batch_norm_backward(
    grad_yhat: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Gradient of z through ``yhat = (z - mean) * rstd`` with batch statistics.

    ``grad_yhat`` and ``z``: (J, C, *rest) of one dtype; ``mean``, ``rstd``:
    (J, C) fp32 or fp64 as returned by :func:`stacked_batch_norm_stats`.
    Returns a contiguous tensor shaped and typed like ``z``.
    """
    _check_backward(grad_yhat, z, mean, rstd)
    name = backends.resolve("stacked_batch_norm_backward", z.device, backend)
    if name == "reference":
        return stacked_batch_norm_backward_reference(grad_yhat, z, mean, rstd).contiguous()
    if name == "triton":
        return torch.ops.fastnas.stacked_batch_norm_backward_triton(grad_yhat, z, mean, rstd)
    return torch.ops.fastnas.stacked_batch_norm_backward(grad_yhat, z, mean, rstd)


def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count):
    _check_update(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count)


def update_running_stats(
    running_mean: Sequence[torch.Tensor],
    running_var: Sequence[torch.Tensor],
    num_batches_tracked: Sequence[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    rows: Sequence[int],
    momentum: float,
    count: int,
) -> None:
    """In place, for i, r in enumerate(rows), as nn.BatchNorm2d in training mode:

    running_mean[i] = (1 - m) * running_mean[i] + m * mean[r]
    running_var[i] = (1 - m) * running_var[i] + m * var[r] * count / (count - 1)
    num_batches_tracked[i] += 1

    ``mean`` and ``var`` (J, C) are the batch statistics (var biased, as
    :func:`stacked_batch_norm_stats` returns it) over ``count`` values per
    channel; the buffers keep their dtypes.
    """
    _check_update(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count)
    torch.ops.fastnas.update_running_stats(
        list(running_mean), list(running_var), list(num_batches_tracked), mean, var, list(rows), float(momentum), count
    )


# --- fake impls, Triton ops -------------------------------------------------------


def _fake_stats(z, eps):
    shape = tuple(z.shape[:2])
    acc = _accumulate_dtype(z.dtype)
    return z.new_empty(shape, dtype=acc), z.new_empty(shape, dtype=acc), z.new_empty(shape, dtype=acc)


def _fake_backward(grad_yhat, z, mean, rstd):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _register_cpp():
    if backends.register_cpp("update_running_stats"):
        torch.library.register_fake("fastnas::update_running_stats")(_update_running_stats_fake)
    else:
        _define_update_running_stats_without_cpp()
    stats = backends.register_cpp("stacked_batch_norm_stats")
    if not (backends.register_cpp("stacked_batch_norm_backward") and stats):
        return
    torch.library.register_fake("fastnas::stacked_batch_norm_stats")(_fake_stats)
    torch.library.register_fake("fastnas::stacked_batch_norm_backward")(_fake_backward)


def _define_update_running_stats_without_cpp():
    """Without fastnas._C, the same op, run by the reference."""

    @torch.library.custom_op(
        "fastnas::update_running_stats", mutates_args=("running_mean", "running_var", "num_batches_tracked")
    )
    def _update_running_stats_op(
        running_mean: list[torch.Tensor],
        running_var: list[torch.Tensor],
        num_batches_tracked: list[torch.Tensor],
        mean: torch.Tensor,
        var: torch.Tensor,
        rows: list[int],
        momentum: float,
        count: int,
    ) -> None:
        _check_update(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count)
        with torch.no_grad():
            update_running_stats_reference(
                running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count
            )

    _update_running_stats_op.register_fake(_update_running_stats_fake)


@torch.library.custom_op("fastnas::stacked_batch_norm_stats_triton", mutates_args=())
def _stats_triton(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastnas.kernels.stacked_batch_norm import stacked_batch_norm_stats_forward

    _check_z(_STATS, z)
    return stacked_batch_norm_stats_forward(z.contiguous(), eps)


@torch.library.custom_op("fastnas::stacked_batch_norm_backward_triton", mutates_args=())
def _backward_triton(grad_yhat: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    from fastnas.kernels.stacked_batch_norm import stacked_batch_norm_backward as backward_kernel

    _check_backward(grad_yhat, z, mean, rstd)
    return backward_kernel(grad_yhat.contiguous(), z.contiguous(), mean.contiguous(), rstd.contiguous())


_stats_triton.register_fake(_fake_stats)
_backward_triton.register_fake(_fake_backward)
_register_cpp()
backends.register("stacked_batch_norm_stats", "triton")
backends.register("stacked_batch_norm_backward", "triton")
