"""The build and the backend registry: what is available, and how it is chosen."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastnas
from fastnas import backends
from fastnas.ops import mixed_sum, use_backend


def test_cpu_kernels_are_built():
    assert backends.backend_status()["cpu"] == "", backends.backend_status()["cpu"]


@pytest.mark.skipif(
    shutil.which("nvcc") is None or torch.version.cuda is None or os.environ.get("FASTNAS_CUDA") != "1",
    reason="the CUDA kernels are compiled without a GPU only when asked (FASTNAS_CUDA=1, as make test does)",
)
def test_cuda_kernels_are_compiled_without_a_gpu():
    info = backends.extension().build_info()
    assert info["cuda"] is True
    assert info["torch_version"]


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastnas_setup", Path(__file__).parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


@pytest.mark.parametrize("asked", [None, "auto", "0", "1"])
def test_cuda_build_only_when_a_gpu_is_there_or_asked(monkeypatch, asked):
    setup = _setup_module()
    if asked is None:
        monkeypatch.delenv("FASTNAS_CUDA", raising=False)
    else:
        monkeypatch.setenv("FASTNAS_CUDA", asked)
    toolchain = shutil.which("nvcc") is not None and torch.version.cuda is not None
    monkeypatch.setattr(setup, "_gpu_visible", lambda torch: False)
    build, why = setup._cuda_wanted()
    assert build == (asked == "1" and toolchain), why
    if asked in (None, "auto") and toolchain:
        assert "no GPU is visible" in why
    monkeypatch.setattr(setup, "_gpu_visible", lambda torch: True)
    build, why = setup._cuda_wanted()
    assert build == (asked != "0" and toolchain), why


def test_default_arch_list_embeds_ptx_for_the_newest():
    default = _setup_module().DEFAULT_CUDA_ARCHS
    archs = default.split(";")
    newest = max(archs, key=lambda a: float(a.removesuffix("+PTX")))
    assert newest.endswith("+PTX"), archs
    cmake = (Path(__file__).parents[1] / "CMakeLists.txt").read_text()
    assert f'set(ENV{{TORCH_CUDA_ARCH_LIST}} "{default}")' in cmake, "CMakeLists.txt's default arch list differs"


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
    assert backends.resolve("mixed_sum", dev) == "reference"
    with use_backend("cpu"):
        assert backends.resolve("mixed_sum", dev) == "cpu"
        assert backends.resolve("mixed_sum", dev, "reference") == "reference"
        with use_backend("auto"):
            expected = "cpu" if "cpu" in backends.available_backends() else "reference"
            assert backends.resolve("mixed_sum", dev) == expected
    assert backends.resolve("mixed_sum", dev) == "reference"
    monkeypatch.setenv("FASTNAS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTNAS_BACKEND"):
        backends.resolve("mixed_sum", dev)


@pytest.fixture
def fresh_registry():
    """Recompute the machine's status before and after a test that fakes it."""
    backends.refresh()
    yield
    backends.refresh()


def test_auto_falls_back_quietly(monkeypatch, fresh_registry):
    monkeypatch.setattr(
        backends, "backend_status", lambda: {"reference": "", "cpu": "gone", "cuda": "gone", "triton": "gone"}
    )
    monkeypatch.delenv("FASTNAS_BACKEND", raising=False)
    assert backends.resolve("mixed_sum", torch.device("cpu")) == "reference"
    assert backends.resolve("mixed_sum", torch.device("cuda")) == "reference"


def test_every_op_declares_its_implementations():
    import fastnas.ops  # noqa: F401

    ops = backends.registered_ops()
    for op in ("mixed_sum", "partial_channel_mixed_sum", "multi_depthwise", "darts_sum", "darts_edge"):
        assert op in ops
        assert backends.implementations(op)[0] == "reference"
    if backends.extension() is not None:
        assert "cpu" in backends.implementations("multi_depthwise")
        # The C++ CUDA kernels are read off the dispatcher: they exist for these two ops only
        # in a build with CUDA, and never for an op without a CUDA kernel.
        cuda_built = backends.extension().build_info()["cuda"]
        assert ("cuda" in backends.implementations("mixed_sum")) == cuda_built
        assert ("cuda" in backends.implementations("darts_sum")) == _has_cuda_kernel("darts_sum")


def _has_cuda_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnas::{op}", "CUDA")


def test_explicit_backend_without_the_op_raises(monkeypatch, fresh_registry):
    """Asking for a backend by name never runs another one: an op it lacks is an error."""
    monkeypatch.setattr(backends, "backend_status", lambda: dict.fromkeys(backends.BACKENDS, ""))
    backends.register("test_only_op", "triton")
    try:
        assert backends.resolve("test_only_op", "cuda") == "triton"
        with pytest.raises(RuntimeError, match="'cuda' has no kernel for test_only_op.*reference, triton"):
            backends.resolve("test_only_op", "cuda", "cuda")
        with pytest.raises(RuntimeError, match="'cpu' has no kernel for test_only_op"):
            backends.resolve("test_only_op", "cpu", "cpu")
    finally:
        backends._python_impls.pop("test_only_op")


def test_a_build_without_the_op_is_not_counted_as_having_it(fresh_registry):
    """An op whose schema the loaded extension lacks (a stale build) runs on the reference."""
    assert backends.register_cpp("op_missing_from_this_build") is False
    try:
        assert backends.implementations("op_missing_from_this_build") == ["reference"]
        assert backends.resolve("op_missing_from_this_build", "cpu") == "reference"
        with pytest.raises(RuntimeError, match="has no kernel for op_missing_from_this_build"):
            backends.resolve("op_missing_from_this_build", "cpu", "cpu")
    finally:
        backends._cpp_ops.discard("op_missing_from_this_build")


def test_status_is_computed_once(monkeypatch, fresh_registry):
    if backends.extension() is None:
        pytest.skip("no extension")
    calls = []
    real = backends.extension().build_info
    monkeypatch.setattr(backends.extension(), "build_info", lambda: calls.append(1) or real())
    backends.refresh()
    for _ in range(5):
        backends.backend_status()
        backends.resolve("mixed_sum", "cpu")
        _sum()
    assert len(calls) == 1
    backends.refresh()
    backends.backend_status()
    assert len(calls) == 2


def test_broken_extension_is_reported_not_raised(monkeypatch):
    real_import = backends.importlib.import_module

    def fake_import(name):
        if name == "fastnas._C":
            raise ImportError("undefined symbol: _ZN2at6Tensor")
        return real_import(name)

    backends.refresh()
    monkeypatch.setattr(backends.importlib, "import_module", fake_import)
    monkeypatch.delenv("FASTNAS_BACKEND", raising=False)
    try:
        assert "undefined symbol" in backends.backend_status()["cpu"]
        assert backends.resolve("mixed_sum", torch.device("cpu")) == "reference"
        with pytest.raises(RuntimeError, match="'cpu' was requested but is not available.*undefined symbol"):
            _sum("cpu")
    finally:
        monkeypatch.undo()
        backends.refresh()
