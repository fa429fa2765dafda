// Chunk loops of the weighted sum and its backward, shared by the CPU ops.
//
// Work is cut into chunks of kChunk elements (cpu/loops.h): a chunk of all K
// streams stays in L1/L2, and the per-chunk partial dot products, summed in a
// fixed order afterwards, give the same bits whatever the thread count.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "cpu/loops.h"
#include "fastnas_math.h"

namespace fastnas {
namespace cpu {

// Streams per sweep of a chunk. One input stream at a time leaves a core waiting
// on memory; several in the same loop keep their loads in flight together (the
// forward of mixed_sum at K=8 runs 1.8x faster with 4). Every element still adds
// its terms in k order, so the bits do not depend on the grouping.
constexpr int kStreams = 4;

// Streams k0 .. k0 + G - 1 folded into the chunk: from zero (kFirst) or onto buf,
// into buf or, for the last group (kLast), converted into dst.
template <int G, bool kFirst, bool kLast, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void weighted_sum_streams(const scalar_t* const* xs, const acc_t* w, int64_t k0, int64_t src,
                                            int64_t len, acc_t* __restrict__ buf, scalar_t* __restrict__ dst) {
  const scalar_t* __restrict__ x[G];
  acc_t wk[G];
  for (int g = 0; g < G; ++g) {
    x[g] = xs[k0 + g] + src;
    wk[g] = w[k0 + g];
  }
  for (int64_t i = 0; i < len; ++i) {
    acc_t a = math::weighted_accumulate(kFirst ? acc_t(0) : buf[i], wk[0], x[0][i]);
    for (int g = 1; g < G; ++g) a = math::weighted_accumulate(a, wk[g], x[g][i]);
    if (kLast) {
      dst[i] = static_cast<scalar_t>(a);
    } else {
      buf[i] = a;
    }
  }
}

template <int G, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void weighted_sum_group(const scalar_t* const* xs, const acc_t* w, int64_t k0, bool first, bool last,
                                          int64_t src, int64_t len, acc_t* buf, scalar_t* dst) {
  if (first && last) {
    weighted_sum_streams<G, true, true>(xs, w, k0, src, len, buf, dst);
  } else if (first) {
    weighted_sum_streams<G, true, false>(xs, w, k0, src, len, buf, dst);
  } else if (last) {
    weighted_sum_streams<G, false, true>(xs, w, k0, src, len, buf, dst);
  } else {
    weighted_sum_streams<G, false, false>(xs, w, k0, src, len, buf, dst);
  }
}

// dst[i] = sum_k w[k] * xs[k][src + i] for i < len, accumulated in buf, kStreams streams per sweep.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void weighted_sum_chunk(const scalar_t* const* xs, int64_t k_count, const acc_t* w, int64_t src,
                                          int64_t len, scalar_t* __restrict__ dst, acc_t* __restrict__ buf) {
  for (int64_t k0 = 0; k0 < k_count; k0 += kStreams) {
    const int64_t g = std::min<int64_t>(kStreams, k_count - k0);
    const bool first = k0 == 0, last = k0 + g == k_count;
    switch (g) {
      case 1:
        weighted_sum_group<1>(xs, w, k0, first, last, src, len, buf, dst);
        break;
      case 2:
        weighted_sum_group<2>(xs, w, k0, first, last, src, len, buf, dst);
        break;
      case 3:
        weighted_sum_group<3>(xs, w, k0, first, last, src, len, buf, dst);
        break;
      default:
        weighted_sum_group<kStreams>(xs, w, k0, first, last, src, len, buf, dst);
    }
  }
}

// Lanes of the chunks' dot products.
constexpr int kDotLanes = 16;

// sum_i g[i] * x[i] over kDotLanes lanes. With gx non-null it also writes
// gx[i] = wk * g[i] in the same sweep, which keeps the number of memory
// streams in flight down.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE acc_t chunk_dot(const acc_t* __restrict__ g, const scalar_t* __restrict__ x, int64_t len,
                                  scalar_t* __restrict__ gx = nullptr, acc_t wk = acc_t(0)) {
  acc_t s[kDotLanes] = {};
  if (gx != nullptr) {
    for_lanes<kDotLanes>(len, [&](int64_t i, int j) {
      gx[i] = static_cast<scalar_t>(wk * g[i]);
      s[j] = math::dot_accumulate(s[j], g[i], x[i]);
    });
  } else {
    for_lanes<kDotLanes>(len, [&](int64_t i, int j) { s[j] = math::dot_accumulate(s[j], g[i], x[i]); });
  }
  return combine_lanes<kDotLanes>(s);
}

// Streams k0 .. k0 + G - 1 of the backward in one sweep: gx_g[i] = w_g * g[i]
// and each stream's 16-lane dot product sum_i g[i] * x_g[i], added into its
// lanes in the same order as chunk_dot's (the same bits), with G loads and G
// stores in flight together instead of one of each.
template <int G, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void weighted_sum_backward_streams(const acc_t* __restrict__ g, scalar_t* const* gxs,
                                                     const scalar_t* const* xs, int64_t k0, const acc_t* w, int64_t src,
                                                     int64_t len, acc_t* dots) {
  const scalar_t* __restrict__ x[G];
  scalar_t* __restrict__ gx[G];
  acc_t wk[G];
  acc_t s[G][kDotLanes] = {};
  for (int j = 0; j < G; ++j) {
    x[j] = xs[k0 + j] + src;
    gx[j] = gxs[k0 + j] + src;
    wk[j] = w[k0 + j];
  }
  // for_lanes' order. Each block of lanes goes through local arrays, which alias
  // nothing, so that the compiler vectorises the lanes of every stream.
  int64_t i = 0;
  for (; i + kDotLanes <= len; i += kDotLanes) {
    acc_t gv[kDotLanes];
    for (int lane = 0; lane < kDotLanes; ++lane) gv[lane] = g[i + lane];
    for (int j = 0; j < G; ++j) {
      scalar_t out[kDotLanes];
      for (int lane = 0; lane < kDotLanes; ++lane) {
        out[lane] = static_cast<scalar_t>(wk[j] * gv[lane]);
        s[j][lane] = math::dot_accumulate(s[j][lane], gv[lane], x[j][i + lane]);
      }
      for (int lane = 0; lane < kDotLanes; ++lane) gx[j][i + lane] = out[lane];
    }
  }
  for (int lane = 0; i < len; ++i, ++lane) {
    for (int j = 0; j < G; ++j) {
      gx[j][i] = static_cast<scalar_t>(wk[j] * g[i]);
      s[j][lane] = math::dot_accumulate(s[j][lane], g[i], x[j][i]);
    }
  }
  for (int j = 0; j < G; ++j) dots[k0 + j] = combine_lanes<kDotLanes>(s[j]);
}

// weighted_sum_backward_streams<G> for inputs k .. k + G - 1 and k += G, when
// they exist and all need both gradients; false otherwise.
template <int G, typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE bool weighted_sum_backward_group(const acc_t* g, scalar_t* const* gxs, const scalar_t* const* xs,
                                                   int64_t& k, int64_t k_count, const acc_t* w, int64_t src,
                                                   int64_t len, acc_t* dots) {
  if (dots == nullptr || k + G > k_count) return false;
  for (int j = 0; j < G; ++j) {
    if (gxs[k + j] == nullptr) return false;
  }
  weighted_sum_backward_streams<G>(g, gxs, xs, k, w, src, len, dots);
  k += G;
  return true;
}

// One chunk of the backward of the weighted sum. go holds the len output
// gradients of the chunk; the inputs and their gradients are at offset src.
// gxs[k] is null when input k needs no gradient; dots (K entries) is null
// when the weights need none, and xs is then not read.
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void weighted_sum_backward_chunk(const scalar_t* __restrict__ go, scalar_t* const* gxs,
                                                   const scalar_t* const* xs, int64_t k_count, const acc_t* w,
                                                   int64_t src, int64_t len, acc_t* dots, acc_t* __restrict__ buf) {
  for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<acc_t>(go[i]);
  for (int64_t k = 0; k < k_count;) {
    // Eight, else four, inputs that all need both gradients take one sweep
    // together (eight: the DARTS space's K; 5-8% faster than two sweeps of four).
    if (weighted_sum_backward_group<8>(buf, gxs, xs, k, k_count, w, src, len, dots) ||
        weighted_sum_backward_group<kStreams>(buf, gxs, xs, k, k_count, w, src, len, dots)) {
      continue;
    }
    scalar_t* gx = gxs[k] != nullptr ? gxs[k] + src : nullptr;
    if (dots != nullptr) {
      dots[k] = chunk_dot(buf, xs[k] + src, len, gx, w[k]);
    } else if (gx != nullptr) {
      const acc_t wk = w[k];
      for (int64_t i = 0; i < len; ++i) gx[i] = static_cast<scalar_t>(wk * buf[i]);
    }
    ++k;
  }
}

// Sum of v[0], v[stride], ..., v[(n - 1) * stride], halving pairwise: a fixed order
// (the same result on any number of threads) whose rounding error grows with
// log(n), not n as a running sum's does over thousands of chunks.
template <typename acc_t>
inline acc_t pairwise_sum(const acc_t* v, int64_t n, int64_t stride) {
  if (n <= 8) {
    acc_t s = acc_t(0);
    for (int64_t i = 0; i < n; ++i) s += v[i * stride];
    return s;
  }
  const int64_t half = n / 2;
  return pairwise_sum(v, half, stride) + pairwise_sum(v + half * stride, n - half, stride);
}

// grad_w[k] = sum over chunks of partials[chunk][k], pairwise in chunk order.
template <typename acc_t>
inline void sum_partials(const acc_t* partials, int64_t chunks, int64_t k_count, acc_t* grad_w) {
  for (int64_t k = 0; k < k_count; ++k) grad_w[k] = pairwise_sum(partials + k, chunks, k_count);
}

}  // namespace cpu
}  // namespace fastnas
