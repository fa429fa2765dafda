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

namespace fastnas {
namespace cpu {
namespace {

constexpr const char* kStats = "stacked_batch_norm_stats";
constexpr const char* kBackward = "stacked_batch_norm_backward";

// Values per chunk: a chunk's mean and squared deviations are taken in two
// sweeps over data still in L1, and chunks are merged with Chan's formula.
constexpr int64_t kRowChunk = 2048;
// Fixed lane count: gcc vectorises the sums without -ffast-math, and the
// pairwise combination of the lanes keeps the rounding error down.
constexpr int kLanes = 16;

template <typename acc_t>
inline acc_t combine_lanes(acc_t* s) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) s[j] += s[j + width];
  }
  return s[0];
}

// Sum of x - shift over a chunk.
template <typename acc_t, typename scalar_t>
inline acc_t chunk_sum(const scalar_t* __restrict__ x, int64_t len, acc_t shift) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) s[j] += static_cast<acc_t>(x[i + j]) - shift;
  }
  for (int j = 0; i < len; ++i, ++j) s[j] += static_cast<acc_t>(x[i]) - shift;
  return combine_lanes(s);
}

// Sum of ((x - shift) - mean)^2 over a chunk.
template <typename acc_t, typename scalar_t>
inline acc_t chunk_squared_deviations(const scalar_t* __restrict__ x, int64_t len, acc_t shift, acc_t mean) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = (static_cast<acc_t>(x[i + j]) - shift) - mean;
      s[j] += d * d;
    }
  }
  for (int j = 0; i < len; ++i, ++j) {
    const acc_t d = (static_cast<acc_t>(x[i]) - shift) - mean;
    s[j] += d * d;
  }
  return combine_lanes(s);
}

// Mean and sum of squared deviations (M2) of one row. The sums run over
// x - x[0]: with a large mean and a small spread the shifted values, and so
// the partial sums, are small, and the mean loses no digits to them.
template <typename acc_t, typename scalar_t>
inline void row_mean_m2(const scalar_t* x, int64_t m, acc_t& mean, acc_t& m2) {
  const acc_t shift = static_cast<acc_t>(x[0]);
  acc_t count = 0;
  mean = 0;
  m2 = 0;
  for (int64_t off = 0; off < m; off += kRowChunk) {
    const int64_t len = std::min(kRowChunk, m - off);
    const acc_t n_b = static_cast<acc_t>(len);
    const acc_t mean_b = chunk_sum(x + off, len, shift) / n_b;
    const acc_t m2_b = chunk_squared_deviations(x + off, len, shift, mean_b);
    // Chan, Golub and LeVeque: merge (count, mean, m2) with the chunk's.
    const acc_t n = count + n_b;
    const acc_t delta = mean_b - mean;
    mean += delta * (n_b / n);
    m2 += m2_b + delta * delta * (count * n_b / n);
    count = n;
  }
  mean += shift;
}

void check_z(const char* op, const at::Tensor& z) {
  TORCH_CHECK(z.dim() >= 2, op, ": z must be (J, C, *rest) with at least 2 dims, got shape ", z.sizes());
  TORCH_CHECK(supported_dtype(z.scalar_type()), op, ": z has dtype ", z.scalar_type(),
              "; expected float32, float64, float16 or bfloat16");
  TORCH_CHECK(z.device().is_cpu(), op, ": the CPU kernel got z on ", z.device());
  TORCH_CHECK(z.size(0) * z.size(1) == 0 || z.numel() > 0, op, ": z has shape ", z.sizes(),
              ": no values to normalise each (j, c) over");
}

void check_stat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& z) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == z.size(0) && t.size(1) == z.size(1), op, ": ", name, " has shape ",
              t.sizes(), "; expected (J, C) = (", z.size(0), ", ", z.size(1), ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name, " has dtype ",
              t.scalar_type(), "; expected float32 or float64");
  TORCH_CHECK(t.device() == z.device(), op, ": ", name, " is on ", t.device(), " but z is on ", z.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stacked_batch_norm_stats(const at::Tensor& z, double eps) {
  check_z(kStats, z);
  const int64_t rows = z.size(0) * z.size(1);
  const int64_t m = rows == 0 ? 0 : z.numel() / rows;
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
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / m);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
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
  check_z(kBackward, z);
  TORCH_CHECK(grad_yhat.sizes() == z.sizes(), kBackward, ": grad_yhat has shape ", grad_yhat.sizes(), " but z has ",
              z.sizes());
  TORCH_CHECK(grad_yhat.scalar_type() == z.scalar_type(), kBackward, ": grad_yhat has dtype ", grad_yhat.scalar_type(),
              " but z has ", z.scalar_type());
  TORCH_CHECK(grad_yhat.device() == z.device(), kBackward, ": grad_yhat is on ", grad_yhat.device(), " but z is on ",
              z.device());
  check_stat(kBackward, "mean", mean, z);
  check_stat(kBackward, "rstd", rstd, z);

  at::Tensor grad_z = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = z.size(0) * z.size(1);
  if (rows == 0) return grad_z;
  const int64_t m = z.numel() / rows;
  const at::Tensor zc = z.contiguous();
  const at::Tensor gc = grad_yhat.contiguous();
  const auto acc_dtype = accumulate_dtype(z.scalar_type());
  const at::Tensor mc = mean.to(acc_dtype).contiguous();
  const at::Tensor rc = rstd.to(acc_dtype).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "stacked_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const acc_t* mp = mc.data_ptr<acc_t>();
    const acc_t* rp = rc.data_ptr<acc_t>();
    scalar_t* op = grad_z.data_ptr<scalar_t>();
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(m);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / m);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* __restrict__ zr = zp + r * m;
        const scalar_t* __restrict__ gr = gp + r * m;
        scalar_t* __restrict__ out = op + r * m;
        const acc_t mu = mp[r], rs = rp[r];
        // Sweep 1: sums of g and g * yhat, lane by lane in a fixed order.
        acc_t sg[kLanes] = {}, sgy[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= m; i += kLanes) {
          for (int j = 0; j < kLanes; ++j) {
            const acc_t g = static_cast<acc_t>(gr[i + j]);
            sg[j] += g;
            sgy[j] += g * ((static_cast<acc_t>(zr[i + j]) - mu) * rs);
          }
        }
        for (int j = 0; i < m; ++i, ++j) {
          const acc_t g = static_cast<acc_t>(gr[i]);
          sg[j] += g;
          sgy[j] += g * ((static_cast<acc_t>(zr[i]) - mu) * rs);
        }
        const acc_t mean_g = combine_lanes(sg) * inv_m;
        const acc_t mean_gy = combine_lanes(sgy) * inv_m;
        // Sweep 2: grad_z = rstd * (g - mean(g) - yhat * mean(g * yhat)).
        for (int64_t k = 0; k < m; ++k) {
          const acc_t yhat = (static_cast<acc_t>(zr[k]) - mu) * rs;
          out[k] = static_cast<scalar_t>(rs * (static_cast<acc_t>(gr[k]) - mean_g - yhat * mean_gy));
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
