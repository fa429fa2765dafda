// update_running_stats's argument checks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "checks.h"

namespace fastnas {

inline void check_update_running_stats(const char* op, at::TensorList running_mean, at::TensorList running_var,
                                       at::TensorList num_batches_tracked, const at::Tensor& mean,
                                       const at::Tensor& var, at::IntArrayRef rows, int64_t count) {
  const int64_t n = static_cast<int64_t>(rows.size());
  const std::pair<const char*, at::TensorList> lists[] = {
      {"running_mean", running_mean}, {"running_var", running_var}, {"num_batches_tracked", num_batches_tracked}};
  for (const auto& [name, list] : lists) {
    TORCH_CHECK(static_cast<int64_t>(list.size()) == n, op, ": ", name, " has ", list.size(), " tensors but rows has ",
                n, " entries");
  }
  TORCH_CHECK(mean.dim() == 2, op, ": mean must be a (J, C) tensor, got shape ", mean.sizes());
  TORCH_CHECK(var.sizes() == mean.sizes(), op, ": mean has shape ", mean.sizes(), " but var has ", var.sizes());
  check_same_device(op, "var", var, "mean", mean);
  const int64_t j = mean.size(0), c = mean.size(1);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(rows[i] >= 0 && rows[i] < j, op, ": rows[", i, "]=", rows[i],
                " is out of range for mean and var with J=", j, " rows");
  }
  const std::pair<const char*, at::TensorList> buffers[] = {{"running_mean", running_mean},
                                                            {"running_var", running_var}};
  for (const auto& [name, list] : buffers) {
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.dim() == 1 && t.size(0) == c, op, ": ", name, "[", i, "] has shape ", t.sizes(), "; expected (", c,
                  ",)");
      TORCH_CHECK(t.is_floating_point(), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                  "; expected a floating dtype");
      TORCH_CHECK(t.device() == mean.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but mean is on ",
                  mean.device());
    }
  }
  for (size_t i = 0; i < num_batches_tracked.size(); ++i) {
    const at::Tensor& t = num_batches_tracked[i];
    TORCH_CHECK(t.numel() == 1, op, ": num_batches_tracked[", i, "] must be a one-element tensor");
    TORCH_CHECK(t.device() == mean.device(), op, ": num_batches_tracked[", i, "] is on ", t.device(),
                " but mean is on ", mean.device());
  }
  TORCH_CHECK(count >= 2, op, ": count=", count, " must be >= 2 (the unbiased variance divides by count - 1)");
}

}  // namespace fastnas
