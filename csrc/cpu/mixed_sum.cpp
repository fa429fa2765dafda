// mixed_sum on CPU: sum_k weights[k] * xs[k] and its backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/loops.h"
#include "cpu/weighted_sum.h"
#include "host/mixed_sum.h"

namespace fastnas {
namespace cpu {
namespace {

constexpr const char* kForward = "mixed_sum";
constexpr const char* kBackward = "mixed_sum_backward";

at::Tensor mixed_sum(at::TensorList xs, const at::Tensor& weights) {
  check_mixed_sum(kForward, xs, weights, at::kCPU);
  const int64_t k_count = static_cast<int64_t>(xs.size());

  const auto dtype = xs[0].scalar_type();
  at::Tensor out = empty_contiguous(xs[0].sizes(), xs[0].options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const auto xc = contiguous_all(xs);
  const at::Tensor w = for_accumulation(weights, dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mixed_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> ptrs;
    for (const auto& x : xc) ptrs.push_back(x.data_ptr<scalar_t>());
    const acc_t* wp = w.data_ptr<acc_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    const int64_t chunks = ceil_div(n, kChunk);
    at::parallel_for(0, chunks, grain_for(kChunk), [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
      alignas(64) acc_t buf[kChunk];
      for (int64_t c = begin; c < end; ++c) {
        const int64_t off = c * kChunk;
        const int64_t len = std::min(kChunk, n - off);
        weighted_sum_chunk(ptrs.data(), k_count, wp, off, len, outp + off, buf);
      }
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward(const at::Tensor& grad_out, at::TensorList xs,
                                                                   const at::Tensor& weights,
                                                                   const c10::List<bool>& xs_need_grad_list,
                                                                   bool weights_need_grad) {
  const std::vector<bool> xs_need_grad = xs_need_grad_list.vec();
  check_mixed_sum_backward(kBackward, grad_out, xs, weights, xs_need_grad, weights_need_grad, at::kCPU);
  const int64_t k_count = weights.size(0);
  const auto dtype = grad_out.scalar_type();
  const int64_t n = grad_out.numel();

  std::vector<at::Tensor> grad_xs = new_input_grads(grad_out.sizes(), grad_out.options(), xs_need_grad);
  const auto acc_dtype = accumulate_dtype(dtype);
  at::Tensor grad_w_acc = at::zeros({weights_need_grad ? k_count : 0}, weights.options().dtype(acc_dtype));
  if (n > 0 && (weights_need_grad || !grad_xs.empty())) {
    const at::Tensor go = grad_out.contiguous();
    const auto xc = weights_need_grad ? contiguous_all(xs) : std::vector<at::Tensor>{};
    const at::Tensor w = for_accumulation(weights, dtype);
    const int64_t chunks = ceil_div(n, kChunk);
    at::Tensor partials = at::empty({weights_need_grad ? chunks : 0, k_count}, weights.options().dtype(acc_dtype));

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mixed_sum_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<scalar_t*> gx_ptrs(k_count, nullptr);
      for (int64_t k = 0, j = 0; k < k_count; ++k) {
        if (xs_need_grad[k]) gx_ptrs[k] = grad_xs[j++].data_ptr<scalar_t>();
      }
      std::vector<const scalar_t*> x_ptrs;
      for (const auto& x : xc) x_ptrs.push_back(x.data_ptr<scalar_t>());
      const scalar_t* gop = go.data_ptr<scalar_t>();
      const acc_t* wp = w.data_ptr<acc_t>();
      acc_t* pp = weights_need_grad ? partials.data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, chunks, grain_for(kChunk), [&](int64_t begin, int64_t end) FASTNAS_CPU_CLONES {
        alignas(64) acc_t buf[kChunk];
        for (int64_t c = begin; c < end; ++c) {
          const int64_t off = c * kChunk;
          const int64_t len = std::min(kChunk, n - off);
          weighted_sum_backward_chunk(gop + off, gx_ptrs.data(), x_ptrs.data(), k_count, wp, off, len,
                                      pp != nullptr ? pp + c * k_count : nullptr, buf);
        }
      });
      if (weights_need_grad) sum_partials(pp, chunks, k_count, grad_w_acc.data_ptr<acc_t>());
    });
  }
  return {std::move(grad_xs), grad_w_acc.to(weights.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("mixed_sum", &fastnas::cpu::mixed_sum);
  m.impl("mixed_sum_backward", &fastnas::cpu::mixed_sum_backward);
}
