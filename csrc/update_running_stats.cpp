// update_running_stats: nn.BatchNorm2d's training-mode update of the running
// statistics, for the candidates `rows` of stacked batch statistics, in place.
//
// One implementation for every device: a handful of multi-tensor (_foreach)
// ops over the buffers, on the current stream, with no host-device copy or
// sync (CUDA graphs capture it). The rule lives here once, for the Python ops
// and for C++ callers alike.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "host/update_running_stats.h"

namespace fastnas {
namespace {

constexpr const char* kOp = "update_running_stats";

void update_running_stats(at::TensorList running_mean, at::TensorList running_var, at::TensorList num_batches_tracked,
                          const at::Tensor& mean, const at::Tensor& var, at::IntArrayRef rows, double momentum,
                          int64_t count) {
  check_update_running_stats(kOp, running_mean, running_var, num_batches_tracked, mean, var, rows, count);
  if (rows.empty()) return;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  std::vector<at::Tensor> new_mean, new_var;
  for (size_t i = 0; i < rows.size(); ++i) {
    // Row views, not an index_select: no host-to-device index copy.
    new_mean.push_back(mean.select(0, rows[i]).to(running_mean[i].scalar_type()));
    new_var.push_back((var.select(0, rows[i]) * unbias).to(running_var[i].scalar_type()));
  }
  // (1 - m) * running + m * batch, the order nn.BatchNorm2d's kernels use.
  at::_foreach_mul_(running_mean, 1 - momentum);
  at::_foreach_add_(running_mean, new_mean, momentum);
  at::_foreach_mul_(running_var, 1 - momentum);
  at::_foreach_add_(running_var, new_var, momentum);
  at::_foreach_add_(num_batches_tracked, 1);
}

}  // namespace
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, CPU, m) { m.impl("update_running_stats", &fastnas::update_running_stats); }

#ifdef FASTNAS_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnas, CUDA, m) { m.impl("update_running_stats", &fastnas::update_running_stats); }
#endif
