// darts_sum's and pool_batch_norm_stats's geometry and argument checks, shared
// by their CPU and CUDA kernels. x is (N, C, H, W); z is channel-major
// (Jz, C, N, Ho, Wo); mean and rstd are (Jz + 2, C): the z candidates, then
// the max and the avg pool; coef is (Jz + 3,): those, then the skip.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "checks.h"

namespace fastnas {

struct DartsGeometry {
  int64_t n, c, h, w, stride, ho, wo, jz;
  int64_t plane_in() const { return h * w; }
  int64_t plane_out() const { return ho * wo; }
  int64_t planes() const { return c * n; }
  // Rows of mean and rstd (the z candidates and both pools) and entries of coef.
  int64_t stat_rows() const { return jz + 2; }
  int64_t coefs() const { return jz + 3; }
};

inline DartsGeometry check_pool_input(const char* op, const at::Tensor& x, int64_t stride, c10::DeviceType type) {
  check_device_type(op, "x", x, type);
  check_dtype(op, "x", x);
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D (N, C, H, W) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op, ": x has an empty spatial size ", x.sizes());
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  return {x.size(0),
          x.size(1),
          x.size(2),
          x.size(3),
          stride,
          math::same_padding_out_size(x.size(2), stride),
          math::same_padding_out_size(x.size(3), stride),
          0};
}

inline DartsGeometry check_pool_batch_norm_stats(const char* op, const at::Tensor& x, int64_t stride, double eps,
                                                 c10::DeviceType type) {
  const DartsGeometry g = check_pool_input(op, x, stride, type);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  return g;
}

inline DartsGeometry check_darts_sum(const char* op, const at::Tensor& x, const at::Tensor& z, const at::Tensor& mean,
                                     const at::Tensor& rstd, const at::Tensor& coef, int64_t stride, bool has_skip,
                                     c10::DeviceType type) {
  DartsGeometry g = check_pool_input(op, x, stride, type);
  TORCH_CHECK(!has_skip || stride == 1, op, ": has_skip=True (the identity) needs stride 1, got stride ", stride);
  TORCH_CHECK(z.dim() == 5 && z.size(1) == g.c && z.size(2) == g.n && z.size(3) == g.ho && z.size(4) == g.wo, op,
              ": z must be (Jz, C, N, Ho, Wo) = (Jz, ", g.c, ", ", g.n, ", ", g.ho, ", ", g.wo, "), got shape ",
              z.sizes());
  check_same_dtype(op, "z", z, "x", x);
  check_same_device(op, "z", z, "x", x);
  g.jz = z.size(0);
  const std::pair<const char*, const at::Tensor*> stats[] = {{"mean", &mean}, {"rstd", &rstd}};
  for (const auto& [name, t] : stats) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == g.stat_rows() && t->size(1) == g.c, op, ": ", name,
                " must be (Jz + 2, C) = (", g.stat_rows(), ", ", g.c, "), got shape ", t->sizes());
  }
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == g.coefs(), op, ": coef must be (Jz + 3,) = (", g.coefs(),
              ",), got shape ", coef.sizes());
  const std::pair<const char*, const at::Tensor*> params[] = {{"mean", &mean}, {"rstd", &rstd}, {"coef", &coef}};
  for (const auto& [name, t] : params) {
    check_stat_dtype(op, name, *t);
    check_same_device(op, name, *t, "x", x);
  }
  return g;
}

inline DartsGeometry check_darts_sum_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& z, const at::Tensor& mean, const at::Tensor& rstd,
                                              const at::Tensor& coef, int64_t stride, bool has_skip,
                                              c10::DeviceType type) {
  const DartsGeometry g = check_darts_sum(op, x, z, mean, rstd, coef, stride, has_skip, type);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == g.n && grad_out.size(1) == g.c && grad_out.size(2) == g.ho &&
                  grad_out.size(3) == g.wo,
              op, ": grad_out must be (N, C, Ho, Wo) = (", g.n, ", ", g.c, ", ", g.ho, ", ", g.wo, "), got shape ",
              grad_out.sizes());
  check_same_dtype(op, "grad_out", grad_out, "x", x);
  check_same_device(op, "grad_out", grad_out, "x", x);
  return g;
}

}  // namespace fastnas
