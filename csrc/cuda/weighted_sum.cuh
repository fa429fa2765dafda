// CUDA kernels of the weighted sum and its backward, shared by mixed_sum and
// the candidate channels of partial_channel_mixed_sum.
//
// The K input pointers travel by value in a kernel argument, so a launch needs
// no host-to-device copy and CUDA graphs can capture it. Where the output
// element of input element i lives is up to a Map: the identity for
// mixed_sum, the channel shuffle for partial_channel_mixed_sum.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"
#include "fastnas_math.h"

namespace fastnas {
namespace cuda {

template <typename scalar_t>
struct InputPtrs {
  const scalar_t* ptr[math::kMaxInputs];
};

// ptr[k] is null when input k needs no gradient.
template <typename scalar_t>
struct GradPtrs {
  scalar_t* ptr[math::kMaxInputs];
};

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, VEC>& pack) {
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pack;
}

struct FlatMap {
  __device__ __forceinline__ int64_t operator()(int64_t i) const { return i; }
};

// out[map(i)] = sum_k w[k] * xs[k][i] for i < n. Vectors of VEC elements
// cover [0, n_vec * VEC); the tail, shorter than VEC, goes element by element.
template <typename scalar_t, int VEC, typename Map>
__global__ void __launch_bounds__(kThreads)
    weighted_sum_kernel(InputPtrs<scalar_t> xs, int k_count, const at::opmath_type<scalar_t>* __restrict__ w,
                        scalar_t* __restrict__ out, int64_t n, Map map) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sw[math::kMaxInputs];
  for (int k = threadIdx.x; k < k_count; k += blockDim.x) sw[k] = w[k];
  __syncthreads();

  const int64_t n_vec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_vec; v += stride) {
    const int64_t base = v * VEC;
    acc_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
#pragma unroll 4
    for (int k = 0; k < k_count; ++k) {
      const auto x = load_pack<scalar_t, VEC>(xs.ptr[k] + base);
      const acc_t wk = sw[k];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = math::weighted_accumulate(acc[j], wk, x.v[j]);
    }
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<scalar_t>(acc[j]);
    store_pack<scalar_t, VEC>(out + map(base), o);
  }
  if (blockIdx.x == 0) {
    for (int64_t i = n_vec * VEC + threadIdx.x; i < n; i += blockDim.x) {
      acc_t acc = acc_t(0);
      for (int k = 0; k < k_count; ++k) acc = math::weighted_accumulate(acc, sw[k], xs.ptr[k][i]);
      out[map(i)] = static_cast<scalar_t>(acc);
    }
  }
}

// Backward of weighted_sum_kernel: grad_xs[k][i] = w[k] * grad_out[map(i)]
// where needed, and per-block partial sums of grad_out[map(i)] * xs[k][i]
// into partials[block][k] (when need_w) for launch_strided_sums to finish.
// Each grad_out element is read once. Every thread of a block runs
// the same number of iterations so that the warp sums see all lanes.
template <typename scalar_t, int VEC, typename Map>
__global__ void __launch_bounds__(kThreads)
    weighted_sum_backward_kernel(const scalar_t* __restrict__ grad_out, InputPtrs<scalar_t> xs,
                                 GradPtrs<scalar_t> grad_xs, int k_count,
                                 const at::opmath_type<scalar_t>* __restrict__ w, bool need_w, int64_t n, Map map,
                                 at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sw[math::kMaxInputs];
  __shared__ acc_t warp_dots[kWarps][math::kMaxInputs];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int k = threadIdx.x; k < k_count; k += blockDim.x) {
    sw[k] = w[k];
#pragma unroll
    for (int i = 0; i < kWarps; ++i) warp_dots[i][k] = acc_t(0);
  }
  __syncthreads();

  const int64_t n_vec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t block_v = static_cast<int64_t>(blockIdx.x) * blockDim.x; block_v < n_vec; block_v += stride) {
    const int64_t v = block_v + threadIdx.x;
    const bool active = v < n_vec;
    const int64_t base = v * VEC;
    acc_t g[VEC];
    if (active) {
      const auto gp = load_pack<scalar_t, VEC>(grad_out + map(base));
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = static_cast<acc_t>(gp.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] = acc_t(0);
    }
    for (int k = 0; k < k_count; ++k) {
      scalar_t* gx = grad_xs.ptr[k];
      if (gx != nullptr && active) {
        const acc_t wk = sw[k];
        Pack<scalar_t, VEC> o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<scalar_t>(wk * g[j]);
        store_pack<scalar_t, VEC>(gx + base, o);
      }
      if (need_w) {
        acc_t d = acc_t(0);
        if (active) {
          const auto x = load_pack<scalar_t, VEC>(xs.ptr[k] + base);
#pragma unroll
          for (int j = 0; j < VEC; ++j) d = math::dot_accumulate(d, g[j], x.v[j]);
        }
        d = warp_sum(d);
        if (lane == 0) warp_dots[warp][k] += d;
      }
    }
  }
  // The tail shorter than VEC, in block 0 only: a block-uniform branch.
  if (blockIdx.x == 0 && n_vec * VEC < n) {
    const int64_t i = n_vec * VEC + threadIdx.x;
    const bool active = i < n;
    const acc_t g = active ? static_cast<acc_t>(grad_out[map(i)]) : acc_t(0);
    for (int k = 0; k < k_count; ++k) {
      if (grad_xs.ptr[k] != nullptr && active) grad_xs.ptr[k][i] = static_cast<scalar_t>(sw[k] * g);
      if (need_w) {
        acc_t d = active ? math::dot_accumulate(acc_t(0), g, xs.ptr[k][i]) : acc_t(0);
        d = warp_sum(d);
        if (lane == 0) warp_dots[warp][k] += d;
      }
    }
  }
  if (need_w) {
    __syncthreads();
    for (int k = threadIdx.x; k < k_count; k += blockDim.x) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int i = 0; i < kWarps; ++i) s += warp_dots[i][k];
      partials[static_cast<int64_t>(blockIdx.x) * k_count + k] = s;
    }
  }
}

// Host side: launch the forward on the current stream with the widest vector
// width the pointers' alignment (and vec_ok, the Map's own constraint) allow.
template <typename scalar_t, typename Map>
void launch_weighted_sum(const InputPtrs<scalar_t>& xs, int k_count, const at::opmath_type<scalar_t>* w, scalar_t* out,
                         int64_t n, Map map, bool vec_ok) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool aligned = vec_ok && aligned16(out);
  for (int k = 0; k < k_count; ++k) aligned = aligned && aligned16(xs.ptr[k]);
  if (aligned) {
    launch(weighted_sum_kernel<scalar_t, kVec, Map>, blocks_for(n / kVec), 0, xs, k_count, w, out, n, map);
  } else {
    launch(weighted_sum_kernel<scalar_t, 1, Map>, blocks_for(n), 0, xs, k_count, w, out, n, map);
  }
}

// Host side of the backward: both stages on the current stream. partials
// must hold blocks_for_backward(...) * k_count entries when need_w.
template <typename scalar_t>
struct BackwardLaunch {
  static constexpr int kVec = 16 / sizeof(scalar_t);
  bool vectorised;
  int64_t blocks;
};

template <typename scalar_t>
BackwardLaunch<scalar_t> plan_backward(const scalar_t* grad_out, const InputPtrs<scalar_t>& xs,
                                       const GradPtrs<scalar_t>& grad_xs, int k_count, bool need_w, int64_t n,
                                       bool vec_ok) {
  BackwardLaunch<scalar_t> plan;
  bool aligned = vec_ok && aligned16(grad_out);
  for (int k = 0; k < k_count; ++k) {
    if (need_w) aligned = aligned && aligned16(xs.ptr[k]);
    if (grad_xs.ptr[k] != nullptr) aligned = aligned && aligned16(grad_xs.ptr[k]);
  }
  plan.vectorised = aligned;
  plan.blocks = blocks_for(aligned ? n / BackwardLaunch<scalar_t>::kVec : n);
  return plan;
}

template <typename scalar_t, typename Map>
void launch_weighted_sum_backward(const BackwardLaunch<scalar_t>& plan, const scalar_t* grad_out,
                                  const InputPtrs<scalar_t>& xs, const GradPtrs<scalar_t>& grad_xs, int k_count,
                                  const at::opmath_type<scalar_t>* w, bool need_w, int64_t n, Map map,
                                  at::opmath_type<scalar_t>* partials, at::opmath_type<scalar_t>* grad_w) {
  constexpr int kVec = BackwardLaunch<scalar_t>::kVec;
  if (plan.vectorised) {
    launch(weighted_sum_backward_kernel<scalar_t, kVec, Map>, plan.blocks, 0, grad_out, xs, grad_xs, k_count, w, need_w,
           n, map, partials);
  } else {
    launch(weighted_sum_backward_kernel<scalar_t, 1, Map>, plan.blocks, 0, grad_out, xs, grad_xs, k_count, w, need_w, n,
           map, partials);
  }
  // grad_w[k] = sum over blocks b of partials[b][k].
  if (need_w) launch_strided_sums(partials, k_count, plan.blocks, 1, k_count, grad_w);
}

}  // namespace cuda
}  // namespace fastnas
