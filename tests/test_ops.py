"""Every fused backend against the eager reference, the oracle."""

import pytest
import torch

from fastnas import backends
from fastnas.ops import (
    channel_shuffle,
    mixed_sum,
    mixed_sum_reference,
    partial_channel_mixed_sum,
    partial_channel_mixed_sum_reference,
    use_backend,
)

CASES = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpreter"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.requires_cuda),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.requires_cuda),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Slack on top of twice the reference's own error, relative to the output scale.
SLACK = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(params=CASES)
def case(request):
    name, device = request.param
    why = backends.backend_status()[name]
    if why:
        pytest.skip(f"backend {name} unavailable: {why}")
    return name, torch.device(device)


def rand(shape, dtype, device, contiguous=True, requires_grad=False, gen=None):
    """Fresh normal data; non-contiguous tensors are strided views of a larger one."""
    if contiguous:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    else:
        wide = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen, dtype=torch.float64)
        t = wide.to(device=device, dtype=dtype)[..., 1::2]
        assert t.numel() <= 1 or not t.is_contiguous()
    return t.requires_grad_(requires_grad)


def assert_matches_oracle(out, lowp_ref, ref64, what, scale=None):
    """The fused result may be off the fp64 truth by at most twice what the eager
    reference in the same dtype is off by, plus a small slack (flash-attention's rule)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == lowp_ref.dtype, f"{what}: dtype {out.dtype} != {lowp_ref.dtype}"
    out64, ref_err_t = out.detach().double().cpu(), lowp_ref.detach().double().cpu()
    ref64 = ref64.detach().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values (unwritten output?)"
    scale = ref64.abs().max().item() if scale is None else scale
    err = (out64 - ref64).abs().max().item()
    ref_err = (ref_err_t - ref64).abs().max().item()
    bound = 2 * ref_err + SLACK[out.dtype] * max(scale, 1.0)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


def grads_of(out, grad_out, tensors):
    need = [t for t in tensors if t.requires_grad]
    grads = iter(torch.autograd.grad(out, need, grad_out))
    return [next(grads) if t.requires_grad else None for t in tensors]


def to64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def check_weight_grad(got, lowp, ref64, grad_out, xs, what):
    # A dot product over n elements: its error scales with sum |g * x|, not the result.
    for k, x in enumerate(xs):
        scale = (grad_out.double().abs() * x.detach().double().abs()).sum().item() / max(1, grad_out.numel()) ** 0.5
        assert_matches_oracle(got[k : k + 1], lowp[k : k + 1], ref64[k : k + 1], f"{what}[{k}]", scale)


# -- mixed_sum ---------------------------------------------------------------------

SHAPES = [(1,), (5, 7), (2, 3, 5, 7), (2, 3, 7, 123)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 8, 64])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_mixed_sum_matches_reference(case, dtype, k, contiguous, poison_empty):
    name, device = case
    gen = torch.Generator().manual_seed(1000 * k + len(str(dtype)) + contiguous)
    shape = SHAPES[(k + contiguous) % len(SHAPES)]
    if k == 64 and device.type == "cpu" and name == "triton":
        shape = SHAPES[1]  # the interpreter is slow; the pointer table is what K=64 tests
    # Mixed grad requirements: every third input and, for odd K, the weights need none.
    xs = [rand(shape, dtype, device, contiguous, requires_grad=(i % 3 != 1), gen=gen) for i in range(k)]
    weights = rand(
        (k,), torch.float32 if dtype != torch.float32 else dtype, device, requires_grad=(k % 2 == 0), gen=gen
    )
    grad_out = rand(shape, dtype, device, gen=gen)

    out = mixed_sum(xs, weights, backend=name)
    lowp = mixed_sum_reference(xs, weights)
    xs64, w64 = [to64(x) for x in xs], to64(weights)
    ref64 = mixed_sum_reference(xs64, w64)
    assert_matches_oracle(out, lowp, ref64, "out")

    tensors = xs + [weights]
    got = grads_of(out, grad_out, tensors)
    want = grads_of(lowp, grad_out, tensors)
    want64 = grads_of(ref64, grad_out.double(), xs64 + [w64])
    for i, (g, w, w6) in enumerate(zip(got[:-1], want[:-1], want64[:-1])):
        assert (g is None) == (w is None)
        if g is not None:
            assert_matches_oracle(g, w, w6, f"grad xs[{i}]")
    if weights.requires_grad:
        assert got[-1].dtype == weights.dtype
        check_weight_grad(got[-1], want[-1], want64[-1], grad_out, xs, "grad weights")


def test_mixed_sum_weights_only_grad(case):
    name, device = case
    xs = [rand((3, 4, 5), torch.float32, device) for _ in range(4)]
    weights = rand((4,), torch.float32, device, requires_grad=True)
    out = mixed_sum(xs, weights, backend=name)
    (g,) = torch.autograd.grad(out.sum(), [weights])
    expect = torch.stack([x.sum() for x in xs])
    torch.testing.assert_close(g, expect, rtol=1e-5, atol=1e-4)


def test_mixed_sum_weight_grad_is_deterministic(case):
    name, device = case
    xs = [rand((4, 8, 33, 33), torch.float32, device, requires_grad=True) for _ in range(3)]
    weights = rand((3,), torch.float32, device, requires_grad=True)
    grad_out = rand((4, 8, 33, 33), torch.float32, device)
    runs = [torch.autograd.grad(mixed_sum(xs, weights, backend=name), [weights], grad_out)[0] for _ in range(3)]
    for r in runs[1:]:
        assert torch.equal(r, runs[0]), "weight gradient changed between identical runs"


def test_mixed_sum_empty_tensor(case):
    name, device = case
    xs = [torch.empty(0, 3, device=device, requires_grad=True) for _ in range(2)]
    weights = rand((2,), torch.float32, device, requires_grad=True)
    out = mixed_sum(xs, weights, backend=name)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(weights.grad, torch.zeros(2, device=device))


# -- partial_channel_mixed_sum -----------------------------------------------------

PC_LAYOUTS = [
    # (N, Cp, Cb, H, W, groups)
    (2, 3, 5, 5, 7, 2),
    (1, 4, 12, 3, 3, 4),
    (3, 2, 2, 6, 1, 1),
    (2, 4, 12, 7, 5, 4),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("bypass_pool", [False, True], ids=["nopool", "pool"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_partial_channel_matches_reference(case, dtype, k, bypass_pool, contiguous, poison_empty):
    name, device = case
    gen = torch.Generator().manual_seed(7 * k + 3 * bypass_pool + contiguous)
    n, cp, cb, h, w, groups = PC_LAYOUTS[(k + 2 * bypass_pool + contiguous) % len(PC_LAYOUTS)]
    scale = 2 if bypass_pool else 1
    xs = [rand((n, cp, h, w), dtype, device, contiguous, requires_grad=(i != 1), gen=gen) for i in range(k)]
    bypass = rand((n, cb, h * scale, w * scale), dtype, device, contiguous, requires_grad=(k != 3), gen=gen)
    weights = rand((k,), dtype, device, requires_grad=(k != 8), gen=gen)
    grad_out = rand((n, cp + cb, h, w), dtype, device, gen=gen)

    out = partial_channel_mixed_sum(xs, weights, bypass, groups, bypass_pool, backend=name)
    lowp = partial_channel_mixed_sum_reference(xs, weights, bypass, groups, bypass_pool)
    xs64, w64, b64 = [to64(x) for x in xs], to64(weights), to64(bypass)
    ref64 = partial_channel_mixed_sum_reference(xs64, w64, b64, groups, bypass_pool)
    assert_matches_oracle(out, lowp, ref64, "out")

    tensors = xs + [weights, bypass]
    got = grads_of(out, grad_out, tensors)
    want = grads_of(lowp, grad_out, tensors)
    want64 = grads_of(ref64, grad_out.double(), xs64 + [w64, b64])
    for i in range(k):
        assert (got[i] is None) == (want[i] is None)
        if got[i] is not None:
            assert_matches_oracle(got[i], want[i], want64[i], f"grad xs[{i}]")
    if weights.requires_grad:
        assert got[k].dtype == weights.dtype
        # Un-shuffled gradient of the mixed channels, for the dot-product scale.
        g_mixed = channel_shuffle(grad_out, (cp + cb) // groups)[:, :cp]
        check_weight_grad(got[k], want[k], want64[k], g_mixed, xs, "grad weights")
    if bypass.requires_grad:
        assert_matches_oracle(got[k + 1], want[k + 1], want64[k + 1], "grad bypass")


# -- gradcheck, opcheck, torch.compile -------------------------------------------------


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_gradcheck_float64(name):
    if backends.backend_status()[name]:
        pytest.skip(backends.backend_status()[name])
    xs = [torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, *xs: mixed_sum(xs, w, backend=name), (w, *xs))
    for pool, byp in ((True, b), (False, b[:, :, :3, :4].detach().clone().requires_grad_())):
        assert torch.autograd.gradcheck(
            lambda w, byp, *xs, pool=pool: partial_channel_mixed_sum(xs, w, byp, 2, pool, backend=name), (w, byp, *xs)
        )


def _opcheck_cases(device):
    xs = [torch.randn(2, 3, 4, 4, device=device, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, device=device, requires_grad=True)
    b = torch.randn(2, 5, 8, 8, device=device, requires_grad=True)
    return xs, w, b


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpp", "triton"])
def test_opcheck(case, suffix):
    name, device = case
    if (suffix == "_triton") != (name == "triton"):
        pytest.skip("op belongs to another backend")
    xs, w, b = _opcheck_cases(device)
    ops = torch.ops.fastnas
    torch.library.opcheck(getattr(ops, "mixed_sum" + suffix), (xs, w))
    torch.library.opcheck(getattr(ops, "partial_channel_mixed_sum" + suffix), (xs, w, b, 4, True))
    torch.library.opcheck(
        getattr(ops, "partial_channel_mixed_sum" + suffix), (xs, w, b[:, :, :4, :4].detach(), 2, False)
    )


def test_compile_fullgraph(case):
    name, device = case

    def step(w, b, *xs):
        y = mixed_sum(xs, w)
        z = partial_channel_mixed_sum(xs, w, b, 4, True)
        return (y * y).sum() + z.square().mean()

    xs, w, b = _opcheck_cases(device)
    with use_backend(name):
        torch._dynamo.reset()
        loss = torch.compile(step, fullgraph=True)(w, b, *xs)
        grads = torch.autograd.grad(loss, [w, b, *xs])
    with use_backend("reference"):
        loss_ref = step(w, b, *xs)
        grads_ref = torch.autograd.grad(loss_ref, [w, b, *xs])
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


# -- bad input -----------------------------------------------------------------------


def _bad_inputs():
    x = torch.randn(2, 4, 4, 4)
    w = torch.randn(2)
    b = torch.randn(2, 4, 4, 4)
    yield "empty xs", lambda: mixed_sum([], torch.randn(0)), ValueError, "xs is empty"
    yield "tensor not list", lambda: mixed_sum(x, w), TypeError, "xs must be a list"
    yield "shape differs", lambda: mixed_sum([x, x[:1]], w), ValueError, "xs[1] has shape"
    yield "dtype differs", lambda: mixed_sum([x, x.double()], w), TypeError, "xs[1] has dtype"
    yield "integer xs", lambda: mixed_sum([x.long(), x.long()], w), TypeError, "xs[0] has dtype torch.int64"
    yield "integer weights", lambda: mixed_sum([x, x], w.long()), TypeError, "weights has dtype"
    yield "weights length", lambda: mixed_sum([x, x], torch.randn(3)), ValueError, "weights has 3 entries but xs has 2"
    yield "weights 2-D", lambda: mixed_sum([x, x], torch.randn(2, 1)), ValueError, "weights must be 1-D"
    yield "not a tensor", lambda: mixed_sum([x, 3.0], w), TypeError, "xs[1] is a float"
    yield "too many", lambda: mixed_sum([x] * 129, torch.randn(129)), ValueError, "at most 128"
    yield "device differs", lambda: mixed_sum([x, x.to("meta")], w), ValueError, "xs[1] is on meta"
    pc = partial_channel_mixed_sum
    yield "groups", lambda: pc([x, x], w, b, 3), ValueError, "groups=3"
    yield "groups type", lambda: pc([x, x], w, b, 2.0), TypeError, "groups must be an int"
    yield "bypass batch", lambda: pc([x, x], w, b[:1], 2), ValueError, "bypass has batch size 1"
    yield "bypass size", lambda: pc([x, x], w, b[:, :, :3], 2), ValueError, "bypass is 3x4"
    yield "bypass dtype", lambda: pc([x, x], w, b.half(), 2), TypeError, "bypass has dtype"
    yield "bypass rank", lambda: pc([x, x], w, b[0], 2), ValueError, "bypass must be a 4-D"
    yield "pool odd", lambda: pc([x, x], w, torch.randn(2, 4, 9, 8), 2, True), ValueError, "even bypass height"
    yield "pool size", lambda: pc([x, x], w, torch.randn(2, 4, 6, 6), 2, True), ValueError, "twice the size"
    yield "xs rank", lambda: pc([x[0], x[0]], w, b, 2), ValueError, "4-D NCHW"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("label,call,exc,message", list(_bad_inputs()), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_is_named(backend, label, call, exc, message):
    if backends.backend_status()[backend]:
        pytest.skip(backends.backend_status()[backend])
    with use_backend(backend), pytest.raises(exc, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


@pytest.mark.parametrize(
    "args",
    [
        lambda x, w, b: torch.ops.fastnas.mixed_sum([x, x], torch.randn(3)),
        lambda x, w, b: torch.ops.fastnas.mixed_sum([x, x[:1]], w),
        lambda x, w, b: torch.ops.fastnas.mixed_sum([x.long(), x.long()], w),
        lambda x, w, b: torch.ops.fastnas.partial_channel_mixed_sum([x, x], w, b, 3, False),
        lambda x, w, b: torch.ops.fastnas.partial_channel_mixed_sum([x, x], w, torch.randn(2, 4, 9, 8), 2, True),
    ],
    ids=["weights-length", "shape", "integer", "groups", "pool-odd"],
)
def test_cpp_op_checks_its_arguments(args):
    """Calls that bypass the Python layer still get an error, never a crash."""
    if backends.backend_status()["cpu"]:
        pytest.skip(backends.backend_status()["cpu"])
    x, w, b = torch.randn(2, 4, 4, 4), torch.randn(2), torch.randn(2, 4, 4, 4)
    with pytest.raises(RuntimeError):
        args(x, w, b)
