"""Triton kernels of darts_sum: the DARTS edge's weighted sum with batch norm folded in.

Every kernel runs on a (C, blocks) grid: program (c, p) covers block p of
channel c's N*Ho*Wo (or N*H*W) elements, so the per-channel statistics and
coefficients are scalars in the program. The 3x3 pools are recomputed from x
wherever they are needed and never stored.

Reductions are two-stage and fixed-order (per-block partials, then a fixed-order
sum of each row), so results are bit-identical from run to run. Block sizes are
constants, never tuned, because they set how the sums are split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnas.kernels._utils import (
    cast_for_store,
    device_guard,
    max_pool_takes,
    sum_partials,
    tl_dtype,
)
from fastnas.ops._common import accumulate_dtype

_STATS_BLOCK = 512
_FORWARD_BLOCK = 512
_REDUCE_BLOCK = 512
_GRAD_Z_BLOCK = 1024
_GRAD_X_BLOCK = 256


def _pooled(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


@triton.jit
def _window(x_base, oh, ow, H, W, S: tl.constexpr, mask, ACC: tl.constexpr):
    """The 3x3, padding 1 window of output (oh, ow): its max, the window
    position (0..8, row-major) of the max as max_pool2d picks it (the first
    maximum; a NaN wins), the sum and the count of valid elements."""
    best = tl.full(oh.shape, float("-inf"), ACC)
    arg = tl.full(oh.shape, -1, tl.int32)
    total = tl.zeros(oh.shape, ACC)
    for dh in tl.static_range(3):
        ih = oh * S - 1 + dh
        row_ok = mask & (ih >= 0) & (ih < H)
        for dw in tl.static_range(3):
            iw = ow * S - 1 + dw
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(x_base + ih * W + iw, mask=ok, other=0.0).to(ACC)
            take = ok & (max_pool_takes(v, best) | (arg < 0))
            best = tl.where(take, v, best)
            arg = tl.where(take, dh * 3 + dw, arg)
            total += v
    # Lanes outside the output get finite stand-ins, so masked arithmetic on
    # them raises no floating-point warnings under the interpreter.
    best = tl.where(arg >= 0, best, 0.0)
    rows = tl.minimum(oh * S + 2, H) - tl.maximum(oh * S - 1, 0)
    cols = tl.minimum(ow * S + 2, W) - tl.maximum(ow * S - 1, 0)
    return best, arg, total, (tl.maximum(rows, 1) * tl.maximum(cols, 1)).to(ACC)


@triton.jit
def _pool_stats_kernel(
    x_ptr, mean_ptr, m2_ptr, C, M, H, W, Ho, Wo, P, S: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    # Per block: the mean and sum of squared deviations of both pools; stored
    # (2, C, P) for the fixed-order merge on the host side.
    c = tl.program_id(0)
    p = tl.program_id(1)
    m = p * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    n = m // (Ho * Wo)
    o = m % (Ho * Wo)
    oh = o // Wo
    ow = o % Wo
    x_base = x_ptr + (n.to(tl.int64) * C + c) * H * W
    best, arg, total, count = _window(x_base, oh, ow, H, W, S, mask, ACC)
    avg = total / count
    cnt = tl.minimum(M - p * BLOCK, BLOCK).to(ACC)
    mean_max = tl.sum(tl.where(mask, best, 0.0), axis=0) / cnt
    mean_avg = tl.sum(tl.where(mask, avg, 0.0), axis=0) / cnt
    dmax = tl.where(mask, best - mean_max, 0.0)
    davg = tl.where(mask, avg - mean_avg, 0.0)
    row = c.to(tl.int64) * P + p
    tl.store(mean_ptr + row, mean_max)
    tl.store(m2_ptr + row, tl.sum(dmax * dmax, axis=0))
    tl.store(mean_ptr + C * P + row, mean_avg)
    tl.store(m2_ptr + C * P + row, tl.sum(davg * davg, axis=0))


@triton.jit
def _forward_kernel(
    x_ptr,
    z_ptr,
    mean_ptr,
    rstd_ptr,
    coef_ptr,
    out_ptr,
    JZ,
    C,
    M,
    H,
    W,
    Ho,
    Wo,
    S: tl.constexpr,
    HAS_MAX: tl.constexpr,
    HAS_AVG: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    c = tl.program_id(0)
    m = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    n = m // (Ho * Wo)
    o = m % (Ho * Wo)
    acc = tl.zeros([BLOCK], ACC)
    for j in range(JZ):
        scale = tl.load(coef_ptr + j).to(ACC) * tl.load(rstd_ptr + j * C + c).to(ACC)
        mu = tl.load(mean_ptr + j * C + c).to(ACC)
        zj = tl.load(z_ptr + (j * C + c).to(tl.int64) * M + m, mask=mask, other=0.0).to(ACC)
        acc += scale * (zj - mu)
    x_base = x_ptr + (n.to(tl.int64) * C + c) * H * W
    if HAS_MAX or HAS_AVG:
        best, arg, total, count = _window(x_base, o // Wo, o % Wo, H, W, S, mask, ACC)
        if HAS_MAX:
            k = JZ
            scale = tl.load(coef_ptr + k).to(ACC) * tl.load(rstd_ptr + k * C + c).to(ACC)
            acc += scale * (best - tl.load(mean_ptr + k * C + c).to(ACC))
        if HAS_AVG:
            k = JZ + 1
            scale = tl.load(coef_ptr + k).to(ACC) * tl.load(rstd_ptr + k * C + c).to(ACC)
            acc += scale * (total / count - tl.load(mean_ptr + k * C + c).to(ACC))
    if HAS_SKIP:
        acc += tl.load(coef_ptr + JZ + 2).to(ACC) * tl.load(x_base + o, mask=mask, other=0.0).to(ACC)
    out_off = (n.to(tl.int64) * C + c) * (Ho * Wo) + o
    tl.store(out_ptr + out_off, cast_for_store(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(
    g_ptr,
    x_ptr,
    z_ptr,
    mean_ptr,
    partial_ptr,
    JZ,
    C,
    M,
    H,
    W,
    Ho,
    Wo,
    P,
    S: tl.constexpr,
    HAS_MAX: tl.constexpr,
    HAS_AVG: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    # Partial sums, laid out (JZ + 4, C, P): sum g, sum g*(z_j - mean_j) for
    # each j, the same for the max and avg pools, sum g*x.
    c = tl.program_id(0)
    p = tl.program_id(1)
    m = p * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    n = m // (Ho * Wo)
    o = m % (Ho * Wo)
    g = tl.load(g_ptr + (n.to(tl.int64) * C + c) * (Ho * Wo) + o, mask=mask, other=0.0).to(ACC)
    row = c.to(tl.int64) * P + p
    plane = C * P
    tl.store(partial_ptr + row, tl.sum(g, axis=0))
    for j in range(JZ):
        mu = tl.load(mean_ptr + j * C + c).to(ACC)
        zj = tl.load(z_ptr + (j * C + c).to(tl.int64) * M + m, mask=mask, other=0.0).to(ACC)
        tl.store(partial_ptr + (1 + j) * plane + row, tl.sum(tl.where(mask, g * (zj - mu), 0.0), axis=0))
    x_base = x_ptr + (n.to(tl.int64) * C + c) * H * W
    s_max = 0.0
    s_avg = 0.0
    if HAS_MAX or HAS_AVG:
        best, arg, total, count = _window(x_base, o // Wo, o % Wo, H, W, S, mask, ACC)
        if HAS_MAX:
            mu = tl.load(mean_ptr + JZ * C + c).to(ACC)
            s_max = tl.sum(tl.where(mask, g * (best - mu), 0.0), axis=0)
        if HAS_AVG:
            mu = tl.load(mean_ptr + (JZ + 1) * C + c).to(ACC)
            s_avg = tl.sum(tl.where(mask, g * (total / count - mu), 0.0), axis=0)
    tl.store(partial_ptr + (1 + JZ) * plane + row, s_max)
    tl.store(partial_ptr + (2 + JZ) * plane + row, s_avg)
    s_skip = 0.0
    if HAS_SKIP:
        s_skip = tl.sum(g * tl.load(x_base + o, mask=mask, other=0.0).to(ACC), axis=0)
    tl.store(partial_ptr + (3 + JZ) * plane + row, s_skip)


@triton.jit
def _grad_z_kernel(
    g_ptr,
    z_ptr,
    gz_ptr,
    g_mean_ptr,
    scale_ptr,
    slope_ptr,
    mean_ptr,
    C,
    M,
    Ho,
    Wo,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    # Program (j*C + c, p): grad z = scale * ((g - mean(g)) - (z - mean) * slope).
    r = tl.program_id(0)
    c = r % C
    m = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = m < M
    n = m // (Ho * Wo)
    o = m % (Ho * Wo)
    g = tl.load(g_ptr + (n.to(tl.int64) * C + c) * (Ho * Wo) + o, mask=mask, other=0.0).to(ACC)
    off = r.to(tl.int64) * M + m
    z = tl.load(z_ptr + off, mask=mask, other=0.0).to(ACC)
    gm = tl.load(g_mean_ptr + c)
    scale = tl.load(scale_ptr + r)
    slope = tl.load(slope_ptr + r)
    mu = tl.load(mean_ptr + r)
    gz = scale * ((g - gm) - (z - mu) * slope)
    tl.store(gz_ptr + off, cast_for_store(gz, gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_x_kernel(
    g_ptr,
    x_ptr,
    gx_ptr,
    g_mean_ptr,
    scale_ptr,
    slope_ptr,
    mean_ptr,
    coef_ptr,
    JZ,
    C,
    MX,
    H,
    W,
    Ho,
    Wo,
    S: tl.constexpr,
    HAS_MAX: tl.constexpr,
    HAS_AVG: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    # Gather: each input pixel sums what the windows containing it send back;
    # a max window sends only to its recomputed argmax.
    c = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < MX
    n = i // (H * W)
    hw = i % (H * W)
    h = hw // W
    w = hw % W
    plane_off = n.to(tl.int64) * C + c
    x_base = x_ptr + plane_off * H * W
    g_base = g_ptr + plane_off * (Ho * Wo)
    gm = tl.load(g_mean_ptr + c)
    acc = tl.zeros([BLOCK], ACC)
    if HAS_SKIP:
        acc += tl.load(coef_ptr + JZ + 2).to(ACC) * tl.load(g_base + hw, mask=mask, other=0.0).to(ACC)
    if HAS_MAX or HAS_AVG:
        kmax = JZ * C + c
        kavg = (JZ + 1) * C + c
        for dh in tl.static_range(3):
            th = h + 1 - dh
            oh = tl.maximum(th, 0) // S
            ok_h = (th >= 0) & (th % S == 0) & (oh < Ho)
            for dw in tl.static_range(3):
                tw = w + 1 - dw
                ow = tl.maximum(tw, 0) // S
                ok = mask & ok_h & (tw >= 0) & (tw % S == 0) & (ow < Wo)
                g = tl.load(g_base + oh * Wo + ow, mask=ok, other=0.0).to(ACC) - gm
                best, arg, total, count = _window(x_base, oh, ow, H, W, S, ok, ACC)
                if HAS_MAX:
                    gp = tl.load(scale_ptr + kmax) * (g - (best - tl.load(mean_ptr + kmax)) * tl.load(slope_ptr + kmax))
                    acc += tl.where(ok & (arg == dh * 3 + dw), gp, 0.0)
                if HAS_AVG:
                    gp = tl.load(scale_ptr + kavg) * (
                        g - (total / count - tl.load(mean_ptr + kavg)) * tl.load(slope_ptr + kavg)
                    )
                    acc += tl.where(ok, gp / count, 0.0)
    tl.store(gx_ptr + plane_off * H * W + hw, cast_for_store(acc, gx_ptr.dtype.element_ty), mask=mask)


# --- host side ---------------------------------------------------------------------


def pool_batch_norm_stats_forward(x: torch.Tensor, stride: int, eps: float):
    n, c, h, w = x.shape
    ho, wo = _pooled(h, stride), _pooled(w, stride)
    acc = accumulate_dtype(x.dtype)
    m = n * ho * wo
    p = triton.cdiv(m, _STATS_BLOCK)
    mean_b = torch.empty((2, c, p), dtype=acc, device=x.device)
    m2_b = torch.empty((2, c, p), dtype=acc, device=x.device)
    if m == 0 or c == 0:
        nan = torch.full((2, c), float("nan"), dtype=acc, device=x.device)
        return nan, nan.clone(), nan.clone()
    with device_guard(x):
        _pool_stats_kernel[(c, p)](
            x, mean_b, m2_b, c, m, h, w, ho, wo, p, S=stride, BLOCK=_STATS_BLOCK, ACC=tl_dtype(acc), num_warps=4
        )
    # Chan et al.'s merge of the blocks, each a fixed-order sum.
    # Built by fills on the device: assigning a Python number into a CUDA tensor
    # is a host-to-device copy, which would keep the step out of a CUDA graph.
    counts = torch.cat(
        [
            torch.full((p - 1,), float(_STATS_BLOCK), dtype=acc, device=x.device),
            torch.full((1,), float(m - (p - 1) * _STATS_BLOCK), dtype=acc, device=x.device),
        ]
    )
    mean = (mean_b * counts).sum(-1) / m
    var = (m2_b + counts * (mean_b - mean.unsqueeze(-1)) ** 2).sum(-1) / m
    return mean, torch.rsqrt(var + eps), var


def darts_sum_forward(x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip):
    n, c, h, w = x.shape
    ho, wo = _pooled(h, stride), _pooled(w, stride)
    out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device)
    m = n * ho * wo
    if out.numel() == 0:
        return out
    grid = (c, triton.cdiv(m, _FORWARD_BLOCK))
    with device_guard(x):
        _forward_kernel[grid](
            x,
            z,
            mean,
            rstd,
            coef,
            out,
            z.shape[0],
            c,
            m,
            h,
            w,
            ho,
            wo,
            S=stride,
            HAS_MAX=has_max,
            HAS_AVG=has_avg,
            HAS_SKIP=has_skip,
            BLOCK=_FORWARD_BLOCK,
            ACC=tl_dtype(accumulate_dtype(x.dtype)),
            num_warps=4,
        )
    return out


def darts_sum_backward(grad_out, x, z, mean, rstd, coef, stride, has_max, has_avg, has_skip, x_need_grad):
    n, c, h, w = x.shape
    jz = z.shape[0]
    ho, wo = _pooled(h, stride), _pooled(w, stride)
    m = n * ho * wo
    acc = accumulate_dtype(x.dtype)
    tacc = tl_dtype(acc)
    grad_z = torch.empty_like(z, memory_format=torch.contiguous_format)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if x_need_grad else x.new_empty(0)
    if m == 0 or c == 0:
        if x_need_grad:
            grad_x.zero_()
        return grad_z, grad_x, torch.zeros_like(coef)
    mean_a, rstd_a, coef_a = mean.to(acc), rstd.to(acc), coef.to(acc)

    p = triton.cdiv(m, _REDUCE_BLOCK)
    partials = torch.empty((jz + 4, c, p), dtype=acc, device=x.device)
    with device_guard(x):
        _reduce_kernel[(c, p)](
            grad_out,
            x,
            z,
            mean_a,
            partials,
            jz,
            c,
            m,
            h,
            w,
            ho,
            wo,
            p,
            S=stride,
            HAS_MAX=has_max,
            HAS_AVG=has_avg,
            HAS_SKIP=has_skip,
            BLOCK=_REDUCE_BLOCK,
            ACC=tacc,
            num_warps=4,
        )
    sums = sum_partials(partials.view((jz + 4) * c, p), acc).view(jz + 4, c)

    # grad of candidate k's pre-BN input: scale * ((g - g_mean) - (p - mean) * slope).
    g_mean = (sums[0] / m).contiguous()
    s_k = sums[1 : jz + 3]
    scale = (coef_a[: jz + 2, None] * rstd_a).contiguous()
    slope = (s_k * rstd_a * rstd_a / m).contiguous()
    # Absent pools keep a zero gradient; flags, not a device mask, so nothing is
    # copied from the host (the step stays CUDA-graph capturable).
    per_candidate = (s_k * rstd_a).sum(1)
    grad_coef = torch.zeros(jz + 3, dtype=acc, device=x.device)
    grad_coef[:jz] = per_candidate[:jz]
    if has_max:
        grad_coef[jz] = per_candidate[jz]
    if has_avg:
        grad_coef[jz + 1] = per_candidate[jz + 1]
    if has_skip:
        grad_coef[jz + 2] = sums[jz + 3].sum()

    with device_guard(x):
        if jz:
            _grad_z_kernel[(jz * c, triton.cdiv(m, _GRAD_Z_BLOCK))](
                grad_out,
                z,
                grad_z,
                g_mean,
                scale,
                slope,
                mean_a,
                c,
                m,
                ho,
                wo,
                BLOCK=_GRAD_Z_BLOCK,
                ACC=tacc,
                num_warps=4,
            )
        if x_need_grad:
            mx = n * h * w
            _grad_x_kernel[(c, triton.cdiv(mx, _GRAD_X_BLOCK))](
                grad_out,
                x,
                grad_x,
                g_mean,
                scale,
                slope,
                mean_a,
                coef_a,
                jz,
                c,
                mx,
                h,
                w,
                ho,
                wo,
                S=stride,
                HAS_MAX=has_max,
                HAS_AVG=has_avg,
                HAS_SKIP=has_skip,
                BLOCK=_GRAD_X_BLOCK,
                ACC=tacc,
                num_warps=4,
            )
    return grad_z, grad_x, grad_coef.to(coef.dtype)
