// partial_channel_mixed_sum's shape and argument checks, shared by its CPU and
// CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"

namespace fastnas {

// PC-DARTS geometry: xs (N, Cp, H, W), bypass (N, Cb, H, W) or (N, Cb, 2H, 2W).
struct PartialChannelShape {
  int64_t n, cp, cb, h, w, groups;
  int64_t channels() const { return cp + cb; }
  int64_t channels_per_group() const { return (cp + cb) / groups; }
  int64_t plane() const { return h * w; }
  // Whether every element offset, of the output and of a pooled (2h, 2w)
  // bypass, fits 32-bit index math (the CUDA kernels' 64-bit division is slow).
  bool offsets_fit_int32() const {
    return n * std::max(channels(), 4 * cb) * plane() < static_cast<int64_t>(std::numeric_limits<int32_t>::max());
  }
};

inline PartialChannelShape check_partial_channel(const char* op, at::IntArrayRef x_shape, const at::Tensor& bypass,
                                                 int64_t groups, bool bypass_pool) {
  TORCH_CHECK(x_shape.size() == 4, op, ": xs must be 4-D NCHW tensors, got shape ", x_shape);
  TORCH_CHECK(bypass.dim() == 4, op, ": bypass must be a 4-D NCHW tensor, got shape ", bypass.sizes());
  PartialChannelShape s{x_shape[0], x_shape[1], bypass.size(1), x_shape[2], x_shape[3], groups};
  TORCH_CHECK(bypass.size(0) == s.n, op, ": bypass has batch size ", bypass.size(0), " but xs have ", s.n);
  if (bypass_pool) {
    TORCH_CHECK(bypass.size(2) % 2 == 0 && bypass.size(3) % 2 == 0, op,
                ": bypass_pool=True needs an even bypass height and width, got ", bypass.size(2), "x", bypass.size(3));
    TORCH_CHECK(bypass.size(2) == 2 * s.h && bypass.size(3) == 2 * s.w, op,
                ": with bypass_pool=True the bypass must be twice the size of xs (", 2 * s.h, "x", 2 * s.w, "), got ",
                bypass.size(2), "x", bypass.size(3));
  } else {
    TORCH_CHECK(bypass.size(2) == s.h && bypass.size(3) == s.w, op, ": bypass is ", bypass.size(2), "x", bypass.size(3),
                " but xs are ", s.h, "x", s.w);
  }
  TORCH_CHECK(groups >= 1 && s.channels() % groups == 0, op, ": groups=", groups, " must be >= 1 and divide the ",
              s.channels(), " output channels");
  return s;
}

inline PartialChannelShape check_partial_channel_mixed_sum(const char* op, at::TensorList xs, const at::Tensor& weights,
                                                           const at::Tensor& bypass, int64_t groups, bool bypass_pool,
                                                           c10::DeviceType type) {
  check_xs(op, xs);
  check_weights(op, weights, static_cast<int64_t>(xs.size()), xs[0].device());
  check_device_type(op, "xs", xs[0], type);
  TORCH_CHECK(bypass.scalar_type() == xs[0].scalar_type(), op, ": bypass has dtype ", bypass.scalar_type(),
              " but xs have dtype ", xs[0].scalar_type());
  TORCH_CHECK(bypass.device() == xs[0].device(), op, ": bypass is on ", bypass.device(), " but xs are on ",
              xs[0].device());
  return check_partial_channel(op, xs[0].sizes(), bypass, groups, bypass_pool);
}

// The backward: the xs shape follows from grad_out and the bypass, whose data
// is checked only when it is read.
inline PartialChannelShape check_partial_channel_mixed_sum_backward(
    const char* op, const at::Tensor& grad_out, at::TensorList xs, const at::Tensor& weights, const at::Tensor& bypass,
    int64_t groups, bool bypass_pool, const std::vector<bool>& xs_need_grad, bool weights_need_grad,
    bool bypass_need_grad, c10::DeviceType type) {
  check_backward_common(op, grad_out, xs, weights, xs_need_grad, weights_need_grad);
  check_device_type(op, "grad_out", grad_out, type);
  TORCH_CHECK(grad_out.dim() == 4, op, ": grad_out must be 4-D NCHW, got shape ", grad_out.sizes());
  TORCH_CHECK(bypass.dim() == 4, op, ": bypass must be a 4-D NCHW tensor, got shape ", bypass.sizes());
  const int64_t cb = bypass.size(1);
  TORCH_CHECK(grad_out.size(1) >= cb, op, ": grad_out has ", grad_out.size(1), " channels, fewer than the bypass's ",
              cb);
  const std::vector<int64_t> x_shape{grad_out.size(0), grad_out.size(1) - cb, grad_out.size(2), grad_out.size(3)};
  const PartialChannelShape s = check_partial_channel(op, x_shape, bypass, groups, bypass_pool);
  check_xs_shape(op, xs, x_shape);
  if (bypass_need_grad) {
    check_same_dtype(op, "bypass", bypass, "grad_out", grad_out);
    check_same_device(op, "bypass", bypass, "grad_out", grad_out);
  }
  return s;
}

}  // namespace fastnas
