"""Triton kernels of mixed_sum: ``out = sum_k weights[k] * xs[k]`` and its gradients.

The K inputs are reached through a device-side table of their data pointers,
so each is read once where it lies and nothing is stacked into a K-times
larger tensor.
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
    row_block_offsets,
    sum_partials,
    tl_dtype,
)
from fastnas.ops._common import accumulate_dtype

_FORWARD_BLOCK = 1024
_FORWARD_WARPS = 4
# Fixed, never tuned: it sets how the weights' gradient is split into partial
# sums, which must not change between runs for the gradient to be reproducible.
_BACKWARD_BLOCK = 2048
_BACKWARD_WARPS = 8


@triton.jit
def _mixed_sum_forward_kernel(
    x_table,
    w_ptr,
    out_ptr,
    numel,
    K,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    offs = row_block_offsets(tl.program_id(0), BLOCK)
    mask = offs < numel
    acc = tl.zeros([BLOCK], ACC)
    for k in range(K):
        x_ptr = load_pointer(x_table, k, out_ptr.dtype.element_ty, ALIGNED)
        w = tl.load(w_ptr + k).to(ACC)
        acc += w * tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, cast_for_store(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixed_sum_backward_kernel(
    grad_ptr,
    table,
    x_like_ptr,
    w_ptr,
    partial_ptr,
    numel,
    num_x,
    num_grad_x,
    num_programs,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
    NEED_W: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # table: num_x input pointers, num_grad_x gradient pointers, then the index
    # k of the input each gradient belongs to.
    pid = tl.program_id(0)
    offs = row_block_offsets(pid, BLOCK)
    mask = offs < numel
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    for j in range(num_grad_x):
        k = tl.load(table + num_x + num_grad_x + j)
        w = tl.load(w_ptr + k).to(ACC)
        gx_ptr = load_pointer(table, num_x + j, grad_ptr.dtype.element_ty, ALIGNED)
        tl.store(gx_ptr + offs, cast_for_store(w * g, grad_ptr.dtype.element_ty), mask=mask)
    if NEED_W:
        # Laid out (K, programs) so the second stage reads each row contiguously.
        partial = partial_ptr + pid
        for k in range(num_x):
            x_ptr = load_pointer(table, k, x_like_ptr.dtype.element_ty, ALIGNED)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(partial, tl.sum(g * x, axis=0))
            partial += num_programs


def mixed_sum_forward(xs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    x0 = xs[0]
    out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    numel = x0.numel()
    if numel == 0:
        return out
    table = pointer_table(x0.device, xs)
    grid = (triton.cdiv(numel, _FORWARD_BLOCK),)
    with device_guard(x0):
        _mixed_sum_forward_kernel[grid](
            table,
            weights,
            out,
            numel,
            len(xs),
            BLOCK=_FORWARD_BLOCK,
            ACC=tl_dtype(accumulate_dtype(x0.dtype)),
            ALIGNED=all_aligned(xs),
            num_warps=_FORWARD_WARPS,
        )
    return out


def mixed_sum_backward(
    grad_out: torch.Tensor,
    xs: list[torch.Tensor],
    weights: torch.Tensor,
    xs_need_grad: list[bool],
    weights_need_grad: bool,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    grad_index = [k for k, need in enumerate(xs_need_grad) if need]
    grad_xs = [torch.empty_like(grad_out, memory_format=torch.contiguous_format) for _ in grad_index]
    if not weights_need_grad:
        xs = []
    numel = grad_out.numel()
    num_programs = triton.cdiv(numel, _BACKWARD_BLOCK)
    acc_dtype = accumulate_dtype(xs[0].dtype if xs else grad_out.dtype)
    partials = torch.empty((len(xs), num_programs), dtype=acc_dtype, device=grad_out.device)
    if numel and (grad_xs or xs):
        table = pointer_table(grad_out.device, xs + grad_xs, grad_index)
        with device_guard(grad_out):
            _mixed_sum_backward_kernel[(num_programs,)](
                grad_out,
                table,
                xs[0] if xs else grad_out,
                weights,
                partials,
                numel,
                len(xs),
                len(grad_xs),
                num_programs,
                BLOCK=_BACKWARD_BLOCK,
                ACC=tl_dtype(acc_dtype),
                NEED_W=bool(xs),
                ALIGNED=all_aligned(xs + grad_xs),
                num_warps=_BACKWARD_WARPS,
            )
    grad_w = sum_partials(partials, weights.dtype) if weights_need_grad else weights.new_empty(0)
    return grad_xs, grad_w
