"""partial_channel_node_sum: a whole PC-DARTS node in one pass.

``out = sum_e weights[e] * channel_shuffle(cat([mixed[e], P_e(bypass[e])], 1), groups)``

where ``mixed[e]`` (N, Cp, Ho, Wo) is edge e's mixed-op output on its sampled
channels, ``bypass[e]`` (N, Cb, H, W) the channels that skip the candidates
(typically the view ``h_e[:, Cp:]``, any strides), and P_e the identity on
stride-1 edges (H, W = Ho, Wo) or a 2x2 max pool on stride-2 edges (H, W =
2Ho, 2Wo). The edge outputs are never materialised: each output element is
read from its E sources and written once. Backward reads the output gradient
once; the weights' gradient is a fixed-order two-stage reduction, and the
pooling argmax is recomputed from the bypass (first maximum wins, as PyTorch).

Ops registered with torch.library:
  fastnas::partial_channel_node_sum / _backward                 C++ (CPU, CUDA)
  fastnas::partial_channel_node_sum_triton / _triton_backward   Triton
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastnas import backends
from fastnas.ops._common import FLOAT_DTYPES, MAX_INPUTS
from fastnas.ops.partial_channel_mixed_sum import channel_shuffle

_OP = "partial_channel_node_sum"
_DTYPE_NAMES = "float32, float16, bfloat16 or float64"


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def partial_channel_node_sum_reference(
    mixed: Sequence[torch.Tensor],
    bypass: Sequence[torch.Tensor],
    weights: torch.Tensor,
    groups: int,
    strides: Sequence[int],
) -> torch.Tensor:
    """The oracle: each edge's pool, cat and shuffle, then the weighted sum, eagerly."""
    acc = _accumulate_dtype(mixed[0].dtype)
    out = None
    for e, (m, b, s) in enumerate(zip(mixed, bypass, strides)):
        if s == 2:
            # max_pool2d rejects zero channels (K = 1 leaves no bypass).
            b = F.max_pool2d(b, 2, 2) if b.shape[1] else b[:, :, ::2, ::2]
        term = weights[e].to(acc) * channel_shuffle(torch.cat([m, b], dim=1), groups).to(acc)
        out = term if out is None else out + term
    return out.to(mixed[0].dtype)


def _check_list(name, xs) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{_OP}: {name} must be a list or tuple of tensors, got {type(xs).__name__}")
    xs = list(xs)
    for e, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{_OP}: {name}[{e}] is a {type(x).__name__}, not a tensor")
        if x.dim() != 4:
            raise ValueError(f"{_OP}: {name}[{e}] must be a 4-D NCHW tensor, got shape {tuple(x.shape)}")
    return xs


def _check(mixed, bypass, weights, groups, strides):
    mixed = _check_list("mixed", mixed)
    bypass = _check_list("bypass", bypass)
    if not mixed:
        raise ValueError(f"{_OP}: mixed is empty; a node needs at least one edge")
    num = len(mixed)
    if num > MAX_INPUTS:
        raise ValueError(f"{_OP}: {num} edges; at most {MAX_INPUTS} are supported per call")
    if len(bypass) != num:
        raise ValueError(f"{_OP}: bypass has {len(bypass)} tensors but mixed has {num}")
    if isinstance(strides, torch.Tensor) or not isinstance(strides, Sequence):
        raise TypeError(f"{_OP}: strides must be a list of ints, got {type(strides).__name__}")
    strides = list(strides)
    if len(strides) != num:
        raise ValueError(f"{_OP}: strides has {len(strides)} entries but mixed has {num} tensors")
    for e, s in enumerate(strides):
        if isinstance(s, bool) or not isinstance(s, int) or s not in (1, 2):
            raise ValueError(f"{_OP}: strides[{e}]={s!r}; each stride must be 1 or 2")
    m0 = mixed[0]
    if m0.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_OP}: mixed[0] has dtype {m0.dtype}; expected {_DTYPE_NAMES}")
    n, cp, ho, wo = m0.shape
    for e, m in enumerate(mixed[1:], start=1):
        if m.shape != m0.shape:
            raise ValueError(f"{_OP}: mixed[{e}] has shape {tuple(m.shape)} but mixed[0] has {tuple(m0.shape)}")
        if m.dtype != m0.dtype:
            raise TypeError(f"{_OP}: mixed[{e}] has dtype {m.dtype} but mixed[0] has {m0.dtype}")
        if m.device != m0.device:
            raise ValueError(f"{_OP}: mixed[{e}] is on {m.device} but mixed[0] is on {m0.device}")
    cb = bypass[0].shape[1]
    for e, (b, s) in enumerate(zip(bypass, strides)):
        if b.dtype != m0.dtype:
            raise TypeError(f"{_OP}: bypass[{e}] has dtype {b.dtype} but mixed has {m0.dtype}")
        if b.device != m0.device:
            raise ValueError(f"{_OP}: bypass[{e}] is on {b.device} but mixed is on {m0.device}")
        if b.shape[0] != n:
            raise ValueError(f"{_OP}: bypass[{e}] has batch size {b.shape[0]} but mixed has {n}")
        if b.shape[1] != cb:
            raise ValueError(f"{_OP}: bypass[{e}] has {b.shape[1]} channels but bypass[0] has {cb}")
        want = (ho * s, wo * s)
        if tuple(b.shape[2:]) != want:
            raise ValueError(
                f"{_OP}: bypass[{e}] is {b.shape[2]}x{b.shape[3]} but strides[{e}]={s} needs "
                f"{want[0]}x{want[1]} for mixed outputs of {ho}x{wo}"
            )
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{_OP}: weights must be a tensor, got {type(weights).__name__}")
    if weights.dim() != 1 or weights.shape[0] != num:
        raise ValueError(f"{_OP}: weights must have shape ({num},), one per edge, got {tuple(weights.shape)}")
    if weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_OP}: weights has dtype {weights.dtype}; expected {_DTYPE_NAMES}")
    if weights.device != m0.device:
        raise ValueError(f"{_OP}: weights is on {weights.device} but mixed is on {m0.device}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{_OP}: groups must be an int, got {type(groups).__name__}")
    if groups < 1 or (cp + cb) % groups:
        raise ValueError(f"{_OP}: groups={groups} must be >= 1 and divide the {cp + cb} output channels")
    return mixed, bypass, strides


def partial_channel_node_sum(
    mixed: Sequence[torch.Tensor],
    bypass: Sequence[torch.Tensor],
    weights: torch.Tensor,
    groups: int,
    strides: Sequence[int],
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """PC-DARTS node: ``sum_e weights[e] * shuffle(cat([mixed[e], P_e(bypass[e])], 1), groups)``.

    ``mixed``: E tensors (N, Cp, Ho, Wo); ``bypass``: E tensors (N, Cb, H, W),
    any strides, with (H, W) = (Ho, Wo) where ``strides[e] == 1`` and (2Ho, 2Wo),
    max-pooled 2x2, where ``strides[e] == 2``; ``weights``: (E,), any float
    dtype, accumulated in fp32 (fp64 for fp64 inputs). Returns a contiguous
    (N, Cp + Cb, Ho, Wo) tensor in the dtype of ``mixed``.
    """
    mixed, bypass, strides = _check(mixed, bypass, weights, groups, strides)
    name = backends.resolve("partial_channel_node_sum", mixed[0].device, backend)
    if name == "reference":
        return partial_channel_node_sum_reference(mixed, bypass, weights, groups, strides)
    if name == "triton":
        return torch.ops.fastnas.partial_channel_node_sum_triton(mixed, bypass, weights, groups, strides)
    return torch.ops.fastnas.partial_channel_node_sum(mixed, bypass, weights, groups, strides)


# --- autograd, shared by the C++ and the Triton op -------------------------------


def _stand_in(like: torch.Tensor, shape) -> torch.Tensor:
    """A zero-stride tensor that only carries a shape: the kernels never read it."""
    return like.new_empty(()).expand(shape)


def _setup_context(ctx, inputs, output):
    mixed, bypass, weights, groups, strides = inputs
    ctx.groups, ctx.strides = groups, list(strides)
    ctx.mixed_need = [bool(m.requires_grad) for m in mixed]
    ctx.bypass_need = [bool(b.requires_grad) for b in bypass]
    ctx.w_need = bool(weights.requires_grad)
    ctx.mixed_shape = tuple(mixed[0].shape)
    ctx.bypass_shapes = [tuple(b.shape) for b in bypass]
    # The inputs are read back for the weights' gradient, and a stride-2
    # bypass for its pooling argmax; keep only those.
    keep_bypass = [ctx.w_need or (need and s == 2) for need, s in zip(ctx.bypass_need, strides)]
    ctx.kept_bypass = keep_bypass
    kept = [b for b, keep in zip(bypass, keep_bypass) if keep]
    ctx.num_mixed = len(mixed) if ctx.w_need else 0
    ctx.save_for_backward(weights, *(mixed if ctx.w_need else ()), *kept)


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        weights, *saved = ctx.saved_tensors
        mixed = saved[: ctx.num_mixed]
        kept = iter(saved[ctx.num_mixed :])
        if not mixed:
            mixed = [_stand_in(grad_out, ctx.mixed_shape)] * len(ctx.strides)
        bypass = [
            next(kept) if keep else _stand_in(grad_out, shape)
            for keep, shape in zip(ctx.kept_bypass, ctx.bypass_shapes)
        ]
        grad_mixed, grad_bypass, grad_w = backward_op(
            grad_out, list(mixed), bypass, weights, ctx.groups, ctx.strides, ctx.mixed_need, ctx.bypass_need, ctx.w_need
        )
        it_m, it_b = iter(grad_mixed), iter(grad_bypass)
        return (
            [next(it_m) if need else None for need in ctx.mixed_need],
            [next(it_b) if need else None for need in ctx.bypass_need],
            grad_w if ctx.w_need else None,
            None,
            None,
        )

    return backward


def _fake_forward(mixed, bypass, weights, groups, strides):
    n, cp, ho, wo = mixed[0].shape
    return mixed[0].new_empty((n, cp + bypass[0].shape[1], ho, wo))


def _fake_backward(
    grad_out, mixed, bypass, weights, groups, strides, mixed_need_grad, bypass_need_grad, weights_need_grad
):
    grad_mixed = [grad_out.new_empty(tuple(m.shape)) for m, need in zip(mixed, mixed_need_grad) if need]
    grad_bypass = [grad_out.new_empty(tuple(b.shape)) for b, need in zip(bypass, bypass_need_grad) if need]
    grad_w = weights.new_empty((weights.shape[0] if weights_need_grad else 0,))
    return grad_mixed, grad_bypass, grad_w


def _register_cpp():
    if not backends.register_cpp("partial_channel_node_sum", "partial_channel_node_sum_backward"):
        return
    torch.library.register_fake("fastnas::partial_channel_node_sum")(_fake_forward)
    torch.library.register_fake("fastnas::partial_channel_node_sum_backward")(_fake_backward)
    torch.library.register_autograd(
        "fastnas::partial_channel_node_sum",
        _make_backward(torch.ops.fastnas.partial_channel_node_sum_backward),
        setup_context=_setup_context,
    )


# Opaque custom ops: the kernels take the inputs through a pointer table built
# from data_ptr(), which Inductor cannot trace.
@torch.library.custom_op("fastnas::partial_channel_node_sum_triton", mutates_args=())
def _node_triton(
    mixed: list[torch.Tensor], bypass: list[torch.Tensor], weights: torch.Tensor, groups: int, strides: list[int]
) -> torch.Tensor:
    from fastnas.kernels.partial_channel_node_sum import partial_channel_node_sum_forward

    return partial_channel_node_sum_forward(
        [m.contiguous() for m in mixed], list(bypass), weights.contiguous(), groups, list(strides)
    )


@torch.library.custom_op("fastnas::partial_channel_node_sum_triton_backward", mutates_args=())
def _node_triton_backward(
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
    from fastnas.kernels.partial_channel_node_sum import partial_channel_node_sum_backward

    return partial_channel_node_sum_backward(
        grad_out.contiguous(),
        # Stand-ins (zero strides) stay as they are: the kernel does not read them.
        [m.contiguous() if weights_need_grad else m for m in mixed],
        list(bypass),
        weights.contiguous(),
        groups,
        list(strides),
        list(mixed_need_grad),
        list(bypass_need_grad),
        weights_need_grad,
    )


_node_triton.register_fake(_fake_forward)
_node_triton_backward.register_fake(_fake_backward)
_node_triton.register_autograd(_make_backward(_node_triton_backward), setup_context=_setup_context)
_register_cpp()
backends.register("partial_channel_node_sum", "triton")
