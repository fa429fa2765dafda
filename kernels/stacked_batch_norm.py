"""Triton kernels of stacked batch norm: statistics and backward of J candidates.

``z`` is (J, C, *rest) contiguous: R = J * C rows of M values each. Every row
is cut into S segments (S a function of M alone, so results are bit-identical
run to run); program (r, s) reduces segment s of row r to a partial, and a
second kernel combines a row's partials in a fixed order.

Statistics: a segment is walked in chunks of BLOCK values; each chunk's mean
and squared deviations (M2) come from the chunk in registers and are merged
with Chan's formula. All sums run over z - z[r, 0], so large means with a small
spread lose no digits. Backward: the partials are sums of g and g * yhat; the
second kernel turns them into mean(g), mean(g * yhat) and writes
``grad_z = rstd * (g - mean(g) - yhat * mean(g * yhat))``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnas.kernels._utils import cast_for_store, device_guard, tl_dtype, warps_for
from fastnas.ops._common import accumulate_dtype

_MAX_BLOCK = 1024
# At least this many chunks per program, so a program's fixed costs amortise.
_MIN_CHUNKS_PER_PROGRAM = 8
# At most this many segments per row: the combining kernel loads them in one block.
_MAX_SEGMENTS = 1024


def _split(m: int) -> tuple[int, int, int]:
    """(BLOCK, chunks per segment, segments) for rows of m values."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(max(m, 1)))
    chunks = triton.cdiv(m, block)
    per_program = max(_MIN_CHUNKS_PER_PROGRAM, triton.cdiv(chunks, _MAX_SEGMENTS))
    per_program = min(per_program, chunks)
    return block, per_program, triton.cdiv(chunks, per_program)


@triton.jit
def _stats_partial_kernel(
    z_ptr,
    pmean_ptr,
    pm2_ptr,
    M,
    S,
    CHUNKS,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    r = tl.program_id(0)
    s = tl.program_id(1)
    row = z_ptr + r.to(tl.int64) * M
    shift = tl.load(row).to(ACC)
    count = tl.zeros([], ACC)
    mean = tl.zeros([], ACC)
    m2 = tl.zeros([], ACC)
    start = s.to(tl.int64) * CHUNKS * BLOCK
    for i in range(CHUNKS):
        off = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = off < M
        x = tl.load(row + off, mask=mask, other=0.0).to(ACC) - shift
        x = tl.where(mask, x, 0.0)
        n_b = tl.sum(mask.to(ACC), axis=0)
        mean_b = tl.sum(x, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, x - mean_b, 0.0)
        m2_b = tl.sum(d * d, axis=0)
        # Chan, Golub and LeVeque: merge (count, mean, m2) with the chunk's.
        n = count + n_b
        frac = n_b / tl.maximum(n, 1.0)
        delta = mean_b - mean
        mean += delta * frac
        m2 += m2_b + delta * delta * count * frac
        count = n
    out = r.to(tl.int64) * S + s
    tl.store(pmean_ptr + out, mean)
    tl.store(pm2_ptr + out, m2)


@triton.jit
def _stats_combine_kernel(
    z_ptr,
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    rstd_ptr,
    var_ptr,
    M,
    S,
    SEGMENT,
    eps,
    BLOCK_S: tl.constexpr,
    ACC: tl.constexpr,
):
    # Segment s holds min(SEGMENT, M - s * SEGMENT) values: the parallel form
    # of Chan's formula, mean = sum n_s mean_s / M, M2 = sum M2_s + n_s (mean_s - mean)^2.
    r = tl.program_id(0)
    shift = tl.load(z_ptr + r.to(tl.int64) * M).to(ACC)
    s = tl.arange(0, BLOCK_S)
    mask = s < S
    base = r.to(tl.int64) * S
    pmean = tl.load(pmean_ptr + base + s, mask=mask, other=0.0)
    pm2 = tl.load(pm2_ptr + base + s, mask=mask, other=0.0)
    n_s = tl.where(mask, tl.minimum(SEGMENT, M - s.to(tl.int64) * SEGMENT), 0).to(ACC)
    mean = tl.sum(n_s * pmean, axis=0) / M
    d = pmean - mean
    m2 = tl.sum(pm2 + n_s * d * d, axis=0)
    var = m2 / M
    tl.store(mean_ptr + r, mean + shift)
    tl.store(var_ptr + r, var)
    tl.store(rstd_ptr + r, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _backward_partial_kernel(
    g_ptr,
    z_ptr,
    mean_ptr,
    rstd_ptr,
    psum_ptr,
    M,
    S,
    CHUNKS,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    r = tl.program_id(0)
    s = tl.program_id(1)
    base = r.to(tl.int64) * M
    mu = tl.load(mean_ptr + r)
    rs = tl.load(rstd_ptr + r)
    acc_g = tl.zeros([BLOCK], ACC)
    acc_gy = tl.zeros([BLOCK], ACC)
    start = s.to(tl.int64) * CHUNKS * BLOCK
    for i in range(CHUNKS):
        off = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = off < M
        g = tl.load(g_ptr + base + off, mask=mask, other=0.0).to(ACC)
        z = tl.load(z_ptr + base + off, mask=mask, other=0.0).to(ACC)
        acc_g += g
        acc_gy += g * ((z - mu) * rs)
    # Laid out (R, 2, S): a row's two sets of partials are contiguous.
    out = psum_ptr + r.to(tl.int64) * 2 * S + s
    tl.store(out, tl.sum(acc_g, axis=0))
    tl.store(out + S, tl.sum(acc_gy, axis=0))


@triton.jit
def _backward_apply_kernel(
    g_ptr,
    z_ptr,
    mean_ptr,
    rstd_ptr,
    psum_ptr,
    out_ptr,
    M,
    S,
    CHUNKS,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ACC: tl.constexpr,
):
    r = tl.program_id(0)
    s = tl.program_id(1)
    base = r.to(tl.int64) * M
    mu = tl.load(mean_ptr + r)
    rs = tl.load(rstd_ptr + r)
    # Every program of the row sums the same partials in the same order.
    idx = tl.arange(0, BLOCK_S)
    pmask = idx < S
    partials = psum_ptr + r.to(tl.int64) * 2 * S
    mean_g = tl.sum(tl.load(partials + idx, mask=pmask, other=0.0), axis=0) / M
    mean_gy = tl.sum(tl.load(partials + S + idx, mask=pmask, other=0.0), axis=0) / M
    start = s.to(tl.int64) * CHUNKS * BLOCK
    for i in range(CHUNKS):
        off = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = off < M
        g = tl.load(g_ptr + base + off, mask=mask, other=0.0).to(ACC)
        z = tl.load(z_ptr + base + off, mask=mask, other=0.0).to(ACC)
        yhat = (z - mu) * rs
        grad = rs * (g - mean_g - yhat * mean_gy)
        tl.store(out_ptr + base + off, cast_for_store(grad, out_ptr.dtype.element_ty), mask=mask)


def stacked_batch_norm_stats_forward(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, rstd, var), each (J, C) in the accumulation dtype, of contiguous z."""
    j, c = z.shape[:2]
    rows = j * c
    acc = accumulate_dtype(z.dtype)
    mean, rstd, var = (torch.empty((j, c), dtype=acc, device=z.device) for _ in range(3))
    if rows == 0:
        return mean, rstd, var
    m = z.numel() // rows
    block, per_program, segments = _split(m)
    pmean = torch.empty((rows, segments), dtype=acc, device=z.device)
    pm2 = torch.empty_like(pmean)
    acc_tl = tl_dtype(acc)
    with device_guard(z):
        _stats_partial_kernel[(rows, segments)](
            z, pmean, pm2, m, segments, per_program, BLOCK=block, ACC=acc_tl, num_warps=warps_for(block)
        )
        block_s = triton.next_power_of_2(segments)
        _stats_combine_kernel[(rows,)](
            z,
            pmean,
            pm2,
            mean,
            rstd,
            var,
            m,
            segments,
            per_program * block,
            eps,
            BLOCK_S=block_s,
            ACC=acc_tl,
            num_warps=warps_for(block_s),
        )
    return mean, rstd, var


def stacked_batch_norm_backward(
    grad_yhat: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """grad_z of batch norm without affine; all inputs contiguous."""
    out = torch.empty_like(z, memory_format=torch.contiguous_format)
    j, c = z.shape[:2]
    rows = j * c
    if rows == 0:
        return out
    m = z.numel() // rows
    acc = accumulate_dtype(z.dtype)
    mean = mean.to(acc).contiguous()
    rstd = rstd.to(acc).contiguous()
    block, per_program, segments = _split(m)
    psum = torch.empty((rows, 2, segments), dtype=acc, device=z.device)
    acc_tl = tl_dtype(acc)
    grid = (rows, segments)
    with device_guard(z):
        _backward_partial_kernel[grid](
            grad_yhat,
            z,
            mean,
            rstd,
            psum,
            m,
            segments,
            per_program,
            BLOCK=block,
            ACC=acc_tl,
            num_warps=warps_for(block),
        )
        _backward_apply_kernel[grid](
            grad_yhat,
            z,
            mean,
            rstd,
            psum,
            out,
            m,
            segments,
            per_program,
            BLOCK=block,
            BLOCK_S=triton.next_power_of_2(segments),
            ACC=acc_tl,
            num_warps=warps_for(block),
        )
    return out
