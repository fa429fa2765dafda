"""The fused DARTS edge (``fastnas.ops.darts_edge``) against the eager candidate modules.

The oracle is ``MixedOp`` with the ``reference`` backend: every candidate an
``nn.Module``, summed eagerly. The fused edge must give the same output, the same
gradients of the input, the architecture weights and every parameter, and leave
the same batch-norm running statistics, in both memory modes.
"""

import copy

import pytest
import torch

import fastnas
from fastnas.nn import MixedOp, PartialChannelMixedOp
from fastnas.ops.darts_edge import EdgeSpec, darts_edge
from fastnas.spaces.darts import DARTS_PRIMITIVES, SearchNetwork

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in fastnas.available_backends()]
MEMORY = ("save", "recompute")
SUBSETS = [
    DARTS_PRIMITIVES,
    ["none", "sep_conv_3x3", "skip_connect"],
    ["max_pool_3x3", "avg_pool_3x3"],
    ["dil_conv_5x5", "sep_conv_7x7", "none"],
    ["skip_connect", "dil_conv_3x3"],
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tolerance(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


def _step(module, x, w, grad_seed=1):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = module(x, w)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype)
    out.backward(g)
    return out.detach(), x.grad, w.grad


def _compare(ref, fused, x, w, tol, steps=2):
    for step in range(steps):
        r = _step(ref, x, w, step)
        f = _step(fused, x, w, step)
        for name, a, b in zip(("output", "input grad", "weights grad"), r, f):
            torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"{n}: {m}")
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")
    for (name, b), c in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, **tol, msg=lambda m, n=name: f"buffer {n}: {m}")


def _force_fused(module):
    """Run the fused edge even with the reference building blocks (which MixedOp
    would otherwise answer with the eager modules)."""
    for m in module.modules():
        if isinstance(m, MixedOp) and m.backend == "reference":
            m._fusable = lambda x, index: True
    return module


def _pair(make, backend, memory, dtype):
    ref = make(backend="reference").to(dtype)
    fused = copy.deepcopy(ref)
    fused.backend, fused.memory = backend, memory
    return ref, _force_fused(fused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("subset", range(len(SUBSETS)))
def test_mixed_op_matches_eager_modules(backend, memory, stride, subset):
    prims = SUBSETS[subset]
    dtype = torch.float64 if backend != "triton" else torch.float32
    ref, fused = _pair(lambda backend: MixedOp(4, stride, prims, backend=backend), backend, memory, dtype)
    assert fused.fused_reason is None
    gen = torch.Generator().manual_seed(subset)
    size = 6 if backend == "triton" else 8
    x = torch.randn(2, 4, size, size, generator=gen, dtype=dtype)
    w = torch.softmax(torch.randn(len(prims), generator=gen, dtype=dtype), 0)
    _compare(ref, fused, x, w, _tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride", (1, 2))
def test_partial_channel_edge_matches_eager(backend, stride):
    dtype = torch.float64 if backend != "triton" else torch.float32
    ref, fused = _pair(
        lambda backend: PartialChannelMixedOp(8, stride, DARTS_PRIMITIVES, 2, backend=backend),
        backend,
        "recompute",
        dtype,
    )
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(3), dtype=dtype)
    w = torch.softmax(torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=dtype), 0)
    _compare(ref, fused, x, w, _tolerance(dtype))


def test_fused_path_is_taken_in_training_only():
    calls = []
    op = MixedOp(4, 1, DARTS_PRIMITIVES, backend="cpu" if "cpu" in BACKENDS else "reference")
    real = op._fused
    op._fused = lambda x, w: calls.append(1) or real(x, w)
    x, w = torch.randn(2, 4, 6, 6), torch.softmax(torch.randn(8), 0)
    op(x, w)
    expected = 0 if op.backend == "reference" else 1
    assert len(calls) == expected
    op.eval()
    op(x, w)
    assert len(calls) == expected


def test_unfusable_edge_says_why_and_stays_correct():
    op = MixedOp(4, 1, ["nor_conv_3x3", "skip_connect"])
    assert op.fused_reason and "candidate 0 (ReLUConvBN) is not one" in op.fused_reason
    ref = copy.deepcopy(op)
    ref.backend = "reference"
    op.memory = "recompute"  # falls back to checkpointing the modules
    x, w = torch.randn(2, 4, 5, 5, dtype=torch.float32), torch.tensor([0.3, 0.7])
    _compare(ref, op, x, w, _tolerance(torch.float32))


def test_unfusable_partial_channel_edge_recomputes_by_checkpoint(monkeypatch):
    op = PartialChannelMixedOp(8, 1, ["nor_conv_3x3", "skip_connect"], 2, memory="recompute")
    assert op.fused_reason
    ref = copy.deepcopy(op)
    ref.backend, ref.memory = "reference", "save"
    calls = []
    real = op._checkpointed
    monkeypatch.setattr(op, "_checkpointed", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(2, 8, 5, 5), torch.tensor([0.3, 0.7])
    _compare(ref, op, x, w, _tolerance(torch.float32))
    assert calls


def test_affine_batch_norm_is_not_fused():
    op = MixedOp(4, 1, DARTS_PRIMITIVES, affine=True)
    assert "affine" in op.fused_reason


def test_skip_dropout_matches_eager():
    ref, fused = _pair(lambda backend: MixedOp(4, 1, DARTS_PRIMITIVES, backend=backend), BACKENDS[-1], "save",
                       torch.float32)  # fmt: skip
    if BACKENDS[-1] == "triton":
        fused.backend = "reference" if "cpu" not in BACKENDS else "cpu"
    for m in (ref, fused):
        m.skip_drop_prob = 0.3
    x, w = torch.randn(2, 4, 6, 6), torch.softmax(torch.randn(8), 0)
    torch.manual_seed(5)
    r = _step(ref, x, w)
    torch.manual_seed(5)
    f = _step(fused, x, w)
    for a, b in zip(r, f):
        torch.testing.assert_close(b, a, **_tolerance(torch.float32))


@pytest.mark.parametrize("memory", MEMORY)
def test_search_network_training_steps_match(memory):
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    torch.manual_seed(0)
    ref = SearchNetwork(C=4, num_classes=3, layers=3, backend="reference").double()
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if isinstance(m, MixedOp):
            m.backend, m.memory = backend, memory
    _force_fused(fused)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for net, opt in ((ref, opt_r), (fused, opt_f)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    tol = _tolerance(torch.float64)
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"{n}: {m}")


def _saved_bytes(net, x):
    """Bytes of distinct storages autograd keeps for backward in one forward."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return sum(seen.values())


@pytest.mark.parametrize("partial, save_bound, recompute_bound", [(None, 4, 10), (4, 4, 5)])
def test_recompute_keeps_less_than_save_keeps_less_than_eager(partial, save_bound, recompute_bound):
    """The memory targets on what autograd keeps: DARTS save <= 1/4 and recompute
    <= 1/10 of eager; PC-DARTS, whose eager network already keeps a quarter of
    the channels, 1/4 and 1/5."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    if backend == "reference":
        pytest.skip("no fused backend")
    torch.manual_seed(0)
    sizes = {}
    for memory, be in (("save", "reference"), ("save", backend), ("recompute", backend)):
        net = SearchNetwork(C=8, num_classes=3, layers=3, backend=be, memory=memory, partial_channels=partial)
        sizes[(memory, be)] = _saved_bytes(net, torch.randn(8, 3, 16, 16))
    eager, save, recompute = sizes[("save", "reference")], sizes[("save", backend)], sizes[("recompute", backend)]
    assert save < eager / save_bound, sizes
    assert recompute < eager / recompute_bound, sizes
    assert recompute < save / 1.5, sizes


def test_darts_edge_rejects_bad_arguments():
    spec = EdgeSpec(stride=1, K=2, skip_index=1)
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="memory"):
        darts_edge(x, torch.ones(2), (), spec, memory="keep")
    with pytest.raises(ValueError, match="weights must have shape"):
        darts_edge(x, torch.ones(3), (), spec)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        darts_edge(x[0], torch.ones(2), (), spec)
    with pytest.raises(ValueError, match="parameter tensors"):
        darts_edge(x, torch.ones(2), (torch.ones(1),), spec)
    with pytest.raises(ValueError, match="identity skip needs stride 1"):
        EdgeSpec(stride=2, K=1, skip_index=0)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("partial", (None, 2))
def test_search_network_on_cuda_matches_eager(memory, partial):
    """The GPU path (Triton building blocks) against the eager modules, over training steps
    (TF32 is off in GPU tests: see conftest.py)."""
    _cuda_steps(memory, partial)


def _cuda_steps(memory, partial):
    torch.manual_seed(0)
    ref = SearchNetwork(C=8, num_classes=3, layers=3, backend="reference", partial_channels=partial).cuda()
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if isinstance(m, (MixedOp, SearchNetwork)) or hasattr(m, "backend"):
            m.backend = None
        if isinstance(m, MixedOp):
            m.memory = memory
    x = torch.randn(8, 3, 16, 16, device="cuda")
    y = torch.randint(0, 3, (8,), device="cuda")
    opts = [torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9) for n in (ref, fused)]
    for step in range(3):
        losses = []
        for net, opt in zip((ref, fused), opts):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            losses.append(loss.detach())
            opt.step()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")
    for (name, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4, msg=lambda m, n=name: f"{n}: {m}")


def _saved_shapes(net, x):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return shapes


@pytest.mark.parametrize("memory", ["save", "recompute"])
def test_imagenet_stem_follows_the_memory_mode(memory):
    """Under recompute the stem keeps only its input (its 1/2- and 1/4-size tensors are recomputed
    in backward, as the cells' preprocessing is); under save it keeps them. Gradients are the same."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=3, layers=2, stem="imagenet", backend=backend, memory=memory).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    half_size = [s for s in _saved_shapes(net, x) if len(s) == 4 and s[-1] == 16]
    assert (not half_size) == (memory == "recompute"), half_size
    grads = torch.autograd.grad(net(x).square().sum(), list(net.parameters()), allow_unused=True)
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if hasattr(m, "memory"):
            m.memory = "save"
    ref_grads = torch.autograd.grad(ref(x).square().sum(), list(ref.parameters()), allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
