// darts_sum on CUDA: the DARTS edge's weighted sum with batch norm folded in,
// its training-mode backward, and the batch statistics of the 3x3 pools.
//
// A block covers a chunk of one channel's N*Ho*Wo outputs (or N*H*W inputs),
// so the per-channel statistics and coefficients are the same for the whole
// block. The 3x3 pools are recomputed from x (math::pool_window_3x3, the CPU
// kernels' window, or its scan over registers in grad_x_kernel) wherever they
// are needed and never stored. Every reduction is two-stage and fixed-order
// (per-block partials, then fixed-order sums), so results are bit-identical
// from run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "checks.h"
#include "cuda/common.cuh"
#include "fastnas_math.h"
#include "host/darts_sum.h"

namespace fastnas {
namespace cuda {
namespace {

constexpr const char* kStats = "pool_batch_norm_stats";
constexpr const char* kForward = "darts_sum";
constexpr const char* kBackward = "darts_sum_backward";

// Outputs (or inputs) of one channel per block: kItems per thread.
constexpr int kItems = 4;
constexpr int64_t kChunk = kThreads * kItems;

// The shapes, for the kernels.
struct Shape {
  int64_t n, c, h, w, stride, ho, wo, jz;
  __host__ __device__ int64_t plane_in() const { return h * w; }
  __host__ __device__ int64_t plane_out() const { return ho * wo; }
  // Outputs per channel, N * Ho * Wo.
  __host__ __device__ int64_t m() const { return n * ho * wo; }
};

Shape shape_of(const DartsGeometry& g) { return {g.n, g.c, g.h, g.w, g.stride, g.ho, g.wo, g.jz}; }

// The pool window of output o of the (n, c) plane whose first input element is xplane.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ math::PoolWindow<acc_t> window_at(const scalar_t* xplane, const Shape& s, int64_t o) {
  const auto load = [&](int64_t ih, int64_t iw) { return static_cast<acc_t>(xplane[ih * s.w + iw]); };
  return math::pool_window_3x3<acc_t>(load, s.h, s.w, o / s.wo, o % s.wo, s.stride);
}

// --- pool_batch_norm_stats ----------------------------------------------------------

// Block (c, chunk): the mean and sum of squared deviations of both pools over
// the chunk, to part[(k * C + c) * chunks + chunk] (k = 0: max, 1: avg).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    pool_stats_chunks_kernel(const scalar_t* __restrict__ x, Shape s, int64_t chunks, acc_t* __restrict__ part_mean,
                             acc_t* __restrict__ part_m2) {
  __shared__ acc_t scratch[kWarps];
  const int64_t c = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t start = chunk * kChunk, m = s.m();
  const int64_t len = m - start < kChunk ? m - start : kChunk;
  acc_t vmax[kItems], vavg[kItems];
  acc_t smax = acc_t(0), savg = acc_t(0);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t e = threadIdx.x + i * kThreads;
    vmax[i] = vavg[i] = acc_t(0);
    if (e < len) {
      const int64_t mm = start + e, n = mm / s.plane_out(), o = mm % s.plane_out();
      const auto win = window_at<scalar_t, acc_t>(x + (n * s.c + c) * s.plane_in(), s, o);
      vmax[i] = win.max;
      vavg[i] = win.avg();
    }
    smax += vmax[i];
    savg += vavg[i];
  }
  const acc_t count = static_cast<acc_t>(len);
  const acc_t mean_max = block_sum(smax, scratch) / count;
  const acc_t mean_avg = block_sum(savg, scratch) / count;
  acc_t dmax = acc_t(0), davg = acc_t(0);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (threadIdx.x + i * kThreads < len) {
      dmax += (vmax[i] - mean_max) * (vmax[i] - mean_max);
      davg += (vavg[i] - mean_avg) * (vavg[i] - mean_avg);
    }
  }
  dmax = block_sum(dmax, scratch);
  davg = block_sum(davg, scratch);
  if (threadIdx.x == 0) {
    part_mean[c * chunks + chunk] = mean_max;
    part_m2[c * chunks + chunk] = dmax;
    part_mean[(s.c + c) * chunks + chunk] = mean_avg;
    part_m2[(s.c + c) * chunks + chunk] = davg;
  }
}

// One thread per (pool, channel) row: its chunks merged in order, in double.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pool_stats_merge_kernel(const acc_t* __restrict__ part_mean, const acc_t* __restrict__ part_m2, int64_t rows,
                            int64_t m, int64_t chunks, double eps, acc_t* __restrict__ mean, acc_t* __restrict__ rstd,
                            acc_t* __restrict__ var) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  double count, mu, m2;
  math::merge_chunk_moments(part_mean + row * chunks, part_m2 + row * chunks, m, chunks, kChunk, count, mu, m2);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double v = count > 0 ? m2 / count : nan;
  mean[row] = static_cast<acc_t>(count > 0 ? mu : nan);
  var[row] = static_cast<acc_t>(v);
  rstd[row] = static_cast<acc_t>(1.0 / ::sqrt(v + eps));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_batch_norm_stats(const at::Tensor& x_in, int64_t stride,
                                                                     double eps) {
  const DartsGeometry g = check_pool_batch_norm_stats(kStats, x_in, stride, eps, kDevice);
  const DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto opts = x.options().dtype(accumulate_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({2, g.c}, opts), rstd = at::empty({2, g.c}, opts), var = at::empty({2, g.c}, opts);
  if (g.c == 0) return {mean, rstd, var};
  const Shape s = shape_of(g);
  const int64_t chunks = ceil_div(s.m(), kChunk);
  at::Tensor part_mean = at::empty({2 * g.c * chunks}, opts), part_m2 = at::empty({2 * g.c * chunks}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (chunks > 0) {
      launch(pool_stats_chunks_kernel<scalar_t>, g.c * chunks, 0, x.data_ptr<scalar_t>(), s, chunks,
             part_mean.data_ptr<acc_t>(), part_m2.data_ptr<acc_t>());
    }
    launch(pool_stats_merge_kernel<acc_t>, ceil_div(2 * g.c, kThreads), 0, part_mean.data_ptr<acc_t>(),
           part_m2.data_ptr<acc_t>(), 2 * g.c, s.m(), chunks, eps, mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
           var.data_ptr<acc_t>());
  });
  return {mean, rstd, var};
}

// --- darts_sum -------------------------------------------------------------------

// The terms present, and the accumulation-type statistics, for the kernels.
template <typename acc_t>
struct Terms {
  const acc_t *mean, *rstd, *coef;  // (Jz + 2, C), (Jz + 2, C), (Jz + 3)
  bool has_max, has_avg, has_skip;
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ z, Terms<acc_t> t, Shape s,
                   int64_t chunks, scalar_t* __restrict__ out) {
  const int64_t c = blockIdx.x / chunks, start = (blockIdx.x % chunks) * kChunk, m = s.m();
  const int64_t jz = s.jz, C = s.c;
  for (int i = 0; i < kItems; ++i) {
    const int64_t mm = start + threadIdx.x + i * kThreads;
    if (mm >= m) break;
    const int64_t n = mm / s.plane_out(), o = mm % s.plane_out();
    acc_t acc = acc_t(0);
    for (int64_t j = 0; j < jz; ++j) {
      const acc_t zj = static_cast<acc_t>(z[(j * C + c) * m + mm]);
      acc += math::normalized_term(t.coef[j] * t.rstd[j * C + c], zj, t.mean[j * C + c]);
    }
    const scalar_t* xplane = x + (n * C + c) * s.plane_in();
    if (t.has_max || t.has_avg) {
      const auto win = window_at<scalar_t, acc_t>(xplane, s, o);
      if (t.has_max) acc += math::normalized_term(t.coef[jz] * t.rstd[jz * C + c], win.max, t.mean[jz * C + c]);
      if (t.has_avg) {
        acc += math::normalized_term(t.coef[jz + 1] * t.rstd[(jz + 1) * C + c], win.avg(), t.mean[(jz + 1) * C + c]);
      }
    }
    if (t.has_skip) acc += t.coef[jz + 2] * static_cast<acc_t>(xplane[o]);
    out[(n * C + c) * s.plane_out() + o] = static_cast<scalar_t>(acc);
  }
}

at::Tensor darts_sum(const at::Tensor& x_in, const at::Tensor& z_in, const at::Tensor& mean_in,
                     const at::Tensor& rstd_in, const at::Tensor& coef_in, int64_t stride, bool has_max, bool has_avg,
                     bool has_skip) {
  const DartsGeometry g = check_darts_sum(kForward, x_in, z_in, mean_in, rstd_in, coef_in, stride, has_skip, kDevice);
  const DeviceGuard guard(x_in.device());
  at::Tensor out = empty_contiguous({g.n, g.c, g.ho, g.wo}, x_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor z = z_in.contiguous();
  const auto dtype = x.scalar_type();
  const at::Tensor mean = for_accumulation(mean_in, dtype);
  const at::Tensor rstd = for_accumulation(rstd_in, dtype);
  const at::Tensor coef = for_accumulation(coef_in, dtype);
  const Shape s = shape_of(g);
  const int64_t chunks = ceil_div(s.m(), kChunk);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "darts_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Terms<acc_t> t{
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), has_max, has_avg, has_skip};
    launch(forward_kernel<scalar_t>, g.c * chunks, 0, x.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), t, s, chunks,
           out.data_ptr<scalar_t>());
  });
  return out;
}

// --- darts_sum_backward ----------------------------------------------------------
//
// Four steps, as on the CPU: per-block sums of g and of g times each
// candidate's centred value (backward_sums_kernel); per channel, in block
// order, the coefficients of the elementwise pass (coefficients_kernel), and
// the coefficients' gradient (grad_coef_kernel); then grad_z elementwise
// (grad_z_kernel) and grad_x by gathering, for each input, what the skip and
// the pool windows that contain it send back (grad_x_kernel).

// Sums a block reduces together: each warp reduces its share of kSumGroup
// sums, then one barrier, then the warps' totals are added in warp order (the
// order of block_sum), so a block pays two barriers per kSumGroup sums.
constexpr int kSumGroup = 8;

// Block (c, chunk) writes part[(k * C + c) * chunks + chunk] for the Jz + 4
// sums: [g, g * (z_j - mean_j) for each j, g * (max - mean), g * (avg - mean), g * x];
// absent terms get 0. Each thread reads its grad_out elements once, into
// registers, and every sum is taken from them.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    backward_sums_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ z, Terms<acc_t> t, Shape s, int64_t chunks,
                         acc_t* __restrict__ part) {
  __shared__ acc_t scratch[kWarps * kSumGroup];
  const int64_t c = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t start = chunk * kChunk, m = s.m(), jz = s.jz, C = s.c, sums = jz + 4;
  acc_t g[kItems];
  acc_t sg = acc_t(0), smax = acc_t(0), savg = acc_t(0), sskip = acc_t(0);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t mm = start + threadIdx.x + i * kThreads;
    g[i] = acc_t(0);
    if (mm < m) {
      const int64_t n = mm / s.plane_out(), o = mm % s.plane_out();
      g[i] = static_cast<acc_t>(grad[(n * C + c) * s.plane_out() + o]);
      const scalar_t* xplane = x + (n * C + c) * s.plane_in();
      if (t.has_max || t.has_avg) {
        const auto win = window_at<scalar_t, acc_t>(xplane, s, o);
        if (t.has_max) smax += g[i] * (win.max - t.mean[jz * C + c]);
        if (t.has_avg) savg += g[i] * (win.avg() - t.mean[(jz + 1) * C + c]);
      }
      if (t.has_skip) sskip += g[i] * static_cast<acc_t>(xplane[o]);
    }
    sg += g[i];
  }
  // This thread's share of sum k.
  const auto value = [&](int64_t k) {
    if (k == 0) return sg;
    if (k == jz + 1) return smax;
    if (k == jz + 2) return savg;
    if (k == jz + 3) return sskip;
    const int64_t j = k - 1;
    const acc_t mu = t.mean[j * C + c];
    acc_t v = acc_t(0);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t mm = start + threadIdx.x + i * kThreads;
      if (mm < m) v += g[i] * (static_cast<acc_t>(z[(j * C + c) * m + mm]) - mu);
    }
    return v;
  };
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t k0 = 0; k0 < sums; k0 += kSumGroup) {
#pragma unroll
    for (int q = 0; q < kSumGroup; ++q) {
      if (k0 + q >= sums) break;  // the same for the whole block
      const acc_t v = warp_sum(value(k0 + q));
      if (lane == 0) scratch[warp * kSumGroup + q] = v;
    }
    __syncthreads();
    if (threadIdx.x < kSumGroup && k0 + threadIdx.x < sums) {
      acc_t total = scratch[threadIdx.x];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) total += scratch[w * kSumGroup + threadIdx.x];
      part[((k0 + threadIdx.x) * C + c) * chunks + chunk] = total;
    }
    __syncthreads();
  }
}

// Block c: the channel's sums over its blocks, in order, to channel_sum[k * C + c];
// mean(g), and for candidate k (the z candidates and both pools) the scale and
// slope of math::bn_input_grad, to (Jz + 2, C).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    coefficients_kernel(const acc_t* __restrict__ part, Terms<acc_t> t, Shape s, int64_t chunks,
                        acc_t* __restrict__ channel_sum, acc_t* __restrict__ g_mean, acc_t* __restrict__ scale,
                        acc_t* __restrict__ slope) {
  __shared__ acc_t scratch[kWarps];
  const int64_t c = blockIdx.x, C = s.c, sums = s.jz + 4;
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(s.m());
  for (int64_t k = 0; k < sums; ++k) {
    acc_t v = acc_t(0);
    for (int64_t p = threadIdx.x; p < chunks; p += kThreads) v += part[(k * C + c) * chunks + p];
    v = block_sum(v, scratch);
    if (threadIdx.x != 0) continue;
    channel_sum[k * C + c] = v;
    if (k == 0) g_mean[c] = v * inv_m;
    if (k >= 1 && k <= s.jz + 2) {
      const int64_t r = (k - 1) * C + c;
      scale[r] = t.coef[k - 1] * t.rstd[r];
      slope[r] = math::bn_slope(v, t.rstd[r], inv_m);
    }
  }
}

// grad_coef[k] = sum over channels, in order, of channel_sum[1 + k] (times
// rstd for the normalised candidates); 0 for absent candidates.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_coef_kernel(const acc_t* __restrict__ channel_sum, Terms<acc_t> t, Shape s, acc_t* __restrict__ grad_coef) {
  const int64_t C = s.c, jz = s.jz;
  for (int64_t k = threadIdx.x; k < jz + 3; k += kThreads) {
    const bool present = k < jz || (k == jz && t.has_max) || (k == jz + 1 && t.has_avg) || (k == jz + 2 && t.has_skip);
    acc_t v = acc_t(0);
    for (int64_t c = 0; present && c < C; ++c) {
      const acc_t cs = channel_sum[(1 + k) * C + c];
      v += k < jz + 2 ? cs * t.rstd[k * C + c] : cs;
    }
    grad_coef[k] = v;
  }
}

// Block (c, chunk): grad z_j = scale * ((g - mean(g)) - (z_j - mean_j) * slope)
// for every j. Each thread reads its grad_out elements once and serves every
// candidate from registers, so grad_out is read once rather than Jz times.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    grad_z_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ z, const acc_t* __restrict__ mean,
                  const acc_t* __restrict__ g_mean, const acc_t* __restrict__ scale, const acc_t* __restrict__ slope,
                  Shape s, int64_t chunks, scalar_t* __restrict__ grad_z) {
  const int64_t c = blockIdx.x / chunks, start = (blockIdx.x % chunks) * kChunk, m = s.m();
  const acc_t gm = g_mean[c];
  acc_t gc[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t mm = start + threadIdx.x + i * kThreads;
    gc[i] = acc_t(0);
    if (mm < m) {
      const int64_t n = mm / s.plane_out(), o = mm % s.plane_out();
      gc[i] = static_cast<acc_t>(grad[(n * s.c + c) * s.plane_out() + o]) - gm;
    }
  }
  for (int64_t j = 0; j < s.jz; ++j) {
    const int64_t r = j * s.c + c;
    const acc_t a = scale[r], b = slope[r], mu = mean[r];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int64_t mm = start + threadIdx.x + i * kThreads;
      if (mm < m) {
        grad_z[r * m + mm] =
            static_cast<scalar_t>(math::bn_input_grad(a, gc[i], static_cast<acc_t>(z[r * m + mm]), mu, b));
      }
    }
  }
}

// What the pool windows containing input (h, w) of one (n, c) plane send
// back to it: the max window its candidate gradient when (h, w) is its argmax,
// the avg window its candidate gradient over its count; summed in the windows'
// row-major order, max before avg in each.
//
// Those windows all lie in the 5x5 block of x centred on (h, w): window (oh,
// ow) starts at block row R = oh * stride + 1 - h, in 0..2, and block column
// likewise. The thread loads the block once (25 loads in the interior at
// stride 1, at most 5 x 5 and on average 16 at stride 2, where a parity leaves
// one window row or column) and computes the windows from registers,
// separably (each row's share of the three window columns, then the windows
// from three rows; 45 + 27 steps instead of 81), in math::pool_window_3x3's
// order: the max-pool rule (math::max_takes: the first maximum in row-major
// order, or the last NaN), each row summed left to right, then the rows, so
// the argmax, the sum and the count, and so the gradient, are those of
// pool_window_3x3. Reloading each window from x instead cost up to
// 9 windows x 9 loads per input, and recording the windows in the sums pass
// would write and reread a per-output buffer.
template <typename acc_t>
struct PoolGrads {
  acc_t gm;                              // mean(g) of the channel
  acc_t max_scale, max_mean, max_slope;  // math::bn_input_grad's terms of each pool
  acc_t avg_scale, avg_mean, avg_slope;
  bool has_max, has_avg;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pools_grad_at(const scalar_t* __restrict__ xplane, const scalar_t* __restrict__ gplane,
                                               const Shape& s, int64_t h, int64_t w, const PoolGrads<acc_t>& p) {
  // Block row R starts window row (h - 1 + R) / stride where that divides:
  // from one division, h + 1 = qh * stride + rh, the remainder of h - 1 + R is
  // rh - (2 - R), which divides when it is 0, -stride or -2 * stride.
  bool win_r[3], win_c[3];  // whether block row / column R starts a window
  int64_t oh[3], ow[3];
  const int64_t st = s.stride, qh = (h + 1) / st, rh = h + 1 - qh * st, qw = (w + 1) / st, rw = w + 1 - qw * st;
#pragma unroll
  for (int r = 0; r < 3; ++r) {
    const int64_t dh = rh - (2 - r), dw = rw - (2 - r);
    oh[r] = qh - (dh == 0 ? 0 : dh == -st ? 1 : 2);
    ow[r] = qw - (dw == 0 ? 0 : dw == -st ? 1 : 2);
    win_r[r] = (dh == 0 || dh == -st || dh == -2 * st) && oh[r] >= 0 && oh[r] < s.ho;
    win_c[r] = (dw == 0 || dw == -st || dw == -2 * st) && ow[r] >= 0 && ow[r] < s.wo;
  }
  // The block rows (columns) in the plane that some window reads.
  bool in_r[5], in_c[5];
#pragma unroll
  for (int r = 0; r < 5; ++r) {
    const bool read_r = (win_r[0] && r <= 2) || (win_r[1] && r >= 1 && r <= 3) || (win_r[2] && r >= 2);
    const bool read_c = (win_c[0] && r <= 2) || (win_c[1] && r >= 1 && r <= 3) || (win_c[2] && r >= 2);
    in_r[r] = read_r && h - 2 + r >= 0 && h - 2 + r < s.h;
    in_c[r] = read_c && w - 2 + r >= 0 && w - 2 + r < s.w;
  }
  const int64_t base = (h - 2) * s.w + (w - 2);
  acc_t v[5][5];
#pragma unroll
  for (int r = 0; r < 5; ++r) {
#pragma unroll
    for (int q = 0; q < 5; ++q) {
      v[r][q] = in_r[r] && in_c[q] ? static_cast<acc_t>(xplane[base + r * s.w + q]) : acc_t(0);
    }
  }
  // Each row's share of window column Q (block columns Q..Q+2): its maximum
  // by the max-pool rule, whether that is column 2, and its sum left to right.
  acc_t row_max[5][3], row_sum[5][3];
  bool row_centre[5][3];
#pragma unroll
  for (int r = 0; r < 5; ++r) {
#pragma unroll
    for (int Q = 0; Q < 3; ++Q) {
      acc_t best = acc_t(0), sum = acc_t(0);
      bool centre = false, first = true;
#pragma unroll
      for (int b = Q; b < Q + 3; ++b) {
        // Selects, not branches: lanes differ at the borders.
        const bool take = in_c[b] && (first || math::max_takes(v[r][b], best));
        best = take ? v[r][b] : best;
        centre = take ? b == 2 : centre;
        sum = in_c[b] ? (first ? v[r][b] : sum + v[r][b]) : sum;
        first = first && !in_c[b];
      }
      row_max[r][Q] = best;
      row_sum[r][Q] = sum;
      row_centre[r][Q] = centre;
    }
  }
  // Window (R, Q) from its rows, top to bottom: the first row holding the
  // window's first maximum (or last NaN) holds it at that row's argmax, as in
  // a row-major scan.
  acc_t acc = acc_t(0);
#pragma unroll
  for (int R = 0; R < 3; ++R) {
#pragma unroll
    for (int Q = 0; Q < 3; ++Q) {
      if (!win_r[R] || !win_c[Q]) continue;
      acc_t best = acc_t(0), sum = acc_t(0);
      bool mine = false;  // the window's argmax is (h, w), the block's centre
      int rows = 0;
#pragma unroll
      for (int a = R; a < R + 3; ++a) {
        const bool take = in_r[a] && (rows == 0 || math::max_takes(row_max[a][Q], best));
        best = take ? row_max[a][Q] : best;
        mine = take ? a == 2 && row_centre[a][Q] : mine;
        sum = in_r[a] ? (rows == 0 ? row_sum[a][Q] : sum + row_sum[a][Q]) : sum;
        rows += in_r[a];
      }
      const acc_t gc = static_cast<acc_t>(gplane[oh[R] * s.wo + ow[Q]]) - p.gm;
      if (p.has_max && mine) acc += math::bn_input_grad(p.max_scale, gc, best, p.max_mean, p.max_slope);
      if (p.has_avg) {
        const int cols = int(in_c[Q]) + int(in_c[Q + 1]) + int(in_c[Q + 2]);
        const acc_t count = static_cast<acc_t>(rows) * static_cast<acc_t>(cols);
        acc += math::bn_input_grad(p.avg_scale, gc, sum / count, p.avg_mean, p.avg_slope) / count;
      }
    }
  }
  return acc;
}

// Block (c, chunk of N * H * W inputs): each input gathers the skip's
// coef * g and what the pool windows containing it send back (pools_grad_at).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    grad_x_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, Terms<acc_t> t,
                  const acc_t* __restrict__ g_mean, const acc_t* __restrict__ scale, const acc_t* __restrict__ slope,
                  Shape s, int64_t chunks, scalar_t* __restrict__ grad_x) {
  const int64_t c = blockIdx.x / chunks, start = (blockIdx.x % chunks) * kChunk;
  const int64_t C = s.c, jz = s.jz, total = s.n * s.plane_in();
  const int64_t kmax = jz * C + c, kavg = (jz + 1) * C + c;
  const PoolGrads<acc_t> p{g_mean[c],    scale[kmax], t.mean[kmax], slope[kmax], scale[kavg],
                           t.mean[kavg], slope[kavg], t.has_max,    t.has_avg};
  for (int i = 0; i < kItems; ++i) {
    const int64_t e = start + threadIdx.x + i * kThreads;
    if (e >= total) break;
    const int64_t n = e / s.plane_in(), hw = e % s.plane_in(), h = hw / s.w, w = hw % s.w;
    const scalar_t* gplane = grad + (n * C + c) * s.plane_out();
    acc_t acc = t.has_skip ? t.coef[jz + 2] * static_cast<acc_t>(gplane[hw]) : acc_t(0);
    if (t.has_max || t.has_avg) acc += pools_grad_at(x + (n * C + c) * s.plane_in(), gplane, s, h, w, p);
    grad_x[(n * C + c) * s.plane_in() + hw] = static_cast<scalar_t>(acc);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> darts_sum_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                                  const at::Tensor& z_in, const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in, const at::Tensor& coef_in,
                                                                  int64_t stride, bool has_max, bool has_avg,
                                                                  bool has_skip, bool x_need_grad) {
  const DartsGeometry g = check_darts_sum_backward(kBackward, grad_out_in, x_in, z_in, mean_in, rstd_in, coef_in,
                                                   stride, has_skip, kDevice);
  const DeviceGuard guard(x_in.device());
  at::Tensor grad_z = empty_contiguous(z_in.sizes(), z_in.options());
  at::Tensor grad_x = x_need_grad ? empty_contiguous(x_in.sizes(), x_in.options()) : at::empty({0}, x_in.options());
  const auto dtype = x_in.scalar_type();
  const auto acc_opts = coef_in.options().dtype(accumulate_dtype(dtype));
  at::Tensor grad_coef_acc = at::zeros({g.coefs()}, acc_opts);
  if (g.planes() == 0 || g.plane_out() == 0) {
    if (x_need_grad) grad_x.zero_();
    return {grad_z, grad_x, grad_coef_acc.to(coef_in.scalar_type())};
  }
  const at::Tensor go = grad_out_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor z = z_in.contiguous();
  const at::Tensor mean = for_accumulation(mean_in, dtype);
  const at::Tensor rstd = for_accumulation(rstd_in, dtype);
  const at::Tensor coef = for_accumulation(coef_in, dtype);
  const Shape s = shape_of(g);
  const int64_t chunks = ceil_div(s.m(), kChunk);
  const int64_t sums = g.jz + 4;
  at::Tensor part = at::empty({sums * g.c * chunks}, acc_opts);
  at::Tensor channel_sum = at::empty({sums * g.c}, acc_opts);
  at::Tensor g_mean = at::empty({g.c}, acc_opts);
  at::Tensor scale = at::empty({g.stat_rows() * g.c}, acc_opts);
  at::Tensor slope = at::empty({g.stat_rows() * g.c}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "darts_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Terms<acc_t> t{
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), has_max, has_avg, has_skip};
    const scalar_t* gp = go.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    launch(backward_sums_kernel<scalar_t>, g.c * chunks, 0, gp, xp, zp, t, s, chunks, part.data_ptr<acc_t>());
    launch(coefficients_kernel<acc_t>, g.c, 0, part.data_ptr<acc_t>(), t, s, chunks, channel_sum.data_ptr<acc_t>(),
           g_mean.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), slope.data_ptr<acc_t>());
    launch(grad_coef_kernel<acc_t>, 1, 0, channel_sum.data_ptr<acc_t>(), t, s, grad_coef_acc.data_ptr<acc_t>());
    if (g.jz > 0) {
      launch(grad_z_kernel<scalar_t>, g.c * chunks, 0, gp, zp, mean.data_ptr<acc_t>(), g_mean.data_ptr<acc_t>(),
             scale.data_ptr<acc_t>(), slope.data_ptr<acc_t>(), s, chunks, grad_z.data_ptr<scalar_t>());
    }
    if (x_need_grad) {
      const int64_t x_chunks = ceil_div(g.n * g.plane_in(), kChunk);
      launch(grad_x_kernel<scalar_t>, g.c * x_chunks, 0, gp, xp, t, g_mean.data_ptr<acc_t>(), scale.data_ptr<acc_t>(),
             slope.data_ptr<acc_t>(), s, x_chunks, grad_x.data_ptr<scalar_t>());
    }
  });
  return {grad_z, grad_x, grad_coef_acc.to(coef_in.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace fastnas

FASTNAS_CUDA_LIBRARY_IMPL(m) {
  m.impl("pool_batch_norm_stats", &fastnas::cuda::pool_batch_norm_stats);
  m.impl("darts_sum", &fastnas::cuda::darts_sum);
  m.impl("darts_sum_backward", &fastnas::cuda::darts_sum_backward);
}
