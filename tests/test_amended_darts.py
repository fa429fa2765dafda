"""Amended-DARTS: the finite-difference amended term against the exact one, and the search."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from search_helpers import assert_state_close, losses, run, tiny_config

from fastnas.search import SearchConfig, SearchError, build_supernet
from fastnas.search.architect import AmendedArchGrad, first_order_arch_grads
from fastnas.spaces import validate_genotype

pytestmark = pytest.mark.usefixtures("one_thread")


def _net_and_batches(backend="reference"):
    torch.manual_seed(0)
    net = build_supernet(tiny_config("amended-darts", backend=backend), 4, 3, 3).double()
    g = torch.Generator().manual_seed(1)
    xt, xv = (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    yt, yv = (torch.randint(0, 4, (6,), generator=g) for _ in range(2))
    return net, xt, yt, xv, yv


def _exact_amending_term(net, xt, yt, xv, yv):
    """(d2 L_train / dalpha dw) . H . dL_val/dw by double backward, on copies of the statistics."""
    from torch.func import functional_call

    grad = AmendedArchGrad(net, 0.1)
    buffers = {n: b.clone() for n, b in net.named_buffers()}

    def loss(x, y):
        params = dict(zip(grad.weight_names, grad.weights))
        params.update(zip(grad.arch_names, grad.arch))
        return F.cross_entropy(functional_call(net, (params, buffers), (x,)), y)

    v = [torch.zeros_like(w) if g is None else g for g, w in
         zip(torch.autograd.grad(loss(xv, yv), grad.weights, allow_unused=True), grad.weights)]  # fmt: skip
    g_w = torch.autograd.grad(loss(xt, yt), grad.weights, create_graph=True, allow_unused=True)
    pairs = [(g, u) for g, u in zip(g_w, v) if g is not None]
    hv = torch.autograd.grad(sum((g * u).sum() for g, u in pairs), grad.weights, allow_unused=True)
    hv = [torch.zeros_like(w) if h is None else h for h, w in zip(hv, grad.weights)]
    g_w = torch.autograd.grad(loss(xt, yt), grad.weights, create_graph=True, allow_unused=True)
    inner = sum((g * h).sum() for g, h in zip(g_w, hv) if g is not None)
    return torch.autograd.grad(inner, grad.arch)


def test_finite_difference_amending_term_matches_double_backward():
    net, xt, yt, xv, yv = _net_and_batches()
    exact = _exact_amending_term(net, xt, yt, xv, yv)
    # A small radius in float64 checks the formula itself (DARTS' 0.01 crosses ReLU and pool kinks here).
    grad = AmendedArchGrad(net, 0.1, fd_radius=1e-6)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    val_loss, _ = grad._loss(grad.weights, grad.arch, buffers, xv, yv, contextlib.nullcontext)
    v = torch.autograd.grad(val_loss, grad.weights, allow_unused=True)
    v = [torch.zeros_like(w) if g is None else g for g, w in zip(v, grad.weights)]
    term = grad.amending_term(v, buffers, xt, yt, contextlib.nullcontext)
    for t, e in zip(term, exact):
        assert e.abs().max() > 0
        torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


def test_amended_gradient_is_first_order_minus_eta_times_the_term():
    net, xt, yt, xv, yv = _net_and_batches()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads, loss, _ = AmendedArchGrad(net, 0.1, fd_radius=1e-6)(xt, yt, xv, yv, autocast=contextlib.nullcontext)
    # The model, its statistics and its .grad are left alone.
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    exact = _exact_amending_term(net, xt, yt, xv, yv)
    first, first_loss, _ = first_order_arch_grads(net, net.arch_parameters(), xv, yv, contextlib.nullcontext)
    for g, f, e in zip(grads, first, exact):
        torch.testing.assert_close(g, f - 0.1 * e, rtol=1e-5, atol=1e-8)
    assert float(loss) == pytest.approx(float(first_loss), rel=1e-12)
    net.load_state_dict(before)
    zero, _, _ = AmendedArchGrad(net, 0.0)(xt, yt, xv, yv, autocast=contextlib.nullcontext)
    for z, f in zip(zero, first):
        torch.testing.assert_close(z, f, rtol=1e-12, atol=1e-14)


def test_fused_amended_gradient_matches_reference_in_float64():
    ref, xt, yt, xv, yv = _net_and_batches("reference")
    fused, *_ = _net_and_batches(None)
    fused.load_state_dict(ref.state_dict())
    fused.train()
    want, _, _ = AmendedArchGrad(ref, 0.1)(xt, yt, xv, yv, autocast=contextlib.nullcontext)
    got, _, _ = AmendedArchGrad(fused, 0.1)(xt, yt, xv, yv, autocast=contextlib.nullcontext)
    assert any(m.fused_reason is None for m in fused.modules() if hasattr(m, "fused_reason"))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


def test_amended_search_fused_matches_reference():
    ref, ref_net = run(tiny_config("amended-darts", backend="reference"))
    got, got_net = run(tiny_config("amended-darts"))
    for (a_train, a_val), (r_train, r_val) in zip(losses(got.history), losses(ref.history)):
        assert a_train == pytest.approx(r_train, rel=1e-5, abs=1e-6)
        assert a_val == pytest.approx(r_val, rel=1e-5, abs=1e-6)
    for a, r in zip(got_net.arch_parameters(), ref_net.arch_parameters()):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert_state_close(got_net.state_dict(), ref_net.state_dict())
    validate_genotype(got.genotype)
    # The amending term moved the architecture away from first-order DARTS'.
    darts, darts_net = run(tiny_config("darts"))
    assert not torch.allclose(darts_net.alphas_normal, got_net.alphas_normal, rtol=0, atol=1e-9)


def test_amended_settings():
    config = SearchConfig.create("amended-darts", dataset="cifar10")
    assert (config.epochs, config.batch_size, config.lr, config.arch_lr, config.amend_coefficient) == (
        50, 64, 0.025, 3e-4, 0.1,
    )  # fmt: skip
    assert SearchConfig.create("amended-darts", amend_coefficient=0.5).amend_coefficient == 0.5
    with pytest.raises(SearchError, match="amend-coefficient"):
        SearchConfig.create("amended-darts", amend_coefficient=-1.0)
    with pytest.raises(SearchError, match="does not unroll"):
        SearchConfig.create("amended-darts", unrolled=True)


@pytest.mark.parametrize(
    "method, option, message",
    [
        ("darts", dict(amend_coefficient=0.5), "--amend-coefficient is for amended-darts, not darts"),
        ("gdas", dict(latency_weight=0.5), "--latency-weight is for la-darts, not gdas"),
        ("amended-darts", dict(latency_model="latency.pt"), "--latency-model is for la-darts, not amended-darts"),
    ],
)
def test_a_method_refuses_another_methods_options(method, option, message):
    with pytest.raises(SearchError, match=message):
        SearchConfig.create(method, dataset="digits", **option)
