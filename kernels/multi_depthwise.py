"""Triton kernels of multi_depthwise: up to four depthwise convolutions of one
activated input in one launch, and their backward.

Candidate j reaches the kernels through pointer slot Wj with its kernel size Kj,
dilation Dj and activation Aj (the codes of ``fastnas.ops.activations``, 0 is
ReLU; the math is ``csrc/fastnas_math.h``'s) as compile-time constants, so every
tap loop is unrolled. A
program owns one (channel, image) pair and a block of pixels and runs all the
candidates on it, so the input block is fetched from memory once and the taps
of the later candidates hit the cache.

Backward: the input gradient in gather form (each input pixel sums the taps
whose output lands on the stride grid; no atomics); the weights' gradient as
per-program partial sums in a (taps, programs) buffer, then a fixed-order sum
over programs, so reruns are bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastnas.kernels._utils import cast_for_store, device_guard, sum_partials, tl_dtype
from fastnas.ops._common import accumulate_dtype
from fastnas.ops.activations import ELU_ALPHA as _ELU_ALPHA
from fastnas.ops.activations import LEAKY_RELU_SLOPE as _LEAKY_RELU_SLOPE
from fastnas.ops.multi_depthwise import MAX_CANDIDATES_TRITON

# The kernels below are written for this many slots; the op checks the limit.
MAX_SLOTS = MAX_CANDIDATES_TRITON
# Fixed for a given shape, never tuned: the block sets how the weights' gradient
# is split into partial sums, which must not change between runs.
_MAX_BLOCK = 1024


def _block_for(numel: int) -> int:
    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(max(1, numel))))


def _warps_for(block: int) -> int:
    return max(1, min(8, block // 128))


# fastnas.ops.activations' parameters as compile-time constants; the leaky slope as
# its divisor (100), so that float64 kernels do not take it rounded to float32.
ELU_ALPHA = tl.constexpr(_ELU_ALPHA)
LEAKY_RELU_DIVISOR = tl.constexpr(float(round(1 / _LEAKY_RELU_SLOPE)))


@triton.jit
def _apply(v, ACT: tl.constexpr):
    """Activation ACT of v (relu, relu6, elu, leaky_relu, swish, hardswish)."""
    if ACT == 1:
        return tl.minimum(tl.maximum(v, 0.0), 6.0)
    elif ACT == 2:
        return tl.where(v > 0, v, ELU_ALPHA * (tl.exp(v) - 1.0))
    elif ACT == 3:
        return tl.where(v > 0, v, v / LEAKY_RELU_DIVISOR)
    elif ACT == 4:
        return v / (1.0 + tl.exp(-v))
    elif ACT == 5:
        return tl.where(v <= -3.0, 0.0, tl.where(v >= 3.0, v, v * (v + 3.0) / 6.0))
    else:
        return tl.where(v > 0, v, 0.0)


@triton.jit
def _derivative(v, ACT: tl.constexpr):
    """d activation / d pre at v, with PyTorch's choices at the kinks."""
    if ACT == 1:
        return tl.where((v > 0) & (v < 6.0), 1.0, 0.0)
    elif ACT == 2:
        return tl.where(v > 0, 1.0, ELU_ALPHA * tl.exp(v))
    elif ACT == 3:
        return tl.where(v > 0, 1.0, (tl.zeros_like(v) + 1.0) / LEAKY_RELU_DIVISOR)
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-v))
        return s * (1.0 + v * (1.0 - s))
    elif ACT == 5:
        return tl.where(v <= -3.0, 0.0, tl.where(v >= 3.0, 1.0, v / 3.0 + 0.5))
    else:
        return tl.where(v > 0, 1.0, 0.0)


@triton.jit
def _activation(x_base, hi, wi, valid, H, W, mean, rstd, BN: tl.constexpr, ACC: tl.constexpr, ACT: tl.constexpr):
    """act(pre) at (hi, wi), zero where ``valid`` is False (padding or past the block)."""
    xv = tl.load(x_base + hi * W + wi, mask=valid, other=0.0).to(ACC)
    if BN:
        xv = (xv - mean) * rstd
    return tl.where(valid, _apply(xv, ACT), 0.0)


@triton.jit
def _slot_forward(
    x_base, w_ptr, c, ho, wo, inside, H, W, mean, rstd,
    K: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ACT: tl.constexpr,
):  # fmt: skip
    P: tl.constexpr = D * (K - 1) // 2
    acc = tl.zeros([BLOCK], ACC)
    w_base = w_ptr + c * (K * K)
    for u in tl.static_range(K):
        hi = ho * STRIDE - P + u * D
        row_ok = inside & (hi >= 0) & (hi < H)
        for v in tl.static_range(K):
            wi = wo * STRIDE - P + v * D
            ok = row_ok & (wi >= 0) & (wi < W)
            a = _activation(x_base, hi, wi, ok, H, W, mean, rstd, BN, ACC, ACT)
            acc += tl.load(w_base + u * K + v).to(ACC) * a
    return acc


@triton.jit
def _multi_depthwise_forward_kernel(
    x_ptr, out_ptr, mean_ptr, rstd_ptr,
    W0, W1, W2, W3,
    C, N, H, W, Ho, Wo,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    NUM: tl.constexpr, STRIDE: tl.constexpr, SHARED: tl.constexpr, BN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
    A0: tl.constexpr = 0, A1: tl.constexpr = 0, A2: tl.constexpr = 0, A3: tl.constexpr = 0,
):  # fmt: skip
    plane = tl.program_id(0)  # c * N + n
    c = plane // N
    n = plane % N
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < Ho * Wo
    ho = offs // Wo
    wo = offs % Wo
    in_plane = (H * W).to(tl.int64)
    out_plane = (Ho * Wo).to(tl.int64)
    for j in tl.static_range(NUM):
        if SHARED:
            x_base = x_ptr + (n.to(tl.int64) * C + c) * in_plane
        else:
            x_base = x_ptr + ((j * C + c).to(tl.int64) * N + n) * in_plane
        mean = 0.0
        rstd = 1.0
        if BN:
            mean = tl.load(mean_ptr + j * C + c).to(ACC)
            rstd = tl.load(rstd_ptr + j * C + c).to(ACC)
        if j == 0:
            acc = _slot_forward(x_base, W0, c, ho, wo, inside, H, W, mean, rstd, K0, D0, STRIDE, BN, ACC, BLOCK, A0)
        elif j == 1:
            acc = _slot_forward(x_base, W1, c, ho, wo, inside, H, W, mean, rstd, K1, D1, STRIDE, BN, ACC, BLOCK, A1)
        elif j == 2:
            acc = _slot_forward(x_base, W2, c, ho, wo, inside, H, W, mean, rstd, K2, D2, STRIDE, BN, ACC, BLOCK, A2)
        else:
            acc = _slot_forward(x_base, W3, c, ho, wo, inside, H, W, mean, rstd, K3, D3, STRIDE, BN, ACC, BLOCK, A3)
        out_base = out_ptr + ((j * C + c).to(tl.int64) * N + n) * out_plane
        tl.store(out_base + offs, cast_for_store(acc, out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _slot_input_grad(
    g_base, w_ptr, c, h, w, inside, Ho, Wo,
    K: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Input pixel (h, w) is read by tap (u, v) of output (ho, wo) when
    # ho * STRIDE = h + P - u * D, and likewise for columns.
    P: tl.constexpr = D * (K - 1) // 2
    acc = tl.zeros([BLOCK], ACC)
    w_base = w_ptr + c * (K * K)
    for u in tl.static_range(K):
        th = h + P - u * D
        th_ok = th >= 0
        th = tl.where(th_ok, th, 0)
        row_ok = inside & th_ok & (th % STRIDE == 0) & (th // STRIDE < Ho)
        for v in tl.static_range(K):
            tw = w + P - v * D
            tw_ok = tw >= 0
            tw = tl.where(tw_ok, tw, 0)
            ok = row_ok & tw_ok & (tw % STRIDE == 0) & (tw // STRIDE < Wo)
            g = tl.load(g_base + (th // STRIDE) * Wo + tw // STRIDE, mask=ok, other=0.0).to(ACC)
            acc += tl.load(w_base + u * K + v).to(ACC) * g
    return acc


@triton.jit
def _multi_depthwise_input_grad_kernel(
    g_ptr, x_ptr, gx_ptr, mean_ptr, rstd_ptr,
    W0, W1, W2, W3,
    C, N, H, W, Ho, Wo,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    NUM: tl.constexpr, STRIDE: tl.constexpr, SHARED: tl.constexpr, BN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
    A0: tl.constexpr = 0, A1: tl.constexpr = 0, A2: tl.constexpr = 0, A3: tl.constexpr = 0,
):  # fmt: skip
    plane = tl.program_id(0)  # c * N + n
    c = plane // N
    n = plane % N
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < H * W
    h = offs // W
    w = offs % W
    in_plane = (H * W).to(tl.int64)
    out_plane = (Ho * Wo).to(tl.int64)
    total = tl.zeros([BLOCK], ACC)
    if SHARED:
        shared_pre = tl.load(x_ptr + (n.to(tl.int64) * C + c) * in_plane + offs, mask=inside, other=0.0).to(ACC)
    for j in tl.static_range(NUM):
        g_base = g_ptr + ((j * C + c).to(tl.int64) * N + n) * out_plane
        # The activation passes the gradient times its derivative at pre = x or (x - mean) * rstd.
        if SHARED:
            pre = shared_pre
        else:
            base = ((j * C + c).to(tl.int64) * N + n) * in_plane
            pre = tl.load(x_ptr + base + offs, mask=inside, other=0.0).to(ACC)
            if BN:
                pre = (pre - tl.load(mean_ptr + j * C + c).to(ACC)) * tl.load(rstd_ptr + j * C + c).to(ACC)
        if j == 0:
            acc = _slot_input_grad(g_base, W0, c, h, w, inside, Ho, Wo, K0, D0, STRIDE, ACC, BLOCK)
            acc = _derivative(pre, A0) * acc
        elif j == 1:
            acc = _slot_input_grad(g_base, W1, c, h, w, inside, Ho, Wo, K1, D1, STRIDE, ACC, BLOCK)
            acc = _derivative(pre, A1) * acc
        elif j == 2:
            acc = _slot_input_grad(g_base, W2, c, h, w, inside, Ho, Wo, K2, D2, STRIDE, ACC, BLOCK)
            acc = _derivative(pre, A2) * acc
        else:
            acc = _slot_input_grad(g_base, W3, c, h, w, inside, Ho, Wo, K3, D3, STRIDE, ACC, BLOCK)
            acc = _derivative(pre, A3) * acc
        if SHARED:
            total += acc
        else:
            tl.store(gx_ptr + base + offs, cast_for_store(acc, gx_ptr.dtype.element_ty), mask=inside)
    if SHARED:
        base = (n.to(tl.int64) * C + c) * in_plane
        tl.store(gx_ptr + base + offs, cast_for_store(total, gx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _slot_weight_grad(
    x_base, g, rows, num_cols, ho, wo, inside, H, W, mean, rstd,
    K: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, ACT: tl.constexpr,
):  # fmt: skip
    # This program's share of d loss / d w[c, u, v], one partial per tap.
    P: tl.constexpr = D * (K - 1) // 2
    for u in tl.static_range(K):
        hi = ho * STRIDE - P + u * D
        row_ok = inside & (hi >= 0) & (hi < H)
        for v in tl.static_range(K):
            wi = wo * STRIDE - P + v * D
            ok = row_ok & (wi >= 0) & (wi < W)
            a = _activation(x_base, hi, wi, ok, H, W, mean, rstd, BN, ACC, ACT)
            tl.store(rows + (u * K + v) * num_cols, tl.sum(g * a, axis=0))


@triton.jit
def _multi_depthwise_weight_grad_kernel(
    g_ptr, x_ptr, part_ptr, mean_ptr, rstd_ptr,
    C, N, H, W, Ho, Wo, num_cols,
    R0, R1, R2, R3,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    NUM: tl.constexpr, STRIDE: tl.constexpr, SHARED: tl.constexpr, BN: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
    A0: tl.constexpr = 0, A1: tl.constexpr = 0, A2: tl.constexpr = 0, A3: tl.constexpr = 0,
):  # fmt: skip
    # Partials laid out (rows, num_cols): slot j's rows start at Rj and hold
    # (c, u, v) in the weights' order; the column is (n, block).
    plane = tl.program_id(0)  # c * N + n
    blk = tl.program_id(1)
    c = plane // N
    n = plane % N
    col = n.to(tl.int64) * tl.num_programs(1) + blk
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < Ho * Wo
    ho = offs // Wo
    wo = offs % Wo
    in_plane = (H * W).to(tl.int64)
    out_plane = (Ho * Wo).to(tl.int64)
    for j in tl.static_range(NUM):
        if SHARED:
            x_base = x_ptr + (n.to(tl.int64) * C + c) * in_plane
        else:
            x_base = x_ptr + ((j * C + c).to(tl.int64) * N + n) * in_plane
        mean = 0.0
        rstd = 1.0
        if BN:
            mean = tl.load(mean_ptr + j * C + c).to(ACC)
            rstd = tl.load(rstd_ptr + j * C + c).to(ACC)
        g = tl.load(g_ptr + ((j * C + c).to(tl.int64) * N + n) * out_plane + offs, mask=inside, other=0.0).to(ACC)
        if j == 0:
            rows = part_ptr + (R0 + c * (K0 * K0)).to(tl.int64) * num_cols + col
            _slot_weight_grad(x_base, g, rows, num_cols, ho, wo, inside, H, W, mean, rstd, K0, D0, STRIDE, BN, ACC, A0)
        elif j == 1:
            rows = part_ptr + (R1 + c * (K1 * K1)).to(tl.int64) * num_cols + col
            _slot_weight_grad(x_base, g, rows, num_cols, ho, wo, inside, H, W, mean, rstd, K1, D1, STRIDE, BN, ACC, A1)
        elif j == 2:
            rows = part_ptr + (R2 + c * (K2 * K2)).to(tl.int64) * num_cols + col
            _slot_weight_grad(x_base, g, rows, num_cols, ho, wo, inside, H, W, mean, rstd, K2, D2, STRIDE, BN, ACC, A2)
        else:
            rows = part_ptr + (R3 + c * (K3 * K3)).to(tl.int64) * num_cols + col
            _slot_weight_grad(x_base, g, rows, num_cols, ho, wo, inside, H, W, mean, rstd, K3, D3, STRIDE, BN, ACC, A3)


def _slots(weights, dilations, activations=None):
    """Kernel arguments of the pointer slots: unused slots repeat slot 0 with a 1x1 kernel.
    The activation codes go as keyword constants A0..A3 (ReLU, 0, where absent)."""
    ptrs = list(weights) + [weights[0]] * (MAX_SLOTS - len(weights))
    ks = [w.shape[-1] for w in weights] + [1] * (MAX_SLOTS - len(weights))
    ds = list(dilations) + [1] * (MAX_SLOTS - len(weights))
    codes = list(activations or []) or [0] * len(weights)
    acts = {f"A{j}": int(a) for j, a in enumerate(codes)}
    return ptrs, ks, ds, acts


def _shape(x: torch.Tensor, stride: int):
    shared = x.dim() == 4
    if shared:
        n, c, h, w = x.shape
    else:
        _, c, n, h, w = x.shape
    return shared, n, c, h, w, (h - 1) // stride + 1, (w - 1) // stride + 1


def multi_depthwise_forward(x, weights, dilations, stride, mean=None, rstd=None, activations=None) -> torch.Tensor:
    shared, n, c, h, w, ho, wo = _shape(x, stride)
    out = torch.empty((len(weights), c, n, ho, wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    ptrs, ks, ds, acts = _slots(weights, dilations, activations)
    block = _block_for(ho * wo)
    bn = mean is not None
    grid = (c * n, triton.cdiv(ho * wo, block))
    with device_guard(x):
        _multi_depthwise_forward_kernel[grid](
            x, out, mean if bn else x, rstd if bn else x,
            *ptrs, c, n, h, w, ho, wo, *ks, *ds,
            NUM=len(weights), STRIDE=stride, SHARED=shared, BN=bn,
            ACC=tl_dtype(accumulate_dtype(x.dtype)), BLOCK=block, num_warps=_warps_for(block), **acts,
        )  # fmt: skip
    return out


def multi_depthwise_backward(
    grad_out, x, weights, dilations, stride, mean=None, rstd=None, input_need_grad=True, activations=None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    shared, n, c, h, w, ho, wo = _shape(x, stride)
    ptrs, ks, ds, acts = _slots(weights, dilations, activations)
    bn = mean is not None
    acc_dtype = accumulate_dtype(x.dtype)
    acc = tl_dtype(acc_dtype)
    mean_arg, rstd_arg = (mean, rstd) if bn else (x, x)
    meta = dict(NUM=len(weights), STRIDE=stride, SHARED=shared, BN=bn, ACC=acc, **acts)

    grad_pre = torch.empty_like(x) if input_need_grad else x.new_empty(0)
    if input_need_grad and grad_pre.numel():
        block = _block_for(h * w)
        with device_guard(x):
            _multi_depthwise_input_grad_kernel[(c * n, triton.cdiv(h * w, block))](
                grad_out, x, grad_pre, mean_arg, rstd_arg, *ptrs, c, n, h, w, ho, wo, *ks, *ds,
                BLOCK=block, num_warps=_warps_for(block), **meta,
            )  # fmt: skip

    taps = [k * k for k in ks[: len(weights)]]
    starts = [c * sum(taps[:j]) for j in range(len(weights))]
    starts += [0] * (MAX_SLOTS - len(starts))
    rows = c * sum(taps)
    block = _block_for(ho * wo)
    blocks = triton.cdiv(ho * wo, block) if ho * wo else 0
    num_cols = n * blocks
    partials = torch.empty((rows, num_cols), dtype=acc_dtype, device=x.device)
    if num_cols and rows:
        with device_guard(x):
            _multi_depthwise_weight_grad_kernel[(c * n, blocks)](
                grad_out, x, partials, mean_arg, rstd_arg, c, n, h, w, ho, wo, num_cols, *starts, *ks, *ds,
                BLOCK=block, num_warps=_warps_for(block), **meta,
            )  # fmt: skip
    flat = sum_partials(partials, weights[0].dtype)
    grad_ws = []
    for j, wt in enumerate(weights):
        k = wt.shape[-1]
        # Separate tensors: the op's outputs must not alias one another.
        grad_ws.append(flat[starts[j] : starts[j] + c * k * k].view(c, 1, k, k).clone())
    return grad_pre, grad_ws
