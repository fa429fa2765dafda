// partial_channel_mixed_sum on CPU: the PC-DARTS edge
// channel_shuffle(cat([sum_k weights[k] * xs[k], pool?(bypass)], 1), groups)
// in one pass, and its backward.
//
// Every (n, channel) plane of H*W elements is contiguous in the inputs and in
// the output, so the work is cut into chunks of a plane, each written straight
// to its shuffled output plane.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/bypass.h"
#include "cpu/loops.h"
#include "cpu/weighted_sum.h"
#include "host/partial_channel_mixed_sum.h"

namespace fastnas {
namespace cpu {
namespace {

constexpr const char* kForward = "partial_channel_mixed_sum";
constexpr const char* kBackward = "partial_channel_mixed_sum_backward";

// The contiguous bypass (N, Cb, H', W'), pooled 2x2 when bypass_pool.
template <typename scalar_t>
BypassView<scalar_t> contiguous_bypass(const at::Tensor& bc, bool bypass_pool) {
  return bypass_view<scalar_t>(bc, bypass_pool ? 2 : 1);
}

at::Tensor partial_channel_mixed_sum(at::TensorList xs, const at::Tensor& weights, const at::Tensor& bypass,
                                     int64_t groups, bool bypass_pool) {
  const PartialChannelShape s =
      check_partial_channel_mixed_sum(kForward, xs, weights, bypass, groups, bypass_pool, at::kCPU);
  const int64_t k_count = static_cast<int64_t>(xs.size());

  const auto dtype = xs[0].scalar_type();
  at::Tensor out = at::empty({s.n, s.channels(), s.h, s.w}, xs[0].options());
  const int64_t hw = s.plane();
  if (out.numel() == 0) return out;
  const auto xc = contiguous_all(xs);
  const at::Tensor bc = bypass.contiguous();
  const at::Tensor w = for_accumulation(weights, dtype);
  const int64_t chunks_per_plane = ceil_div(hw, kChunk);
  const int64_t channels = s.channels(), cpg = s.channels_per_group();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "partial_channel_mixed_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> ptrs;
    for (const auto& x : xc) ptrs.push_back(x.data_ptr<scalar_t>());
    const acc_t* wp = w.data_ptr<acc_t>();
    const BypassView<scalar_t> b = contiguous_bypass<scalar_t>(bc, bypass_pool);
    scalar_t* outp = out.data_ptr<scalar_t>();
    const int64_t tasks = s.n * channels * chunks_per_plane;
    at::parallel_for(0, tasks, grain_for(std::min(hw, kChunk)), [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
      alignas(64) acc_t buf[kChunk];
      for (int64_t t = begin; t < end; ++t) {
        const PlaneChunk pc = plane_chunk(t, chunks_per_plane, hw);
        const int64_t n = pc.plane / channels, c = pc.plane - n * channels;
        scalar_t* dst = outp + (n * channels + math::shuffled_channel(c, cpg, groups)) * hw + pc.off;
        if (c < s.cp) {
          weighted_sum_chunk(ptrs.data(), k_count, wp, (n * s.cp + c) * hw + pc.off, pc.len, dst, buf);
        } else if (bypass_pool) {
          gather_bypass(b, b.data + n * b.sn + (c - s.cp) * b.sc, s.w, pc.off, pc.len, buf,
                        static_cast<int32_t*>(nullptr));
          for (int64_t i = 0; i < pc.len; ++i) dst[i] = static_cast<scalar_t>(buf[i]);
        } else {
          const scalar_t* src = b.data + n * b.sn + (c - s.cp) * b.sc + pc.off;
          std::copy(src, src + pc.len, dst);
        }
      }
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> partial_channel_mixed_sum_backward(
    const at::Tensor& grad_out, at::TensorList xs, const at::Tensor& weights, const at::Tensor& bypass, int64_t groups,
    bool bypass_pool, const c10::List<bool>& xs_need_grad_list, bool weights_need_grad, bool bypass_need_grad) {
  const std::vector<bool> xs_need_grad = xs_need_grad_list.vec();
  const PartialChannelShape s =
      check_partial_channel_mixed_sum_backward(kBackward, grad_out, xs, weights, bypass, groups, bypass_pool,
                                               xs_need_grad, weights_need_grad, bypass_need_grad, at::kCPU);
  const std::vector<int64_t> x_shape{s.n, s.cp, s.h, s.w};

  const int64_t k_count = weights.size(0);
  const auto dtype = grad_out.scalar_type();
  const auto acc_dtype = accumulate_dtype(dtype);
  std::vector<at::Tensor> grad_xs = new_input_grads(x_shape, grad_out.options(), xs_need_grad);
  at::Tensor grad_w_acc = at::zeros({weights_need_grad ? k_count : 0}, weights.options().dtype(acc_dtype));
  at::Tensor grad_b = bypass_need_grad ? at::empty(bypass.sizes(), grad_out.options()) : grad_out.new_empty({0});

  const int64_t hw = s.plane();
  const int64_t channels = s.channels(), cpg = s.channels_per_group();
  if (grad_out.numel() == 0) return {std::move(grad_xs), grad_w_acc.to(weights.scalar_type()), grad_b};
  const at::Tensor go = grad_out.contiguous();
  const int64_t chunks_per_plane = ceil_div(hw, kChunk);
  const int64_t grain = grain_for(std::min(hw, kChunk));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "partial_channel_mixed_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gop = go.data_ptr<scalar_t>();

    if (s.cp > 0 && (weights_need_grad || !grad_xs.empty())) {
      const auto xc = weights_need_grad ? contiguous_all(xs) : std::vector<at::Tensor>{};
      const at::Tensor w = for_accumulation(weights, dtype);
      const int64_t tasks = s.n * s.cp * chunks_per_plane;
      at::Tensor partials = at::empty({weights_need_grad ? tasks : 0, k_count}, weights.options().dtype(acc_dtype));
      std::vector<scalar_t*> gx_ptrs(k_count, nullptr);
      for (int64_t k = 0, j = 0; k < k_count; ++k) {
        if (xs_need_grad[k]) gx_ptrs[k] = grad_xs[j++].data_ptr<scalar_t>();
      }
      std::vector<const scalar_t*> x_ptrs;
      for (const auto& x : xc) x_ptrs.push_back(x.data_ptr<scalar_t>());
      const acc_t* wp = w.data_ptr<acc_t>();
      acc_t* pp = weights_need_grad ? partials.data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
        alignas(64) acc_t buf[kChunk];
        for (int64_t t = begin; t < end; ++t) {
          const PlaneChunk pc = plane_chunk(t, chunks_per_plane, hw);
          const int64_t n = pc.plane / s.cp, c = pc.plane - n * s.cp;
          const scalar_t* g = gop + (n * channels + math::shuffled_channel(c, cpg, groups)) * hw + pc.off;
          weighted_sum_backward_chunk(g, gx_ptrs.data(), x_ptrs.data(), k_count, wp, pc.plane * hw + pc.off, pc.len,
                                      pp != nullptr ? pp + t * k_count : nullptr, buf);
        }
      });
      if (weights_need_grad) sum_partials(pp, tasks, k_count, grad_w_acc.data_ptr<acc_t>());
    }

    if (bypass_need_grad && s.cb > 0) {
      // The bypass is read only to find the pooling argmax: without pooling
      // Python passes a zero-stride stand-in that must not be touched.
      const at::Tensor bc = bypass_pool ? bypass.contiguous() : at::Tensor();
      const BypassView<scalar_t> b = bypass_pool ? contiguous_bypass<scalar_t>(bc, true) : BypassView<scalar_t>{};
      scalar_t* gbp = grad_b.data_ptr<scalar_t>();
      const int64_t bypass_plane = bypass_pool ? 4 * hw : hw;
      at::parallel_for(0, s.n * s.cb * chunks_per_plane, grain, [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
        alignas(64) acc_t buf[kChunk];
        alignas(64) acc_t vals[kChunk];
        alignas(64) int32_t arg[kChunk];
        for (int64_t t = begin; t < end; ++t) {
          const PlaneChunk pc = plane_chunk(t, chunks_per_plane, hw);
          const int64_t n = pc.plane / s.cb, c = s.cp + (pc.plane - n * s.cb);
          const scalar_t* g = gop + (n * channels + math::shuffled_channel(c, cpg, groups)) * hw + pc.off;
          if (bypass_pool) {
            gather_bypass(b, b.data + pc.plane * bypass_plane, s.w, pc.off, pc.len, vals, arg);
            for (int64_t i = 0; i < pc.len; ++i) buf[i] = static_cast<acc_t>(g[i]);
            scatter_pool_grad(buf, acc_t(1), arg, s.w, pc.off, pc.len, gbp + pc.plane * bypass_plane);
          } else {
            std::copy(g, g + pc.len, gbp + pc.plane * hw + pc.off);
          }
        }
      });
    }
  });
  return {std::move(grad_xs), grad_w_acc.to(weights.scalar_type()), grad_b};
}

}  // namespace
}  // namespace cpu
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("partial_channel_mixed_sum", &fastnas::cpu::partial_channel_mixed_sum);
  m.impl("partial_channel_mixed_sum_backward", &fastnas::cpu::partial_channel_mixed_sum_backward);
}
