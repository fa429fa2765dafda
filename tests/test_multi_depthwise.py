"""multi_depthwise: the reference against conv2d, every backend against the reference."""

import re

import pytest
import torch
import torch.nn.functional as F
from oracle import (
    DEPTHWISE_SHAPES,
    assert_oracle,
    backend_case,
    depthwise_inputs,
    generator,
    interpreted,
    randn,
    runs_on,
    sized,
    skip_unless_runs,
    to64,
)

from fastnas import backends
from fastnas.ops.multi_depthwise import (
    multi_depthwise,
    multi_depthwise_backward,
    multi_depthwise_backward_reference,
    multi_depthwise_reference,
)

pytestmark = pytest.mark.usefixtures("seeded_only")

# (kernel size, dilation) per candidate.
CANDIDATES = {
    "darts": [(3, 1), (5, 1), (3, 2), (5, 2)],
    "sep": [(3, 1), (5, 1)],
    "k7": [(7, 1)],
}
MODES = ["shared", "per-candidate", "batch-norm"]


case = backend_case("multi_depthwise")


def conv2d_oracle(x, weights, dilations, stride, mean=None, rstd=None):
    """relu, then one torch conv2d(groups=C) per candidate, written out in fp64."""
    x = x.double()
    outs = []
    for j, (w, d) in enumerate(zip(weights, dilations)):
        if x.dim() == 4:
            a = F.relu(x)
        else:
            pre = x[j]
            if mean is not None:
                pre = (pre - mean[j].double()[:, None, None, None]) * rstd[j].double()[:, None, None, None]
            a = F.relu(pre).transpose(0, 1)
        k = w.shape[-1]
        y = F.conv2d(a, w.double(), stride=stride, padding=d * (k - 1) // 2, dilation=d, groups=a.shape[1])
        outs.append(y.transpose(0, 1))
    return torch.stack(outs)


def _out_shape(x, stride):
    """(C, N, Ho, Wo) of one candidate's output."""
    c, n, h, w = (x.shape[1], x.shape[0], *x.shape[2:]) if x.dim() == 4 else x.shape[1:]
    return c, n, (h - 1) // stride + 1, (w - 1) // stride + 1


# -- the reference is the oracle: check it against conv2d ----------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cands", list(CANDIDATES), ids=str)
def test_reference_matches_conv2d(cands, stride, mode):
    x, ws, ds, mean, rstd = depthwise_inputs(CANDIDATES[cands], mode, (2, 3, 9, 7), torch.float64, "cpu", 1)
    out = multi_depthwise_reference(x, ws, ds, stride, mean, rstd)
    want = conv2d_oracle(x, ws, ds, stride, mean, rstd)
    assert out.is_contiguous() and out.dtype == x.dtype
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_reference_backward_matches_autograd_of_conv2d():
    # grad_pre of the per-candidate batch-norm case is the gradient with respect to (x - mean) * rstd.
    cands = CANDIDATES["darts"]
    x, ws, ds, mean, rstd = depthwise_inputs(cands, "batch-norm", (2, 3, 7, 7), torch.float64, "cpu", 2)
    pre = ((x - mean.double()[:, :, None, None, None]) * rstd.double()[:, :, None, None, None]).requires_grad_()
    w64 = [w.clone().requires_grad_() for w in ws]
    out = conv2d_oracle(pre, w64, ds, 2)
    grad_out = randn(generator("reference backward"), out.shape, torch.float64)
    want = torch.autograd.grad(out, [pre, *w64], grad_out)
    grad_pre, grad_ws = multi_depthwise_backward_reference(grad_out, x, ws, ds, 2, mean, rstd)
    torch.testing.assert_close(grad_pre, want[0], rtol=1e-12, atol=1e-12)
    for got, w in zip(grad_ws, want[1:]):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


# -- every backend against the reference ------------------------------------------------


def _run_and_check(name, device, cands, mode, shape, stride, dtype, seed):
    x, ws, ds, mean, rstd = depthwise_inputs(CANDIDATES[cands], mode, shape, dtype, device, seed)
    grad_out = randn(generator("grad_out", seed), (len(ws), *_out_shape(x, stride)), dtype, device)
    with runs_on(name, "multi_depthwise", "multi_depthwise_backward"):
        out = multi_depthwise(x, ws, ds, stride, mean, rstd, backend=name)
        grad_pre, grad_ws = multi_depthwise_backward(grad_out, x, ws, ds, stride, mean, rstd, backend=name)
    lowp = multi_depthwise_reference(x, ws, ds, stride, mean, rstd)
    x64, w64 = x.double(), [w.double() for w in ws]
    ref64 = multi_depthwise_reference(x64, w64, ds, stride, mean, rstd)
    assert out.is_contiguous()
    assert_oracle(out, lowp, ref64, "out")

    lowp_pre, lowp_ws = multi_depthwise_backward_reference(grad_out, x, ws, ds, stride, mean, rstd)
    ref_pre, ref_ws = multi_depthwise_backward_reference(grad_out.double(), x64, w64, ds, stride, mean, rstd)
    assert grad_pre.shape == x.shape and grad_pre.is_contiguous()
    assert_oracle(grad_pre, lowp_pre, ref_pre, "grad_pre")
    # A weight's gradient is a dot product over N*Ho*Wo terms: its error grows with sum |g * a|.
    scale = grad_out.double().abs().sum().item() * x.double().abs().max().item() / max(1, grad_out.numel()) ** 0.5
    for j, (got, lp, r) in enumerate(zip(grad_ws, lowp_ws, ref_ws)):
        assert got.shape == ws[j].shape and got.dtype == ws[j].dtype
        assert_oracle(got, lp, r, f"grad_weights[{j}]", scale=scale, reduction=True)
    return x, ws, ds, mean, rstd, grad_out, out, grad_pre, grad_ws


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cands", list(CANDIDATES), ids=str)
def test_matches_reference(case, cands, stride, mode, dtype, poison_empty):
    name, device = case
    i = list(CANDIDATES).index(cands) + 2 * stride + MODES.index(mode) + (dtype == torch.float32)
    shape = sized(case, DEPTHWISE_SHAPES[i % len(DEPTHWISE_SHAPES)])
    _run_and_check(name, device, cands, mode, shape, stride, dtype, seed=(cands, stride, mode, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_low_precision(case, stride, dtype, poison_empty):
    name, device = case
    _run_and_check(name, device, "darts", "shared", sized(case, (2, 3, 7, 7)), stride, dtype, seed=(stride, dtype))


def test_bit_identical_reruns(case):
    name, device = case
    shape = (2, 2, 9, 9) if interpreted(case) else (3, 4, 9, 9)
    x, ws, ds, mean, rstd = depthwise_inputs(CANDIDATES["darts"], "shared", shape, torch.float32, device, "rerun")
    runs = []
    with runs_on(name, "multi_depthwise", "multi_depthwise_backward"):
        for _ in range(2):
            out = multi_depthwise(x, ws, ds, 1, backend=name)
            grad_pre, grad_ws = multi_depthwise_backward(torch.ones_like(out), x, ws, ds, 1, backend=name)
            runs.append([out, grad_pre, *grad_ws])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_input_need_grad_false(case):
    name, device = case
    x, ws, ds, mean, rstd = depthwise_inputs(CANDIDATES["sep"], "batch-norm", (2, 3, 5, 7), torch.float64, device, 4)
    grad_out = randn(generator("input_need_grad"), (2, 3, 2, 3, 4), torch.float64, device)
    with runs_on(name, "multi_depthwise_backward"):
        grad_pre, grad_ws = multi_depthwise_backward(grad_out, x, ws, ds, 2, mean, rstd, False, backend=name)
    assert grad_pre.numel() == 0
    _, want = multi_depthwise_backward_reference(grad_out, x, ws, ds, 2, mean, rstd)
    for j, (got, w) in enumerate(zip(grad_ws, want)):
        assert_oracle(got, None, w, f"grad_weights[{j}]")


def test_shared_strided_input(case):
    name, device = case
    gen = generator("shared strided")
    x = randn(gen, (2, 3, 7, 7), torch.float64, device, contiguous=False)
    ws = [randn(gen, (3, 1, 3, 3), torch.float64, device)]
    with runs_on(name, "multi_depthwise"):
        out = multi_depthwise(x, ws, [2], 1, backend=name)
    assert_oracle(out, None, multi_depthwise_reference(x.contiguous(), ws, [2], 1), "out")


def test_autograd_through_op(case):
    name, device = case
    x, ws, ds, mean, rstd = depthwise_inputs(CANDIDATES["sep"], "batch-norm", (2, 3, 5, 5), torch.float64, device, 5)
    leaves = [x, *ws, mean, rstd]
    for t in leaves:
        t.requires_grad_(True)
    grad_out = randn(generator("autograd"), (2, 3, 2, 5, 5), torch.float64, device)
    with runs_on(name, "multi_depthwise", "multi_depthwise_backward"):
        got = torch.autograd.grad(multi_depthwise(x, ws, ds, 1, mean, rstd, backend=name), leaves, grad_out)
    lowp = torch.autograd.grad(multi_depthwise_reference(x, ws, ds, 1, mean, rstd), leaves, grad_out)
    # The truth: the same graph with the float32 statistics as float64 leaves.
    leaves64 = [to64(t) for t in leaves]
    truth = torch.autograd.grad(conv2d_oracle(leaves64[0], leaves64[1:-2], ds, 1, *leaves64[-2:]), leaves64, grad_out)
    for i, (g, lo, t) in enumerate(zip(got, lowp, truth)):
        assert_oracle(g, lo, t, f"grad {i}")


# -- bad input ---------------------------------------------------------------------------


def _good():
    x = torch.zeros(2, 3, 5, 5)
    return x, [torch.zeros(3, 1, 3, 3), torch.zeros(3, 1, 5, 5)], [1, 2]


BAD = {
    "x rank": (lambda x, w, d: (x[0], w, d, 1, None, None), "x must be"),
    "x dtype": (lambda x, w, d: (x.int(), w, d, 1, None, None), "x has dtype"),
    "even kernel": (lambda x, w, d: (x, [w[0], torch.zeros(3, 1, 4, 4)], d, 1, None, None), "even kernel"),
    "weight channels": (lambda x, w, d: (x, [w[0], torch.zeros(4, 1, 5, 5)], d, 1, None, None), "weights[1]"),
    "weight dtype": (lambda x, w, d: (x, [w[0], w[1].double()], d, 1, None, None), "weights[1] has dtype"),
    "dilations length": (lambda x, w, d: (x, w, [1], 1, None, None), "dilations has 1"),
    "dilation < 1": (lambda x, w, d: (x, w, [1, 0], 1, None, None), "dilations[1]"),
    "stride": (lambda x, w, d: (x, w, d, 3, None, None), "stride must be 1 or 2"),
    "per-candidate J": (lambda x, w, d: (torch.zeros(3, 3, 2, 5, 5), w, d, 1, None, None), "candidates"),
    "mean without rstd": (lambda x, w, d: (torch.zeros(2, 3, 2, 5, 5), w, d, 1, torch.zeros(2, 3), None), "rstd"),
    "mean with shared x": (lambda x, w, d: (x, w, d, 1, torch.zeros(2, 3), torch.ones(2, 3)), "per-candidate"),
    "mean shape": (
        lambda x, w, d: (torch.zeros(2, 3, 2, 5, 5), w, d, 1, torch.zeros(3, 3), torch.ones(3, 3)),
        "mean must have shape",
    ),
    "mean dtype": (
        lambda x, w, d: (torch.zeros(2, 3, 2, 5, 5), w, d, 1, torch.zeros(2, 3).double(), torch.ones(2, 3).double()),
        "mean must be float32",
    ),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input_python(what):
    make, message = BAD[what]
    args = make(*_good())
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        multi_depthwise(*args, backend="reference")
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        multi_depthwise_backward(torch.zeros(2, 3, 2, 5, 5), *args, backend="reference")


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input_cpp(what):
    skip_unless_runs("multi_depthwise", "cpu")
    make, message = BAD[what]
    args = make(*_good())
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.fastnas.multi_depthwise(*args)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.fastnas.multi_depthwise_backward(torch.zeros(2, 3, 2, 5, 5), *args, True)


def test_bad_grad_out():
    x, w, d = _good()
    with pytest.raises(ValueError, match="grad_out has shape"):
        multi_depthwise_backward(torch.zeros(2, 3, 2, 4, 5), x, w, d, 1, backend="reference")
    if "cpu" in backends.implementations("multi_depthwise") and not backends.backend_status()["cpu"]:
        with pytest.raises(RuntimeError, match="grad_out has shape"):
            torch.ops.fastnas.multi_depthwise_backward(torch.zeros(2, 3, 2, 4, 5), x, w, d, 1, None, None, True)


def test_triton_candidate_limit():
    x = torch.zeros(1, 2, 5, 5)
    ws = [torch.zeros(2, 1, 3, 3) for _ in range(5)]
    with pytest.raises(ValueError, match="at most 4"):
        multi_depthwise(x, ws, [1] * 5, 1, backend="triton")


# -- schema and fake tensors -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_cpp(mode):
    skip_unless_runs("multi_depthwise", "cpu")
    x, ws, ds, mean, rstd = depthwise_inputs(CANDIDATES["sep"], mode, (2, 3, 5, 5), torch.float32, "cpu", 6)
    torch.library.opcheck(torch.ops.fastnas.multi_depthwise.default, (x, ws, ds, 2, mean, rstd))
    grad_out = randn(generator("opcheck cpp"), (2, 3, 2, 3, 3))
    for need in (True, False):
        torch.library.opcheck(
            torch.ops.fastnas.multi_depthwise_backward.default, (grad_out, x, ws, ds, 2, mean, rstd, need)
        )


def test_opcheck_triton():
    skip_unless_runs("multi_depthwise", "triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, ws, ds, mean, rstd = depthwise_inputs(CANDIDATES["sep"], "batch-norm", (1, 2, 5, 5), torch.float32, device, 8)
    torch.library.opcheck(
        torch.ops.fastnas.multi_depthwise_triton.default,
        (x, ws, ds, 1, mean, rstd),
        test_utils=("test_schema", "test_faketensor"),
    )
    grad_out = randn(generator("opcheck triton"), (2, 2, 1, 5, 5), torch.float32, device)
    torch.library.opcheck(
        torch.ops.fastnas.multi_depthwise_backward_triton.default,
        (grad_out, x, ws, ds, 1, mean, rstd, True),
        test_utils=("test_schema", "test_faketensor"),
    )
