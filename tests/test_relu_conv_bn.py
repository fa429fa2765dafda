"""relu_conv_bn against the modules it replaces (ReLUConvBN, FactorizedReduce), and in the search cell."""

import contextlib
import copy
import re

import pytest
import torch
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

from fastnas.backends import use_backend
from fastnas.nn import cell as cell_module
from fastnas.nn.operations import FactorizedReduce, ReLUConvBN
from fastnas.ops.relu_conv_bn import relu_conv_bn
from fastnas.spaces.darts import SearchNetwork

pytestmark = pytest.mark.usefixtures("seeded_only")

case = backend_case("relu_conv_bn", "reference", "reference-cuda")
VARIANTS = ["plain", "factorized"]
OPS = ("relu_conv_bn", "relu_conv_bn_backward")


def _module(variant: str, dtype=torch.float32, device="cpu"):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = ReLUConvBN(5, 7, 1, 1, 0, affine=False) if variant == "plain" else FactorizedReduce(5, 8, affine=False)
    m = m.to(device=device, dtype=dtype)
    if dtype not in (torch.float32, torch.float64):
        _parts(m)[1].float()  # running statistics in float32, as under autocast
    return m


def _parts(m):
    bn = m.op[2] if isinstance(m, ReLUConvBN) else m.bn
    weights = [m.op[1].weight] if isinstance(m, ReLUConvBN) else [m.conv_1.weight, m.conv_2.weight]
    return weights, bn


def _run_op(m, x, g, backend):
    weights, bn = _parts(m)
    out = relu_conv_bn(
        x, weights, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.eps, bn.momentum, backend=backend
    )
    out.backward(g)
    return out, x.grad, [w.grad for w in weights], list(m.buffers())


def _run_module(m, x, g):
    out = m(x)
    out.backward(g)
    weights, _ = _parts(m)
    return out, x.grad, [w.grad for w in weights], list(m.buffers())


def _inputs(variant, dtype, device, contiguous=True, key=()):
    gen = generator("relu_conv_bn", variant, *key)
    shape = (3, 5, 6, 6) if variant == "factorized" else (3, 5, 5, 7)
    x = randn(gen, shape, dtype, device, contiguous=contiguous, requires_grad=True)
    out_c = 8 if variant == "factorized" else 7
    out_hw = (3, 3) if variant == "factorized" else shape[2:]
    g = randn(gen, (shape[0], out_c, *out_hw), dtype, device)
    return x, g


def _fresh(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_matches_the_module(case, variant, dtype, contiguous):
    """Output, input and weight gradients, running statistics: against the module run in float64 by the 2x
    rule, and on the CPU bit for bit the module's own (the same ATen kernels, recomputed)."""
    name, device = case
    x, g = _inputs(variant, dtype, device, contiguous, key=(str(dtype), contiguous))
    got = _run_op(_module(variant, dtype, device), x, g, name)
    lowp = _run_module(_module(variant, dtype, device), _fresh(x), g)
    truth = _run_module(_module(variant, torch.float64, device), x.detach().double().requires_grad_(), g.double())
    what = ["out", "grad_x", "grad_w", "buffers"]
    for w, a, lo, t in zip(what, got, lowp, truth):
        for i, (ai, li, ti) in enumerate(zip(*(v if isinstance(v, list) else [v] for v in (a, lo, t)))):
            if not ai.is_floating_point():
                assert torch.equal(ai, li), f"{w}[{i}]"
                continue
            assert_oracle(ai, None if dtype == torch.float64 else li, ti, f"{w}[{i}]", reduction=w != "out")
            if device.type == "cpu":
                assert torch.equal(ai, li), f"{w}[{i}]: not the module's bits"


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_the_backend_asked_for(case, variant):
    name, device = case
    x, g = _inputs(variant, torch.float32, device)
    with runs_on(name, *OPS, others=()):
        _run_op(_module(variant, device=device), x, g, name)


def test_autocast_runs_the_convolution_in_autocast_dtype(case):
    """Under autocast the output has the dtype the modules' would and their accuracy (2x rule against
    float64); the running statistics stay float32."""
    name, device = case
    x, g = _inputs("plain", torch.float32, device)
    m, ref = _module("plain", device=device), _module("plain", device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = _run_op(m, x, g.bfloat16(), name)
        lowp = _run_module(ref, _fresh(x), g.bfloat16())
    truth = _run_module(_module("plain", torch.float64, device), x.detach().double().requires_grad_(), g.double())
    assert got[0].dtype == lowp[0].dtype == torch.bfloat16
    assert all(b.dtype == r.dtype for b, r in zip(got[3], lowp[3]))
    assert_oracle(got[0], lowp[0], truth[0], "out")
    assert_oracle(got[1], lowp[1], truth[1], "grad_x")


def test_bumps_the_buffers_versions(case):
    """The C++ op's in-place updates are visible to autograd's version checks (eager batch norm's
    update of the running statistics is not)."""
    name, device = case
    if name == "reference":
        pytest.skip("eager batch norm updates its running statistics without a version bump")
    m = _module("plain", device=device)
    weights, bn = _parts(m)
    before = [b._version for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    x, _ = _inputs("plain", torch.float32, device)
    relu_conv_bn(x, weights, bn.running_mean, bn.running_var, bn.num_batches_tracked, backend=name)
    after = [b._version for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_double_backward_is_the_modules(case, variant):
    """create_graph=True through the op gives the module's second derivatives (the backward is ATen ops
    that record their graph)."""
    name, device = case

    def second(run):
        m = _module(variant, torch.float64, device)
        x, _ = _inputs(variant, torch.float64, device)
        weights, _ = _parts(m)
        out = run(m, x)
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), weights, create_graph=True)
        sum(gw.pow(2).sum() for gw in grads).backward()
        return [x.grad, *(w.grad for w in weights)]

    got = second(lambda m, x: _run_op_forward(m, x, name))
    want = second(lambda m, x: m(x))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _run_op_forward(m, x, backend):
    weights, bn = _parts(m)
    return relu_conv_bn(x, weights, bn.running_mean, bn.running_var, bn.num_batches_tracked, backend=backend)


# -- opcheck, torch.compile ------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(case, variant):
    name, device = case
    if name == "reference":
        pytest.skip("the reference is no op")
    m = _module(variant, device=device)
    weights, bn = _parts(m)
    x, g = _inputs(variant, torch.float32, device)
    args = (x, weights, bn.running_mean, bn.running_var, bn.num_batches_tracked, 1e-5, 0.1)
    torch.library.opcheck(torch.ops.fastnas.relu_conv_bn, args)
    out, mean, rstd = torch.ops.fastnas.relu_conv_bn(*args)
    detached = [w.detach() for w in weights]
    torch.library.opcheck(torch.ops.fastnas.relu_conv_bn_backward, (g, x.detach(), detached, mean, rstd, 1e-5))


def test_compile_fullgraph(case):
    name, device = case
    m, ref = _module("factorized", device=device), _module("factorized", device=device)
    x, g = _inputs("factorized", torch.float32, device)

    compiled, seen = compile_recording(lambda x: _run_op_forward(m, x, name))
    out = compiled(x)
    assert_compiled_with(name, seen, "relu_conv_bn")
    got = (out, *torch.autograd.grad(out, [x, *_parts(m)[0]], g))
    x_ref = _fresh(x)
    out = ref(x_ref)
    want = (out, *torch.autograd.grad(out, [x_ref, *_parts(ref)[0]], g))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for a, b in zip(m.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)


# -- bad input ---------------------------------------------------------------------------


def _bad_inputs():
    x, w = torch.zeros(2, 4, 6, 6), torch.zeros(6, 4, 1, 1)
    rm, rv, n = torch.zeros(6), torch.ones(6), torch.tensor(0)
    op = relu_conv_bn
    yield "x rank", lambda b: op(x[0], [w], rm, rv, n, backend=b), ValueError, "x must be (N, C, H, W)"
    yield "x dtype", lambda b: op(x.long(), [w], rm, rv, n, backend=b), TypeError, "x has dtype torch.int64"
    yield "no weights", lambda b: op(x, [], rm, rv, n, backend=b), ValueError, "weights must be one 1x1"
    yield "weight kernel", lambda b: op(x, [w.expand(6, 4, 3, 3)], rm, rv, n, backend=b), ValueError, "weights[0]"
    yield "weight channels", lambda b: op(x, [w[:, :3]], rm, rv, n, backend=b), ValueError, "(C_out, 4, 1, 1)"
    yield "weight dtype", lambda b: op(x, [w.double()], rm, rv, n, backend=b), TypeError, "weights[0] has dtype"
    yield (
        "reduce odd",
        lambda b: op(x[:, :, :5], [w[:3], w[:3]], rm, rv, n, backend=b),
        ValueError,
        "a factorized reduce needs even H and W, got 5x6",
    )
    yield "stats size", lambda b: op(x, [w], rm[:5], rv, n, backend=b), ValueError, "running_mean must have 6 entries"
    yield "stats dtype", lambda b: op(x, [w], rm, rv.half(), n, backend=b), TypeError, "running_var has dtype"
    yield "count", lambda b: op(x, [w], rm, rv, torch.zeros(2), backend=b), ValueError, "num_batches_tracked must"
    yield (
        "one value",
        lambda b: op(x[:1, :, :1, :1], [w], rm, rv, n, backend=b),
        ValueError,
        "more than one value per channel",
    )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("label,call,exc,message", list(_bad_inputs()), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_is_named(backend, label, call, exc, message):
    skip_unless_runs("relu_conv_bn", backend)
    with pytest.raises(exc, match=re.escape(message)):
        call(backend)


@pytest.mark.parametrize(
    "call",
    [
        lambda x, w, s: torch.ops.fastnas.relu_conv_bn(x[0], [w], *s, 1e-5, 0.1),
        lambda x, w, s: torch.ops.fastnas.relu_conv_bn(x, [w[:, :2]], *s, 1e-5, 0.1),
        lambda x, w, s: torch.ops.fastnas.relu_conv_bn(x[:, :, :5], [w[:3], w[:3]], *s, 1e-5, 0.1),
        lambda x, w, s: torch.ops.fastnas.relu_conv_bn(x, [w], s[0][:2], *s[1:], 1e-5, 0.1),
        lambda x, w, s: torch.ops.fastnas.relu_conv_bn_backward(torch.zeros(2, 6, 5, 6), x, [w], s[0], s[1], 1e-5),
    ],
    ids=["rank", "weight", "odd-reduce", "stats", "grad-shape"],
)
def test_cpp_op_checks_its_arguments(call):
    """Calls that bypass the Python layer still get an error naming the op."""
    skip_unless_runs("relu_conv_bn", "cpu")
    stats = (torch.zeros(6), torch.ones(6), torch.tensor(0))
    with pytest.raises((RuntimeError, ValueError), match="relu_conv_bn"):
        call(torch.zeros(2, 4, 6, 6), torch.zeros(6, 4, 1, 1), stats)


# -- in the search cell ------------------------------------------------------------------


def _network_step(net, x, y):
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss, {n: p.grad for n, p in net.named_parameters()}, dict(net.named_buffers())


@pytest.mark.parametrize("memory", ["save", "recompute"])
def test_search_cell_preprocesses_with_the_op(memory, monkeypatch):
    """Where the cell recomputes its preprocessing (fused edges), the op does it, with the gradients and
    statistics of the torch.utils.checkpoint recomputation it replaces, bit for bit on the CPU; with
    the reference backend the cell keeps the eager modules."""
    skip_unless_runs("relu_conv_bn", "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SearchNetwork(C=4, num_classes=3, layers=3, backend="cpu", memory=memory)
        reference = SearchNetwork(C=4, num_classes=3, layers=3, backend="reference", memory=memory)
    other = copy.deepcopy(net)
    gen = generator("cell", memory)
    x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    with runs_on("cpu", *OPS, others=()) as spy:
        got = _network_step(net, x, y)
    # Both preprocessings of each of the 3 cells, the one after the reduction cell a factorized reduce.
    assert sum(c == ("relu_conv_bn", "cpu") for c in spy.calls) == 6
    monkeypatch.setattr(cell_module, "_preprocess_parts", lambda module: None)
    with runs_on("cpu", "darts_edge") as spy:
        want = _network_step(other, x, y)
    assert ("relu_conv_bn", "cpu") not in spy.calls
    assert torch.equal(got[0], want[0])
    for n in got[1]:
        assert (got[1][n] is None) == (want[1][n] is None), n
        assert got[1][n] is None or torch.equal(got[1][n], want[1][n]), n
    for n in got[2]:
        assert torch.equal(got[2][n], want[2][n]), n
    with runs_on("reference"):
        _network_step(reference, x, y)


@pytest.mark.parametrize("how", ["context", "variable"])
def test_search_cell_keeps_the_eager_modules_when_the_reference_is_asked_for(how, monkeypatch):
    """The reference backend asked for by use_backend or FASTNAS_BACKEND, not only by argument: a recompute
    cell's preprocessing runs its eager modules, and no fastnas kernel runs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SearchNetwork(C=4, num_classes=3, layers=3, memory="recompute")
    gen = generator("cell reference", how)
    x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    if how == "variable":
        monkeypatch.setenv("FASTNAS_BACKEND", "reference")
        context = contextlib.nullcontext()
    else:
        monkeypatch.delenv("FASTNAS_BACKEND", raising=False)
        context = use_backend("reference")
    with context, runs_on("reference"):
        _network_step(net, x, y)
