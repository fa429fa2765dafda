// multi_depthwise on CUDA: J depthwise convolutions of act(x) (or of
// act((x - mean) * rstd) per candidate), stacked as (J, C, N, Ho, Wo), and
// their backward. act is ReLU unless `activations` names another one
// (fastnas_math.h). Each candidate carries its activation: one launch per
// direction serves a call whose candidates have several, a tile of a shared x
// loading its activation once per distinct activation (candidates visited
// grouped by activation), with no host work beyond the launch's arguments.
//
// Every kernel works on tiles held in shared memory. A block owns one group (a
// channel c with all J candidates for a shared x, or one (j, c) pair) and a
// tile: PB whole planes of PB images when the planes are small (so an 8x8
// plane does not leave most of a block idle), else a band of rows of one
// plane. Each thread owns a strip of kRows rows in one column of the tile,
// which keeps the loads of a tap column in registers for all kRows outputs
// (a k x k kernel reads (kRows - 1) * stride + (k - 1) * d + 1 values per
// column instead of kRows * k), and consecutive lanes own consecutive columns,
// so global and shared-memory accesses are contiguous.
//
// - forward_kernel: the activation tile (with a halo of the largest padding P)
//   is read from global memory once, ReLU and the batch-norm prologue applied
//   on the way in, and every candidate correlates its weights with it.
// - input_grad_kernel: a tile of input pixels gathers, candidate by candidate,
//   the output gradient around it (a shared-memory tile with halo) through the
//   kernel: at stride 1 a correlation with the flipped kernel, at stride 2
//   only the taps whose output lands on the stride grid. The sum is masked by
//   activation > 0 (math::depthwise_grad_passes) and written once; no atomics.
// - weight_grad_shared_kernel: a block owns a channel of a shared x and a
//   fixed run of tiles; each thread keeps the tap sums of every candidate in
//   registers over the run (one array per DARTS kind), each tile's activation
//   loaded once and correlated with every candidate's output gradient. Then
//   the block adds them in a fixed order into one partial per tap and block;
//   a second kernel adds the blocks' partials in order (launch_strided_sums).
//   The split depends on the shape only, so reruns are bit-identical.
// - weight_grad_kernel: the same, a candidate at a time, for a per-candidate
//   x (one candidate per group) and the shared calls the first does not take
//   (other kernel sizes, a kind twice, float64).
//
// The common DARTS kernels (3x3, 5x5, 7x7 with dilation 1; 3x3 and 5x5 with
// dilation 2) have unrolled code with compile-time taps; other sizes, and
// float64, take a loop over runtime taps.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cuda/common.cuh"
#include "fastnas_math.h"
#include "host/multi_depthwise.h"

namespace fastnas {
namespace cuda {
namespace {

constexpr const char* kForward = "multi_depthwise";
constexpr const char* kBackward = "multi_depthwise_backward";

constexpr int kRows = 4;  // rows of a thread's strip
// Limits of these kernels, checked at the op boundary: the candidate table
// travels in a kernel argument, and the halo of the largest padding must fit a
// tile in shared memory.
constexpr int kMaxCandidates = 16;
constexpr int kMaxPadding = 16;
// Shared memory per block: the default limit, so no opt-in is needed, and
// several blocks fit on an SM.
constexpr int64_t kSmemBudget = 48 * 1024;
// The weights' gradient aims for this many blocks: enough to fill a large GPU,
// few enough that each block sums many outputs before its reduction. The host
// emulation aims for a few, so that its small test shapes give each block a
// run of several tiles.
#ifdef FASTNAS_CUDA_EMULATION
constexpr int64_t kWeightGradBlocks = 4;
#else
constexpr int64_t kWeightGradBlocks = 512;
#endif

// Candidates with unrolled code.
enum Kind : int { kAnyKernel = 0, k3d1, k5d1, k7d1, k3d2, k5d2 };

int kind_of(int64_t k, int64_t d) {
  if (d == 1) return k == 3 ? k3d1 : k == 5 ? k5d1 : k == 7 ? k7d1 : kAnyKernel;
  if (d == 2) return k == 3 ? k3d2 : k == 5 ? k5d2 : kAnyKernel;
  return kAnyKernel;
}

template <typename acc_t>
struct Candidates {
  const acc_t* w[kMaxCandidates];  // (C, k, k) in acc_t
  int k[kMaxCandidates], d[kMaxCandidates], pad[kMaxCandidates], kind[kMaxCandidates];
  int tap_offset[kMaxCandidates];  // candidate j's taps in a group's row of weight gradients
  int act[kMaxCandidates];         // candidate j's activation code
  // A shared x visits its candidates in this order: those of one activation in a
  // row, the activations in order of first appearance, so that a tile's
  // activation is loaded once per activation.
  int order[kMaxCandidates];
  int J;
};

struct Dims {
  int N, C, H, W, Ho, Wo, stride, P;
  bool shared, bn;
};

// The activation a candidate convolves: act(pre), pre = x or (x - mean) * rstd.
template <typename acc_t>
__device__ __forceinline__ acc_t prologue_activation(int act, bool bn, acc_t xv, acc_t mean, acc_t rstd) {
  if (act == math::kRelu) return math::depthwise_activation(xv, bn, mean, rstd);
  return math::activation_forward(act, bn ? (xv - mean) * rstd : xv);
}

// The input gradient from grad, the gradient with respect to the activation at x.
template <typename acc_t>
__device__ __forceinline__ acc_t prologue_grad(int act, bool bn, acc_t xv, acc_t mean, acc_t rstd, acc_t grad) {
  if (act == math::kRelu) return math::depthwise_grad_passes(math::depthwise_activation(xv, bn, mean, rstd), grad);
  return math::activation_derivative(act, bn ? (xv - mean) * rstd : xv) * grad;
}

// The candidates block `group` computes, from j0 to j1 in the visiting order
// (a shared x: every candidate; per-candidate x: the group's own).
struct GroupCandidates {
  int j0, j1;
  bool shared;
  template <typename acc_t>
  __device__ __forceinline__ int at(const Candidates<acc_t>& cd, int q) const {
    return shared ? cd.order[q] : q;
  }
};

__device__ __forceinline__ GroupCandidates candidates_of(const Dims& dm, int J, int64_t group) {
  if (dm.shared) return {0, J, true};
  const int j = static_cast<int>(group / dm.C);
  return {j, j + 1, false};
}

// Offset of the input plane (group, n): shared x (N, C, H, W) or per-candidate x (J, C, N, H, W).
__device__ __forceinline__ int64_t plane_offset(const Dims& dm, int64_t group, int64_t n) {
  return (dm.shared ? n * dm.C + group : group * dm.N + n) * static_cast<int64_t>(dm.H) * dm.W;
}

// Offset of output plane (j, c, n) in (J, C, N, Ho, Wo).
__device__ __forceinline__ int64_t out_plane_offset(const Dims& dm, int64_t j, int64_t c, int64_t n) {
  return ((j * dm.C + c) * dm.N + n) * static_cast<int64_t>(dm.Ho) * dm.Wo;
}

// A block's tile of a plane (the output plane, or the input plane for the
// input gradient) and its shared-memory region per plane.
struct Tile {
  int TH, TW, PB, RG;  // rows and columns per tile, planes per block, strips per column (TH / kRows)
  int tiles_h, tiles_w, n_blocks;
  int rows, cols, pitch;  // the region one plane needs in shared memory
  __host__ __device__ int64_t items() const { return static_cast<int64_t>(n_blocks) * tiles_h * tiles_w; }
  __host__ __device__ int64_t region() const { return static_cast<int64_t>(PB) * rows * pitch; }
};

// Where item `item` (images, tile row, tile column) lies, and how much of it exists.
struct TileCoord {
  int n0, planes, r0, c0, th, tw;
};

__device__ __forceinline__ TileCoord tile_coord(const Tile& t, int64_t item, int plane_h, int plane_w, int n) {
  TileCoord tc;
  const int tw_i = static_cast<int>(item % t.tiles_w);
  item /= t.tiles_w;
  const int th_i = static_cast<int>(item % t.tiles_h);
  const int nb = static_cast<int>(item / t.tiles_h);
  tc.n0 = nb * t.PB;
  tc.planes = min(t.PB, n - tc.n0);
  tc.r0 = th_i * t.TH;
  tc.c0 = tw_i * t.TW;
  tc.th = min(t.TH, plane_h - tc.r0);
  tc.tw = min(t.TW, plane_w - tc.c0);
  return tc;
}

// This thread's strip: kRows rows from rg * kRows in column col of plane pb of the tile.
struct Strip {
  int pb, rg, col;
  bool valid;
};

__device__ __forceinline__ Strip my_strip(const Tile& t, const TileCoord& tc) {
  Strip s;
  s.col = threadIdx.x % t.TW;
  const int rest = threadIdx.x / t.TW;
  s.rg = rest % t.RG;
  s.pb = rest / t.RG;
  s.valid = s.pb < tc.planes && s.col < tc.tw && s.rg * kRows < tc.th;
  return s;
}

// --- shared-memory tiles ------------------------------------------------------------

// The activation of the input region of an output tile (rows from
// r0 * stride - P, columns from c0 * stride - P), zero outside the plane.
template <typename scalar_t, typename acc_t>
__device__ void load_activation(acc_t* region, const Tile& t, const TileCoord& tc, const scalar_t* __restrict__ x,
                                const Dims& dm, int64_t group, int act, acc_t mean, acc_t rstd) {
  const int ih0 = tc.r0 * dm.stride - dm.P, iw0 = tc.c0 * dm.stride - dm.P;
  const int per_plane = t.rows * t.cols;
  const int total = tc.planes * per_plane;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int pb = idx / per_plane, rem = idx - pb * per_plane;
    const int r = rem / t.cols, cc = rem - r * t.cols;
    const int ih = ih0 + r, iw = iw0 + cc;
    acc_t v = acc_t(0);
    if (ih >= 0 && ih < dm.H && iw >= 0 && iw < dm.W) {
      const acc_t xv =
          static_cast<acc_t>(x[plane_offset(dm, group, tc.n0 + pb) + static_cast<int64_t>(ih) * dm.W + iw]);
      v = prologue_activation(act, dm.bn, xv, mean, rstd);
    }
    region[(pb * t.rows + r) * t.pitch + cc] = v;
  }
}

// Candidate j's output gradient around an input tile: output rows from gr0,
// columns from gc0, zero outside the plane.
template <typename scalar_t, typename acc_t>
__device__ void load_grad(acc_t* region, const Tile& t, const TileCoord& tc, const scalar_t* __restrict__ grad,
                          const Dims& dm, int j, int c, int gr0, int gc0) {
  const int per_plane = t.rows * t.cols;
  const int total = tc.planes * per_plane;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int pb = idx / per_plane, rem = idx - pb * per_plane;
    const int r = rem / t.cols, cc = rem - r * t.cols;
    const int oh = gr0 + r, ow = gc0 + cc;
    acc_t v = acc_t(0);
    if (oh >= 0 && oh < dm.Ho && ow >= 0 && ow < dm.Wo) {
      v = static_cast<acc_t>(grad[out_plane_offset(dm, j, c, tc.n0 + pb) + static_cast<int64_t>(oh) * dm.Wo + ow]);
    }
    region[(pb * t.rows + r) * t.pitch + cc] = v;
  }
}

// Candidate j's k*k weights of channel c, flipped (both axes: the flat order
// reversed) for the stride-1 input gradient.
template <typename acc_t>
__device__ void load_weights(acc_t* wsm, const Candidates<acc_t>& cd, int j, int c, bool flip) {
  const int kk = cd.k[j] * cd.k[j];
  const acc_t* w = cd.w[j] + static_cast<int64_t>(c) * kk;
  for (int t = threadIdx.x; t < kk; t += kThreads) wsm[t] = w[flip ? kk - 1 - t : t];
}

// --- the taps -----------------------------------------------------------------------

// acc[i] += sum_{u,v} w[u*K + v] * src[(i*S + u*D) * pitch + v*D] for the kRows
// rows i of a strip: each tap column loaded once into registers.
template <int K, int D, int S, typename acc_t>
__device__ __forceinline__ void correlate_strip(const acc_t* src, int pitch, const acc_t* w, acc_t (&acc)[kRows]) {
  constexpr int kSpan = (kRows - 1) * S + (K - 1) * D + 1;
#pragma unroll
  for (int v = 0; v < K; ++v) {
    acc_t col[kSpan];
#pragma unroll
    for (int r = 0; r < kSpan; ++r) col[r] = src[r * pitch + v * D];
#pragma unroll
    for (int u = 0; u < K; ++u) {
      const acc_t wv = w[u * K + v];
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[i] += wv * col[i * S + u * D];
    }
  }
}

template <typename acc_t>
__device__ void correlate_strip_any(const acc_t* src, int pitch, const acc_t* w, int k, int d, int s,
                                    acc_t (&acc)[kRows]) {
  for (int u = 0; u < k; ++u) {
    for (int v = 0; v < k; ++v) {
      const acc_t wv = w[u * k + v];
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[i] += wv * src[(i * s + u * d) * pitch + v * d];
    }
  }
}

// Whether the unrolled kernels are compiled for this accumulation type:
// float64 runs the runtime-tap loops only (it checks the engine, it is not
// what searches run), which keeps the build short.
template <typename acc_t>
constexpr bool kUnrolled = std::is_same_v<acc_t, float>;

#define FASTNAS_DW_KINDS(CALL, S) \
  switch (kind) {                 \
    case k3d1:                    \
      return CALL(3, 1, S);       \
    case k5d1:                    \
      return CALL(5, 1, S);       \
    case k7d1:                    \
      return CALL(7, 1, S);       \
    case k3d2:                    \
      return CALL(3, 2, S);       \
    case k5d2:                    \
      return CALL(5, 2, S);       \
    default:                      \
      break;                      \
  }

template <typename acc_t>
__device__ __forceinline__ void correlate(int kind, int s, const acc_t* src, int pitch, const acc_t* w, int k, int d,
                                          acc_t (&acc)[kRows]) {
  if constexpr (kUnrolled<acc_t>) {
#define FASTNAS_DW_CALL(K, D, S) correlate_strip<K, D, S>(src, pitch, w, acc)
    if (s == 1) {
      FASTNAS_DW_KINDS(FASTNAS_DW_CALL, 1)
    } else {
      FASTNAS_DW_KINDS(FASTNAS_DW_CALL, 2)
    }
#undef FASTNAS_DW_CALL
  }
  correlate_strip_any(src, pitch, w, k, d, s, acc);
}

// Stride 2, input pixel (h, w): the sum over the taps (u, v) whose output
// (h + p - u*d, w + p - v*d) / 2 lies on the stride grid, of w[u][v] times the
// output gradient there, read from a region whose origin is output (gr0, gc0).
template <int K, int D, typename acc_t>
__device__ __forceinline__ acc_t gather_stride_two(const acc_t* g, int pitch, int gr0, int gc0, int h, int w, int p,
                                                   const acc_t* wt) {
  acc_t acc = acc_t(0);
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const int th = h + p - u * D;
    if (th & 1) continue;
    const acc_t* row = g + ((th >> 1) - gr0) * pitch;
#pragma unroll
    for (int v = 0; v < K; ++v) {
      const int tw = w + p - v * D;
      if (tw & 1) continue;
      acc += wt[u * K + v] * row[(tw >> 1) - gc0];
    }
  }
  return acc;
}

template <typename acc_t>
__device__ acc_t gather_stride_two_any(const acc_t* g, int pitch, int gr0, int gc0, int h, int w, int p,
                                       const acc_t* wt, int k, int d) {
  acc_t acc = acc_t(0);
  for (int u = 0; u < k; ++u) {
    const int th = h + p - u * d;
    if (th & 1) continue;
    const acc_t* row = g + ((th >> 1) - gr0) * pitch;
    for (int v = 0; v < k; ++v) {
      const int tw = w + p - v * d;
      if (tw & 1) continue;
      acc += wt[u * k + v] * row[(tw >> 1) - gc0];
    }
  }
  return acc;
}

template <typename acc_t>
__device__ __forceinline__ acc_t gather_stride_two_kind(int kind, const acc_t* g, int pitch, int gr0, int gc0, int h,
                                                        int w, int p, const acc_t* wt, int k, int d) {
  if constexpr (kUnrolled<acc_t>) {
#define FASTNAS_DW_CALL(K, D, S) gather_stride_two<K, D>(g, pitch, gr0, gc0, h, w, p, wt)
    FASTNAS_DW_KINDS(FASTNAS_DW_CALL, 2)
#undef FASTNAS_DW_CALL
  }
  return gather_stride_two_any(g, pitch, gr0, gc0, h, w, p, wt, k, d);
}

// acc[u*K + v] += sum_i g[i] * src[(i*S + u*D) * pitch + v*D]: a strip's share
// of every tap's weight gradient.
template <int K, int D, int S, typename acc_t>
__device__ __forceinline__ void tap_dots_strip(const acc_t* src, int pitch, const acc_t (&g)[kRows],
                                               acc_t (&acc)[K * K]) {
  constexpr int kSpan = (kRows - 1) * S + (K - 1) * D + 1;
#pragma unroll
  for (int v = 0; v < K; ++v) {
    acc_t col[kSpan];
#pragma unroll
    for (int r = 0; r < kSpan; ++r) col[r] = src[r * pitch + v * D];
#pragma unroll
    for (int u = 0; u < K; ++u) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[u * K + v] += g[i] * col[i * S + u * D];
    }
  }
}

// floor(v / 2) for negative v too.
__host__ __device__ __forceinline__ int floor_half(int v) { return v >= 0 ? v / 2 : -((1 - v) / 2); }

// --- forward ------------------------------------------------------------------------

// Block (group, item): the output tile `item` of every candidate of the group.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, Candidates<acc_t> cd, const acc_t* __restrict__ mean,
                   const acc_t* __restrict__ rstd, Dims dm, Tile t, int w_taps, scalar_t* __restrict__ out) {
  FASTNAS_DYNAMIC_SHARED(smem_bytes);
  acc_t* wsm = reinterpret_cast<acc_t*>(smem_bytes);
  acc_t* region = wsm + w_taps;
  const int64_t items = t.items();
  const int64_t group = blockIdx.x / items;
  const TileCoord tc = tile_coord(t, blockIdx.x % items, dm.Ho, dm.Wo, dm.N);
  const int c = static_cast<int>(dm.shared ? group : group % dm.C);
  const GroupCandidates gc = candidates_of(dm, cd.J, group);
  const acc_t m = dm.bn ? mean[group] : acc_t(0), r = dm.bn ? rstd[group] : acc_t(1);
  const Strip st = my_strip(t, tc);
  for (int q = gc.j0; q < gc.j1; ++q) {
    const int j = gc.at(cd, q);
    __syncthreads();  // the previous candidate's region and weights are read
    // The tile's activation, once per activation: the candidates of one come in a row.
    if (q == gc.j0 || cd.act[j] != cd.act[gc.at(cd, q - 1)])
      load_activation(region, t, tc, x, dm, group, cd.act[j], m, r);
    load_weights(wsm, cd, j, c, false);
    __syncthreads();
    if (!st.valid) continue;
    const int off = dm.P - cd.pad[j];
    const acc_t* src = region + (st.pb * t.rows + st.rg * kRows * dm.stride + off) * t.pitch + st.col * dm.stride + off;
    acc_t acc[kRows] = {};
    correlate(cd.kind[j], dm.stride, src, t.pitch, wsm, cd.k[j], cd.d[j], acc);
    scalar_t* dst = out + out_plane_offset(dm, j, c, tc.n0 + st.pb) + tc.c0 + st.col;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = st.rg * kRows + i;
      if (r < tc.th) dst[static_cast<int64_t>(tc.r0 + r) * dm.Wo] = static_cast<scalar_t>(acc[i]);
    }
  }
}

// --- input gradient -----------------------------------------------------------------

// Block (group, item): the gradient of the pre-activation over input tile
// `item`, summed over the group's candidates, masked by activation > 0.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    input_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, Candidates<acc_t> cd,
                      const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, Dims dm, Tile t, int w_taps,
                      scalar_t* __restrict__ grad_pre) {
  FASTNAS_DYNAMIC_SHARED(smem_bytes);
  acc_t* wsm = reinterpret_cast<acc_t*>(smem_bytes);
  acc_t* region = wsm + w_taps;
  const int64_t items = t.items();
  const int64_t group = blockIdx.x / items;
  const TileCoord tc = tile_coord(t, blockIdx.x % items, dm.H, dm.W, dm.N);
  const int c = static_cast<int>(dm.shared ? group : group % dm.C);
  const GroupCandidates gc = candidates_of(dm, cd.J, group);
  const int s = dm.stride;
  // Output origin of the gradient region: the halo of the largest padding.
  const int gr0 = s == 1 ? tc.r0 - dm.P : floor_half(tc.r0 - dm.P);
  const int gc0 = s == 1 ? tc.c0 - dm.P : floor_half(tc.c0 - dm.P);
  const Strip st = my_strip(t, tc);
  const acc_t m = dm.bn ? mean[group] : acc_t(0), r = dm.bn ? rstd[group] : acc_t(1);
  const int64_t base = st.valid ? plane_offset(dm, group, tc.n0 + st.pb) + tc.c0 + st.col : 0;
  // acc: the gradient with respect to the current activation's output; each
  // activation's share goes through its derivative into sum.
  acc_t acc[kRows] = {}, sum[kRows] = {};
  const auto fold = [&](int act) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int row = st.rg * kRows + i;
      if (row < tc.th) {
        const acc_t xv = static_cast<acc_t>(x[base + static_cast<int64_t>(tc.r0 + row) * dm.W]);
        sum[i] += prologue_grad(act, dm.bn, xv, m, r, acc[i]);
      }
      acc[i] = acc_t(0);
    }
  };
  for (int q = gc.j0; q < gc.j1; ++q) {
    const int j = gc.at(cd, q);
    if (st.valid && q > gc.j0 && cd.act[j] != cd.act[gc.at(cd, q - 1)]) fold(cd.act[gc.at(cd, q - 1)]);
    __syncthreads();  // the previous candidate's region and weights are read
    load_weights(wsm, cd, j, c, s == 1);
    load_grad(region, t, tc, grad, dm, j, c, gr0, gc0);
    __syncthreads();
    if (!st.valid) continue;
    const acc_t* plane = region + st.pb * t.rows * t.pitch;
    if (s == 1) {
      // dA(h, w) = sum_{u,v} flip(w)[u][v] * G(h - p + u*d, w - p + v*d).
      const int off = dm.P - cd.pad[j];
      correlate(cd.kind[j], 1, plane + (st.rg * kRows + off) * t.pitch + st.col + off, t.pitch, wsm, cd.k[j], cd.d[j],
                acc);
    } else {
      const int w = tc.c0 + st.col;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int h = tc.r0 + st.rg * kRows + i;
        acc[i] += gather_stride_two_kind(cd.kind[j], plane, t.pitch, gr0, gc0, h, w, cd.pad[j], wsm, cd.k[j], cd.d[j]);
      }
    }
  }
  if (!st.valid) return;
  fold(cd.act[gc.at(cd, gc.j1 - 1)]);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = st.rg * kRows + i;
    if (row >= tc.th) break;
    grad_pre[base + static_cast<int64_t>(tc.r0 + row) * dm.W] = static_cast<scalar_t>(sum[i]);
  }
}

// --- weight gradient ----------------------------------------------------------------

// What a weight-gradient block reads.
template <typename scalar_t, typename acc_t>
struct WeightGradArgs {
  const scalar_t* grad;
  const scalar_t* x;
  Candidates<acc_t> cd;
  const acc_t* mean;
  const acc_t* rstd;
  Dims dm;
  Tile t;
  int64_t items_per_block, chunks, taps_all;
  acc_t* partials;  // (groups, taps_all, chunks)
  // The block's run of items: [first_item(), last_item()).
  __device__ int64_t first_item() const { return (blockIdx.x % chunks) * items_per_block; }
  __device__ int64_t last_item() const { return min(t.items(), first_item() + items_per_block); }
};

// This thread's strip of candidate j's output gradient in tile tc, 0 past the tile's rows.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_grad_strip(const WeightGradArgs<scalar_t, acc_t>& a, const TileCoord& tc,
                                                const Strip& st, int j, int c, acc_t (&g)[kRows]) {
  const scalar_t* gsrc = a.grad + out_plane_offset(a.dm, j, c, tc.n0 + st.pb) + tc.c0 + st.col;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int row = st.rg * kRows + i;
    g[i] = row < tc.th ? static_cast<acc_t>(gsrc[static_cast<int64_t>(tc.r0 + row) * a.dm.Wo]) : acc_t(0);
  }
}

// Where this thread's strip of candidate j reads the activation tile.
template <int S, typename scalar_t, typename acc_t>
__device__ __forceinline__ const acc_t* strip_source(const WeightGradArgs<scalar_t, acc_t>& a, const acc_t* region,
                                                     const Strip& st, int j) {
  const int off = a.dm.P - a.cd.pad[j];
  return region + (st.pb * a.t.rows + st.rg * kRows * S + off) * a.t.pitch + st.col * S + off;
}

// The block's items for candidate j alone: for each, the activation tile into
// shared memory, then this thread's strip of output gradients against it.
// visit(src, g) adds a strip's share of the taps.
template <int S, typename scalar_t, typename acc_t, typename Visit>
__device__ __forceinline__ void for_each_strip(const WeightGradArgs<scalar_t, acc_t>& a, acc_t* region, int64_t group,
                                               int j, int c, Visit&& visit) {
  const Dims& dm = a.dm;
  const acc_t m = dm.bn ? a.mean[group] : acc_t(0), r = dm.bn ? a.rstd[group] : acc_t(1);
  for (int64_t item = a.first_item(); item < a.last_item(); ++item) {
    const TileCoord tc = tile_coord(a.t, item, dm.Ho, dm.Wo, dm.N);
    __syncthreads();  // the previous tile is read
    load_activation(region, a.t, tc, a.x, dm, group, a.cd.act[j], m, r);
    __syncthreads();
    const Strip st = my_strip(a.t, tc);
    if (!st.valid) continue;
    acc_t g[kRows];
    load_grad_strip(a, tc, st, j, c, g);
    visit(strip_source<S>(a, region, st, j), g);
  }
}

// The block's sums of n <= N values over its threads, in a fixed order (a
// butterfly within each warp, then the warps in order), to
// partials[(group * taps_all + tap_offset + k) * chunks + chunk]. value(k)
// gives this thread's k-th value; N is a compile-time bound, so the loop
// unrolls and the values stay in registers.
template <int N, typename scalar_t, typename acc_t, typename Value>
__device__ __forceinline__ void store_tap_sums(const WeightGradArgs<scalar_t, acc_t>& a, int n, Value&& value,
                                               acc_t* scratch, int64_t group, int tap_offset) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k >= n) break;  // the same for the whole block
    const acc_t s = warp_sum(value(k));
    if (lane == 0) scratch[warp * n + k] = s;
  }
  __syncthreads();
  const int64_t chunk = blockIdx.x % a.chunks;
  for (int k = threadIdx.x; k < n; k += kThreads) {
    acc_t s = scratch[k];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) s += scratch[w * n + k];
    a.partials[(group * a.taps_all + tap_offset + k) * a.chunks + chunk] = s;
  }
  __syncthreads();
}

template <int K, int D, int S, typename scalar_t, typename acc_t>
__device__ void weight_grad_unrolled(const WeightGradArgs<scalar_t, acc_t>& a, acc_t* region, acc_t* scratch,
                                     int64_t group, int j, int c) {
  acc_t acc[K * K] = {};
  for_each_strip<S>(a, region, group, j, c,
                    [&](const acc_t* src, const acc_t(&g)[kRows]) { tap_dots_strip<K, D, S>(src, a.t.pitch, g, acc); });
  store_tap_sums<K * K>(a, K * K, [&](int k) { return acc[k]; }, scratch, group, a.cd.tap_offset[j]);
}

// Any kernel size: the taps in blocks of kTapBlock, each block's sums held in
// registers (tap offsets fixed per block, so no array is indexed at run time
// and nothing goes to local memory) over a pass of the block's items; a
// kernel of more than kTapBlock taps reads its tiles once per block of taps.
constexpr int kTapBlock = 16;

template <int S, typename scalar_t, typename acc_t>
__device__ void weight_grad_any(const WeightGradArgs<scalar_t, acc_t>& a, acc_t* region, acc_t* scratch, int64_t group,
                                int j, int c) {
  const int k = a.cd.k[j], d = a.cd.d[j], pitch = a.t.pitch, kk = k * k;
  for (int t0 = 0; t0 < kk; t0 += kTapBlock) {
    int offset[kTapBlock];  // of tap t0 + q in the tile; taps past the kernel repeat its last
#pragma unroll
    for (int q = 0; q < kTapBlock; ++q) {
      const int tap = min(t0 + q, kk - 1);
      offset[q] = (tap / k) * d * pitch + (tap % k) * d;
    }
    acc_t acc[kTapBlock] = {};
    for_each_strip<S>(a, region, group, j, c, [&](const acc_t* src, const acc_t(&g)[kRows]) {
#pragma unroll
      for (int q = 0; q < kTapBlock; ++q) {
        acc_t sum = acc[q];
#pragma unroll
        for (int i = 0; i < kRows; ++i) sum += g[i] * src[i * S * pitch + offset[q]];
        acc[q] = sum;
      }
    });
    store_tap_sums<kTapBlock>(
        a, min(kTapBlock, kk - t0), [&](int q) { return acc[q]; }, scratch, group, a.cd.tap_offset[j] + t0);
  }
}

// Block (group, chunk): per candidate of the group, in turn, the partial sums
// of its weights' gradient over the chunk's items. A per-candidate x (one
// candidate per group), or a shared x that weight_grad_shared_kernel does not
// take.
template <typename scalar_t, int S, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(WeightGradArgs<scalar_t, acc_t> a) {
  FASTNAS_DYNAMIC_SHARED(smem_bytes);
  acc_t* region = reinterpret_cast<acc_t*>(smem_bytes);
  acc_t* scratch = region + a.t.region();
  const int64_t group = blockIdx.x / a.chunks;
  const int c = static_cast<int>(a.dm.shared ? group : group % a.dm.C);
  const GroupCandidates gc = candidates_of(a.dm, a.cd.J, group);
  for (int j = gc.j0; j < gc.j1; ++j) {
    if constexpr (kUnrolled<acc_t>) {
      const int kind = a.cd.kind[j];
      if (kind != kAnyKernel) {
#define FASTNAS_DW_CALL(K, D, S_) weight_grad_unrolled<K, D, S_>(a, region, scratch, group, j, c)
        [&] { FASTNAS_DW_KINDS(FASTNAS_DW_CALL, S) }();
#undef FASTNAS_DW_CALL
        continue;
      }
    }
    weight_grad_any<S>(a, region, scratch, group, j, c);
  }
}

// The DARTS space's depthwise candidates: weight_grad_shared_kernel holds an
// accumulator array for each.
inline bool darts_kind(int kind) { return kind == k3d1 || kind == k5d1 || kind == k3d2 || kind == k5d2; }

// Whether weight_grad_shared_kernel takes a call: a shared x with several
// candidates of distinct DARTS kinds (accumulated in float).
template <typename acc_t>
bool shares_tiles(const Dims& dm, const Candidates<acc_t>& cd) {
  if (!dm.shared || cd.J < 2) return false;
  unsigned seen = 0;
  for (int j = 0; j < cd.J; ++j) {
    if (!darts_kind(cd.kind[j]) || (seen >> cd.kind[j] & 1u)) return false;
    seen |= 1u << cd.kind[j];
  }
  return true;
}

// Block (channel, chunk) of a shared x: every candidate's partial sums over
// the chunk's items, tiles outside candidates. Each tile's activation is
// loaded once per activation (the candidates visited grouped by activation)
// and serves every candidate of it, where a loop over candidates outside tiles
// loads each tile once per candidate. Each DARTS kind keeps its tap sums in
// its own register array (9 + 25 + 9 + 25 for the four), with compile-time
// taps, so a candidate's kind picks an array, not an index.
template <typename scalar_t, int S, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads) weight_grad_shared_kernel(WeightGradArgs<scalar_t, acc_t> a) {
  FASTNAS_DYNAMIC_SHARED(smem_bytes);
  acc_t* region = reinterpret_cast<acc_t*>(smem_bytes);
  acc_t* scratch = region + a.t.region();
  const Dims& dm = a.dm;
  const Candidates<acc_t>& cd = a.cd;
  const int64_t group = blockIdx.x / a.chunks;
  const int c = static_cast<int>(group);
  const acc_t m = dm.bn ? a.mean[group] : acc_t(0), r = dm.bn ? a.rstd[group] : acc_t(1);
  acc_t acc3[9] = {}, acc5[25] = {}, acc3d2[9] = {}, acc5d2[25] = {};
  for (int64_t item = a.first_item(); item < a.last_item(); ++item) {
    const TileCoord tc = tile_coord(a.t, item, dm.Ho, dm.Wo, dm.N);
    const Strip st = my_strip(a.t, tc);
    for (int q = 0; q < cd.J; ++q) {
      const int j = cd.order[q];
      if (q == 0 || cd.act[j] != cd.act[cd.order[q - 1]]) {
        __syncthreads();  // the previous tile or activation is read
        load_activation(region, a.t, tc, a.x, dm, group, cd.act[j], m, r);
        __syncthreads();
      }
      if (!st.valid) continue;
      acc_t g[kRows];
      load_grad_strip(a, tc, st, j, c, g);
      const acc_t* src = strip_source<S>(a, region, st, j);
      switch (cd.kind[j]) {
        case k3d1:
          tap_dots_strip<3, 1, S>(src, a.t.pitch, g, acc3);
          break;
        case k5d1:
          tap_dots_strip<5, 1, S>(src, a.t.pitch, g, acc5);
          break;
        case k3d2:
          tap_dots_strip<3, 2, S>(src, a.t.pitch, g, acc3d2);
          break;
        default:
          tap_dots_strip<5, 2, S>(src, a.t.pitch, g, acc5d2);
          break;
      }
    }
  }
  for (int j = 0; j < cd.J; ++j) {
    const int off = cd.tap_offset[j];
    switch (cd.kind[j]) {
      case k3d1:
        store_tap_sums<9>(a, 9, [&](int k) { return acc3[k]; }, scratch, group, off);
        break;
      case k5d1:
        store_tap_sums<25>(a, 25, [&](int k) { return acc5[k]; }, scratch, group, off);
        break;
      case k3d2:
        store_tap_sums<9>(a, 9, [&](int k) { return acc3d2[k]; }, scratch, group, off);
        break;
      default:
        store_tap_sums<25>(a, 25, [&](int k) { return acc5d2[k]; }, scratch, group, off);
        break;
    }
  }
}

// The weight-gradient kernel of a call.
template <typename scalar_t, typename acc_t>
auto weight_grad_kernel_for(const Dims& dm, const Candidates<acc_t>& cd) -> void (*)(WeightGradArgs<scalar_t, acc_t>) {
  if constexpr (kUnrolled<acc_t>) {
    if (shares_tiles(dm, cd)) {
      return dm.stride == 1 ? weight_grad_shared_kernel<scalar_t, 1> : weight_grad_shared_kernel<scalar_t, 2>;
    }
  }
  return dm.stride == 1 ? weight_grad_kernel<scalar_t, 1> : weight_grad_kernel<scalar_t, 2>;
}

#undef FASTNAS_DW_KINDS

// Where the weights' gradients go: one (C, 1, k, k) tensor in acc_t per candidate.
template <typename acc_t>
struct WeightGradOutputs {
  acc_t* grad[kMaxCandidates];
};

// The second stage of the weights' gradients, straight into each candidate's
// own tensor: block b sums channel c = b / taps_all's tap b % taps_all over the
// chunks of partials (groups, taps_all, chunks), in strided_sums_kernel's
// order. It reads only the candidate's own group (c for a shared x, j * C + c
// per candidate), so a per-candidate group's other taps are never read.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    weight_grad_sums_kernel(const acc_t* __restrict__ partials, const Candidates<acc_t> cd, WeightGradOutputs<acc_t> o,
                            int64_t C, int taps_all, int64_t chunks, bool shared) {
  __shared__ acc_t scratch[kWarps];
  const int64_t c = blockIdx.x / taps_all;
  const int tap = static_cast<int>(blockIdx.x % taps_all);
  int j = 0;
  while (j + 1 < cd.J && tap >= cd.tap_offset[j + 1]) ++j;
  const int64_t group = shared ? c : j * C + c;
  const acc_t* row = partials + (group * taps_all + tap) * chunks;
  acc_t v = acc_t(0);
  for (int64_t p = threadIdx.x; p < chunks; p += kThreads) v += row[p];
  v = block_sum(v, scratch);
  if (threadIdx.x == 0) o.grad[j][c * cd.k[j] * cd.k[j] + tap - cd.tap_offset[j]] = v;
}

// --- host side ----------------------------------------------------------------------

void check_cuda_limits(const char* op, const DepthwiseShape& s, const std::vector<DepthwiseCandidate>& cands) {
  TORCH_CHECK(s.J <= kMaxCandidates, op, ": ", s.J, " candidates; the CUDA kernel takes at most ", kMaxCandidates,
              " per call");
  for (size_t j = 0; j < cands.size(); ++j) {
    TORCH_CHECK(cands[j].pad <= kMaxPadding, op, ": weights[", j, "] with kernel size ", cands[j].k, " and dilation ",
                cands[j].d, " pads by ", cands[j].pad, "; the CUDA kernel takes a padding of at most ", kMaxPadding);
  }
  const int64_t most = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(s.N <= most && s.C <= most && s.H <= most / 2 && s.W <= most / 2, op, ": x of shape (N, C, H, W) = (",
              s.N, ", ", s.C, ", ", s.H, ", ", s.W, ") has a dimension too large for the CUDA kernel");
}

// The activation code of each of the J candidates (ReLU where `activations` is empty), checked.
std::vector<int64_t> activation_codes(const char* op, at::IntArrayRef activations, int64_t J) {
  TORCH_CHECK_VALUE(activations.empty() || static_cast<int64_t>(activations.size()) == J, op, ": activations has ",
                    activations.size(), " entries but weights has ", J);
  std::vector<int64_t> codes(J, math::kRelu);
  for (int64_t j = 0; j < static_cast<int64_t>(activations.size()); ++j) {
    TORCH_CHECK_VALUE(activations[j] >= 0 && activations[j] < math::kNumActivations, op, ": activations[", j, "] is ",
                      activations[j], "; activation codes run from 0 to ", math::kNumActivations - 1);
    codes[j] = activations[j];
  }
  return codes;
}

// Blocks of a launch: one dimension of at most 2^31 - 1.
int64_t grid_size(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": ", blocks, " blocks; too many for one launch");
  return blocks;
}

Dims dims_of(const DepthwiseShape& s, const std::vector<DepthwiseCandidate>& cands, bool bn) {
  int P = 0;
  for (const auto& cd : cands) P = std::max<int>(P, static_cast<int>(cd.pad));
  return {static_cast<int>(s.N),
          static_cast<int>(s.C),
          static_cast<int>(s.H),
          static_cast<int>(s.W),
          static_cast<int>(s.Ho),
          static_cast<int>(s.Wo),
          static_cast<int>(s.stride),
          P,
          s.shared,
          bn};
}

// The launch's candidates: weights, geometry, activation, and the order a shared
// x visits them in (grouped by activation, in order of first appearance).
template <typename acc_t>
Candidates<acc_t> candidate_table(const std::vector<at::Tensor>& ws, const std::vector<DepthwiseCandidate>& cands,
                                  const std::vector<int64_t>& codes) {
  Candidates<acc_t> cd{};
  const std::vector<int64_t> offsets = tap_offsets(cands);
  cd.J = static_cast<int>(cands.size());
  int q = 0;
  for (int j = 0; j < cd.J; ++j) {
    const bool first = std::find(codes.begin(), codes.begin() + j, codes[j]) == codes.begin() + j;
    for (int i = j; first && i < cd.J; ++i) {
      if (codes[i] == codes[j]) cd.order[q++] = i;
    }
  }
  for (size_t j = 0; j < cands.size(); ++j) {
    cd.act[j] = static_cast<int>(codes[j]);
    cd.w[j] = ws[j].data_ptr<acc_t>();
    cd.k[j] = static_cast<int>(cands[j].k);
    cd.d[j] = static_cast<int>(cands[j].d);
    cd.pad[j] = static_cast<int>(cands[j].pad);
    cd.kind[j] = kind_of(cands[j].k, cands[j].d);
    cd.tap_offset[j] = static_cast<int>(offsets[j]);
  }
  return cd;
}

int max_taps(const std::vector<DepthwiseCandidate>& cands) {
  int64_t m = 1;
  for (const auto& cd : cands) m = std::max(m, cd.k * cd.k);
  return static_cast<int>(m);
}

// The region one plane of a tile needs: the activation around an output tile
// (forward, weight gradient), or the output gradient around an input tile.
enum class Region { kActivation, kGradient };

void region_of(Region kind, int th, int tw, int s, int P, int& rows, int& cols) {
  if (kind == Region::kActivation) {
    rows = (th - 1) * s + 1 + 2 * P;
    cols = (tw - 1) * s + 1 + 2 * P;
  } else if (s == 1) {
    rows = th + 2 * P;
    cols = tw + 2 * P;
  } else {
    rows = (th - 1 + 2 * P) / 2 + 2;
    cols = (tw - 1 + 2 * P) / 2 + 2;
  }
}

// Tiles of a (plane_h, plane_w) plane: whole planes, as many as fill a block
// with strips, when a plane has at most kThreads strips; else bands of rows of
// one plane, at most 64 columns wide. Shrunk until its shared memory (the
// region, plus `extra` values) fits the budget.
Tile plan_tiles(Region kind, int64_t plane_h, int64_t plane_w, int64_t n, int s, int P, int64_t extra,
                int64_t elem_bytes) {
  Tile t{};
  t.TW = static_cast<int>(std::min<int64_t>(plane_w, 64));
  const int64_t strip_rows = ceil_div(plane_h, kRows);
  if (t.TW == plane_w && t.TW * strip_rows <= kThreads) {
    t.TH = static_cast<int>(strip_rows * kRows);
    t.PB = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, kThreads / (t.TW * strip_rows))));
  } else {
    t.PB = 1;
    t.TH = static_cast<int>(kRows * std::min<int64_t>(strip_rows, std::max(1, kThreads / t.TW)));
  }
  while (true) {
    region_of(kind, t.TH, t.TW, s, P, t.rows, t.cols);
    t.pitch = t.cols | 1;  // odd: the rows of a warp's strips fall on different banks
    if ((extra + t.region()) * elem_bytes <= kSmemBudget) break;
    if (t.PB > 1) {
      t.PB = (t.PB + 1) / 2;
    } else if (t.TH > kRows) {
      t.TH = std::max(kRows, t.TH / 2 / kRows * kRows);
    } else {
      TORCH_CHECK(t.TW > 1, "multi_depthwise: no tile fits in shared memory (padding ", P, ")");
      t.TW = (t.TW + 1) / 2;
    }
  }
  t.RG = t.TH / kRows;
  t.tiles_h = static_cast<int>(ceil_div(plane_h, t.TH));
  t.tiles_w = static_cast<int>(ceil_div(plane_w, t.TW));
  t.n_blocks = static_cast<int>(ceil_div(n, t.PB));
  return t;
}

at::Tensor multi_depthwise(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef dilations, int64_t stride,
                           const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& rstd,
                           at::IntArrayRef activations) {
  check_multi_depthwise(kForward, x_in, weights, dilations, stride, mean, rstd, kDevice);
  const DepthwiseShape s = depthwise_shape(x_in, weights, stride);
  const std::vector<DepthwiseCandidate> cands = depthwise_candidates(weights, dilations);
  check_cuda_limits(kForward, s, cands);
  const std::vector<int64_t> codes = activation_codes(kForward, activations, s.J);
  const DeviceGuard guard(x_in.device());
  at::Tensor out = at::empty({s.J, s.C, s.N, s.Ho, s.Wo}, x_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous();
  const auto dtype = x.scalar_type();
  const auto ws = for_accumulation_all(weights, dtype);
  const bool bn = mean.has_value();
  const at::Tensor mean_acc = bn ? for_accumulation(*mean, dtype) : at::Tensor();
  const at::Tensor rstd_acc = bn ? for_accumulation(*rstd, dtype) : at::Tensor();
  const Dims dm = dims_of(s, cands, bn);
  const int w_taps = max_taps(cands);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_depthwise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tile t = plan_tiles(Region::kActivation, s.Ho, s.Wo, s.N, dm.stride, dm.P, w_taps, sizeof(acc_t));
    const int64_t smem = (w_taps + t.region()) * sizeof(acc_t);
    launch(forward_kernel<scalar_t>, grid_size(kForward, s.groups() * t.items()), smem, x.data_ptr<scalar_t>(),
           candidate_table<acc_t>(ws, cands, codes), bn ? mean_acc.data_ptr<acc_t>() : nullptr,
           bn ? rstd_acc.data_ptr<acc_t>() : nullptr, dm, t, w_taps, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> multi_depthwise_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef dilations,
    int64_t stride, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& rstd, bool input_need_grad,
    at::IntArrayRef activations) {
  check_multi_depthwise(kBackward, x_in, weights, dilations, stride, mean, rstd, kDevice);
  const DepthwiseShape s = depthwise_shape(x_in, weights, stride);
  check_multi_depthwise_grad_out(kBackward, grad_out_in, x_in, s);
  const std::vector<DepthwiseCandidate> cands = depthwise_candidates(weights, dilations);
  check_cuda_limits(kBackward, s, cands);
  const std::vector<int64_t> codes = activation_codes(kBackward, activations, s.J);
  const DeviceGuard guard(x_in.device());
  const auto dtype = x_in.scalar_type();
  const auto acc_dtype = accumulate_dtype(dtype);
  at::Tensor grad_pre =
      input_need_grad ? empty_contiguous(x_in.sizes(), x_in.options()) : at::empty({0}, x_in.options());
  const int64_t taps_all = tap_offsets(cands).back();
  const bool any = s.N > 0 && s.C > 0 && s.Ho > 0 && s.Wo > 0;
  // The weights' gradients in acc_t, written whole by weight_grad_sums_kernel
  // (zeros only where it does not run).
  std::vector<at::Tensor> grad_ws;
  for (const auto& cand : cands) {
    const auto options = x_in.options().dtype(acc_dtype);
    grad_ws.push_back(any ? at::empty({s.C, 1, cand.k, cand.k}, options)
                          : at::zeros({s.C, 1, cand.k, cand.k}, options));
  }
  if (any) {
    const at::Tensor x = x_in.contiguous();
    const at::Tensor go = grad_out_in.contiguous();
    const auto ws = for_accumulation_all(weights, dtype);
    const bool bn = mean.has_value();
    const at::Tensor mean_acc = bn ? for_accumulation(*mean, dtype) : at::Tensor();
    const at::Tensor rstd_acc = bn ? for_accumulation(*rstd, dtype) : at::Tensor();
    const Dims dm = dims_of(s, cands, bn);
    const int w_taps = max_taps(cands);

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_depthwise_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto cd = candidate_table<acc_t>(ws, cands, codes);
      const acc_t* mp = bn ? mean_acc.data_ptr<acc_t>() : nullptr;
      const acc_t* rp = bn ? rstd_acc.data_ptr<acc_t>() : nullptr;
      if (input_need_grad) {
        const Tile t = plan_tiles(Region::kGradient, s.H, s.W, s.N, dm.stride, dm.P, w_taps, sizeof(acc_t));
        const int64_t smem = (w_taps + t.region()) * sizeof(acc_t);
        launch(input_grad_kernel<scalar_t>, grid_size(kBackward, s.groups() * t.items()), smem, go.data_ptr<scalar_t>(),
               x.data_ptr<scalar_t>(), cd, mp, rp, dm, t, w_taps, grad_pre.data_ptr<scalar_t>());
      }
      const int64_t scratch = static_cast<int64_t>(kWarps) * w_taps;
      const Tile t = plan_tiles(Region::kActivation, s.Ho, s.Wo, s.N, dm.stride, dm.P, scratch, sizeof(acc_t));
      // A fixed split of each group's tiles into chunks, from the shape alone.
      const int64_t per_block = std::max<int64_t>(1, s.groups() * t.items() / kWeightGradBlocks);
      const int64_t chunks = ceil_div(t.items(), per_block);
      // Every (group, chunk) writes its candidates' taps, the only ones read.
      at::Tensor partials = at::empty({s.groups(), taps_all, chunks}, x_in.options().dtype(acc_dtype));
      const WeightGradArgs<scalar_t, acc_t> args{
          go.data_ptr<scalar_t>(),   x.data_ptr<scalar_t>(), cd, mp, rp, dm, t, per_block, chunks, taps_all,
          partials.data_ptr<acc_t>()};
      const int64_t smem = (t.region() + scratch) * sizeof(acc_t);
      launch(weight_grad_kernel_for<scalar_t>(dm, cd), grid_size(kBackward, s.groups() * chunks), smem, args);
      WeightGradOutputs<acc_t> outs{};
      for (int64_t j = 0; j < s.J; ++j) outs.grad[j] = grad_ws[j].data_ptr<acc_t>();
      launch(weight_grad_sums_kernel<acc_t>, grid_size(kBackward, s.C * taps_all), 0, partials.data_ptr<acc_t>(), cd,
             outs, s.C, static_cast<int>(taps_all), chunks, s.shared);
    });
  }
  for (int64_t j = 0; j < s.J; ++j) grad_ws[j] = grad_ws[j].to(weights[j].scalar_type());
  return {grad_pre, std::move(grad_ws)};
}

}  // namespace
}  // namespace cuda
}  // namespace fastnas

FASTNAS_CUDA_LIBRARY_IMPL(m) {
  m.impl("multi_depthwise", &fastnas::cuda::multi_depthwise);
  m.impl("multi_depthwise_backward", &fastnas::cuda::multi_depthwise_backward);
}
