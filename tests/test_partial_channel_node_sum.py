"""partial_channel_node_sum, a whole PC-DARTS node, against its eager reference."""

import pytest
import torch
import torch.nn.functional as F

from fastnas import backends
from fastnas.ops.partial_channel_mixed_sum import channel_shuffle
from fastnas.ops.partial_channel_node_sum import partial_channel_node_sum, partial_channel_node_sum_reference

CASES = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpreter"),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.requires_cuda),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.requires_cuda),
]
SLACK = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(params=CASES)
def case(request):
    name, device = request.param
    why = backends.backend_status()[name]
    if not why and name not in backends.implementations("partial_channel_node_sum"):
        why = f"no {name} kernel for this op in this build"
    if why:
        pytest.skip(f"backend {name} unavailable: {why}")
    return name, torch.device(device)


def make_node(strides, n, c, k, ho, wo, dtype, device, contiguous_bypass=False, need=None, gen=None):
    """Edge inputs h_e (N, C, s*Ho, s*Wo); mixed (N, C/K, Ho, Wo); bypass the view h_e[:, C/K:]."""
    cp = c // k
    need = need or {}
    hs, mixed, bypass = [], [], []
    for e, s in enumerate(strides):
        h = torch.randn(n, c, s * ho, s * wo, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        h.requires_grad_(need.get(("bypass", e), True))
        m = torch.randn(n, cp, ho, wo, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        m.requires_grad_(need.get(("mixed", e), True))
        hs.append(h)
        mixed.append(m)
        b = h[:, cp:]
        bypass.append(b.contiguous() if contiguous_bypass else b)
    w = torch.softmax(torch.randn(len(strides), generator=gen, dtype=torch.float64), 0).to(device=device)
    w = w.to(torch.float32 if dtype != torch.float64 else dtype).requires_grad_(need.get("weights", True))
    return hs, mixed, bypass, w


def _grads(out, g, tensors):
    need = [t for t in tensors if t.requires_grad]
    it = iter(torch.autograd.grad(out, need, g) if need else [])
    return [next(it) if t.requires_grad else None for t in tensors]


def _assert_close_to(got, want64, lowp, what, scale=None):
    """At most twice the same-dtype reference's error against the fp64 truth, plus slack."""
    assert got.shape == want64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    got64, want64 = got.detach().double().cpu(), want64.detach().double().cpu()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values (unwritten output?)"
    ref_err = (lowp.detach().double().cpu() - want64).abs().max().item()
    scale = want64.abs().max().item() if scale is None else scale
    err = (got64 - want64).abs().max().item()
    bound = 2 * ref_err + SLACK[got.dtype] * max(scale, 1.0)
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


NODES = [
    pytest.param([1], 1, id="E1-K1"),
    pytest.param([2], 2, id="E1-K2-pool"),
    pytest.param([2, 1], 4, id="E2-K4"),
    pytest.param([1, 2, 1], 2, id="E3-K2"),
    pytest.param([2, 2, 1, 1], 4, id="E4-K4"),
    pytest.param([1, 2, 2, 1, 2], 1, id="E5-K1"),
]


@pytest.mark.parametrize("strides,k", NODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(case, strides, k, dtype, poison_empty):
    name, device = case
    n, c, ho, wo = 2, 8, 3, 5
    hs, mixed, bypass, w = make_node(strides, n, c, k, ho, wo, dtype, device)
    for groups in (k, 2) if c % 2 == 0 and k != 2 else (k,):
        out = partial_channel_node_sum(mixed, bypass, w, groups, strides, backend=name)
        assert out.dtype == dtype and out.is_contiguous() and out.shape == (n, c, ho, wo)
        lowp = partial_channel_node_sum_reference(mixed, bypass, w, groups, strides)
        d = lambda ts: [t.detach().double() for t in ts]  # noqa: E731
        ref64 = partial_channel_node_sum_reference(
            d(mixed), [h[:, c // k :] for h in d(hs)], w.detach().double(), groups, strides
        )
        _assert_close_to(out, ref64, lowp, "out")

        g = torch.randn(out.shape, dtype=torch.float64).to(device=device, dtype=dtype)
        got = _grads(out, g, [*mixed, *hs, w])
        low = _grads(lowp, g, [*mixed, *hs, w])
        x64 = [t.detach().double().requires_grad_() for t in [*mixed, *hs, w]]
        e = len(strides)
        ref = partial_channel_node_sum_reference(
            x64[:e], [h[:, c // k :] for h in x64[e : 2 * e]], x64[-1], groups, strides
        )
        want = torch.autograd.grad(ref, x64, g.double())
        for i, (a, lo, wv) in enumerate(zip(got[:-1], low[:-1], want[:-1])):
            _assert_close_to(a, wv, lo, f"grad input {i}")
        # A dot product over the output: its error scales with sum |g * term|.
        scale = (g.double().abs() * ref64.abs()).sum().item() / max(1, g.numel()) ** 0.5
        _assert_close_to(got[-1], want[-1], low[-1], "grad weights", scale)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_odd_sizes_and_contiguous_bypass(case, dtype):
    name, device = case
    strides = [2, 1, 2]
    for contiguous in (False, True):
        hs, mixed, bypass, w = make_node(strides, 3, 12, 4, 5, 7, dtype, device, contiguous_bypass=contiguous)
        out = partial_channel_node_sum(mixed, bypass, w, 3, strides, backend=name)
        ref = partial_channel_node_sum_reference(mixed, bypass, w, 3, strides)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(out)
        for a, b in zip(_grads(out, g, [*mixed, *hs, w]), _grads(ref, g, [*mixed, *hs, w])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_strided_bypass_views(case):
    """Bypass views with every stride unusual: channels-last inputs, a W-strided slice."""
    name, device = case
    strides = [1, 2]
    n, c, cp, ho, wo = 2, 6, 2, 3, 4
    h0 = torch.randn(n, c, ho, 2 * wo, device=device)[:, :, :, ::2]
    h1 = torch.randn(n, c, 2 * ho, 2 * wo, device=device).to(memory_format=torch.channels_last)
    bypass = [h0[:, cp:], h1[:, cp:]]
    assert not any(b.is_contiguous() for b in bypass)
    mixed = [torch.randn(n, cp, ho, wo, device=device) for _ in strides]
    w = torch.randn(2, device=device)
    out = partial_channel_node_sum(mixed, bypass, w, 2, strides, backend=name)
    torch.testing.assert_close(out, partial_channel_node_sum_reference(mixed, bypass, w, 2, strides))


@pytest.mark.parametrize(
    "need",
    [
        {"weights": False},
        {("mixed", 0): False, ("bypass", 1): False},
        {("bypass", 0): False, ("bypass", 1): False, ("bypass", 2): False, "weights": False},
        {("mixed", 0): False, ("mixed", 1): False, ("mixed", 2): False},
    ],
    ids=["no-weights", "some-inputs", "mixed-only", "no-mixed"],
)
def test_mixed_requires_grad(case, need, poison_empty):
    name, device = case
    strides = [2, 1, 2]
    hs, mixed, bypass, w = make_node(strides, 2, 8, 4, 3, 3, torch.float32, device, need=need)
    out = partial_channel_node_sum(mixed, bypass, w, 4, strides, backend=name)
    ref = partial_channel_node_sum_reference(mixed, bypass, w, 4, strides)
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, g, [*mixed, *hs, w]), _grads(ref, g, [*mixed, *hs, w])):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pool_ties_and_nan(case):
    """First maximum wins on ties, as max_pool2d; a NaN propagates."""
    name, device = case
    h = torch.zeros(1, 4, 4, 4, device=device)
    h[0, 2, 0, 0] = 5.0
    h[0, 3, 2, 2] = float("nan")
    h.requires_grad_()
    mixed = [torch.randn(1, 2, 2, 2, device=device)]
    w = torch.tensor([0.5], device=device)
    out = partial_channel_node_sum(mixed, [h[:, 2:]], w, 2, [2], backend=name)
    ref = partial_channel_node_sum_reference(mixed, [h[:, 2:]], w, 2, [2])
    torch.testing.assert_close(out, ref, equal_nan=True)
    g = torch.ones_like(out)
    (got,) = torch.autograd.grad(out, [h], g)
    (want,) = torch.autograd.grad(ref, [h], g)
    torch.testing.assert_close(got, want)


def test_weights_grad_deterministic(case):
    name, device = case
    strides = [1, 2, 1, 2]
    hs, mixed, bypass, w = make_node(strides, 2, 16, 4, 6, 6, torch.float32, device)
    out = partial_channel_node_sum(mixed, bypass, w, 4, strides, backend=name)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, [w], g, retain_graph=True)[0]
    for _ in range(2):
        assert torch.equal(first, torch.autograd.grad(out, [w], g, retain_graph=True)[0])


def test_reference_is_the_per_edge_formula():
    """The reference is the eager per-edge sum PC-DARTS writes."""
    strides = [2, 1]
    hs, mixed, bypass, w = make_node(strides, 2, 8, 4, 3, 3, torch.float64, "cpu")
    want = 0
    for e, s in enumerate(strides):
        b = F.max_pool2d(bypass[e], 2, 2) if s == 2 else bypass[e]
        want = want + w[e] * channel_shuffle(torch.cat([mixed[e], b], 1), 4)
    torch.testing.assert_close(partial_channel_node_sum_reference(mixed, bypass, w, 4, strides), want)


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_gradcheck_float64(name):
    if backends.backend_status()[name]:
        pytest.skip(backends.backend_status()[name])
    strides = [2, 1, 2]
    e = len(strides)
    hs, mixed, bypass, w = make_node(strides, 2, 6, 3, 2, 3, torch.float64, "cpu")

    def f(w, *ts):
        return partial_channel_node_sum(ts[:e], [h[:, 2:] for h in ts[e:]], w, 3, strides, backend=name)

    assert torch.autograd.gradcheck(f, (w, *mixed, *hs))


# -- opcheck, torch.compile -----------------------------------------------------------


def _small_node(device):
    strides = [2, 1]
    hs, mixed, bypass, w = make_node(strides, 2, 8, 4, 2, 3, torch.float32, device)
    return mixed, [b.detach().clone().requires_grad_() for b in bypass], w, strides


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpp", "triton"])
def test_opcheck(case, suffix):
    name, device = case
    if (suffix == "_triton") != (name == "triton") or name in ("reference", "cuda"):
        pytest.skip("op belongs to another backend")
    mixed, bypass, w, strides = _small_node(device)
    op = getattr(torch.ops.fastnas, "partial_channel_node_sum" + suffix)
    torch.library.opcheck(op, (mixed, bypass, w, 4, strides))
    torch.library.opcheck(op, (mixed, bypass, w.detach(), 2, strides))


def test_compile_fullgraph(case):
    name, device = case
    mixed, bypass, w, strides = _small_node(device)

    def step(w, *ts):
        out = partial_channel_node_sum(ts[:2], ts[2:], w, 4, strides, backend=name)
        return out.square().mean()

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(w, *mixed, *bypass)
    grads = torch.autograd.grad(loss, [w, *mixed, *bypass])
    loss_ref = step(w, *mixed, *bypass)
    grads_ref = torch.autograd.grad(loss_ref, [w, *mixed, *bypass])
    torch.testing.assert_close(loss, loss_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- bad input ---------------------------------------------------------------------------


def _bad_inputs():
    m = torch.randn(2, 2, 3, 3)
    b1 = torch.randn(2, 6, 3, 3)
    b2 = torch.randn(2, 6, 6, 6)
    w = torch.randn(2)
    f = partial_channel_node_sum
    yield "empty", lambda be: f([], [], torch.randn(0), 2, [], backend=be), ValueError, "mixed is empty"
    yield "mixed type", lambda be: f(m, [b1], w, 2, [1], backend=be), TypeError, "mixed must be a list"
    yield (
        "bypass count",
        lambda be: f([m, m], [b1], w, 2, [1, 1], backend=be),
        ValueError,
        "bypass has 1 tensors but mixed has 2",
    )
    yield "strides count", lambda be: f([m, m], [b1, b1], w, 2, [1], backend=be), ValueError, "strides has 1 entries"
    yield "stride value", lambda be: f([m, m], [b1, b1], w, 2, [1, 3], backend=be), ValueError, "strides[1]=3"
    yield (
        "mixed shape",
        lambda be: f([m, m[:, :1]], [b1, b1], w, 2, [1, 1], backend=be),
        ValueError,
        "mixed[1] has shape",
    )
    yield (
        "mixed rank",
        lambda be: f([m, m[0]], [b1, b1], w, 2, [1, 1], backend=be),
        ValueError,
        "mixed[1] must be a 4-D",
    )
    yield (
        "mixed dtype",
        lambda be: f([m, m.double()], [b1, b1], w, 2, [1, 1], backend=be),
        TypeError,
        "mixed[1] has dtype",
    )
    yield (
        "integer",
        lambda be: f([m.long()], [b1.long()], w[:1], 2, [1], backend=be),
        TypeError,
        "mixed[0] has dtype torch.int64",
    )
    yield (
        "bypass dtype",
        lambda be: f([m, m], [b1, b1.half()], w, 2, [1, 1], backend=be),
        TypeError,
        "bypass[1] has dtype",
    )
    yield (
        "bypass batch",
        lambda be: f([m, m], [b1, b1[:1]], w, 2, [1, 1], backend=be),
        ValueError,
        "bypass[1] has batch size 1",
    )
    yield (
        "bypass channels",
        lambda be: f([m, m], [b1, b1[:, :4]], w, 2, [1, 1], backend=be),
        ValueError,
        "bypass[1] has 4 channels",
    )
    yield (
        "bypass size s1",
        lambda be: f([m, m], [b1, b2], w, 2, [1, 1], backend=be),
        ValueError,
        "bypass[1] is 6x6 but strides[1]=1 needs 3x3",
    )
    yield (
        "bypass size s2",
        lambda be: f([m, m], [b1, b1], w, 2, [1, 2], backend=be),
        ValueError,
        "bypass[1] is 3x3 but strides[1]=2 needs 6x6",
    )
    yield (
        "weights length",
        lambda be: f([m, m], [b1, b2], torch.randn(3), 2, [1, 2], backend=be),
        ValueError,
        "weights must have shape (2,)",
    )
    yield (
        "weights dtype",
        lambda be: f([m, m], [b1, b2], w.long(), 2, [1, 2], backend=be),
        TypeError,
        "weights has dtype",
    )
    yield (
        "weights device",
        lambda be: f([m, m], [b1, b2], w.to("meta"), 2, [1, 2], backend=be),
        ValueError,
        "weights is on meta",
    )
    yield "groups", lambda be: f([m, m], [b1, b2], w, 3, [1, 2], backend=be), ValueError, "groups=3"
    yield "groups type", lambda be: f([m, m], [b1, b2], w, 2.0, [1, 2], backend=be), TypeError, "groups must be an int"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("label,call,exc,message", list(_bad_inputs()), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_is_named(backend, label, call, exc, message):
    if backends.backend_status()[backend]:
        pytest.skip(backends.backend_status()[backend])
    pattern = message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(exc, match=pattern):
        call(backend)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, b, w: torch.ops.fastnas.partial_channel_node_sum([m, m], [b, b], w, 2, [1]),
        lambda m, b, w: torch.ops.fastnas.partial_channel_node_sum([m, m], [b, b], w, 2, [1, 2]),
        lambda m, b, w: torch.ops.fastnas.partial_channel_node_sum([m, m], [b, b], w, 3, [1, 1]),
        lambda m, b, w: torch.ops.fastnas.partial_channel_node_sum([m, m], [b, b], w[:1], 2, [1, 1]),
        lambda m, b, w: torch.ops.fastnas.partial_channel_node_sum([m, m], [b, b.double()], w, 2, [1, 1]),
        lambda m, b, w: torch.ops.fastnas.partial_channel_node_sum_backward(
            torch.randn(2, 7, 3, 3), [m, m], [b, b], w, 2, [1, 1], [True, True], [True, True], True
        ),
    ],
    ids=["strides-count", "pool-size", "groups", "weights", "dtype", "grad-shape"],
)
def test_cpp_op_checks_its_arguments(call):
    """Calls that bypass the Python layer still get an error naming the problem."""
    if backends.backend_status()["cpu"]:
        pytest.skip(backends.backend_status()["cpu"])
    m, b, w = torch.randn(2, 2, 3, 3), torch.randn(2, 6, 3, 3), torch.randn(2)
    with pytest.raises(RuntimeError, match="partial_channel_node_sum"):
        call(m, b, w)
