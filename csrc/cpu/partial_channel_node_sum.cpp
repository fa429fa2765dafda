// partial_channel_node_sum on CPU: a PC-DARTS node,
// sum_e weights[e] * channel_shuffle(cat([mixed[e], P_e(bypass[e])], 1), groups),
// in one pass, and its backward.
//
// Work is cut into chunks of output planes, in output-channel order, so every
// output element is written once and in sequence. A chunk of an output channel
// that comes from the mixed half is a weighted sum of E contiguous rows; one
// from the bypass half reads each edge's bypass through its strides (the
// bypass is usually the view h_e[:, Cp:]), 2x2 max-pooled on stride-2 edges.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/bypass.h"
#include "cpu/loops.h"
#include "cpu/weighted_sum.h"
#include "host/partial_channel_node_sum.h"

namespace fastnas {
namespace cpu {
namespace {

constexpr const char* kForward = "partial_channel_node_sum";
constexpr const char* kBackward = "partial_channel_node_sum_backward";

at::Tensor partial_channel_node_sum(at::TensorList mixed, at::TensorList bypass, const at::Tensor& weights,
                                    int64_t groups, at::IntArrayRef strides) {
  const NodeShape s = check_node_forward(kForward, mixed, bypass, weights, groups, strides, at::kCPU);
  const auto dtype = mixed[0].scalar_type();
  at::Tensor out = at::empty({s.n, s.channels(), s.h, s.w}, mixed[0].options());
  if (out.numel() == 0) return out;
  const auto mc = contiguous_all(mixed);
  const at::Tensor w = for_accumulation(weights, dtype);
  const int64_t hw = s.plane(), channels = s.channels(), cpg = s.channels_per_group();
  const int64_t chunks_per_plane = ceil_div(hw, kChunk);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "partial_channel_node_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> ptrs;
    for (const auto& m : mc) ptrs.push_back(m.data_ptr<scalar_t>());
    const auto views = bypass_views<scalar_t>(bypass, strides);
    const acc_t* wp = w.data_ptr<acc_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const int64_t tasks = s.n * channels * chunks_per_plane;
    at::parallel_for(0, tasks, grain_for(std::min(hw, kChunk)), [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
      alignas(64) acc_t buf[kChunk];
      alignas(64) acc_t vals[kChunk];
      for (int64_t t = begin; t < end; ++t) {
        const PlaneChunk pc = plane_chunk(t, chunks_per_plane, hw);
        const int64_t n = pc.plane / channels, oc = pc.plane - n * channels;
        const int64_t c = math::unshuffled_channel(oc, cpg, groups);
        scalar_t* dst = outp + pc.plane * hw + pc.off;
        if (c < s.cp) {
          weighted_sum_chunk(ptrs.data(), s.edges, wp, (n * s.cp + c) * hw + pc.off, pc.len, dst, buf);
          continue;
        }
        const int64_t cb = c - s.cp;
        for (int64_t e = 0; e < s.edges; ++e) {
          const auto& b = views[e];
          gather_bypass(b, b.data + n * b.sn + cb * b.sc, s.w, pc.off, pc.len, vals, static_cast<int32_t*>(nullptr));
          const acc_t we = wp[e];
          if (e == 0) {
            for (int64_t i = 0; i < pc.len; ++i) buf[i] = math::weighted_accumulate(acc_t(0), we, vals[i]);
          } else {
            for (int64_t i = 0; i < pc.len; ++i) buf[i] = math::weighted_accumulate(buf[i], we, vals[i]);
          }
        }
        for (int64_t i = 0; i < pc.len; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
      }
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> partial_channel_node_sum_backward(
    const at::Tensor& grad_out, at::TensorList mixed, at::TensorList bypass, const at::Tensor& weights, int64_t groups,
    at::IntArrayRef strides, const c10::List<bool>& mixed_need_grad_list, const c10::List<bool>& bypass_need_grad_list,
    bool weights_need_grad) {
  const std::vector<bool> mixed_need = mixed_need_grad_list.vec();
  const std::vector<bool> bypass_need = bypass_need_grad_list.vec();
  const NodeShape s = check_node_backward(kBackward, grad_out, mixed, bypass, weights, groups, strides, mixed_need,
                                          bypass_need, at::kCPU);
  const auto dtype = grad_out.scalar_type();

  const auto acc_dtype = accumulate_dtype(dtype);
  std::vector<at::Tensor> grad_mixed = new_input_grads(mixed[0].sizes(), grad_out.options(), mixed_need);
  std::vector<at::Tensor> grad_bypass;
  for (int64_t e = 0; e < s.edges; ++e) {
    if (bypass_need[e]) grad_bypass.push_back(empty_contiguous(bypass[e].sizes(), grad_out.options()));
  }
  at::Tensor grad_w_acc = at::zeros({weights_need_grad ? s.edges : 0}, weights.options().dtype(acc_dtype));
  const bool any_input_grad = !grad_mixed.empty() || !grad_bypass.empty();
  if (grad_out.numel() == 0 || (!any_input_grad && !weights_need_grad)) {
    return {std::move(grad_mixed), std::move(grad_bypass), grad_w_acc.to(weights.scalar_type())};
  }

  const at::Tensor go = grad_out.contiguous();
  // Unless the weights need a gradient, mixed may be zero-stride stand-ins
  // that only carry the shape: never read or copy them then.
  const auto mc = weights_need_grad ? contiguous_all(mixed) : std::vector<at::Tensor>{};
  const at::Tensor w = for_accumulation(weights, dtype);
  const int64_t hw = s.plane(), channels = s.channels(), cpg = s.channels_per_group();
  const int64_t chunks_per_plane = ceil_div(hw, kChunk);
  const int64_t tasks = s.n * channels * chunks_per_plane;
  at::Tensor partials = at::empty({weights_need_grad ? tasks : 0, s.edges}, weights.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "partial_channel_node_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gop = go.data_ptr<scalar_t>();
    std::vector<const scalar_t*> m_ptrs(s.edges, nullptr);
    for (size_t e = 0; e < mc.size(); ++e) m_ptrs[e] = mc[e].data_ptr<scalar_t>();
    std::vector<scalar_t*> gm_ptrs(s.edges, nullptr), gb_ptrs(s.edges, nullptr);
    for (int64_t e = 0, i = 0, j = 0; e < s.edges; ++e) {
      if (mixed_need[e]) gm_ptrs[e] = grad_mixed[i++].data_ptr<scalar_t>();
      if (bypass_need[e]) gb_ptrs[e] = grad_bypass[j++].data_ptr<scalar_t>();
    }
    const auto views = bypass_views<scalar_t>(bypass, strides);
    const acc_t* wp = w.data_ptr<acc_t>();
    acc_t* pp = weights_need_grad ? partials.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, tasks, grain_for(std::min(hw, kChunk)), [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
      alignas(64) acc_t buf[kChunk];
      alignas(64) acc_t vals[kChunk];
      alignas(64) int32_t arg[kChunk];
      for (int64_t t = begin; t < end; ++t) {
        const PlaneChunk pc = plane_chunk(t, chunks_per_plane, hw);
        const int64_t n = pc.plane / channels, oc = pc.plane - n * channels;
        const int64_t c = math::unshuffled_channel(oc, cpg, groups);
        const scalar_t* g = gop + pc.plane * hw + pc.off;
        acc_t* dots = pp != nullptr ? pp + t * s.edges : nullptr;
        if (c < s.cp) {
          weighted_sum_backward_chunk(g, gm_ptrs.data(), m_ptrs.data(), s.edges, wp, (n * s.cp + c) * hw + pc.off,
                                      pc.len, dots, buf);
          continue;
        }
        const int64_t cb = c - s.cp;
        for (int64_t i = 0; i < pc.len; ++i) buf[i] = static_cast<acc_t>(g[i]);
        for (int64_t e = 0; e < s.edges; ++e) {
          const auto& b = views[e];
          const bool pooled = b.stride == 2;
          if (weights_need_grad || (pooled && bypass_need[e])) {
            gather_bypass(b, b.data + n * b.sn + cb * b.sc, s.w, pc.off, pc.len, vals, pooled ? arg : nullptr);
          }
          if (dots != nullptr) dots[e] = chunk_dot(buf, vals, pc.len);
          if (!bypass_need[e]) continue;
          const acc_t we = wp[e];
          if (pooled) {
            scatter_pool_grad(buf, we, arg, s.w, pc.off, pc.len, gb_ptrs[e] + (n * s.cb + cb) * (4 * hw));
          } else {
            scalar_t* gb = gb_ptrs[e] + (n * s.cb + cb) * hw + pc.off;
            for (int64_t i = 0; i < pc.len; ++i) gb[i] = static_cast<scalar_t>(we * buf[i]);
          }
        }
      }
    });
    if (weights_need_grad) sum_partials(pp, tasks, s.edges, grad_w_acc.data_ptr<acc_t>());
  });
  return {std::move(grad_mixed), std::move(grad_bypass), grad_w_acc.to(weights.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("partial_channel_node_sum", &fastnas::cpu::partial_channel_node_sum);
  m.impl("partial_channel_node_sum_backward", &fastnas::cpu::partial_channel_node_sum_backward);
}
