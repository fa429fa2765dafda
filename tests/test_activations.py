"""Activations in the depthwise prologue: multi_depthwise with several activations of one input,
every backend against the reference, and the fused edge of activation x convolution candidates."""

import pytest
import torch
import torch.nn.functional as F
from oracle import DEPTHWISE_SHAPES, assert_oracle, backend_case, depthwise_inputs, runs_on, sized

from fastnas import backends
from fastnas.nn import MixedOp
from fastnas.ops.activations import ACTIVATIONS, activation_code, apply_activation
from fastnas.ops.multi_depthwise import (
    multi_depthwise,
    multi_depthwise_backward,
    multi_depthwise_backward_reference,
    multi_depthwise_reference,
)

# (kernel size, dilation, activation) per candidate; the Triton kernels take four per call.
CANDIDATES = {
    "mixed": [(3, 1, "relu6"), (5, 1, "swish"), (3, 2, "elu"), (3, 1, "relu")],
    "pairs": [(3, 1, "leaky_relu"), (3, 1, "hardswish"), (5, 2, "leaky_relu"), (5, 2, "swish")],
}
MODES = ["shared", "per-candidate", "batch-norm"]


case = backend_case("multi_depthwise")


def test_activation_math_matches_torch():
    x = torch.linspace(-8, 8, 801, dtype=torch.float64, requires_grad=True)
    for name, fn in (("relu", F.relu), ("relu6", F.relu6), ("elu", F.elu), ("leaky_relu", F.leaky_relu),
                     ("swish", F.silu), ("hardswish", F.hardswish)):  # fmt: skip
        torch.testing.assert_close(apply_activation(name, x), fn(x), rtol=0, atol=0)
        assert apply_activation(name, torch.zeros(1)).item() == 0  # zero padding commutes with it
    assert [activation_code(a) for a in ACTIVATIONS] == list(range(len(ACTIVATIONS)))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        activation_code("gelu")


def _inputs(cands, mode, shape, dtype, device, seed):
    x, ws, ds, mean, rstd = depthwise_inputs([(k, d) for k, d, _ in cands], mode, shape, dtype, device, seed)
    return x, ws, ds, mean, rstd, [a for _, _, a in cands]


def test_reference_applies_each_candidates_activation():
    cands = CANDIDATES["mixed"]
    x, ws, ds, mean, rstd, acts = _inputs(cands, "batch-norm", (2, 3, 7, 7), torch.float64, "cpu", 1)
    out = multi_depthwise_reference(x, ws, ds, 2, mean, rstd, acts)
    for j, (w, d, a) in enumerate(zip(ws, ds, acts)):
        pre = (x[j] - mean[j].double()[:, None, None, None]) * rstd[j].double()[:, None, None, None]
        act = apply_activation(a, pre).transpose(0, 1)
        want = F.conv2d(act, w, stride=2, padding=d * (w.shape[-1] - 1) // 2, dilation=d, groups=act.shape[1])
        torch.testing.assert_close(out[j], want.transpose(0, 1), rtol=1e-12, atol=1e-12)
    relu = multi_depthwise_reference(x, ws, ds, 2, mean, rstd)
    torch.testing.assert_close(relu, multi_depthwise_reference(x, ws, ds, 2, mean, rstd, "relu"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cands", list(CANDIDATES))
def test_matches_reference(case, cands, stride, mode, dtype, poison_empty):
    name, device = case
    i = list(CANDIDATES).index(cands) + 2 * stride + MODES.index(mode) + (dtype == torch.float32)
    shape = sized(case, DEPTHWISE_SHAPES[i % len(DEPTHWISE_SHAPES)])
    x, ws, ds, mean, rstd, acts = _inputs(CANDIDATES[cands], mode, shape, dtype, device, ("act", cands, stride, mode))
    with runs_on(name, "multi_depthwise"):
        out = multi_depthwise(x, ws, ds, stride, mean, rstd, activations=acts, backend=name)
    x64, w64 = x.double(), [w.double() for w in ws]
    assert_oracle(out, multi_depthwise_reference(x, ws, ds, stride, mean, rstd, acts),
                  multi_depthwise_reference(x64, w64, ds, stride, mean, rstd, acts), "out")  # fmt: skip
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
    grad_out = grad_out.to(device=device, dtype=dtype)
    grad_pre, grad_ws = multi_depthwise_backward(grad_out, x, ws, ds, stride, mean, rstd, activations=acts,
                                                 backend=name)  # fmt: skip
    lowp_pre, lowp_ws = multi_depthwise_backward_reference(grad_out, x, ws, ds, stride, mean, rstd, True, acts)
    ref_pre, ref_ws = multi_depthwise_backward_reference(grad_out.double(), x64, w64, ds, stride, mean, rstd, True,
                                                         acts)  # fmt: skip
    assert_oracle(grad_pre, lowp_pre, ref_pre, "grad_pre")
    scale = grad_out.double().abs().sum().item() * x.double().abs().max().item() / max(1, grad_out.numel()) ** 0.5
    for j, (got, lp, r) in enumerate(zip(grad_ws, lowp_ws, ref_ws)):
        assert_oracle(got, lp, r, f"grad_weights[{j}]", scale=scale, reduction=True)


def test_many_activations_of_one_input_cpu(poison_empty):
    """Four convolutions times four activations in one call: one read of x, one buffer per activation."""
    if backends.backend_status()["cpu"]:
        pytest.skip("the cpu backend is unavailable")
    convs = [(3, 1), (5, 1), (3, 2), (5, 2)]
    acts = ["relu", "relu6", "elu", "swish"]
    cands = [(k, d, a) for a in acts for k, d in convs]
    for stride in (1, 2):
        x, ws, ds, mean, rstd, names = _inputs(cands, "shared", (2, 3, 9, 7), torch.float64, "cpu", 7 + stride)
        out = multi_depthwise(x, ws, ds, stride, activations=names, backend="cpu")
        torch.testing.assert_close(out, multi_depthwise_reference(x, ws, ds, stride, None, None, names),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
        g = torch.randn_like(out)
        got = multi_depthwise_backward(g, x, ws, ds, stride, activations=names, backend="cpu")
        want = multi_depthwise_backward_reference(g, x, ws, ds, stride, None, None, True, names)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-11)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_bad_activations_are_named():
    x, ws, ds, _, _, acts = _inputs(CANDIDATES["mixed"], "shared", (1, 2, 5, 5), torch.float32, "cpu", 3)
    with pytest.raises(ValueError, match="activations has 2 entries but weights has 4"):
        multi_depthwise(x, ws, ds, 1, activations=["relu", "elu"])
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        multi_depthwise(x, ws, ds, 1, activations="gelu")
    if not backends.backend_status()["cpu"]:
        with pytest.raises(ValueError, match=r"activations\[1\] is 9"):
            torch.ops.fastnas.multi_depthwise(x, ws, ds, 1, None, None, [0, 9, 0, 0])
    # The fake implementations (torch.compile) check the codes too.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fws = mode.from_tensor(x), [mode.from_tensor(w) for w in ws]
        for op in (torch.ops.fastnas.multi_depthwise_triton, torch.ops.fastnas.multi_depthwise):
            if op is torch.ops.fastnas.multi_depthwise and backends.backend_status()["cpu"]:
                continue
            with pytest.raises(ValueError, match=r"activations\[1\] is 9"):
                op(fx, fws, ds, 1, None, None, [0, 9, 0, 0])
            with pytest.raises(ValueError, match="activations has 1 entries"):
                op(fx, fws, ds, 1, None, None, [0])


def test_opcheck_with_activations(case):
    name, device = case
    x, ws, ds, mean, rstd, acts = _inputs(CANDIDATES["mixed"], "batch-norm", (2, 2, 5, 5), torch.float32, device, 5)
    codes = [activation_code(a) for a in acts]
    x.requires_grad_()
    for w in ws:
        w.requires_grad_()
    op = torch.ops.fastnas.multi_depthwise_triton if name == "triton" else torch.ops.fastnas.multi_depthwise
    torch.library.opcheck(op, (x, ws, ds, 2, mean, rstd, codes))


# -- the fused edge of activation x convolution candidates ---------------------------------


PAIRS = ["none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_3x3_swish", "dil_conv_3x3_elu",
         "sep_conv_5x5_relu6", "dil_conv_5x5"]  # fmt: skip


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("memory", ["save", "recompute"])
def test_fused_edge_of_activation_pairs_matches_modules(stride, memory):
    if backends.backend_status()["cpu"]:
        pytest.skip("the cpu backend is unavailable")
    torch.manual_seed(0)
    fused = MixedOp(4, stride, PAIRS, memory=memory).double()
    ref = MixedOp(4, stride, PAIRS, backend="reference").double()
    ref.load_state_dict(fused.state_dict())
    assert fused.plan.spec is not None
    assert fused.plan.spec.activations == ("relu", "swish", "relu6", "elu", "relu")
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    w = torch.softmax(torch.randn(len(PAIRS), dtype=torch.float64), 0)
    outs, grads = [], []
    for op in (fused, ref):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = op(xi, wi)
        out.backward(torch.cos(out))
        outs.append(out)
        grads.append([xi.grad, wi.grad] + [p.grad for p in op.parameters()])
    assert fused.fused_reason is None
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for a, b in zip(fused.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_sampled_path_keeps_each_convolutions_activation():
    plan = MixedOp(4, 1, PAIRS).plan
    assert plan.restrict([4, 5]).spec.activations == ("swish", "elu")  # sep_conv_3x3_swish, dil_conv_3x3_elu
    assert plan.restrict([3, 6]).spec.activations == ("relu", "relu6")
    assert plan.restrict([1, 3, 7]).spec.activations == ()  # all ReLU
