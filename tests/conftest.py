import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. This
# must be set before any @triton.jit function is created.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.requires_cuda


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded(request):
    """Every test starts from the same random state, whatever ran before it: draws
    without a generator of their own are seeded too, so each test sees the same data
    in any order and selection."""
    import random

    import numpy as np

    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``): search
    steps are thousands of tiny ops, and a second thread only adds waiting on a shared 2-core CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def poison_empty():
    """Make torch.empty fill new tensors with NaN, so unwritten outputs show up."""
    old = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture
def seeded_only():
    """Fail a test that draws from torch's global random generators (which ``seeded`` only makes
    reproducible): the op tests draw from their own seeded torch.Generator (tests/oracle.py: generator),
    so their data depends on nothing but the test."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if HAS_CUDA else []
    yield
    drew = not torch.equal(cpu, torch.random.get_rng_state())
    drew = drew or any(not torch.equal(a, b) for a, b in zip(cuda, torch.cuda.get_rng_state_all() if HAS_CUDA else []))
    assert not drew, "the test drew from torch's global random generator; give it its own seeded torch.Generator"


@pytest.fixture(autouse=True)
def full_fp32_on_gpu(request, monkeypatch):
    """GPU tests compare against eager PyTorch in full float32: TF32 convolutions
    and matmuls (cuDNN's default) would round the oracle to 10-bit mantissas."""
    if "requires_cuda" in request.keywords and HAS_CUDA:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    yield


@pytest.fixture
def fused_edge_calls(monkeypatch):
    """Counts the fused edges run by MixedOp (one entry per edge, its memory mode), those a
    PC-DARTS cell runs inside one partial_channel_node call included, so that a test
    comparing the engine with the reference can assert that the engine ran. Skips where
    no fused kernels serve CPU tensors (the comparison would set the reference against itself)."""
    from fastnas import backends
    from fastnas.nn import cell, edge_runner

    if backends.resolve("darts_edge", "cpu") == "reference":
        pytest.skip("no fused kernels serve CPU tensors here: " + (backends.backend_status()["cpu"] or "?"))
    calls = []
    real_edge, real_node = edge_runner.darts_edge, cell.partial_channel_node

    def counting_edge(*args, **kwargs):
        calls.append(kwargs.get("memory"))
        return real_edge(*args, **kwargs)

    def counting_node(states, *args, **kwargs):
        calls.extend([kwargs.get("memory")] * len(states))
        return real_node(states, *args, **kwargs)

    monkeypatch.setattr(edge_runner, "darts_edge", counting_edge)
    monkeypatch.setattr(cell, "partial_channel_node", counting_node)
    return calls
