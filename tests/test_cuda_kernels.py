"""The CUDA C++ kernels of the memory engine's ops against the eager references.

Each numeric test calls the C++ op itself (torch.ops.fastnas.<op>, which the
dispatcher sends to the CUDA kernel for CUDA tensors) and judges it by the
oracle rule of tests/oracle.py (flash-attention's): its error against a float64
oracle is at most twice the error of the eager reference in the same dtype, with
the floor that file gives for reductions (weights' gradients, batch statistics).
New outputs are poisoned (NaN) so an element a kernel never writes fails the test.

Targets:
  cuda       the kernels on the GPU (requires_cuda); also opcheck, autograd
             through the public ops, and capture of every op in a CUDA graph.
  emulation  the same kernel code compiled for the host and run on CPU tensors
             by the emulation in csrc/cuda/emulation.h (torch.ops.fastnas_emu);
             built on first use (a few minutes), only when
             FASTNAS_CUDA_EMULATION=1. It checks the kernels' logic, not their
             speed or the GPU's rounding (no fused multiply-adds).
"""

import pytest
import torch
from oracle import assert_oracle

from fastnas import backends
from fastnas.bench.emulation import emulation_requested, load_emulation
from fastnas.ops.activations import activation_code
from fastnas.ops.darts_sum import (
    darts_sum,
    darts_sum_backward_reference,
    darts_sum_reference,
    pool_batch_norm_stats_reference,
)
from fastnas.ops.multi_depthwise import multi_depthwise, multi_depthwise_backward_reference, multi_depthwise_reference
from fastnas.ops.partial_channel_node_sum import partial_channel_node_sum, partial_channel_node_sum_reference
from fastnas.ops.stacked_batch_norm import (
    stacked_batch_norm_backward_reference,
    stacked_batch_norm_stats_reference,
    update_running_stats,
    update_running_stats_reference,
)

LOW = [torch.float16, torch.bfloat16]
DARTS = [(3, 1), (5, 1), (3, 2), (5, 2)]  # (kernel size, dilation) of the DARTS depthwise candidates


# --- targets ------------------------------------------------------------------------


def _emulated_ops():
    """Build (once per process) and load the host emulation of the CUDA kernels."""
    if not emulation_requested():
        pytest.skip("set FASTNAS_CUDA_EMULATION=1 to run the CUDA kernels in the host emulation")
    if backends.extension() is None:
        pytest.skip("fastnas._C is not built: the emulated ops copy its schemas")
    return load_emulation()


class Target:
    def __init__(self, name, ops, device):
        self.name, self.ops, self.device = name, ops, torch.device(device)

    def __call__(self, t):
        """t on this target's device (inputs are drawn on the CPU)."""
        return t.to(self.device)


@pytest.fixture(
    params=[
        pytest.param("cuda", marks=pytest.mark.requires_cuda),
        pytest.param("emulation"),
    ]
)
def target(request):
    if request.param == "cuda":
        if backends.backend_status()["cuda"]:
            pytest.skip(backends.backend_status()["cuda"])
        return Target("cuda", torch.ops.fastnas, "cuda")
    return Target("emulation", _emulated_ops(), "cpu")


@pytest.fixture
def cuda():
    """The real GPU target, for what only a GPU has: opcheck, autograd, CUDA graphs."""
    if backends.backend_status()["cuda"]:
        pytest.skip(backends.backend_status()["cuda"])
    return Target("cuda", torch.ops.fastnas, "cuda")


# --- helpers ------------------------------------------------------------------------


def randn(*shape, dtype=torch.float32, seed=0, loc=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) + loc).to(dtype)


def flat(values):
    if isinstance(values, torch.Tensor):
        return [values]
    return [t for v in values for t in flat(v)]


def tensor_args(args):
    """The tensors among args and the lists in args."""
    return [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]


def assert_bit_identical(run):
    first, second = flat(run()), flat(run())
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8)), f"output {i} differs between runs"


# --- multi_depthwise ------------------------------------------------------------------


def depthwise_inputs(cands, mode, shape, dtype, seed):
    n, c, h, w = shape
    j = len(cands)
    x = randn(*((n, c, h, w) if mode == "shared" else (j, c, n, h, w)), dtype=dtype, seed=seed)
    ws = [randn(c, 1, k, k, dtype=dtype, seed=seed + 1 + i) for i, (k, _) in enumerate(cands)]
    mean = rstd = None
    if mode == "batch-norm":
        mean = 0.5 * randn(j, c, seed=seed + 10)
        rstd = 0.5 + randn(j, c, seed=seed + 11).abs()
    return x, ws, [d for _, d in cands], mean, rstd


def check_multi_depthwise(target, cands, mode, shape, stride, dtype, seed=0, activations="relu"):
    x, ws, ds, mean, rstd = depthwise_inputs(cands, mode, shape, dtype, seed)
    T = target
    dev = [T(w) for w in ws]
    m, r = (None, None) if mean is None else (T(mean), T(rstd))
    acts = [activations] * len(cands) if isinstance(activations, str) else list(activations)
    codes = [activation_code(a) for a in acts]
    out = T.ops.multi_depthwise(T(x), dev, ds, stride, m, r, codes)
    lowp = multi_depthwise_reference(x, ws, ds, stride, mean, rstd, acts)
    x64, w64 = x.double(), [w.double() for w in ws]
    assert_oracle(out, lowp, multi_depthwise_reference(x64, w64, ds, stride, mean, rstd, acts), "out")

    g = randn(*out.shape, dtype=dtype, seed=seed + 20)
    grad_pre, grad_ws = T.ops.multi_depthwise_backward(T(g), T(x), dev, ds, stride, m, r, True, codes)
    lowp_pre, lowp_ws = multi_depthwise_backward_reference(g, x, ws, ds, stride, mean, rstd, True, acts)
    ref_pre, ref_ws = multi_depthwise_backward_reference(g.double(), x64, w64, ds, stride, mean, rstd, True, acts)
    assert_oracle(grad_pre, lowp_pre, ref_pre, "grad_pre")
    # A weight's gradient sums N*Ho*Wo products: its error scales with their sum.
    scale = g.double().abs().sum().item() * x.double().abs().max().item() / max(1, g.numel()) ** 0.5
    for j, (got, lp, ref) in enumerate(zip(grad_ws, lowp_ws, ref_ws)):
        assert_oracle(got, lp, ref, f"grad_weights[{j}]", scale=scale, reduction=True)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (3, 2, 16, 16)], ids=["7x9", "16x16"])
@pytest.mark.parametrize(
    "cands,mode",
    [(DARTS, "shared"), ([(3, 1), (5, 1)], "batch-norm"), ([(7, 1)], "per-candidate"), ([(9, 1), (3, 3)], "shared")],
    ids=["darts", "sep-second-stage", "k7", "generic-taps"],
)
def test_multi_depthwise(target, poison_empty, cands, mode, shape, stride):
    check_multi_depthwise(target, cands, mode, shape, stride, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_multi_depthwise_dtypes(target, poison_empty, dtype, stride):
    check_multi_depthwise(target, DARTS, "shared", (2, 3, 7, 9), stride, dtype, seed=3)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["shared", "per-candidate", "batch-norm"])
def test_multi_depthwise_activations(target, poison_empty, mode, stride):
    """Candidates of several activations in one call (Scalable-DARTS), and one activation for all."""
    acts = ["relu6", "swish", "elu", "relu"]
    check_multi_depthwise(target, DARTS, mode, (2, 3, 7, 9), stride, torch.float32, seed=11, activations=acts)
    check_multi_depthwise(target, DARTS, mode, (2, 3, 7, 9), stride, torch.float64, seed=12, activations="hardswish")
    check_multi_depthwise(target, [(3, 1), (5, 2)], mode, (2, 3, 7, 9), stride, torch.float32, seed=13,
                          activations=["leaky_relu", "leaky_relu"])  # fmt: skip
    # Activations interleaved: a shared x visits the candidates grouped by activation, and the
    # input gradient adds each activation's share through its own derivative.
    check_multi_depthwise(target, DARTS, mode, (2, 3, 7, 9), stride, torch.float32, seed=14,
                          activations=["swish", "relu", "swish", "relu"])  # fmt: skip


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "cands",
    [[(5, 2), (3, 1)], [(3, 2), (5, 1), (3, 1)], [(3, 1), (3, 1)], [(3, 1), (9, 1), (5, 2)]],
    ids=["two-darts-kinds", "three-darts-kinds", "a-kind-twice", "darts-and-generic"],
)
def test_multi_depthwise_shared_tiles(target, poison_empty, cands, stride):
    """The weights' gradient of a shared x: candidates of distinct DARTS kinds, in any order, read
    each loaded tile together; a kind twice or another kernel size (16 taps at a time) goes a
    candidate at a time. Planes wider than a tile: in the emulation, which aims for 4 blocks,
    each block sums a run of several tiles."""
    check_multi_depthwise(target, cands, "shared", (2, 2, 5, 130), stride, torch.float32, seed=21)
    check_multi_depthwise(target, cands, "shared", (2, 2, 5, 130), stride, torch.bfloat16, seed=22,
                          activations=["swish", "relu", "swish"][: len(cands)])  # fmt: skip


def test_multi_depthwise_large_plane(target, poison_empty):
    """A plane wider than a tile (bands of rows, two column tiles), stride 2."""
    check_multi_depthwise(target, DARTS, "shared", (1, 1, 21, 70), 2, torch.float32, seed=5)


def test_multi_depthwise_without_input_grad(target):
    x, ws, ds, _, _ = depthwise_inputs(DARTS, "shared", (2, 3, 7, 9), torch.float32, 6)
    T = target
    g = randn(4, 3, 2, 7, 9, seed=7)
    grad_pre, grad_ws = T.ops.multi_depthwise_backward(T(g), T(x), [T(w) for w in ws], ds, 1, None, None, False)
    assert grad_pre.numel() == 0
    _, want = multi_depthwise_backward_reference(g, x, ws, ds, 1)
    for got, w in zip(grad_ws, want):
        torch.testing.assert_close(got.cpu(), w, rtol=1e-5, atol=1e-5)


def test_multi_depthwise_bit_identical(target):
    x, ws, ds, _, _ = depthwise_inputs(DARTS, "shared", (3, 4, 9, 9), torch.float32, 8)
    T = target
    g = T(randn(4, 4, 3, 9, 9, seed=9))
    assert_bit_identical(lambda: T.ops.multi_depthwise_backward(g, T(x), [T(w) for w in ws], ds, 1, None, None, True))


# --- stacked batch norm -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 2, 5, 7), (2, 3, 5000)], ids=["small", "two-chunks"])
def test_stacked_batch_norm(target, poison_empty, shape, dtype):
    T = target
    z = randn(*shape, dtype=dtype, seed=1, loc=3.0)  # an offset mean: the variance must not cancel
    got = T.ops.stacked_batch_norm_stats(T(z), 1e-5)
    lowp = stacked_batch_norm_stats_reference(z)
    ref = stacked_batch_norm_stats_reference(z.double())
    for name, a, b, c in zip(("mean", "rstd", "var"), got, lowp, ref):
        assert_oracle(a, b, c, name, reduction=True)
    mean, rstd = ref[0].to(lowp[0].dtype), ref[1].to(lowp[1].dtype)
    g = randn(*shape, dtype=dtype, seed=2)
    grad = T.ops.stacked_batch_norm_backward(T(g), T(z), T(mean), T(rstd))
    assert_oracle(
        grad,
        stacked_batch_norm_backward_reference(g, z, mean, rstd),
        stacked_batch_norm_backward_reference(g.double(), z.double(), mean.double(), rstd.double()),
        "grad_z",
    )


def test_stacked_batch_norm_bit_identical(target):
    T = target
    z, g = T(randn(4, 3, 9000, seed=3)), T(randn(4, 3, 9000, seed=4))
    mean, rstd, _ = T.ops.stacked_batch_norm_stats(z, 1e-5)
    assert_bit_identical(
        lambda: (T.ops.stacked_batch_norm_stats(z, 1e-5), T.ops.stacked_batch_norm_backward(g, z, mean, rstd))
    )


# --- darts_sum and pool_batch_norm_stats -------------------------------------------------


def darts_inputs(shape, jz, stride, dtype, seed=0):
    n, c, h, w = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = randn(n, c, h, w, dtype=dtype, seed=seed)
    # Ties in the max pool: the first maximum wins, as in max_pool2d.
    x.view(-1)[::5] = x.view(-1)[::5].round()
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    z = randn(jz, c, n, ho, wo, dtype=dtype, seed=seed + 1)
    mean = randn(jz + 2, c, dtype=stat, seed=seed + 2)
    rstd = 0.5 + randn(jz + 2, c, dtype=stat, seed=seed + 3).abs()
    coef = randn(jz + 3, dtype=stat, seed=seed + 4)
    g = randn(n, c, ho, wo, dtype=dtype, seed=seed + 5)
    return x, z, mean, rstd, coef, g


def to64(*ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (2, 2, 45, 37)], ids=["7x9", "45x37"])
def test_pool_batch_norm_stats(target, poison_empty, shape, stride, dtype):
    T = target
    x = darts_inputs(shape, 0, stride, dtype)[0]
    got = T.ops.pool_batch_norm_stats(T(x), stride, 1e-5)
    lowp = pool_batch_norm_stats_reference(x, stride)
    ref = pool_batch_norm_stats_reference(x.double(), stride)
    for name, a, b, c in zip(("mean", "rstd", "var"), got, lowp, ref):
        assert_oracle(a, b, c, name, reduction=True)


FLAGS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("jz", [0, 3])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "max{}-avg{}-skip{}".format(*map(int, f)))
def test_darts_sum(target, poison_empty, flags, jz, stride, dtype):
    has_max, has_avg, has_skip = flags
    has_skip = has_skip and stride == 1
    T = target
    x, z, mean, rstd, coef, g = darts_inputs((2, 3, 7, 9), jz, stride, dtype, seed=jz + stride)
    args = (stride, has_max, has_avg, has_skip)
    out = T.ops.darts_sum(T(x), T(z), T(mean), T(rstd), T(coef), *args)
    lowp = darts_sum_reference(x, z, mean, rstd, coef, *args)
    ref = darts_sum_reference(*to64(x, z, mean, rstd, coef), *args)
    assert_oracle(out, lowp, ref, "out")

    got = T.ops.darts_sum_backward(T(g), T(x), T(z), T(mean), T(rstd), T(coef), *args, True)
    lowp = darts_sum_backward_reference(g, x, z, mean, rstd, coef, *args)
    ref = darts_sum_backward_reference(*to64(g, x, z, mean, rstd, coef), *args)
    scale = g.double().abs().sum().item() / max(1, g.numel()) ** 0.5
    # Every gradient here sums over N*Ho*Wo: grad_coef, and the batch norms' means of g and g*yhat
    # in grad_z and grad_x.
    for name, a, b, c in zip(("grad_z", "grad_x", "grad_coef"), got, lowp, ref):
        assert_oracle(a, b, c, name, scale=scale if name == "grad_coef" else None, reduction=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 2, 6, 7), (1, 2, 1, 5), (2, 1, 4, 1), (1, 1, 2, 2)], ids=str)
def test_darts_sum_pool_ties_and_borders(target, poison_empty, shape, stride, dtype):
    """x takes three values, so most max windows tie, and the planes are mostly border: each window
    sends its gradient to its first maximum, as the CPU kernel and max_pool2d do. Jz = 5 gives nine
    backward sums, more than the kernel reduces in one round."""
    T = target
    jz, has_skip = 5, stride == 1
    x, z, mean, rstd, coef, g = darts_inputs(shape, jz, stride, dtype, seed=40 + stride)
    x = x.round().clamp(-1, 1)
    args = (stride, True, True, has_skip)
    got = T.ops.darts_sum_backward(T(g), T(x), T(z), T(mean), T(rstd), T(coef), *args, True)
    cpu = torch.ops.fastnas.darts_sum_backward(g, x, z, mean, rstd, coef, *args, True)
    ref = darts_sum_backward_reference(g, x, z, mean, rstd, coef, *args)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, a, b, c in zip(("grad_z", "grad_x", "grad_coef"), got, cpu, ref):
        torch.testing.assert_close(a.cpu(), b, **tol, msg=lambda m, name=name: f"{name} against the CPU kernel: {m}")
        torch.testing.assert_close(a.cpu(), c, **tol, msg=lambda m, name=name: f"{name} against the reference: {m}")


def test_darts_sum_nan_rules_match_the_cpu_kernel(target):
    """A NaN in a max-pool window wins it, as max_pool2d does: the same outputs are NaN as on the CPU."""
    T = target
    x, z, mean, rstd, coef, g = darts_inputs((2, 3, 7, 9), 2, 1, torch.float32, seed=11)
    x.view(-1)[::13] = float("nan")
    args = (x, z, mean, rstd, coef, 1, True, True, True)
    want = flat([torch.ops.fastnas.pool_batch_norm_stats(x, 1, 1e-5), torch.ops.fastnas.darts_sum(*args)])
    want += flat(torch.ops.fastnas.darts_sum_backward(g, *args, True))
    dev = [T(t) if isinstance(t, torch.Tensor) else t for t in args]
    got = flat([T.ops.pool_batch_norm_stats(T(x), 1, 1e-5), T.ops.darts_sum(*dev)])
    got += flat(T.ops.darts_sum_backward(T(g), *dev, True))
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a.cpu().isnan(), b.isnan()), f"output {i}: NaNs in different places"
        torch.testing.assert_close(a.cpu().nan_to_num(), b.nan_to_num(), rtol=1e-4, atol=1e-4)


def test_darts_sum_without_x_grad(target):
    T = target
    x, z, mean, rstd, coef, g = darts_inputs((2, 3, 7, 9), 2, 1, torch.float32, seed=12)
    grad_z, grad_x, _ = T.ops.darts_sum_backward(
        T(g), T(x), T(z), T(mean), T(rstd), T(coef), 1, True, True, True, False
    )
    assert grad_x.numel() == 0
    want = darts_sum_backward_reference(g, x, z, mean, rstd, coef, 1, True, True, True)[0]
    torch.testing.assert_close(grad_z.cpu(), want, rtol=1e-4, atol=1e-5)


def test_darts_sum_bit_identical(target):
    T = target
    x, z, mean, rstd, coef, g = (T(t) for t in darts_inputs((3, 4, 9, 9), 2, 1, torch.float32, seed=13))
    assert_bit_identical(
        lambda: (
            T.ops.pool_batch_norm_stats(x, 1, 1e-5),
            T.ops.darts_sum_backward(g, x, z, mean, rstd, coef, 1, True, True, True, True),
        )
    )


# --- partial_channel_node_sum -----------------------------------------------------------


def node_inputs(strides, dtype, seed=0, n=2, c=16, k=4, ho=5, wo=6):
    """mixed (N, C/K, Ho, Wo); bypass the views h_e[:, C/K:] of the edge inputs; weights; grad_out."""
    cp = c // k
    mixed = [randn(n, cp, ho, wo, dtype=dtype, seed=seed + e) for e in range(len(strides))]
    hs = [randn(n, c, s * ho, s * wo, dtype=dtype, seed=seed + 10 + e) for e, s in enumerate(strides)]
    for h in hs:
        h.view(-1)[::7] = h.view(-1)[::7].round()  # ties in the 2x2 pools
    weights = randn(len(strides), seed=seed + 20).softmax(0)
    g = randn(n, c, ho, wo, dtype=dtype, seed=seed + 21)
    return mixed, hs, weights, g


def node_oracle(mixed, hs, weights, g, strides, cp, dtype, weights_dtype=torch.float32):
    """Output and gradients (mixed, bypass, weights) of the eager reference in dtype."""
    leaves = [t.to(dtype).requires_grad_() for t in mixed + hs] + [weights.to(weights_dtype).requires_grad_()]
    ms, hd, w = leaves[: len(mixed)], leaves[len(mixed) : -1], leaves[-1]
    with torch.enable_grad():
        out = partial_channel_node_sum_reference(ms, [h[:, cp:] for h in hd], w, 4, strides)
        grads = torch.autograd.grad(out, leaves, g.to(dtype))
    grad_bypass = [gh[:, cp:] for gh in grads[len(mixed) : -1]]
    return out.detach(), list(grads[: len(mixed)]), grad_bypass, grads[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("strides", [[1, 2, 1], [2], [1, 1]], ids=str)
def test_partial_channel_node_sum(target, poison_empty, strides, dtype):
    T = target
    mixed, hs, weights, g = node_inputs(strides, dtype)
    cp = mixed[0].shape[1]
    bypass = [T(h)[:, cp:] for h in hs]  # strided views, as the cells pass them
    need = [True] * len(strides)
    out = T.ops.partial_channel_node_sum([T(m) for m in mixed], bypass, T(weights), 4, strides)
    gm, gb, gw = T.ops.partial_channel_node_sum_backward(
        T(g), [T(m) for m in mixed], bypass, T(weights), 4, strides, need, need, True
    )
    lowp = node_oracle(mixed, hs, weights, g, strides, cp, dtype)
    ref = node_oracle(mixed, hs, weights, g, strides, cp, torch.float64, torch.float64)
    assert_oracle(out, lowp[0], ref[0], "out")
    for e in range(len(strides)):
        assert_oracle(gm[e], lowp[1][e], ref[1][e], f"grad_mixed[{e}]")
        assert_oracle(gb[e], lowp[2][e], ref[2][e], f"grad_bypass[{e}]")
    scale = g.double().abs().sum().item() / max(1, g.numel()) ** 0.5
    assert_oracle(gw, lowp[3], ref[3], "grad_weights", scale=scale, reduction=True)


def test_partial_channel_node_sum_bit_identical(target):
    T = target
    strides = [1, 2, 1]
    mixed, hs, weights, g = node_inputs(strides, torch.float32, seed=3, n=4, c=32, ho=9, wo=11)
    args = ([T(m) for m in mixed], [T(h)[:, 8:] for h in hs], T(weights), 4, strides)
    need = [True] * 3
    assert_bit_identical(lambda: T.ops.partial_channel_node_sum_backward(T(g), *args, need, need, True))


# --- errors at the op boundary -----------------------------------------------------------


def _bad_calls(T):
    x, ws = T(randn(2, 3, 7, 7)), [T(randn(3, 1, 3, 3))]
    yield lambda: T.ops.multi_depthwise(x.int(), ws, [1], 1, None, None), "x has dtype"
    yield lambda: T.ops.multi_depthwise(x, [T(randn(3, 1, 15, 15))], [3], 1, None, None), "padding of at most 16"
    yield lambda: T.ops.multi_depthwise(x, ws * 17, [1] * 17, 1, None, None), "at most 16 per call"
    yield lambda: T.ops.stacked_batch_norm_backward(x[:1], x, T(torch.zeros(2, 3)), T(torch.ones(2, 3))), "grad_yhat"
    yield lambda: T.ops.pool_batch_norm_stats(x, 0, 1e-5), "stride must be >= 1"
    z = T(randn(1, 2, 2, 7, 7))
    stats, coef = T(torch.ones(3, 3)), T(torch.ones(4))
    yield lambda: T.ops.darts_sum(x, z, stats, stats, coef, 1, True, True, True), "z must be"
    m, b = T(randn(1, 2, 3, 3)), T(randn(1, 6, 3, 3))
    yield lambda: T.ops.partial_channel_node_sum([m] * 33, [b] * 33, T(torch.ones(33)), 2, [1] * 33), "at most 32"
    yield lambda: T.ops.partial_channel_node_sum([m, m], [b, b], T(torch.ones(2)), 3, [1, 1]), "groups=3"


def test_errors_name_the_problem(target):
    for call, message in _bad_calls(target):
        with pytest.raises(RuntimeError, match=message):
            call()


# --- GPU only: update_running_stats, opcheck, autograd, CUDA graphs ---------------------------


@pytest.mark.requires_cuda
def test_update_running_stats_on_cuda(cuda):
    mean, var = randn(4, 5), randn(4, 5).abs()
    bufs = [[randn(5, seed=i) for i in range(3)], [randn(5, seed=9 + i).abs() for i in range(3)]]
    nbt = [torch.tensor(i) for i in range(3)]
    want = [[t.clone() for t in b] for b in bufs] + [[t.clone() for t in nbt]]
    update_running_stats_reference(*want, mean, var, [3, 0, 2], 0.1, 40)
    got = [[cuda(t) for t in b] for b in bufs] + [[cuda(t) for t in nbt]]
    update_running_stats(*got, cuda(mean), cuda(var), [3, 0, 2], 0.1, 40)
    for a, b in zip(flat(got), flat(want)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)


def _op_cases(T):
    """(op, args) for every op with CUDA kernels: small inputs on the GPU."""
    x, ws = T(randn(2, 3, 7, 9)), [T(randn(3, 1, k, k, seed=k)) for k, _ in DARTS]
    ds = [d for _, d in DARTS]
    g = T(randn(4, 3, 2, 7, 9, seed=1))
    yield torch.ops.fastnas.multi_depthwise.default, (x, ws, ds, 1, None, None)
    yield torch.ops.fastnas.multi_depthwise_backward.default, (g, x, ws, ds, 1, None, None, True)
    z = T(randn(2, 3, 2, 7, 9, seed=2))
    m, r, _ = torch.ops.fastnas.stacked_batch_norm_stats(z, 1e-5)
    yield torch.ops.fastnas.stacked_batch_norm_stats.default, (z, 1e-5)
    yield torch.ops.fastnas.stacked_batch_norm_backward.default, (T(randn(2, 3, 2, 7, 9, seed=3)), z, m, r)
    yield torch.ops.fastnas.pool_batch_norm_stats.default, (x, 1, 1e-5)
    xs, zs, mean, rstd, coef, go = (T(t) for t in darts_inputs((2, 3, 7, 9), 2, 1, torch.float32))
    yield torch.ops.fastnas.darts_sum.default, (xs, zs, mean, rstd, coef, 1, True, True, True)
    yield torch.ops.fastnas.darts_sum_backward.default, (go, xs, zs, mean, rstd, coef, 1, True, True, True, True)
    mixed, hs, weights, gn = node_inputs([1, 2], torch.float32)
    node = ([T(t) for t in mixed], [T(h)[:, 4:] for h in hs], T(weights), 4, [1, 2])
    yield torch.ops.fastnas.partial_channel_node_sum.default, node
    yield torch.ops.fastnas.partial_channel_node_sum_backward.default, (T(gn), *node, [True] * 2, [True] * 2, True)


@pytest.mark.requires_cuda
def test_opcheck(cuda):
    import fastnas.ops  # noqa: F401  (fake impls and autograd are registered by the op modules)

    for op, args in _op_cases(cuda):
        torch.library.opcheck(op, args)


@pytest.mark.requires_cuda
def test_autograd_through_the_public_ops(cuda):
    """multi_depthwise, darts_sum and partial_channel_node_sum with backend="cuda" give the
    reference's gradients."""
    x, ws, ds, _, _ = depthwise_inputs(DARTS, "shared", (2, 3, 7, 9), torch.float64, 30)
    leaves = [cuda(t).requires_grad_() for t in (x, *ws)]
    got = torch.autograd.grad(multi_depthwise(leaves[0], leaves[1:], ds, 2, backend="cuda").sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, *ws)]
    want = torch.autograd.grad(multi_depthwise_reference(ref_leaves[0], ref_leaves[1:], ds, 2).sum(), ref_leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)

    xs, zs, mean, rstd, coef, _ = darts_inputs((2, 3, 7, 9), 2, 1, torch.float64, seed=31)
    leaves = [cuda(t).requires_grad_() for t in (xs, zs, coef)]
    out = darts_sum(leaves[0], leaves[1], cuda(mean), cuda(rstd), leaves[2], 1, True, True, True, backend="cuda")
    got = torch.autograd.grad((out * out).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (xs, zs, coef)]
    out = darts_sum(ref_leaves[0], ref_leaves[1], mean, rstd, ref_leaves[2], 1, True, True, True, backend="reference")
    want = torch.autograd.grad((out * out).sum(), ref_leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)

    mixed, hs, weights, _ = node_inputs([2, 1], torch.float64, seed=32)
    leaves = [cuda(t).requires_grad_() for t in (*mixed, *hs, weights)]
    out = partial_channel_node_sum(leaves[:2], [h[:, 4:] for h in leaves[2:4]], leaves[4], 4, [2, 1], backend="cuda")
    got = torch.autograd.grad((out * out).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (*mixed, *hs, weights)]
    out = partial_channel_node_sum_reference(
        ref_leaves[:2], [h[:, 4:] for h in ref_leaves[2:4]], ref_leaves[4], 4, [2, 1]
    )
    want = torch.autograd.grad((out * out).sum(), ref_leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)


@pytest.mark.requires_cuda
def test_every_op_captures_in_a_cuda_graph(cuda):
    """Each op, captured and replayed after its inputs changed in place, gives what an eager call
    gives on the new inputs: it launches on the current stream, with no host sync or copy."""
    for op, args in _op_cases(cuda):
        tensors = [t for t in tensor_args(args) if t.is_floating_point()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            op(*args)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = op(*args)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for t in tensors:
            t.mul_(1 + 0.1 * torch.rand(t.shape, device="cuda", generator=gen, dtype=t.dtype))
        graph.replay()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(flat(captured), flat(op(*args)))):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, i=i, op=op: f"{op} output {i}: {m}")

    rm, rv, nbt = [cuda(randn(5))], [cuda(randn(5).abs())], [cuda(torch.tensor(0))]
    mean, var = cuda(randn(2, 5)), cuda(randn(2, 5).abs())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update_running_stats(rm, rv, nbt, mean, var, [1], 0.1, 10)
    want = [[t.clone() for t in b] for b in (rm, rv, nbt)]
    update_running_stats_reference(*want, mean, var, [1], 0.1, 10)
    graph.replay()
    for a, b in zip(flat([rm, rv, nbt]), flat(want)):
        torch.testing.assert_close(a, b)
