"""The C++ extension: build info, schemas, argument checks and determinism."""

import pytest
import torch

from fastnas import backends

C = backends.extension()
pytestmark = pytest.mark.skipif(C is None, reason="fastnas._C is not built")


def test_build_info():
    info = C.build_info()
    assert set(info) == {"cuda", "openmp", "torch_version", "cuda_version"}
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert (info["cuda_version"] != "") == info["cuda"]


def test_schemas():
    import fastnas.ops  # noqa: F401  (the Python ops share the namespace)

    schemas = {
        name: str(getattr(torch.ops.fastnas, name).default._schema)
        for name in (
            "mixed_sum",
            "mixed_sum_backward",
            "partial_channel_mixed_sum",
            "partial_channel_mixed_sum_backward",
        )
    }
    assert schemas["mixed_sum"] == "fastnas::mixed_sum(Tensor[] xs, Tensor weights) -> Tensor"
    assert "bool[] xs_need_grad" in schemas["partial_channel_mixed_sum_backward"]
    assert hasattr(torch.ops.fastnas, "mixed_sum_triton")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: torch.ops.fastnas.mixed_sum([torch.randn(3)] * 2, torch.randn(3)), "weights has 3 entries but K=2"),
        (lambda: torch.ops.fastnas.mixed_sum([torch.randn(3), torch.randn(4)], torch.randn(2)), "xs[1] has shape"),
        (lambda: torch.ops.fastnas.mixed_sum([torch.randn(3)] * 129, torch.randn(129)), "at most 128"),
        (lambda: torch.ops.fastnas.mixed_sum([torch.randn(3).int()], torch.randn(1)), "xs[0] has dtype"),
        (
            lambda: torch.ops.fastnas.partial_channel_mixed_sum(
                [torch.randn(1, 2, 3, 3)], torch.randn(1), torch.randn(1, 3, 3, 3), 2, False
            ),
            "groups=2",
        ),
        (
            lambda: torch.ops.fastnas.partial_channel_mixed_sum(
                [torch.randn(1, 2, 3, 3)], torch.randn(1), torch.randn(1, 2, 5, 6), 2, True
            ),
            "even bypass height",
        ),
    ],
)
def test_errors_name_the_argument(call, message):
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_backward_ignores_stand_in_bypass():
    w = torch.randn(3)
    stand_in = torch.empty(()).expand(2, 4, 10, 10)
    g = torch.randn(2, 8, 5, 5)
    grad_xs, grad_w, grad_b = torch.ops.fastnas.partial_channel_mixed_sum_backward(
        g, [], w, stand_in, 4, True, [True, False, True], False, False
    )
    assert len(grad_xs) == 2 and grad_w.shape == (0,) and grad_b.shape == (0,)


def test_weight_gradient_is_bit_identical_across_thread_counts():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 1000, 77, generator=gen) for _ in range(8)]
    w = torch.randn(8, generator=gen)
    g = torch.randn(3, 1000, 77, generator=gen)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(torch.ops.fastnas.mixed_sum_backward(g, xs, w, [False] * 8, True)[1])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
