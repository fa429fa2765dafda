"""stacked_batch_norm_stats / _backward and update_running_stats against PyTorch's batch norm."""

import re

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    assert_compiled_with,
    assert_oracle,
    backend_case,
    compile_recording,
    generator,
    randn,
    runs_on,
    skip_unless_runs,
)

from fastnas.ops.stacked_batch_norm import (
    stacked_batch_norm_backward,
    stacked_batch_norm_backward_reference,
    stacked_batch_norm_stats,
    stacked_batch_norm_stats_reference,
    update_running_stats,
)

pytestmark = pytest.mark.usefixtures("seeded_only")

# (J, C, N, H, W) with odd sizes; rows of 1, 5 and a few hundred values.
SHAPES = [(1, 3, 2, 5, 7), (2, 5, 3, 4, 4), (3, 1, 1, 1, 5), (4, 2, 1, 1, 2), (5, 3, 7, 3, 5)]

case = backend_case("stacked_batch_norm_stats", "reference", "reference-cuda")


def _data(gen, shape, dtype, device, loc=0.0, scale=1.0, contiguous=True):
    t = randn(gen, shape, torch.float64, loc=loc, scale=scale)
    if not contiguous:
        # Candidate-minor in memory: a (J, C, ...) view of a (C, J, ...) tensor.
        t = t.transpose(0, 1).contiguous().transpose(0, 1)
    return t.to(device=device, dtype=dtype)


STATS = ("stacked_batch_norm_stats",)
BACKWARD = ("stacked_batch_norm_stats", "stacked_batch_norm_backward")


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


# -- statistics --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stats_match_batch_norm(case, shape, dtype, poison_empty):
    name, device = case
    z = _data(generator("stats", shape, dtype), shape, dtype, device, loc=0.5, scale=2.0)
    eps = 1e-3
    with runs_on(name, *STATS):
        mean, rstd, var = stacked_batch_norm_stats(z, eps, backend=name)
    assert mean.dtype == rstd.dtype == var.dtype == dtype
    assert mean.shape == rstd.shape == var.shape == shape[:2]
    want = _torch_stats(z.double(), eps)
    low = _torch_stats(z, eps)
    for got, w, lo, what in zip((mean, rstd, var), want, low, ("mean", "rstd", "var")):
        assert_oracle(got, lo, w, what, reduction=True)
    # The normalised candidates are what F.batch_norm gives.
    yhat = (z - mean.view(*shape[:2], 1, 1, 1)) * rstd.view(*shape[:2], 1, 1, 1)
    for j in range(shape[0]):
        lowp = F.batch_norm(_candidate(z, j), None, None, training=True, eps=eps)
        truth = F.batch_norm(_candidate(z, j).double(), None, None, training=True, eps=eps)
        assert_oracle(_candidate(yhat, j), lowp, truth, f"normalised candidate {j}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stats_low_precision(case, dtype):
    name, device = case
    z = _data(generator("stats low", dtype), (3, 4, 3, 5, 5), dtype, device, loc=3.0)
    with runs_on(name, *STATS):
        got = stacked_batch_norm_stats(z, backend=name)
    want = stacked_batch_norm_stats_reference(z.double())
    low = stacked_batch_norm_stats_reference(z)
    for g, w, lo, what in zip(got, want, low, ("mean", "rstd", "var")):
        # Statistics of half inputs are float32: the inputs are exact in float32, so only the sums round.
        assert g.dtype == torch.float32, what
        assert_oracle(g, lo, w, what, reduction=True)


def test_stats_large_mean_fp32(case):
    """Rows of 64*32*32 values around 1000 with std 1: no digits lost to the mean."""
    name, device = case
    shape = (2, 3, 64, 32, 32) if name != "triton" or device.type == "cuda" else (1, 2, 16, 32, 32)
    z = _data(generator("large mean"), shape, torch.float32, device, loc=1000.0)
    with runs_on(name, *STATS):
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
    gen = generator("many segments")
    z = _data(gen, (2, 3, 5, 7, 9), torch.float32, device, loc=-200.0, scale=0.5)
    g = _data(gen, z.shape, torch.float32, device)
    with runs_on(name, *BACKWARD):
        got = stacked_batch_norm_stats(z, backend=name)
        out = stacked_batch_norm_backward(g, z, got[0], got[1], backend=name)
    want = stacked_batch_norm_stats_reference(z.double())
    low = stacked_batch_norm_stats_reference(z)
    for s, w, lo, what in zip(got, want, low, ("mean", "rstd", "var")):
        assert_oracle(s, lo, w, what, reduction=True)
    ref = stacked_batch_norm_backward_reference(g.double(), z.double(), want[0], want[1])
    assert_oracle(out, stacked_batch_norm_backward_reference(g, z, low[0], low[1]), ref, "grad_z")


def test_stats_non_contiguous(case):
    name, device = case
    z = _data(generator("stats strided"), (3, 4, 2, 3, 5), torch.float32, device, contiguous=False)
    assert not z.is_contiguous()
    with runs_on(name, *STATS):
        got = stacked_batch_norm_stats(z, backend=name)
    low = stacked_batch_norm_stats_reference(z.contiguous())
    want = stacked_batch_norm_stats_reference(z.double())
    for g, lo, w, what in zip(got, low, want, ("mean", "rstd", "var")):
        assert_oracle(g, lo, w, what, reduction=True)


def test_stats_deterministic(case):
    name, device = case
    z = _data(generator("stats deterministic"), (3, 5, 4, 9, 9), torch.float32, device, loc=10.0)
    with runs_on(name, *STATS):
        first = stacked_batch_norm_stats(z, backend=name)
        for _ in range(2):
            again = stacked_batch_norm_stats(z, backend=name)
            for a, b in zip(first, again):
                assert torch.equal(a, b)


def test_stats_empty_stack(case):
    name, device = case
    z = torch.zeros(0, 3, 2, 2, device=device)
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
    gen = generator("backward", shape, dtype)
    z = _data(gen, shape, dtype, device, loc=-0.5, scale=1.5)
    g = _data(gen, shape, dtype, device)
    with runs_on(name, *BACKWARD):
        mean, rstd, _ = stacked_batch_norm_stats(z, eps, backend=name)
        got = stacked_batch_norm_backward(g, z, mean, rstd, backend=name)
    assert got.dtype == dtype and got.shape == z.shape and got.is_contiguous()
    want = _autograd_backward(z.double(), g.double(), eps)
    low = _autograd_backward(z, g, eps)
    assert_oracle(got, low, want, "grad_z")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_low_precision(case, dtype):
    name, device = case
    gen = generator("backward low", dtype)
    z = _data(gen, (2, 3, 3, 5, 5), dtype, device, loc=1.0)
    g = _data(gen, z.shape, dtype, device)
    with runs_on(name, *BACKWARD):
        mean, rstd, _ = stacked_batch_norm_stats(z, backend=name)
        got = stacked_batch_norm_backward(g, z, mean, rstd, backend=name)
    assert got.dtype == dtype
    m64, r64, _ = stacked_batch_norm_stats_reference(z.double())
    want = stacked_batch_norm_backward_reference(g.double(), z.double(), m64, r64)
    low = stacked_batch_norm_backward_reference(g, z, *stacked_batch_norm_stats_reference(z)[:2])
    assert_oracle(got, low, want, "grad_z")


def test_backward_non_contiguous_and_deterministic(case):
    name, device = case
    gen = generator("backward strided")
    z = _data(gen, (3, 4, 2, 5, 3), torch.float32, device, contiguous=False)
    g = _data(gen, z.shape, torch.float32, device, contiguous=False)
    with runs_on(name, *BACKWARD):
        mean, rstd, _ = stacked_batch_norm_stats(z, backend=name)
        got = stacked_batch_norm_backward(g, z, mean, rstd, backend=name)
        assert torch.equal(got, stacked_batch_norm_backward(g, z, mean, rstd, backend=name))
    low = stacked_batch_norm_backward_reference(g.contiguous(), z.contiguous(), mean, rstd)
    want = stacked_batch_norm_backward_reference(g.double(), z.double(), mean.double(), rstd.double())
    assert_oracle(got, low, want, "grad_z")


def test_backward_fp64_stats_for_fp32_input(case):
    """mean and rstd may come in fp64; the kernels take them in the accumulation dtype."""
    name, device = case
    gen = generator("fp64 stats")
    z = _data(gen, (2, 3, 4, 5), torch.float32, device)
    g = _data(gen, z.shape, torch.float32, device)
    mean, rstd, _ = stacked_batch_norm_stats_reference(z.double())
    with runs_on(name, "stacked_batch_norm_backward"):
        got = stacked_batch_norm_backward(g, z, mean, rstd, backend=name)
    low = stacked_batch_norm_backward_reference(g, z, mean.float(), rstd.float())
    want = stacked_batch_norm_backward_reference(g.double(), z.double(), mean, rstd)
    assert_oracle(got, low, want, "grad_z")


# -- opcheck, torch.compile ------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpp", "triton"])
def test_opcheck(case, suffix):
    name, device = case
    if (suffix == "_triton") != (name == "triton") or name == "reference":
        pytest.skip("op belongs to another backend")
    gen = generator("opcheck")
    z = _data(gen, (3, 4, 2, 3, 3), torch.float32, device)
    g = _data(gen, z.shape, torch.float32, device)
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

    gen = generator("compile")
    z = _data(gen, (2, 3, 2, 4, 4), torch.float32, device)
    g = _data(gen, z.shape, torch.float32, device)
    compiled, seen = compile_recording(step)
    got = compiled(z, g)
    assert_compiled_with(name, seen, *BACKWARD)

    def reference(z, g):
        mean, rstd, var = stacked_batch_norm_stats_reference(z)
        return stacked_batch_norm_backward_reference(g, z, mean, rstd), var

    for a, lo, t, what in zip(got, reference(z, g), reference(z.double(), g.double()), ("grad_z", "var")):
        assert_oracle(a, lo, t, what, reduction=what == "var")


# -- running statistics ------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.37])
def test_update_running_stats_matches_batch_norm_modules(case, momentum):
    name, device = case
    j, c = 4, 5
    rows = [3, 0, 2]
    gen = generator("running stats", momentum)
    # The eager modules in float32 (the reference) and float64 (the truth), from the same buffers.
    modules = {}
    for dtype in (torch.float32, torch.float64):
        modules[dtype] = [torch.nn.BatchNorm2d(c, affine=False, momentum=momentum).train() for _ in rows]
    for i in range(len(rows)):
        start_mean, start_var = randn(gen, (c,), torch.float64), 0.5 + 1.5 * torch.rand(c, generator=gen)
        for dtype, mods in modules.items():
            mods[i].to(device=device, dtype=dtype)
            mods[i].running_mean.copy_(start_mean)
            mods[i].running_var.copy_(start_var)
    rm = [m.running_mean.clone() for m in modules[torch.float32]]
    rv = [m.running_var.clone() for m in modules[torch.float32]]
    nbt = [m.num_batches_tracked.clone() for m in modules[torch.float32]]
    for step in range(3):
        z = _data(gen, (j, c, 3, 5, 4), torch.float32, device, loc=float(step), scale=2.0)
        for dtype, mods in modules.items():
            for mod, r in zip(mods, rows):
                mod(_candidate(z.to(dtype), r))
        with runs_on(name, *STATS):
            mean, _, var = stacked_batch_norm_stats(z, backend=name)
        update_running_stats(rm, rv, nbt, mean, var, rows, momentum, 3 * 5 * 4)
    for i, (low, truth) in enumerate(zip(modules[torch.float32], modules[torch.float64])):
        assert rm[i].dtype == low.running_mean.dtype and nbt[i].dtype == torch.int64
        assert_oracle(rm[i], low.running_mean, truth.running_mean, f"running_mean[{i}]", reduction=True)
        assert_oracle(rv[i], low.running_var, truth.running_var, f"running_var[{i}]", reduction=True)
        assert torch.equal(nbt[i], low.num_batches_tracked)


def test_update_running_stats_keeps_buffer_dtypes():
    modules = [torch.nn.BatchNorm2d(3, affine=False).double().train() for _ in range(2)]
    z = randn(generator("buffer dtypes"), (2, 3, 4, 5, 5), torch.float64)
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
    gen = generator("update opcheck")
    mean, var = randn(gen, (3, 4)), torch.rand(3, 4, generator=gen)
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
    mean, var = torch.zeros(3, 4), torch.ones(3, 4)
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
    with pytest.raises(exc, match=re.escape(message)):
        call()


# -- bad input ---------------------------------------------------------------------------


def _bad_inputs():
    z = torch.zeros(2, 3, 4, 5)
    g = torch.zeros_like(z)
    m, r = torch.zeros(2, 3), torch.ones(2, 3)
    st, bw = stacked_batch_norm_stats, stacked_batch_norm_backward
    yield "z rank", lambda b: st(torch.zeros(5), backend=b), ValueError, "z must be (J, C, *rest)"
    yield "z dtype", lambda b: st(z.long(), backend=b), TypeError, "z has dtype torch.int64"
    yield "z type", lambda b: st([1.0], backend=b), TypeError, "z must be a tensor"
    yield "z empty rows", lambda b: st(torch.zeros(2, 3, 0), backend=b), ValueError, "no values"
    yield "grad shape", lambda b: bw(g[:1], z, m, r, backend=b), ValueError, "grad_yhat has shape"
    yield "grad dtype", lambda b: bw(g.double(), z, m, r, backend=b), TypeError, "grad_yhat has dtype"
    yield "mean shape", lambda b: bw(g, z, m[:1], r, backend=b), ValueError, "mean has shape"
    yield "rstd dtype", lambda b: bw(g, z, m, r.half(), backend=b), TypeError, "rstd has dtype"
    yield "rstd device", lambda b: bw(g, z, m, r.to("meta"), backend=b), ValueError, "rstd is on meta"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("label,call,exc,message", list(_bad_inputs()), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_is_named(backend, label, call, exc, message):
    skip_unless_runs("stacked_batch_norm_stats", backend)
    with pytest.raises(exc, match=re.escape(message)):
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
    skip_unless_runs("stacked_batch_norm_stats", "cpu")
    z = torch.zeros(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="stacked_batch_norm"):
        call(z, torch.zeros_like(z), torch.zeros(2, 3), torch.ones(2, 3))
