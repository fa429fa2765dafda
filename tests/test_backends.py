"""The build and the backend registry: what is available, and how it is chosen."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastnas
from fastnas import backends
from fastnas.ops import mixed_sum, use_backend


def test_cpu_kernels_are_built():
    assert backends.backend_status()["cpu"] == "", backends.backend_status()["cpu"]


@pytest.mark.skipif(
    shutil.which("nvcc") is None or torch.version.cuda is None or os.environ.get("FASTNAS_CUDA") == "0",
    reason="no nvcc or CPU-only torch: the CUDA kernels are not expected",
)
def test_cuda_kernels_are_compiled_without_a_gpu():
    info = backends.extension().build_info()
    assert info["cuda"] is True
    assert info["torch_version"]


def test_triton_kernels_run_here():
    # Under TRITON_INTERPRET=1 (set by conftest on machines without a GPU), the
    # Triton kernels run on the CPU; if they cannot, their tests would all skip.
    assert backends.backend_status()["triton"] == "", backends.backend_status()["triton"]


def test_kernels_are_not_a_top_level_module(tmp_path):
    code = (
        "import importlib.util, fastnas.kernels.mixed_sum;"
        "assert importlib.util.find_spec('kernels') is None, 'top-level kernels is importable'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_info_prints_a_table():
    out = subprocess.run([sys.executable, "-m", "fastnas.info"], capture_output=True, text=True, check=True).stdout
    for name in backends.BACKENDS:
        assert f"\n{name} " in out
    assert fastnas.__version__ in out


def _sum(backend=None):
    xs = [torch.randn(3, 4) for _ in range(2)]
    return mixed_sum(xs, torch.randn(2), backend=backend)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown fastnas backend 'fast'"):
        _sum("fast")
    with pytest.raises(ValueError, match="unknown fastnas backend"):
        with use_backend("nope"):
            pass


def test_explicit_missing_backend_raises_with_reason():
    why = backends.backend_status()["cuda"]
    if not why:
        pytest.skip("the cuda backend works here")
    with pytest.raises(RuntimeError, match="'cuda' was requested but is not available: " + why[:20]):
        _sum("cuda")


def test_backend_must_serve_the_device():
    if backends.backend_status()["cpu"]:
        pytest.skip("cpu backend missing")
    with pytest.raises(RuntimeError, match="cannot run on"):
        mixed_sum([torch.randn(2, device="meta")] * 2, torch.randn(2, device="meta"), backend="cpu")


def test_choice_order(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setenv("FASTNAS_BACKEND", "reference")
    assert backends.resolve(dev) == "reference"
    with use_backend("cpu"):
        assert backends.resolve(dev) == "cpu"
        assert backends.resolve(dev, "reference") == "reference"
        with use_backend("auto"):
            assert backends.resolve(dev) == ("cpu" if "cpu" in backends.available_backends() else "reference")
    assert backends.resolve(dev) == "reference"
    monkeypatch.setenv("FASTNAS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTNAS_BACKEND"):
        backends.resolve(dev)


def test_auto_falls_back_quietly(monkeypatch):
    monkeypatch.setattr(
        backends, "backend_status", lambda: {"reference": "", "cpu": "gone", "cuda": "gone", "triton": "gone"}
    )
    monkeypatch.delenv("FASTNAS_BACKEND", raising=False)
    assert backends.resolve(torch.device("cpu")) == "reference"
    assert backends.resolve(torch.device("cuda")) == "reference"


def test_broken_extension_is_reported_not_raised(monkeypatch):
    real_import = backends.importlib.import_module

    def fake_import(name):
        if name == "fastnas._C":
            raise ImportError("undefined symbol: _ZN2at6Tensor")
        return real_import(name)

    backends._load_extension.cache_clear()
    monkeypatch.setattr(backends.importlib, "import_module", fake_import)
    monkeypatch.delenv("FASTNAS_BACKEND", raising=False)
    try:
        assert "undefined symbol" in backends.backend_status()["cpu"]
        assert backends.resolve(torch.device("cpu")) == "reference"
        with pytest.raises(RuntimeError, match="'cpu' was requested but is not available.*undefined symbol"):
            _sum("cpu")
    finally:
        backends._load_extension.cache_clear()
