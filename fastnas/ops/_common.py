"""Argument checks and autograd plumbing shared by the fused ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Upper bound on the candidates summed in one call: the CUDA kernels take the
# input pointers as a kernel argument, whose size is bounded.
MAX_INPUTS = 128

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


def check_inputs(op: str, xs, weights) -> list[torch.Tensor]:
    """Validate ``xs`` and ``weights`` of a weighted sum; return xs as a list."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{op}: xs must be a list or tuple of tensors, got {type(xs).__name__}")
    xs = list(xs)
    if not xs:
        raise ValueError(f"{op}: xs is empty; it needs at least one tensor")
    if len(xs) > MAX_INPUTS:
        raise ValueError(f"{op}: xs has {len(xs)} tensors; at most {MAX_INPUTS} are supported per call")
    for k, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: xs[{k}] is a {type(x).__name__}, not a tensor")
    x0 = xs[0]
    if x0.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: xs[0] has dtype {x0.dtype}; expected {_DTYPE_NAMES}")
    for k, x in enumerate(xs[1:], start=1):
        if x.shape != x0.shape:
            raise ValueError(f"{op}: xs[{k}] has shape {tuple(x.shape)} but xs[0] has shape {tuple(x0.shape)}")
        if x.dtype != x0.dtype:
            raise TypeError(f"{op}: xs[{k}] has dtype {x.dtype} but xs[0] has dtype {x0.dtype}")
        if x.device != x0.device:
            raise ValueError(f"{op}: xs[{k}] is on {x.device} but xs[0] is on {x0.device}")
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{op}: weights must be a tensor, got {type(weights).__name__}")
    if weights.dim() != 1:
        raise ValueError(f"{op}: weights must be 1-D, got shape {tuple(weights.shape)}")
    if weights.shape[0] != len(xs):
        raise ValueError(f"{op}: weights has {weights.shape[0]} entries but xs has {len(xs)} tensors")
    if weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: weights has dtype {weights.dtype}; expected {_DTYPE_NAMES}")
    if weights.device != x0.device:
        raise ValueError(f"{op}: weights is on {weights.device} but xs are on {x0.device}")
    return xs


def grad_flags(xs: Sequence[torch.Tensor]) -> list[bool]:
    return [bool(x.requires_grad) for x in xs]


def fill_grads(flags: Sequence[bool], packed: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Spread the gradients computed for the inputs that need one over all K slots."""
    it = iter(packed)
    return [next(it) if need else None for need in flags]
