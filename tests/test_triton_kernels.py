"""Direct checks of the Triton kernels that the op-level tests do not reach.

On a CPU machine they run in Triton's interpreter (conftest sets TRITON_INTERPRET).
"""

import pytest
import torch
from oracle import assert_oracle, dot_scale, generator, randn

from fastnas.ops import mixed_sum_reference, partial_channel_mixed_sum_reference

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastnas.kernels import _utils  # noqa: E402
from fastnas.kernels.mixed_sum import mixed_sum_backward, mixed_sum_forward  # noqa: E402
from fastnas.kernels.partial_channel_mixed_sum import (  # noqa: E402
    partial_channel_mixed_sum_backward,
    partial_channel_mixed_sum_forward,
)

pytestmark = pytest.mark.usefixtures("seeded_only")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _randn(gen, *shape):
    return randn(gen, shape, torch.float32, DEVICE)


def test_pointer_table_reads_64_inputs_in_place(poison_empty):
    # Some inputs are views at an odd offset, which also takes the unaligned path.
    gen = generator("pointer table")
    base = _randn(gen, 64, 6 * 5 + 1)
    xs = [base[k, 1:].view(6, 5) for k in range(64)]
    weights = _randn(gen, 64)
    out = mixed_sum_forward(xs, weights)
    lowp = mixed_sum_reference(xs, weights)
    truth = mixed_sum_reference([x.double() for x in xs], weights.double())
    assert_oracle(out, lowp, truth, "out")


def test_weights_gradient_is_bit_identical_on_repeat():
    # Several programs, so the two-stage reduction has partials to combine.
    gen = generator("weights gradient")
    xs = [_randn(gen, 5000) for _ in range(3)]
    weights = _randn(gen, 3)
    grad = _randn(gen, 5000)
    first = mixed_sum_backward(grad, xs, weights, [True, False, True], True)
    for _ in range(2):
        again = mixed_sum_backward(grad, xs, weights, [True, False, True], True)
        assert torch.equal(again[1], first[1])
        assert all(torch.equal(a, b) for a, b in zip(again[0], first[0]))
    for k, x in enumerate(xs):
        lowp, truth = (grad * x).sum(), (grad.double() * x.double()).sum()
        assert_oracle(first[1][k], lowp, truth, f"grad weights[{k}]", scale=dot_scale(grad, x), reduction=True)


def test_partial_channel_weights_gradient_is_bit_identical_on_repeat():
    # 33x40 spans two blocks of a row.
    gen = generator("partial channel weights gradient")
    xs = [_randn(gen, 2, 3, 33, 40) for _ in range(3)]
    weights = _randn(gen, 3)
    bypass = _randn(gen, 2, 5, 33, 40)
    grad = _randn(gen, 2, 8, 33, 40)
    args = (grad, xs, weights, bypass, 2, False, [False] * 3, True, True)
    first = partial_channel_mixed_sum_backward(*args)
    again = partial_channel_mixed_sum_backward(*args)
    assert torch.equal(first[1], again[1])
    assert torch.equal(first[2], again[2])


def test_pool_follows_pytorch_on_ties_and_nan(poison_empty):
    gen = generator("ties and nan")
    xs = [_randn(gen, 2, 3, 4, 5) for _ in range(2)]
    weights = _randn(gen, 2)
    bypass = _randn(gen, 2, 5, 8, 10).round()  # rounding makes ties in most windows
    flat = bypass.view(-1)
    flat[::7] = float("nan")
    flat[::11] = float("-inf")
    flat[5::13] = float("inf")
    bypass.requires_grad_(True)
    out = partial_channel_mixed_sum_forward(xs, weights, bypass.detach(), 4, True)
    ref = partial_channel_mixed_sum_reference(xs, weights, bypass, 4, True)
    # The pooled bypass is copied, NaN and infinities included; the weighted sum meets the oracle.
    finite = ref.isfinite()
    assert torch.equal(finite, out.isfinite()) and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out[ref.isinf()], ref[ref.isinf()])
    truth = partial_channel_mixed_sum_reference([x.double() for x in xs], weights.double(), bypass.double(), 4, True)
    assert_oracle(out.where(finite, 0), ref.detach().where(finite, 0), truth.where(finite, 0), "out")
    grad = _randn(gen, *ref.shape)
    (ref_grad,) = torch.autograd.grad(ref, bypass, grad)
    _, _, grad_bypass = partial_channel_mixed_sum_backward(
        grad, [], weights, bypass.detach(), 4, True, [True, True], False, True
    )
    assert torch.equal(grad_bypass, ref_grad)


def test_bypass_stand_in_is_never_read(poison_empty):
    gen = generator("stand-in")
    xs = [_randn(gen, 1, 2, 3, 3) for _ in range(2)]
    weights = _randn(gen, 2)
    grad = _randn(gen, 1, 6, 3, 3)
    for pool, shape in ((False, (1, 4, 3, 3)), (True, (1, 4, 6, 6))):
        stand_in = grad.new_empty(()).expand(shape)
        grad_xs, grad_w, grad_b = partial_channel_mixed_sum_backward(
            grad, xs, weights, stand_in, 3, pool, [True, False], True, not pool
        )
        assert len(grad_xs) == 1 and grad_w.shape == (2,)
        assert grad_b.shape == ((0,) if pool else shape)
        assert not grad_b.isnan().any() and not grad_xs[0].isnan().any()


@triton.jit
def _offsets_kernel(out_ptr, first_block, BLOCK: tl.constexpr):
    offs = _utils.row_block_offsets(first_block + tl.program_id(0), BLOCK)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), offs)


def test_block_offsets_go_past_int32():
    first_block = 2**31 // 1024 + 3
    out = torch.empty(2 * 1024, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(2,)](out, first_block, BLOCK=1024)
    expected = torch.arange(first_block * 1024, (first_block + 2) * 1024, dtype=torch.int64, device=DEVICE)
    assert torch.equal(out, expected)


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, _utils.cast_for_store(x, out_ptr.dtype.element_ty), mask=offs < n)


def test_bfloat16_rounding_matches_torch():
    special = torch.tensor(
        [0.0, -0.0, 1.0, float("inf"), float("-inf"), float("nan"), 3.4e38, -3.4e38, 1e-40, -1e-39],
        device=DEVICE,
    )
    # Exact halfway cases, rounded to even both ways.
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000], dtype=torch.int64)
    ties = ties.to(torch.int32).view(torch.float32).to(DEVICE)
    gen = generator("bfloat16 rounding")
    x = torch.cat([special, ties, _randn(gen, 1000) * 10 ** _randn(gen, 1000).mul(8).round()])
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(torch.bfloat16)
    assert torch.equal(out.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert torch.equal(out[keep].view(torch.int16), expected[keep].view(torch.int16))
