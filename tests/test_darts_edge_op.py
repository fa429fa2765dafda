"""The fused DARTS edge as one C++ op (``torch.ops.fastnas.darts_edge``), forward and backward.

The C++ op runs the same arithmetic as the Python composite of the building blocks
(``DartsEdgeFunction`` with the ``cpu`` blocks), so the two must agree bit for bit:
output, every gradient and the running statistics. The composite itself is held to
the eager candidate modules in tests/test_darts_edge.py; here also fp64 gradcheck,
opcheck, torch.compile, the errors at the op's boundary, and that an edge is one
call per direction.
"""

import copy
import importlib

import pytest
import torch

from fastnas import backends, bench
from fastnas.nn import MixedOp
from fastnas.spaces.darts import DARTS_PRIMITIVES

edge_ops = importlib.import_module("fastnas.ops.darts_edge")
EdgeSpec, darts_edge = edge_ops.EdgeSpec, edge_ops.darts_edge

pytestmark = [
    pytest.mark.skipif(
        "cpu" not in edge_ops._CPP_BACKENDS, reason="fastnas._C has no C++ darts_edge (extension missing or older)"
    ),
    pytest.mark.usefixtures("one_thread"),
]

MEMORY = ("save", "recompute")
# Scalable-DARTS' pairs: a convolution with ReLU and with another activation, on one edge.
SCALABLE = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_3x3_swish", "dil_conv_3x3",
            "dil_conv_3x3_elu"]  # fmt: skip
SUBSETS = [
    DARTS_PRIMITIVES,
    ["none", "sep_conv_3x3", "skip_connect"],
    ["max_pool_3x3", "avg_pool_3x3"],
    ["dil_conv_5x5", "sep_conv_7x7", "none"],
    ["skip_connect", "dil_conv_3x3"],
    ["none", "skip_connect"],
    SCALABLE,
]


def _bound(module):
    """The module's edge plan bound to its candidates: the current parameters and buffers."""
    return module.plan.bind(module.ops)


def _edge(prims, C, stride, dtype):
    op = MixedOp(C, stride, prims).to(dtype)
    assert op.fused_reason is None, op.fused_reason
    return op


def _run(module, x, w, memory, path, grad_seed=1):
    """Output, input/weight/parameter gradients and buffers of one fused edge step."""
    bound, spec = _bound(module), module.plan.spec
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    params = bound.parameters()
    if path == "cpp":
        out = darts_edge(x, w, params, spec, bound.buffers(), memory=memory, backend=x.device.type)
    else:
        out = edge_ops.DartsEdgeFunction.apply(x, w, spec, memory, x.device.type, bound.buffers(), *params)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype).to(out.device)
    out.backward(g)
    return [out.detach(), x.grad, w.grad, *(p.grad for p in params), *module.buffers()]


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("subset", range(len(SUBSETS)))
def test_bit_identical_to_the_composite(subset, stride, memory, dtype):
    prims = SUBSETS[subset]
    if stride == 2 and prims == ["skip_connect", "dil_conv_3x3"]:
        prims = ["skip_connect", "dil_conv_3x3", "max_pool_3x3"]
    op = _edge(prims, 6, stride, dtype)
    if prims is SCALABLE:
        assert op.plan.spec.activations == ("relu", "swish", "relu", "elu")
    gen = torch.Generator().manual_seed(subset)
    x = torch.randn(3, 6, 10, 10, generator=gen, dtype=dtype)
    w = torch.softmax(torch.randn(len(prims), generator=gen, dtype=dtype), 0)
    composite, cpp = copy.deepcopy(op), copy.deepcopy(op)
    for step in range(2):  # the second step reads the running statistics the first one wrote
        want = _run(composite, x, w, memory, "composite", step)
        got = _run(cpp, x, w, memory, "cpp", step)
        for i, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(a, b), f"step {step}, tensor {i}: max diff {(a - b).abs().max().item()}"


@pytest.mark.requires_cuda
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("stride", (1, 2))
def test_cuda_op_matches_the_cpu_op_float64(stride, memory):
    """The same C++ orchestration on the CUDA building blocks: float64 agrees to rounding."""
    assert "cuda" in edge_ops._CPP_BACKENDS
    op = _edge(DARTS_PRIMITIVES, 6, stride, torch.float64)
    gen = torch.Generator().manual_seed(stride)
    x = torch.randn(3, 6, 10, 10, generator=gen, dtype=torch.float64)
    w = torch.softmax(torch.randn(len(DARTS_PRIMITIVES), generator=gen, dtype=torch.float64), 0)
    cpu, cuda = copy.deepcopy(op), copy.deepcopy(op).cuda()
    for step in range(2):
        want = _run(cpu, x, w, memory, "cpp", step)
        got = _run(cuda, x.cuda(), w.cuda(), memory, "cpp", step)
        for i, (a, b) in enumerate(zip(want, got)):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-10, msg=lambda m, i=i, s=step: f"{s} [{i}]: {m}")


def test_non_contiguous_input_and_fp32_weights_for_fp64():
    op = _edge(DARTS_PRIMITIVES, 4, 1, torch.float64)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)[:, ::2]  # a channel-strided view, as PC-DARTS passes
    w = torch.softmax(torch.randn(8), 0)  # float32 architecture weights
    a, b = copy.deepcopy(op), copy.deepcopy(op)
    for t, u in zip(_run(a, x, w, "save", "composite"), _run(b, x, w, "save", "cpp")):
        assert torch.equal(t, u)
    assert b.ops[0].__class__.__name__ == "Zero"


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("stride", (1, 2))
def test_gradcheck_float64(stride, memory):
    prims = ["none", "sep_conv_3x3", "max_pool_3x3", "avg_pool_3x3", "dil_conv_3x3"]
    prims += ["skip_connect"] if stride == 1 else ["skip_connect"]  # a factorized reduce on stride 2
    op = _edge(prims, 2, stride, torch.float64)
    spec = op.plan.spec
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(len(prims), generator=gen, dtype=torch.float64), 0).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in _bound(op).parameters()]

    def edge(x, w, *ps):
        return darts_edge(x, w, ps, spec, memory=memory, backend="cpu")

    assert torch.autograd.gradcheck(edge, (x, w, *params))


@pytest.mark.parametrize("memory", MEMORY)
def test_double_backward_is_refused(memory):
    """create_graph=True would differentiate a backward whose building blocks have no derivatives:
    the op says so instead of returning gradients without their second-order terms."""
    spec, x, w, params, _ = _opcheck_case(1)
    out = darts_edge(x, w, params, spec, memory=memory, backend="cpu")
    with pytest.raises(RuntimeError, match=r"darts_edge: double backward \(create_graph=True\) is not supported"):
        torch.autograd.grad(out.sum(), w, create_graph=True)


def _opcheck_case(stride):
    prims = ["none", "sep_conv_3x3", "max_pool_3x3", "skip_connect", "dil_conv_3x3", "avg_pool_3x3"]
    op = _edge(prims, 2, stride, torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(len(prims), generator=gen, dtype=torch.float64), 0).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in _bound(op).parameters()]
    return op.plan.spec, x, w, params, [list(b) for b in _bound(op).buffers()]


@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16))
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("stride", (1, 2))
def test_opcheck(stride, memory, dtype):
    spec, x, w, params, bufs = _opcheck_case(stride)
    x = x.detach().to(dtype).requires_grad_(True)
    params = [p.detach().to(dtype).requires_grad_(True) for p in params]
    args = (x, w, params, *bufs, list(spec.encoded), spec.eps, spec.momentum, memory)
    torch.library.opcheck(torch.ops.fastnas.darts_edge.default, args)
    out = torch.ops.fastnas.darts_edge(*args)
    saved = out[1] if memory == "save" else None
    detached = [p.detach() for p in params]
    bargs = (torch.randn_like(out[0]), x.detach(), w.detach(), detached, saved, *out[2:], list(spec.encoded))
    torch.library.opcheck(torch.ops.fastnas.darts_edge_backward.default, bargs)


def test_compile_fullgraph_matches_eager_and_updates_buffers_once():
    spec, x, w, params, _ = _opcheck_case(1)
    op = _edge(["none", "sep_conv_3x3", "max_pool_3x3", "skip_connect", "dil_conv_3x3", "avg_pool_3x3"], 2, 1,
               torch.float64)  # fmt: skip

    def loss(x, w, params, buffers):
        return darts_edge(x, w, params, spec, buffers, memory="save", backend="cpu").square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    buffers = [[t.clone() for t in b] for b in _bound(op).buffers()]
    want_buffers = [[t.clone() for t in b] for b in _bound(op).buffers()]
    torch._dynamo.reset()
    got = compiled(x, w, params, buffers)
    grads = torch.autograd.grad(got, [x, w, *params])
    want = loss(x, w, params, want_buffers)
    want_grads = torch.autograd.grad(want, [x, w, *params])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, want_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    for bs, ws in zip(buffers, want_buffers):
        for b, r in zip(bs, ws):
            torch.testing.assert_close(b, r, rtol=1e-12, atol=0)


def test_one_call_per_direction():
    """Below autograd, a fused edge's forward and backward are one op each, and autograd zero-fills no
    gradient for its non-differentiable outputs (one launch each on a GPU)."""
    op = _edge(DARTS_PRIMITIVES, 4, 2, torch.float32)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_(True)
    out = op(x, w)  # the module: the forward is one call into the engine
    counter = bench.count_ops(lambda: op(x, w).backward(torch.ones_like(out)))
    fastnas_ops = {k: v for k, v in counter.counts.items() if k.startswith("fastnas::")}
    assert fastnas_ops == {"fastnas::darts_edge": 1, "fastnas::darts_edge_backward": 1}, counter.counts
    assert "aten::zeros" not in counter.counts, counter.counts


def test_version_counters_of_buffers_move():
    op = _edge(["max_pool_3x3", "sep_conv_3x3"], 4, 1, torch.float32)
    before = [b._version for b in op.buffers()]
    op(torch.randn(2, 4, 6, 6), torch.softmax(torch.randn(2), 0))
    assert all(b._version > v for b, v in zip(op.buffers(), before))


def test_encoded_spec_round_trips():
    spec = EdgeSpec(2, 8, sep=((3, 4), (5, 5)), dil=((3, 6),), max_index=1, avg_index=2, reduce_index=3, eps=1e-3)
    assert spec.encoded == (2, 8, 2, 1, 1, 2, -1, 3, 3, 4, 0, 5, 5, 0, 3, 6, 0)
    assert EdgeSpec.decode(spec.encoded, 1e-3, 0.1) == spec
    # Each convolution's activation code follows its kernel size and weight index (0: ReLU).
    swish = EdgeSpec(2, 8, sep=((3, 4), (5, 5)), dil=((3, 6),), reduce_index=3, activations=("swish", "relu", "elu"))
    assert swish.encoded[8:] == (3, 4, 4, 5, 5, 0, 3, 6, 2)
    assert EdgeSpec.decode(swish.encoded) == swish


def _bad_calls():
    spec = EdgeSpec(stride=1, K=3, sep=((3, 1),), skip_index=2)
    C = 2
    x = torch.randn(2, C, 4, 4)
    w = torch.ones(3)
    params = [torch.randn(C, 1, 3, 3), torch.randn(C, C, 1, 1), torch.randn(C, 1, 3, 3), torch.randn(C, C, 1, 1)]
    bufs = ([torch.zeros(C)] * 2, [torch.ones(C)] * 2, [torch.zeros((), dtype=torch.long)] * 2)
    enc = list(spec.encoded)
    op = torch.ops.fastnas.darts_edge

    def raw(x=x, w=w, params=params, bufs=bufs, enc=enc, memory="save"):
        return lambda: op(x, w, params, *bufs, enc, 1e-5, 0.1, memory)

    yield "memory", raw(memory="keep"), ValueError, "memory must be one of"
    yield "spec stride", raw(enc=[3, *enc[1:]]), ValueError, "spec stride must be 1 or 2"
    yield "spec index", raw(enc=enc[:8] + [3, 7, 0]), ValueError, "weight index 7, out of range for K=3"
    yield "spec length", raw(enc=enc[:9]), ValueError, "spec needs 11 ints"
    yield "spec even kernel", raw(enc=enc[:8] + [4, 1, 0]), ValueError, "kernel size 4"
    yield "spec activation", raw(enc=enc[:8] + [3, 1, 9]), ValueError, "activation code 9"
    yield "skip on stride 2", raw(enc=[2, *enc[1:]]), ValueError, "identity skip needs stride 1"
    yield "x not 4-D", raw(x=x[0]), ValueError, r"x must be \(N, C, H, W\)"
    yield "x int", raw(x=x.int(), params=[p.int() for p in params]), TypeError, "float16 and bfloat16 inputs, not Int"
    yield "weights length", raw(w=torch.ones(4)), ValueError, r"weights must have shape \(3,\)"
    yield "param count", raw(params=params[:3]), ValueError, "expected 4 parameter tensors"
    yield "param shape", raw(params=[params[0], torch.randn(C, C, 3, 3), *params[2:]]), ValueError, "params\\[1\\]"
    yield "param dtype", raw(params=[params[0].double(), *params[1:]]), TypeError, "params\\[0\\] has dtype"
    yield "param device", raw(params=[params[0].to("meta"), *params[1:]]), ValueError, "params\\[0\\] is on meta"
    yield "buffer count", raw(bufs=(bufs[0][:1], bufs[1], bufs[2])), ValueError, "running_mean has 1 tensors"
    yield "buffer shape", raw(bufs=([torch.zeros(3)] * 2, bufs[1], bufs[2])), ValueError, "running_mean\\[0\\]"
    reduce = EdgeSpec(stride=2, K=1, reduce_index=0)
    fr = [torch.randn(1, C, 1, 1), torch.randn(1, C, 1, 1)]
    yield "odd H", lambda: op(torch.randn(2, C, 5, 4), torch.ones(1), fr, [], [], [], list(reduce.encoded), 1e-5,
                              0.1, "save"), ValueError, "even H and W"  # fmt: skip


@pytest.mark.parametrize("label, call, exc, message", list(_bad_calls()), ids=[c[0] for c in _bad_calls()])
def test_errors_are_named_at_the_boundary(label, call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_fake_checks_like_the_op():
    """Under fake tensors (torch.compile) the same mistakes raise the same errors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = EdgeSpec(stride=1, K=3, sep=((3, 1),), skip_index=2)
    with FakeTensorMode():
        x = torch.randn(2, 2, 4, 4)
        params = [torch.randn(2, 1, 3, 3), torch.randn(2, 2, 1, 1), torch.randn(2, 1, 3, 3), torch.randn(2, 2, 1, 1)]
        out = torch.ops.fastnas.darts_edge(x, torch.ones(3), params, [], [], [], list(spec.encoded), 1e-5, 0.1, "save")
        assert tuple(out[0].shape) == (2, 2, 4, 4) and tuple(out[1].shape) == (1, 2, 2, 4, 4)
        with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
            torch.ops.fastnas.darts_edge(x, torch.ones(4), params, [], [], [], list(spec.encoded), 1e-5, 0.1, "save")
        with pytest.raises(ValueError, match="expected 4 parameter tensors"):
            torch.ops.fastnas.darts_edge(x, torch.ones(3), params[:2], [], [], [], list(spec.encoded), 1e-5, 0.1,
                                         "save")  # fmt: skip


def test_unsupported_reason_holds_for_the_op():
    """What unsupported_reason accepts the op runs; what it rejects the op rejects by name."""
    spec = EdgeSpec(stride=1, K=2, sep=((15, 0),), skip_index=1)
    assert edge_ops.unsupported_reason(spec, torch.float32, "cpu") is None
    params = [torch.randn(2, 1, 15, 15), torch.randn(2, 2, 1, 1), torch.randn(2, 1, 15, 15), torch.randn(2, 2, 1, 1)]
    out = darts_edge(torch.randn(2, 2, 5, 5), torch.ones(2), params, spec, backend="cpu")
    assert torch.isfinite(out).all()
    for half in (torch.float16, torch.bfloat16):
        assert edge_ops.unsupported_reason(spec, half, "cpu") is None
        out = darts_edge(
            torch.randn(2, 2, 5, 5).to(half), torch.ones(2), [p.to(half) for p in params], spec, backend="cpu"
        )
        assert out.dtype == half and torch.isfinite(out).all()
        assert "Python composite" in edge_ops.unsupported_reason(spec, half, "triton")
    assert edge_ops.unsupported_reason(spec, torch.int32, "cpu") is not None
    with pytest.raises(TypeError, match="float16 and bfloat16 inputs, not"):
        darts_edge(torch.randn(2, 2, 5, 5).int(), torch.ones(2), [p.int() for p in params], spec, backend="cpu")


def test_backend_table_lists_the_cpp_edge():
    assert "cpu" in backends.implementations("darts_edge")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastnas::darts_edge", "CPU")
