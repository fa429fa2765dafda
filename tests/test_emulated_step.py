"""Whole search steps on the host emulation of the CUDA kernels (fastnas.bench.emulation).

With the emulated kernels as the fastnas ops' CPU kernels, a DARTS and a PC-DARTS
network run the CUDA code end to end, the whole-edge and node orchestration
included, and must give the CPU kernels' loss, gradients and running statistics;
the device launches that ``fastnas bench-step --emulate-launches`` prints are the
counter's. Built on first use (minutes), only when FASTNAS_CUDA_EMULATION=1, like
the emulated kernels' tests in tests/test_cuda_kernels.py.
"""

import argparse
import copy
import json

import pytest
import torch

from fastnas import backends, bench
from fastnas.bench.emulation import (
    LaunchCounter,
    count_launches,
    emulated_cpu,
    emulation_requested,
    foreach_launches,
    load_emulation,
)
from fastnas.spaces.darts import SearchNetwork

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def emu():
    if not emulation_requested():
        pytest.skip("set FASTNAS_CUDA_EMULATION=1 to run the CUDA kernels in the host emulation")
    if backends.extension() is None:
        pytest.skip("fastnas._C is not built: the emulated ops copy its schemas")
    return load_emulation()


def forward_backward(net, x, y):
    """The loss, every gradient and every buffer after one training forward and backward."""
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {n: b.clone() for n, b in net.named_buffers()}


@pytest.mark.parametrize("memory", ["save", "recompute"])
@pytest.mark.parametrize("partial_channels", [None, 4], ids=["darts", "pc-darts"])
def test_emulated_step_matches_cpu_kernels(emu, partial_channels, memory):
    torch.manual_seed(0)
    net = SearchNetwork(C=8, num_classes=10, layers=3, partial_channels=partial_channels, backend="cpu", memory=memory)
    net = net.double().train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=gen)
    emulated = copy.deepcopy(net)
    want = forward_backward(net, x, y)
    before = emu.launches()
    with emulated_cpu():
        got = forward_backward(emulated, x, y)
    assert emu.launches() > before, "the emulated kernels did not run"
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(
            got[1][name], want[1][name], rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}"
        )
    for name in want[2]:
        torch.testing.assert_close(
            got[2][name], want[2][name], rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}"
        )
    # Outside the context the CPU kernels serve again.
    before = emu.launches()
    forward_backward(emulated, x, y)
    assert emu.launches() == before


def test_counter_counts_kernels_not_views_or_allocations():
    a, b = torch.randn(4, 5), torch.randn(4, 5)

    def fn():
        c = a + b  # one
        c.view(20).t()  # views: none
        torch.empty(3)  # allocation: none
        torch.zeros(3)  # a fill: one
        torch._foreach_mul_([a.clone(), b.clone()], 2.0)  # two clones, one multi-tensor launch

    counter = count_launches(fn)
    assert counter.emulated == 0
    assert sum(counter.aten.values()) == 5, counter.aten
    assert foreach_launches(([torch.empty(70000)] * 3,)) == 1
    assert foreach_launches(([torch.empty(1)] * 111,)) == 2
    assert foreach_launches(([torch.empty(1)] * 65, [torch.empty(1)] * 65)) == 2


def test_emulated_launches_counted_inside_fused_ops(emu):
    x = torch.randn(2, 4, 6, 6)
    w = [torch.randn(4, 1, 3, 3)]
    with emulated_cpu():
        counter = count_launches(lambda: torch.ops.fastnas.multi_depthwise(x, w, [1], 1, None, None, [0]))
    assert counter.containers["fastnas::multi_depthwise"] == 1
    assert counter.emulated >= 1
    assert counter.total == counter.emulated + sum(counter.aten.values())


def test_bench_step_prints_the_counted_launches(emu, capsys):
    parser = bench.add_bench_step_args(argparse.ArgumentParser())
    argv = ["--emulate-launches", "--device", "cpu", "--network", "pc-darts", "--channels", "8", "--layers", "3"]
    result = bench.run_bench_step(parser.parse_args(argv))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    assert result["fused_launches"] == result["fused_kernel_launches"] + result["fused_aten_launches"]
    assert result["ratio"] == pytest.approx(result["fused_launches"] / result["eager_launches"])
    # The same step counted here, at another image size: launches do not depend on it.
    args = parser.parse_args([*argv, "--batch-size", "3", "--image-size", "12"])
    args.num_classes = 10
    fused, _ = bench.emulation.step_launches(args, "cpu", "save", emulate=True)
    assert fused.total == result["fused_launches"]
    assert isinstance(fused, LaunchCounter)
