"""--cuda-graph: the search step captured as a CUDA graph and replayed.

CPU tests: the flag is parsed, stored in the config and the checkpoint, and
refused with a reason where capture cannot work. GPU tests (requires_cuda):
the graphed step gives the eager step's losses, weights and architecture
parameters on the same batches, captures again after a learning-rate change,
runs an odd-sized batch eagerly, keeps the NaN check, resumes across modes,
and runs end to end from the command line. Each GPU assertion names the step
and the tensor that differ, and by how much.
"""

import argparse
import contextlib
import importlib
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from search_helpers import INFO, search, tiny_config, tiny_dataset

from fastnas import backends, bench
from fastnas.cli import build_parser, main
from fastnas.run import checkpoint as ckpt
from fastnas.search import NonFiniteLossError, SearchConfig, Searcher, SearchError, build_supernet, cuda_graph
from fastnas.search.architect import first_order_arch_grads
from fastnas.search.cuda_graph import (
    CUDAGraphError,
    GraphedStep,
    check_runtime_supported,
    hyperparameters,
    set_capturable,
)

# C=4, 3 cells, 10% of the digits: four steps of 16 images.
SMALL = ["--epochs", "1", "--layers", "3", "--init-channels", "4", "--batch-size", "16", "--fraction", "0.1",
         "--no-progress"]  # fmt: skip


@pytest.fixture(autouse=True)
def keep_threads():
    old = torch.get_num_threads()
    if not torch.cuda.is_available():
        # Thousands of tiny ops per step: a second thread only adds waiting on a shared CPU.
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- CPU: the flag, the config, the checkpoint, the refusals ---------------------------


def test_search_flag_is_parsed():
    parser = build_parser()
    assert parser.parse_args(["search", "--cuda-graph"]).cuda_graph is True
    assert parser.parse_args(["search", "--no-cuda-graph"]).cuda_graph is False
    # Absent: None, so that --resume keeps the checkpoint's setting.
    assert parser.parse_args(["search"]).cuda_graph is None


def test_bench_step_flag_is_parsed():
    parser = bench.add_bench_step_args(argparse.ArgumentParser())
    assert parser.parse_args(["--cuda-graph"]).cuda_graph is True
    assert parser.parse_args([]).cuda_graph is False


def test_flag_is_stored_in_config_and_checkpoint_dict(tmp_path):
    config = tiny_config(device="cuda", cuda_graph=True)
    assert config.cuda_graph is True
    values = config.to_dict()
    assert values["cuda_graph"] is True
    assert SearchConfig.from_dict(values).cuda_graph is True
    # The checkpoint holds the config as plain data, loadable with weights_only.
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_checkpoint(path, {"config": values})
    assert ckpt.load_checkpoint(path)["config"]["cuda_graph"] is True
    # Not given: None, capture wherever it works.
    assert SearchConfig.create("darts").cuda_graph is None


def test_cpu_is_refused_with_the_reason():
    with pytest.raises(CUDAGraphError, match=r"needs a CUDA device \(--device cuda\)"):
        tiny_config(cuda_graph=True)
    assert issubclass(CUDAGraphError, SearchError)
    with pytest.raises(CUDAGraphError, match="needs a CUDA device"):
        check_runtime_supported(torch.device("cpu"))


@pytest.mark.parametrize(
    "method, overrides, reason",
    [
        ("gdas", {}, "GDAS samples"),
        ("darts", {"amp": "fp16"}, "GradScaler"),
        ("darts", {"memory": "checkpoint"}, "--memory checkpoint"),
        ("darts", {"world_size": 2}, "DDP"),
    ],
)
def test_unsupported_settings_are_refused_with_the_reason(method, overrides, reason):
    with pytest.raises(CUDAGraphError, match=reason):
        tiny_config(method, device="cuda", cuda_graph=True, **overrides)


def test_supported_settings_pass_the_config_checks():
    for method in ("darts", "pc-darts", "darts-2nd"):
        tiny_config(method, device="cuda", cuda_graph=True)
    tiny_config("p-darts", device="cuda", cuda_graph=True, epochs=3, stage_layers=(3, 3, 3))
    tiny_config("darts", device="cuda", cuda_graph=True, unrolled=True)
    tiny_config("darts", device="cuda", cuda_graph=True, amp="bf16")
    tiny_config("darts", device="cuda", cuda_graph=True, memory="recompute")
    tiny_config("darts", space="nb201", device="cuda", cuda_graph=True)


@pytest.mark.parametrize(
    "config, device, world_size, expected",
    [
        (dict(), "cpu", 1, (False, None)),
        (dict(device="cuda"), "cuda", 1, (True, None)),
        (dict(device="cuda", memory="recompute"), "cuda", 1, (True, None)),
        (dict(device="cuda", cuda_graph=False), "cuda", 1, (False, None)),
        (dict(device="cuda", amp="fp16"), "cuda", 1, (False, "GradScaler")),
        (dict(device="cuda", memory="checkpoint"), "cuda", 1, (False, "--memory checkpoint")),
        (dict(device="cuda"), "cuda", 2, (False, "several processes")),
    ],
)
def test_capture_is_the_default_on_cuda_wherever_it_works(config, device, world_size, expected):
    capture, why_not = cuda_graph.decide(tiny_config(**config), torch.device(device), world_size)
    assert capture is expected[0]
    assert (why_not is None) if expected[1] is None else (expected[1] in why_not)
    capture, why_not = cuda_graph.decide(tiny_config("gdas", device="cuda"), torch.device("cuda"), 1)
    assert not capture and "GDAS samples" in why_not


def test_a_search_that_cannot_capture_by_default_says_why_in_one_line(monkeypatch, capsys):
    from fastnas.search import searcher as searcher_module

    monkeypatch.setattr(searcher_module.cuda_graph, "decide", lambda *a: (False, "a reason that names the setting"))
    searcher = Searcher(tiny_config(), dataset=tiny_dataset(), progress=False)
    searcher.run()
    out = capsys.readouterr().out.splitlines()
    assert out == ["fastnas search: the step runs without a CUDA graph: a reason that names the setting"]
    assert searcher.cuda_graph is False


def test_resume_with_cuda_graph_on_cpu_is_refused(tmp_path):
    out = str(tmp_path / "run")
    search(tiny_config(), out)
    assert ckpt.load_checkpoint(out)["config"]["cuda_graph"] is None
    with pytest.raises(CUDAGraphError, match="needs a CUDA device"):
        Searcher.resume(out, {"cuda_graph": True}, dataset=tiny_dataset(), progress=False)


def test_graphed_step_refuses_cpu_tensors():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(CUDAGraphError, match="CUDA device"):
        GraphedStep(lambda x: net(x).sum(), [torch.randn(4, 3)], modules=[net])


def test_hyperparameters_see_a_learning_rate_change():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    before = hyperparameters([opt])
    assert hyperparameters([opt]) == before
    opt.param_groups[0]["lr"] = 0.05
    assert hyperparameters([opt]) != before


def test_set_capturable_moves_adam_state_both_ways():
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.Adam([p], lr=1e-2)
    p.grad = torch.randn(5)
    opt.step()
    state = opt.state_dict()
    other = torch.optim.Adam([p], lr=1e-2, capturable=True)
    other.load_state_dict(state)
    set_capturable(other, True)
    assert other.param_groups[0]["capturable"] is True
    assert other.state[p]["step"].dtype == torch.float32 and float(other.state[p]["step"]) == 1.0
    set_capturable(other, False)
    assert other.param_groups[0]["capturable"] is False and other.state[p]["step"].device.type == "cpu"
    other.step()  # A non-capturable Adam on the CPU steps as before.
    assert float(other.state[p]["step"]) == 2.0


def test_cli_search_cuda_graph_on_cpu_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", *SMALL, "--cuda-graph", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--cuda-graph" in err and "--device cuda" in err and "Traceback" not in err
    assert not (out / "checkpoint.pt").exists()


def test_cli_bench_step_cuda_graph_on_cpu_is_a_clear_error(capsys):
    args = "--channels 4 --layers 2 --batch-size 2 --image-size 8 --reps 1 --warmup 0 --device cpu --cuda-graph"
    assert main(["bench-step", *args.split()]) == 1
    err = capsys.readouterr().err
    assert "--cuda-graph needs a CUDA device" in err


# --- CPU: GraphedStep's bookkeeping with a stand-in graph ------------------------------
#
# A CUDAGraph cannot be made without a GPU. The stand-in "captures" by running
# the step and then undoing it (a real capture runs no kernels), and "replays"
# by running the step again on the static inputs. That checks, wherever the
# tests run, what does not depend on CUDA: warm-up steps leave no trace, optimizer
# state starts fresh, a learning-rate change captures again, an odd batch runs
# eagerly, and the searcher reads, checks and checkpoints the replayed step.


class _StandInGraph:
    def __init__(self):
        self.run = None

    def replay(self):
        self.run()


class _StandInGraphedStep(GraphedStep):
    def _device(self, example_inputs, modules):
        return torch.device("cpu")

    def capture(self):
        _StandInCapture.owner = self
        super().capture()
        outs = self.static_outputs

        def run():
            for out, new in zip(outs, cuda_graph._outputs(self.fn(*self.static_inputs))):
                out.copy_(new)

        self.graph.run = run


class _StandInCapture:
    owner = None

    def __init__(self, graph, **kwargs):
        self.graph = graph

    def __enter__(self):
        # A real capture runs no kernels and draws no random numbers from the generator.
        self.state = self.owner._snapshot()
        self.rng = torch.get_rng_state()

    def __exit__(self, *exc):
        self.owner._restore(self.state)
        torch.set_rng_state(self.rng)


class _StandInStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


@pytest.fixture
def stand_in_graphs(monkeypatch):
    """GraphedStep on the CPU with the stand-in graph; capturable Adam allowed on the CPU."""
    from fastnas.search import searcher

    adam = importlib.import_module("torch.optim.adam")
    if not hasattr(adam, "_get_capturable_supported_devices"):
        pytest.skip("this torch decides capturable devices differently")
    monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda *a, **k: ["cuda", "cpu"])
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph", _StandInCapture)
    monkeypatch.setattr(torch.cuda, "Stream", _StandInStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _StandInStream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: torch.get_rng_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, *a: torch.set_rng_state(state))
    monkeypatch.setattr(cuda_graph, "_sync_errors", lambda enabled: contextlib.nullcontext())
    monkeypatch.setattr(cuda_graph, "check_search_supported", lambda config: None)
    monkeypatch.setattr(searcher, "check_runtime_supported", lambda *a, **k: None)
    monkeypatch.setattr(searcher, "GraphedStep", _StandInGraphedStep)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a: self)
    monkeypatch.setattr(sys.modules[__name__], "GraphedStep", _StandInGraphedStep)


@pytest.mark.slow
def test_stand_in_graphed_step_matches_eager(stand_in_graphs, monkeypatch):
    # PC-DARTS runs through the stand-in in the searcher test below.
    test_graphed_step_matches_eager_and_recaptures_after_lr_change("darts", "reference", monkeypatch)


@pytest.mark.slow
def test_stand_in_graphed_search_matches_eager_search(stand_in_graphs):
    eager, eager_searcher = search(tiny_config("pc-darts", epochs=2, warmup_epochs=1))
    config = tiny_config("pc-darts", epochs=2, warmup_epochs=1)
    config.cuda_graph = True
    graphed, graph_searcher = search(config)
    _history_close(graphed.history, eager.history, "stand-in pc-darts")
    _assert_states_close(graph_searcher.net.state_dict(), eager_searcher.net.state_dict(), "stand-in final network")


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, overrides",
    [
        ("darts-2nd", {}),
        ("p-darts", {"epochs": 3, "stage_layers": (3, 3, 3), "warmup_epochs": 0}),
        ("pc-darts", {"memory": "recompute"}),
    ],
)
def test_stand_in_graphed_search_matches_eager_for_more_methods(stand_in_graphs, method, overrides):
    """Second order (its virtual step reads the momentum buffers the warm-up creates),
    P-DARTS (a capture per stage and epoch, skip dropout drawn on the device) and
    recompute take the graphed path and follow the eager search."""
    kw = {"epochs": 2, **overrides}
    eager, eager_searcher = search(tiny_config(method, **kw))
    config = tiny_config(method, **kw)
    config.cuda_graph = True
    graphed, graph_searcher = search(config)
    assert graph_searcher.cuda_graph is True
    _history_close(graphed.history, eager.history, f"stand-in {method}")
    _assert_states_close(graph_searcher.net.state_dict(), eager_searcher.net.state_dict(), f"stand-in {method}")


@pytest.mark.slow
def test_stand_in_graphed_search_nan_and_checkpoint(stand_in_graphs, tmp_path):
    config = tiny_config("darts")
    config.cuda_graph = True
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1"):
        search(config, dataset=tiny_dataset(poison=True))
    out = str(tmp_path / "run")
    search(config, out)
    state = ckpt.load_checkpoint(out)
    assert state["config"]["cuda_graph"] is True and state["a_opt"]["param_groups"][0]["capturable"] is True
    assert all(float(s["step"]) == 2.0 for s in state["a_opt"]["state"].values())
    # Resumed without the graph, Adam is made non-capturable again.
    searcher = Searcher.resume(out, {"cuda_graph": False}, dataset=tiny_dataset(), progress=False)
    searcher.run()
    assert searcher.config.cuda_graph is False


# --- GPU: the graphed step against the eager one --------------------------------------

GPU_BACKENDS = ["reference", None] + (["triton"] if "triton" in backends.available_backends() else [])


def _backend_id(backend):
    return backend or "default"


def _describe_backend(backend) -> str:
    return f"backend {backend!r} -> {backends.resolve('darts_edge', 'cuda', backend)!r}"


# cuDNN may pick other algorithms inside a capture than outside: rounding-level
# differences, which grow a little over several optimiser steps.
def _assert_close(actual, expected, what, atol=1e-4, rtol=1e-3):
    """assert_close whose message says what differs and by how much."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} vs eager {tuple(expected.shape)}")
    diff = (actual.double().cpu() - expected.double().cpu()).abs()
    finite = torch.isfinite(actual).all() == torch.isfinite(expected).all()
    bad = diff > atol + rtol * expected.double().cpu().abs()
    if bad.any() or not finite:
        raise AssertionError(
            f"{what}: graphed differs from eager; max abs diff {float(diff.max()):.3g} "
            f"({int(bad.sum())} of {bad.numel()} elements beyond atol={atol} rtol={rtol}); "
            f"graphed finite: {bool(torch.isfinite(actual).all())}, "
            f"eager finite: {bool(torch.isfinite(expected).all())}"
        )


def _assert_states_close(actual: dict, expected: dict, where: str, **tol):
    assert actual.keys() == expected.keys(), f"{where}: state keys differ"
    for k in expected:
        if expected[k].is_floating_point():
            _assert_close(actual[k], expected[k], f"{where}: {k}", **tol)
        else:
            assert torch.equal(actual[k].cpu(), expected[k].cpu()), f"{where}: {k} {actual[k]} vs eager {expected[k]}"


def _net_and_optimizers(method, backend, capturable):
    config = tiny_config(method, backend=backend)
    torch.manual_seed(0)
    net = build_supernet(config, INFO["num_classes"], INFO["in_channels"], config.layers).cuda()
    w_opt = torch.optim.SGD(net.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=6e-4, betas=(0.5, 0.999), weight_decay=1e-3,
                             capturable=capturable)  # fmt: skip
    return net, w_opt, a_opt


def _search_step(net, w_opt, a_opt):
    """The searcher's first-order step, written out: arch step on (xv, yv), weight step on (xt, yt)."""

    def step(xt, yt, xv, yv):
        arch = net.arch_parameters()
        grads, val_loss, _ = first_order_arch_grads(net, arch, xv, yv, contextlib.nullcontext)
        a_opt.zero_grad(set_to_none=True)
        for p, g in zip(arch, grads):
            p.grad = g
        a_opt.step()
        w_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(xt), yt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.weight_parameters(), 5.0)
        w_opt.step()
        a_opt.zero_grad(set_to_none=True)
        return loss.detach(), val_loss

    return step


def _batches(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        xt, xv = torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)
        yt, yv = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
        out.append((xt, yt, xv, yv))
    return out


@pytest.mark.requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=_backend_id)
@pytest.mark.parametrize("method", ["darts", "pc-darts"])
def test_graphed_step_matches_eager_and_recaptures_after_lr_change(method, backend, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    where = f"{method}, {_describe_backend(backend)}"
    # Steps 0-1 at lr 0.025; 2-3 at lr 0.01 (a new capture); 4 an odd batch (eager); 5 a replay again.
    batches = _batches([8, 8, 8, 8, 6, 8])
    lr_change_at = 2

    eager_net, eager_w, eager_a = _net_and_optimizers(method, backend, capturable=False)
    eager_step = _search_step(eager_net, eager_w, eager_a)
    net, w_opt, a_opt = _net_and_optimizers(method, backend, capturable=True)
    _assert_states_close(net.state_dict(), eager_net.state_dict(), f"{where}: initial networks")
    graphed = GraphedStep(_search_step(net, w_opt, a_opt), batches[0], modules=[net], optimizers=[w_opt, a_opt])
    for i, batch in enumerate(batches):
        if i == lr_change_at:
            eager_w.param_groups[0]["lr"] = 0.01
            w_opt.param_groups[0]["lr"] = 0.01
        expected = [float(t) for t in eager_step(*(t.cuda() for t in batch))]
        got = [float(t) for t in graphed(*batch)]
        for name, a, b in zip(("train loss", "val loss"), got, expected):
            _assert_close(a, b, f"{where}: step {i} {name}")
        _assert_states_close(net.state_dict(), eager_net.state_dict(), f"{where}: after step {i}")
    assert graphed.captures == 2, (
        f"{where}: expected a capture at step 0 and one after the lr change, got {graphed.captures}"
    )
    assert graphed.eager_calls == 1, f"{where}: the 6-image batch should run eagerly, eager_calls={graphed.eager_calls}"
    for p, q in zip(a_opt.state.values(), eager_a.state.values()):
        _assert_close(p["exp_avg"], q["exp_avg"], f"{where}: Adam exp_avg")
        _assert_close(float(p["step"]), float(q["step"]), f"{where}: Adam step")
    for p, q in zip(w_opt.state.values(), eager_w.state.values()):
        _assert_close(p["momentum_buffer"], q["momentum_buffer"], f"{where}: SGD momentum")


def _history_close(graphed, eager, where):
    assert len(graphed) == len(eager), f"{where}: {len(graphed)} epochs vs eager {len(eager)}"
    for g, e in zip(graphed, eager):
        for key in ("lr", "train_loss", "train_acc", "search_val_loss", "search_val_acc", "val_loss", "val_acc"):
            if isinstance(e[key], float) and math.isnan(e[key]):
                assert math.isnan(g[key]), f"{where}: epoch {e['epoch']} {key}: {g[key]} vs eager nan"
            elif key.endswith("_acc"):
                # A rounding-level change of the logits can flip one prediction of a tiny batch.
                _assert_close(g[key], e[key], f"{where}: epoch {e['epoch']} {key}", atol=0.1)
            else:
                _assert_close(g[key], e[key], f"{where}: epoch {e['epoch']} {key}")
        for cell, weights in e["arch_weights"].items():
            _assert_close(torch.tensor(g["arch_weights"][cell]), torch.tensor(weights),
                          f"{where}: epoch {e['epoch']} arch weights {cell}")  # fmt: skip


@pytest.mark.requires_cuda
@pytest.mark.parametrize("backend", ["reference", None], ids=_backend_id)
@pytest.mark.parametrize(
    "method, overrides",
    [
        ("darts", {}),
        ("pc-darts", {"warmup_epochs": 1}),
        ("darts", {"memory": "recompute"}),
        ("darts-2nd", {}),
        ("p-darts", {"stage_layers": (3, 3, 3)}),
    ],
)
def test_graphed_search_matches_eager_search(method, overrides, backend):
    # Two epochs: the cosine schedule changes the lr, so epoch 2 is a new capture;
    # PC-DARTS' first epoch is a warm-up (no architecture step), a different graph;
    # P-DARTS takes three stages of one epoch, each a new network and capture.
    where = f"{method} {overrides}, {_describe_backend(backend)}"
    kw = {"epochs": 3 if method == "p-darts" else 2, "device": "cuda", "backend": backend, **overrides}
    eager, eager_searcher = search(tiny_config(method, cuda_graph=False, **kw))
    graphed, graph_searcher = search(tiny_config(method, cuda_graph=True, **kw))
    _history_close(graphed.history, eager.history, where)
    _assert_states_close(graph_searcher.net.state_dict(), eager_searcher.net.state_dict(), f"{where}: final network")
    assert graphed.genotype_dict == eager.genotype_dict, f"{where}: genotypes differ"


@pytest.mark.requires_cuda
def test_graphed_search_with_bf16_autocast_runs():
    result, searcher = search(tiny_config("darts", epochs=2, device="cuda", amp="bf16", cuda_graph=True))
    bad = [n for n, p in searcher.net.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"non-finite parameters after a bf16 graphed search: {bad}"
    assert all(math.isfinite(h["train_loss"]) for h in result.history), result.history


@pytest.mark.requires_cuda
def test_graphed_search_nan_loss_is_a_clear_error(tmp_path):
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1"):
        search(tiny_config("darts", device="cuda", cuda_graph=True), str(tmp_path / "run"), tiny_dataset(poison=True))


@pytest.mark.requires_cuda
def test_resume_across_eager_and_graphed_runs(tmp_path, monkeypatch):
    """An eager checkpoint resumes with --cuda-graph, and a graphed one without it."""
    full, full_searcher = search(tiny_config("darts", epochs=3, device="cuda", cuda_graph=False))
    out = str(tmp_path / "run")
    original = Searcher._epoch
    calls = {"n": 0}

    def epoch(self, *args):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *args)

    with monkeypatch.context() as m:
        m.setattr(Searcher, "_epoch", epoch)
        with pytest.raises(KeyboardInterrupt):
            search(tiny_config("darts", epochs=3, device="cuda", cuda_graph=False), out)
    assert len(ckpt.load_checkpoint(out)["history"]) == 1

    # Epoch 2 with the graph (the checkpoint's Adam is not capturable), then stop again.
    calls["n"] = 0
    with monkeypatch.context() as m:
        m.setattr(Searcher, "_epoch", epoch)
        with pytest.raises(KeyboardInterrupt):
            Searcher.resume(out, {"cuda_graph": True}, dataset=tiny_dataset(), progress=False).run()
    state = ckpt.load_checkpoint(out)
    assert len(state["history"]) == 2 and state["config"]["cuda_graph"] is True
    steps = [s["step"] for s in state["a_opt"]["state"].values()]
    assert all(torch.is_tensor(s) and float(s) == 4.0 for s in steps), f"Adam steps after 2 epochs of 2 steps: {steps}"

    # Epoch 3 eagerly from the graphed checkpoint.
    searcher = Searcher.resume(out, {"cuda_graph": False}, dataset=tiny_dataset(), progress=False)
    resumed = searcher.run()
    _history_close(resumed.history, full.history, "eager -> graph -> eager resume")
    _assert_states_close(searcher.net.state_dict(), full_searcher.net.state_dict(), "resumed final network")


@pytest.mark.requires_cuda
def test_cli_search_cuda_graph_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["search", *SMALL, "--device", "cuda", "--cuda-graph", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, f"fastnas search --cuda-graph exited {code}: {captured.err[-2000:]}"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert math.isfinite(records[0]["train_loss"]), records[0]
    state = ckpt.load_checkpoint(str(out))
    assert state["config"]["cuda_graph"] is True
    assert main(["search", "--resume", str(out), "--no-progress"]) == 0


@pytest.mark.requires_cuda
def test_bench_step_reports_eager_and_graph(capsys):
    parser = bench.add_bench_step_args(argparse.ArgumentParser())
    args = parser.parse_args(
        "--network pc-darts --channels 4 --layers 2 --batch-size 4 --image-size 8 --reps 3 --warmup 1 "
        "--device cuda --cuda-graph --no-count-ops".split()
    )
    result = bench.run_bench_step(args)
    for key in ("step_ms_median", "graph_step_ms_median", "graph_capture_ms", "graph_speedup"):
        assert result[key] > 0, (key, result)
    assert math.isfinite(result["graph_loss"]), result
    assert '"graph_step_ms_median"' in capsys.readouterr().out
