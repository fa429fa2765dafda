// partial_channel_mixed_sum on CUDA: the PC-DARTS edge
// channel_shuffle(cat([sum_k weights[k] * xs[k], pool?(bypass)], 1), groups)
// in one pass, and its backward.
//
// The candidate channels run through the weighted-sum kernels with a Map that
// sends each element to its shuffled output position; the bypass channels
// have their own kernel. Each output (gradient) element is touched once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/weighted_sum.cuh"
#include "host/partial_channel_mixed_sum.h"

namespace fastnas {
namespace cuda {
namespace {

constexpr const char* kForward = "partial_channel_mixed_sum";
constexpr const char* kBackward = "partial_channel_mixed_sum_backward";

// The output offset of element i of the (N, Cp, H*W) candidate layout.
// 32-bit index math where the tensors allow it: 64-bit division is slow.
template <typename index_t>
struct ShuffleMap {
  index_t hw, cp, channels, cpg, groups;
  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    const index_t ii = static_cast<index_t>(i);
    const index_t plane = ii / hw;
    const index_t p = ii - plane * hw;
    const index_t n = plane / cp;
    const index_t c = plane - n * cp;
    return (static_cast<int64_t>(n) * channels + math::shuffled_channel(c, cpg, groups)) * hw + p;
  }
};

// Geometry of the bypass channels, in index_t.
template <typename index_t>
struct BypassGeometry {
  index_t hw, w, cb, cp, channels, cpg, groups;

  // Output offset of element i of the (N, Cb, H*W) pooled-bypass layout.
  __device__ __forceinline__ int64_t out_offset(index_t plane, index_t p) const {
    const index_t n = plane / cb;
    const index_t c = cp + (plane - n * cb);
    return (static_cast<int64_t>(n) * channels + math::shuffled_channel(c, cpg, groups)) * hw + p;
  }
  // Offset of the top-left element of the 2x2 window of pooled position p.
  __device__ __forceinline__ int64_t window(index_t plane, index_t p) const {
    const index_t oh = p / w;
    const index_t ow = p - oh * w;
    return static_cast<int64_t>(plane) * 4 * hw + static_cast<int64_t>(2 * oh) * (2 * w) + 2 * ow;
  }
};

template <typename scalar_t, typename index_t, bool kPool>
__global__ void __launch_bounds__(kThreads)
    bypass_forward_kernel(const scalar_t* __restrict__ bypass, scalar_t* __restrict__ out, int64_t total,
                          BypassGeometry<index_t> geo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const index_t ii = static_cast<index_t>(i);
    const index_t plane = ii / geo.hw;
    const index_t p = ii - plane * geo.hw;
    scalar_t value;
    if constexpr (kPool) {
      const scalar_t* win = bypass + geo.window(plane, p);
      const int64_t row = 2 * static_cast<int64_t>(geo.w);
      value = static_cast<scalar_t>(math::max_pool_2x2<acc_t>(win[0], win[1], win[row], win[row + 1]).value);
    } else {
      value = bypass[i];
    }
    out[geo.out_offset(plane, p)] = value;
  }
}

template <typename scalar_t, typename index_t, bool kPool>
__global__ void __launch_bounds__(kThreads)
    bypass_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ bypass,
                           scalar_t* __restrict__ grad_bypass, int64_t total, BypassGeometry<index_t> geo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const index_t ii = static_cast<index_t>(i);
    const index_t plane = ii / geo.hw;
    const index_t p = ii - plane * geo.hw;
    const scalar_t g = grad_out[geo.out_offset(plane, p)];
    if constexpr (kPool) {
      const int64_t top = geo.window(plane, p);
      const int64_t bottom = top + 2 * static_cast<int64_t>(geo.w);
      const int arg = math::max_pool_2x2<acc_t>(bypass[top], bypass[top + 1], bypass[bottom], bypass[bottom + 1]).index;
      grad_bypass[top] = math::pool_grad_at(0, arg, g);
      grad_bypass[top + 1] = math::pool_grad_at(1, arg, g);
      grad_bypass[bottom] = math::pool_grad_at(2, arg, g);
      grad_bypass[bottom + 1] = math::pool_grad_at(3, arg, g);
    } else {
      grad_bypass[i] = g;
    }
  }
}

template <typename index_t>
ShuffleMap<index_t> shuffle_map(const PartialChannelShape& s) {
  return ShuffleMap<index_t>{static_cast<index_t>(s.plane()), static_cast<index_t>(s.cp),
                             static_cast<index_t>(s.channels()), static_cast<index_t>(s.channels_per_group()),
                             static_cast<index_t>(s.groups)};
}

template <typename index_t>
BypassGeometry<index_t> bypass_geometry(const PartialChannelShape& s) {
  return BypassGeometry<index_t>{static_cast<index_t>(s.plane()),    static_cast<index_t>(s.w),
                                 static_cast<index_t>(s.cb),         static_cast<index_t>(s.cp),
                                 static_cast<index_t>(s.channels()), static_cast<index_t>(s.channels_per_group()),
                                 static_cast<index_t>(s.groups)};
}

template <typename scalar_t, typename index_t>
void launch_bypass_forward(const scalar_t* bypass, scalar_t* out, const PartialChannelShape& s, bool pool) {
  const int64_t total = s.n * s.cb * s.plane();
  const auto geo = bypass_geometry<index_t>(s);
  if (pool) {
    launch(bypass_forward_kernel<scalar_t, index_t, true>, blocks_for(total), 0, bypass, out, total, geo);
  } else {
    launch(bypass_forward_kernel<scalar_t, index_t, false>, blocks_for(total), 0, bypass, out, total, geo);
  }
}

template <typename scalar_t, typename index_t>
void launch_bypass_backward(const scalar_t* grad_out, const scalar_t* bypass, scalar_t* grad_bypass,
                            const PartialChannelShape& s, bool pool) {
  const int64_t total = s.n * s.cb * s.plane();
  const auto geo = bypass_geometry<index_t>(s);
  if (pool) {
    launch(bypass_backward_kernel<scalar_t, index_t, true>, blocks_for(total), 0, grad_out, bypass, grad_bypass, total,
           geo);
  } else {
    launch(bypass_backward_kernel<scalar_t, index_t, false>, blocks_for(total), 0, grad_out, bypass, grad_bypass, total,
           geo);
  }
}

at::Tensor partial_channel_mixed_sum(at::TensorList xs, const at::Tensor& weights, const at::Tensor& bypass,
                                     int64_t groups, bool bypass_pool) {
  const PartialChannelShape s =
      check_partial_channel_mixed_sum(kForward, xs, weights, bypass, groups, bypass_pool, kDevice);
  const int64_t k_count = static_cast<int64_t>(xs.size());
  const DeviceGuard guard(xs[0].device());

  const auto dtype = xs[0].scalar_type();
  at::Tensor out = at::empty({s.n, s.channels(), s.h, s.w}, xs[0].options());
  if (out.numel() == 0) return out;
  const auto xc = contiguous_all(xs);
  const at::Tensor bc = bypass.contiguous();
  const at::Tensor w = for_accumulation(weights, dtype);
  const bool small = s.offsets_fit_int32();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "partial_channel_mixed_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* outp = out.data_ptr<scalar_t>();
    if (s.cp > 0) {
      InputPtrs<scalar_t> ptrs{};
      for (int64_t k = 0; k < k_count; ++k) ptrs.ptr[k] = xc[k].data_ptr<scalar_t>();
      const int64_t n = s.n * s.cp * s.plane();
      // A vector must not straddle two planes, which go to different places.
      const bool vec_ok = s.plane() % kVec == 0;
      if (small) {
        launch_weighted_sum(ptrs, static_cast<int>(k_count), w.data_ptr<acc_t>(), outp, n, shuffle_map<uint32_t>(s),
                            vec_ok);
      } else {
        launch_weighted_sum(ptrs, static_cast<int>(k_count), w.data_ptr<acc_t>(), outp, n, shuffle_map<int64_t>(s),
                            vec_ok);
      }
    }
    if (s.cb > 0) {
      if (small) {
        launch_bypass_forward<scalar_t, uint32_t>(bc.data_ptr<scalar_t>(), outp, s, bypass_pool);
      } else {
        launch_bypass_forward<scalar_t, int64_t>(bc.data_ptr<scalar_t>(), outp, s, bypass_pool);
      }
    }
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> partial_channel_mixed_sum_backward(
    const at::Tensor& grad_out, at::TensorList xs, const at::Tensor& weights, const at::Tensor& bypass, int64_t groups,
    bool bypass_pool, const c10::List<bool>& xs_need_grad_list, bool weights_need_grad, bool bypass_need_grad) {
  const std::vector<bool> xs_need_grad = xs_need_grad_list.vec();
  const PartialChannelShape s =
      check_partial_channel_mixed_sum_backward(kBackward, grad_out, xs, weights, bypass, groups, bypass_pool,
                                               xs_need_grad, weights_need_grad, bypass_need_grad, kDevice);
  const std::vector<int64_t> x_shape{s.n, s.cp, s.h, s.w};
  const DeviceGuard guard(grad_out.device());

  const int64_t k_count = weights.size(0);
  const auto dtype = grad_out.scalar_type();
  const auto acc_dtype = accumulate_dtype(dtype);
  std::vector<at::Tensor> grad_xs = new_input_grads(x_shape, grad_out.options(), xs_need_grad);
  at::Tensor grad_w_acc = at::zeros({weights_need_grad ? k_count : 0}, weights.options().dtype(acc_dtype));
  at::Tensor grad_b = bypass_need_grad ? at::empty(bypass.sizes(), grad_out.options()) : grad_out.new_empty({0});
  if (grad_out.numel() == 0) return {std::move(grad_xs), grad_w_acc.to(weights.scalar_type()), grad_b};
  const at::Tensor go = grad_out.contiguous();
  const bool small = s.offsets_fit_int32();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "partial_channel_mixed_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* gop = go.data_ptr<scalar_t>();

    if (s.cp > 0 && (weights_need_grad || !grad_xs.empty())) {
      const auto xc = weights_need_grad ? contiguous_all(xs) : std::vector<at::Tensor>{};
      const at::Tensor w = for_accumulation(weights, dtype);
      InputPtrs<scalar_t> x_ptrs{};
      GradPtrs<scalar_t> gx_ptrs{};
      for (size_t k = 0; k < xc.size(); ++k) x_ptrs.ptr[k] = xc[k].data_ptr<scalar_t>();
      for (int64_t k = 0, j = 0; k < k_count; ++k) {
        if (xs_need_grad[k]) gx_ptrs.ptr[k] = grad_xs[j++].data_ptr<scalar_t>();
      }
      const int64_t n = s.n * s.cp * s.plane();
      const int kc = static_cast<int>(k_count);
      const bool vec_ok = s.plane() % kVec == 0;
      const auto plan = plan_backward(gop, x_ptrs, gx_ptrs, kc, weights_need_grad, n, vec_ok);
      at::Tensor partials =
          at::empty({weights_need_grad ? plan.blocks : 0, k_count}, weights.options().dtype(acc_dtype));
      acc_t* pp = weights_need_grad ? partials.data_ptr<acc_t>() : nullptr;
      acc_t* gw = weights_need_grad ? grad_w_acc.data_ptr<acc_t>() : nullptr;
      if (small) {
        launch_weighted_sum_backward(plan, gop, x_ptrs, gx_ptrs, kc, w.data_ptr<acc_t>(), weights_need_grad, n,
                                     shuffle_map<uint32_t>(s), pp, gw);
      } else {
        launch_weighted_sum_backward(plan, gop, x_ptrs, gx_ptrs, kc, w.data_ptr<acc_t>(), weights_need_grad, n,
                                     shuffle_map<int64_t>(s), pp, gw);
      }
    }

    if (bypass_need_grad && s.cb > 0) {
      // The bypass is read only to find the pooling argmax: without pooling
      // Python passes a zero-stride stand-in that must not be touched.
      const at::Tensor bc = bypass_pool ? bypass.contiguous() : at::Tensor();
      const scalar_t* bp = bypass_pool ? bc.data_ptr<scalar_t>() : nullptr;
      if (small) {
        launch_bypass_backward<scalar_t, uint32_t>(gop, bp, grad_b.data_ptr<scalar_t>(), s, bypass_pool);
      } else {
        launch_bypass_backward<scalar_t, int64_t>(gop, bp, grad_b.data_ptr<scalar_t>(), s, bypass_pool);
      }
    }
  });
  return {std::move(grad_xs), grad_w_acc.to(weights.scalar_type()), grad_b};
}

}  // namespace
}  // namespace cuda
}  // namespace fastnas

FASTNAS_CUDA_LIBRARY_IMPL(m) {
  m.impl("partial_channel_mixed_sum", &fastnas::cuda::partial_channel_mixed_sum);
  m.impl("partial_channel_mixed_sum_backward", &fastnas::cuda::partial_channel_mixed_sum_backward);
}
