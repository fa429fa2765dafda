// mixed_sum on CUDA: sum_k weights[k] * xs[k] and its backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/weighted_sum.cuh"
#include "host/mixed_sum.h"

namespace fastnas {
namespace cuda {
namespace {

constexpr const char* kForward = "mixed_sum";
constexpr const char* kBackward = "mixed_sum_backward";

at::Tensor mixed_sum(at::TensorList xs, const at::Tensor& weights) {
  check_mixed_sum(kForward, xs, weights, kDevice);
  const int64_t k_count = static_cast<int64_t>(xs.size());
  const DeviceGuard guard(xs[0].device());

  const auto dtype = xs[0].scalar_type();
  at::Tensor out = empty_contiguous(xs[0].sizes(), xs[0].options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const auto xc = contiguous_all(xs);
  const at::Tensor w = for_accumulation(weights, dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mixed_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    InputPtrs<scalar_t> ptrs{};
    for (int64_t k = 0; k < k_count; ++k) ptrs.ptr[k] = xc[k].data_ptr<scalar_t>();
    launch_weighted_sum(ptrs, static_cast<int>(k_count), w.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), n, FlatMap{},
                        /*vec_ok=*/true);
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_sum_backward(const at::Tensor& grad_out, at::TensorList xs,
                                                                   const at::Tensor& weights,
                                                                   const c10::List<bool>& xs_need_grad_list,
                                                                   bool weights_need_grad) {
  const std::vector<bool> xs_need_grad = xs_need_grad_list.vec();
  check_mixed_sum_backward(kBackward, grad_out, xs, weights, xs_need_grad, weights_need_grad, kDevice);
  const DeviceGuard guard(grad_out.device());
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

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mixed_sum_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      InputPtrs<scalar_t> x_ptrs{};
      GradPtrs<scalar_t> gx_ptrs{};
      for (size_t k = 0; k < xc.size(); ++k) x_ptrs.ptr[k] = xc[k].data_ptr<scalar_t>();
      for (int64_t k = 0, j = 0; k < k_count; ++k) {
        if (xs_need_grad[k]) gx_ptrs.ptr[k] = grad_xs[j++].data_ptr<scalar_t>();
      }
      const scalar_t* gop = go.data_ptr<scalar_t>();
      const int kc = static_cast<int>(k_count);
      const auto plan = plan_backward(gop, x_ptrs, gx_ptrs, kc, weights_need_grad, n, /*vec_ok=*/true);
      at::Tensor partials =
          at::empty({weights_need_grad ? plan.blocks : 0, k_count}, weights.options().dtype(acc_dtype));
      launch_weighted_sum_backward(plan, gop, x_ptrs, gx_ptrs, kc, w.data_ptr<acc_t>(), weights_need_grad, n, FlatMap{},
                                   weights_need_grad ? partials.data_ptr<acc_t>() : nullptr,
                                   weights_need_grad ? grad_w_acc.data_ptr<acc_t>() : nullptr);
    });
  }
  return {std::move(grad_xs), grad_w_acc.to(weights.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace fastnas

FASTNAS_CUDA_LIBRARY_IMPL(m) {
  m.impl("mixed_sum", &fastnas::cuda::mixed_sum);
  m.impl("mixed_sum_backward", &fastnas::cuda::mixed_sum_backward);
}
