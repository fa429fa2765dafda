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
from fastnas.ops._common import (
    STAT_DTYPE_NAMES,
    STAT_DTYPES,
    accumulate_dtype,
    check_device,
    check_devices,
    check_dtype,
    check_index,
    check_same_dtype,
    check_tensor,
    check_tensor_list,
    check_type,
    check_value,
    is_int,
)
from fastnas.ops._registry import register_op

_STATS = "stacked_batch_norm_stats"
_BACKWARD = "stacked_batch_norm_backward"
_UPDATE = "update_running_stats"


# --- the eager references (the oracle) -------------------------------------------


def stacked_batch_norm_stats_reference(
    z: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-(j, c) mean, rstd and biased variance of ``z`` (J, C, *rest)."""
    j, c = z.shape[:2]
    rows = z.reshape(j, c, math.prod(z.shape[2:])).to(accumulate_dtype(z.dtype))
    var, mean = torch.var_mean(rows, dim=2, correction=0)
    return mean, torch.rsqrt(var + eps), var


def stacked_batch_norm_backward_reference(
    grad_yhat: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """Gradient of batch norm (training mode, no affine) with respect to ``z``."""
    shape = (z.shape[0], z.shape[1], math.prod(z.shape[2:]))
    acc = accumulate_dtype(z.dtype)
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
    check_tensor(op, "z", z)
    check_value(z.dim() >= 2, lambda: f"{op}: z must be (J, C, *rest) with at least 2 dims, got shape {tuple(z.shape)}")
    check_dtype(op, "z", z)
    check_value(
        z.shape[0] * z.shape[1] == 0 or z.numel() > 0,
        lambda: f"{op}: z has shape {tuple(z.shape)}: no values to normalise each (j, c) over",
    )


def _check_stat(op: str, name: str, t, z: torch.Tensor) -> None:
    check_tensor(op, name, t)
    check_value(
        tuple(t.shape) == tuple(z.shape[:2]),
        lambda: f"{op}: {name} has shape {tuple(t.shape)}; expected (J, C) = {tuple(z.shape[:2])}",
    )
    check_dtype(op, name, t, STAT_DTYPES, STAT_DTYPE_NAMES)
    check_device(op, name, t, "z is", z.device)


def check_stacked_batch_norm_stats(z, eps) -> None:
    _check_z(_STATS, z)


def check_stacked_batch_norm_backward(grad_yhat, z, mean, rstd) -> None:
    op = _BACKWARD
    _check_z(op, z)
    check_tensor(op, "grad_yhat", grad_yhat)
    check_value(
        grad_yhat.shape == z.shape,
        lambda: f"{op}: grad_yhat has shape {tuple(grad_yhat.shape)} but z has {tuple(z.shape)}",
    )
    check_same_dtype(op, "grad_yhat", grad_yhat, "z", z.dtype)
    check_device(op, "grad_yhat", grad_yhat, "z is", z.device)
    _check_stat(op, "mean", mean, z)
    _check_stat(op, "rstd", rstd, z)


def check_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count):
    op = _UPDATE
    check_type(
        isinstance(rows, Sequence) and not isinstance(rows, torch.Tensor),
        lambda: f"{op}: rows must be a list, got {type(rows).__name__}",
    )
    n = len(rows)
    buffers = {}
    for name, lst in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("num_batches_tracked", num_batches_tracked),
    ):
        lst = buffers[name] = check_tensor_list(op, name, lst, "a list")
        check_value(len(lst) == n, lambda: f"{op}: {name} has {len(lst)} tensors but rows has {n} entries")
    for name, t in (("mean", mean), ("var", var)):
        check_value(
            isinstance(t, torch.Tensor) and t.dim() == 2,
            lambda: f"{op}: {name} must be a (J, C) tensor, got {getattr(t, 'shape', type(t).__name__)}",
        )
    check_value(
        mean.shape == var.shape, lambda: f"{op}: mean has shape {tuple(mean.shape)} but var has {tuple(var.shape)}"
    )
    check_device(op, "mean", mean, "var is", var.device)
    j, c = mean.shape

    def row_message():
        i = next(i for i, r in enumerate(rows) if not (is_int(r) and 0 <= r < j))
        if not is_int(rows[i]):
            return f"{op}: rows[{i}] is a {type(rows[i]).__name__}, not an int"
        return f"{op}: rows[{i}]={rows[i]} is out of range for mean and var with J={j} rows"

    check_type(all(is_int(r) for r in rows), row_message)
    check_index(all(0 <= r < j for r in rows), row_message)
    for name in ("running_mean", "running_var"):
        lst = buffers[name]

        def shape_message():
            i = next(i for i, t in enumerate(lst) if tuple(t.shape) != (c,))
            return f"{op}: {name}[{i}] has shape {tuple(lst[i].shape)}; expected ({c},)"

        def dtype_message():
            i = next(i for i, t in enumerate(lst) if not t.is_floating_point())
            return f"{op}: {name}[{i}] has dtype {lst[i].dtype}; expected a floating dtype"

        check_value(all(tuple(t.shape) == (c,) for t in lst), shape_message)
        check_type(all(t.is_floating_point() for t in lst), dtype_message)
        check_devices(op, name, lst, "mean is", mean.device)

    def count_message():
        i = next(i for i, t in enumerate(buffers["num_batches_tracked"]) if t.numel() != 1)
        return f"{op}: num_batches_tracked[{i}] must be a one-element tensor"

    check_value(all(t.numel() == 1 for t in buffers["num_batches_tracked"]), count_message)
    check_devices(op, "num_batches_tracked", buffers["num_batches_tracked"], "mean is", mean.device)
    check_value(
        is_int(count) and count >= 2,
        lambda: f"{op}: count={count!r} must be an int >= 2 (the unbiased variance divides by count - 1)",
    )


# --- the public ops ---------------------------------------------------------------


def stacked_batch_norm_stats(
    z: torch.Tensor, eps: float = 1e-5, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics of J stacked candidates: (mean, rstd, var), each (J, C).

    ``z``: (J, C, *rest), any strides. The statistics are fp32 (fp64 for fp64
    ``z``); ``var`` is biased and ``rstd = 1 / sqrt(var + eps)``.
    """
    check_stacked_batch_norm_stats(z, eps)
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
    check_stacked_batch_norm_backward(grad_yhat, z, mean, rstd)
    name = backends.resolve("stacked_batch_norm_backward", z.device, backend)
    if name == "reference":
        return stacked_batch_norm_backward_reference(grad_yhat, z, mean, rstd).contiguous()
    if name == "triton":
        return torch.ops.fastnas.stacked_batch_norm_backward_triton(grad_yhat, z, mean, rstd)
    return torch.ops.fastnas.stacked_batch_norm_backward(grad_yhat, z, mean, rstd)


def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count):
    check_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count)


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
    check_update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count)
    torch.ops.fastnas.update_running_stats(
        list(running_mean), list(running_var), list(num_batches_tracked), mean, var, list(rows), float(momentum), count
    )


# --- fake impls, Triton ops -------------------------------------------------------


def _fake_stats(z, eps):
    check_stacked_batch_norm_stats(z, eps)
    shape = tuple(z.shape[:2])
    acc = accumulate_dtype(z.dtype)
    return z.new_empty(shape, dtype=acc), z.new_empty(shape, dtype=acc), z.new_empty(shape, dtype=acc)


def _fake_backward(grad_yhat, z, mean, rstd):
    check_stacked_batch_norm_backward(grad_yhat, z, mean, rstd)
    return torch.empty_like(z, memory_format=torch.contiguous_format)


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
        with torch.no_grad():
            update_running_stats_reference(
                running_mean, running_var, num_batches_tracked, mean, var, rows, momentum, count
            )

    _update_running_stats_op.register_fake(_update_running_stats_fake)


@torch.library.custom_op("fastnas::stacked_batch_norm_stats_triton", mutates_args=())
def _stats_triton(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastnas.kernels.stacked_batch_norm import stacked_batch_norm_stats_forward

    return stacked_batch_norm_stats_forward(z.contiguous(), eps)


@torch.library.custom_op("fastnas::stacked_batch_norm_backward_triton", mutates_args=())
def _backward_triton(grad_yhat: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    from fastnas.kernels.stacked_batch_norm import stacked_batch_norm_backward as backward_kernel

    return backward_kernel(grad_yhat.contiguous(), z.contiguous(), mean.contiguous(), rstd.contiguous())


register_op(_STATS, _fake_stats, triton=_stats_triton)
register_op(_BACKWARD, _fake_backward, triton=_backward_triton)
if not register_op(_UPDATE, _update_running_stats_fake):
    _define_update_running_stats_without_cpp()
