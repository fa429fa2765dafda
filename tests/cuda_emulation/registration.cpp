// The fastnas_emu ops: the fastnas ops that have CUDA kernels, under the same
// schemas, run by the host emulation of those kernels on CPU tensors. Load
// fastnas._C first: the schemas are copied from its ops.
//
// Two more ops serve whole steps: fastnas_emu::emulate_cpu(True) registers the
// emulated kernels as the CPU kernels of the fastnas ops themselves (the
// dispatcher keeps fastnas._C's and returns to them on emulate_cpu(False)), so
// that a network on CPU tensors runs the CUDA code, the whole-edge orchestration
// included, as on a GPU; fastnas_emu::launches() counts the kernel launches.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <memory>
#include <string>

#include "cuda/common.cuh"

namespace {

constexpr const char* kOps[] = {
    "mixed_sum",
    "mixed_sum_backward",
    "partial_channel_mixed_sum",
    "partial_channel_mixed_sum_backward",
    "multi_depthwise",
    "multi_depthwise_backward",
    "stacked_batch_norm_stats",
    "stacked_batch_norm_backward",
    "pool_batch_norm_stats",
    "darts_sum",
    "darts_sum_backward",
    "partial_channel_node_sum",
    "partial_channel_node_sum_backward",
    "darts_edge",
    "darts_edge_backward",
    "partial_channel_node",
    "partial_channel_node_backward",
};

int64_t launches() { return ::fastnas::emu::launches(); }

void emulate_cpu(bool on) {
  static std::unique_ptr<torch::Library> overrides;
  if (!on) {
    overrides.reset();  // deregisters them: fastnas._C's CPU kernels serve again
    return;
  }
  if (overrides) return;
  overrides =
      std::make_unique<torch::Library>(torch::Library::IMPL, "fastnas", c10::DispatchKey::CPU, __FILE__, __LINE__);
  for (const auto registrar : ::fastnas::emu::kernel_registrars()) registrar(*overrides);
}

}  // namespace

TORCH_LIBRARY(fastnas_emu, m) {
  for (const char* name : kOps) {
    const auto& schema = c10::Dispatcher::singleton().findSchemaOrThrow((std::string("fastnas::") + name).c_str(), "");
    std::string text = c10::toString(schema.schema());
    m.def(text.substr(text.find("::") + 2).c_str());
  }
  m.def("launches() -> int", &launches);
  m.def("emulate_cpu(bool on) -> ()", &emulate_cpu);
}
