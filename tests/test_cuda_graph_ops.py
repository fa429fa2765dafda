"""Every fastnas op with a CUDA kernel, forward and backward, captured in a CUDA graph (GPU only).

Capture fails on any host synchronisation or host-to-device copy inside an op (a tensor
built on the host and moved, an index read back, ``.item()``), so this is the check that
no op does one; the replay must give the eager call's outputs and gradients. Each
case is small; the whole search step's capture is tested in test_cuda_graph.py.
"""

import pytest
import torch

from fastnas import ops
from fastnas.nn import MixedOp, PartialChannelMixedOp
from fastnas.nn.cell import Cell
from fastnas.nn.operations import FactorizedReduce, ReLUConvBN
from fastnas.spaces.darts import DARTS_PRIMITIVES

pytestmark = pytest.mark.requires_cuda

SCALABLE = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_3x3_swish", "dil_conv_3x3_elu"]


def _leaf(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).cuda().requires_grad_()


def _captured(fn):
    """fn() eagerly, then captured and replayed once: (eager result, replayed result), both as lists."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    eager = [t.detach().clone() for t in fn()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    graph.replay()
    torch.cuda.synchronize()
    return eager, [t.detach().clone() for t in static]


def _grads(out, inputs, seed=99):
    """out and its gradients for inputs under a fixed upstream gradient (made before capture)."""
    key = (tuple(out.shape), seed)
    if key not in _GRAD_OUTS:  # made by the warm-up calls: no host-to-device copy under capture
        _GRAD_OUTS[key] = _leaf(*out.shape, seed=seed).detach()
    return [out, *torch.autograd.grad(out, inputs, _GRAD_OUTS[key])]


_GRAD_OUTS: dict = {}


def _module_case(make, x_shape, weight_shape=None):
    torch.manual_seed(0)
    m = make().cuda().train()
    x = _leaf(*x_shape)
    w = None if weight_shape is None else torch.softmax(_leaf(*weight_shape, seed=1).detach(), 0).requires_grad_()
    inputs = [x, *([] if w is None else [w]), *m.parameters()]

    def fn():
        out = m(x) if w is None else m(x, w)
        return _grads(out, inputs)

    return fn


def _op_cases():
    x4 = (2, 8, 6, 6)
    yield (
        "mixed_sum",
        lambda: (lambda xs, w: lambda: _grads(ops.mixed_sum(xs, w), [*xs, w]))(
            [_leaf(*x4, seed=k) for k in range(3)], _leaf(3, seed=5)
        ),
    )
    yield (
        "partial_channel_mixed_sum",
        lambda: (lambda xs, w, b: lambda: _grads(ops.partial_channel_mixed_sum(xs, w, b, 4, False), [*xs, w, b]))(
            [_leaf(2, 2, 6, 6, seed=k) for k in range(3)], _leaf(3, seed=5), _leaf(2, 6, 6, 6, seed=6)
        ),
    )
    for stride in (1, 2):
        yield (
            f"darts_edge s{stride}",
            lambda s=stride: _module_case(lambda: MixedOp(8, s, DARTS_PRIMITIVES), x4, (len(DARTS_PRIMITIVES),)),
        )
        yield (
            f"darts_edge recompute s{stride}",
            lambda s=stride: _module_case(
                lambda: MixedOp(8, s, DARTS_PRIMITIVES, memory="recompute"), x4, (len(DARTS_PRIMITIVES),)
            ),
        )
    # Convolutions with different activations: one launch per direction serves them all.
    yield "darts_edge activations", lambda: _module_case(lambda: MixedOp(8, 1, SCALABLE), x4, (len(SCALABLE),))
    yield (
        "partial-channel edge",
        lambda: _module_case(lambda: PartialChannelMixedOp(8, 1, DARTS_PRIMITIVES, 4), x4, (len(DARTS_PRIMITIVES),)),
    )
    yield "relu_conv_bn", lambda: _module_case(lambda: _Preprocess(ReLUConvBN(8, 6, 1, 1, 0, affine=False)), x4)
    yield "relu_conv_bn reduce", lambda: _module_case(lambda: _Preprocess(FactorizedReduce(8, 6, affine=False)), x4)
    yield "partial_channel_node", lambda: _node_case()


class _Preprocess(torch.nn.Module):
    """A cell's preprocessing module run through fastnas.ops.relu_conv_bn, as the cell runs it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        from fastnas.nn.cell import _preprocess_parts

        weights, bn = _preprocess_parts(self.module)
        return ops.relu_conv_bn(x, weights, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.eps,
                                bn.momentum, backend=x.device.type)  # fmt: skip


def _node_case():
    """A PC-DARTS cell: each node one fastnas::partial_channel_node call per direction."""
    torch.manual_seed(0)
    steps = 2
    cell = Cell(steps, 2, 8, 8, 8, False, False, [DARTS_PRIMITIVES] * 5, partial_channels=4).cuda().train()
    s0, s1 = _leaf(2, 8, 6, 6, seed=1), _leaf(2, 8, 6, 6, seed=2)
    w = torch.softmax(_leaf(5, len(DARTS_PRIMITIVES), seed=3).detach(), -1).requires_grad_()
    beta = _leaf(5, seed=4)
    inputs = [s0, s1, w, beta, *cell.parameters()]
    return lambda: _grads(cell(s0, s1, w, beta), inputs)


CASES = dict(_op_cases())


@pytest.mark.parametrize("name", list(CASES))
def test_op_is_captured_and_replays_its_eager_result(name):
    eager, replayed = _captured(CASES[name]())
    assert len(eager) == len(replayed)
    for i, (a, b) in enumerate(zip(eager, replayed)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{name} [{i}]: {m}")
