"""Pieces shared by the Triton kernels: pointer tables, rounding, the max-pool rule, the weights' reduction."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Bytes of alignment that lets the compiler vectorise loads through a pointer
# read from a table, which it otherwise cannot prove aligned.
_VECTOR_ALIGN = 16

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def all_aligned(tensors) -> bool:
    return all(t.data_ptr() % _VECTOR_ALIGN == 0 for t in tensors)


def pointer_table(device: torch.device, tensors=(), ints=()) -> torch.Tensor:
    """An int64 tensor on ``device``: the tensors' data pointers, then ``ints``.

    On CUDA it goes through pinned memory with a non-blocking copy: a plain
    ``torch.tensor(..., device="cuda")`` would synchronise the host with the
    stream on every call.
    """
    values = [t.data_ptr() for t in tensors] + [int(i) for i in ints]
    if device.type == "cuda":
        host = torch.tensor(values, dtype=torch.int64, pin_memory=True)
        return host.to(device, non_blocking=True)
    return torch.tensor(values, dtype=torch.int64, device=device)


def device_guard(t: torch.Tensor):
    """Triton launches on the current device; make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def warps_for(block: int) -> int:
    """About eight elements a thread: enough in flight to cover memory latency."""
    return max(1, min(8, block // 256))


@triton.jit
def row_block_offsets(pid, BLOCK: tl.constexpr):
    """int64 offsets of block ``pid``: tensors past 2**31 elements stay addressable."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def load_pointer(table, index, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(table + index).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def cast_for_store(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)`` rounding to nearest even.

    bfloat16 is rounded by hand: the hardware conversion rounds to nearest even,
    but the interpreter truncates, and the CPU tests must see the GPU's numbers.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # The carry above can turn a NaN into an infinity: write a quiet NaN.
        bits = tl.where(x == x, bits, 0x7FC0)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def max_pool_takes(v, best):
    """PyTorch's max-pool rule, scanning a window in row-major order: ``v`` replaces the
    maximum so far when it is strictly greater or NaN (so ties go to the first
    maximum, and the last NaN wins)."""
    return (v > best) | (v != v)


@triton.jit
def take_if_greater(best, arg, v, i):
    """One step of the max-pool scan: the new (maximum, argmax) after element ``v`` at ``i``."""
    take = max_pool_takes(v, best)
    return tl.where(take, v, best), tl.where(take, i, arg)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, num_partials, BLOCK: tl.constexpr):
    # One program per weight; partials of weight k are contiguous, summed in a
    # fixed order so the gradient is bit-identical from run to run.
    k = tl.program_id(0)
    base = partial_ptr + k.to(tl.int64) * num_partials
    acc = tl.zeros([BLOCK], partial_ptr.dtype.element_ty)
    for start in range(0, num_partials, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(base + idx, mask=idx < num_partials, other=0.0)
    tl.store(out_ptr + k, cast_for_store(tl.sum(acc, axis=0), out_ptr.dtype.element_ty))


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row sums of the (K, P) partial dot products, as a (K,) tensor of ``dtype``."""
    k, p = partials.shape
    out = torch.empty((k,), dtype=dtype, device=partials.device)
    if k == 0:
        return out
    if p == 0:
        return out.zero_()
    block = min(1024, triton.next_power_of_2(p))
    with device_guard(partials):
        _sum_partials_kernel[(k,)](partials, out, p, BLOCK=block, num_warps=warps_for(block))
    return out
