import pytest
import torch
import torch.nn as nn

from fastnas.nn import (
    OPS,
    Cell,
    MixedOp,
    PartialChannelMixedOp,
    Zero,
    normalize_edge_weights,
    num_edges,
    register_primitive,
)
from fastnas.ops import channel_shuffle
from fastnas.spaces.darts import DARTS_PRIMITIVES

pytestmark = pytest.mark.usefixtures("one_thread")


def _twin(make, **kwargs):
    """Two modules with identical parameters built by ``make``."""
    a = make(**kwargs)
    b = make(**kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


def _run(module, x, *args):
    x = x.clone().requires_grad_(True)
    out = module(x, *args)
    grad = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("stride", [1, 2])
def test_every_darts_candidate_keeps_channels_and_strides(stride):
    x = torch.randn(2, 4, 8, 8)
    for name in DARTS_PRIMITIVES:
        out = OPS[name](4, stride, False)(x)
        assert out.shape == (2, 4, 8 // stride, 8 // stride), name


def test_avg_pool_excludes_padding_and_bn_is_not_affine():
    pool = OPS["avg_pool_3x3"](1, 1, False)
    assert pool(torch.ones(1, 1, 4, 4)).eq(1).all()
    sep = OPS["sep_conv_3x3"](4, 1, False)
    norms = [m for m in sep.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 and not any(m.affine for m in norms)
    mixed = MixedOp(4, 1, ["max_pool_3x3"])
    assert isinstance(mixed.ops[0][1], nn.BatchNorm2d) and not mixed.ops[0][1].affine


def test_register_primitive_adds_a_candidate_and_rejects_duplicates():
    register_primitive("test_conv_1x1", lambda C, stride, affine: nn.Conv2d(C, C, 1, stride=stride), overwrite=True)
    op = MixedOp(4, 2, ["test_conv_1x1", "skip_connect"])
    assert op(torch.randn(1, 4, 6, 6), torch.tensor([0.5, 0.5])).shape == (1, 4, 3, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_primitive("test_conv_1x1", lambda C, stride, affine: nn.Identity())
    with pytest.raises(ValueError, match="unknown primitive"):
        MixedOp(4, 1, ["sep_conv_3x3", "no_such_op"])


def test_mixed_op_is_the_weighted_sum_of_all_candidates():
    torch.manual_seed(0)
    op = MixedOp(4, 1, DARTS_PRIMITIVES, backend="reference")
    x = torch.randn(2, 4, 6, 6)
    w = torch.softmax(torch.randn(len(DARTS_PRIMITIVES)), 0)
    expected = sum(w[k] * candidate(x) for k, candidate in enumerate(op.ops))
    torch.testing.assert_close(op(x, w), expected)


def test_mixed_op_auto_backend_matches_reference(fused_edge_calls):
    torch.manual_seed(0)
    ref, auto = _twin(MixedOp, C=4, stride=2, primitives=DARTS_PRIMITIVES, backend="reference")
    ref, auto = ref.double(), auto.double()
    auto.backend = None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    w_ref = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), 0).requires_grad_(True)
    w_auto = w_ref.detach().clone().requires_grad_(True)
    out_r, gx_r, gp_r = _run(ref, x, w_ref)
    assert not fused_edge_calls
    out_a, gx_a, gp_a = _run(auto, x, w_auto)
    assert fused_edge_calls == ["save"]
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out_a, out_r, **tol)
    torch.testing.assert_close(gx_a, gx_r, **tol)
    torch.testing.assert_close(w_auto.grad, w_ref.grad, **tol)
    for a, b in zip(gp_a, gp_r):
        torch.testing.assert_close(a, b, **tol)


def test_none_only_edge_still_backpropagates():
    op = MixedOp(4, 2, ["none"])
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    w = torch.ones(1, requires_grad=True)
    out = op(x, w)
    out.sum().backward()
    assert out.shape == (1, 4, 2, 2) and out.eq(0).all()
    assert x.grad is not None and x.grad.eq(0).all() and w.grad.eq(0).all()


def test_none_weight_gets_zero_gradient_and_others_do_not():
    op = MixedOp(4, 1, ["none", "skip_connect"])
    w = torch.tensor([0.5, 0.5], requires_grad=True)
    op(torch.randn(1, 4, 4, 4), w).sum().backward()
    assert w.grad[0] == 0 and w.grad[1] != 0


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channel_mixed_op_matches_pc_darts(stride):
    torch.manual_seed(0)
    k = 4
    op = PartialChannelMixedOp(8, stride, DARTS_PRIMITIVES, groups=k, backend="reference")
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0).requires_grad_(True)
    out = op(x, w)
    assert out.shape == (2, 8, 8 // stride, 8 // stride)
    part, rest = x[:, :2], x[:, 2:]
    mixed = sum(w[i] * candidate(part) for i, candidate in enumerate(op.ops))
    if stride == 2:
        rest = nn.functional.max_pool2d(rest, 2, 2)
    torch.testing.assert_close(out, channel_shuffle(torch.cat([mixed, rest], 1), k))
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_partial_channels_must_divide_channels():
    with pytest.raises(ValueError, match="divide"):
        PartialChannelMixedOp(6, 1, DARTS_PRIMITIVES, groups=4)


@pytest.mark.parametrize("make", [MixedOp, PartialChannelMixedOp])
def test_checkpoint_memory_mode_equals_save_mode(make):
    torch.manual_seed(0)
    kwargs = dict(C=8, stride=2, primitives=DARTS_PRIMITIVES)
    if make is PartialChannelMixedOp:
        kwargs["groups"] = 2
    save, ckpt = _twin(make, **kwargs)
    ckpt.memory = "checkpoint"
    x = torch.randn(2, 8, 8, 8)
    w1 = torch.softmax(torch.randn(8), 0).requires_grad_(True)
    w2 = w1.detach().clone().requires_grad_(True)
    out_s, gx_s, gp_s = _run(save, x, w1)
    out_c, gx_c, gp_c = _run(ckpt, x, w2)
    torch.testing.assert_close(out_c, out_s)
    torch.testing.assert_close(gx_c, gx_s)
    torch.testing.assert_close(w2.grad, w1.grad)
    for a, b in zip(gp_c, gp_s):
        torch.testing.assert_close(a, b)
    # The recomputation in backward must not update the running statistics again.
    for (name, a), (_, b) in zip(ckpt.named_buffers(), save.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_memory_mode_is_checked():
    with pytest.raises(ValueError, match="memory"):
        MixedOp(4, 1, DARTS_PRIMITIVES, memory="offload")


def test_skip_dropout_applies_to_identity_in_training_only():
    torch.manual_seed(0)
    op = MixedOp(4, 1, ["skip_connect"])
    op.skip_drop_prob = 0.5
    x = torch.ones(1, 4, 16, 16)
    w = torch.ones(1)
    out = op(x, w)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    op.eval()
    assert op(x, w).eq(1).all()


def test_single_index_runs_only_that_candidate():
    op = MixedOp(4, 1, DARTS_PRIMITIVES)
    calls = [0] * len(op.ops)
    for k, candidate in enumerate(op.ops):
        candidate.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
    w = torch.zeros(8)
    w[4] = 1
    w.requires_grad_(True)
    out = op(torch.randn(1, 4, 6, 6), w, index=4)
    out.sum().backward()
    assert calls == [0, 0, 0, 0, 1, 0, 0, 0]
    assert w.grad[4] != 0


def test_cell_with_edge_normalization_scales_edges_by_softmaxed_betas():
    torch.manual_seed(0)
    cell = Cell(2, 2, 4, 4, 4, False, False, [["skip_connect", "avg_pool_3x3"]] * num_edges(2), backend="reference")
    cell.eval()
    s0, s1 = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    weights = torch.softmax(torch.randn(5, 2), -1)
    betas = torch.randn(5)
    edge_w = normalize_edge_weights(betas, 2)
    torch.testing.assert_close(edge_w[:2].sum(), torch.tensor(1.0))
    torch.testing.assert_close(edge_w[2:].sum(), torch.tensor(1.0))
    out = cell(s0, s1, weights, edge_w)
    h = [cell.preprocess0(s0), cell.preprocess1(s1)]
    n0 = edge_w[0] * cell.edges[0](h[0], weights[0]) + edge_w[1] * cell.edges[1](h[1], weights[1])
    h.append(n0)
    n1 = sum(edge_w[2 + j] * cell.edges[2 + j](h[j], weights[2 + j]) for j in range(3))
    torch.testing.assert_close(out, torch.cat([n0, n1], 1))


def test_zero_op_strides():
    assert Zero(2)(torch.randn(1, 2, 5, 5)).shape == (1, 2, 3, 3)


@pytest.mark.parametrize("memory", ["save", "recompute"])
def test_compiled_search_network_matches_eager(memory):
    """torch.compile of the fused search network (the checkpointed preprocessing runs plainly
    under the compiler): the same logits, gradients and running statistics as eager."""
    from fastnas.spaces.darts import SearchNetwork

    torch.manual_seed(0)
    eager = SearchNetwork(C=4, num_classes=3, layers=2, in_channels=3, memory=memory)
    twin = SearchNetwork(C=4, num_classes=3, layers=2, in_channels=3, memory=memory)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, dynamic=False)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    outs = []
    for model in (eager, compiled):
        logits = model(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        outs.append(logits.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    grads = dict(twin.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    buffers = dict(twin.named_buffers())
    for name, b in eager.named_buffers():
        torch.testing.assert_close(buffers[name], b, rtol=1e-4, atol=1e-6, msg=name)
