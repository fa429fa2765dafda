// relu_conv_bn: a DARTS cell's input preprocessing as one op that keeps only its
// input for backward. ReLU, then one 1x1 convolution (ReLUConvBN) or two stride-2
// 1x1 convolutions of the input and of the input shifted by one pixel,
// concatenated (FactorizedReduce), then a non-affine batch norm in training mode
// that updates the running statistics as nn.BatchNorm2d does.
//
// The backward recomputes the convolution from the saved input and then runs
// the ATen backward kernels eager autograd would run (threshold, convolution
// and batch-norm backward), so the gradients are eager's: the cost of recomputing
// without torch.utils.checkpoint's machinery around three small ops. One
// implementation of ATen calls for every device; registered for the CPU and,
// where built, CUDA.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "darts_edge.h"

namespace fastnas {
namespace preprocess {
namespace {

using at::Tensor;
using at::TensorList;

void check_inputs(const char* op, const Tensor& x, TensorList weights) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be (N, C, H, W), got shape ", x.sizes());
  check_dtype(op, "x", x);
  TORCH_CHECK_VALUE(weights.size() == 1 || weights.size() == 2, op,
                    ": weights must be one 1x1 convolution weight, or two (a factorized reduce); got ", weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const Tensor& w = weights[i];
    TORCH_CHECK_VALUE(w.dim() == 4 && w.size(1) == x.size(1) && w.size(2) == 1 && w.size(3) == 1, op, ": weights[", i,
                      "] must be (C_out, ", x.size(1), ", 1, 1) for x of ", x.size(1), " channels, got shape ",
                      w.sizes());
    check_same_dtype(op, "weights", w, "x", x);
    check_same_device(op, "weights", w, "x", x);
  }
  if (weights.size() == 2) {
    TORCH_CHECK_VALUE(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, op, ": a factorized reduce needs even H and W, got ",
                      x.size(2), "x", x.size(3));
  }
}

// A per-channel vector (running or batch statistics) of c entries, on x's device.
void check_channel_stat(const char* op, const char* name, const Tensor& t, int64_t c, const Tensor& x) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == c, op, ": ", name, " must have ", c,
                    " entries (the output channels), got shape ", t.sizes());
  check_stat_dtype(op, name, t);
  check_same_device(op, name, t, "x", x);
}

// The convolution of r = relu(x): as the modules compute it, views and all, so
// that the kernels (and so the results) are theirs.
Tensor convolve(const Tensor& r, TensorList weights) {
  if (weights.size() == 1) return at::conv2d(r, weights[0]);
  return at::cat({at::conv2d(r, weights[0], {}, 2), at::conv2d(r.slice(2, 1).slice(3, 1), weights[1], {}, 2)}, 1);
}

std::tuple<Tensor, Tensor, Tensor> relu_conv_bn(const Tensor& x, TensorList weights, const Tensor& running_mean,
                                                const Tensor& running_var, const Tensor& num_batches_tracked,
                                                double eps, double momentum) {
  constexpr const char* op = "relu_conv_bn";
  check_inputs(op, x, weights);
  const int64_t c_out = weights.size() == 1 ? weights[0].size(0) : weights[0].size(0) + weights[1].size(0);
  check_channel_stat(op, "running_mean", running_mean, c_out, x);
  check_channel_stat(op, "running_var", running_var, c_out, x);
  TORCH_CHECK_VALUE(num_batches_tracked.numel() == 1, op, ": num_batches_tracked must hold one count, got shape ",
                    num_batches_tracked.sizes());
  const Tensor z = convolve(at::relu(x), weights);
  TORCH_CHECK_VALUE(z.numel() > c_out, op, ": batch norm in training needs more than one value per channel, got ",
                    z.sizes());
  // Handles that share the buffers, which the batch norm updates in place.
  Tensor mean_buffer = running_mean, var_buffer = running_var;
  auto [out, mean, rstd] = at::_native_batch_norm_legit(z, {}, {}, mean_buffer, var_buffer, true, momentum, eps);
  num_batches_tracked.add_(1);
  const auto acc = accumulate_dtype(x.scalar_type());
  return {out, mean.to(acc), rstd.to(acc)};
}

std::tuple<Tensor, std::vector<Tensor>> relu_conv_bn_backward(const Tensor& grad_out, const Tensor& x,
                                                              TensorList weights, const Tensor& mean,
                                                              const Tensor& rstd, double eps) {
  constexpr const char* op = "relu_conv_bn_backward";
  check_inputs(op, x, weights);
  const Tensor r = at::relu(x);
  const Tensor z = convolve(r, weights);
  TORCH_CHECK_VALUE(grad_out.sizes() == z.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
                    " but the output has shape ", z.sizes());
  check_same_dtype(op, "grad_out", grad_out, "x", x);
  check_channel_stat(op, "mean", mean, z.size(1), x);
  check_channel_stat(op, "rstd", rstd, z.size(1), x);
  const Tensor grad_z =
      std::get<0>(at::native_batch_norm_backward(grad_out, z, {}, {}, {}, mean, rstd, true, eps, {true, false, false}));
  const int64_t stride = weights.size() == 1 ? 1 : 2;
  auto conv_backward = [&](const Tensor& g, const Tensor& input, const Tensor& w) {
    return at::convolution_backward(g, input, w, std::nullopt, {stride, stride}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                    {true, true, false});
  };
  std::vector<Tensor> grad_weights;
  Tensor grad_r;
  if (weights.size() == 1) {
    auto [gr, gw, unused] = conv_backward(grad_z, r, weights[0]);
    grad_r = std::move(gr);
    grad_weights.push_back(std::move(gw));
  } else {
    const int64_t c0 = weights[0].size(0), c1 = weights[1].size(0);
    auto [gr0, gw0, unused0] = conv_backward(grad_z.narrow(1, 0, c0), r, weights[0]);
    auto [gr1, gw1, unused1] = conv_backward(grad_z.narrow(1, c0, c1), r.slice(2, 1).slice(3, 1), weights[1]);
    grad_r = std::move(gr0);
    grad_r.slice(2, 1).slice(3, 1).add_(gr1);
    grad_weights.push_back(std::move(gw0));
    grad_weights.push_back(std::move(gw1));
  }
  return {at::threshold_backward(grad_r, x, 0), std::move(grad_weights)};
}

// --- autograd ---------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The running statistics travel to the forward as one non-differentiable argument.
struct RunningStats {
  Tensor mean, var, count;
};

class ReluConvBnFunction : public torch::autograd::Function<ReluConvBnFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, c10::DispatchKeySet keys, const Tensor& x, TensorList weights,
                               RunningStats stats, double eps, double momentum) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("fastnas::relu_conv_bn", "").typed<decltype(relu_conv_bn)>();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, rstd] =
        op.redispatch(keys & c10::after_autograd_keyset, x, weights, stats.mean, stats.var, stats.count, eps, momentum);
    edge::bump_versions({stats.mean, stats.var, stats.count});
    std::vector<Tensor> saved{x};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.push_back(mean);
    saved.push_back(rstd);
    ctx->save_for_backward(saved);
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, rstd});
    // The non-differentiable outputs' gradients stay undefined (materialised, they
    // would be one zero-filled launch each per backward); backward reads only grads[0].
    ctx->set_materialize_grads(false);
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastnas::relu_conv_bn_backward", "")
                               .typed<decltype(relu_conv_bn_backward)>();
    const variable_list saved = ctx->get_saved_variables();
    const int64_t n_weights = static_cast<int64_t>(saved.size()) - 3;
    // One entry per forward argument: keys, x, weights..., stats, eps, momentum.
    variable_list result(5 + n_weights);
    if (!grads[0].defined()) return result;
    // A plain backward (no create_graph) runs below autograd; a differentiated one
    // records the graph of the ATen ops it runs.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    auto [grad_x, grad_weights] =
        op.call(grads[0], saved[0], TensorList(saved.data() + 1, n_weights), saved[1 + n_weights], saved[2 + n_weights],
                ctx->saved_data["eps"].toDouble());
    result[1] = std::move(grad_x);
    std::move(grad_weights.begin(), grad_weights.end(), result.begin() + 2);
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor> relu_conv_bn_autograd(c10::DispatchKeySet keys, const Tensor& x, TensorList weights,
                                                         const Tensor& running_mean, const Tensor& running_var,
                                                         const Tensor& num_batches_tracked, double eps,
                                                         double momentum) {
  auto out = ReluConvBnFunction::apply(keys, x, weights, RunningStats{running_mean, running_var, num_batches_tracked},
                                       eps, momentum);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace preprocess
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("relu_conv_bn", &fastnas::preprocess::relu_conv_bn);
  m.impl("relu_conv_bn_backward", &fastnas::preprocess::relu_conv_bn_backward);
}

#ifdef FASTNAS_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnas, CUDA, m) {
  m.impl("relu_conv_bn", &fastnas::preprocess::relu_conv_bn);
  m.impl("relu_conv_bn_backward", &fastnas::preprocess::relu_conv_bn_backward);
}
#endif

// The backward is ATen ops all the way down: differentiated (create_graph), it records
// their graph, which gives eager's double backward.
TORCH_LIBRARY_IMPL(fastnas, Autograd, m) {
  m.impl("relu_conv_bn", &fastnas::preprocess::relu_conv_bn_autograd);
  m.impl("relu_conv_bn_backward", torch::CppFunction::makeFallthrough());
}
