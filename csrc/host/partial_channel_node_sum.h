// partial_channel_node_sum's shape and argument checks, shared by its CPU and
// CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "checks.h"
#include "host/partial_channel_mixed_sum.h"

namespace fastnas {

// Node geometry: mixed (N, Cp, H, W), bypass (N, Cb, H, W) or (N, Cb, 2H, 2W),
// one per edge.
struct NodeShape : PartialChannelShape {
  int64_t edges;
};

// ref (mixed[0] in forward, grad_out in backward) sets the dtype and device
// every tensor must have; mixed is not empty.
inline NodeShape check_node(const char* op, at::TensorList mixed, at::TensorList bypass, const at::Tensor& weights,
                            int64_t groups, at::IntArrayRef strides, const char* ref_name, const at::Tensor& ref,
                            c10::DeviceType type) {
  const int64_t e_count = static_cast<int64_t>(strides.size());
  check_count(op, e_count);
  TORCH_CHECK(static_cast<int64_t>(mixed.size()) == e_count, op, ": mixed has ", mixed.size(),
              " tensors but strides has ", e_count, " entries");
  TORCH_CHECK(static_cast<int64_t>(bypass.size()) == e_count, op, ": bypass has ", bypass.size(),
              " tensors but strides has ", e_count, " entries");
  check_dtype(op, ref_name, ref);
  check_device_type(op, ref_name, ref, type);
  const auto dtype = ref.scalar_type();
  const auto device = ref.device();
  const at::Tensor& m0 = mixed[0];
  TORCH_CHECK(m0.dim() == 4, op, ": mixed[0] must be a 4-D NCHW tensor, got shape ", m0.sizes());
  TORCH_CHECK(bypass[0].dim() == 4, op, ": bypass[0] must be a 4-D NCHW tensor, got shape ", bypass[0].sizes());
  NodeShape s{{m0.size(0), m0.size(1), bypass[0].size(1), m0.size(2), m0.size(3), groups}, e_count};
  for (int64_t e = 0; e < e_count; ++e) {
    const at::Tensor& m = mixed[e];
    const at::Tensor& b = bypass[e];
    TORCH_CHECK(m.sizes() == m0.sizes(), op, ": mixed[", e, "] has shape ", m.sizes(), " but mixed[0] has ",
                m0.sizes());
    TORCH_CHECK(m.scalar_type() == dtype, op, ": mixed[", e, "] has dtype ", m.scalar_type(), "; expected ", dtype);
    TORCH_CHECK(m.device() == device, op, ": mixed[", e, "] is on ", m.device(), "; expected ", device);
    TORCH_CHECK(b.dim() == 4, op, ": bypass[", e, "] must be a 4-D NCHW tensor, got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, op, ": bypass[", e, "] has dtype ", b.scalar_type(), "; expected ", dtype);
    TORCH_CHECK(b.device() == device, op, ": bypass[", e, "] is on ", b.device(), "; expected ", device);
    TORCH_CHECK(b.size(0) == s.n, op, ": bypass[", e, "] has batch size ", b.size(0), " but mixed has ", s.n);
    TORCH_CHECK(b.size(1) == s.cb, op, ": bypass[", e, "] has ", b.size(1), " channels but bypass[0] has ", s.cb);
    const int64_t st = strides[e];
    TORCH_CHECK(st == 1 || st == 2, op, ": strides[", e, "]=", st, "; each stride must be 1 or 2");
    TORCH_CHECK(b.size(2) == st * s.h && b.size(3) == st * s.w, op, ": bypass[", e, "] is ", b.size(2), "x", b.size(3),
                " but strides[", e, "]=", st, " needs ", st * s.h, "x", st * s.w, " for mixed outputs of ", s.h, "x",
                s.w);
  }
  check_weights(op, weights, e_count, device);
  TORCH_CHECK(groups >= 1 && s.channels() % groups == 0, op, ": groups=", groups, " must be >= 1 and divide the ",
              s.channels(), " output channels");
  return s;
}

inline NodeShape check_node_forward(const char* op, at::TensorList mixed, at::TensorList bypass,
                                    const at::Tensor& weights, int64_t groups, at::IntArrayRef strides,
                                    c10::DeviceType type) {
  TORCH_CHECK(!mixed.empty(), op, ": mixed is empty; a node needs at least one edge");
  return check_node(op, mixed, bypass, weights, groups, strides, "mixed[0]", mixed[0], type);
}

inline NodeShape check_node_backward(const char* op, const at::Tensor& grad_out, at::TensorList mixed,
                                     at::TensorList bypass, const at::Tensor& weights, int64_t groups,
                                     at::IntArrayRef strides, const std::vector<bool>& mixed_need,
                                     const std::vector<bool>& bypass_need, c10::DeviceType type) {
  TORCH_CHECK(!mixed.empty(), op, ": mixed is empty; a node needs at least one edge");
  const NodeShape s = check_node(op, mixed, bypass, weights, groups, strides, "grad_out", grad_out, type);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.n && grad_out.size(1) == s.channels() &&
                  grad_out.size(2) == s.h && grad_out.size(3) == s.w,
              op, ": grad_out has shape ", grad_out.sizes(), "; expected (", s.n, ", ", s.channels(), ", ", s.h, ", ",
              s.w, ")");
  TORCH_CHECK(static_cast<int64_t>(mixed_need.size()) == s.edges, op, ": mixed_need_grad has ", mixed_need.size(),
              " entries but there are ", s.edges, " edges");
  TORCH_CHECK(static_cast<int64_t>(bypass_need.size()) == s.edges, op, ": bypass_need_grad has ", bypass_need.size(),
              " entries but there are ", s.edges, " edges");
  return s;
}

}  // namespace fastnas
