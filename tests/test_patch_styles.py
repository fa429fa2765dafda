"""fastnas.patch on the other styles of DARTS-family search code people run.

Fixtures written here in each style: ``tests/renamed_fixture`` (candidate lists under
``ops``, ``layers``, ``candidate_ops``, each summed its own way; pools with no batch
norm; batch norms affine or tracking no running statistics) and
``tests/autodl_fixture`` (AutoDL-Projects / NAS-Bench-201: cells whose ``forward``
sums every edge's ``ModuleList`` inline with a GDAS hard-sample ``forward_gdas``;
NASNet-space mixed ops that sum in ``forward_darts``; ``POOLING`` without batch norm,
convolutions with ``bias=not affine``). Each is trained patched against unpatched
over several steps: losses, logits, every gradient, the parameters and the
batch-norm buffers agree, in float64 to rounding and in float32 to its precision.
"""

import copy
import importlib
import pickle
import random
import warnings

import pytest
import torch
import torch.nn as nn
from search_helpers import assert_steps_alike

import fastnas
from fastnas.patch import PatchWarning, accelerate, patch, unpatch
from tests.autodl_fixture import search_cells, search_models
from tests.autodl_fixture.cell_operations import DARTS_SPACE, NAS_BENCH_201
from tests.renamed_fixture import model_search as renamed

TOL = dict(rtol=1e-4, atol=1e-5)
TOL64 = dict(rtol=1e-7, atol=1e-9)
FUSED_CPU = fastnas.backends.resolve("darts_edge", "cpu") != "reference"
EDGE = "fused edge"
PART = "fused edge on 6 of 8 candidates"
SUM = "fused sum"


pytestmark = pytest.mark.usefixtures("one_thread")


def _renamed(mixed, **options):
    def build():
        return renamed.Network(4, 10, 3, nn.CrossEntropyLoss(), mixed=mixed, **options)

    return build


def _nb201(cls, track=True):
    def build():
        return cls(4, 1, 4, 10, NAS_BENCH_201, affine=False, track_running_stats=track)

    return build


def _nasnet(cls, affine=False):
    def build():
        return cls(4, 1, 2, 2, 2, 10, DARTS_SPACE, affine, True)

    return build


# name: (build, how the weighted sums run in training, which methods are replaced)
STYLES = {
    "ops-list": (_renamed(renamed.MixedOp), EDGE, ("forward",)),
    "layers-list-loop-sum": (_renamed(renamed.MixedLayer), EDGE, ("forward",)),
    "candidate_ops-stacked-sum": (_renamed(renamed.MixedEdge), EDGE, ("forward",)),
    "pools-without-bn": (_renamed(renamed.MixedLayer, pool_bn=False), PART, ("forward",)),
    "affine-bn": (_renamed(renamed.MixedOp, affine=True), SUM, ("forward",)),
    "bn-without-running-stats": (_renamed(renamed.MixedEdge, track=False), EDGE, ("forward",)),
    "nb201-cell": (_nb201(search_models.TinyNetworkDarts), SUM, ("forward", "forward_gdas", "forward_joint")),
    "nb201-cell-no-running-stats": (
        _nb201(search_models.TinyNetworkDarts, track=False),
        SUM,
        ("forward", "forward_gdas", "forward_joint"),
    ),
    "nb201-cell-gdas": (_nb201(search_models.TinyNetworkGDAS), SUM, ("forward", "forward_gdas", "forward_joint")),
    "nasnet-forward_darts": (_nasnet(search_models.NASNetworkDARTS), SUM, ("forward_darts",)),
    "nasnet-forward_darts-affine": (_nasnet(search_models.NASNetworkDARTS, affine=True), SUM, ("forward_darts",)),
    "nasnet-gdas": (_nasnet(search_models.NASNetworkGDAS), SUM, ("forward_darts",)),
}


def _build(style, seed=0):
    torch.manual_seed(seed)
    return STYLES[style][0]()


def _alphas(model):
    return list(model.get_alphas() if hasattr(model, "get_alphas") else model.arch_parameters())


def _logits(out):
    return out[1] if isinstance(out, tuple) else out


def _batch(seed, n=4, size=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, 10, (n,), generator=g)


def _optimizers(model):
    alphas = {id(a) for a in _alphas(model)}
    weights = [p for p in model.parameters() if id(p) not in alphas]
    return (
        torch.optim.SGD(weights, lr=0.05, momentum=0.9, weight_decay=3e-4),
        torch.optim.Adam(_alphas(model), lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3),
    )


def _step(model, opts, x, y, seed):
    for opt in opts:
        opt.zero_grad()
    torch.manual_seed(seed)  # GDAS samples its Gumbel noise in forward
    logits = _logits(model(x))
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    after = torch.rand(4)  # both drew the same random numbers
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for opt in opts:
        opt.step()
    return logits.detach(), loss.detach(), grads, after


def _spy(monkeypatch):
    module = importlib.import_module("fastnas.nn.edge_runner")
    calls = []
    real = module.darts_edge

    def spy(*args, **kwargs):
        calls.append(kwargs["memory"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "darts_edge", spy)
    return calls


def _assert_train_alike(style, dtype, steps, monkeypatch, memory="save"):
    tol = TOL64 if dtype == torch.float64 else TOL
    ref = _build(style).to(dtype)
    fast = copy.deepcopy(ref)
    ref_opts, fast_opts = _optimizers(ref), _optimizers(fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchWarning)
        report = patch(fast, memory=memory)
    assert report.patched and not report.skipped
    calls = _spy(monkeypatch)
    assert_steps_alike(ref, fast, ref_opts, fast_opts, steps, _batch, _step, dtype, tol)
    for (name, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p_fast, p_ref, **tol, msg=lambda m, n=name: f"parameter {n}: {m}")
    assert [n for n, _ in ref.named_buffers()] == [n for n, _ in fast.named_buffers()]
    for (name, b_ref), (_, b_fast) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b_fast, b_ref, **tol, msg=lambda m, n=name: f"buffer {n}: {m}")
    ref.eval(), fast.eval()
    x, _ = _batch(99, dtype=dtype)
    with torch.no_grad():
        torch.manual_seed(99)
        out_ref = _logits(ref(x))
        torch.manual_seed(99)
        torch.testing.assert_close(_logits(fast(x)), out_ref, **tol)
    return report, calls


@pytest.mark.parametrize("style", list(STYLES))
def test_each_style_trains_like_the_original_in_float64(style, monkeypatch):
    report, calls = _assert_train_alike(style, torch.float64, 3, monkeypatch)
    _, how, methods = STYLES[style]
    assert {op.how.split(" (")[0].split(",")[0] for op in report.patched} == {how}
    assert {name for op in report.patched for name, _ in op.methods} == set(methods)
    # The fused edge ran wherever the report says it does (and the kernels are here).
    assert bool(calls) == (how != SUM and FUSED_CPU)


@pytest.mark.parametrize(
    "style", ["layers-list-loop-sum", "pools-without-bn", "nb201-cell-gdas", "nasnet-forward_darts"]
)
def test_styles_train_like_the_original_in_float32(style, monkeypatch):
    _assert_train_alike(style, torch.float32, 2, monkeypatch)


@pytest.mark.parametrize("memory", ["recompute", "checkpoint", "sum"])
@pytest.mark.parametrize("style", ["pools-without-bn", "nb201-cell"])
def test_memory_modes_train_like_the_original(style, memory, monkeypatch):
    _, calls = _assert_train_alike(style, torch.float64, 2, monkeypatch, memory=memory)
    assert set(calls) <= {memory}


def test_report_says_what_was_patched_and_how():
    report = patch(_build("nb201-cell"))
    assert len(report.patched) == 3 and all(op.style == "nb201-cell" and op.edges == 6 for op in report.patched)
    op = report.patched[0]
    assert op.candidates == ("zero", "identity", "relu_conv_bn_1x1", "relu_conv_bn_3x3", "avg_pool")
    assert op.skipped_zero == (0,)
    assert dict(op.methods) == {"forward": "sum", "forward_gdas": "gdas-sum", "forward_joint": "sum"}
    assert op.how.startswith("fused sum (candidate 2 (ReLUConvBN) is not one the fused edge computes")
    # forward_select picks the largest weight's candidate: not a weighted sum, listed, not replaced.
    left = {(s.path, s.method) for s in report.methods_left}
    assert left == {(f"cells.{i}", "forward_select") for i in (0, 2, 4)}
    assert all("does not compute the weighted sum" in s.reason for s in report.methods_left)
    text = str(report)
    assert "0 mixed ops and 3 cells patched" in text and "forward_gdas (gdas-sum)" in text
    assert "not replaced    3 x forward_select" in text

    report = patch(_build("nasnet-gdas"))
    assert {dict(op.methods)["forward_darts"] for op in report.patched} == {"sum"}
    assert {op.how.split(":")[0] for op in report.patched} == {
        "fused sum (candidate 1 (FactorizedReduce)",
        "fused sum (candidate 2 (DualSepConv)",
    }
    # AutoDL's MixedOp.forward_gdas runs the sampled candidate alone: recognised, nothing to fuse.
    assert {s.method for s in report.methods_left} == {"forward_gdas"}
    assert all("runs one sampled candidate" in s.reason for s in report.methods_left)

    report = patch(_build("pools-without-bn"))
    assert {op.how for op in report.patched} == {
        "fused edge on 6 of 8 candidates, fused sum with the others "
        "(candidate 1 (MaxPool2d): a pooling candidate without a following batch norm)"
    }
    assert {op.candidates[1:3] for op in report.patched} == {("max_pool", "avg_pool")}


def test_candidate_lists_are_found_under_any_name():
    for style, attr in (
        ("ops-list", "ops"),
        ("layers-list-loop-sum", "layers"),
        ("candidate_ops-stacked-sum", "candidate_ops"),
    ):
        model = _build(style)
        report = patch(model)
        assert {op.path.rsplit(".", 1)[0] for op in report.patched} == {f"cells.{c}.edges" for c in range(3)}
        assert all(getattr(m, attr) is not None for m in model.modules() if "forward" in m.__dict__)


def test_autodl_candidates_are_read_by_structure():
    from fastnas.nn.edge_plan import candidate_kind, plan_edge
    from tests.autodl_fixture.cell_operations import OPS

    assert candidate_kind(OPS["avg_pool_3x3"](4, 4, 1, False, True)) == "avg_pool"
    assert candidate_kind(OPS["max_pool_3x3"](4, 4, 2, False, True)) == "max_pool"
    assert candidate_kind(OPS["skip_connect"](4, 4, 2, False, True)) == "factorized_reduce"
    assert candidate_kind(OPS["none"](4, 4, 2, False, True)) == "zero"
    assert candidate_kind(OPS["nor_conv_3x3"](4, 4, 1, True, False)) == "relu_conv_bn_3x3"
    assert candidate_kind(OPS["dua_sepc_5x5"](4, 4, 1, False, True)) == "sep_conv_5x5"
    assert candidate_kind(OPS["dil_sepc_3x3"](4, 4, 1, False, True)) == "dil_conv_3x3"
    # A POOLING that changes channels runs a convolution first: not a pool.
    assert candidate_kind(OPS["avg_pool_3x3"](4, 8, 1, False, True)) is None
    plan = plan_edge([OPS[n](4, 4, 1, False, True) for n in DARTS_SPACE])
    assert plan.spec is None and "without bias" in plan.reason


def test_batch_norms_without_running_stats_run_fused_and_keep_none():
    model = _build("bn-without-running-stats")
    report = patch(model)
    assert {op.how for op in report.patched} == {EDGE}
    assert not any(b.numel() for n, b in model.named_buffers() if ".edges." in n)
    # Tracking and non-tracking batch norms in one edge: not fused, summed.
    from fastnas.nn.edge_plan import plan_edge

    ops = renamed.candidates(4, 1, True, False, True)
    ops[4] = renamed.SepConv(4, 3, 1, 1, False, False)
    assert "keep running statistics and others do not" in plan_edge(ops).reason


# --- refusals ----------------------------------------------------------------------


class ScaledSum(renamed.MixedOp):
    def forward(self, x, weights):
        return 2 * super().forward(x, weights)


class ReversedWeights(renamed.MixedOp):
    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights.flip(0), self.ops))


class PlusInputCell(search_cells.NAS201SearchCell):
    def forward(self, inputs, weightss):
        return super().forward(inputs, weightss) + inputs


@pytest.mark.parametrize("cls", [ScaledSum, ReversedWeights])
def test_a_method_computing_something_else_is_left_alone_with_a_warning(cls):
    torch.manual_seed(0)
    model = nn.Sequential(cls(4, 1))
    ref = copy.deepcopy(model)
    with pytest.warns(PatchWarning, match=r"0 \(\w+\) unchanged: forward\(x, weights\) does not compute the weighted"):
        report = patch(model)
    assert not report.patched and [s.path for s in report.skipped] == ["0"]
    assert "forward" not in model[0].__dict__
    x = torch.randn(2, 4, 6, 6)
    w = torch.rand(8)
    torch.testing.assert_close(model[0](x, w), ref[0](x, w), rtol=0, atol=0)


def test_a_cell_whose_forward_does_more_keeps_it_and_patches_the_rest():
    torch.manual_seed(0)
    cell = PlusInputCell(4, 4, 1, 3, NAS_BENCH_201)
    with pytest.warns(
        PatchWarning, match=r"forward of <root> \(PlusInputCell\) unchanged: forward\(inputs, weightss\)"
    ):
        report = patch(cell)
    assert dict(report.patched[0].methods) == {"forward_gdas": "gdas-sum", "forward_joint": "sum"}
    assert "forward" not in cell.__dict__ and "forward_gdas" in cell.__dict__


def test_cells_that_are_not_the_nb201_structure_are_named():
    torch.manual_seed(0)
    cell = search_cells.NAS201SearchCell(4, 4, 1, 3, NAS_BENCH_201)
    cell.edges["2<-0"][2] = nn.Conv2d(4, 4, 3, padding=1)
    with pytest.warns(PatchWarning, match=r"candidate edges\['2<-0'\]\[2\] \(Conv2d\) is not a recognised"):
        assert not patch(cell).patched
    cell = search_cells.NAS201SearchCell(4, 4, 1, 3, NAS_BENCH_201)
    del cell.edge2index
    with pytest.warns(PatchWarning, match="no dict of the instance maps the keys of edges to rows"):
        assert not patch(cell).patched
    cell = search_cells.NAS201SearchCell(4, 4, 1, 3, NAS_BENCH_201)
    del cell.edges["2<-1"]
    with pytest.warns(PatchWarning, match="are not every edge"):
        assert not patch(cell).patched


class Blocks(nn.Module):
    """Not a mixed op: a plain stack of blocks that happen to look like candidates."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([renamed.ReLUConvBN(4, 4), renamed.ReLUConvBN(4, 4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_other_modules_with_candidate_like_lists_are_passed_over_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = patch(nn.Sequential(Blocks(), fastnas.nn.MixedOp(4, 1, ["skip_connect", "sep_conv_3x3"])))
    assert not report.patched and not report.skipped and not report.methods_left


def test_patching_under_no_grad_or_inference_mode_checks_the_same():
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            report = patch(_build("pools-without-bn"))
        assert len(report.patched) == 27 and not report.skipped and not report.methods_left


def test_patching_leaves_the_model_and_the_random_state_untouched():
    model = _build("nb201-cell-gdas")
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(5)
    random.seed(5)
    patch(model)
    after_torch, after_py = torch.rand(3), random.random()
    torch.manual_seed(5)
    random.seed(5)
    assert torch.equal(after_torch, torch.rand(3)) and after_py == random.random()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- GDAS hard samples -------------------------------------------------------------


def _gdas_inputs(cell, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    probs = torch.randn(cell.num_edges, len(NAS_BENCH_201), generator=g, dtype=torch.float64).softmax(-1)
    index = probs.max(-1, keepdim=True)[1]
    hard = torch.zeros_like(probs).scatter_(-1, index, 1.0) - probs.detach() + probs
    return x, probs, hard, index


def test_gdas_hard_sample_sum_gives_every_hard_weight_its_gradient():
    """The replacement of forward_gdas computes weights[a] * op_a(x) + the other weights,
    so the hard weights that were not sampled get the output gradient's sum, as in AutoDL."""
    torch.manual_seed(0)
    ref = search_cells.NAS201SearchCell(4, 4, 1, 4, NAS_BENCH_201).double()
    cell = copy.deepcopy(ref)
    patch(cell)
    for seed in range(3):
        x, probs, _, index = _gdas_inputs(ref, seed)
        outs, grads = [], []
        for m in (ref, cell):
            p = probs.detach().clone().requires_grad_(True)
            hard = torch.zeros_like(p).scatter_(-1, index, 1.0) - p.detach() + p
            out = m.forward_gdas(x, hard, index)
            out.sum().backward()
            outs.append(out.detach())
            grads.append(p.grad)
        torch.testing.assert_close(outs[1], outs[0], **TOL64)
        torch.testing.assert_close(grads[1], grads[0], **TOL64)
        # An edge into the last node passes the output gradient's sum to every weight it did not sample.
        for j in range(3):
            row = ref.edge2index[f"3<-{j}"]
            unsampled = [k for k in range(len(NAS_BENCH_201)) if k != index[row].item()]
            assert torch.equal(grads[1][row, unsampled], torch.full((4,), float(outs[1].numel()), dtype=torch.float64))
    for (name, a), b in zip(ref.named_buffers(), cell.buffers()):
        torch.testing.assert_close(b, a, **TOL64, msg=name)


class HardSampleMixedOp(renamed.MixedOp):
    """A mixed op with AutoDL's hard-sample sum as a method of its own."""

    def forward_gdas(self, x, weights, index):
        return sum(weights[i] * op(x) if i == index else weights[i] for i, op in enumerate(self.ops))


def test_a_mixed_op_hard_sample_sum_is_replaced_and_equal():
    torch.manual_seed(0)
    ref = HardSampleMixedOp(4, 2).double()
    op = copy.deepcopy(ref)
    report = patch(op)
    assert dict(report.patched[0].methods) == {"forward": "sum", "forward_gdas": "gdas-sum"}
    g = torch.Generator().manual_seed(3)
    for index in (0, 3, torch.tensor(5), 7):
        x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
        w = torch.randn(8, generator=g, dtype=torch.float64).softmax(0)
        runs = []
        for m in (ref, op):
            xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = m.forward_gdas(xi, wi, index)
            out.backward(torch.ones_like(out))
            runs.append((out.detach(), xi.grad, wi.grad))
        for a, b in zip(*runs):
            torch.testing.assert_close(b, a, **TOL64)
    # An index the replacement does not take (a float) goes to the original.
    torch.testing.assert_close(op.forward_gdas(x, w, 1.0), ref.forward_gdas(x, w, 1.0), **TOL64)
    for (name, a), b in zip(ref.named_buffers(), op.buffers()):
        torch.testing.assert_close(b, a, **TOL64, msg=name)


def test_gdas_calls_the_replacement_cannot_take_run_the_original_way():
    torch.manual_seed(0)
    ref = search_cells.NAS201SearchCell(4, 4, 1, 3, NAS_BENCH_201).double()
    cell = copy.deepcopy(ref)
    patch(cell)
    x, _, hard, index = _gdas_inputs(ref, 0)
    # Two entries per edge: .item() fails in the original too; the same error comes back.
    with pytest.raises(RuntimeError, match="a Tensor with 2 elements cannot be converted to Scalar"):
        cell.forward_gdas(x, hard, torch.cat([index, index], 1))
    # Keyword arguments and a float index go to the original.
    torch.testing.assert_close(cell.forward_gdas(x, hardwts=hard, index=index), ref.forward_gdas(x, hard, index))
    torch.testing.assert_close(cell.forward(x, weightss=hard), ref.forward(x, hard))


# --- copies, replicas, unpatch ------------------------------------------------------


def test_copies_and_replicas_of_patched_cells_and_methods_run_their_own_modules():
    for style in ("nb201-cell-gdas", "nasnet-forward_darts", "ops-list"):
        model = _build(style)
        patch(model)
        patched = [m for m in model.modules() if "_fastnas_patch" in m.__dict__]
        x, _ = _batch(0, dtype=torch.float32)
        torch.manual_seed(0)
        expected = _logits(model(x))
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            mods = [m for m in clone.modules() if "_fastnas_patch" in m.__dict__]
            assert len(mods) == len(patched)
            for m in mods:
                names = [name for name, _ in m._fastnas_patch.methods]
                assert all(getattr(m, name).module is m for name in names)
            torch.manual_seed(0)
            torch.testing.assert_close(_logits(clone(x)), expected, **TOL)
        m = patched[0]
        replica = m._replicate_for_data_parallel()
        names = [name for name, _ in m._fastnas_patch.methods]
        assert all(getattr(replica, n).module is replica and getattr(m, n).module is m for n in names)
        # The replica binds its own tensors, never the original's.
        assert "_fastnas_bound" not in replica.__dict__
        assert ("_fastnas_bound" in m.__dict__) == (style == "ops-list" and FUSED_CPU)


def test_unpatch_and_accelerate_restore_the_cells():
    model = _build("nb201-cell")
    before = [dict(m.__dict__) for m in model.modules()]
    with accelerate(model) as report:
        assert len(report.patched) == 3
        assert all("forward_gdas" in c.__dict__ for c in model.cells if hasattr(c, "edges"))
    after = [dict(m.__dict__) for m in model.modules()]
    assert [d.keys() for d in after] == [d.keys() for d in before]
    patch(model)
    assert len(unpatch(model)) == 3
    assert [dict(m.__dict__).keys() for m in model.modules()] == [d.keys() for d in before]
    again = patch(model)
    assert len(again.patched) == 3 and not patch(model).patched
