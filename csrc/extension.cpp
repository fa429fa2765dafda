// The Python extension fastnas._C: importing it registers the ops; it also
// tells Python how it was built.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

namespace py = pybind11;

#ifdef FASTNAS_WITH_CUDA
namespace fastnas {
int cuda_runtime_version();  // csrc/cuda/build_info.cu
}
#endif

namespace {

py::dict build_info() {
  py::dict info;
#ifdef FASTNAS_WITH_CUDA
  info["cuda"] = true;
  const int version = fastnas::cuda_runtime_version();
  info["cuda_version"] = std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = "";
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnas C++ and CUDA kernels; importing this module registers the torch.ops.fastnas ops";
  m.def("build_info", &build_info, "How this extension was built: CUDA kernels, OpenMP, torch and CUDA versions");
}
