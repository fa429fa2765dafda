"""Triton kernels of partial_channel_mixed_sum, the PC-DARTS edge in one pass.

``out = channel_shuffle(cat([sum_k weights[k] * xs[k], pool?(bypass)], 1), groups)``.

Each program owns one block of one (n, c) row of the concatenation, c in
concatenation order, so whether it is a mixed or a bypass row is one branch
per program; it reads that row once and writes it straight to its shuffled
position, output channel ``(c % (C // groups)) * groups + c // (C // groups)``.
The 2x2 max pool keeps PyTorch's choice: the first maximum in row-major
window order, or the last NaN, which backward recomputes instead of storing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnas.kernels._utils import (
    all_aligned,
    cast_for_store,
    device_guard,
    load_pointer,
    pointer_table,
    sum_partials,
    take_if_greater,
    tl_dtype,
    warps_for,
)
from fastnas.ops._common import accumulate_dtype

# Rows longer than this are split across programs; the split is a function of
# the shape alone, so the weights' partial sums are reproducible.
_MAX_BLOCK = 1024


@triton.jit
def _row_coordinates(C, Cp, C_per_group, groups, HW, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    n = row // C
    c = row - n * C
    c_out = (c % C_per_group) * groups + c // C_per_group
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    out_row = (n.to(tl.int64) * C + c_out) * HW
    return n, c, out_row, hw, hw < HW


@triton.jit
def _window(bypass_ptr, n, cb, Cb, HW, W, hw, mask, ACC: tl.constexpr):
    """The four values of each 2x2 window (row-major) in ACC, and their offsets."""
    h = hw // W
    w = hw - h * W
    base = bypass_ptr + (n.to(tl.int64) * Cb + cb) * (4 * HW)
    i0 = (2 * h) * (2 * W) + 2 * w
    i1 = i0 + 1
    i2 = i0 + 2 * W
    i3 = i2 + 1
    v0 = tl.load(base + i0, mask=mask, other=0.0).to(ACC)
    v1 = tl.load(base + i1, mask=mask, other=0.0).to(ACC)
    v2 = tl.load(base + i2, mask=mask, other=0.0).to(ACC)
    v3 = tl.load(base + i3, mask=mask, other=0.0).to(ACC)
    return v0, v1, v2, v3, i0, i1, i2, i3


@triton.jit
def _partial_channel_forward_kernel(
    x_table,
    w_ptr,
    bypass_ptr,
    out_ptr,
    K,
    C,
    Cp,
    Cb,
    C_per_group,
    groups,
    HW,
    W,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    POOL: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    n, c, out_row, hw, mask = _row_coordinates(C, Cp, C_per_group, groups, HW, BLOCK)
    if c < Cp:
        in_row = (n.to(tl.int64) * Cp + c) * HW
        acc = tl.zeros([BLOCK], ACC)
        for k in range(K):
            x_ptr = load_pointer(x_table, k, out_ptr.dtype.element_ty, ALIGNED)
            w = tl.load(w_ptr + k).to(ACC)
            acc += w * tl.load(x_ptr + in_row + hw, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + out_row + hw, cast_for_store(acc, out_ptr.dtype.element_ty), mask=mask)
    else:
        cb = c - Cp
        if POOL:
            v0, v1, v2, v3, i0, i1, i2, i3 = _window(bypass_ptr, n, cb, Cb, HW, W, hw, mask, ACC)
            best, arg = take_if_greater(v0, i0, v1, i1)
            best, arg = take_if_greater(best, arg, v2, i2)
            best, arg = take_if_greater(best, arg, v3, i3)
            tl.store(out_ptr + out_row + hw, cast_for_store(best, out_ptr.dtype.element_ty), mask=mask)
        else:
            in_row = (n.to(tl.int64) * Cb + cb) * HW
            v = tl.load(bypass_ptr + in_row + hw, mask=mask)
            tl.store(out_ptr + out_row + hw, v, mask=mask)


@triton.jit
def _partial_channel_backward_kernel(
    grad_ptr,
    table,
    x_like_ptr,
    w_ptr,
    partial_ptr,
    bypass_ptr,
    grad_bypass_ptr,
    num_x,
    num_grad_x,
    num_partials,
    C,
    Cp,
    Cb,
    C_per_group,
    groups,
    HW,
    W,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    POOL: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_BYPASS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # table: num_x input pointers, num_grad_x gradient pointers, then the index
    # k of the input each gradient belongs to.
    n, c, out_row, hw, mask = _row_coordinates(C, Cp, C_per_group, groups, HW, BLOCK)
    if c < Cp:
        in_row = (n.to(tl.int64) * Cp + c) * HW
        g = tl.load(grad_ptr + out_row + hw, mask=mask, other=0.0).to(ACC)
        for j in range(num_grad_x):
            k = tl.load(table + num_x + num_grad_x + j)
            w = tl.load(w_ptr + k).to(ACC)
            gx_ptr = load_pointer(table, num_x + j, grad_ptr.dtype.element_ty, ALIGNED)
            tl.store(gx_ptr + in_row + hw, cast_for_store(w * g, grad_ptr.dtype.element_ty), mask=mask)
        if NEED_W:
            # One partial per (n, c, block) of the mixed channels, laid out
            # (K, partials) so the second stage reads each row contiguously.
            partial = partial_ptr + (n * Cp + c) * tl.num_programs(1) + tl.program_id(1)
            for k in range(num_x):
                x_ptr = load_pointer(table, k, x_like_ptr.dtype.element_ty, ALIGNED)
                x = tl.load(x_ptr + in_row + hw, mask=mask, other=0.0).to(ACC)
                tl.store(partial, tl.sum(g * x, axis=0))
                partial += num_partials
    else:
        if NEED_BYPASS:
            cb = c - Cp
            grad_row = tl.load(grad_ptr + out_row + hw, mask=mask, other=0.0)
            if POOL:
                v0, v1, v2, v3, i0, i1, i2, i3 = _window(bypass_ptr, n, cb, Cb, HW, W, hw, mask, ACC)
                best, arg = take_if_greater(v0, i0, v1, i1)
                best, arg = take_if_greater(best, arg, v2, i2)
                best, arg = take_if_greater(best, arg, v3, i3)
                base = grad_bypass_ptr + (n.to(tl.int64) * Cb + cb) * (4 * HW)
                # The four windows' cells tile the input exactly: no memset needed.
                tl.store(base + i0, tl.where(arg == i0, grad_row, 0.0), mask=mask)
                tl.store(base + i1, tl.where(arg == i1, grad_row, 0.0), mask=mask)
                tl.store(base + i2, tl.where(arg == i2, grad_row, 0.0), mask=mask)
                tl.store(base + i3, tl.where(arg == i3, grad_row, 0.0), mask=mask)
            else:
                in_row = (n.to(tl.int64) * Cb + cb) * HW
                tl.store(grad_bypass_ptr + in_row + hw, grad_row, mask=mask)


def _launch_shape(n: int, c: int, hw: int) -> tuple[tuple[int, int], int]:
    block = min(_MAX_BLOCK, triton.next_power_of_2(hw))
    return (n * c, triton.cdiv(hw, block)), block


def partial_channel_mixed_sum_forward(
    xs: list[torch.Tensor], weights: torch.Tensor, bypass: torch.Tensor, groups: int, bypass_pool: bool
) -> torch.Tensor:
    x0 = xs[0]
    n, cp, h, w = x0.shape
    cb = bypass.shape[1]
    c = cp + cb
    out = x0.new_empty((n, c, h, w))
    if out.numel() == 0:
        return out
    grid, block = _launch_shape(n, c, h * w)
    with device_guard(x0):
        _partial_channel_forward_kernel[grid](
            pointer_table(x0.device, xs),
            weights,
            bypass,
            out,
            len(xs),
            c,
            cp,
            cb,
            c // groups,
            groups,
            h * w,
            w,
            BLOCK=block,
            ACC=tl_dtype(accumulate_dtype(x0.dtype)),
            POOL=bool(bypass_pool),
            ALIGNED=all_aligned(xs),
            num_warps=warps_for(block),
        )
    return out


def partial_channel_mixed_sum_backward(
    grad_out: torch.Tensor,
    xs: list[torch.Tensor],
    weights: torch.Tensor,
    bypass: torch.Tensor,
    groups: int,
    bypass_pool: bool,
    xs_need_grad: list[bool],
    weights_need_grad: bool,
    bypass_need_grad: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    n, c, h, w = grad_out.shape
    cb = bypass.shape[1]
    cp = c - cb
    grad_index = [k for k, need in enumerate(xs_need_grad) if need]
    grad_xs = [grad_out.new_empty((n, cp, h, w)) for _ in grad_index]
    if not weights_need_grad:
        xs = []
    # Unless the pool's argmax is wanted, bypass may be a zero-stride stand-in
    # that only carries the shape: never read it then.
    read_bypass = bypass_need_grad and bypass_pool
    if read_bypass:
        bypass = bypass.contiguous()
    grad_bypass = grad_out.new_empty(tuple(bypass.shape) if bypass_need_grad else (0,))
    grid, block = _launch_shape(n, c, h * w)
    num_partials = n * cp * grid[1]
    acc_dtype = accumulate_dtype(xs[0].dtype if xs else grad_out.dtype)
    partials = torch.empty((len(xs), num_partials), dtype=acc_dtype, device=grad_out.device)
    if grad_out.numel() and (grad_xs or xs or bypass_need_grad):
        with device_guard(grad_out):
            _partial_channel_backward_kernel[grid](
                grad_out,
                pointer_table(grad_out.device, xs + grad_xs, grad_index),
                xs[0] if xs else grad_out,
                weights,
                partials,
                bypass if read_bypass else grad_out,
                grad_bypass if bypass_need_grad else grad_out,
                len(xs),
                len(grad_xs),
                num_partials,
                c,
                cp,
                cb,
                c // groups,
                groups,
                h * w,
                w,
                BLOCK=block,
                ACC=tl_dtype(acc_dtype),
                POOL=bool(bypass_pool),
                NEED_W=bool(xs),
                NEED_BYPASS=bool(bypass_need_grad),
                ALIGNED=all_aligned(xs + grad_xs),
                num_warps=warps_for(block),
            )
    grad_w = sum_partials(partials, weights.dtype) if weights_need_grad else weights.new_empty(0)
    return grad_xs, grad_w, grad_bypass
