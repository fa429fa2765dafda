// stacked_batch_norm_stats and stacked_batch_norm_backward on CUDA: batch norm
// (no affine) of J stacked candidates, z (J, C, *rest) channel-major, so the
// statistics of (j, c) are those of one contiguous row of M values.
//
// Each row is cut into chunks of kRowChunk values, one block each, held in
// registers: the stats take a chunk's mean and then its squared deviations
// from that mean (two passes over registers, one over memory), and a second
// kernel merges the chunks of a row in order (Chan's formula, in double). The
// backward sums g and g * yhat per chunk, then every block of the elementwise
// pass adds its row's chunk sums in the same fixed order. No atomics: reruns
// are bit-identical.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/common.cuh"
#include "fastnas_math.h"
#include "host/stacked_batch_norm.h"

namespace fastnas {
namespace cuda {
namespace {

constexpr const char* kStats = "stacked_batch_norm_stats";
constexpr const char* kBackward = "stacked_batch_norm_backward";

constexpr int kItems = 16;
constexpr int64_t kRowChunk = kThreads * kItems;

// Block b covers chunk b % chunks of row b / chunks: values [start, start + len).
struct RowChunk {
  int64_t row, start, len;
};

__device__ __forceinline__ RowChunk row_chunk(int64_t m, int64_t chunks) {
  RowChunk rc;
  rc.row = blockIdx.x / chunks;
  rc.start = (blockIdx.x % chunks) * kRowChunk;
  rc.len = m - rc.start < kRowChunk ? m - rc.start : kRowChunk;
  return rc;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    stats_chunks_kernel(const scalar_t* __restrict__ z, int64_t m, int64_t chunks, acc_t* __restrict__ chunk_mean,
                        acc_t* __restrict__ chunk_m2) {
  __shared__ acc_t scratch[kWarps];
  const RowChunk rc = row_chunk(m, chunks);
  const scalar_t* base = z + rc.row * m + rc.start;
  acc_t v[kItems];
  acc_t s = acc_t(0);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t e = threadIdx.x + i * kThreads;
    v[i] = e < rc.len ? static_cast<acc_t>(base[e]) : acc_t(0);
    s += v[i];
  }
  const acc_t mean = block_sum(s, scratch) / static_cast<acc_t>(rc.len);
  acc_t d2 = acc_t(0);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const acc_t d = v[i] - mean;
    d2 += threadIdx.x + i * kThreads < rc.len ? d * d : acc_t(0);
  }
  const acc_t m2 = block_sum(d2, scratch);
  if (threadIdx.x == 0) {
    chunk_mean[blockIdx.x] = mean;
    chunk_m2[blockIdx.x] = m2;
  }
}

// One thread per row: its chunks merged in order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_merge_kernel(const acc_t* __restrict__ chunk_mean, const acc_t* __restrict__ chunk_m2, int64_t rows,
                       int64_t m, int64_t chunks, double eps, acc_t* __restrict__ mean, acc_t* __restrict__ rstd,
                       acc_t* __restrict__ var) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  double count, mu, m2;
  math::merge_chunk_moments(chunk_mean + row * chunks, chunk_m2 + row * chunks, m, chunks, kRowChunk, count, mu, m2);
  const double v = m2 / count;
  mean[row] = static_cast<acc_t>(mu);
  var[row] = static_cast<acc_t>(v);
  rstd[row] = static_cast<acc_t>(1.0 / ::sqrt(v + eps));
}

// Per chunk: sum g and sum g * yhat, yhat = (z - mean) * rstd.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    backward_chunks_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ z,
                           const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, int64_t m, int64_t chunks,
                           acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_gy) {
  __shared__ acc_t scratch[kWarps];
  const RowChunk rc = row_chunk(m, chunks);
  const int64_t off = rc.row * m + rc.start;
  const acc_t mu = mean[rc.row], rs = rstd[rc.row];
  acc_t sg = acc_t(0), sgy = acc_t(0);
#pragma unroll 4
  for (int i = 0; i < kItems; ++i) {
    const int64_t e = threadIdx.x + i * kThreads;
    if (e < rc.len) {
      const acc_t g = static_cast<acc_t>(grad[off + e]);
      sg += g;
      sgy += g * ((static_cast<acc_t>(z[off + e]) - mu) * rs);
    }
  }
  sg = block_sum(sg, scratch);
  sgy = block_sum(sgy, scratch);
  if (threadIdx.x == 0) {
    sum_g[blockIdx.x] = sg;
    sum_gy[blockIdx.x] = sgy;
  }
}

// grad_z = rstd * (g - mean(g) - yhat * mean(g * yhat)); each block first adds
// its row's chunk sums, in the same order as every other block of the row.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    backward_apply_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ z,
                          const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                          const acc_t* __restrict__ sum_g, const acc_t* __restrict__ sum_gy, int64_t m, int64_t chunks,
                          scalar_t* __restrict__ grad_z) {
  __shared__ acc_t scratch[kWarps];
  const RowChunk rc = row_chunk(m, chunks);
  acc_t sg = acc_t(0), sgy = acc_t(0);
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    sg += sum_g[rc.row * chunks + c];
    sgy += sum_gy[rc.row * chunks + c];
  }
  const acc_t inv_m = acc_t(1) / static_cast<acc_t>(m);
  const acc_t mean_g = block_sum(sg, scratch) * inv_m;
  const acc_t mean_gy = block_sum(sgy, scratch) * inv_m;
  const int64_t off = rc.row * m + rc.start;
  const acc_t mu = mean[rc.row], rs = rstd[rc.row];
#pragma unroll 4
  for (int i = 0; i < kItems; ++i) {
    const int64_t e = threadIdx.x + i * kThreads;
    if (e < rc.len) {
      const acc_t yhat = (static_cast<acc_t>(z[off + e]) - mu) * rs;
      grad_z[off + e] =
          static_cast<scalar_t>(math::batch_norm_grad(static_cast<acc_t>(grad[off + e]), yhat, rs, mean_g, mean_gy));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stacked_batch_norm_stats(const at::Tensor& z, double eps) {
  check_stacked_z(kStats, z, kDevice);
  const DeviceGuard guard(z.device());
  const auto [rows, m] = stacked_rows(z);
  const auto options = z.options().dtype(accumulate_dtype(z.scalar_type()));
  at::Tensor mean = at::empty({z.size(0), z.size(1)}, options);
  at::Tensor rstd = at::empty({z.size(0), z.size(1)}, options);
  at::Tensor var = at::empty({z.size(0), z.size(1)}, options);
  if (rows == 0) return {mean, rstd, var};
  const at::Tensor zc = z.contiguous();
  const int64_t chunks = ceil_div(m, kRowChunk);
  at::Tensor chunk_mean = at::empty({rows * chunks}, options);
  at::Tensor chunk_m2 = at::empty({rows * chunks}, options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "stacked_batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(stats_chunks_kernel<scalar_t>, rows * chunks, 0, zc.data_ptr<scalar_t>(), m, chunks,
           chunk_mean.data_ptr<acc_t>(), chunk_m2.data_ptr<acc_t>());
    launch(stats_merge_kernel<acc_t>, ceil_div(rows, kThreads), 0, chunk_mean.data_ptr<acc_t>(),
           chunk_m2.data_ptr<acc_t>(), rows, m, chunks, eps, mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
           var.data_ptr<acc_t>());
  });
  return {mean, rstd, var};
}

at::Tensor stacked_batch_norm_backward(const at::Tensor& grad_yhat, const at::Tensor& z, const at::Tensor& mean,
                                       const at::Tensor& rstd) {
  check_stacked_batch_norm_backward(kBackward, grad_yhat, z, mean, rstd, kDevice);
  const DeviceGuard guard(z.device());
  at::Tensor grad_z = empty_contiguous(z.sizes(), z.options());
  const auto [rows, m] = stacked_rows(z);
  if (rows == 0) return grad_z;
  const at::Tensor zc = z.contiguous();
  const at::Tensor gc = grad_yhat.contiguous();
  const at::Tensor mc = for_accumulation(mean, z.scalar_type());
  const at::Tensor rc = for_accumulation(rstd, z.scalar_type());
  const int64_t chunks = ceil_div(m, kRowChunk);
  const auto acc_options = z.options().dtype(accumulate_dtype(z.scalar_type()));
  at::Tensor sum_g = at::empty({rows * chunks}, acc_options);
  at::Tensor sum_gy = at::empty({rows * chunks}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "stacked_batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(backward_chunks_kernel<scalar_t>, rows * chunks, 0, gc.data_ptr<scalar_t>(), zc.data_ptr<scalar_t>(),
           mc.data_ptr<acc_t>(), rc.data_ptr<acc_t>(), m, chunks, sum_g.data_ptr<acc_t>(), sum_gy.data_ptr<acc_t>());
    launch(backward_apply_kernel<scalar_t>, rows * chunks, 0, gc.data_ptr<scalar_t>(), zc.data_ptr<scalar_t>(),
           mc.data_ptr<acc_t>(), rc.data_ptr<acc_t>(), sum_g.data_ptr<acc_t>(), sum_gy.data_ptr<acc_t>(), m, chunks,
           grad_z.data_ptr<scalar_t>());
  });
  return grad_z;
}

}  // namespace
}  // namespace cuda
}  // namespace fastnas

FASTNAS_CUDA_LIBRARY_IMPL(m) {
  m.impl("stacked_batch_norm_stats", &fastnas::cuda::stacked_batch_norm_stats);
  m.impl("stacked_batch_norm_backward", &fastnas::cuda::stacked_batch_norm_backward);
}
