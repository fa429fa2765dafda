"""fastnas.patch on DARTS, PC-DARTS and P-DARTS search code written in the original style."""

import copy
import importlib
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from search_helpers import assert_steps_alike

import fastnas
from fastnas.patch import PatchWarning, accelerate, patch, unpatch
from tests.darts_fixture import model_search, model_search_pc, model_search_pdarts
from tests.darts_fixture.genotypes import PRIMITIVES

# Triton's interpreter is too slow for a model-level test on the CPU; it is covered op by op.
BACKENDS = [b for b in fastnas.available_backends() if b in ("reference", "cpu")]
TOL = dict(rtol=1e-4, atol=1e-5)
# Search models are ill-conditioned (batch norm over 2x2 maps of a batch of 4), so
# fp32 rounding differences grow past fp32 tolerance within a few steps whatever
# sums them; in fp64 the same growth stays far below this tolerance.
TOL64 = dict(rtol=1e-7, atol=1e-9)


pytestmark = pytest.mark.usefixtures("one_thread")


def _darts(C=4, layers=3, seed=0):
    torch.manual_seed(seed)
    return model_search.Network(C, 10, layers, nn.CrossEntropyLoss())


def _pc_darts(C=8, layers=3, seed=0):
    torch.manual_seed(seed)
    return model_search_pc.Network(C, 10, layers, nn.CrossEntropyLoss())


def _pdarts(C=4, layers=3, seed=0, p=0.3):
    torch.manual_seed(seed)
    # Edges keep different subsets of candidates, as after a P-DARTS stage.
    normal = [[i in (0, 1, 3, 4, 6) for i in range(len(PRIMITIVES))] for _ in range(14)]
    reduce = [[i in (2, 3, 5, 6, 7) for i in range(len(PRIMITIVES))] for _ in range(14)]
    return model_search_pdarts.Network(
        C, 10, layers, nn.CrossEntropyLoss(), switches_normal=normal, switches_reduce=reduce, p=p
    )


def _batch(seed, n=4, size=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, 10, (n,), generator=g)


def _to(model, dtype):
    model.to(dtype)
    # The architecture weights of this code are plain tensors, not registered parameters.
    for a in model.arch_parameters():
        a.data = a.data.to(dtype)
    return model


def _mixed_ops(model):
    return [m for m in model.modules() if hasattr(m, "_ops") and not hasattr(m, "_steps") or hasattr(m, "m_ops")]


def _optimizers(model):
    return (
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4),
        torch.optim.Adam(model.arch_parameters(), lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3),
    )


def _step(model, opts, x, y, rng_seed):
    for opt in opts:
        opt.zero_grad()
    torch.manual_seed(rng_seed)
    logits = model(x)
    loss = model._criterion(logits, y)
    loss.backward()
    after = torch.rand(4)  # shows that both models drew the same random numbers
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads.update({f"arch{i}": a.grad.clone() for i, a in enumerate(model.arch_parameters())})
    for opt in opts:
        opt.step()
    return logits.detach(), loss.detach(), grads, after


def _assert_train_alike(build, backend, dtype, steps, memory="save"):
    tol = TOL64 if dtype == torch.float64 else TOL
    ref = _to(build(), dtype)
    fast = copy.deepcopy(ref)
    # Optimisers built before patching must keep working after it.
    ref_opts, fast_opts = _optimizers(ref), _optimizers(fast)
    report = patch(fast, backend=backend, memory=memory)
    assert report.patched and not report.skipped
    ref.train(), fast.train()
    assert_steps_alike(ref, fast, ref_opts, fast_opts, steps, _batch, _step, dtype, tol)
    for (name, b_ref), (_, b_fast) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b_fast, b_ref, **tol, msg=lambda m, n=name: f"buffer {n}: {m}")
    for a_ref, a_fast in zip(ref.arch_parameters(), fast.arch_parameters()):
        torch.testing.assert_close(a_fast, a_ref, **tol)
    ref.eval(), fast.eval()
    x, _ = _batch(99, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), **tol)
    return report


# fp64 over several steps shows the computation is the same on each backend; one
# fp32 step shows the agreement at the precision searches run in.
RUNS = [pytest.param(b, torch.float64, 2, id=f"{b}-fp64-2steps") for b in BACKENDS]
RUNS.append(pytest.param(None, torch.float32, 1, id="auto-fp32-1step"))


@pytest.mark.parametrize("backend, dtype, steps", RUNS)
def test_darts_trains_like_the_original(backend, dtype, steps):
    report = _assert_train_alike(_darts, backend, dtype, steps)
    assert {op.style for op in report.patched} == {"darts"}


@pytest.mark.parametrize("backend, dtype, steps", RUNS)
def test_pc_darts_trains_like_the_original(backend, dtype, steps):
    report = _assert_train_alike(_pc_darts, backend, dtype, steps)
    assert {op.style for op in report.patched} == {"pc-darts"}


@pytest.mark.parametrize("memory", ("save", "recompute", "sum"))
@pytest.mark.parametrize("build", ("darts", "pc-darts"))
def test_fused_edge_memory_modes_train_like_the_original(build, memory, monkeypatch):
    """In training, recognised DARTS edges run through the fused edge in the memory mode asked for."""
    module = importlib.import_module("fastnas.nn.edge_runner")
    calls = []
    real = module.darts_edge

    def spy(*args, **kwargs):
        calls.append(kwargs["memory"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "darts_edge", spy)
    _assert_train_alike(_darts if build == "darts" else _pc_darts, None, torch.float64, 2, memory=memory)
    if memory == "sum" or fastnas.backends.resolve("darts_edge", "cpu") == "reference":
        assert not calls
    else:
        assert calls and set(calls) == {memory}


def test_patch_rejects_an_unknown_memory_mode():
    with pytest.raises(ValueError, match="memory must be one of"):
        patch(_darts(), memory="keep")


def test_pdarts_subsets_and_dropout_train_like_the_original():
    report = _assert_train_alike(_pdarts, None, torch.float64, 2)
    kinds = {c for op in report.patched for c in op.candidates}
    assert "identity+dropout" in kinds and "zero" in kinds
    assert {len(op.candidates) for op in report.patched} == {5}


def test_report_lists_what_was_patched():
    model = _darts(layers=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cells and clean mixed ops raise no warning
        report = patch(model)
    assert len(report.patched) == 3 * 14 and not report.skipped and not report.already_patched
    assert {op.path for op in report.patched} == {f"cells.{c}._ops.{e}" for c in range(3) for e in range(14)}
    by_path = {op.path: op for op in report.patched}
    assert by_path["cells.0._ops.0"].candidates == (
        "zero",
        "max_pool+bn",
        "avg_pool+bn",
        "identity",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
    )
    # cells.1 is a reduction cell; its first two nodes' edges take stride 2.
    assert by_path["cells.1._ops.0"].candidates[3] == "factorized_reduce"
    assert all(op.skipped_zero == (0,) for op in report.patched)
    text = str(report)
    assert "42 mixed ops patched" in text and "darts" in text


def test_unpatch_restores_bit_identical_behaviour():
    never = _pc_darts()
    model = copy.deepcopy(never)
    before = [dict(m.__dict__) for m in model.modules()]
    patch(model)
    restored = unpatch(model)
    assert len(restored) == 42
    after = [dict(m.__dict__) for m in model.modules()]
    assert [d.keys() for d in after] == [d.keys() for d in before]
    assert all(a[k] is b[k] for a, b in zip(after, before) for k in b)
    for step in range(2):
        x, y = _batch(step)
        torch.manual_seed(step)
        out_never = never(x)
        torch.manual_seed(step)
        out_model = model(x)
        assert torch.equal(out_model, out_never)
    for b_never, b_model in zip(never.buffers(), model.buffers()):
        assert torch.equal(b_model, b_never)


def test_patching_twice_is_idempotent():
    model = _darts()
    first = patch(model)
    forwards = [m.__dict__["forward"] for m in _mixed_ops(model)]
    second = patch(model)
    assert not second.patched and len(second.already_patched) == len(first.patched)
    assert [m.__dict__["forward"] for m in _mixed_ops(model)] == forwards
    assert len(unpatch(model)) == len(first.patched)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_state_dict_round_trips_both_ways():
    plain = _darts(seed=1)
    patched = _darts(seed=2)
    patch(patched)
    assert list(plain.state_dict()) == list(patched.state_dict())
    plain.load_state_dict(patched.state_dict(), strict=True)
    for (k, a), (_, b) in zip(plain.state_dict().items(), patched.state_dict().items()):
        assert torch.equal(a, b), k
    source = _darts(seed=3)
    patched.load_state_dict(source.state_dict(), strict=True)
    for a in (plain, patched, source):
        a.eval()
    for p_arch, s_arch in zip(patched.arch_parameters(), source.arch_parameters()):
        p_arch.data.copy_(s_arch.data)
    x, _ = _batch(0)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), source(x), **TOL)


class Scaled(nn.Module):
    """A candidate that no DARTS code has: a learnt scale."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.scale * x


def test_unknown_candidate_warns_and_is_left_alone():
    ref = _darts()
    ref.cells[0]._ops[2]._ops[3] = Scaled()
    model = copy.deepcopy(ref)
    with pytest.warns(PatchWarning, match=r"cells\.0\._ops\.2 \(MixedOp\).*_ops\[3\] \(Scaled\)"):
        report = patch(model)
    assert [s.path for s in report.skipped] == ["cells.0._ops.2"]
    assert len(report.patched) == 41
    assert "forward" not in model.cells[0]._ops[2].__dict__
    assert "forward" in model.cells[0]._ops[1].__dict__
    x, y = _batch(0)
    torch.testing.assert_close(model._loss(x, y), ref._loss(x, y), **TOL)


class ExtraArgMixedOp(model_search.MixedOp):
    def forward(self, x, weights, drop_prob=0.0):
        return F.dropout(super().forward(x, weights), drop_prob)


class PostBNMixedOp(model_search.MixedOp):
    def __init__(self, C, stride):
        super().__init__(C, stride)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x, weights):
        return self.bn(super().forward(x, weights))


@pytest.mark.parametrize(
    "cls, reason",
    [(ExtraArgMixedOp, r"does not take exactly \(x, weights\)"), (PostBNMixedOp, r"submodules besides _ops \(bn\)")],
)
def test_mixed_op_doing_more_than_the_sum_is_left_alone(cls, reason):
    model = nn.Sequential(cls(4, 1))
    with pytest.warns(PatchWarning, match=reason):
        report = patch(model)
    assert not report.patched and "forward" not in model[0].__dict__


def test_calls_the_fused_op_cannot_take_run_the_original_way():
    torch.manual_seed(0)
    op = model_search.MixedOp(4, 1)
    fast = copy.deepcopy(op)
    patch(fast)
    x = torch.randn(2, 4, 6, 6)
    # zip() in the original stops at the shorter of weights and candidates.
    for weights in (torch.rand(5), torch.rand(8)[None].expand(2, 8)[0], [0.5] * 8):
        torch.testing.assert_close(fast(x, weights), op(x, weights), **TOL)


def test_accelerate_patches_inside_and_restores_on_exit():
    model = _darts()
    inner = model.cells[0]._ops[0]
    patch(inner, backend="reference")
    with accelerate(model) as report:
        assert len(report.patched) == 41 and report.already_patched == ["cells.0._ops.0"]
        assert all("forward" in m.__dict__ for m in _mixed_ops(model))
    assert "forward" in inner.__dict__ and inner._fastnas_patch.backend == "reference"
    assert sum("forward" in m.__dict__ for m in model.modules()) == 1


def test_copies_of_a_patched_model_run_their_own_modules():
    model = _darts()
    patch(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        for m in _mixed_ops(clone):
            assert m.forward.module is m
        x, y = _batch(0)
        torch.testing.assert_close(clone._loss(x, y), model._loss(x, y), **TOL)


def test_data_parallel_replicas_run_their_own_modules():
    torch.manual_seed(0)
    op = model_search.MixedOp(4, 1)
    patch(op)
    # What nn.DataParallel's replicate() does to each module before giving it parameters.
    replica = op._replicate_for_data_parallel()
    assert replica.forward.module is replica and op.forward.module is op
    assert replica._replicate_for_data_parallel().forward.module is not op
    unpatch(replica)
    assert "forward" in op.__dict__ and "forward" not in replica.__dict__


def test_unknown_backend_fails_at_patch_time():
    with pytest.raises(ValueError, match="unknown fastnas backend"):
        patch(_darts(), backend="tpu")
