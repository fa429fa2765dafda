"""A whole PC-DARTS node as one C++ op (``torch.ops.fastnas.partial_channel_node``).

Against the composite it replaces (one fused edge per incoming edge on the first
C / groups channels, then ``partial_channel_node_sum``) bit for bit, and against
the eager candidate modules (the oracle) to fp64 rounding; fp64 gradcheck,
opcheck, the errors at the boundary, one call per direction.
"""

import copy
import importlib

import pytest
import torch

from fastnas import bench
from fastnas.nn import PartialChannelMixedOp
from fastnas.ops.partial_channel_node_sum import partial_channel_node_sum_reference
from fastnas.spaces.darts import DARTS_PRIMITIVES

node_ops = importlib.import_module("fastnas.ops.partial_channel_node")
edge_ops = importlib.import_module("fastnas.ops.darts_edge")
NodeSpec, partial_channel_node = node_ops.NodeSpec, node_ops.partial_channel_node

pytestmark = [
    pytest.mark.skipif(
        "cpu" not in node_ops._CPP_BACKENDS,
        reason="fastnas._C has no C++ partial_channel_node (missing or older build)",
    ),
    pytest.mark.usefixtures("one_thread"),
]

MEMORY = ("save", "recompute")
# Scalable-DARTS' pairs: a convolution with ReLU and with another activation, on one edge.
SCALABLE = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_3x3_swish", "dil_conv_3x3",
            "dil_conv_3x3_elu"]  # fmt: skip


def _bound(module):
    """The module's edge plan bound to its candidates: the current parameters and buffers."""
    return module.plan.bind(module.ops)


def _node(strides, C, groups, dtype, prims=DARTS_PRIMITIVES, backend=None):
    edges = [PartialChannelMixedOp(C, s, prims, groups, backend=backend).to(dtype) for s in strides]
    assert all(e.fused_reason is None for e in edges)
    return edges


def _inputs(strides, C, K, dtype, seed=0, size=4):
    gen = torch.Generator().manual_seed(seed)
    states = [torch.randn(2, C, size * s, size * s, generator=gen, dtype=dtype) for s in strides]
    weights = torch.softmax(torch.randn(len(strides), K, generator=gen, dtype=dtype), -1)
    beta = torch.softmax(torch.randn(len(strides), generator=gen, dtype=dtype), 0)
    return states, weights, beta


def _step(edges, groups, states, weights, beta, memory, path, grad_seed=1):
    states = [s.clone().requires_grad_(True) for s in states]
    weights, beta = weights.clone().requires_grad_(True), beta.clone().requires_grad_(True)
    params = [_bound(e).parameters() for e in edges]
    if path == "eager":  # the candidate modules, then the node sum's reference
        mixed = [e.mixed(h, weights[i]) for i, (e, h) in enumerate(zip(edges, states))]
        cp = states[0].shape[1] // groups
        out = partial_channel_node_sum_reference(mixed, [h[:, cp:] for h in states], beta, groups,
                                                 [e.stride for e in edges])  # fmt: skip
    else:
        spec = NodeSpec(tuple(e.plan.spec for e in edges), groups)
        out = partial_channel_node(states, weights, beta, params, spec, [_bound(e).buffers() for e in edges],
                                   memory=memory, backend=out_device(states))  # fmt: skip
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype).to(out.device)
    out.backward(g)
    grads = [p.grad for ps in params for p in ps]
    buffers = [b for e in edges for b in e.buffers()]
    return [out.detach(), weights.grad, beta.grad, *(s.grad for s in states), *grads, *buffers]


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("strides", ([2, 2, 1, 1], [1, 1, 1]))
@pytest.mark.parametrize("prims", ("darts", "scalable"))
@pytest.mark.parametrize("edge", ("cpp", "composite"))
def test_bit_identical_to_the_composite(edge, prims, strides, memory, dtype, monkeypatch):
    """The composite runs one darts_edge per edge, then partial_channel_node_sum, on the ``cpu``
    building blocks; each edge is the C++ edge op or, all Python, ``DartsEdgeFunction``."""
    prims = SCALABLE if prims == "scalable" else DARTS_PRIMITIVES
    edges = _node(strides, 8, 2, dtype, prims)
    states, weights, beta = _inputs(strides, 8, len(prims), dtype)
    composite, cpp = copy.deepcopy(edges), copy.deepcopy(edges)
    for step in range(2):
        got = _step(cpp, 2, states, weights, beta, memory, "cpp", step)
        with monkeypatch.context() as m:
            m.setattr(node_ops, "_CPP_BACKENDS", set())
            if edge == "composite":
                m.setattr(edge_ops, "_CPP_BACKENDS", set())
            want = _step(composite, 2, states, weights, beta, memory, "composite", step)
        for i, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(a, b), f"step {step}, tensor {i}: max diff {(a - b).abs().max().item()}"


def out_device(states):
    return states[0].device.type


@pytest.mark.requires_cuda
@pytest.mark.parametrize("memory", MEMORY)
def test_cuda_op_matches_the_cpu_op_float64(memory):
    """The same C++ orchestration on the CUDA building blocks: float64 agrees to rounding."""
    assert "cuda" in node_ops._CPP_BACKENDS
    strides = [2, 2, 1]
    edges = _node(strides, 8, 2, torch.float64)
    on_gpu = [copy.deepcopy(e).cuda() for e in edges]
    states, weights, beta = _inputs(strides, 8, 8, torch.float64, seed=5)
    for step in range(2):
        want = _step(edges, 2, states, weights, beta, memory, "cpp", step)
        got = _step(on_gpu, 2, [s.cuda() for s in states], weights.cuda(), beta.cuda(), memory, "cpp", step)
        for i, (a, b) in enumerate(zip(want, got)):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-10, msg=lambda m, i=i, s=step: f"{s} [{i}]: {m}")


@pytest.mark.parametrize("memory", MEMORY)
def test_matches_eager_modules_float64(memory):
    strides = [2, 2, 1]
    eager = _node(strides, 8, 4, torch.float64, backend="reference")
    fused = copy.deepcopy(eager)
    states, weights, beta = _inputs(strides, 8, 8, torch.float64, seed=3)
    for step in range(2):
        want = _step(eager, 4, states, weights, beta, memory, "eager", step)
        got = _step(fused, 4, states, weights, beta, memory, "cpp", step)
        for i, (a, b) in enumerate(zip(want, got)):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=lambda m, i=i, s=step: f"step {s} [{i}]: {m}")


def _tiny(strides=(2, 1)):
    prims = ["none", "sep_conv_3x3", "max_pool_3x3", "skip_connect", "dil_conv_3x3"]
    edges = _node(list(strides), 4, 2, torch.float64, prims)
    states, weights, beta = _inputs(list(strides), 4, len(prims), torch.float64, size=2)
    states = [s.requires_grad_(True) for s in states]
    weights, beta = weights.requires_grad_(True), beta.requires_grad_(True)
    params = [[p.detach().clone().requires_grad_(True) for p in _bound(e).parameters()] for e in edges]
    return NodeSpec(tuple(e.plan.spec for e in edges), 2), edges, states, weights, beta, params


@pytest.mark.parametrize("memory", MEMORY)
def test_gradcheck_float64(memory):
    spec, _, states, weights, beta, params = _tiny()
    sizes = [len(p) for p in params]

    def node(*args):
        states, (w, b), flat = args[:2], args[2:4], args[4:]
        ps = [list(flat[sum(sizes[:i]) : sum(sizes[: i + 1])]) for i in range(len(sizes))]
        return partial_channel_node(list(states), w, b, ps, spec, memory=memory, backend="cpu")

    assert torch.autograd.gradcheck(node, (*states, weights, beta, *(p for ps in params for p in ps)))


@pytest.mark.parametrize("memory", MEMORY)
def test_opcheck(memory):
    spec, edges, states, weights, beta, params = _tiny()
    flat = [p for ps in params for p in ps]
    bufs = [[t for e in edges for t in _bound(e).buffers()[i]] for i in range(3)]
    args = (states, weights, beta, flat, *bufs, list(spec.encoded), list(spec._eps), list(spec._momentum), 2, memory)
    torch.library.opcheck(torch.ops.fastnas.partial_channel_node.default, args)
    out, mixed, zs, *stats = torch.ops.fastnas.partial_channel_node(*args)
    detached = [s.detach() for s in states]
    bargs = (torch.randn_like(out), detached, weights.detach(), beta.detach(), [p.detach() for p in flat], mixed,
             zs if memory == "save" else None, *stats, list(spec.encoded), 2)  # fmt: skip
    torch.library.opcheck(torch.ops.fastnas.partial_channel_node_backward.default, bargs)


@pytest.mark.parametrize("memory", MEMORY)
def test_double_backward_is_refused(memory):
    spec, _, states, weights, beta, params = _tiny()
    out = partial_channel_node(states, weights, beta, params, spec, memory=memory, backend="cpu")
    with pytest.raises(RuntimeError, match=r"partial_channel_node: double backward \(create_graph=True\)"):
        torch.autograd.grad(out.sum(), weights, create_graph=True)


def test_one_call_per_direction():
    """One op per direction, and no zero-filled gradient for the node's non-differentiable outputs."""
    spec, _, states, weights, beta, params = _tiny()
    counter = bench.count_ops(
        lambda: partial_channel_node(states, weights, beta, params, spec, backend="cpu").sum().backward()
    )
    fastnas_ops = {k: v for k, v in counter.counts.items() if k.startswith("fastnas::")}
    assert fastnas_ops == {"fastnas::partial_channel_node": 1, "fastnas::partial_channel_node_backward": 1}
    assert "aten::zeros" not in counter.counts, counter.counts


def test_spec_round_trips():
    spec, *_ = _tiny()
    assert NodeSpec.decode(spec.encoded, spec._eps, spec._momentum, 2) == spec


def test_errors_are_named_at_the_boundary():
    spec, _, states, weights, beta, params = _tiny()
    with pytest.raises(ValueError, match=r"weights must have shape \(edges, candidates\) = \(2, 5\)"):
        partial_channel_node(states, weights[:1], beta, params, spec, backend="cpu")
    with pytest.raises(ValueError, match=r"edge_weights must have shape \(2,\)"):
        partial_channel_node(states, weights, beta[:1], params, spec, backend="cpu")
    with pytest.raises(ValueError, match="expected 14 parameter tensors"):
        partial_channel_node(states, weights, beta, [params[0], params[1][:2]], spec, backend="cpu")
    with pytest.raises(ValueError, match="groups=3 must be >= 1 and divide the 4 channels"):
        partial_channel_node(states, weights, beta, params, NodeSpec(spec.edges, 3), backend="cpu")
    with pytest.raises(ValueError, match="every edge of the node must output"):
        partial_channel_node([states[0], states[1][:, :, :1, :1]], weights, beta, params, spec, backend="cpu")
    with pytest.raises(ValueError, match="memory must be one of"):
        partial_channel_node(states, weights, beta, params, spec, memory="keep", backend="cpu")
    with pytest.raises(ValueError, match="same number of weights"):
        NodeSpec((spec.edges[0], type(spec.edges[0])(stride=1, K=2, skip_index=0)), 2)


@pytest.mark.parametrize("memory", MEMORY)
def test_search_network_runs_each_node_in_one_call_and_matches_eager(memory):
    """The PC-DARTS network: cells call the node op once per node, and training steps
    match the eager candidate modules to fp64 rounding (state, buffers included)."""
    from fastnas.nn import MixedOp
    from fastnas.spaces.darts import SearchNetwork

    torch.manual_seed(0)
    ref = SearchNetwork(C=8, num_classes=3, layers=3, partial_channels=2, backend="reference").double()
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if isinstance(m, MixedOp) or hasattr(m, "backend"):
            m.backend = "cpu"
        if isinstance(m, MixedOp):
            m.memory = memory
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in (ref, fused)]
    for step in range(2):
        for net, opt in zip((ref, fused), opts):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            if net is fused and step == 0:
                counter = bench.count_ops(loss.backward)
                assert counter.counts["fastnas::partial_channel_node_backward"] == 3 * 4  # cells x nodes
            else:
                loss.backward()
            opt.step()
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
