"""stacked_batch_norm_stats / _backward and update_running_stats against PyTorch's batch norm."""

import pytest
import torch
import torch.nn.functional as F

from fastnas import backends
from fastnas.ops.stacked_batch_norm import (
    stacked_batch_norm_backward,
    stacked_batch_norm_backward_reference,
    stacked_batch_norm_stats,
    stacked_batch_norm_stats_reference,
    update_running_stats,
)

CASES = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpreter"),
    pytest.param(("reference", "cuda"), id="reference-cuda", marks=pytest.mark.requires_cuda),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.requires_cuda),
]
# (J, C, N, H, W) with odd sizes; rows of 1, 5 and a few hundred values.
SHAPES = [(1, 3, 2, 5, 7), (2, 5, 3, 4, 4), (3, 1, 1, 1, 5), (4, 2, 1, 1, 2), (5, 3, 7, 3, 5)]
SLACK = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(params=CASES)
def case(request):
    name, device = request.param
    why = backends.backend_status()[name]
    if why:
        pytest.skip(f"backend {name} unavailable: {why}")
    return name, torch.device(device)


def _data(shape, dtype, device, loc=0.0, scale=1.0, contiguous=True, gen=None):
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + loc
    if not contiguous:
        # Candidate-minor in memory: a (J, C, ...) view of a (C, J, ...) tensor.
        t = t.transpose(0, 1).contiguous().transpose(0, 1)
    return t.to(device=device, dtype=dtype)


def _candidate(z, j):
    """Candidate j of a (J, C, N, *hw) stack as the (N, C, *hw) batch a BatchNorm sees."""
    return z[j].transpose(0, 1)


def _torch_stats(z, eps):
    """mean, rstd and biased var from aten's own batch norm, one candidate at a time."""
    means, rstds = [], []
    for j in range(z.shape[0]):
        _, mean, rstd = torch.ops.aten.native_batch_norm(_candidate(z, j), None, None, None, None, True, 0.1, eps)
        means.append(mean)
        rstds.append(rstd)
    var = torch.stack(
        [_candidate(z, j).transpose(0, 1).reshape(z.shape[1], -1).var(1, correction=0) for j in range(z.shape[0])]
    )
    return torch.stack(means), torch.stack(rstds), var


def _assert_close_to(got, want64, lowp_ref, what, scale=None):
    """At most twice the same-dtype reference's error against the fp64 truth, plus slack."""
    assert got.shape == want64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    got64 = got.detach().double().cpu()
    want64 = want64.detach().double().cpu()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values"
    ref_err = (lowp_ref.detach().double().cpu() - want64).abs().max().item()
    scale = want64.abs().max().item() if scale is None else scale
    err = (got64 - want64).abs().max().item()
    bound = 2 * ref_err + SLACK[got.dtype if got.dtype in SLACK else torch.float32] * max(scale, 1.0)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


# -- statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stats_match_batch_norm(case, shape, dtype, poison_empty):
    name, device = case
    z = _data(shape, dtype, device, loc=0.5, scale=2.0)
    eps = 1e-3
    mean, rstd, var = stacked_batch_norm_stats(z, eps, backend=name)
    assert mean.dtype == rstd.dtype == var.dtype == dtype
    assert mean.shape == rstd.shape == var.shape == shape[:2]
    want = _torch_stats(z.double(), eps)
    low = _torch_stats(z, eps)
    for got, w, lo, what in zip((mean, rstd, var), want, low, ("mean", "rstd", "var")):
        _assert_close_to(got, w, lo, what)
    # The normalised candidates are what F.batch_norm gives.
    yhat = (z - mean.view(*shape[:2], 1, 1, 1)) * rstd.view(*shape[:2], 1, 1, 1)
    for j in range(shape[0]):
        ref = F.batch_norm(_candidate(z, j), None, None, training=True, eps=eps)
        torch.testing.assert_close(_candidate(yhat, j), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stats_low_precision(case, dtype):
    name, device = case
    z = _data((3, 4, 3, 5, 5), dtype, device, loc=3.0)
    got = stacked_batch_norm_stats(z, backend=name)
    want = stacked_batch_norm_stats_reference(z.double())
    for g, w, what in zip(got, want, ("mean", "rstd", "var")):
        assert g.dtype == torch.float32, what
        torch.testing.assert_close(g.double().cpu(), w.cpu(), rtol=1e-5, atol=1e-5)


def test_stats_large_mean_fp32(case):
    """Rows of 64*32*32 values around 1000 with std 1: no digits lost to the mean."""
    name, device = case
    shape = (2, 3, 64, 32, 32) if name != "triton" or device.type == "cuda" else (1, 2, 16, 32, 32)
    gen = torch.Generator().manual_seed(0)
    z = _data(shape, torch.float32, device, loc=1000.0, gen=gen)
    mean, rstd, var = stacked_batch_norm_stats(z, backend=name)
    t_mean, t_rstd, t_var = stacked_batch_norm_stats_reference(z.double())
    # The mean within an ulp of 1000 (6.1e-5); var and rstd to a few fp32 ulps.
    assert (mean.double().cpu() - t_mean.cpu()).abs().max().item() <= 6.2e-5
    torch.testing.assert_close(var.double().cpu(), t_var.cpu(), rtol=2e-6, atol=0)
    torch.testing.assert_close(rstd.double().cpu(), t_rstd.cpu(), rtol=2e-6, atol=0)


def test_stats_many_segments(case, monkeypatch):
    """Small blocks in the Triton kernels: rows split over several programs and chunks."""
    name, device = case
    if name == "triton":
        from fastnas.kernels import stacked_batch_norm as kernels

        monkeypatch.setattr(kernels, "_MAX_BLOCK", 16)
        monkeypatch.setattr(kernels, "_MIN_CHUNKS_PER_PROGRAM", 3)
    z = _data((2, 3, 5, 7, 9), torch.float32, device, loc=-200.0, scale=0.5)
    got = stacked_batch_norm_stats(z, backend=name)
    want = stacked_batch_norm_stats_reference(z.double())
    low = stacked_batch_norm_stats_reference(z)
    for g, w, lo, what in zip(got, want, low, ("mean", "rstd", "var")):
        _assert_close_to(g, w, lo, what)
    g = _data(z.shape, torch.float32, device)
    out = stacked_batch_norm_backward(g, z, got[0], got[1], backend=name)
    ref = stacked_batch_norm_backward_reference(g.double(), z.double(), want[0], want[1])
    _assert_close_to(out, ref, stacked_batch_norm_backward_reference(g, z, low[0], low[1]), "grad_z")


def test_stats_non_contiguous(case):
    name, device = case
    z = _data((3, 4, 2, 3, 5), torch.float32, device, contiguous=False)
    assert not z.is_contiguous()
    got = stacked_batch_norm_stats(z, backend=name)
    want = stacked_batch_norm_stats_reference(z.contiguous())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_stats_deterministic(case):
    name, device = case
    z = _data((3, 5, 4, 9, 9), torch.float32, device, loc=10.0)
    first = stacked_batch_norm_stats(z, backend=name)
    for _ in range(2):
        again = stacked_batch_norm_stats(z, backend=name)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_stats_empty_stack(case):
    name, device = case
    z = torch.randn(0, 3, 2, 2, device=device)
    mean, rstd, var = stacked_batch_norm_stats(z, backend=name)
    assert mean.shape == rstd.shape == var.shape == (0, 3)


# -- backward ----------------------------------------------------------------------------


def _autograd_backward(z, g, eps):
    """grad_z through F.batch_norm(training=True), one candidate at a time."""
    z = z.detach().requires_grad_()
    outs = [F.batch_norm(_candidate(z, j), None, None, training=True, eps=eps) for j in range(z.shape[0])]
    grads = [_candidate(g, j) for j in range(z.shape[0])]
    (gz,) = torch.autograd.grad(outs, [z], grads)
    return gz


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_autograd(case, shape, dtype, poison_empty):
    name, device = case
    eps = 1e-3
    z = _data(shape, dtype, device, loc=-0.5, scale=1.5)
    g = _data(shape, dtype, device)
    mean, rstd, _ = stacked_batch_norm_stats(z, eps, backend=name)
    got = stacked_batch_norm_backward(g, z, mean, rstd, backend=name)
    assert got.dtype == dtype and got.shape == z.shape and got.is_contiguous()
    want = _autograd_backward(z.double(), g.double(), eps)
    low = _autograd_backward(z, g, eps)
    _assert_close_to(got, want, low, "grad_z")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_low_precision(case, dtype):
    name, device = case
    z = _data((2, 3, 3, 5, 5), dtype, device, loc=1.0)
    g = _data(z.shape, dtype, device)
    mean, rstd, _ = stacked_batch_norm_stats(z, backend=name)
    got = stacked_batch_norm_backward(g, z, mean, rstd, backend=name)
    assert got.dtype == dtype
    m64, r64, _ = stacked_batch_norm_stats_reference(z.double())
    want = stacked_batch_norm_backward_reference(g.double(), z.double(), m64, r64)
    low = stacked_batch_norm_backward_reference(g, z, *stacked_batch_norm_stats_reference(z)[:2])
    _assert_close_to(got, want, low, "grad_z")


def test_backward_non_contiguous_and_deterministic(case):
    name, device = case
    z = _data((3, 4, 2, 5, 3), torch.float32, device, contiguous=False)
    g = _data(z.shape, torch.float32, device, contiguous=False)
    mean, rstd, _ = stacked_batch_norm_stats(z, backend=name)
    got = stacked_batch_norm_backward(g, z, mean, rstd, backend=name)
    want = stacked_batch_norm_backward_reference(g.contiguous(), z.contiguous(), mean, rstd)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, stacked_batch_norm_backward(g, z, mean, rstd, backend=name))


def test_backward_fp64_stats_for_fp32_input(case):
    """mean and rstd may come in fp64; the kernels take them in the accumulation dtype."""
    name, device = case
    z = _data((2, 3, 4, 5), torch.float32, device)
    g = _data(z.shape, torch.float32, device)
    mean, rstd, _ = stacked_batch_norm_stats_reference(z.double())
    got = stacked_batch_norm_backward(g, z, mean, rstd, backend=name)
    want = stacked_batch_norm_backward_reference(g, z, mean.float(), rstd.float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- opcheck, torch.compile ------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpp", "triton"])
def test_opcheck(case, suffix):
    name, device = case
    if (suffix == "_triton") != (name == "triton") or name == "reference":
        pytest.skip("op belongs to another backend")
    z = torch.randn(3, 4, 2, 3, 3, device=device)
    g = torch.randn_like(z)
    mean, rstd, _ = stacked_batch_norm_stats_reference(z)
    ops = torch.ops.fastnas
    torch.library.opcheck(getattr(ops, "stacked_batch_norm_stats" + suffix), (z, 1e-5))
    backward = ops.stacked_batch_norm_backward if suffix == "" else ops.stacked_batch_norm_backward_triton
    torch.library.opcheck(backward, (g, z, mean, rstd))


def test_compile_fullgraph(case):
    name, device = case

    def step(z, g):
        mean, rstd, var = stacked_batch_norm_stats(z, backend=name)
        return stacked_batch_norm_backward(g, z, mean, rstd, backend=name), var

    z = torch.randn(2, 3, 2, 4, 4, device=device)
    g = torch.randn_like(z)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(z, g)
    want = step(z, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- running statistics ------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.37])
def test_update_running_stats_matches_batch_norm_modules(case, momentum):
    name, device = case
    j, c = 4, 5
    rows = [3, 0, 2]
    modules = [torch.nn.BatchNorm2d(c, affine=False, momentum=momentum).to(device).train() for _ in rows]
    for mod in modules:
        mod.running_mean.normal_()
        mod.running_var.uniform_(0.5, 2.0)
    rm = [m.running_mean.clone() for m in modules]
    rv = [m.running_var.clone() for m in modules]
    nbt = [m.num_batches_tracked.clone() for m in modules]
    for step in range(3):
        z = _data((j, c, 3, 5, 4), torch.float32, device, loc=float(step), scale=2.0)
        for mod, r in zip(modules, rows):
            mod(_candidate(z, r))
        mean, _, var = stacked_batch_norm_stats(z, backend=name)
        update_running_stats(rm, rv, nbt, mean, var, rows, momentum, 3 * 5 * 4)
    for i, mod in enumerate(modules):
        assert rm[i].dtype == mod.running_mean.dtype and nbt[i].dtype == torch.int64
        torch.testing.assert_close(rm[i], mod.running_mean, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(rv[i], mod.running_var, rtol=2e-6, atol=1e-6)
        assert torch.equal(nbt[i], mod.num_batches_tracked)


def test_update_running_stats_keeps_buffer_dtypes():
    modules = [torch.nn.BatchNorm2d(3, affine=False).double().train() for _ in range(2)]
    z = torch.randn(2, 3, 4, 5, 5, dtype=torch.float64)
    rm = [m.running_mean.clone() for m in modules]
    rv = [m.running_var.clone() for m in modules]
    nbt = [m.num_batches_tracked.clone() for m in modules]
    for mod, r in zip(modules, [1, 0]):
        mod(_candidate(z, r))
    mean, _, var = stacked_batch_norm_stats_reference(z)
    update_running_stats(rm, rv, nbt, mean, var, [1, 0], 0.1, 100)
    for i, mod in enumerate(modules):
        assert rm[i].dtype == rv[i].dtype == torch.float64
        torch.testing.assert_close(rm[i], mod.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(rv[i], mod.running_var, rtol=1e-12, atol=1e-14)
    # fp32 buffers fed fp64 statistics stay fp32.
    rm32, rv32, nbt32 = [torch.zeros(3)], [torch.ones(3)], [torch.tensor(0)]
    update_running_stats(rm32, rv32, nbt32, mean, var, [0], 0.1, 100)
    assert rm32[0].dtype == rv32[0].dtype == torch.float32 and nbt32[0].item() == 1


def test_update_running_stats_opcheck():
    mean, var = torch.randn(3, 4), torch.rand(3, 4)
    args = (
        [torch.zeros(4), torch.zeros(4)],
        [torch.ones(4), torch.ones(4)],
        [torch.tensor(0), torch.tensor(5)],
        mean,
        var,
        [2, 1],
        0.1,
        10,
    )
    torch.library.opcheck(torch.ops.fastnas.update_running_stats, args)


def _bad_updates():
    mean, var = torch.randn(3, 4), torch.rand(3, 4)
    rm, rv, nbt = [torch.zeros(4)] * 2, [torch.ones(4)] * 2, [torch.tensor(0)] * 2
    up = update_running_stats
    yield (
        "rows long",
        lambda: up(rm, rv, nbt, mean, var, [0, 1, 2], 0.1, 8),
        ValueError,
        "running_mean has 2 tensors but rows has 3",
    )
    yield "var list", lambda: up(rm, rv[:1], nbt, mean, var, [0, 1], 0.1, 8), ValueError, "running_var has 1 tensors"
    yield "nbt list", lambda: up(rm, rv, nbt[:1], mean, var, [0, 1], 0.1, 8), ValueError, "num_batches_tracked has 1"
    yield "row range", lambda: up(rm, rv, nbt, mean, var, [0, 3], 0.1, 8), IndexError, "rows[1]=3 is out of range"
    yield "row negative", lambda: up(rm, rv, nbt, mean, var, [-1, 0], 0.1, 8), IndexError, "rows[0]=-1"
    yield (
        "buffer shape",
        lambda: up([torch.zeros(5)] * 2, rv, nbt, mean, var, [0, 1], 0.1, 8),
        ValueError,
        "running_mean[0] has shape (5,)",
    )
    yield "stat shapes", lambda: up(rm, rv, nbt, mean, var[:2], [0, 1], 0.1, 8), ValueError, "var has"
    yield "count", lambda: up(rm, rv, nbt, mean, var, [0, 1], 0.1, 1), ValueError, "count=1"
    yield (
        "not a list",
        lambda: up(torch.zeros(2, 4), rv, nbt, mean, var, [0, 1], 0.1, 8),
        TypeError,
        "running_mean must be a list",
    )


@pytest.mark.parametrize("label,call,exc,message", list(_bad_updates()), ids=[c[0] for c in _bad_updates()])
def test_update_running_stats_bad_input(label, call, exc, message):
    with pytest.raises(
        exc, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    ):
        call()


# -- bad input ---------------------------------------------------------------------------


def _bad_inputs():
    z = torch.randn(2, 3, 4, 5)
    g = torch.randn_like(z)
    m, r = torch.zeros(2, 3), torch.ones(2, 3)
    st, bw = stacked_batch_norm_stats, stacked_batch_norm_backward
    yield "z rank", lambda b: st(torch.randn(5), backend=b), ValueError, "z must be (J, C, *rest)"
    yield "z dtype", lambda b: st(z.long(), backend=b), TypeError, "z has dtype torch.int64"
    yield "z type", lambda b: st([1.0], backend=b), TypeError, "z must be a tensor"
    yield "z empty rows", lambda b: st(torch.randn(2, 3, 0), backend=b), ValueError, "no values"
    yield "grad shape", lambda b: bw(g[:1], z, m, r, backend=b), ValueError, "grad_yhat has shape"
    yield "grad dtype", lambda b: bw(g.double(), z, m, r, backend=b), TypeError, "grad_yhat has dtype"
    yield "mean shape", lambda b: bw(g, z, m[:1], r, backend=b), ValueError, "mean has shape"
    yield "rstd dtype", lambda b: bw(g, z, m, r.half(), backend=b), TypeError, "rstd has dtype"
    yield "rstd device", lambda b: bw(g, z, m, r.to("meta"), backend=b), ValueError, "rstd is on meta"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("label,call,exc,message", list(_bad_inputs()), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_is_named(backend, label, call, exc, message):
    if backends.backend_status()[backend]:
        pytest.skip(backends.backend_status()[backend])
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        call(backend)


@pytest.mark.parametrize(
    "call",
    [
        lambda z, g, m, r: torch.ops.fastnas.stacked_batch_norm_stats(z[0, 0, 0], 1e-5),
        lambda z, g, m, r: torch.ops.fastnas.stacked_batch_norm_stats(z.long(), 1e-5),
        lambda z, g, m, r: torch.ops.fastnas.stacked_batch_norm_backward(g[:1], z, m, r),
        lambda z, g, m, r: torch.ops.fastnas.stacked_batch_norm_backward(g, z, m[:, :2], r),
        lambda z, g, m, r: torch.ops.fastnas.stacked_batch_norm_backward(g, z, m, r.long()),
    ],
    ids=["rank", "integer", "grad-shape", "mean-shape", "rstd-dtype"],
)
def test_cpp_op_checks_its_arguments(call):
    """Calls that bypass the Python layer still get an error naming the argument."""
    if backends.backend_status()["cpu"]:
        pytest.skip(backends.backend_status()["cpu"])
    z = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="stacked_batch_norm"):
        call(z, torch.randn_like(z), torch.zeros(2, 3), torch.ones(2, 3))
