// multi_depthwise's shapes, argument checks and the candidates' tap layout,
// shared by its CPU and CUDA kernels.
//
// x is (N, C, H, W), shared by all J candidates, or (J, C, N, H, W), one input
// per candidate (which may carry a batch-norm prologue, mean and rstd (J, C));
// the output is (J, C, N, Ho, Wo). A "group" is the unit that owns one input
// plane stream: a channel c (shared x, all J candidates read it) or a pair
// (j, c) (per-candidate x).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "checks.h"

namespace fastnas {

// The largest depthwise kernel: the kernels keep a candidate's taps in fixed-size arrays.
constexpr int64_t kMaxDepthwiseKernel = 15;

struct DepthwiseCandidate {
  int64_t k, d, pad;  // kernel size, dilation, zero padding
};

struct DepthwiseShape {
  int64_t J, C, N, H, W, Ho, Wo, stride;
  bool shared;
  int64_t groups() const { return shared ? C : J * C; }
  int64_t in_plane() const { return H * W; }
  int64_t out_plane() const { return Ho * Wo; }
};

inline void check_multi_depthwise(const char* op, const at::Tensor& x, at::TensorList weights,
                                  at::IntArrayRef dilations, int64_t stride, const std::optional<at::Tensor>& mean,
                                  const std::optional<at::Tensor>& rstd, c10::DeviceType type) {
  check_dtype(op, "x", x);
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, op,
              ": x must be (N, C, H, W) shared by all candidates or (J, C, N, H, W) per candidate, got shape ",
              x.sizes());
  check_device_type(op, "x", x, type);
  const int64_t J = static_cast<int64_t>(weights.size());
  TORCH_CHECK(J >= 1, op, ": weights is empty; it needs at least one candidate");
  TORCH_CHECK(static_cast<int64_t>(dilations.size()) == J, op, ": dilations has ", dilations.size(),
              " entries but weights has ", J);
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  const bool shared = x.dim() == 4;
  const int64_t C = x.size(1);
  if (!shared) {
    TORCH_CHECK(x.size(0) == J, op, ": x has ", x.size(0), " candidates (dim 0) but weights has ", J);
  }
  for (int64_t j = 0; j < J; ++j) {
    const at::Tensor& w = weights[j];
    TORCH_CHECK(w.dim() == 4 && w.size(0) == C && w.size(1) == 1 && w.size(2) == w.size(3), op, ": weights[", j,
                "] must be (", C, ", 1, k, k) for x's ", C, " channels, got shape ", w.sizes());
    TORCH_CHECK(w.size(2) % 2 == 1, op, ": weights[", j, "] has an even kernel size ", w.size(2), "; it must be odd");
    TORCH_CHECK(w.size(2) <= kMaxDepthwiseKernel, op, ": weights[", j, "] has kernel size ", w.size(2), "; at most ",
                kMaxDepthwiseKernel, " is supported");
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": weights[", j, "] has dtype ", w.scalar_type(),
                " but x has dtype ", x.scalar_type());
    TORCH_CHECK(w.device() == x.device(), op, ": weights[", j, "] is on ", w.device(), " but x is on ", x.device());
    TORCH_CHECK(dilations[j] >= 1, op, ": dilations[", j, "] must be >= 1, got ", dilations[j]);
  }
  TORCH_CHECK(mean.has_value() == rstd.has_value(), op, ": mean and rstd must be given together (got only ",
              mean.has_value() ? "mean" : "rstd", ")");
  if (mean.has_value()) {
    TORCH_CHECK(!shared, op, ": mean/rstd need a per-candidate x of shape (J, C, N, H, W); x is shared, shape ",
                x.sizes());
    for (const auto* t : {&*mean, &*rstd}) {
      const char* name = t == &*mean ? "mean" : "rstd";
      TORCH_CHECK(t->dim() == 2 && t->size(0) == J && t->size(1) == C, op, ": ", name, " must have shape (", J, ", ", C,
                  "), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
      check_same_device(op, name, *t, "x", x);
    }
  }
}

inline void check_multi_depthwise_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                           const DepthwiseShape& s) {
  const std::vector<int64_t> out_shape{s.J, s.C, s.N, s.Ho, s.Wo};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), op, ": grad_out has shape ", grad_out.sizes(),
              "; expected ", at::IntArrayRef(out_shape));
  check_same_dtype(op, "grad_out", grad_out, "x", x);
  check_same_device(op, "grad_out", grad_out, "x", x);
}

// The shape of a checked call, and its candidates.
inline DepthwiseShape depthwise_shape(const at::Tensor& x, at::TensorList weights, int64_t stride) {
  DepthwiseShape s{};
  s.shared = x.dim() == 4;
  s.J = static_cast<int64_t>(weights.size());
  s.C = x.size(1);
  s.N = s.shared ? x.size(0) : x.size(2);
  s.H = x.size(s.shared ? 2 : 3);
  s.W = x.size(s.shared ? 3 : 4);
  s.stride = stride;
  s.Ho = math::same_padding_out_size(s.H, stride);
  s.Wo = math::same_padding_out_size(s.W, stride);
  return s;
}

inline std::vector<DepthwiseCandidate> depthwise_candidates(at::TensorList weights, at::IntArrayRef dilations) {
  std::vector<DepthwiseCandidate> cands;
  for (size_t j = 0; j < weights.size(); ++j) {
    const int64_t k = weights[j].size(2), d = dilations[j];
    cands.push_back({k, d, math::depthwise_padding(k, d)});
  }
  return cands;
}

// Where candidate j's k*k taps start in a row of all candidates' taps; the
// last entry is the total.
inline std::vector<int64_t> tap_offsets(const std::vector<DepthwiseCandidate>& cands) {
  std::vector<int64_t> offsets(cands.size() + 1, 0);
  for (size_t j = 0; j < cands.size(); ++j) offsets[j + 1] = offsets[j] + cands[j].k * cands[j].k;
  return offsets;
}

}  // namespace fastnas
