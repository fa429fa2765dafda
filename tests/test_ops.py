"""mixed_sum and partial_channel_mixed_sum: every fused backend against the eager reference, the oracle."""

import re

import pytest
import torch
from oracle import (
    assert_compiled_with,
    assert_oracle,
    backend_case,
    compile_recording,
    dot_scale,
    generator,
    grads_of,
    randn,
    runs_on,
    skip_unless_runs,
    to64,
)

from fastnas.ops import (
    channel_shuffle,
    mixed_sum,
    mixed_sum_reference,
    partial_channel_mixed_sum,
    partial_channel_mixed_sum_reference,
    use_backend,
)

pytestmark = pytest.mark.usefixtures("seeded_only")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

mixed_case = backend_case("mixed_sum")
pc_case = backend_case("partial_channel_mixed_sum")


def check_weight_grad(got, lowp, truth, grad_out, xs, what):
    # A dot product over n elements: its error grows with sum |g * x|, not with the result.
    for k, x in enumerate(xs):
        scale = dot_scale(grad_out, x)
        assert_oracle(got[k : k + 1], lowp[k : k + 1], truth[k : k + 1], f"{what}[{k}]", scale=scale, reduction=True)


# -- mixed_sum ---------------------------------------------------------------------

SHAPES = [(1,), (5, 7), (2, 3, 5, 7), (2, 3, 7, 123)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 8, 64])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_mixed_sum_matches_reference(mixed_case, dtype, k, contiguous, poison_empty):
    name, device = mixed_case
    gen = generator("mixed_sum", dtype, k, contiguous)
    shape = SHAPES[(k + contiguous) % len(SHAPES)]
    if device.type == "cpu" and name == "triton" and (k == 64 or dtype != torch.float32):
        # The interpreter is slow: K=64 tests the pointer table, the half dtypes the rounding; small shapes do.
        shape = SHAPES[1]
    # Mixed grad requirements: every third input and, for odd K, the weights need none.
    xs = [randn(gen, shape, dtype, device, contiguous=contiguous, requires_grad=(i % 3 != 1)) for i in range(k)]
    w_dtype = torch.float32 if dtype != torch.float32 else dtype
    weights = randn(gen, (k,), w_dtype, device, requires_grad=(k % 2 == 0))
    grad_out = randn(gen, shape, dtype, device)
    tensors = xs + [weights]

    with runs_on(name, "mixed_sum", "mixed_sum_backward"):
        out = mixed_sum(xs, weights, backend=name)
        got = grads_of(out, grad_out, tensors)
    lowp = mixed_sum_reference(xs, weights)
    xs64, w64 = [to64(x) for x in xs], to64(weights)
    truth = mixed_sum_reference(xs64, w64)
    assert_oracle(out, lowp, truth, "out")

    want = grads_of(lowp, grad_out, tensors)
    want64 = grads_of(truth, grad_out.double(), xs64 + [w64])
    for i, (g, w, w6) in enumerate(zip(got[:-1], want[:-1], want64[:-1])):
        assert (g is None) == (w is None)
        if g is not None:
            assert_oracle(g, w, w6, f"grad xs[{i}]")
    if weights.requires_grad:
        assert got[-1].dtype == weights.dtype
        check_weight_grad(got[-1], want[-1], want64[-1], grad_out, xs, "grad weights")


def test_mixed_sum_weights_only_grad(mixed_case):
    name, device = mixed_case
    gen = generator("weights only")
    xs = [randn(gen, (3, 4, 5), torch.float32, device) for _ in range(4)]
    weights = randn(gen, (4,), torch.float32, device, requires_grad=True)
    with runs_on(name, "mixed_sum", "mixed_sum_backward"):
        (got,) = torch.autograd.grad(mixed_sum(xs, weights, backend=name).sum(), [weights])
    (lowp,) = torch.autograd.grad(mixed_sum_reference(xs, weights).sum(), [weights])
    w64 = to64(weights)
    (truth,) = torch.autograd.grad(mixed_sum_reference([x.double() for x in xs], w64).sum(), [w64])
    check_weight_grad(got, lowp, truth, torch.ones_like(xs[0]), xs, "grad weights")


def test_mixed_sum_weight_grad_is_deterministic(mixed_case):
    name, device = mixed_case
    gen = generator("deterministic")
    xs = [randn(gen, (4, 8, 33, 33), torch.float32, device, requires_grad=True) for _ in range(3)]
    weights = randn(gen, (3,), torch.float32, device, requires_grad=True)
    grad_out = randn(gen, (4, 8, 33, 33), torch.float32, device)
    with runs_on(name, "mixed_sum", "mixed_sum_backward"):
        runs = [torch.autograd.grad(mixed_sum(xs, weights, backend=name), [weights], grad_out)[0] for _ in range(3)]
    for r in runs[1:]:
        assert torch.equal(r, runs[0]), "weight gradient changed between identical runs"


def test_mixed_sum_empty_tensor(mixed_case):
    name, device = mixed_case
    xs = [torch.empty(0, 3, device=device, requires_grad=True) for _ in range(2)]
    weights = randn(generator("empty"), (2,), torch.float32, device, requires_grad=True)
    with runs_on(name, "mixed_sum", "mixed_sum_backward"):
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
def test_partial_channel_matches_reference(pc_case, dtype, k, bypass_pool, contiguous, poison_empty):
    name, device = pc_case
    gen = generator("partial_channel", dtype, k, bypass_pool, contiguous)
    n, cp, cb, h, w, groups = PC_LAYOUTS[(k + 2 * bypass_pool + contiguous) % len(PC_LAYOUTS)]
    scale = 2 if bypass_pool else 1
    xs = [randn(gen, (n, cp, h, w), dtype, device, contiguous=contiguous, requires_grad=(i != 1)) for i in range(k)]
    bypass = randn(gen, (n, cb, h * scale, w * scale), dtype, device, contiguous=contiguous, requires_grad=(k != 3))
    weights = randn(gen, (k,), dtype, device, requires_grad=(k != 8))
    grad_out = randn(gen, (n, cp + cb, h, w), dtype, device)
    tensors = xs + [weights, bypass]

    with runs_on(name, "partial_channel_mixed_sum", "partial_channel_mixed_sum_backward"):
        out = partial_channel_mixed_sum(xs, weights, bypass, groups, bypass_pool, backend=name)
        got = grads_of(out, grad_out, tensors)
    lowp = partial_channel_mixed_sum_reference(xs, weights, bypass, groups, bypass_pool)
    xs64, w64, b64 = [to64(x) for x in xs], to64(weights), to64(bypass)
    truth = partial_channel_mixed_sum_reference(xs64, w64, b64, groups, bypass_pool)
    assert_oracle(out, lowp, truth, "out")

    want = grads_of(lowp, grad_out, tensors)
    want64 = grads_of(truth, grad_out.double(), xs64 + [w64, b64])
    for i in range(k):
        assert (got[i] is None) == (want[i] is None)
        if got[i] is not None:
            assert_oracle(got[i], want[i], want64[i], f"grad xs[{i}]")
    if weights.requires_grad:
        assert got[k].dtype == weights.dtype
        # Un-shuffled gradient of the mixed channels, for the dot-product scale.
        g_mixed = channel_shuffle(grad_out, (cp + cb) // groups)[:, :cp]
        check_weight_grad(got[k], want[k], want64[k], g_mixed, xs, "grad weights")
    if bypass.requires_grad:
        assert_oracle(got[k + 1], want[k + 1], want64[k + 1], "grad bypass")


# -- gradcheck, opcheck, torch.compile -------------------------------------------------


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_gradcheck_float64(name):
    skip_unless_runs("mixed_sum", name)
    gen = generator("gradcheck")
    xs = [randn(gen, (2, 3, 3, 4), torch.float64, requires_grad=True) for _ in range(3)]
    w = randn(gen, (3,), torch.float64, requires_grad=True)
    b = randn(gen, (2, 3, 6, 8), torch.float64, requires_grad=True)
    with runs_on(name, "mixed_sum", "mixed_sum_backward", "partial_channel_mixed_sum"):
        mixed_sum(xs, w, backend=name).sum().backward()
        partial_channel_mixed_sum(xs, w, b, 2, True, backend=name).sum().backward()
    assert torch.autograd.gradcheck(lambda w, *xs: mixed_sum(xs, w, backend=name), (w, *xs))
    for pool, byp in ((True, b), (False, b[:, :, :3, :4].detach().clone().requires_grad_())):
        assert torch.autograd.gradcheck(
            lambda w, byp, *xs, pool=pool: partial_channel_mixed_sum(xs, w, byp, 2, pool, backend=name),
            (w, byp, *xs),
        )


def _small_inputs(device, seed):
    gen = generator("small", seed)
    xs = [randn(gen, (2, 3, 4, 4), torch.float32, device, requires_grad=True) for _ in range(3)]
    w = randn(gen, (3,), torch.float32, device, requires_grad=True)
    b = randn(gen, (2, 5, 8, 8), torch.float32, device, requires_grad=True)
    return xs, w, b


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpp", "triton"])
def test_opcheck(mixed_case, suffix):
    name, device = mixed_case
    if (suffix == "_triton") != (name == "triton"):
        pytest.skip("op belongs to another backend")
    xs, w, b = _small_inputs(device, "opcheck")
    ops = torch.ops.fastnas
    torch.library.opcheck(getattr(ops, "mixed_sum" + suffix), (xs, w))
    torch.library.opcheck(getattr(ops, "partial_channel_mixed_sum" + suffix), (xs, w, b, 4, True))
    torch.library.opcheck(
        getattr(ops, "partial_channel_mixed_sum" + suffix), (xs, w, b[:, :, :4, :4].detach(), 2, False)
    )


def test_compile_fullgraph(mixed_case):
    name, device = mixed_case

    def step(w, b, *xs):
        y = mixed_sum(xs, w)
        z = partial_channel_mixed_sum(xs, w, b, 4, True)
        return (y * y).sum() + z.square().mean()

    xs, w, b = _small_inputs(device, "compile")
    leaves = [w, b, *xs]
    compiled, seen = compile_recording(step)
    with use_backend(name):
        loss = compiled(*leaves)
        grads = torch.autograd.grad(loss, leaves)
    assert_compiled_with(name, seen, "mixed_sum", "partial_channel_mixed_sum")
    with use_backend("reference"):
        lowp = step(*leaves)
        lowp_grads = torch.autograd.grad(lowp, leaves)
        leaves64 = [to64(t) for t in leaves]
        truth = step(*leaves64)
        truth_grads = torch.autograd.grad(truth, leaves64)
    assert_oracle(loss, lowp, truth, "loss")
    for i, (g, lo, t) in enumerate(zip(grads, lowp_grads, truth_grads)):
        assert_oracle(g, lo, t, f"grad {i}")


# -- bad input -----------------------------------------------------------------------


def _bad_inputs():
    x = torch.zeros(2, 4, 4, 4)
    w = torch.zeros(2)
    b = torch.zeros(2, 4, 4, 4)
    yield "empty xs", lambda: mixed_sum([], torch.zeros(0)), ValueError, "xs is empty"
    yield "tensor not list", lambda: mixed_sum(x, w), TypeError, "xs must be a list"
    yield "shape differs", lambda: mixed_sum([x, x[:1]], w), ValueError, "xs[1] has shape"
    yield "dtype differs", lambda: mixed_sum([x, x.double()], w), TypeError, "xs[1] has dtype"
    yield "integer xs", lambda: mixed_sum([x.long(), x.long()], w), TypeError, "xs[0] has dtype torch.int64"
    yield "integer weights", lambda: mixed_sum([x, x], w.long()), TypeError, "weights has dtype"
    yield "weights length", lambda: mixed_sum([x, x], torch.zeros(3)), ValueError, "weights has 3 entries but xs has 2"
    yield "weights 2-D", lambda: mixed_sum([x, x], torch.zeros(2, 1)), ValueError, "weights must be 1-D"
    yield "not a tensor", lambda: mixed_sum([x, 3.0], w), TypeError, "xs[1] is a float"
    yield "too many", lambda: mixed_sum([x] * 129, torch.zeros(129)), ValueError, "at most 128"
    yield "device differs", lambda: mixed_sum([x, x.to("meta")], w), ValueError, "xs[1] is on meta"
    pc = partial_channel_mixed_sum
    yield "groups", lambda: pc([x, x], w, b, 3), ValueError, "groups=3"
    yield "groups type", lambda: pc([x, x], w, b, 2.0), TypeError, "groups must be an int"
    yield "bypass batch", lambda: pc([x, x], w, b[:1], 2), ValueError, "bypass has batch size 1"
    yield "bypass size", lambda: pc([x, x], w, b[:, :, :3], 2), ValueError, "bypass is 3x4"
    yield "bypass dtype", lambda: pc([x, x], w, b.half(), 2), TypeError, "bypass has dtype"
    yield "bypass rank", lambda: pc([x, x], w, b[0], 2), ValueError, "bypass must be a 4-D"
    yield "pool odd", lambda: pc([x, x], w, torch.zeros(2, 4, 9, 8), 2, True), ValueError, "even bypass height"
    yield "pool size", lambda: pc([x, x], w, torch.zeros(2, 4, 6, 6), 2, True), ValueError, "twice the size"
    yield "xs rank", lambda: pc([x[0], x[0]], w, b, 2), ValueError, "4-D NCHW"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("label,call,exc,message", list(_bad_inputs()), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_is_named(backend, label, call, exc, message):
    skip_unless_runs("mixed_sum", backend)
    with use_backend(backend), pytest.raises(exc, match=re.escape(message)):
        call()


@pytest.mark.parametrize(
    "args",
    [
        lambda x, w, b: torch.ops.fastnas.mixed_sum([x, x], torch.zeros(3)),
        lambda x, w, b: torch.ops.fastnas.mixed_sum([x, x[:1]], w),
        lambda x, w, b: torch.ops.fastnas.mixed_sum([x.long(), x.long()], w),
        lambda x, w, b: torch.ops.fastnas.partial_channel_mixed_sum([x, x], w, b, 3, False),
        lambda x, w, b: torch.ops.fastnas.partial_channel_mixed_sum([x, x], w, torch.zeros(2, 4, 9, 8), 2, True),
    ],
    ids=["weights-length", "shape", "integer", "groups", "pool-odd"],
)
def test_cpp_op_checks_its_arguments(args):
    """Calls that bypass the Python layer still get an error, never a crash."""
    skip_unless_runs("mixed_sum", "cpu")
    x, w, b = torch.zeros(2, 4, 4, 4), torch.zeros(2), torch.zeros(2, 4, 4, 4)
    with pytest.raises(RuntimeError):
        args(x, w, b)
