"""The searchers: backends agree, genotypes are valid, resume is exact, errors are clear."""

import contextlib
import io
import json
import os

import pytest
import torch
import torch.nn.functional as F
from search_helpers import assert_state_close, interrupt_at, losses, run, strip_times, tiny_config, tiny_dataset

from fastnas.run import checkpoint as ckpt
from fastnas.run.data import EpochShardSampler, split_indices
from fastnas.search import (
    CheckpointError,
    NonFiniteLossError,
    OutOfMemoryError,
    SearchConfig,
    Searcher,
    SearchError,
    build_supernet,
    prune_candidates,
)
from fastnas.search.architect import UnrolledArchGrad, first_order_arch_grads
from fastnas.spaces import NB201Arch, validate_genotype

METHODS = ["darts", "darts-2nd", "pc-darts", "p-darts", "gdas"]


pytestmark = pytest.mark.usefixtures("one_thread")


# --- configuration ------------------------------------------------------------------


def test_method_defaults_follow_the_papers():
    darts = SearchConfig.create("darts", dataset="cifar10")
    assert (darts.batch_size, darts.epochs, darts.lr, darts.lr_min, darts.arch_lr) == (64, 50, 0.025, 0.001, 3e-4)
    assert (darts.momentum, darts.weight_decay, darts.arch_weight_decay, darts.grad_clip) == (0.9, 3e-4, 1e-3, 5.0)
    assert darts.arch_betas == (0.5, 0.999) and darts.train_portion == 0.5 and not darts.unrolled
    assert SearchConfig.create("darts-2nd", dataset="cifar10").unrolled
    pc = SearchConfig.create("pc-darts", dataset="cifar10")
    assert (pc.batch_size, pc.lr, pc.arch_lr, pc.partial_channels, pc.warmup_epochs) == (256, 0.1, 6e-4, 4, 15)
    assert pc.edge_normalization
    assert SearchConfig.create("pc-darts", dataset="imagenet").partial_channels == 2
    pd = SearchConfig.create("p-darts", dataset="cifar10")
    assert [s["layers"] for s in pd.stages()] == [5, 11, 17]
    assert [s["epochs"] for s in pd.stages()] == [25, 25, 25]
    assert [s["warmup"] for s in pd.stages()] == [10, 10, 10]
    assert pd.stage_keep == (5, 3) and pd.max_skip_connect == 2
    gdas = SearchConfig.create("gdas", dataset="cifar10")
    assert (gdas.tau_max, gdas.tau_min) == (10.0, 0.1)
    # Shorter runs scale the warm-ups.
    assert SearchConfig.create("pc-darts", dataset="cifar10", epochs=10).warmup_epochs == 3
    assert [s["warmup"] for s in SearchConfig.create("p-darts", dataset="cifar10", epochs=15).stages()] == [2, 2, 2]


def test_config_errors_name_the_problem():
    with pytest.raises(SearchError, match="unknown search method 'foo'"):
        SearchConfig.create("foo")
    with pytest.raises(SearchError, match="unknown dataset"):
        SearchConfig.create("darts", dataset="mnist")
    with pytest.raises(SearchError, match="DARTS space only"):
        SearchConfig.create("pc-darts", space="nb201")
    with pytest.raises(SearchError, match="amp"):
        SearchConfig.create("darts", amp="fp8")


def test_split_and_epoch_order_depend_only_on_seed_and_epoch():
    train, val = split_indices(10, 0.5, seed=3)
    assert sorted(train + val) == list(range(10)) and len(train) == 5
    a = list(EpochShardSampler(range(10), seed=1, epoch=2))
    assert a == list(EpochShardSampler(range(10), seed=1, epoch=2))
    assert a != list(EpochShardSampler(range(10), seed=1, epoch=3))
    shards = [list(EpochShardSampler(range(9), seed=1, epoch=0, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(shards[0] + shards[1]) == set(range(9))


# --- the searchers ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_auto_backend_matches_reference(method, fused_edge_calls):
    """A few steps with the automatic backend and with the eager reference agree."""
    ref, ref_net = run(tiny_config(method, backend="reference"))
    assert not fused_edge_calls
    auto, auto_net = run(tiny_config(method))
    # GDAS runs one sampled candidate per edge: the candidate modules, never the whole edge.
    assert bool(fused_edge_calls) == (method != "gdas")
    assert len(ref.history) == tiny_config(method).epochs
    for (a_train, a_val), (r_train, r_val) in zip(losses(auto.history), losses(ref.history)):
        assert a_train == pytest.approx(r_train, rel=1e-5, abs=1e-6)
        assert a_val == pytest.approx(r_val, rel=1e-5, abs=1e-6)
    # GDAS takes its architecture gradient after the weight step, at weights that differ by
    # rounding: gradients of ~1e-9 (below float32's resolution of the row's 0.1 entries)
    # differ, and Adam's first steps (lr * g / (|g| + 1e-8)) turn them into ~1e-6.
    atol = 1e-5 if method == "gdas" else 1e-6
    for a, r in zip(auto_net.arch_parameters(), ref_net.arch_parameters()):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=atol)
    assert_state_close(auto_net.state_dict(), ref_net.state_dict(), atol=atol)
    validate_genotype(auto.genotype)
    assert auto.genotype == ref.genotype
    record = auto.history[-1]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "arch_weights", "entropy", "genotype", "lr"):
        assert key in record


def test_architecture_learns_only_after_warmup():
    result, _ = run(tiny_config("pc-darts", epochs=2, warmup_epochs=1))
    assert [h["arch_trained"] for h in result.history] == [False, True]
    first, second = (h["arch_weights"]["normal"] for h in result.history)
    assert first != second


def test_pdarts_stages_prune_candidates_and_cap_skips():
    result, net = run(tiny_config("p-darts"))
    assert [h["layers"] for h in result.history] == [3, 3, 3]
    assert [h["stage"] for h in result.history] == [0, 1, 2]
    # 8 candidates in stage 1, 5 in stage 2, 3 in stage 3.
    assert all(len(c) == 3 for cell in net.edge_candidates().values() for c in cell)
    assert sum(op == "skip_connect" for op, _ in result.genotype.normal) <= 2
    assert all(0.0 <= h["skip_drop_prob"] < 1 for h in result.history)


def test_prune_candidates_keeps_the_strongest():
    net = build_supernet(tiny_config("darts"), 4, 3, 3)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, 4] = 5.0  # sep_conv_3x3
        net.alphas_normal[:, 0] = 4.0  # none
        net.alphas_normal[:, 3] = 3.0  # skip_connect
    pruned = prune_candidates(net, 3)
    assert all(names == ["none", "skip_connect", "sep_conv_3x3"] for names in pruned["normal"])
    assert all(len(names) == 3 for names in pruned["reduce"])


def test_gdas_anneals_temperature():
    result, net = run(tiny_config("gdas", epochs=2))
    assert [h["tau"] for h in result.history] == [10.0, pytest.approx(0.1)]
    assert net.sampling == "gumbel"


def test_gdas_on_nb201_space():
    result, _ = run(tiny_config("gdas", space="nb201", epochs=1))
    assert isinstance(result.genotype, NB201Arch)
    assert NB201Arch.from_string(result.genotype_dict["arch"]) == result.genotype


# --- architecture gradients ---------------------------------------------------------------


def _tiny_net_and_batches():
    torch.manual_seed(0)
    # The eager reference: the exact gradient below differentiates twice.
    net = build_supernet(tiny_config("darts", backend="reference"), 4, 3, 3).double()
    g = torch.Generator().manual_seed(1)
    xt, xv = (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    yt, yv = (torch.randint(0, 4, (6,), generator=g) for _ in range(2))
    return net, xt, yt, xv, yv


def _exact_unrolled_grad(net, xt, yt, xv, yv, lr, momentum, wd, opt):
    """d/dalpha L_val(w - lr * (dL_train/dw + m * buf + wd * w), alpha), by double backward."""
    from torch.func import functional_call

    unrolled = UnrolledArchGrad(net)
    buffers = {n: b.clone() for n, b in net.named_buffers()}

    def loss(ws, x, y):
        params = dict(zip(unrolled.weight_names, ws))
        params.update(zip(unrolled.arch_names, unrolled.arch))
        return F.cross_entropy(functional_call(net, (params, buffers), (x,)), y)

    grads = torch.autograd.grad(loss(unrolled.weights, xt, yt), unrolled.weights, create_graph=True, allow_unused=True)
    virtual = []
    for w, g in zip(unrolled.weights, grads):
        g = torch.zeros_like(w) if g is None else g
        buf = opt.state[w]["momentum_buffer"]
        virtual.append(w - lr * (g + momentum * buf + wd * w))
    return torch.autograd.grad(loss(virtual, xv, yv), unrolled.arch)


def test_unrolled_gradient_matches_exact_second_order():
    net, xt, yt, xv, yv = _tiny_net_and_batches()
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9)
    for p in net.weight_parameters():
        opt.state[p]["momentum_buffer"] = torch.randn_like(p) * 0.01
    lr, momentum, wd = 0.1, 0.9, 3e-4
    assert UnrolledArchGrad(net).fd_radius == 0.01
    # DARTS' radius 0.01 crosses ReLU and max-pool kinks of this tiny random
    # network; a small radius in fp64 checks the formula itself.
    unrolled = UnrolledArchGrad(net, fd_radius=1e-6)
    grads, _, _ = unrolled(xt, yt, xv, yv, lr, momentum, wd, opt, contextlib.nullcontext)
    exact = _exact_unrolled_grad(net, xt, yt, xv, yv, lr, momentum, wd, opt)
    for g, e in zip(grads, exact):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_unrolled_with_zero_step_is_first_order():
    net, xt, yt, xv, yv = _tiny_net_and_batches()
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9)
    grads, _, _ = UnrolledArchGrad(net)(xt, yt, xv, yv, 0.0, 0.9, 0.0, opt, contextlib.nullcontext)
    first, _, _ = first_order_arch_grads(net, net.arch_parameters(), xv, yv, contextlib.nullcontext)
    for g, f in zip(grads, first):
        torch.testing.assert_close(g, f, rtol=1e-10, atol=1e-12)


def test_unrolled_step_keeps_model_and_statistics():
    net, xt, yt, xv, yv = _tiny_net_and_batches()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9)
    UnrolledArchGrad(net)(xt, yt, xv, yv, 0.1, 0.9, 3e-4, opt, contextlib.nullcontext)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())


# --- checkpoints and resume ------------------------------------------------------------


@pytest.mark.parametrize(
    "method, epochs, stop",
    [("darts", 2, 1), ("p-darts", 3, 1), ("gdas", 2, 1)],
)
def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch, method, epochs, stop):
    config = tiny_config(method, epochs=epochs)
    full, full_net = run(config, str(tmp_path / "full"))

    out = str(tmp_path / "cut")
    with monkeypatch.context() as m:
        interrupt_at(m, stop)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_config(method, epochs=epochs), out)
    state = ckpt.load_checkpoint(out)
    assert len(state["history"]) == stop
    with open(os.path.join(out, "log.jsonl")) as f:
        assert len(f.readlines()) == stop

    searcher = Searcher.resume(out, dataset=tiny_dataset(), progress=False)
    resumed = searcher.run()
    assert strip_times(resumed.history) == strip_times(full.history)
    resumed_state = searcher.net.state_dict()
    for k, v in full_net.state_dict().items():
        assert torch.equal(v, resumed_state[k]), k
    assert resumed.genotype_dict == full.genotype_dict
    with open(os.path.join(out, "log.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == list(range(1, epochs + 1))
    for name in ("genotype.json", "cells.png", "log.jsonl", "checkpoint.pt"):
        assert os.path.exists(os.path.join(out, name))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    original = Searcher._weight_step
    calls = {"n": 0}

    def weight_step(self, *args):
        loss, logits = original(self, *args)
        calls["n"] += 1
        # Epoch 1 has two steps; poison the first step of epoch 2.
        return (loss * float("nan"), logits) if calls["n"] == 3 else (loss, logits)

    monkeypatch.setattr(Searcher, "_weight_step", weight_step)
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 1"):
        run(tiny_config("darts", epochs=2), out)
    state = ckpt.load_checkpoint(out)
    assert state["stage_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_corrupt_and_mismatched_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(str(tmp_path))
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        Searcher.resume(str(tmp_path))

    out = str(tmp_path / "run")
    run(tiny_config("darts"), out)
    path = os.path.join(out, "checkpoint.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        Searcher.resume(out)

    open(path, "wb").write(data)
    with pytest.raises(CheckpointError, match="method='darts'"):
        Searcher.resume(out, {"method": "gdas"})
    torch.save({"weights": 1}, path)
    with pytest.raises(CheckpointError, match="not a fastnas search checkpoint"):
        Searcher.resume(out)

    # A checkpoint whose network does not fit its settings.
    state = torch.load(io.BytesIO(data), weights_only=True)
    state["model"].pop("alphas_normal")
    ckpt.save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    with pytest.raises(CheckpointError, match="does not fit"):
        Searcher.resume(out, dataset=tiny_dataset(), progress=False).run()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "f.txt")
    ckpt.atomic_write_text(path, "good")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(path, failing)
    assert open(path).read() == "good"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_bf16_autocast_runs():
    result, net = run(tiny_config("darts", amp="bf16"))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    validate_genotype(result.genotype)


def test_out_of_memory_becomes_a_clear_error(monkeypatch):
    def epoch(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Searcher, "_epoch", epoch)
    with pytest.raises(OutOfMemoryError, match="smaller --batch-size.*--amp bf16.*partial channels"):
        run(tiny_config("darts"))


def test_unavailable_backend_is_a_clear_error():
    # CUDA kernels never serve CPU tensors, whatever was built.
    with pytest.raises(SearchError, match="--backend cuda"):
        run(tiny_config("darts", backend="cuda"))


@pytest.mark.parametrize("memory", ["recompute", "checkpoint"])
def test_second_order_darts_with_recomputation_matches_eager(memory):
    """Second-order DARTS runs the network under torch.func.functional_call with
    unrolled and shifted weights: whatever is recomputed in backward must see
    those weights, not the module's own."""
    ref, ref_net = run(tiny_config("darts-2nd", backend="reference"))
    got, got_net = run(tiny_config("darts-2nd", memory=memory))
    for a, r in zip(got_net.arch_parameters(), ref_net.arch_parameters()):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert_state_close(got_net.state_dict(), ref_net.state_dict())
