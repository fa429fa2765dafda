// mixed_sum's argument checks, shared by its CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "checks.h"

namespace fastnas {

inline void check_mixed_sum(const char* op, at::TensorList xs, const at::Tensor& weights, c10::DeviceType type) {
  check_xs(op, xs);
  check_weights(op, weights, static_cast<int64_t>(xs.size()), xs[0].device());
  check_device_type(op, "xs", xs[0], type);
}

inline void check_mixed_sum_backward(const char* op, const at::Tensor& grad_out, at::TensorList xs,
                                     const at::Tensor& weights, const std::vector<bool>& xs_need_grad,
                                     bool weights_need_grad, c10::DeviceType type) {
  check_backward_common(op, grad_out, xs, weights, xs_need_grad, weights_need_grad);
  check_device_type(op, "grad_out", grad_out, type);
  check_xs_shape(op, xs, grad_out.sizes());
}

}  // namespace fastnas
