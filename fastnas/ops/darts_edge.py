"""darts_edge: a whole DARTS mixed op (every candidate and their weighted sum) fused.

The candidates of the DARTS search space are computed from the edge input x
through the building-block ops, never as separate eager modules:

- the four convolution candidates (sep_conv_3x3/5x5/7x7, dil_conv_3x3/5x5) share
  one ReLU and one read of x: ``multi_depthwise`` writes every first depthwise
  output into one channel-major buffer (J, C, N, H, W), so their 1x1
  convolutions are one ``bmm``; the second half of the separable convolutions
  is a second ``multi_depthwise`` whose prologue applies the first batch norm
  and ReLU in registers. Candidates with another activation in place of ReLU
  (``EdgeSpec.activations``, Scalable-DARTS' pairs) go into the same calls: the
  prologue computes every activation from one read of x;
- every batch norm at a candidate's end is folded into ``darts_sum``, which
  receives the pre-BN tensors and their batch statistics;
- max_pool_3x3 and avg_pool_3x3 with their batch norms are computed inside
  ``darts_sum`` (statistics by ``pool_batch_norm_stats``) from x alone;
- skip_connect reads x directly (stride 1) or is a factorized reduce whose two
  1x1 convolutions go into the same buffer (stride 2); ``none`` costs nothing.

Memory modes (what forward keeps for backward, besides x, which the network
holds anyway, and per-channel statistics):

- ``"save"``: the tensors darts_sum normalises, before their batch norm (one
  per separable and dilated convolution and for a factorized reduce); the
  depthwise outputs and the separable convolutions' middles (one ``bmm``) are
  recomputed in backward, which is cheap.
- ``"recompute"``: nothing; backward recomputes the candidates from x.

Backward is explicit (no eager graph is recorded): ``darts_sum_backward`` gives
the gradients of every pre-BN tensor, of x through the pools and skip, and of
the weights; the convolutions' gradients come from ``bmm`` and
``multi_depthwise_backward``. Batch-norm running statistics are updated once,
in forward, exactly as ``nn.BatchNorm2d`` would.

Two implementations of the same arithmetic, op for op, bit-identical:

- ``torch.ops.fastnas.darts_edge`` / ``darts_edge_backward``, C++ (csrc/darts_edge.cpp):
  the orchestration below written once against the dispatcher and ATen, one call
  per direction with a C++ autograd, its arguments checked once at the boundary and
  the edge's static structure read from ``EdgeSpec.encoded``. The same functions
  are registered for the CPU (csrc/cpu/darts_edge.cpp) and CUDA
  (csrc/cuda/darts_edge.cu), on those devices' kernels of the building blocks.
- ``DartsEdgeFunction``, the Python composite, for the backends whose building
  blocks have no C++ kernels (``triton``, ``reference``). It must stay: the C++ op
  calls its building blocks through the dispatcher, which holds only their C++
  kernels, while the Triton kernels exist only as Python custom ops
  (``fastnas::*_triton``) and the reference only as eager PyTorch, out of the C++
  op's reach. tests/test_darts_edge_op.py keeps the two identical: the composite on
  the ``cpu`` building blocks against the C++ op, bit for bit.

The eager oracle is the module path of ``fastnas.nn.MixedOp`` with the
``reference`` backend; tests compare outputs, every gradient and the running
statistics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastnas import backends
from fastnas.ops._common import autocast_dtype
from fastnas.ops._registry import register_op
from fastnas.ops.activations import ACTIVATIONS
from fastnas.ops.darts_sum import darts_sum, darts_sum_backward, pool_batch_norm_stats
from fastnas.ops.multi_depthwise import (
    MAX_CANDIDATES_TRITON,
    MAX_KERNEL_SIZE,
    multi_depthwise,
    multi_depthwise_backward,
)
from fastnas.ops.stacked_batch_norm import (
    stacked_batch_norm_backward,
    stacked_batch_norm_stats,
    update_running_stats,
)

MEMORY_MODES = ("save", "recompute")
# The dtypes the fused edge computes (float16 and bfloat16 accumulating in float32, on the
# C++ op); the rest run the candidate modules.
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_NAMES = "float32, float64, float16 and bfloat16"
HALF_DTYPES = (torch.float16, torch.bfloat16)
# The activations the depthwise prologue applies before the convolution candidates.
FUSED_ACTIVATIONS = ACTIVATIONS


@dataclass(frozen=True)
class EdgeSpec:
    """The static structure of one fused edge.

    ``sep`` and ``dil`` list (kernel size, index into the edge's weights) of the
    separable and dilated convolution candidates; the ``*_index`` fields give
    the weight index of the other candidates present (None if absent); ``K`` is
    the number of weights (``none`` candidates included); ``activations`` names
    the activation of each convolution candidate, seps then dils, in place of
    ReLU (empty: all ReLU).

    Parameters come in this order: for each sep (dw1, pw1, dw2, pw2), for each
    dil (dw, pw), then the factorized reduce's (conv_1, conv_2). Batch-norm
    buffers (running_mean, running_var, num_batches_tracked) come in the order
    of the statistics rows: sep middles, dils, sep ends, factorized reduce,
    max pool, avg pool (present ones only).
    """

    stride: int
    K: int
    sep: tuple[tuple[int, int], ...] = ()
    dil: tuple[tuple[int, int], ...] = ()
    max_index: int | None = None
    avg_index: int | None = None
    skip_index: int | None = None
    reduce_index: int | None = None
    eps: float = 1e-5
    momentum: float = 0.1
    activations: tuple[str, ...] = ()

    def __post_init__(self):
        if self.stride not in (1, 2):
            raise ValueError(f"EdgeSpec: stride must be 1 or 2, got {self.stride}")
        if self.K < 1:
            raise ValueError(f"EdgeSpec: K (the number of weights) must be >= 1, got {self.K}")
        if self.skip_index is not None and self.stride != 1:
            raise ValueError("EdgeSpec: the identity skip needs stride 1; use reduce_index on stride-2 edges")
        if self.reduce_index is not None and self.stride != 2:
            raise ValueError("EdgeSpec: a factorized reduce needs stride 2")
        if self.activations and len(self.activations) != len(self.sep) + len(self.dil):
            raise ValueError(
                f"EdgeSpec: {len(self.activations)} activations for {len(self.sep) + len(self.dil)} convolutions"
            )
        unknown = [a for a in self.activations if a not in ACTIVATIONS]
        if unknown:
            raise ValueError(f"EdgeSpec: unknown activation {unknown[0]!r}; choose one of {', '.join(ACTIVATIONS)}")
        indices = [i for _, i in self.sep + self.dil]
        indices += [i for i in (self.max_index, self.avg_index, self.skip_index, self.reduce_index) if i is not None]
        if any(not 0 <= i < self.K for i in indices):
            raise ValueError(f"EdgeSpec: a weight index out of range for K={self.K}: {indices}")
        if any(k < 1 or k % 2 == 0 for k, _ in self.sep + self.dil):
            raise ValueError(f"EdgeSpec: kernel sizes must be odd, got {[k for k, _ in self.sep + self.dil]}")
        # What the C++ op reads (csrc/darts_edge.h, Spec), encoded once.
        absent = [-1 if i is None else i for i in (self.max_index, self.avg_index, self.skip_index, self.reduce_index)]
        encoded = [self.stride, self.K, len(self.sep), len(self.dil), *absent]
        for (k, i), a in zip(self.sep + self.dil, self.activations or ["relu"] * (len(self.sep) + len(self.dil))):
            encoded += [k, i, ACTIVATIONS.index(a)]
        object.__setattr__(self, "_encoded", tuple(encoded))

    @property
    def encoded(self) -> tuple[int, ...]:
        """The spec as the ints the C++ op reads: [stride, K, ns, nd, max, avg, skip, reduce
        (-1 when absent), then (kernel size, weight index, activation code) of each sep, then of
        each dil]; the codes are ``fastnas.ops.activations``' (0, ReLU, where ``activations`` is empty)."""
        return self._encoded

    @staticmethod
    def encoded_size(ns: int, nd: int) -> int:
        """How many ints ``encoded`` has for ``ns`` separable and ``nd`` dilated convolutions."""
        return 8 + 3 * (ns + nd)

    @classmethod
    def decode(cls, encoded, eps: float = 1e-5, momentum: float = 0.1) -> EdgeSpec:
        """The spec that ``encoded`` describes (the inverse of ``encoded``)."""
        encoded = [int(v) for v in encoded]
        if len(encoded) < 8:
            raise ValueError(f"EdgeSpec.decode: {len(encoded)} ints; an edge needs at least 8 (see EdgeSpec.encoded)")
        stride, K, ns, nd, *opt = encoded[:8]
        if ns < 0 or nd < 0 or len(encoded) != cls.encoded_size(ns, nd):
            raise ValueError(f"EdgeSpec.decode: {len(encoded)} ints do not describe {ns} sep and {nd} dil convolutions")
        conv = [tuple(encoded[8 + 3 * j : 10 + 3 * j]) for j in range(ns + nd)]
        codes = [encoded[10 + 3 * j] for j in range(ns + nd)]
        bad = [c for c in codes if not 0 <= c < len(ACTIVATIONS)]
        if bad:
            raise ValueError(f"EdgeSpec.decode: activation code {bad[0]}; codes run from 0 to {len(ACTIVATIONS) - 1}")
        activations = () if not any(codes) else tuple(ACTIVATIONS[c] for c in codes)
        max_index, avg_index, skip_index, reduce_index = (None if i == -1 else i for i in opt)
        return cls(stride, K, tuple(conv[:ns]), tuple(conv[ns:]), max_index, avg_index, skip_index, reduce_index,
                   float(eps), float(momentum), activations)  # fmt: skip

    @property
    def ns(self) -> int:
        return len(self.sep)

    @property
    def nd(self) -> int:
        return len(self.dil)

    @property
    def n_params(self) -> int:
        return 4 * self.ns + 2 * self.nd + (2 if self.reduce_index is not None else 0)

    @property
    def nz(self) -> int:
        """Rows of the pre-BN buffer darts_sum normalises: dils, sep ends, reduce."""
        return self.ns + self.nd + (self.reduce_index is not None)

    @property
    def n_norms(self) -> int:
        fr = self.reduce_index is not None
        return 2 * self.ns + self.nd + fr + (self.max_index is not None) + (self.avg_index is not None)

    def coef_index(self) -> list[int]:
        """Weight index of each darts_sum coefficient: [dils, sep ends, reduce, max, avg, skip]."""
        idx = [i for _, i in self.dil] + [i for _, i in self.sep]
        if self.reduce_index is not None:
            idx.append(self.reduce_index)
        for i in (self.max_index, self.avg_index, self.skip_index):
            idx.append(0 if i is None else i)
        return idx


def unsupported_reason(spec: EdgeSpec, dtype: torch.dtype, backend: str) -> str | None:
    """Why the kernels of ``backend`` (a resolved name) cannot run this edge on
    ``dtype`` inputs, or None when they can. The one place that knows the limits
    of the building blocks the edge is made of."""
    if dtype not in DTYPES:
        return f"the fused edge computes {DTYPE_NAMES} inputs, not {dtype}"
    if dtype in HALF_DTYPES and backend not in _CPP_BACKENDS:
        return f"the {backend} edge (the Python composite) computes float32 and float64 inputs, not {dtype}"
    unknown = sorted(set(spec.activations) - set(FUSED_ACTIVATIONS))
    if unknown:
        return f"a {unknown[0]} activation; the fused edge's depthwise prologue computes {', '.join(FUSED_ACTIVATIONS)}"
    sizes = [k for k, _ in spec.sep] + [k for k, _ in spec.dil]
    if any(k > MAX_KERNEL_SIZE for k in sizes):
        return f"a depthwise kernel of size {max(sizes)}; the fused edge takes at most {MAX_KERNEL_SIZE}"
    if backend == "triton" and spec.ns + spec.nd > MAX_CANDIDATES_TRITON:
        return (
            f"{spec.ns + spec.nd} convolution candidates; the Triton depthwise kernel takes at most "
            f"{MAX_CANDIDATES_TRITON} per call"
        )
    return None


def _split_params(spec: EdgeSpec, params):
    ns, nd = spec.ns, spec.nd
    sep = [params[4 * j : 4 * j + 4] for j in range(ns)]
    dil = [params[4 * ns + 2 * j : 4 * ns + 2 * j + 2] for j in range(nd)]
    fr = params[4 * ns + 2 * nd :]
    dw1 = [p[0] for p in sep] + [p[0] for p in dil]
    pw1 = [p[1] for p in sep] + [p[1] for p in dil]
    dw2 = [p[2] for p in sep]
    pw2 = [p[3] for p in sep]
    return dw1, pw1, dw2, pw2, list(fr)


def _first_dilations(spec: EdgeSpec) -> list[int]:
    """Dilation of each first depthwise convolution: separable ones 1, dilated ones 2."""
    return [1] * spec.ns + [2] * spec.nd


def _activations(spec: EdgeSpec) -> list[str]:
    """Activation of each first depthwise convolution, seps then dils (the seps' second ones: the first ns)."""
    return list(spec.activations) or ["relu"] * (spec.ns + spec.nd)


def _prologue(z_mid, mean, rstd):
    """The second depthwise stage's input, as multi_depthwise takes it.

    multi_depthwise applies the separable convolutions' first batch norm (float32
    statistics) and ReLU in registers. Float64 edges, used to check the engine
    to rounding, normalise here instead so the statistics keep their precision;
    the ReLU mask is the same either way.
    """
    if z_mid.dtype == torch.float64:
        shape = (mean.shape[0], mean.shape[1], 1, 1, 1)
        return (z_mid - mean.view(shape)) * rstd.view(shape), None, None
    return z_mid, mean.float(), rstd.float()


def _second_depthwise(z_mid, mean, rstd, dw2, activations, backend):
    x, m, r = _prologue(z_mid, mean, rstd)
    return multi_depthwise(x, dw2, [1] * len(dw2), 1, m, r, activations=activations, backend=backend)


def _stack_pointwise(ws) -> torch.Tensor:
    """(J, C_out, C_in) from J 1x1 convolution weights (C_out, C_in, 1, 1)."""
    return torch.stack(ws).flatten(2)


def _channel_major(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (C, N*H*W)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


class _Forward:
    """The candidates' tensors of one edge, computed from x.

    Two pre-BN buffers: ``z_mid`` (ns, C, N, Ho, Wo), the separable convolutions'
    middles, and ``zs`` (nz, C, N, Ho, Wo), the tensors darts_sum normalises and
    sums, rows [dils, sep ends, factorized reduce].

    In forward (``stats`` and ``zs`` None) everything, including the batch
    statistics. In backward, with the forward's ``stats``: ``zs`` None recomputes
    everything ("recompute"); a saved ``zs`` ("save") rebuilds the depthwise
    outputs, the middles (one bmm) and the factorized reduce's inputs, which the
    gradients read.
    """

    def __init__(self, spec: EdgeSpec, x, params, backend, stats=None, zs=None):
        self.spec = spec
        ns, nd = spec.ns, spec.nd
        J1 = ns + nd
        dw1, pw1, dw2, pw2, fr = _split_params(spec, params)
        N, C, H, W = x.shape
        s = spec.stride
        Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
        M = N * Ho * Wo
        self.shape = (C, N, Ho, Wo)
        nz = nd + ns + (spec.reduce_index is not None)
        fill = zs is None
        if fill:
            zs = x.new_empty((nz, C, N, Ho, Wo))
        self.d1 = self.d2 = self.z_mid = None
        self.fr_in = None
        # The 1x1 weights stacked once, (J, C, C): forward and backward both read them.
        self.pw1 = _stack_pointwise(pw1) if J1 else None
        self.pw2 = _stack_pointwise(pw2) if ns else None
        if J1:
            self.d1 = multi_depthwise(
                x, dw1, _first_dilations(spec), s, activations=_activations(spec), backend=backend
            )
            d1 = self.d1.view(J1, C, M)
            if ns:
                self.z_mid = torch.bmm(self.pw1[:ns], d1[:ns]).view(ns, C, N, Ho, Wo)
            if fill and nd:
                torch.bmm(self.pw1[ns:], d1[ns:], out=zs[:nd].view(nd, C, M))
        if stats is None:
            m1, r1, v1 = stacked_batch_norm_stats(self.z_mid, spec.eps, backend=backend) if ns else (None,) * 3
        else:
            m1, r1 = stats["m1"], stats["r1"]
        if ns:
            self.d2 = _second_depthwise(self.z_mid, m1, r1, dw2, _activations(spec)[:ns], backend)
            if fill:
                torch.bmm(self.pw2, self.d2.view(ns, C, M), out=zs[nd : nd + ns].view(ns, C, M))
        if spec.reduce_index is not None:
            half = C // 2
            a1 = _channel_major(torch.relu(x[:, :, ::2, ::2]))
            a2 = _channel_major(torch.relu(x[:, :, 1::2, 1::2]))
            self.fr_in = (a1, a2)
            if fill:
                torch.mm(fr[0].flatten(1), a1, out=zs[-1, :half].view(half, M))
                torch.mm(fr[1].flatten(1), a2, out=zs[-1, half:].view(C - half, M))
        if stats is None:
            m2, r2, v2 = stacked_batch_norm_stats(zs, spec.eps, backend=backend) if nz else (None,) * 3
            if spec.max_index is not None or spec.avg_index is not None:
                pm, pr, pv = pool_batch_norm_stats(x, s, spec.eps, backend=backend)
            else:
                pm = x.new_zeros((2, C), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
                pr, pv = torch.ones_like(pm), pm
            stats = {
                "m1": m1,
                "r1": r1,
                # darts_sum's rows: [dils, sep ends, reduce, max, avg]
                "mean": torch.cat((m2, pm)) if nz else pm,
                "rstd": torch.cat((r2, pr)) if nz else pr,
                # every batch norm's rows: [sep middles, dils, sep ends, reduce, max, avg]
                "all_mean": torch.cat([t for t in (m1, m2, pm) if t is not None]),
                "all_var": torch.cat([t for t in (v1, v2, pv) if t is not None]),
                "count": M,
            }
        self.zs = zs
        self.stats = stats
        self.fr = fr
        self.dw1, self.dw2 = dw1, dw2


@functools.lru_cache(maxsize=1024)
def _coef_index(spec: EdgeSpec, device: torch.device) -> torch.Tensor:
    """Built once per spec and device: a host-to-device copy per call would keep
    the step from being captured as a CUDA graph."""
    return torch.tensor(spec.coef_index(), device=device)


def _norm_rows(spec: EdgeSpec) -> list[int]:
    """Rows of all_mean/all_var for each batch norm, in the buffers' order."""
    ns, nd = spec.ns, spec.nd
    fr = spec.reduce_index is not None
    J = 2 * ns + nd + fr
    rows = list(range(J))
    if spec.max_index is not None:
        rows.append(J)
    if spec.avg_index is not None:
        rows.append(J + 1)
    return rows


class DartsEdgeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, spec, memory, backend, buffers, *params):
        fwd = _Forward(spec, x, params, backend)
        st = fwd.stats
        if buffers is not None:
            means, variances, counts = buffers
            update_running_stats(
                list(means), list(variances), list(counts), st["all_mean"], st["all_var"], _norm_rows(spec),
                spec.momentum, st["count"],
            )  # fmt: skip
        coef_index = _coef_index(spec, weights.device)
        coef = weights.index_select(0, coef_index).to(st["mean"].dtype)
        out = darts_sum(
            x, fwd.zs, st["mean"], st["rstd"], coef, spec.stride,
            spec.max_index is not None, spec.avg_index is not None, spec.skip_index is not None, backend=backend,
        )  # fmt: skip
        ctx.spec, ctx.memory, ctx.backend = spec, memory, backend
        ctx.weights_dtype = weights.dtype
        ctx.stats = {k: st[k] for k in ("m1", "r1", "mean", "rstd")}
        ctx.save_for_backward(x, coef, coef_index, *params, *((fwd.zs,) if memory == "save" else ()))
        return out

    @staticmethod
    def backward(ctx, g):
        spec, backend = ctx.spec, ctx.backend
        x, coef, coef_index, *rest = ctx.saved_tensors
        params = rest[: spec.n_params]
        st = ctx.stats
        saved_zs = rest[spec.n_params] if ctx.memory == "save" else None
        fwd = _Forward(spec, x, params, backend, stats=st, zs=saved_zs)
        g = g.contiguous()
        ns, nd = spec.ns, spec.nd
        J1 = ns + nd
        C, N, Ho, Wo = fwd.shape
        M = N * Ho * Wo
        gz, gx, gcoef = darts_sum_backward(
            g, x, fwd.zs, st["mean"], st["rstd"], coef, spec.stride,
            spec.max_index is not None, spec.avg_index is not None, spec.skip_index is not None, True, backend=backend,
        )  # fmt: skip
        g_dw1 = g_pw1 = g_dw2 = g_pw2 = None
        if J1:
            d1 = fwd.d1.view(J1, C, M)
            gz_dil = gz[:nd].view(nd, C, M)
            if ns:
                gz_end = gz[nd : nd + ns].view(ns, C, M)
                g_pw2 = torch.bmm(gz_end, fwd.d2.view(ns, C, M).transpose(1, 2)).view(ns, C, C, 1, 1).unbind(0)
                gd2 = torch.bmm(fwd.pw2.transpose(1, 2), gz_end)
                a2, m_a2, r_a2 = _prologue(fwd.z_mid, st["m1"], st["r1"])
                gpre2, g_dw2 = multi_depthwise_backward(
                    gd2.view(ns, C, N, Ho, Wo), a2, fwd.dw2, [1] * ns, 1, m_a2, r_a2, True,
                    activations=_activations(spec)[:ns], backend=backend,
                )  # fmt: skip
                gz_mid = stacked_batch_norm_backward(gpre2, fwd.z_mid, st["m1"], st["r1"], backend=backend)
            # The first 1x1 convolutions, [seps, dils], per part: their output gradients are
            # never concatenated (a copy of J1 x C x M values).
            gd1 = d1.new_empty(J1, C, M)
            g_pw1 = d1.new_empty(J1, C, C)
            for start, count, gz_part in ((0, ns, gz_mid.view(ns, C, M) if ns else None), (ns, nd, gz_dil)):
                if count:
                    part = slice(start, start + count)
                    torch.bmm(fwd.pw1[part].transpose(1, 2), gz_part, out=gd1[part])
                    torch.bmm(gz_part, d1[part].transpose(1, 2), out=g_pw1[part])
            g_pw1 = g_pw1.view(J1, C, C, 1, 1).unbind(0)
            gx1, g_dw1 = multi_depthwise_backward(
                gd1.view(J1, C, N, Ho, Wo), x, fwd.dw1, _first_dilations(spec), spec.stride, None, None, True,
                activations=_activations(spec), backend=backend,
            )  # fmt: skip
            gx = gx + gx1
        g_fr = []
        if spec.reduce_index is not None:
            half = C // 2
            gfr = gz[-1].view(C, M)
            a1, a2 = fwd.fr_in
            for sl, a, w, off in ((slice(0, half), a1, fwd.fr[0], 0), (slice(half, C), a2, fwd.fr[1], 1)):
                gzs = gfr[sl]
                g_fr.append(torch.mm(gzs, a.t()).view_as(w))
                ga = torch.mm(w.flatten(1).t(), gzs).view(C, N, Ho, Wo).transpose(0, 1)
                xs = x[:, :, off::2, off::2]
                gx[:, :, off::2, off::2] += ga * (xs > 0)
        grads = []
        for j in range(ns):
            grads += [g_dw1[j], g_pw1[j], g_dw2[j], g_pw2[j]]
        for j in range(nd):
            grads += [g_dw1[ns + j], g_pw1[ns + j]]
        grads += g_fr
        g_weights = gcoef.new_zeros(spec.K).index_add_(0, coef_index, gcoef)
        # Absent max/avg/skip coefficients point at index 0 with a zero gradient.
        return (gx, g_weights.to(ctx.weights_dtype), None, None, None, None, *grads)


def _check(op: str, x, weights, params, spec: EdgeSpec, buffers, memory: str) -> None:
    """The edge's arguments, as the C++ op checks them at its boundary (csrc/darts_edge.cpp,
    check_edge): for the composite path and for the fake implementation."""
    torch._check_value(memory in MEMORY_MODES, lambda: f"{op}: memory must be one of {MEMORY_MODES}, got {memory!r}")
    torch._check_value(x.dim() == 4, lambda: f"{op}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    torch._check_type(x.dtype in DTYPES, lambda: f"{op}: the fused edge computes {DTYPE_NAMES} inputs, not {x.dtype}")
    N, C, H, W = x.shape
    torch._check_value(
        weights.dim() == 1 and weights.shape[0] == spec.K,
        lambda: f"{op}: weights must have shape ({spec.K},), one per candidate, got {tuple(weights.shape)}",
    )
    torch._check_type(weights.is_floating_point(), lambda: f"{op}: weights has dtype {weights.dtype}")
    torch._check_value(
        weights.device == x.device, lambda: f"{op}: weights is on {weights.device} but x is on {x.device}"
    )
    torch._check_value(
        len(params) == spec.n_params,
        lambda: f"{op}: expected {spec.n_params} parameter tensors for {spec}, got {len(params)}",
    )
    if spec.reduce_index is not None:
        torch._check_value(
            H % 2 == 0 and W % 2 == 0, lambda: f"{op}: a factorized reduce needs even H and W, got {H}x{W}"
        )
        torch._check_value(C >= 2, lambda: f"{op}: a factorized reduce needs at least 2 channels, got {C}")
    for i, (p, want) in enumerate(zip(params, _param_shapes(spec, C))):
        torch._check_value(
            tuple(p.shape) == want,
            lambda i=i, p=p, w=want: f"{op}: params[{i}] must have shape {w}, got {tuple(p.shape)}",
        )
        torch._check_type(
            p.dtype == x.dtype, lambda i=i, p=p: f"{op}: params[{i}] has dtype {p.dtype} but x has {x.dtype}"
        )
        torch._check_value(
            p.device == x.device, lambda i=i, p=p: f"{op}: params[{i}] is on {p.device} but x on {x.device}"
        )
    if buffers is None:
        return
    torch._check_value(
        len(buffers) == 3 and all(len(b) == spec.n_norms for b in buffers),
        lambda: f"{op}: buffers must be three lists of {spec.n_norms} tensors (running means, variances, counts)",
    )
    for name, lst in zip(("running_mean", "running_var"), buffers[:2]):
        for i, t in enumerate(lst):
            torch._check_value(
                tuple(t.shape) == (C,),
                lambda n=name, i=i, t=t: f"{op}: {n}[{i}] must have shape ({C},), got {tuple(t.shape)}",
            )


def _param_shapes(spec: EdgeSpec, C: int) -> list[tuple[int, ...]]:
    """The shape of each parameter, in EdgeSpec's order."""
    shapes = []
    for k, _ in spec.sep:
        shapes += [(C, 1, k, k), (C, C, 1, 1), (C, 1, k, k), (C, C, 1, 1)]
    for k, _ in spec.dil:
        shapes += [(C, 1, k, k), (C, C, 1, 1)]
    if spec.reduce_index is not None:
        shapes += [(C // 2, C, 1, 1), (C - C // 2, C, 1, 1)]
    return shapes


def darts_edge(
    x: torch.Tensor,
    weights: torch.Tensor,
    params,
    spec: EdgeSpec,
    buffers=None,
    *,
    memory: str = "save",
    backend: str | None = None,
) -> torch.Tensor:
    """The output of one fused DARTS edge, ``sum_k weights[k] * op_k(x)``, in training mode.

    ``params`` are the candidates' convolution weights in the order ``EdgeSpec``
    gives; ``buffers`` is None or three lists (running means, running variances,
    num_batches_tracked) updated in place as ``nn.BatchNorm2d`` would.

    Where the C++ op has a kernel for the backend (``cpu``, ``cuda``), this is one call of
    ``torch.ops.fastnas.darts_edge`` forward and one of its backward, which check
    their arguments; elsewhere (``triton``, ``reference``) the edge runs as the
    Python composite of the same building blocks.
    """
    cast = autocast_dtype(x)
    if cast is not None:
        # Autocast would run the candidates' convolutions in its dtype: so does the edge, on
        # cast copies of x and the convolution weights (their gradients flow back through the
        # casts), while the running statistics stay in their own dtype, updated in place.
        with torch.autocast(x.device.type, enabled=False):
            return darts_edge(
                x.to(cast), weights, [p.to(cast) for p in params], spec, buffers, memory=memory, backend=backend
            )
    name = backends.resolve("darts_edge", x.device, backend)
    if name in _CPP_BACKENDS:
        if buffers is None:
            buffers = ((), (), ())
        elif len(buffers) != 3:
            raise ValueError(f"darts_edge: buffers must be three lists of {spec.n_norms} tensors")
        return torch.ops.fastnas.darts_edge(
            x, weights, params, buffers[0], buffers[1], buffers[2], spec.encoded, spec.eps, spec.momentum, memory
        )[0]
    params = tuple(params)
    _check("darts_edge", x, weights, params, spec, buffers, memory)
    return DartsEdgeFunction.apply(x, weights, spec, memory, name, buffers, *params)


# --- the C++ op: fake implementations ------------------------------------------------------


def _fake_forward(x, weights, params, running_mean, running_var, num_batches_tracked, spec, eps, momentum, memory):
    spec = EdgeSpec.decode(spec, eps, momentum)
    buffers = (running_mean, running_var, num_batches_tracked) if running_mean or running_var else None
    _check("darts_edge", x, weights, list(params), spec, buffers, memory)
    N, C, H, W = x.shape
    Ho, Wo = (H - 1) // spec.stride + 1, (W - 1) // spec.stride + 1
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        x.new_empty((N, C, Ho, Wo)),
        x.new_empty((spec.nz, C, N, Ho, Wo)),
        x.new_empty((spec.ns, C), dtype=acc),
        x.new_empty((spec.ns, C), dtype=acc),
        x.new_empty((spec.nz + 2, C), dtype=acc),
        x.new_empty((spec.nz + 2, C), dtype=acc),
    )


def _fake_backward(grad_out, x, weights, params, zs, mid_mean, mid_rstd, mean, rstd, spec):
    spec = EdgeSpec.decode(spec)
    _check("darts_edge_backward", x, weights, list(params), spec, None, "save")
    torch._check_value(
        grad_out.shape[:2] == x.shape[:2], lambda: f"darts_edge_backward: grad_out has shape {tuple(grad_out.shape)}"
    )
    return x.new_empty(x.shape), weights.new_empty(weights.shape), [p.new_empty(p.shape) for p in params]


# The backends whose C++ kernels run the whole edge ('cpu', 'cuda'); the C++ op has its own
# autograd. Where it lacks a device's kernel (a build older than it), the Python composite of
# the building blocks runs on that device's backend.
_CPP_BACKENDS = register_op("darts_edge", _fake_forward, fake_backward=_fake_backward, python=("cpu", "cuda", "triton"))


__all__ = ["DTYPES", "EdgeSpec", "FUSED_ACTIVATIONS", "MEMORY_MODES", "darts_edge", "unsupported_reason"]
