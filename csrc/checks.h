// Argument checks at the op boundary, shared by the CPU and CUDA kernels, so
// that bad input is reported by name before it can reach a kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

#include "fastnas_math.h"

namespace fastnas {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// fp32 for every supported dtype except fp64, as at::opmath_type.
inline at::ScalarType accumulate_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_count(const char* op, int64_t k) {
  TORCH_CHECK(k >= 1, op, ": needs at least one input tensor, got K=", k);
  TORCH_CHECK(k <= math::kMaxInputs, op, ": K=", k, " tensors; at most ", math::kMaxInputs, " are supported per call");
}

inline void check_weights(const char* op, const at::Tensor& weights, int64_t k, const at::Device& device) {
  TORCH_CHECK(weights.dim() == 1, op, ": weights must be 1-D, got shape ", weights.sizes());
  TORCH_CHECK(weights.size(0) == k, op, ": weights has ", weights.size(0), " entries but K=", k);
  TORCH_CHECK(supported_dtype(weights.scalar_type()), op, ": weights has dtype ", weights.scalar_type(),
              "; expected float32, float16, bfloat16 or float64");
  TORCH_CHECK(weights.device() == device, op, ": weights is on ", weights.device(), " but the inputs are on ", device);
}

// xs: K tensors of one shape, dtype and device.
inline void check_xs(const char* op, at::TensorList xs) {
  check_count(op, static_cast<int64_t>(xs.size()));
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(supported_dtype(x0.scalar_type()), op, ": xs[0] has dtype ", x0.scalar_type(),
              "; expected float32, float16, bfloat16 or float64");
  for (size_t k = 1; k < xs.size(); ++k) {
    TORCH_CHECK(xs[k].sizes() == x0.sizes(), op, ": xs[", k, "] has shape ", xs[k].sizes(), " but xs[0] has shape ",
                x0.sizes());
    TORCH_CHECK(xs[k].scalar_type() == x0.scalar_type(), op, ": xs[", k, "] has dtype ", xs[k].scalar_type(),
                " but xs[0] has dtype ", x0.scalar_type());
    TORCH_CHECK(xs[k].device() == x0.device(), op, ": xs[", k, "] is on ", xs[k].device(), " but xs[0] is on ",
                x0.device());
  }
}

// The backward ops get xs only when the weights need a gradient; K then
// comes from the weights and the per-input flags.
inline void check_backward_common(const char* op, const at::Tensor& grad_out, at::TensorList xs,
                                  const at::Tensor& weights, const std::vector<bool>& xs_need_grad,
                                  bool weights_need_grad) {
  TORCH_CHECK(supported_dtype(grad_out.scalar_type()), op, ": grad_out has dtype ", grad_out.scalar_type(),
              "; expected float32, float16, bfloat16 or float64");
  TORCH_CHECK(weights.dim() == 1, op, ": weights must be 1-D, got shape ", weights.sizes());
  const int64_t k = weights.size(0);
  check_count(op, k);
  check_weights(op, weights, k, grad_out.device());
  TORCH_CHECK(static_cast<int64_t>(xs_need_grad.size()) == k, op, ": xs_need_grad has ", xs_need_grad.size(),
              " entries but weights has ", k);
  if (weights_need_grad) {
    TORCH_CHECK(static_cast<int64_t>(xs.size()) == k, op, ": weights_need_grad=True needs all ", k, " inputs xs, got ",
                xs.size());
  } else {
    TORCH_CHECK(xs.empty() || static_cast<int64_t>(xs.size()) == k, op, ": xs has ", xs.size(),
                " tensors; expected 0 or ", k);
  }
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].scalar_type() == grad_out.scalar_type(), op, ": xs[", i, "] has dtype ", xs[i].scalar_type(),
                " but grad_out has dtype ", grad_out.scalar_type());
    TORCH_CHECK(xs[i].device() == grad_out.device(), op, ": xs[", i, "] is on ", xs[i].device(), " but grad_out is on ",
                grad_out.device());
  }
}

// The backward ops check xs against the input shape that grad_out implies.
inline void check_xs_shape(const char* op, at::TensorList xs, at::IntArrayRef shape) {
  for (size_t k = 0; k < xs.size(); ++k) {
    TORCH_CHECK(xs[k].sizes() == shape, op, ": xs[", k, "] has shape ", xs[k].sizes(), " but grad_out implies ", shape);
  }
}

// A new contiguous gradient for each input that needs one, in input order.
inline std::vector<at::Tensor> new_input_grads(at::IntArrayRef shape, const at::TensorOptions& options,
                                               const std::vector<bool>& need) {
  std::vector<at::Tensor> grads;
  for (const bool n : need) {
    if (n) grads.push_back(at::empty(shape, options.memory_format(at::MemoryFormat::Contiguous)));
  }
  return grads;
}

// Weights in the accumulation dtype, contiguous, on the weights' device.
inline at::Tensor weights_for_accumulation(const at::Tensor& weights, at::ScalarType x_dtype) {
  return weights.to(accumulate_dtype(x_dtype)).contiguous();
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList xs) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.contiguous());
  return out;
}

// PC-DARTS geometry: xs (N, Cp, H, W), bypass (N, Cb, H, W) or (N, Cb, 2H, 2W).
struct PartialChannelShape {
  int64_t n, cp, cb, h, w, groups;
  int64_t channels() const { return cp + cb; }
  int64_t channels_per_group() const { return (cp + cb) / groups; }
  int64_t plane() const { return h * w; }
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

// The backward of partial_channel_mixed_sum: the xs shape follows from grad_out
// and the bypass, whose data is checked only when it is read.
inline PartialChannelShape check_partial_channel_backward(const char* op, const at::Tensor& grad_out, at::TensorList xs,
                                                          const at::Tensor& bypass, int64_t groups, bool bypass_pool,
                                                          bool bypass_need_grad) {
  TORCH_CHECK(grad_out.dim() == 4, op, ": grad_out must be 4-D NCHW, got shape ", grad_out.sizes());
  TORCH_CHECK(bypass.dim() == 4, op, ": bypass must be a 4-D NCHW tensor, got shape ", bypass.sizes());
  const int64_t cb = bypass.size(1);
  TORCH_CHECK(grad_out.size(1) >= cb, op, ": grad_out has ", grad_out.size(1), " channels, fewer than the bypass's ",
              cb);
  const std::vector<int64_t> x_shape{grad_out.size(0), grad_out.size(1) - cb, grad_out.size(2), grad_out.size(3)};
  const PartialChannelShape s = check_partial_channel(op, x_shape, bypass, groups, bypass_pool);
  check_xs_shape(op, xs, x_shape);
  if (bypass_need_grad) {
    TORCH_CHECK(bypass.scalar_type() == grad_out.scalar_type(), op, ": bypass has dtype ", bypass.scalar_type(),
                " but grad_out has dtype ", grad_out.scalar_type());
    TORCH_CHECK(bypass.device() == grad_out.device(), op, ": bypass is on ", bypass.device(), " but grad_out is on ",
                grad_out.device());
  }
  return s;
}

}  // namespace fastnas
