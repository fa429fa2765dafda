"""Each op checks its arguments once, and eager calls, fake tensors and torch.compile see the same error.

For a few bad inputs per op: the error of the eager call is the reference; the same call on fake tensors
(FakeTensorMode), the op's C++ and Triton ops called on fake tensors (their fake implementations), and the
call traced by torch.compile(fullgraph=True) must raise it too, with the same type and message
(torch.compile wraps the error it meets while tracing; the wrapper must carry it).
"""

from typing import NamedTuple

import pytest
import torch
from oracle import assert_same_error, eager_error
from torch._subclasses.fake_tensor import FakeTensorMode

from fastnas import backends
from fastnas.ops import (
    darts_sum,
    darts_sum_backward,
    mixed_sum,
    multi_depthwise,
    multi_depthwise_backward,
    partial_channel_mixed_sum,
    partial_channel_node_sum,
    pool_batch_norm_stats,
    relu_conv_bn,
    stacked_batch_norm_backward,
    stacked_batch_norm_stats,
    update_running_stats,
    use_backend,
)

pytestmark = pytest.mark.usefixtures("seeded_only")


class Bad(NamedTuple):
    call: object  # the public function
    args: object  # () -> its arguments, built from the tensors of the current mode
    registry: str  # the op's name in fastnas.backends
    cpp: str | None  # its C++ op (fake and kernels there when the build has them), same arguments
    python: tuple[str, ...]  # its Python ops (Triton, update_running_stats), same arguments
    backend: str | None = None


def _z(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _darts(coef_len=4, grad=None):
    x, z = _z(2, 3, 5, 5), _z(1, 3, 2, 5, 5)
    args = (x, z, _z(3, 3), _z(3, 3), _z(coef_len), 1, True, True, True)
    return args if grad is None else (grad, *args, True)


def _update(rows):
    return ([_z(4), _z(4)], [_z(4), _z(4)], [_z(dtype=torch.int64)] * 2, _z(3, 4), _z(3, 4), rows, 0.1, 8)


BAD = {
    "mixed_sum-weights-length": Bad(
        mixed_sum, lambda: ([_z(2, 4, 4, 4)] * 2, _z(3)), "mixed_sum", "mixed_sum", ("mixed_sum_triton",)
    ),
    "mixed_sum-dtype": Bad(
        mixed_sum,
        lambda: ([_z(2, 4), _z(2, 4, dtype=torch.float64)], _z(2)),
        "mixed_sum",
        "mixed_sum",
        ("mixed_sum_triton",),
    ),
    "partial_channel-groups": Bad(
        partial_channel_mixed_sum,
        lambda: ([_z(2, 4, 4, 4)] * 2, _z(2), _z(2, 4, 4, 4), 3, False),
        "partial_channel_mixed_sum",
        "partial_channel_mixed_sum",
        ("partial_channel_mixed_sum_triton",),
    ),
    "partial_channel-pool-odd": Bad(
        partial_channel_mixed_sum,
        lambda: ([_z(2, 4, 4, 4)] * 2, _z(2), _z(2, 4, 9, 8), 2, True),
        "partial_channel_mixed_sum",
        "partial_channel_mixed_sum",
        ("partial_channel_mixed_sum_triton",),
    ),
    "node-stride": Bad(
        partial_channel_node_sum,
        lambda: ([_z(2, 2, 3, 3)] * 2, [_z(2, 6, 3, 3)] * 2, _z(2), 2, [1, 3]),
        "partial_channel_node_sum",
        "partial_channel_node_sum",
        ("partial_channel_node_sum_triton",),
    ),
    "node-bypass-dtype": Bad(
        partial_channel_node_sum,
        lambda: ([_z(2, 2, 3, 3)] * 2, [_z(2, 6, 3, 3), _z(2, 6, 3, 3, dtype=torch.float16)], _z(2), 2, [1, 1]),
        "partial_channel_node_sum",
        "partial_channel_node_sum",
        ("partial_channel_node_sum_triton",),
    ),
    "stats-integer": Bad(
        stacked_batch_norm_stats,
        lambda: (_z(2, 3, 4, dtype=torch.int64), 1e-5),
        "stacked_batch_norm_stats",
        "stacked_batch_norm_stats",
        ("stacked_batch_norm_stats_triton",),
    ),
    "bn-backward-mean-shape": Bad(
        stacked_batch_norm_backward,
        lambda: (_z(2, 3, 4), _z(2, 3, 4), _z(2, 2), _z(2, 3)),
        "stacked_batch_norm_backward",
        "stacked_batch_norm_backward",
        ("stacked_batch_norm_backward_triton",),
    ),
    "update-row-range": Bad(
        update_running_stats, lambda: _update([0, 3]), "update_running_stats", None, ("update_running_stats",)
    ),
    "pool-stats-stride": Bad(
        pool_batch_norm_stats,
        lambda: (_z(2, 3, 5, 5), 0, 1e-5),
        "pool_batch_norm_stats",
        "pool_batch_norm_stats",
        ("pool_batch_norm_stats_triton",),
    ),
    "darts_sum-coef": Bad(darts_sum, lambda: _darts(coef_len=3), "darts_sum", "darts_sum", ("darts_sum_triton",)),
    "darts_sum-grad-out": Bad(
        darts_sum_backward,
        lambda: _darts(grad=_z(2, 3, 4, 5)),
        "darts_sum",
        "darts_sum_backward",
        ("darts_sum_backward_triton",),
    ),
    "depthwise-even-kernel": Bad(
        multi_depthwise,
        lambda: (_z(2, 3, 5, 5), [_z(3, 1, 3, 3), _z(3, 1, 4, 4)], [1, 1], 1, None, None),
        "multi_depthwise",
        "multi_depthwise",
        ("multi_depthwise_triton",),
    ),
    "depthwise-backward-grad-out": Bad(
        multi_depthwise_backward,
        lambda: (_z(2, 3, 2, 4, 5), _z(2, 3, 5, 5), [_z(3, 1, 3, 3)] * 2, [1, 2], 1, None, None, True),
        "multi_depthwise",
        "multi_depthwise_backward",
        ("multi_depthwise_backward_triton",),
    ),
    "depthwise-triton-slots": Bad(
        multi_depthwise,
        lambda: (_z(1, 2, 5, 5), [_z(2, 1, 3, 3)] * 5, [1] * 5, 1, None, None),
        "multi_depthwise",
        None,
        ("multi_depthwise_triton",),
        backend="triton",
    ),
    "relu_conv_bn-reduce-odd": Bad(
        relu_conv_bn,
        lambda: (_z(2, 4, 5, 6), [_z(3, 4, 1, 1)] * 2, _z(6), _z(6), _z(dtype=torch.int64), 1e-5, 0.1),
        "relu_conv_bn",
        "relu_conv_bn",
        (),
    ),
    "relu_conv_bn-stats": Bad(
        relu_conv_bn,
        lambda: (_z(2, 4, 6, 6), [_z(6, 4, 1, 1)], _z(5), _z(6), _z(dtype=torch.int64), 1e-5, 0.1),
        "relu_conv_bn",
        "relu_conv_bn",
        (),
    ),
}


def _variants(bad: Bad) -> list[str]:
    """The ops of ``bad`` with a fake implementation in this build."""
    have_cpp = bad.cpp is not None and bool({"cpu", "cuda"} & set(backends.implementations(bad.registry)))
    return [bad.cpp] * have_cpp + list(bad.python)


def _eager(bad: Bad) -> BaseException:
    if bad.backend is not None:
        if backends.backend_status()[bad.backend]:
            pytest.skip(f"backend {bad.backend} unavailable: {backends.backend_status()[bad.backend]}")
    with use_backend(bad.backend or "auto"):
        return eager_error(lambda: bad.call(*bad.args()))


@pytest.mark.parametrize("label", list(BAD))
def test_fake_tensors_raise_the_eager_error(label):
    bad = BAD[label]
    expected = _eager(bad)
    assert isinstance(expected, (TypeError, ValueError, IndexError)), expected
    with FakeTensorMode(), use_backend(bad.backend or "auto"):
        assert_same_error(lambda: bad.call(*bad.args()), expected)
        for op in _variants(bad):
            assert_same_error(lambda op=op: getattr(torch.ops.fastnas, op)(*bad.args()), expected)


@pytest.mark.parametrize("label", list(BAD))
def test_compile_raises_the_eager_error(label):
    bad = BAD[label]
    expected = _eager(bad)
    args = bad.args()
    with use_backend(bad.backend or "auto"):
        torch._dynamo.reset()
        assert_same_error(lambda: torch.compile(bad.call, fullgraph=True)(*args), expected)
        for op in _variants(bad):
            torch._dynamo.reset()
            fn = getattr(torch.ops.fastnas, op)
            assert_same_error(lambda fn=fn: torch.compile(lambda *a: fn(*a), fullgraph=True)(*args), expected)


def test_compile_with_dynamic_shapes_traces_the_checks():
    """The checks of good input add no graph break, with shapes that vary between calls."""
    torch._dynamo.reset()

    def step(xs, w, b):
        return partial_channel_mixed_sum(xs, w, b, 2, True).sum() + mixed_sum(xs, w).sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for n in (2, 3):
        xs, w, b = [torch.ones(n, 2, 3, 3)] * 2, torch.ones(2), torch.ones(n, 2, 6, 6)
        torch.testing.assert_close(compiled(xs, w, b), step(xs, w, b), rtol=0, atol=0)
