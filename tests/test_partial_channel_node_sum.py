"""partial_channel_node_sum, a whole PC-DARTS node, against its eager reference."""

import re

import pytest
import torch
import torch.nn.functional as F
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
)

from fastnas.ops import use_backend
from fastnas.ops.partial_channel_mixed_sum import channel_shuffle
from fastnas.ops.partial_channel_node_sum import partial_channel_node_sum, partial_channel_node_sum_reference

pytestmark = pytest.mark.usefixtures("seeded_only")

OP = "partial_channel_node_sum"
BOTH = (OP, f"{OP}_backward")

case = backend_case(OP, "reference")


def make_node(strides, n, c, k, ho, wo, dtype, device, gen, contiguous_bypass=False, need=None):
    """Edge inputs h_e (N, C, s*Ho, s*Wo); mixed (N, C/K, Ho, Wo); bypass the view h_e[:, C/K:]."""
    cp = c // k
    need = need or {}
    hs, mixed, bypass = [], [], []
    for e, s in enumerate(strides):
        h = randn(gen, (n, c, s * ho, s * wo), dtype, device, requires_grad=need.get(("bypass", e), True))
        m = randn(gen, (n, cp, ho, wo), dtype, device, requires_grad=need.get(("mixed", e), True))
        hs.append(h)
        mixed.append(m)
        b = h[:, cp:]
        bypass.append(b.contiguous() if contiguous_bypass else b)
    w = torch.softmax(randn(gen, (len(strides),), torch.float64), 0).to(device=device)
    w = w.to(torch.float32 if dtype != torch.float64 else dtype).requires_grad_(need.get("weights", True))
    return hs, mixed, bypass, w


def _grads(out, g, tensors):
    return grads_of(out, g, tensors)


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
    gen = generator("node", strides, k, dtype)
    hs, mixed, bypass, w = make_node(strides, n, c, k, ho, wo, dtype, device, gen)
    for groups in (k, 2) if c % 2 == 0 and k != 2 else (k,):
        g = randn(gen, (n, c, ho, wo), dtype, device)
        with runs_on(name, *BOTH):
            out = partial_channel_node_sum(mixed, bypass, w, groups, strides, backend=name)
            got = _grads(out, g, [*mixed, *hs, w])
        assert out.dtype == dtype and out.is_contiguous() and out.shape == (n, c, ho, wo)
        lowp = partial_channel_node_sum_reference(mixed, bypass, w, groups, strides)
        d = lambda ts: [t.detach().double() for t in ts]  # noqa: E731
        ref64 = partial_channel_node_sum_reference(
            d(mixed), [h[:, c // k :] for h in d(hs)], w.detach().double(), groups, strides
        )
        assert_oracle(out, lowp, ref64, "out")

        low = _grads(lowp, g, [*mixed, *hs, w])
        x64 = [t.detach().double().requires_grad_() for t in [*mixed, *hs, w]]
        e = len(strides)
        ref = partial_channel_node_sum_reference(
            x64[:e], [h[:, c // k :] for h in x64[e : 2 * e]], x64[-1], groups, strides
        )
        want = torch.autograd.grad(ref, x64, g.double())
        for i, (a, lo, wv) in enumerate(zip(got[:-1], low[:-1], want[:-1])):
            assert_oracle(a, lo, wv, f"grad input {i}")
        # A dot product over the output: its error grows with sum |g * term|.
        assert_oracle(got[-1], low[-1], want[-1], "grad weights", scale=dot_scale(g, ref64), reduction=True)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_odd_sizes_and_contiguous_bypass(case, dtype):
    name, device = case
    strides = [2, 1, 2]
    gen = generator("odd sizes")
    for contiguous in (False, True):
        hs, mixed, bypass, w = make_node(strides, 3, 12, 4, 5, 7, dtype, device, gen, contiguous_bypass=contiguous)
        g = randn(gen, (3, 12, 5, 7), dtype, device)
        leaves = [*mixed, *hs, w]
        with runs_on(name, *BOTH):
            out = partial_channel_node_sum(mixed, bypass, w, 3, strides, backend=name)
            got = _grads(out, g, leaves)
        lowp = partial_channel_node_sum_reference(mixed, bypass, w, 3, strides)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        e = len(strides)
        bypass64 = [h[:, 3:] for h in leaves64[e : 2 * e]]
        truth = partial_channel_node_sum_reference(leaves64[:e], bypass64, leaves64[-1], 3, strides)
        assert_oracle(out, lowp, truth, "out")
        for i, (a, lo, t) in enumerate(zip(got, _grads(lowp, g, leaves), _grads(truth, g.double(), leaves64))):
            if i == len(leaves) - 1:
                assert_oracle(a, lo, t, "grad weights", scale=dot_scale(g, truth), reduction=True)
            else:
                assert_oracle(a, lo, t, f"grad input {i}")


def test_strided_bypass_views(case):
    """Bypass views with every stride unusual: channels-last inputs, a W-strided slice."""
    name, device = case
    strides = [1, 2]
    n, c, cp, ho, wo = 2, 6, 2, 3, 4
    gen = generator("strided bypass")
    h0 = randn(gen, (n, c, ho, wo), torch.float32, device, contiguous=False)
    h1 = randn(gen, (n, c, 2 * ho, 2 * wo), torch.float32, device).to(memory_format=torch.channels_last)
    bypass = [h0[:, cp:], h1[:, cp:]]
    assert not any(b.is_contiguous() for b in bypass)
    mixed = [randn(gen, (n, cp, ho, wo), torch.float32, device) for _ in strides]
    w = randn(gen, (2,), torch.float32, device)
    with runs_on(name, OP):
        out = partial_channel_node_sum(mixed, bypass, w, 2, strides, backend=name)
    lowp = partial_channel_node_sum_reference(mixed, bypass, w, 2, strides)
    truth = partial_channel_node_sum_reference(
        [m.double() for m in mixed], [b.double() for b in bypass], w.double(), 2, strides
    )
    assert_oracle(out, lowp, truth, "out")


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
    gen = generator("requires grad", sorted(map(str, need)))
    hs, mixed, bypass, w = make_node(strides, 2, 8, 4, 3, 3, torch.float32, device, gen, need=need)
    g = randn(gen, (2, 8, 3, 3), torch.float32, device)
    leaves = [*mixed, *hs, w]
    with runs_on(name, *BOTH):
        out = partial_channel_node_sum(mixed, bypass, w, 4, strides, backend=name)
        got = _grads(out, g, leaves)
    ref = partial_channel_node_sum_reference(mixed, bypass, w, 4, strides)
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    truth = partial_channel_node_sum_reference(
        leaves64[:3], [h[:, 2:] for h in leaves64[3:6]], leaves64[-1], 4, strides
    )
    for i, (a, b, t) in enumerate(zip(got, _grads(ref, g, leaves), _grads(truth, g.double(), leaves64))):
        assert (a is None) == (b is None)
        if a is not None:
            scale = dot_scale(g, truth) if i == len(leaves) - 1 else None
            assert_oracle(a, b, t, f"grad {i}", scale=scale, reduction=scale is not None)


def test_pool_ties_and_nan(case):
    """First maximum wins on ties, as max_pool2d; a NaN propagates."""
    name, device = case
    h = torch.zeros(1, 4, 4, 4, device=device)
    h[0, 2, 0, 0] = 5.0
    h[0, 3, 2, 2] = float("nan")
    h.requires_grad_()
    mixed = [randn(generator("ties"), (1, 2, 2, 2), torch.float32, device)]
    w = torch.tensor([0.5], device=device)
    g = torch.ones(1, 4, 2, 2, device=device)
    with runs_on(name, *BOTH):
        out = partial_channel_node_sum(mixed, [h[:, 2:]], w, 2, [2], backend=name)
        (got,) = torch.autograd.grad(out, [h], g)
    ref = partial_channel_node_sum_reference(mixed, [h[:, 2:]], w, 2, [2])
    # Sums of one term each: the result and the gradients are exact, NaN where the window holds one.
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.nan_to_num(), ref.nan_to_num())
    (want,) = torch.autograd.grad(ref, [h], g)
    assert torch.equal(got, want)


def test_weights_grad_deterministic(case):
    name, device = case
    strides = [1, 2, 1, 2]
    gen = generator("deterministic")
    hs, mixed, bypass, w = make_node(strides, 2, 16, 4, 6, 6, torch.float32, device, gen)
    g = randn(gen, (2, 16, 6, 6), torch.float32, device)
    with runs_on(name, *BOTH):
        out = partial_channel_node_sum(mixed, bypass, w, 4, strides, backend=name)
        first = torch.autograd.grad(out, [w], g, retain_graph=True)[0]
        for _ in range(2):
            assert torch.equal(first, torch.autograd.grad(out, [w], g, retain_graph=True)[0])


def test_reference_is_the_per_edge_formula():
    """The reference is the eager per-edge sum PC-DARTS writes."""
    strides = [2, 1]
    hs, mixed, bypass, w = make_node(strides, 2, 8, 4, 3, 3, torch.float64, "cpu", generator("formula"))
    want = 0
    for e, s in enumerate(strides):
        b = F.max_pool2d(bypass[e], 2, 2) if s == 2 else bypass[e]
        want = want + w[e] * channel_shuffle(torch.cat([mixed[e], b], 1), 4)
    assert_oracle(partial_channel_node_sum_reference(mixed, bypass, w, 4, strides), None, want, "out")


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_gradcheck_float64(name):
    skip_unless_runs(OP, name)
    strides = [2, 1, 2]
    e = len(strides)
    hs, mixed, bypass, w = make_node(strides, 2, 6, 3, 2, 3, torch.float64, "cpu", generator("gradcheck"))

    def f(w, *ts):
        return partial_channel_node_sum(ts[:e], [h[:, 2:] for h in ts[e:]], w, 3, strides, backend=name)

    with runs_on(name, *BOTH):
        f(w, *mixed, *hs).sum().backward()
    assert torch.autograd.gradcheck(f, (w, *mixed, *hs))


# -- opcheck, torch.compile -----------------------------------------------------------


def _small_node(device, seed):
    strides = [2, 1]
    hs, mixed, bypass, w = make_node(strides, 2, 8, 4, 2, 3, torch.float32, device, generator("small node", seed))
    return mixed, [b.detach().clone().requires_grad_() for b in bypass], w, strides


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpp", "triton"])
def test_opcheck(case, suffix):
    name, device = case
    if (suffix == "_triton") != (name == "triton") or name in ("reference", "cuda"):
        pytest.skip("op belongs to another backend")
    mixed, bypass, w, strides = _small_node(device, "opcheck")
    op = getattr(torch.ops.fastnas, OP + suffix)
    torch.library.opcheck(op, (mixed, bypass, w, 4, strides))
    torch.library.opcheck(op, (mixed, bypass, w.detach(), 2, strides))


def test_compile_fullgraph(case):
    name, device = case
    mixed, bypass, w, strides = _small_node(device, "compile")

    def step(w, *ts):
        out = partial_channel_node_sum(ts[:2], ts[2:], w, 4, strides)
        return out.square().mean()

    leaves = [w, *mixed, *bypass]
    compiled, seen = compile_recording(step)
    with use_backend(name):
        loss = compiled(*leaves)
        grads = torch.autograd.grad(loss, leaves)
    assert_compiled_with(name, seen, OP)
    with use_backend("reference"):
        lowp = step(*leaves)
        lowp_grads = torch.autograd.grad(lowp, leaves)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        truth = step(*leaves64)
        truth_grads = torch.autograd.grad(truth, leaves64)
    assert_oracle(loss, lowp, truth, "loss", reduction=True)
    for i, (a, lo, t) in enumerate(zip(grads, lowp_grads, truth_grads)):
        assert_oracle(a, lo, t, f"grad {i}", reduction=i == 0)


# -- bad input ---------------------------------------------------------------------------


def _bad_inputs():
    m = torch.zeros(2, 2, 3, 3)
    b1 = torch.zeros(2, 6, 3, 3)
    b2 = torch.zeros(2, 6, 6, 6)
    w = torch.zeros(2)
    f = partial_channel_node_sum
    yield "empty", lambda be: f([], [], torch.zeros(0), 2, [], backend=be), ValueError, "mixed is empty"
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
        lambda be: f([m, m], [b1, b2], torch.zeros(3), 2, [1, 2], backend=be),
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
    skip_unless_runs(OP, backend)
    with pytest.raises(exc, match=re.escape(message)):
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
            torch.zeros(2, 7, 3, 3), [m, m], [b, b], w, 2, [1, 1], [True, True], [True, True], True
        ),
    ],
    ids=["strides-count", "pool-size", "groups", "weights", "dtype", "grad-shape"],
)
def test_cpp_op_checks_its_arguments(call):
    """Calls that bypass the Python layer still get an error naming the problem."""
    skip_unless_runs(OP, "cpu")
    m, b, w = torch.zeros(2, 2, 3, 3), torch.zeros(2, 6, 3, 3), torch.zeros(2)
    with pytest.raises(RuntimeError, match="partial_channel_node_sum"):
        call(m, b, w)
