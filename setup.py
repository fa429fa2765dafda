"""Build of fastnas and its extension fastnas._C.

The CPU kernels are always built. The CUDA kernels need nvcc and a CUDA build of
torch, and are built when a GPU is visible or when asked (FASTNAS_CUDA=1, as
``make test`` does so that every change compiles them); FASTNAS_CUDA=0 skips
them. A machine with nvcc but no GPU therefore gets a CPU build in a minute or
two instead of waiting for nvcc. Install with
``pip install --no-build-isolation -e .`` so the extension is compiled against
the torch already in the environment.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# Object files live here across builds, so that ninja recompiles only the sources
# (or headers) that changed; pip would otherwise build in a fresh folder each time.
BUILD_TEMP = ROOT / "build" / "ext"
# Default arch list when TORCH_CUDA_ARCH_LIST is unset: Ampere and Hopper, the
# GPUs DARTS searches run on today, with Hopper's PTX so that newer GPUs can
# compile the kernels at load time.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _cuda_wanted():
    """Return (build_cuda, reason) from the environment, never raising.

    FASTNAS_CUDA: "0" never, "1" whenever the toolchain allows, unset or
    "auto" only when a GPU is visible.
    """
    asked = os.environ.get("FASTNAS_CUDA", "auto").strip().lower()
    if asked in ("0", "off", "no", "false"):
        return False, "FASTNAS_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:  # torch missing: the CPU build will fail loudly anyway
        return False, f"torch not importable: {exc}"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return False, "nvcc not found (set CUDA_HOME)"
    if asked not in ("1", "on", "yes", "true") and not _gpu_visible(torch):
        return False, "no GPU is visible (FASTNAS_CUDA=1 builds them anyway)"
    return True, ""


def _gpu_visible(torch) -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver is no GPU to build for
        return False


def _torch_wheel_cuda_includes():
    """Header folders of torch's pip CUDA libraries (cuBLAS, cuSPARSE, ...).

    A bare CUDA toolkit may lack headers that ATen's CUDA headers include; the
    nvidia-* wheels that torch depends on ship them.
    """
    dirs = []
    for entry in sys.path:
        base = Path(entry) / "nvidia"
        if base.is_dir():
            dirs += sorted(str(p) for p in base.glob("*/include") if p.is_dir())
    return dirs


def _cuda_library_dirs():
    """The folder with libcudart.so when CUDA_HOME lacks it.

    torch guesses CUDA_HOME from the nvcc on PATH; behind a wrapper script such
    as /usr/local/bin/nvcc that guess (/usr/local) has no CUDA libraries.
    """
    from torch.utils.cpp_extension import CUDA_HOME

    for folder in (Path(CUDA_HOME) / "lib64", Path(CUDA_HOME) / "cuda" / "lib64", Path("/usr/local/cuda/lib64")):
        if (folder / "libcudart.so").exists():
            return [str(folder)]
    return []


def _set_max_jobs():
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    # nvcc on ATen headers peaks near 3 GiB per job.
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(mem_gib // 3))))


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    build_cuda, why_not = _cuda_wanted()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Headers too, so that setuptools relinks when only a header changed.
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20", "-ffp-contract=off"] + openmp
    define_macros = []
    include_dirs = [str(ROOT / "csrc")]
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FASTNAS_WITH_CUDA", None))
        include_dirs += _torch_wheel_cuda_includes()
        ext = CUDAExtension(
            "fastnas._C",
            sources,
            depends=depends,
            include_dirs=include_dirs,
            define_macros=define_macros,
            library_dirs=_cuda_library_dirs(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=openmp,
        )
    else:
        print(f"fastnas: building without CUDA kernels ({why_not})")
        ext = CppExtension(
            "fastnas._C",
            sources,
            depends=depends,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )
    return [ext]


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class PersistentBuildExtension(BuildExtension):
        """torch's BuildExtension with its object files kept in build/ext."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(BUILD_TEMP)

    return PersistentBuildExtension.with_options(use_ninja=True)


def main():
    _set_max_jobs()
    setup(
        packages=[
            "fastnas",
            "fastnas.ops",
            "fastnas.kernels",
            "fastnas.nn",
            "fastnas.spaces",
            "fastnas.search",
            "fastnas.data",
        ],
        # The Triton kernels live in kernels/ but belong to the fastnas package:
        # a bare top-level ``kernels`` module would clash with another project.
        package_dir={"fastnas": "fastnas", "fastnas.kernels": "kernels"},
        ext_modules=_extensions(),
        cmdclass={"build_ext": _build_ext_class()},
    )


if __name__ == "__main__":
    main()
