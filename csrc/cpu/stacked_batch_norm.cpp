// stacked_batch_norm_stats and stacked_batch_norm_backward on CPU: batch norm
// (no affine) of J stacked candidates, z (J, C, *rest) channel-major, so the
// statistics of (j, c) are those of one contiguous row of M = prod(rest) values.
//
// A row is one task, walked in fixed chunks: the result does not depend on the
// thread count, and in backward the second sweep of a row finds it in cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "checks.h"
#include "cpu/loops.h"
#include "host/stacked_batch_norm.h"

namespace fastnas {
namespace cpu {
namespace {

constexpr const char* kStats = "stacked_batch_norm_stats";
constexpr const char* kBackward = "stacked_batch_norm_backward";

// Values per chunk: a chunk's mean and squared deviations are taken in two
// sweeps over data still in L1, and chunks are merged with Chan's formula.
constexpr int64_t kRowChunk = 2048;
constexpr int kLanes = 16;

// Mean and sum of squared deviations (M2) of one row. The sums run over
// x - x[0]: with a large mean and a small spread the shifted values, and so
// the partial sums, are small, and the mean loses no digits to them.
template <typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE void row_mean_m2(const scalar_t* x, int64_t m, acc_t& mean, acc_t& m2) {
  const acc_t shift = static_cast<acc_t>(x[0]);
  acc_t count = 0;
  mean = 0;
  m2 = 0;
  for (int64_t off = 0; off < m; off += kRowChunk) {
    const scalar_t* __restrict__ xc = x + off;
    const int64_t len = std::min(kRowChunk, m - off);
    const acc_t n_b = static_cast<acc_t>(len);
    const acc_t mean_b =
        lane_sum<kLanes, acc_t>(len, [&](int64_t i) { return static_cast<acc_t>(xc[i]) - shift; }) / n_b;
    const acc_t m2_b = lane_sum<kLanes, acc_t>(len, [&](int64_t i) {
      const acc_t d = (static_cast<acc_t>(xc[i]) - shift) - mean_b;
      return d * d;
    });
    math::merge_moments(count, mean, m2, n_b, mean_b, m2_b);
  }
  mean += shift;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stacked_batch_norm_stats(const at::Tensor& z, double eps) {
  check_stacked_z(kStats, z, at::kCPU);
  const auto [rows, m] = stacked_rows(z);
  const auto options = z.options().dtype(accumulate_dtype(z.scalar_type()));
  at::Tensor mean = at::empty({z.size(0), z.size(1)}, options);
  at::Tensor rstd = at::empty({z.size(0), z.size(1)}, options);
  at::Tensor var = at::empty({z.size(0), z.size(1)}, options);
  if (rows == 0) return {mean, rstd, var};
  const at::Tensor zc = z.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "stacked_batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    const acc_t eps_acc = static_cast<acc_t>(eps);
    at::parallel_for(0, rows, grain_for(m), [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
      for (int64_t r = begin; r < end; ++r) {
        acc_t mu, m2;
        row_mean_m2(zp + r * m, m, mu, m2);
        const acc_t v = m2 / static_cast<acc_t>(m);
        mp[r] = mu;
        vp[r] = v;
        rp[r] = acc_t(1) / std::sqrt(v + eps_acc);
      }
    });
  });
  return {mean, rstd, var};
}

at::Tensor stacked_batch_norm_backward(const at::Tensor& grad_yhat, const at::Tensor& z, const at::Tensor& mean,
                                       const at::Tensor& rstd) {
  check_stacked_batch_norm_backward(kBackward, grad_yhat, z, mean, rstd, at::kCPU);
  at::Tensor grad_z = empty_contiguous(z.sizes(), z.options());
  const auto [rows, m] = stacked_rows(z);
  if (rows == 0) return grad_z;
  const at::Tensor zc = z.contiguous();
  const at::Tensor gc = grad_yhat.contiguous();
  const at::Tensor mc = for_accumulation(mean, z.scalar_type());
  const at::Tensor rc = for_accumulation(rstd, z.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "stacked_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const acc_t* mp = mc.data_ptr<acc_t>();
    const acc_t* rp = rc.data_ptr<acc_t>();
    scalar_t* op = grad_z.data_ptr<scalar_t>();
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(m);
    at::parallel_for(0, rows, grain_for(m), [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* __restrict__ zr = zp + r * m;
        const scalar_t* __restrict__ gr = gp + r * m;
        scalar_t* __restrict__ out = op + r * m;
        const acc_t mu = mp[r], rs = rp[r];
        // Sweep 1: sums of g and g * yhat.
        acc_t sg[kLanes] = {}, sgy[kLanes] = {};
        for_lanes<kLanes>(m, [&](int64_t i, int j) {
          const acc_t g = static_cast<acc_t>(gr[i]);
          sg[j] += g;
          sgy[j] += g * ((static_cast<acc_t>(zr[i]) - mu) * rs);
        });
        const acc_t mean_g = combine_lanes<kLanes>(sg) * inv_m;
        const acc_t mean_gy = combine_lanes<kLanes>(sgy) * inv_m;
        // Sweep 2: the gradient.
        for (int64_t k = 0; k < m; ++k) {
          const acc_t yhat = (static_cast<acc_t>(zr[k]) - mu) * rs;
          out[k] = static_cast<scalar_t>(math::batch_norm_grad(static_cast<acc_t>(gr[k]), yhat, rs, mean_g, mean_gy));
        }
      }
    });
  });
  return grad_z;
}

}  // namespace
}  // namespace cpu
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("stacked_batch_norm_stats", &fastnas::cpu::stacked_batch_norm_stats);
  m.impl("stacked_batch_norm_backward", &fastnas::cpu::stacked_batch_norm_backward);
}
