// stacked_batch_norm's argument checks, shared by its CPU and CUDA kernels.
// z is (J, C, *rest) channel-major: row (j, c) holds the M = prod(rest) values
// of one candidate's channel.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "checks.h"

namespace fastnas {

inline void check_stacked_z(const char* op, const at::Tensor& z, c10::DeviceType type) {
  TORCH_CHECK(z.dim() >= 2, op, ": z must be (J, C, *rest) with at least 2 dims, got shape ", z.sizes());
  check_dtype(op, "z", z);
  check_device_type(op, "z", z, type);
  TORCH_CHECK(z.size(0) * z.size(1) == 0 || z.numel() > 0, op, ": z has shape ", z.sizes(),
              ": no values to normalise each (j, c) over");
}

inline void check_stacked_stat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& z) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == z.size(0) && t.size(1) == z.size(1), op, ": ", name, " has shape ",
              t.sizes(), "; expected (J, C) = (", z.size(0), ", ", z.size(1), ")");
  check_stat_dtype(op, name, t);
  check_same_device(op, name, t, "z", z);
}

inline void check_stacked_batch_norm_backward(const char* op, const at::Tensor& grad_yhat, const at::Tensor& z,
                                              const at::Tensor& mean, const at::Tensor& rstd, c10::DeviceType type) {
  check_stacked_z(op, z, type);
  TORCH_CHECK(grad_yhat.sizes() == z.sizes(), op, ": grad_yhat has shape ", grad_yhat.sizes(), " but z has ",
              z.sizes());
  check_same_dtype(op, "grad_yhat", grad_yhat, "z", z);
  check_same_device(op, "grad_yhat", grad_yhat, "z", z);
  check_stacked_stat(op, "mean", mean, z);
  check_stacked_stat(op, "rstd", rstd, z);
}

// (rows, M) of z: J * C rows of M values each.
struct StackedRows {
  int64_t rows, m;
};

inline StackedRows stacked_rows(const at::Tensor& z) {
  const int64_t rows = z.size(0) * z.size(1);
  return {rows, rows == 0 ? 0 : z.numel() / rows};
}

}  // namespace fastnas
