// The PC-DARTS bypass channels on the CPU, shared by partial_channel_mixed_sum
// and partial_channel_node_sum: a bypass read through its strides, 2x2
// max-pooled where it is twice the output's size, and the gradient of that pool.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "cpu/loops.h"
#include "fastnas_math.h"

namespace fastnas {
namespace cpu {

// A bypass tensor (N, Cb, H, W): its data and strides (elements), and its
// pooling stride (1: read as is; 2: 2x2 max-pooled).
template <typename scalar_t>
struct BypassView {
  const scalar_t* data;
  int64_t sn, sc, sh, sw;
  int64_t stride;
};

template <typename scalar_t>
BypassView<scalar_t> bypass_view(const at::Tensor& b, int64_t stride) {
  return {b.data_ptr<scalar_t>(), b.stride(0), b.stride(1), b.stride(2), b.stride(3), stride};
}

template <typename scalar_t>
std::vector<BypassView<scalar_t>> bypass_views(at::TensorList bypass, at::IntArrayRef strides) {
  std::vector<BypassView<scalar_t>> views;
  for (size_t e = 0; e < bypass.size(); ++e) views.push_back(bypass_view<scalar_t>(bypass[e], strides[e]));
  return views;
}

// The (possibly pooled) bypass at output positions [off, off + len) of one
// (n, c) plane, w output columns wide, in acc_t; when pooled and arg is not
// null, also which window element each maximum came from. plane points at
// bypass element (n, c, 0, 0).
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void gather_bypass(const BypassView<scalar_t>& b, const scalar_t* plane, int64_t w, int64_t off,
                                     int64_t len, acc_t* __restrict__ vals, int32_t* __restrict__ arg) {
  const int64_t sh = b.sh, sw = b.sw;
  for_row_runs(off, len, w, [&](int64_t oh, int64_t ow, int64_t i, int64_t run) {
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
      int32_t* __restrict__ a = arg != nullptr ? arg + i : nullptr;
      if (sw == 1 && a != nullptr) {  // contiguous rows: the loop vectorises
        for (int64_t j = 0; j < run; ++j) {
          const auto r = math::max_pool_2x2<acc_t>(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]);
          v[j] = r.value;
          a[j] = r.index;
        }
      } else if (sw == 1) {
        for (int64_t j = 0; j < run; ++j) {
          v[j] = math::max_pool_2x2<acc_t>(top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]).value;
        }
      } else {
        for (int64_t j = 0; j < run; ++j) {
          const int64_t x0 = 2 * j * sw, x1 = x0 + sw;
          const auto r = math::max_pool_2x2<acc_t>(top[x0], top[x1], bottom[x0], bottom[x1]);
          v[j] = r.value;
          if (a != nullptr) a[j] = r.index;
        }
      }
    }
  });
}

// Gradient of a pooled bypass at output positions [off, off + len): each 2x2
// window of the contiguous (2h, 2w) gradient plane gets wk * g at its argmax
// and zeros elsewhere. The windows tile the plane, so every element is written.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void scatter_pool_grad(const acc_t* __restrict__ g, acc_t wk, const int32_t* __restrict__ arg,
                                         int64_t w, int64_t off, int64_t len, scalar_t* __restrict__ grad) {
  for_row_runs(off, len, w, [&](int64_t oh, int64_t ow, int64_t i, int64_t run) {
    scalar_t* __restrict__ g_top = grad + (2 * oh) * (2 * w) + 2 * ow;
    scalar_t* __restrict__ g_bottom = g_top + 2 * w;
    for (int64_t j = 0; j < run; ++j) {
      const scalar_t v = static_cast<scalar_t>(wk * g[i + j]);
      const int a = arg[i + j];
      // All four first, then the stores: that order vectorises.
      const scalar_t v0 = math::pool_grad_at(0, a, v), v1 = math::pool_grad_at(1, a, v);
      const scalar_t v2 = math::pool_grad_at(2, a, v), v3 = math::pool_grad_at(3, a, v);
      g_top[2 * j] = v0;
      g_top[2 * j + 1] = v1;
      g_bottom[2 * j] = v2;
      g_bottom[2 * j + 1] = v3;
    }
  });
}

}  // namespace cpu
}  // namespace fastnas
