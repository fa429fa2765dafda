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
#include "cpu/weighted_sum.h"

namespace fastnas {
namespace cpu {
namespace {

constexpr const char* kForward = "partial_channel_node_sum";
constexpr const char* kBackward = "partial_channel_node_sum_backward";

// Node geometry: mixed (N, Cp, H, W), bypass (N, Cb, H, W) or (N, Cb, 2H, 2W).
struct NodeShape {
  int64_t n, cp, cb, h, w, groups, edges;
  int64_t channels() const { return cp + cb; }
  int64_t channels_per_group() const { return (cp + cb) / groups; }
  int64_t plane() const { return h * w; }
};

NodeShape check_node(const char* op, at::TensorList mixed, at::TensorList bypass, const at::Tensor& weights,
                     int64_t groups, at::IntArrayRef strides, at::ScalarType dtype, const at::Device& device) {
  const int64_t e_count = static_cast<int64_t>(strides.size());
  check_count(op, e_count);
  TORCH_CHECK(static_cast<int64_t>(mixed.size()) == e_count, op, ": mixed has ", mixed.size(),
              " tensors but strides has ", e_count, " entries");
  TORCH_CHECK(static_cast<int64_t>(bypass.size()) == e_count, op, ": bypass has ", bypass.size(),
              " tensors but strides has ", e_count, " entries");
  TORCH_CHECK(supported_dtype(dtype), op, ": dtype ", dtype, " is not supported; expected float32, float16, ",
              "bfloat16 or float64");
  TORCH_CHECK(device.is_cpu(), op, ": the CPU kernel got tensors on ", device);
  const at::Tensor& m0 = mixed[0];
  TORCH_CHECK(m0.dim() == 4, op, ": mixed[0] must be a 4-D NCHW tensor, got shape ", m0.sizes());
  TORCH_CHECK(bypass[0].dim() == 4, op, ": bypass[0] must be a 4-D NCHW tensor, got shape ", bypass[0].sizes());
  NodeShape s{m0.size(0), m0.size(1), bypass[0].size(1), m0.size(2), m0.size(3), groups, e_count};
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

// A chunk of one output plane: plane index (over N * C) and element range.
struct PlaneChunk {
  int64_t plane, off, len;
};

inline PlaneChunk plane_chunk(int64_t task, int64_t chunks_per_plane, int64_t plane_size) {
  PlaneChunk pc;
  pc.plane = task / chunks_per_plane;
  pc.off = (task - pc.plane * chunks_per_plane) * kChunk;
  pc.len = std::min(kChunk, plane_size - pc.off);
  return pc;
}

// One edge's bypass: its data and strides (elements), and its pooling stride.
template <typename scalar_t>
struct BypassView {
  const scalar_t* data;
  int64_t sn, sc, sh, sw;
  int64_t stride;
};

// P_e(bypass) at output positions [off, off + len) of one (n, c) plane, in
// acc_t; on stride-2 edges also which window element each maximum came from.
// Row by row, so the inner loops have no wrap-around.
template <typename scalar_t, typename acc_t>
inline void gather_bypass(const BypassView<scalar_t>& b, const scalar_t* plane, int64_t w, int64_t off, int64_t len,
                          acc_t* __restrict__ vals, int8_t* __restrict__ arg) {
  const int64_t sh = b.sh, sw = b.sw;
  int64_t oh = off / w, ow = off - (off / w) * w;
  for (int64_t i = 0; i < len; ++oh, ow = 0) {
    const int64_t run = std::min(w - ow, len - i);
    acc_t* __restrict__ v = vals + i;
    if (b.stride == 1) {
      const scalar_t* __restrict__ src = plane + oh * sh + ow * sw;
      if (sw == 1) {
        for (int64_t j = 0; j < run; ++j) v[j] = static_cast<acc_t>(src[j]);
      } else {
        for (int64_t j = 0; j < run; ++j) v[j] = static_cast<acc_t>(src[j * sw]);
      }
    } else {
      const scalar_t* __restrict__ top = plane + (2 * oh) * sh + (2 * ow) * sw;
      const scalar_t* __restrict__ bottom = top + sh;
      for (int64_t j = 0; j < run; ++j) {
        const int64_t x0 = 2 * j * sw, x1 = x0 + sw;
        const auto r = math::max_pool_2x2<acc_t>(top[x0], top[x1], bottom[x0], bottom[x1]);
        v[j] = r.value;
        if (arg != nullptr) arg[i + j] = static_cast<int8_t>(r.index);
      }
    }
    i += run;
  }
}

// Gradient of a pooled stride-2 bypass at output positions [off, off + len):
// each 2x2 window of the contiguous (2h, 2w) plane gets wk * g at its argmax
// and zeros elsewhere. The windows tile the plane, so every element is written.
template <typename scalar_t, typename acc_t>
inline void scatter_pool_grad(const acc_t* __restrict__ g, acc_t wk, const int8_t* __restrict__ arg, int64_t w,
                              int64_t off, int64_t len, scalar_t* __restrict__ grad) {
  int64_t oh = off / w, ow = off - (off / w) * w;
  for (int64_t i = 0; i < len; ++oh, ow = 0) {
    const int64_t run = std::min(w - ow, len - i);
    scalar_t* __restrict__ g_top = grad + (2 * oh) * (2 * w) + 2 * ow;
    scalar_t* __restrict__ g_bottom = g_top + 2 * w;
    for (int64_t j = 0; j < run; ++j) {
      const scalar_t v = static_cast<scalar_t>(wk * g[i + j]);
      const int a = arg[i + j];
      g_top[2 * j] = math::pool_grad_at(0, a, v);
      g_top[2 * j + 1] = math::pool_grad_at(1, a, v);
      g_bottom[2 * j] = math::pool_grad_at(2, a, v);
      g_bottom[2 * j + 1] = math::pool_grad_at(3, a, v);
    }
    i += run;
  }
}

template <typename scalar_t>
std::vector<BypassView<scalar_t>> bypass_views(at::TensorList bypass, at::IntArrayRef strides) {
  std::vector<BypassView<scalar_t>> views;
  for (size_t e = 0; e < bypass.size(); ++e) {
    const at::Tensor& b = bypass[e];
    views.push_back({b.data_ptr<scalar_t>(), b.stride(0), b.stride(1), b.stride(2), b.stride(3), strides[e]});
  }
  return views;
}

at::Tensor partial_channel_node_sum(at::TensorList mixed, at::TensorList bypass, const at::Tensor& weights,
                                    int64_t groups, at::IntArrayRef strides) {
  TORCH_CHECK(!mixed.empty(), kForward, ": mixed is empty; a node needs at least one edge");
  const auto dtype = mixed[0].scalar_type();
  const NodeShape s = check_node(kForward, mixed, bypass, weights, groups, strides, dtype, mixed[0].device());
  at::Tensor out = at::empty({s.n, s.channels(), s.h, s.w}, mixed[0].options());
  if (out.numel() == 0) return out;
  const auto mc = contiguous_all(mixed);
  const at::Tensor w = weights_for_accumulation(weights, dtype);
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
    at::parallel_for(0, tasks, grain_in_chunks(std::min(hw, kChunk)), [&](int64_t begin, int64_t end) {
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
          gather_bypass(b, b.data + n * b.sn + cb * b.sc, s.w, pc.off, pc.len, vals, static_cast<int8_t*>(nullptr));
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
  TORCH_CHECK(!mixed.empty(), kBackward, ": mixed is empty; a node needs at least one edge");
  const auto dtype = grad_out.scalar_type();
  const NodeShape s = check_node(kBackward, mixed, bypass, weights, groups, strides, dtype, grad_out.device());
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.n && grad_out.size(1) == s.channels() &&
                  grad_out.size(2) == s.h && grad_out.size(3) == s.w,
              kBackward, ": grad_out has shape ", grad_out.sizes(), "; expected (", s.n, ", ", s.channels(), ", ", s.h,
              ", ", s.w, ")");
  TORCH_CHECK(static_cast<int64_t>(mixed_need.size()) == s.edges, kBackward, ": mixed_need_grad has ",
              mixed_need.size(), " entries but there are ", s.edges, " edges");
  TORCH_CHECK(static_cast<int64_t>(bypass_need.size()) == s.edges, kBackward, ": bypass_need_grad has ",
              bypass_need.size(), " entries but there are ", s.edges, " edges");

  const auto acc_dtype = accumulate_dtype(dtype);
  const auto contiguous = grad_out.options().memory_format(at::MemoryFormat::Contiguous);
  std::vector<at::Tensor> grad_mixed = new_input_grads(mixed[0].sizes(), grad_out.options(), mixed_need);
  std::vector<at::Tensor> grad_bypass;
  for (int64_t e = 0; e < s.edges; ++e) {
    if (bypass_need[e]) grad_bypass.push_back(at::empty(bypass[e].sizes(), contiguous));
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
  const at::Tensor w = weights_for_accumulation(weights, dtype);
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
    at::parallel_for(0, tasks, grain_in_chunks(std::min(hw, kChunk)), [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[kChunk];
      alignas(64) acc_t vals[kChunk];
      alignas(64) int8_t arg[kChunk];
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
