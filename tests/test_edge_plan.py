"""The one edge recogniser and fuse-or-not policy (``fastnas.nn.edge_plan``).

The same plan serves fastnas's MixedOp (modules built from primitive names) and
the mixed ops of other code that ``fastnas.patch`` accelerates; an edge the
kernels cannot take falls back to its modules with the reason, never fails.
"""

import copy
import pickle

import pytest
import torch
import torch.nn as nn

from fastnas import backends
from fastnas.nn import MixedOp, plan_edge
from fastnas.nn.edge_plan import MEMORY_MODES, candidate_kind
from fastnas.nn.operations import OPS, SepConv
from fastnas.spaces.darts import DARTS_PRIMITIVES
from tests.darts_fixture import operations as darts_ops

CPU = "cpu" in backends.available_backends()
TRITON = "triton" in backends.available_backends()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _run(op, x, w):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = op(x, w)
    out.backward(torch.randn(out.shape, generator=_gen(9), dtype=out.dtype))
    return out.detach(), x.grad, w.grad, [p.grad for p in op.parameters()]


def _assert_same(a, b, rtol, atol):
    for name, u, v in zip(("output", "input grad", "weights grad"), a[:3], b[:3]):
        torch.testing.assert_close(v, u, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for u, v in zip(a[3], b[3]):
        torch.testing.assert_close(v, u, rtol=rtol, atol=atol)


@pytest.mark.parametrize("stride", [1, 2])
def test_fastnas_primitives_are_read_by_structure(stride):
    plan = plan_edge([OPS[n](8, stride, False) for n in DARTS_PRIMITIVES], 8, stride)
    skip = "identity" if stride == 1 else "factorized_reduce"
    assert plan.kinds == (
        "zero", "max_pool", "avg_pool", skip, "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
    )  # fmt: skip
    assert plan.active == tuple(range(1, 8))
    assert plan.stride == stride
    # Pools without a batch norm after them are not the fused edge's.
    assert plan.spec is None and "without a following batch norm" in plan.reason


def test_the_original_darts_candidates_read_the_same_as_fastnas_ones():
    """One vocabulary: a user's DARTS modules and fastnas's own give the same plan."""
    for stride in (1, 2):
        theirs = [darts_ops.OPS[n](8, stride, False) for n in DARTS_PRIMITIVES]
        ours = [OPS[n](8, stride, False) for n in DARTS_PRIMITIVES]
        for ops in (theirs, ours):
            for k, name in enumerate(DARTS_PRIMITIVES):
                if "pool" in name:
                    ops[k] = nn.Sequential(ops[k], nn.BatchNorm2d(8, affine=False))
        a, b = plan_edge(theirs), plan_edge(ours)
        assert a.kinds == b.kinds
        assert a.spec == b.spec and a.spec is not None
        assert a.stride == stride


def test_stride_and_channels_are_read_off_the_modules():
    plan = plan_edge([OPS["none"](6, 2, False), OPS["sep_conv_3x3"](6, 2, False)])
    assert plan.stride == 2 and plan.spec is not None and plan.spec.sep == ((3, 1),)


@pytest.mark.parametrize(
    "module, kind",
    [
        (nn.Identity(), "identity"),
        (darts_ops.Zero(2), "zero"),
        (nn.ReLU(), None),
        (nn.Sequential(nn.Identity(), nn.Dropout(0.2)), "identity+dropout"),
        (nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, (1, 7), padding=(0, 3), bias=False), nn.BatchNorm2d(4)),
         "relu_conv_bn_1x7"),
        (nn.Conv2d(4, 4, 3), None),
    ],
)  # fmt: skip
def test_candidate_kinds(module, kind):
    assert candidate_kind(module) == kind


def test_unrecognised_candidate_is_named_and_not_fused():
    plan = plan_edge([nn.Conv2d(4, 4, 3, padding=1), nn.Identity()], 4, 1)
    assert plan.kinds == (None, "identity")
    assert plan.spec is None and plan.reason == "candidate 0 (Conv2d) is not one the fused edge computes"


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda ops: setattr(ops[4].op[0].op[3], "momentum", 0.2), "differ in eps or momentum"),
        (lambda ops: ops.__setitem__(4, SepConv(8, 8, 3, 1, 1, affine=True)), "affine"),
        (lambda ops: setattr(ops[1][1], "momentum", None), "cumulative average"),
    ],
)
def test_unfusable_batch_norms_are_named(change, reason):
    op = MixedOp(8, 1, DARTS_PRIMITIVES)
    change(op.ops)
    plan = plan_edge(op.ops, 8, 1)
    assert plan.spec is None and reason in plan.reason


def test_plan_is_plain_data_bound_to_each_copy():
    op = MixedOp(8, 1, DARTS_PRIMITIVES)
    twin = copy.deepcopy(op)
    assert twin.plan == op.plan
    bound = twin.plan.bind(twin.ops)
    assert all(p is q for p, q in zip(bound.parameters(), [m.weight for m in _weights_in_spec_order(twin)]))
    assert pickle.loads(pickle.dumps(op.plan)) == op.plan


def _weights_in_spec_order(op):
    ops = op.ops
    sep = [ops[4], ops[5]]
    dil = [ops[6], ops[7]]
    out = []
    for s in sep:
        out += [s.op[0].op[1], s.op[0].op[2], s.op[1].op[1], s.op[1].op[2]]
    for d in dil:
        out += [d.op[1], d.op[2]]
    return out


def test_memory_modes_are_one_list():
    assert MEMORY_MODES == ("save", "recompute", "checkpoint", "sum")
    with pytest.raises(ValueError, match="memory must be one of"):
        MixedOp(4, 1, DARTS_PRIMITIVES, memory="keep")


@pytest.mark.skipif(not CPU, reason="needs the cpu kernels")
@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_each_memory_mode_runs_and_matches_the_reference(memory):
    ref = MixedOp(4, 1, DARTS_PRIMITIVES, backend="reference").double()
    op = copy.deepcopy(ref)
    op.backend, op.memory = "cpu", memory
    x = torch.randn(2, 4, 6, 6, generator=_gen(1), dtype=torch.float64)
    w = torch.softmax(torch.randn(8, generator=_gen(2), dtype=torch.float64), 0)
    _assert_same(_run(ref, x, w), _run(op, x, w), 1e-10, 1e-10)
    assert (op.fused_reason is None) == (memory in ("save", "recompute"))


@pytest.mark.skipif(not TRITON, reason="needs Triton (or its interpreter)")
def test_more_convolutions_than_the_triton_kernel_takes_fall_back():
    """Five convolution candidates exceed the Triton depthwise kernel's four slots: the
    edge runs its modules (and says why) instead of failing mid-forward."""
    primitives = DARTS_PRIMITIVES + ["sep_conv_7x7"]
    ref = MixedOp(4, 1, primitives, backend="reference")
    op = copy.deepcopy(ref)
    op.backend = "triton"
    x = torch.randn(2, 4, 5, 5, generator=_gen(3))
    w = torch.softmax(torch.randn(9, generator=_gen(4)), 0)
    out = _run(op, x, w)
    assert "at most 4" in op.fused_reason
    _assert_same(_run(ref, x, w), out, 1e-5, 1e-6)


@pytest.mark.skipif(not CPU, reason="needs the cpu kernels")
def test_kernel_larger_than_the_depthwise_kernels_take_falls_back():
    ref = MixedOp(4, 1, ["sep_conv_3x3", "skip_connect"], backend="reference").double()
    ref.ops[0] = SepConv(4, 4, 17, 1, 8, affine=False).double()
    ref.plan = plan_edge(ref.ops, 4, 1)
    op = copy.deepcopy(ref)
    op.backend = "cpu"
    x = torch.randn(2, 4, 5, 5, generator=_gen(5), dtype=torch.float64)
    w = torch.tensor([0.4, 0.6], dtype=torch.float64)
    out = _run(op, x, w)
    assert "size 17" in op.fused_reason
    _assert_same(_run(ref, x, w), out, 1e-10, 1e-10)


@pytest.mark.skipif(not CPU, reason="needs the cpu kernels")
def test_bfloat16_runs_fused_and_under_autocast_too():
    op = MixedOp(4, 1, DARTS_PRIMITIVES, backend="cpu")
    x = torch.randn(2, 4, 6, 6, generator=_gen(6))
    w = torch.softmax(torch.randn(8, generator=_gen(7)), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(x, w)
    assert op.fused_reason is None and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in op.parameters())
    op = op.to(torch.bfloat16)
    assert op(x.to(torch.bfloat16), w).dtype == torch.bfloat16 and op.fused_reason is None


@pytest.mark.skipif("triton" not in backends.available_backends(), reason="needs the Triton kernels")
def test_dtype_the_fused_edge_does_not_compute_falls_back():
    op = MixedOp(4, 1, DARTS_PRIMITIVES, backend="triton").to(torch.bfloat16)
    x = torch.randn(2, 4, 6, 6, generator=_gen(6)).to(torch.bfloat16)
    op(x, torch.softmax(torch.randn(8, generator=_gen(7)), 0).to(torch.bfloat16))
    assert "computes float32 and float64 inputs, not torch.bfloat16" in op.fused_reason


@pytest.mark.skipif(not CPU, reason="needs the cpu kernels")
def test_odd_input_on_a_reducing_edge_is_left_to_the_modules():
    """The fused edge does not take it; the modules answer as they would unfused
    (DARTS' factorized reduce itself needs an even size)."""
    op = MixedOp(4, 2, DARTS_PRIMITIVES, backend="cpu")
    x = torch.randn(2, 4, 7, 7, generator=_gen(8))
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        op(x, torch.softmax(torch.randn(8, generator=_gen(9)), 0))
    assert "even height and width" in op.fused_reason


def test_the_part_of_an_edge_the_fused_edge_takes_is_planned():
    """Pools without a batch norm are not the fused edge's; the convolutions beside them are."""
    plan = plan_edge([OPS[n](8, 1, False) for n in DARTS_PRIMITIVES], 8, 1)
    assert plan.spec is None and plan.part is not None
    assert plan.part_index == (0, 3, 4, 5, 6, 7) and plan.rest == (1, 2)
    spec = plan.part.spec
    assert spec.K == 6 and spec.skip_index == 1 and spec.sep == ((3, 2), (5, 3)) and spec.dil == ((3, 4), (5, 5))
    # Without a convolution among them, the candidates the fused edge takes are not worth a part.
    assert plan_edge([OPS[n](8, 1, False) for n in ("none", "max_pool_3x3", "skip_connect")], 8, 1).part is None
