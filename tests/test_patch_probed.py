"""fastnas.patch on search code it recognises by what it computes, not by its names.

PC-DARTS' ImageNet search writes its channel proportion into the mixed op's forward
(``x[:, :dim_2//2]``) instead of keeping it on the module, and searches that prune
candidates skip those weighted exactly zero (``if w == 0: continue``). Each is read
by running the module's own forward on a float64 probe, and patched only when the
replacement then computes the same: the patched networks train like the originals.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from fastnas.patch import PatchWarning, patch
from tests.darts_fixture import model_search, model_search_nonzero, model_search_pc_imagenet
from tests.darts_fixture.operations import OPS

pytestmark = pytest.mark.usefixtures("one_thread")

TOL64 = dict(rtol=1e-7, atol=1e-9)


def _float64(model):
    model.double()
    for a in model.arch_parameters():
        a.data = a.data.double()
    return model


def _pruned(mixed_op):
    torch.manual_seed(0)
    model = model_search_nonzero.Network(4, 10, 3, nn.CrossEntropyLoss(), mixed_op=mixed_op)
    # Some edges lose a convolution, a pool or the identity; one keeps only two candidates.
    model.prune(normal=[(0, 4), (1, 3), (2, 1), (5, 6), (5, 7)], reduce=[(0, 5), (3, 2), (4, 4)])
    model.prune(normal=[(9, k) for k in range(8) if k not in (3, 4)], reduce=[])
    return _float64(model)


def _imagenet():
    torch.manual_seed(0)
    return _float64(model_search_pc_imagenet.Network(8, 10, 3, nn.CrossEntropyLoss()))


def _patched(model):
    fast = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchWarning)
        report = patch(fast)
    assert report.patched and not report.skipped and not report.methods_left
    return fast, report


def _train_alike(ref, fast, size, steps=2):
    """Two SGD steps of each from the same state on the same batches: logits, loss,
    every gradient (the architecture's too) and the batch-norm buffers agree in float64."""
    opts = [torch.optim.SGD(list(m.parameters()) + m.arch_parameters(), lr=0.05) for m in (ref, fast)]
    for model in (ref, fast):
        model.train()
    for i in range(steps):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(4, 3, size, size, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (4,), generator=g)
        seen = []
        for model, opt in zip((ref, fast), opts):
            opt.zero_grad()
            logits = model(x)
            loss = model._criterion(logits, y)
            loss.backward()
            # Candidates that never ran (pruned ones) have no gradient, in both.
            grads = [p.grad for p in list(model.parameters()) + model.arch_parameters()]
            seen.append((logits.detach(), loss.detach(), grads))
            opt.step()
        (l_ref, loss_ref, g_ref), (l_fast, loss_fast, g_fast) = seen
        torch.testing.assert_close(l_fast, l_ref, **TOL64)
        torch.testing.assert_close(loss_fast, loss_ref, **TOL64)
        assert [a is None for a in g_ref] == [b is None for b in g_fast]
        for k, (a, b) in enumerate(zip(g_ref, g_fast)):
            if a is not None:
                torch.testing.assert_close(b, a, **TOL64, msg=lambda m, k=k: f"gradient {k}: {m}")
    for (name, a), (_, b) in zip(ref.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b, a, **TOL64, msg=lambda m, n=name: f"buffer {n}: {m}")
    ref.eval(), fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), **TOL64)


def test_pc_darts_imagenet_proportion_written_in_forward_is_read_by_probing():
    ref = _imagenet()
    fast, report = _patched(ref)
    assert {op.style for op in report.patched} == {"pc-darts"}
    assert {op.methods for op in report.patched} == {(("forward", "sum"),)}
    assert {op.notes for op in report.patched} == {("channel proportion 1/2 read by probing",)}
    assert "channel proportion 1/2 read by probing" in str(report)
    # The ImageNet stem divides the input by 8 before the first cell.
    _train_alike(ref, fast, size=32)


def test_pc_darts_proportion_no_probe_matches_is_left_unchanged_with_the_proportions_tried():
    class ThirdMixedOp(model_search_pc_imagenet.MixedOp):
        def __init__(self, C, stride):
            nn.Module.__init__(self)
            self._ops = nn.ModuleList([OPS[p](C // 3, stride, False) for p in ("skip_connect", "sep_conv_3x3")])
            self.mp = nn.MaxPool2d(2, 2)

        def forward(self, x, weights):
            part, bypass = x[:, : x.shape[1] // 3], x[:, x.shape[1] // 3 :]
            mixed = sum(w * op(part) for w, op in zip(weights, self._ops))
            return model_search_pc_imagenet.channel_shuffle(torch.cat([mixed, bypass], dim=1), 3)

    with pytest.warns(PatchWarning, match=r"each channel proportion tried \(1/4, 1/2, 1/8\)"):
        report = patch(nn.ModuleList([ThirdMixedOp(6, 1)]))
    assert not report.patched and len(report.skipped) == 1


@pytest.mark.parametrize("mixed_op", [model_search_nonzero.MixedOp, model_search_nonzero.GeneratorMixedOp])
def test_mixed_op_skipping_zero_weights_runs_only_the_others(mixed_op):
    ref = _pruned(mixed_op)
    fast, report = _patched(ref)
    assert {op.methods for op in report.patched} == {(("forward", "nonzero-sum"),)}
    assert "forward (nonzero-sum)" in str(report)
    _train_alike(ref, fast, size=8)


def test_a_sum_that_runs_zero_weighted_candidates_stays_the_plain_sum():
    """The float64 probe with some weights exactly 0 tells the two apart: DARTS' own sum
    runs every candidate, so its replacement does too."""
    torch.manual_seed(0)
    _, report = _patched(_float64(model_search.Network(4, 10, 3, nn.CrossEntropyLoss())))
    assert {op.methods for op in report.patched} == {(("forward", "sum"),)}
