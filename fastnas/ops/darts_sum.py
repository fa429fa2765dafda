"""darts_sum: the DARTS edge's weighted sum with batch norm folded in.

A DARTS edge outputs ``sum_k coef[k] * op_k(x)`` over: convolution candidates
ending in batch norm (no affine, training mode), max_pool_3x3 + BN,
avg_pool_3x3 + BN, skip_connect (identity) and none (zero, no term). These ops
take the convolution candidates' *pre-BN* tensors ``z`` with their per-channel
batch statistics and compute the pooling candidates straight from the edge
input ``x``, so no normalised or pooled tensor is ever stored.

Layouts. ``x`` is (N, C, H, W). ``z`` is channel-major, (Jz, C, N, Ho, Wo)
contiguous (Jz may be 0), so candidate j is a (C, N*Ho*Wo) matrix and the
per-channel statistics are row reductions. ``mean`` and ``rstd`` are
(Jz + 2, C): rows 0..Jz-1 for the z candidates, row Jz for the max pool, row
Jz + 1 for the avg pool (present even when a pool is absent). ``coef`` is
(Jz + 3,) = [z candidates..., max, avg, skip]. Pools are 3x3, padding 1,
``stride`` 1 or more (Ho = (H - 1) // stride + 1); the avg pool divides by the
count of valid elements (``count_include_pad=False``). Skip needs stride 1.

Statistics are float32 (float64 for float64 inputs); outputs have the dtype
of ``x``; everything accumulates in float32 (float64 for float64 inputs).

Backward is batch norm in training mode: the statistics are functions of
their inputs, so ``grad_z``/``grad_x`` include the paths through them and
``mean``/``rstd`` themselves get no gradient. Pass the batch statistics of
``z`` and of the pools of ``x`` (``pool_batch_norm_stats``) for that to be the
true gradient.

Ops registered with torch.library:
  fastnas::pool_batch_norm_stats, darts_sum, darts_sum_backward     C++ (CPU, CUDA)
  fastnas::pool_batch_norm_stats_triton, darts_sum_triton,
          darts_sum_backward_triton                                 Triton
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastnas import backends
from fastnas.ops._common import (
    STAT_DTYPE_NAMES,
    STAT_DTYPES,
    accumulate_dtype,
    check_device,
    check_dtype,
    check_flag,
    check_same_dtype,
    check_tensor,
    check_type,
    check_value,
    is_int,
)
from fastnas.ops._registry import register_op


def pooled_size(size: int, stride: int) -> int:
    """Output size of a 3x3 pool with padding 1."""
    return (size - 1) // stride + 1


def _pools(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        F.max_pool2d(x, 3, stride, 1),
        F.avg_pool2d(x, 3, stride, 1, count_include_pad=False),
    )


# --- references (the oracle) ------------------------------------------------------


def pool_batch_norm_stats_reference(
    x: torch.Tensor, stride: int, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager PyTorch: pool, then the biased per-channel var_mean of each pool."""
    acc = accumulate_dtype(x.dtype)
    mean, var = [], []
    for p in _pools(x.to(acc), stride):
        v, m = torch.var_mean(p, dim=(0, 2, 3), correction=0)
        mean.append(m)
        var.append(v)
    mean, var = torch.stack(mean), torch.stack(var)
    return mean, torch.rsqrt(var + eps), var


def darts_sum_reference(
    x: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    coef: torch.Tensor,
    stride: int,
    has_max: bool,
    has_avg: bool,
    has_skip: bool,
) -> torch.Tensor:
    """Eager PyTorch: normalise each candidate with the given statistics and sum."""
    acc = accumulate_dtype(x.dtype)
    n, c = x.shape[:2]
    jz = z.shape[0]
    m, r, w = mean.to(acc), rstd.to(acc), coef.to(acc)
    xa = x.to(acc)

    def bn(p, k):
        return (p - m[k].view(1, c, 1, 1)) * r[k].view(1, c, 1, 1)

    terms = [w[j] * bn(z[j].to(acc).transpose(0, 1), j) for j in range(jz)]
    if has_max or has_avg:
        mp, ap = _pools(xa, stride)
        if has_max:
            terms.append(w[jz] * bn(mp, jz))
        if has_avg:
            terms.append(w[jz + 1] * bn(ap, jz + 1))
    if has_skip:
        terms.append(w[jz + 2] * xa)
    ho, wo = pooled_size(x.shape[2], stride), pooled_size(x.shape[3], stride)
    out = torch.zeros((n, c, ho, wo), dtype=acc, device=x.device)
    for t in terms:
        out = out + t
    return out.to(x.dtype).contiguous()


def darts_sum_backward_reference(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    coef: torch.Tensor,
    stride: int,
    has_max: bool,
    has_avg: bool,
    has_skip: bool,
    x_need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager PyTorch: the training-mode batch-norm gradient of each candidate,
    ``coef*rstd*(g - mean(g) - yhat*mean(g*yhat))``, then autograd through the pools."""
    acc = accumulate_dtype(x.dtype)
    c = x.shape[1]
    jz = z.shape[0]
    m, r, w = mean.to(acc), rstd.to(acc), coef.to(acc)
    g = grad_out.to(acc)
    dims = (0, 2, 3)
    g_mean = g.mean(dims, keepdim=True)
    grad_coef = torch.zeros(jz + 3, dtype=acc, device=x.device)

    def bn_grad(p, k):
        yhat = (p - m[k].view(1, c, 1, 1)) * r[k].view(1, c, 1, 1)
        gy = g * yhat
        grad_coef[k] = gy.sum()
        return w[k] * r[k].view(1, c, 1, 1) * (g - g_mean - yhat * gy.mean(dims, keepdim=True))

    grad_z = torch.empty_like(z, memory_format=torch.contiguous_format)
    for j in range(jz):
        grad_z[j] = bn_grad(z[j].to(acc).transpose(0, 1), j).transpose(0, 1).to(z.dtype)

    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if x_need_grad else None
    if has_max or has_avg:
        with torch.enable_grad():
            xr = x.detach().to(acc).requires_grad_(True)
            mp, ap = _pools(xr, stride)
        pools = []
        if has_max:
            pools.append((mp, bn_grad(mp.detach(), jz)))
        if has_avg:
            pools.append((ap, bn_grad(ap.detach(), jz + 1)))
        if x_need_grad:
            for p, gp in pools:
                grad_x = grad_x + torch.autograd.grad(p, xr, gp)[0]
    if has_skip:
        grad_coef[jz + 2] = (g * x.to(acc)).sum()
        if x_need_grad:
            grad_x = grad_x + w[jz + 2] * g
    grad_x = grad_x.to(x.dtype).contiguous() if x_need_grad else x.new_empty(0)
    return grad_z, grad_x, grad_coef.to(coef.dtype)


# --- argument checks --------------------------------------------------------------


def _check_stride(op: str, stride) -> None:
    check_type(is_int(stride), lambda: f"{op}: stride must be an int, got {type(stride).__name__}")
    check_value(stride >= 1, lambda: f"{op}: stride must be >= 1, got {stride}")


def _check_x(op: str, x) -> None:
    check_tensor(op, "x", x)
    check_dtype(op, "x", x)
    check_value(x.dim() == 4, lambda: f"{op}: x must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    check_value(x.shape[2] >= 1 and x.shape[3] >= 1, lambda: f"{op}: x has an empty spatial size {tuple(x.shape[2:])}")


def check_pool_batch_norm_stats(x, stride, eps) -> None:
    op = "pool_batch_norm_stats"
    _check_x(op, x)
    _check_stride(op, stride)
    check_value(
        isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0,
        lambda: f"{op}: eps must be a non-negative number, got {eps!r}",
    )


def _check_darts(op, x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip) -> None:
    _check_x(op, x)
    _check_stride(op, stride)
    for name, v in (("has_max", has_max), ("has_avg", has_avg), ("has_skip", has_skip)):
        check_flag(op, name, v)
    check_value(
        not has_skip or stride == 1,
        lambda: f"{op}: has_skip=True (the identity) needs stride 1, got stride {stride}",
    )
    n, c, h, w = x.shape
    ho, wo = pooled_size(h, stride), pooled_size(w, stride)
    check_tensor(op, "z", z)
    check_value(
        z.dim() == 5 and tuple(z.shape[1:]) == (c, n, ho, wo),
        lambda: (
            f"{op}: z must be (Jz, C, N, Ho, Wo) = (Jz, {c}, {n}, {ho}, {wo}) for x of shape {tuple(x.shape)} "
            f"and stride {stride}, got shape {tuple(z.shape)}"
        ),
    )
    check_same_dtype(op, "z", z, "x", x.dtype)
    check_device(op, "z", z, "x is", x.device)
    jz = z.shape[0]
    for name, t, shape in (("mean", mean, (jz + 2, c)), ("rstd", rstd, (jz + 2, c)), ("coef", coef, (jz + 3,))):
        check_tensor(op, name, t)
        check_value(
            tuple(t.shape) == shape,
            lambda: f"{op}: {name} must have shape {shape} (Jz={jz}, C={c}), got {tuple(t.shape)}",
        )
        check_dtype(op, name, t, STAT_DTYPES, STAT_DTYPE_NAMES)
        check_device(op, name, t, "x is", x.device)


def check_darts_sum(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip) -> None:
    _check_darts("darts_sum", x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip)


def check_darts_sum_backward(grad_out, x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip, x_need_grad):
    op = "darts_sum_backward"
    _check_darts(op, x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip)
    check_tensor(op, "grad_out", grad_out)
    n, c, h, w = x.shape
    shape = (n, c, pooled_size(h, stride), pooled_size(w, stride))
    check_value(
        tuple(grad_out.shape) == shape, lambda: f"{op}: grad_out must have shape {shape}, got {tuple(grad_out.shape)}"
    )
    check_same_dtype(op, "grad_out", grad_out, "x", x.dtype)
    check_device(op, "grad_out", grad_out, "x is", x.device)
    check_flag(op, "x_need_grad", x_need_grad)


# --- public API -------------------------------------------------------------------


def pool_batch_norm_stats(
    x: torch.Tensor, stride: int, eps: float = 1e-5, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics of max_pool2d(x, 3, stride, 1) and avg_pool2d(x, 3,
    stride, 1, count_include_pad=False) without storing either pool.

    Returns (mean, rstd, var), each (2, C): row 0 the max pool, row 1 the avg
    pool; var is biased, rstd = 1/sqrt(var + eps). float32 (float64 for
    float64 x).
    """
    check_pool_batch_norm_stats(x, stride, eps)
    name = backends.resolve("pool_batch_norm_stats", x.device, backend)
    if name == "reference":
        return pool_batch_norm_stats_reference(x, stride, eps)
    if name == "triton":
        return torch.ops.fastnas.pool_batch_norm_stats_triton(x, stride, float(eps))
    return torch.ops.fastnas.pool_batch_norm_stats(x, stride, float(eps))


def darts_sum(
    x: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    coef: torch.Tensor,
    stride: int,
    has_max: bool,
    has_avg: bool,
    has_skip: bool,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``sum_j coef[j]*bn(z[j]) + coef[Jz]*bn(maxpool(x)) + coef[Jz+1]*bn(avgpool(x)) + coef[Jz+2]*x``
    (absent terms dropped), bn(p) = (p - mean[k, c]) * rstd[k, c]. Returns
    (N, C, Ho, Wo) contiguous in the dtype of x. Differentiable in x, z and coef
    (training-mode batch norm; see the module docstring)."""
    check_darts_sum(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip)
    name = backends.resolve("darts_sum", x.device, backend)
    if name == "reference":
        if torch.is_grad_enabled() and (x.requires_grad or z.requires_grad or coef.requires_grad):
            return _DartsSumReference.apply(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip)
        return darts_sum_reference(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip)
    if name == "triton":
        return torch.ops.fastnas.darts_sum_triton(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip)
    return torch.ops.fastnas.darts_sum(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip)


def darts_sum_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    coef: torch.Tensor,
    stride: int,
    has_max: bool,
    has_avg: bool,
    has_skip: bool,
    x_need_grad: bool = True,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_z, grad_x, grad_coef) of darts_sum with training-mode batch norm.

    grad_z (Jz, C, N, Ho, Wo); grad_x (N, C, H, W), or an empty tensor when
    ``x_need_grad`` is False; grad_coef (Jz + 3,) in coef's dtype, 0 for
    absent candidates. Deterministic: bit-identical across runs.
    """
    check_darts_sum_backward(grad_out, x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip, x_need_grad)
    args = (grad_out, x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip, x_need_grad)
    name = backends.resolve("darts_sum", x.device, backend)
    if name == "reference":
        return darts_sum_backward_reference(*args)
    if name == "triton":
        return torch.ops.fastnas.darts_sum_backward_triton(*args)
    return torch.ops.fastnas.darts_sum_backward(*args)


# --- autograd and fake tensors, shared by the C++ and the Triton ops --------------


def _setup_context(ctx, inputs, output):
    x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip = inputs
    ctx.args = (stride, has_max, has_avg, has_skip)
    ctx.save_for_backward(x, z, mean, rstd, coef)


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        x, z, mean, rstd, coef = ctx.saved_tensors
        need_x, need_z, _, _, need_coef = ctx.needs_input_grad[:5]
        grad_z, grad_x, grad_coef = backward_op(grad_out.contiguous(), x, z, mean, rstd, coef, *ctx.args, bool(need_x))
        return (
            grad_x if need_x else None,
            grad_z if need_z else None,
            None,
            None,
            grad_coef if need_coef else None,
            None,
            None,
            None,
            None,
        )

    return backward


class _DartsSumReference(torch.autograd.Function):
    """The reference forward with the training-mode gradient the fused ops have
    (plain autograd of darts_sum_reference would hold mean and rstd constant)."""

    @staticmethod
    def forward(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip):
        return darts_sum_reference(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_make_backward(darts_sum_backward_reference))


def _fake_stats(x, stride, eps):
    check_pool_batch_norm_stats(x, stride, eps)
    c = x.shape[1]
    dtype = accumulate_dtype(x.dtype)
    return tuple(x.new_empty((2, c), dtype=dtype) for _ in range(3))


def _fake_forward(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip):
    check_darts_sum(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip)
    n, c, h, w = x.shape
    return x.new_empty((n, c, pooled_size(h, stride), pooled_size(w, stride)))


def _fake_backward(grad_out, x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip, x_need_grad):
    check_darts_sum_backward(grad_out, x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip, x_need_grad)
    grad_z = z.new_empty(z.shape)
    grad_x = x.new_empty(x.shape if x_need_grad else (0,))
    return grad_z, grad_x, coef.new_empty(coef.shape)


@torch.library.custom_op("fastnas::pool_batch_norm_stats_triton", mutates_args=())
def _stats_triton(x: torch.Tensor, stride: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastnas.kernels.darts_sum import pool_batch_norm_stats_forward

    return pool_batch_norm_stats_forward(x.contiguous(), stride, eps)


@torch.library.custom_op("fastnas::darts_sum_triton", mutates_args=())
def _darts_sum_triton(
    x: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    coef: torch.Tensor,
    stride: int,
    has_max: bool,
    has_avg: bool,
    has_skip: bool,
) -> torch.Tensor:
    from fastnas.kernels.darts_sum import darts_sum_forward

    return darts_sum_forward(
        x.contiguous(),
        z.contiguous(),
        mean.contiguous(),
        rstd.contiguous(),
        coef.contiguous(),
        stride,
        has_max,
        has_avg,
        has_skip,
    )


@torch.library.custom_op("fastnas::darts_sum_backward_triton", mutates_args=())
def _darts_sum_backward_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    coef: torch.Tensor,
    stride: int,
    has_max: bool,
    has_avg: bool,
    has_skip: bool,
    x_need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastnas.kernels.darts_sum import darts_sum_backward as backward

    return backward(
        grad_out.contiguous(),
        x.contiguous(),
        z.contiguous(),
        mean.contiguous(),
        rstd.contiguous(),
        coef.contiguous(),
        stride,
        has_max,
        has_avg,
        has_skip,
        x_need_grad,
    )


register_op("pool_batch_norm_stats", _fake_stats, triton=_stats_triton)
register_op(
    "darts_sum",
    _fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    make_backward=_make_backward,
    triton=_darts_sum_triton,
    triton_backward=_darts_sum_backward_triton,
)
