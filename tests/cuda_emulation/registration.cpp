// The fastnas_emu ops: the fastnas ops that have CUDA kernels, under the same
// schemas, run by the host emulation of those kernels on CPU tensors. Load
// fastnas._C first: the schemas are copied from its ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

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
};

}  // namespace

TORCH_LIBRARY(fastnas_emu, m) {
  for (const char* name : kOps) {
    const auto& schema = c10::Dispatcher::singleton().findSchemaOrThrow((std::string("fastnas::") + name).c_str(), "");
    std::string text = c10::toString(schema.schema());
    m.def(text.substr(text.find("::") + 2).c_str());
  }
}
