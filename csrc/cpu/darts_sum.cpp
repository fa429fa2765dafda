// darts_sum on CPU: the DARTS edge's weighted sum with batch norm folded in,
// its training-mode backward, and the batch statistics of the 3x3 pools.
//
// Work is split by (channel, image) plane: z is channel-major (Jz, C, N, Ho, Wo),
// so plane (c, n) of every candidate is contiguous, and the pools of x[n, c]
// are computed from that plane alone. Per-channel reductions are made of
// per-plane partial sums combined in plane order afterwards, so the results
// are bit-identical whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/loops.h"
#include "fastnas_math.h"
#include "host/darts_sum.h"

namespace fastnas {
namespace cpu {
namespace {

constexpr const char* kStats = "pool_batch_norm_stats";
constexpr const char* kForward = "darts_sum";
constexpr const char* kBackward = "darts_sum_backward";

// The plane sums run over 8 lanes.
constexpr int kLanes = 8;

// Sum of g[i] * (p[i] - m) over a plane.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t centered_dot(const acc_t* __restrict__ g, const acc_t* __restrict__ p, acc_t m, int64_t len) {
  return lane_sum<kLanes, acc_t>(len, [&](int64_t i) { return g[i] * (p[i] - m); });
}

// The 3x3, padding 1 pools of one (H, W) plane, separably: 3-wide rows first,
// then 3-tall columns of those, with the sums and the max-pool rule of
// math::pool_window_3x3. max_out / avg_out may be null.
template <typename scalar_t, typename acc_t>
struct PlanePools {
  const DartsGeometry& g;
  std::vector<acc_t> row_max, row_sum, col_count;
  // Output columns whose window lies inside the row: [lo, hi].
  int64_t lo, hi;

  explicit PlanePools(const DartsGeometry& geo)
      : g(geo), row_max(geo.h * geo.wo), row_sum(geo.h * geo.wo), col_count(geo.wo) {
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      col_count[ow] =
          static_cast<acc_t>(std::min<int64_t>(ow * g.stride + 2, g.w) - std::max<int64_t>(ow * g.stride - 1, 0));
    }
    lo = 1;
    hi = g.w >= 2 ? std::min<int64_t>(g.wo - 1, (g.w - 2) / g.stride) : 0;
  }

  void row_window(const scalar_t* xr, int64_t ow, acc_t* rm, acc_t* rs) const {
    const int64_t w0 = std::max<int64_t>(ow * g.stride - 1, 0), w1 = std::min<int64_t>(ow * g.stride + 2, g.w);
    acc_t best = static_cast<acc_t>(xr[w0]), sum = best;
    for (int64_t iw = w0 + 1; iw < w1; ++iw) {
      const acc_t v = static_cast<acc_t>(xr[iw]);
      best = math::max_takes(v, best) ? v : best;
      sum += v;
    }
    rm[ow] = best;
    rs[ow] = sum;
  }

  FASTNAS_CPU_CLONES void run(const scalar_t* __restrict__ x, acc_t* __restrict__ max_out,
                              acc_t* __restrict__ avg_out) {
    const int64_t h = g.h, w = g.w, s = g.stride, ho = g.ho, wo = g.wo;
    for (int64_t ih = 0; ih < h; ++ih) {
      const scalar_t* __restrict__ xr = x + ih * w;
      acc_t* __restrict__ rm = row_max.data() + ih * wo;
      acc_t* __restrict__ rs = row_sum.data() + ih * wo;
      row_window(xr, 0, rm, rs);
      for (int64_t ow = lo; ow <= hi; ++ow) {
        const acc_t a = static_cast<acc_t>(xr[ow * s - 1]), b = static_cast<acc_t>(xr[ow * s]),
                    c = static_cast<acc_t>(xr[ow * s + 1]);
        acc_t best = a;
        best = math::max_takes(b, best) ? b : best;
        best = math::max_takes(c, best) ? c : best;
        rm[ow] = best;
        rs[ow] = a + b + c;
      }
      for (int64_t ow = std::max<int64_t>(hi + 1, 1); ow < wo; ++ow) row_window(xr, ow, rm, rs);
    }
    for (int64_t oh = 0; oh < ho; ++oh) {
      const int64_t h0 = std::max<int64_t>(oh * s - 1, 0), h1 = std::min<int64_t>(oh * s + 2, h);
      if (max_out != nullptr) {
        acc_t* __restrict__ mo = max_out + oh * wo;
        std::copy(row_max.data() + h0 * wo, row_max.data() + (h0 + 1) * wo, mo);
        for (int64_t ih = h0 + 1; ih < h1; ++ih) {
          const acc_t* __restrict__ rm = row_max.data() + ih * wo;
          for (int64_t ow = 0; ow < wo; ++ow) mo[ow] = math::max_takes(rm[ow], mo[ow]) ? rm[ow] : mo[ow];
        }
      }
      if (avg_out != nullptr) {
        acc_t* __restrict__ ao = avg_out + oh * wo;
        std::copy(row_sum.data() + h0 * wo, row_sum.data() + (h0 + 1) * wo, ao);
        for (int64_t ih = h0 + 1; ih < h1; ++ih) {
          const acc_t* __restrict__ rs = row_sum.data() + ih * wo;
          for (int64_t ow = 0; ow < wo; ++ow) ao[ow] += rs[ow];
        }
        const acc_t rows = static_cast<acc_t>(h1 - h0);
        const acc_t* __restrict__ cc = col_count.data();
        for (int64_t ow = 0; ow < wo; ++ow) ao[ow] /= rows * cc[ow];
      }
    }
  }
};

// --- pool_batch_norm_stats -------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_batch_norm_stats(const at::Tensor& x_in, int64_t stride,
                                                                     double eps) {
  const DartsGeometry g = check_pool_batch_norm_stats(kStats, x_in, stride, eps, at::kCPU);
  const at::Tensor x = x_in.contiguous();
  const auto acc_dtype = accumulate_dtype(x.scalar_type());
  const auto opts = x.options().dtype(acc_dtype);
  at::Tensor mean = at::empty({2, g.c}, opts), rstd = at::empty({2, g.c}, opts), var = at::empty({2, g.c}, opts);
  const int64_t m_plane = g.plane_out();
  // Per plane, per pool: its mean and sum of squared deviations (in double),
  // merged per channel in image order.
  std::vector<double> partial(g.planes() * 4, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, g.planes(), grain_for(g.plane_in() * 4), [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
      PlanePools<scalar_t, acc_t> pools(g);
      std::vector<acc_t> pooled(2 * m_plane);
      std::vector<double> wide(m_plane);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c = t / g.n, n = t % g.n;
        pools.run(xp + (n * g.c + c) * g.plane_in(), pooled.data(), pooled.data() + m_plane);
        for (int k = 0; k < 2; ++k) {
          const acc_t* p = pooled.data() + k * m_plane;
          for (int64_t i = 0; i < m_plane; ++i) wide[i] = static_cast<double>(p[i]);
          const double mu =
              lane_sum<kLanes, double>(m_plane, [&](int64_t i) { return wide[i]; }) / static_cast<double>(m_plane);
          partial[t * 4 + 2 * k] = mu;
          for (int64_t i = 0; i < m_plane; ++i) wide[i] -= mu;
          partial[t * 4 + 2 * k + 1] = centered_dot(wide.data(), wide.data(), 0.0, m_plane);
        }
      }
    });
  });

  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "pool_batch_norm_stats_merge", [&] {
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* rp = rstd.data_ptr<scalar_t>();
    scalar_t* vp = var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < g.c; ++c) {
      for (int k = 0; k < 2; ++k) {
        double count = 0, mu = 0, m2 = 0;
        for (int64_t n = 0; n < g.n; ++n) {
          const double* p = partial.data() + (c * g.n + n) * 4 + 2 * k;
          math::merge_moments(count, mu, m2, static_cast<double>(m_plane), p[0], p[1]);
        }
        const double v = count > 0 ? m2 / count : std::numeric_limits<double>::quiet_NaN();
        mp[k * g.c + c] = static_cast<scalar_t>(count > 0 ? mu : std::numeric_limits<double>::quiet_NaN());
        vp[k * g.c + c] = static_cast<scalar_t>(v);
        rp[k * g.c + c] = static_cast<scalar_t>(1.0 / std::sqrt(v + eps));
      }
    }
  });
  return {mean, rstd, var};
}

// --- darts_sum -------------------------------------------------------------------

at::Tensor darts_sum(const at::Tensor& x_in, const at::Tensor& z_in, const at::Tensor& mean_in,
                     const at::Tensor& rstd_in, const at::Tensor& coef_in, int64_t stride, bool has_max, bool has_avg,
                     bool has_skip) {
  const DartsGeometry g = check_darts_sum(kForward, x_in, z_in, mean_in, rstd_in, coef_in, stride, has_skip, at::kCPU);
  at::Tensor out = empty_contiguous({g.n, g.c, g.ho, g.wo}, x_in.options());
  if (out.numel() == 0) return out;
  const bool need_x = has_max || has_avg || has_skip;
  const at::Tensor x = need_x ? x_in.contiguous() : x_in;
  const at::Tensor z = z_in.contiguous();
  const at::Tensor mean = for_accumulation(mean_in, x.scalar_type());
  const at::Tensor rstd = for_accumulation(rstd_in, x.scalar_type());
  const at::Tensor coef = for_accumulation(coef_in, x.scalar_type());
  const int64_t m_plane = g.plane_out();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "darts_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = need_x ? x.data_ptr<scalar_t>() : nullptr;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const acc_t* meanp = mean.data_ptr<acc_t>();
    const acc_t* rstdp = rstd.data_ptr<acc_t>();
    const acc_t* coefp = coef.data_ptr<acc_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const int64_t jz = g.jz, cz = g.c;
    const int64_t z_stride = g.planes() * m_plane;
    at::parallel_for(0, g.planes(), grain_for(m_plane * (jz + 3)), [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
      PlanePools<scalar_t, acc_t> pools(g);
      std::vector<acc_t> acc(m_plane), pmax(has_max ? m_plane : 0), pavg(has_avg ? m_plane : 0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c = t / g.n, n = t % g.n;
        acc_t* __restrict__ a = acc.data();
        std::fill(acc.begin(), acc.end(), acc_t(0));
        // Candidate k's term, scale * (p - mean), added to the plane.
        const auto add_normalized = [&](int64_t k, const auto& p) {
          const acc_t scale = coefp[k] * rstdp[k * cz + c], mu = meanp[k * cz + c];
          for (int64_t i = 0; i < m_plane; ++i) a[i] += math::normalized_term(scale, p(i), mu);
        };
        for (int64_t j = 0; j < jz; ++j) {
          const scalar_t* __restrict__ zj = zp + j * z_stride + t * m_plane;
          add_normalized(j, [&](int64_t i) { return static_cast<acc_t>(zj[i]); });
        }
        const scalar_t* xplane = need_x ? xp + (n * g.c + c) * g.plane_in() : nullptr;
        if (has_max || has_avg) {
          pools.run(xplane, has_max ? pmax.data() : nullptr, has_avg ? pavg.data() : nullptr);
          if (has_max) add_normalized(jz, [&](int64_t i) { return pmax[i]; });
          if (has_avg) add_normalized(jz + 1, [&](int64_t i) { return pavg[i]; });
        }
        if (has_skip) {
          const acc_t w = coefp[jz + 2];
          for (int64_t i = 0; i < m_plane; ++i) a[i] += w * static_cast<acc_t>(xplane[i]);
        }
        scalar_t* __restrict__ o = outp + (n * g.c + c) * m_plane;
        for (int64_t i = 0; i < m_plane; ++i) o[i] = static_cast<scalar_t>(a[i]);
      }
    });
  });
  return out;
}

// --- darts_sum_backward ----------------------------------------------------------
//
// Three steps: per-plane sums of g and of g times each candidate's centred
// value (plane_sums); per channel, in image order, the coefficients of the
// elementwise pass and the coefficients' gradient (BackwardCoefficients); then
// per plane grad_z elementwise and grad_x through the skip and the pools'
// backward (grad_z_plane, grad_x_plane).

// The pointers and flags every step reads, in the accumulation type acc_t.
template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const DartsGeometry& g;
  const scalar_t* grad_out;  // (N, C, Ho, Wo)
  const scalar_t* x;         // (N, C, H, W), null when no term reads it
  const scalar_t* z;         // (Jz, C, N, Ho, Wo)
  const acc_t *mean, *rstd, *coef;
  bool has_max, has_avg, has_skip;

  const scalar_t* grad_plane(int64_t c, int64_t n) const { return grad_out + (n * g.c + c) * g.plane_out(); }
  const scalar_t* x_plane(int64_t c, int64_t n) const {
    return x != nullptr ? x + (n * g.c + c) * g.plane_in() : nullptr;
  }
  const scalar_t* z_plane(int64_t j, int64_t t) const { return z + j * g.planes() * g.plane_out() + t * g.plane_out(); }
  // Per-plane sums: [sum g, sum g * (z_j - mean_j) for each j, max, avg, sum g * x].
  int64_t sums() const { return g.jz + 4; }
};

template <typename scalar_t, typename acc_t>
void plane_sums(const BackwardArgs<scalar_t, acc_t>& a, acc_t* partial) {
  const DartsGeometry& g = a.g;
  const int64_t jz = g.jz, m_plane = g.plane_out(), k1 = a.sums();
  const bool pools_needed = a.has_max || a.has_avg;
  // Not cloned, nor is the backward's elementwise pass: with the clones the
  // backward ran 10-25% slower at 64x16x32x32 (the pools, cloned, still are).
  at::parallel_for(0, g.planes(), grain_for(m_plane * (jz + 4)), [&](int64_t begin, int64_t end) {
    PlanePools<scalar_t, acc_t> pools(g);
    std::vector<acc_t> gbuf(m_plane), pbuf(m_plane), pmax(a.has_max ? m_plane : 0), pavg(a.has_avg ? m_plane : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / g.n, n = t % g.n;
      acc_t* part = partial + t * k1;
      const scalar_t* gplane = a.grad_plane(c, n);
      for (int64_t i = 0; i < m_plane; ++i) gbuf[i] = static_cast<acc_t>(gplane[i]);
      part[0] = lane_sum<kLanes, acc_t>(m_plane, [&](int64_t i) { return gbuf[i]; });
      for (int64_t j = 0; j < jz; ++j) {
        const scalar_t* zj = a.z_plane(j, t);
        for (int64_t i = 0; i < m_plane; ++i) pbuf[i] = static_cast<acc_t>(zj[i]);
        part[1 + j] = centered_dot(gbuf.data(), pbuf.data(), a.mean[j * g.c + c], m_plane);
      }
      const scalar_t* xplane = a.x_plane(c, n);
      if (pools_needed) {
        pools.run(xplane, a.has_max ? pmax.data() : nullptr, a.has_avg ? pavg.data() : nullptr);
        if (a.has_max) part[1 + jz] = centered_dot(gbuf.data(), pmax.data(), a.mean[jz * g.c + c], m_plane);
        if (a.has_avg) part[2 + jz] = centered_dot(gbuf.data(), pavg.data(), a.mean[(jz + 1) * g.c + c], m_plane);
      }
      if (a.has_skip) {
        for (int64_t i = 0; i < m_plane; ++i) pbuf[i] = static_cast<acc_t>(xplane[i]);
        part[3 + jz] = centered_dot(gbuf.data(), pbuf.data(), acc_t(0), m_plane);
      }
    }
  });
}

// Per channel, from the plane sums added in image order: mean(g), and for
// candidate k (the z candidates and both pools) the scale and slope of
// math::bn_input_grad; and the gradient of every coefficient (0 for absent ones).
template <typename acc_t>
struct BackwardCoefficients {
  std::vector<acc_t> g_mean, scale, slope;  // (C), (Jz + 2, C), (Jz + 2, C)

  template <typename scalar_t>
  BackwardCoefficients(const BackwardArgs<scalar_t, acc_t>& a, const acc_t* partial, acc_t* grad_coef) {
    const DartsGeometry& g = a.g;
    const int64_t k1 = a.sums(), kn = g.stat_rows();
    g_mean.resize(g.c);
    scale.resize(kn * g.c);
    slope.resize(kn * g.c);
    std::vector<acc_t> channel_sum(k1 * g.c, acc_t(0));
    const acc_t inv_m = acc_t(1) / static_cast<acc_t>(g.n * g.plane_out());
    for (int64_t c = 0; c < g.c; ++c) {
      for (int64_t n = 0; n < g.n; ++n) {
        const acc_t* part = partial + (c * g.n + n) * k1;
        for (int64_t k = 0; k < k1; ++k) channel_sum[k * g.c + c] += part[k];
      }
      g_mean[c] = channel_sum[c] * inv_m;
      for (int64_t k = 0; k < kn; ++k) {
        const acc_t r = a.rstd[k * g.c + c];
        scale[k * g.c + c] = a.coef[k] * r;
        slope[k * g.c + c] = math::bn_slope(channel_sum[(1 + k) * g.c + c], r, inv_m);
      }
    }
    const bool present[3] = {a.has_max, a.has_avg, a.has_skip};
    for (int64_t k = 0; k < g.coefs(); ++k) {
      if (k >= g.jz && !present[k - g.jz]) continue;
      acc_t s = 0;
      for (int64_t c = 0; c < g.c; ++c) {
        const acc_t v = channel_sum[(1 + k) * g.c + c];
        s += k < kn ? v * a.rstd[k * g.c + c] : v;
      }
      grad_coef[k] = s;
    }
  }
};

// grad_z of plane t = (c, n) of every z candidate; gc holds g - mean(g) of the plane.
template <typename scalar_t, typename acc_t>
void grad_z_plane(const BackwardArgs<scalar_t, acc_t>& a, const BackwardCoefficients<acc_t>& bc, int64_t t, int64_t c,
                  const acc_t* gc, scalar_t* grad_z) {
  const DartsGeometry& g = a.g;
  const int64_t m_plane = g.plane_out();
  for (int64_t j = 0; j < g.jz; ++j) {
    const scalar_t* __restrict__ zj = a.z_plane(j, t);
    scalar_t* __restrict__ gzj = grad_z + (zj - a.z);
    const acc_t s = bc.scale[j * g.c + c], b = bc.slope[j * g.c + c], mu = a.mean[j * g.c + c];
    for (int64_t i = 0; i < m_plane; ++i) {
      gzj[i] = static_cast<scalar_t>(math::bn_input_grad(s, gc[i], static_cast<acc_t>(zj[i]), mu, b));
    }
  }
}

// Scratch of grad_x_plane, one per thread.
template <typename acc_t>
struct GradXScratch {
  std::vector<acc_t> pavg, gx, share, row_best, spread;
  std::vector<int32_t> row_arg;

  explicit GradXScratch(const DartsGeometry& g, bool has_max, bool has_avg)
      : pavg(has_avg ? g.plane_out() : 0),
        gx(g.plane_in()),
        share(has_avg ? g.plane_out() : 0),
        row_best(has_max ? g.wo : 0),
        spread(has_avg && g.stride == 1 ? g.plane_in() : 0),
        row_arg(has_max ? g.wo : 0) {}
};

// The max pool's backward into gx: each window sends its candidate gradient
// to its argmax (by the max-pool rule).
template <typename scalar_t, typename acc_t>
void max_pool_backward_plane(const BackwardArgs<scalar_t, acc_t>& a, const BackwardCoefficients<acc_t>& bc,
                             const PlanePools<scalar_t, acc_t>& pools, int64_t c, const scalar_t* xplane,
                             const acc_t* gc, GradXScratch<acc_t>& sc) {
  const DartsGeometry& g = a.g;
  const int64_t jz = g.jz, h = g.h, w = g.w, s = g.stride;
  acc_t* __restrict__ gxa = sc.gx.data();
  const acc_t sk = bc.scale[jz * g.c + c], b = bc.slope[jz * g.c + c], mu = a.mean[jz * g.c + c];
  const auto send = [&](int64_t oh, int64_t ow, acc_t best, int64_t arg) {
    gxa[arg] += math::bn_input_grad(sk, gc[oh * g.wo + ow], best, mu, b);
  };
  const auto load = [&](int64_t ih, int64_t iw) { return static_cast<acc_t>(xplane[ih * w + iw]); };
  // Any window, bounds-checked.
  const auto generic = [&](int64_t oh, int64_t ow) {
    const auto win = math::pool_window_3x3<acc_t>(load, h, w, oh, ow, s);
    send(oh, ow, win.max, win.arg);
  };
  const int64_t lo = pools.lo, hi = pools.hi;
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    if (oh == 0 || oh * s + 1 >= h) {
      for (int64_t ow = 0; ow < g.wo; ++ow) generic(oh, ow);
      continue;
    }
    generic(oh, 0);
    // Interior windows: nine taps at fixed offsets, argmax for the whole row
    // first (vectorisable), then the scatter.
    const scalar_t* __restrict__ top = xplane + (oh * s - 1) * w - 1;
    for (int64_t ow = lo; ow <= hi; ++ow) {
      const scalar_t* __restrict__ p = top + ow * s;
      acc_t best = static_cast<acc_t>(p[0]);
      int32_t k = 0;
      for (int32_t t = 1; t < 9; ++t) {
        const acc_t v = static_cast<acc_t>(p[(t / 3) * w + t % 3]);
        const bool take = math::max_takes(v, best);
        best = take ? v : best;
        k = take ? t : k;
      }
      sc.row_best[ow] = best;
      sc.row_arg[ow] = k;
    }
    for (int64_t ow = lo; ow <= hi; ++ow) {
      const int32_t k = sc.row_arg[ow];
      send(oh, ow, sc.row_best[ow], (oh * s - 1 + k / 3) * w + ow * s - 1 + k % 3);
    }
    for (int64_t ow = std::max<int64_t>(hi + 1, 1); ow < g.wo; ++ow) generic(oh, ow);
  }
}

// The avg pool's backward into gx: each window's candidate gradient, divided
// by its count, goes to every element of the window.
template <typename scalar_t, typename acc_t>
void avg_pool_backward_plane(const BackwardArgs<scalar_t, acc_t>& a, const BackwardCoefficients<acc_t>& bc,
                             PlanePools<scalar_t, acc_t>& pools, int64_t c, const scalar_t* xplane, const acc_t* gc,
                             GradXScratch<acc_t>& sc) {
  const DartsGeometry& g = a.g;
  const int64_t jz = g.jz, h = g.h, w = g.w, s = g.stride;
  acc_t* __restrict__ gxa = sc.gx.data();
  pools.run(xplane, nullptr, sc.pavg.data());
  const acc_t sk = bc.scale[(jz + 1) * g.c + c], b = bc.slope[(jz + 1) * g.c + c], mu = a.mean[(jz + 1) * g.c + c];
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    const acc_t rows = static_cast<acc_t>(std::min<int64_t>(oh * s + 2, h) - std::max<int64_t>(oh * s - 1, 0));
    for (int64_t ow = 0; ow < g.wo; ++ow) {
      const int64_t o = oh * g.wo + ow;
      sc.share[o] = math::bn_input_grad(sk, gc[o], sc.pavg[o], mu, b) / (rows * pools.col_count[ow]);
    }
  }
  if (s == 1) {
    // Stride 1: input (ih, iw) gathers the shares of the windows centred on
    // its 3x3 neighbourhood, rows first, then columns.
    for (int64_t ih = 0; ih < h; ++ih) {
      const acc_t* __restrict__ sr = sc.share.data() + ih * w;
      acc_t* __restrict__ tr = sc.spread.data() + ih * w;
      tr[0] = sr[0] + (w > 1 ? sr[1] : acc_t(0));
      for (int64_t iw = 1; iw + 1 < w; ++iw) tr[iw] = sr[iw - 1] + sr[iw] + sr[iw + 1];
      if (w > 1) tr[w - 1] = sr[w - 2] + sr[w - 1];
    }
    for (int64_t ih = 0; ih < h; ++ih) {
      acc_t* __restrict__ gr = gxa + ih * w;
      for (int64_t dh = -1; dh <= 1; ++dh) {
        if (ih + dh < 0 || ih + dh >= h) continue;
        const acc_t* __restrict__ tr = sc.spread.data() + (ih + dh) * w;
        for (int64_t iw = 0; iw < w; ++iw) gr[iw] += tr[iw];
      }
    }
  } else {
    for (int64_t oh = 0; oh < g.ho; ++oh) {
      const int64_t h0 = std::max<int64_t>(oh * s - 1, 0), h1 = std::min<int64_t>(oh * s + 2, h);
      for (int64_t ow = 0; ow < g.wo; ++ow) {
        const int64_t w0 = std::max<int64_t>(ow * s - 1, 0), w1 = std::min<int64_t>(ow * s + 2, w);
        const acc_t v = sc.share[oh * g.wo + ow];
        for (int64_t ih = h0; ih < h1; ++ih) {
          for (int64_t iw = w0; iw < w1; ++iw) gxa[ih * w + iw] += v;
        }
      }
    }
  }
}

// grad_x of plane (c, n): the skip's coef * g, then both pools' backward.
template <typename scalar_t, typename acc_t>
void grad_x_plane(const BackwardArgs<scalar_t, acc_t>& a, const BackwardCoefficients<acc_t>& bc,
                  PlanePools<scalar_t, acc_t>& pools, int64_t c, int64_t n, const acc_t* gc, GradXScratch<acc_t>& sc,
                  scalar_t* grad_x) {
  const DartsGeometry& g = a.g;
  const scalar_t* gplane = a.grad_plane(c, n);
  const scalar_t* xplane = a.x_plane(c, n);
  acc_t* __restrict__ gxa = sc.gx.data();
  if (a.has_skip) {
    const acc_t w = a.coef[g.jz + 2];
    for (int64_t i = 0; i < g.plane_out(); ++i) gxa[i] = w * static_cast<acc_t>(gplane[i]);
  } else {
    std::fill(sc.gx.begin(), sc.gx.end(), acc_t(0));
  }
  if (a.has_max) max_pool_backward_plane(a, bc, pools, c, xplane, gc, sc);
  if (a.has_avg) avg_pool_backward_plane(a, bc, pools, c, xplane, gc, sc);
  scalar_t* __restrict__ gxo = grad_x + (n * g.c + c) * g.plane_in();
  for (int64_t i = 0; i < g.plane_in(); ++i) gxo[i] = static_cast<scalar_t>(gxa[i]);
}

template <typename scalar_t, typename acc_t>
void grad_planes(const BackwardArgs<scalar_t, acc_t>& a, const BackwardCoefficients<acc_t>& bc, scalar_t* grad_z,
                 scalar_t* grad_x) {
  const DartsGeometry& g = a.g;
  const int64_t m_plane = g.plane_out();
  at::parallel_for(0, g.planes(), grain_for(m_plane * (g.jz + 12)), [&](int64_t begin, int64_t end) {
    PlanePools<scalar_t, acc_t> pools(g);
    std::vector<acc_t> gc(m_plane);
    GradXScratch<acc_t> scratch(g, a.has_max && grad_x != nullptr, a.has_avg && grad_x != nullptr);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / g.n, n = t % g.n;
      const scalar_t* gplane = a.grad_plane(c, n);
      const acc_t gm = bc.g_mean[c];
      for (int64_t i = 0; i < m_plane; ++i) gc[i] = static_cast<acc_t>(gplane[i]) - gm;
      grad_z_plane(a, bc, t, c, gc.data(), grad_z);
      if (grad_x != nullptr) grad_x_plane(a, bc, pools, c, n, gc.data(), scratch, grad_x);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> darts_sum_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                                  const at::Tensor& z_in, const at::Tensor& mean_in,
                                                                  const at::Tensor& rstd_in, const at::Tensor& coef_in,
                                                                  int64_t stride, bool has_max, bool has_avg,
                                                                  bool has_skip, bool x_need_grad) {
  const DartsGeometry g = check_darts_sum_backward(kBackward, grad_out_in, x_in, z_in, mean_in, rstd_in, coef_in,
                                                   stride, has_skip, at::kCPU);
  const bool need_x = has_max || has_avg || has_skip;
  at::Tensor grad_z = empty_contiguous(z_in.sizes(), z_in.options());
  at::Tensor grad_x = x_need_grad ? empty_contiguous(x_in.sizes(), x_in.options()) : at::empty({0}, x_in.options());
  const auto dtype = x_in.scalar_type();
  at::Tensor grad_coef_acc = at::zeros({g.coefs()}, coef_in.options().dtype(accumulate_dtype(dtype)));
  if (g.planes() == 0 || g.plane_out() == 0) {
    if (x_need_grad) grad_x.zero_();
    return {grad_z, grad_x, grad_coef_acc.to(coef_in.scalar_type())};
  }
  const at::Tensor go = grad_out_in.contiguous();
  const at::Tensor x = need_x ? x_in.contiguous() : x_in;
  const at::Tensor z = z_in.contiguous();
  const at::Tensor mean = for_accumulation(mean_in, dtype);
  const at::Tensor rstd = for_accumulation(rstd_in, dtype);
  const at::Tensor coef = for_accumulation(coef_in, dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "darts_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t, acc_t> args{g,
                                             go.data_ptr<scalar_t>(),
                                             need_x ? x.data_ptr<scalar_t>() : nullptr,
                                             z.data_ptr<scalar_t>(),
                                             mean.data_ptr<acc_t>(),
                                             rstd.data_ptr<acc_t>(),
                                             coef.data_ptr<acc_t>(),
                                             has_max,
                                             has_avg,
                                             has_skip};
    std::vector<acc_t> partial(g.planes() * args.sums(), acc_t(0));
    plane_sums(args, partial.data());
    const BackwardCoefficients<acc_t> coefficients(args, partial.data(), grad_coef_acc.data_ptr<acc_t>());
    grad_planes(args, coefficients, grad_z.data_ptr<scalar_t>(), x_need_grad ? grad_x.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_z, grad_x, grad_coef_acc.to(coef_in.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("pool_batch_norm_stats", &fastnas::cpu::pool_batch_norm_stats);
  m.impl("darts_sum", &fastnas::cpu::darts_sum);
  m.impl("darts_sum_backward", &fastnas::cpu::darts_sum_backward);
}
