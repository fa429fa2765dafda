// Host-side helpers shared by every op's argument checks (csrc/checks/<op>.h)
// and by the CPU and CUDA kernels' set-up, so that bad input is reported by
// name before it can reach a kernel, in the same words everywhere.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <vector>

#include "fastnas_math.h"

namespace fastnas {

constexpr const char* kDtypeNames = "float32, float16, bfloat16 or float64";

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// The dtype every op accumulates in: fp32 for every supported dtype except
// fp64, as at::opmath_type. The one home of this rule on the host.
inline at::ScalarType accumulate_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// t converted to the accumulation dtype of x_dtype, contiguous (weights, statistics, coefficients).
inline at::Tensor for_accumulation(const at::Tensor& t, at::ScalarType x_dtype) {
  return t.to(accumulate_dtype(x_dtype)).contiguous();
}

inline std::vector<at::Tensor> for_accumulation_all(at::TensorList ts, at::ScalarType x_dtype) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(for_accumulation(t, x_dtype));
  return out;
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList xs) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.contiguous());
  return out;
}

// A new tensor of `shape`, contiguous whatever the options' memory format.
inline at::Tensor empty_contiguous(at::IntArrayRef shape, const at::TensorOptions& options) {
  return at::empty(shape, options.memory_format(at::MemoryFormat::Contiguous));
}

// --- checks --------------------------------------------------------------------------

inline void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name, " has dtype ", t.scalar_type(), "; expected ",
              kDtypeNames);
}

// Statistics and coefficients: float32 or float64.
inline void check_stat_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name, " has dtype ",
              t.scalar_type(), "; expected float32 or float64");
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

// The device a kernel was registered for: only a call that mixes devices can
// reach a kernel with a tensor on another one.
inline void check_device_type(const char* op, const char* name, const at::Tensor& t, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, op, ": the ", c10::DeviceTypeName(type), " kernel got ", name, " on ",
              t.device());
}

inline void check_count(const char* op, int64_t k) {
  TORCH_CHECK(k >= 1, op, ": needs at least one input tensor, got K=", k);
  TORCH_CHECK(k <= math::kMaxInputs, op, ": K=", k, " tensors; at most ", math::kMaxInputs, " are supported per call");
}

inline void check_weights(const char* op, const at::Tensor& weights, int64_t k, const at::Device& device) {
  TORCH_CHECK(weights.dim() == 1, op, ": weights must be 1-D, got shape ", weights.sizes());
  TORCH_CHECK(weights.size(0) == k, op, ": weights has ", weights.size(0), " entries but K=", k);
  check_dtype(op, "weights", weights);
  TORCH_CHECK(weights.device() == device, op, ": weights is on ", weights.device(), " but the inputs are on ", device);
}

// xs: K tensors of one shape, dtype and device.
inline void check_xs(const char* op, at::TensorList xs) {
  check_count(op, static_cast<int64_t>(xs.size()));
  const at::Tensor& x0 = xs[0];
  check_dtype(op, "xs[0]", x0);
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
  check_dtype(op, "grad_out", grad_out);
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
    if (n) grads.push_back(empty_contiguous(shape, options));
  }
  return grads;
}

}  // namespace fastnas
