"""Triton kernels of partial_channel_node_sum, a whole PC-DARTS node in one pass.

``out = sum_e weights[e] * channel_shuffle(cat([mixed[e], P_e(bypass[e])], 1), groups)``.

Each program owns one block of one (n, output channel) row, so it writes its
output once and in sequence. The concatenation channel behind output channel
``oc`` is ``(oc % groups) * (C // groups) + oc // groups``: the row comes
either from the mixed halves, a weighted sum of E contiguous rows, or from the
bypass halves, each read through its own strides (bypass[e] is usually the
view h_e[:, Cp:]) and max-pooled 2x2 where strides[e] == 2 with PyTorch's
rule: the first maximum in row-major window order, or the last NaN.

The E edges reach the kernels through one int64 table on the device:
  [0, E)   mixed pointers         [E, 2E)  bypass pointers
  [2E, 3E) grad mixed pointers    [3E, 4E) grad bypass pointers (0: not wanted)
  [4E, 5E) pooling strides        [5E, 9E) bypass strides n, c, h, w (elements)
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

_MAX_BLOCK = 1024


@triton.jit
def _coordinates(C, Cp, C_per_group, groups, HW, W, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    n = row // C
    oc = row - n * C
    c = (oc % groups) * C_per_group + oc // groups
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    h = hw // W
    x = hw - h * W
    return n, c, row.to(tl.int64) * HW, hw, h, x, hw < HW


@triton.jit
def _bypass_values(table, e, E, n, cb, h, x, mask, DTYPE: tl.constexpr, ACC: tl.constexpr):
    """P_e(bypass[e]) at (n, cb, h, x) in ACC, and the pooling argmax (0..3; 0 on stride-1 edges)."""
    ptr = load_pointer(table, E + e, DTYPE, False)
    stride = tl.load(table + 4 * E + e)
    sn = tl.load(table + 5 * E + e)
    sc = tl.load(table + 6 * E + e)
    sh = tl.load(table + 7 * E + e)
    sw = tl.load(table + 8 * E + e)
    base = ptr + n.to(tl.int64) * sn + cb.to(tl.int64) * sc
    arg = tl.zeros(h.shape, tl.int32)
    if stride == 1:
        v = tl.load(base + h * sh + x * sw, mask=mask, other=0.0).to(ACC)
    else:
        top = base + (2 * h) * sh + (2 * x) * sw
        v = tl.load(top, mask=mask, other=0.0).to(ACC)
        v, arg = take_if_greater(v, arg, tl.load(top + sw, mask=mask, other=0.0).to(ACC), 1)
        v, arg = take_if_greater(v, arg, tl.load(top + sh, mask=mask, other=0.0).to(ACC), 2)
        v, arg = take_if_greater(v, arg, tl.load(top + sh + sw, mask=mask, other=0.0).to(ACC), 3)
    return v, arg, stride


@triton.jit
def _scatter_pool_grad(
    table, e, E, grad, arg, n, cb, Cb, HW, W, h, x, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr
):
    """grad at each 2x2 window's argmax of the contiguous (2H, 2W) plane, zeros elsewhere.

    The windows tile the plane, so every element of it is written.
    """
    gb_ptr = load_pointer(table, 3 * E + e, DTYPE, ALIGNED)
    top = gb_ptr + (n.to(tl.int64) * Cb + cb) * (4 * HW) + (2 * h) * (2 * W) + 2 * x
    gv = cast_for_store(grad, DTYPE)
    tl.store(top, tl.where(arg == 0, gv, 0.0), mask=mask)
    tl.store(top + 1, tl.where(arg == 1, gv, 0.0), mask=mask)
    tl.store(top + 2 * W, tl.where(arg == 2, gv, 0.0), mask=mask)
    tl.store(top + 2 * W + 1, tl.where(arg == 3, gv, 0.0), mask=mask)


@triton.jit
def _node_forward_kernel(
    table,
    w_ptr,
    out_ptr,
    E,
    C,
    Cp,
    C_per_group,
    groups,
    HW,
    W,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    n, c, out_row, hw, h, x, mask = _coordinates(C, Cp, C_per_group, groups, HW, W, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    if c < Cp:
        in_row = (n.to(tl.int64) * Cp + c) * HW
        for e in range(E):
            m_ptr = load_pointer(table, e, DTYPE, ALIGNED)
            w = tl.load(w_ptr + e).to(ACC)
            acc += w * tl.load(m_ptr + in_row + hw, mask=mask, other=0.0).to(ACC)
    else:
        for e in range(E):
            v, arg, stride = _bypass_values(table, e, E, n, c - Cp, h, x, mask, DTYPE, ACC)
            acc += tl.load(w_ptr + e).to(ACC) * v
    tl.store(out_ptr + out_row + hw, cast_for_store(acc, DTYPE), mask=mask)


@triton.jit
def _node_backward_kernel(
    grad_ptr,
    table,
    w_ptr,
    partial_ptr,
    E,
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
    NEED_W: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    DTYPE: tl.constexpr = grad_ptr.dtype.element_ty
    n, c, out_row, hw, h, x, mask = _coordinates(C, Cp, C_per_group, groups, HW, W, BLOCK)
    g = tl.load(grad_ptr + out_row + hw, mask=mask, other=0.0).to(ACC)
    # One partial per program and edge, laid out (E, programs) so the second
    # stage reads each edge's partials contiguously.
    partial = partial_ptr + tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    if c < Cp:
        in_row = (n.to(tl.int64) * Cp + c) * HW
        for e in range(E):
            w = tl.load(w_ptr + e).to(ACC)
            if tl.load(table + 2 * E + e) != 0:
                gm_ptr = load_pointer(table, 2 * E + e, DTYPE, ALIGNED)
                tl.store(gm_ptr + in_row + hw, cast_for_store(w * g, DTYPE), mask=mask)
            if NEED_W:
                m_ptr = load_pointer(table, e, DTYPE, ALIGNED)
                v = tl.load(m_ptr + in_row + hw, mask=mask, other=0.0).to(ACC)
                tl.store(partial + e * num_partials, tl.sum(g * v, axis=0))
    else:
        cb = c - Cp
        for e in range(E):
            w = tl.load(w_ptr + e).to(ACC)
            want_grad = tl.load(table + 3 * E + e) != 0
            stride = tl.load(table + 4 * E + e)
            pooled_grad = want_grad & (stride == 2)
            if NEED_W:
                v, arg, stride = _bypass_values(table, e, E, n, cb, h, x, mask, DTYPE, ACC)
                tl.store(partial + e * num_partials, tl.sum(g * v, axis=0))
                if pooled_grad:
                    _scatter_pool_grad(table, e, E, w * g, arg, n, cb, Cb, HW, W, h, x, mask, DTYPE, ALIGNED)
            else:
                if pooled_grad:
                    v, arg, stride = _bypass_values(table, e, E, n, cb, h, x, mask, DTYPE, ACC)
                    _scatter_pool_grad(table, e, E, w * g, arg, n, cb, Cb, HW, W, h, x, mask, DTYPE, ALIGNED)
            if want_grad & (stride == 1):
                gb_ptr = load_pointer(table, 3 * E + e, DTYPE, ALIGNED)
                tl.store(gb_ptr + (n.to(tl.int64) * Cb + cb) * HW + hw, cast_for_store(w * g, DTYPE), mask=mask)


def _launch_shape(n: int, c: int, hw: int) -> tuple[tuple[int, int], int]:
    block = min(_MAX_BLOCK, triton.next_power_of_2(hw))
    return (n * c, triton.cdiv(hw, block)), block


def _table(device, mixed, bypass, strides, grad_mixed_ptrs=None, grad_bypass_ptrs=None) -> torch.Tensor:
    e = len(mixed)
    ints = list(grad_mixed_ptrs or [0] * e) + list(grad_bypass_ptrs or [0] * e) + [int(s) for s in strides]
    for dim in range(4):
        ints += [b.stride(dim) for b in bypass]
    return pointer_table(device, list(mixed) + list(bypass), ints)


def partial_channel_node_sum_forward(
    mixed: list[torch.Tensor], bypass: list[torch.Tensor], weights: torch.Tensor, groups: int, strides: list[int]
) -> torch.Tensor:
    """mixed contiguous (N, Cp, H, W); bypass any strides; returns (N, Cp + Cb, H, W)."""
    m0 = mixed[0]
    n, cp, h, w = m0.shape
    c = cp + bypass[0].shape[1]
    out = m0.new_empty((n, c, h, w))
    if out.numel() == 0:
        return out
    grid, block = _launch_shape(n, c, h * w)
    with device_guard(m0):
        _node_forward_kernel[grid](
            _table(m0.device, mixed, bypass, strides),
            weights,
            out,
            len(mixed),
            c,
            cp,
            c // groups,
            groups,
            h * w,
            w,
            BLOCK=block,
            ACC=tl_dtype(accumulate_dtype(m0.dtype)),
            ALIGNED=all_aligned(mixed),
            num_warps=warps_for(block),
        )
    return out


def partial_channel_node_sum_backward(
    grad_out: torch.Tensor,
    mixed: list[torch.Tensor],
    bypass: list[torch.Tensor],
    weights: torch.Tensor,
    groups: int,
    strides: list[int],
    mixed_need_grad: list[bool],
    bypass_need_grad: list[bool],
    weights_need_grad: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """grad_out contiguous; mixed contiguous when weights_need_grad, else shape-only stand-ins."""
    n, c, h, w = grad_out.shape
    cb = bypass[0].shape[1]
    cp = c - cb
    num_e = len(mixed)
    grad_mixed = [grad_out.new_empty((n, cp, h, w)) if need else None for need in mixed_need_grad]
    grad_bypass = [grad_out.new_empty(tuple(b.shape)) if need else None for b, need in zip(bypass, bypass_need_grad)]
    grid, block = _launch_shape(n, c, h * w)
    num_partials = grid[0] * grid[1]
    acc_dtype = accumulate_dtype(grad_out.dtype)
    partials = torch.empty((num_e if weights_need_grad else 0, num_partials), dtype=acc_dtype, device=grad_out.device)
    wanted = [t for t in grad_mixed + grad_bypass if t is not None]
    if grad_out.numel() and (wanted or weights_need_grad):
        with device_guard(grad_out):
            _node_backward_kernel[grid](
                grad_out,
                _table(
                    grad_out.device,
                    mixed,
                    bypass,
                    strides,
                    [t.data_ptr() if t is not None else 0 for t in grad_mixed],
                    [t.data_ptr() if t is not None else 0 for t in grad_bypass],
                ),
                weights,
                partials,
                num_e,
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
                NEED_W=bool(weights_need_grad),
                ALIGNED=all_aligned(wanted + (list(mixed) if weights_need_grad else [])),
                num_warps=warps_for(block),
            )
    grad_w = sum_partials(partials, weights.dtype) if weights_need_grad else weights.new_empty(0)
    return [t for t in grad_mixed if t is not None], [t for t in grad_bypass if t is not None], grad_w
