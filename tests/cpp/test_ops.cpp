// Calls the fastnas ops through the dispatcher on CPU tensors and compares
// them with plain loops over the elements.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cmath>
#include <cstdio>

#include "darts_edge.h"
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

void expect_close(const at::Tensor& got, const at::Tensor& want, const std::string& what, double tol = 1e-5) {
  if (!got.sizes().equals(want.sizes())) {
    expect(false, what + ": shape mismatch");
    return;
  }
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, want.to(at::kDouble).abs().max().item<double>());
  expect(err <= tol * scale, what + ": max error " + std::to_string(err));
}

c10::OperatorHandle op(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

std::vector<c10::IValue> call(const char* name, std::vector<c10::IValue> stack) {
  op(name).callBoxed(&stack);
  return stack;
}

c10::List<at::Tensor> tensor_list(const std::vector<at::Tensor>& xs) {
  c10::List<at::Tensor> list;
  for (const auto& x : xs) list.push_back(x);
  return list;
}

void test_mixed_sum() {
  const int64_t k_count = 3;
  std::vector<at::Tensor> xs;
  for (int64_t k = 0; k < k_count; ++k) xs.push_back(at::randn({5, 7, 123}));
  const at::Tensor w = at::randn({k_count});
  const at::Tensor g = at::randn({5, 7, 123});

  const at::Tensor out = call("fastnas::mixed_sum", {tensor_list(xs), w})[0].toTensor();
  at::Tensor want = at::zeros({5, 7, 123});
  at::Tensor want_gw = at::zeros({k_count});
  {
    auto o = want.data_ptr<float>();
    auto gw = want_gw.data_ptr<float>();
    for (int64_t k = 0; k < k_count; ++k) {
      const float wk = w.data_ptr<float>()[k];
      const float* x = xs[k].data_ptr<float>();
      double dot = 0;
      for (int64_t i = 0; i < want.numel(); ++i) {
        o[i] += wk * x[i];
        dot += static_cast<double>(g.data_ptr<float>()[i]) * x[i];
      }
      gw[k] = static_cast<float>(dot);
    }
  }
  expect_close(out, want, "mixed_sum forward");

  c10::List<bool> need({true, false, true});
  const auto res = call("fastnas::mixed_sum_backward", {g, tensor_list(xs), w, need, true});
  const auto grad_xs = res[0].toTensorVector();
  expect(grad_xs.size() == 2, "mixed_sum_backward returns the needed input gradients only");
  if (grad_xs.size() == 2) {
    expect_close(grad_xs[0], g * w[0], "mixed_sum_backward grad xs[0]");
    expect_close(grad_xs[1], g * w[2], "mixed_sum_backward grad xs[2]");
  }
  expect_close(res[1].toTensor(), want_gw, "mixed_sum_backward grad weights", 1e-4);

  // Without the weights' gradient, xs may be left out.
  const auto res2 = call("fastnas::mixed_sum_backward", {g, tensor_list({}), w, need, false});
  expect(res2[1].toTensor().numel() == 0, "mixed_sum_backward: empty weights gradient when not needed");

  bool threw = false;
  try {
    call("fastnas::mixed_sum", {tensor_list(xs), at::randn({k_count + 1})});
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "mixed_sum rejects weights of the wrong length");
}

void test_partial_channel(bool pool) {
  const int64_t n = 2, cp = 2, cb = 4, h = 3, w = 5, groups = 3, k_count = 2, c = cp + cb, cpg = c / groups;
  std::vector<at::Tensor> xs;
  for (int64_t k = 0; k < k_count; ++k) xs.push_back(at::randn({n, cp, h, w}));
  const at::Tensor wt = at::randn({k_count});
  const at::Tensor bypass = pool ? at::randn({n, cb, 2 * h, 2 * w}) : at::randn({n, cb, h, w});
  const at::Tensor out =
      call("fastnas::partial_channel_mixed_sum", {tensor_list(xs), wt, bypass, groups, pool})[0].toTensor();

  at::Tensor want = at::empty({n, c, h, w});
  auto o = want.accessor<float, 4>();
  auto b = bypass.accessor<float, 4>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t oc = (ch % cpg) * groups + ch / cpg;
      for (int64_t y = 0; y < h; ++y) {
        for (int64_t x = 0; x < w; ++x) {
          float v = 0;
          if (ch < cp) {
            for (int64_t k = 0; k < k_count; ++k) v += wt[k].item<float>() * xs[k][i][ch][y][x].item<float>();
          } else if (pool) {
            const int64_t cc = ch - cp;
            v = std::max(std::max(b[i][cc][2 * y][2 * x], b[i][cc][2 * y][2 * x + 1]),
                         std::max(b[i][cc][2 * y + 1][2 * x], b[i][cc][2 * y + 1][2 * x + 1]));
          } else {
            v = b[i][ch - cp][y][x];
          }
          o[i][oc][y][x] = v;
        }
      }
    }
  }
  const std::string tag = pool ? " (pool)" : "";
  expect_close(out, want, "partial_channel_mixed_sum forward" + tag);

  // Backward of a sum of the output: every gradient is easy to write down.
  const at::Tensor g = at::ones({n, c, h, w});
  c10::List<bool> need({true, true});
  const auto res = call("fastnas::partial_channel_mixed_sum_backward",
                        {g, tensor_list(xs), wt, bypass, groups, pool, need, true, true});
  const auto grad_xs = res[0].toTensorVector();
  expect(grad_xs.size() == 2, "partial_channel_mixed_sum_backward returns both input gradients" + tag);
  if (grad_xs.size() == 2) expect_close(grad_xs[1], at::full({n, cp, h, w}, wt[1].item<float>()), "grad xs[1]" + tag);
  expect_close(res[1].toTensor(), at::stack({xs[0].sum(), xs[1].sum()}), "grad weights" + tag, 1e-4);
  const at::Tensor gb = res[2].toTensor();
  if (pool) {
    // One 1 per 2x2 window, at its maximum.
    expect_close(gb.sum(), at::scalar_tensor(static_cast<double>(n * cb * h * w)), "grad bypass sum" + tag);
    const at::Tensor picked = (gb * bypass).sum();
    const at::Tensor maxima = at::max_pool2d(bypass, {2, 2}, {2, 2}).sum();
    expect_close(picked, maxima, "grad bypass at the maxima" + tag, 1e-4);
  } else {
    expect_close(gb, at::ones({n, cb, h, w}), "grad bypass" + tag);
  }
}

// The weights' gradient of the fused edge: the ATen path a GPU runs (a pad and a
// stack) gives the CPU loop's bits, with and without absent max/avg/skip terms.
void test_scatter_coef() {
  for (const bool all : {true, false}) {
    fastnas::edge::Spec s;
    s.K = 8;
    s.ns = 2;
    s.nd = 2;
    s.sep_i = {4, 5};
    s.dil_i = {6, 7};
    s.max_index = 1;
    s.avg_index = all ? 2 : -1;
    s.skip_index = all ? 3 : -1;
    // [dilated, separable ends, max, avg, skip]; absent terms have a zero gradient.
    at::Tensor g = at::randn({s.nd + s.ns + 3}, at::kFloat);
    if (!all) g.slice(0, s.nd + s.ns + 1).zero_();
    const std::string tag = all ? " (all candidates)" : " (no avg, no skip)";
    const at::Tensor cpu = fastnas::edge::scatter_coef(s, g, at::kFloat, false);
    const at::Tensor generic = fastnas::edge::scatter_coef(s, g, at::kFloat, true);
    expect(cpu.equal(generic), "scatter_coef: the generic path differs from the CPU loop" + tag);
    expect(cpu[0].item<float>() == 0.0f, "scatter_coef: the none candidate's gradient is not zero" + tag);
    expect(cpu[6].item<float>() == g[0].item<float>() && cpu[4].item<float>() == g[2].item<float>(),
           "scatter_coef: a coefficient's gradient landed at the wrong weight" + tag);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  try {
    test_mixed_sum();
    test_partial_channel(false);
    test_partial_channel(true);
    test_scatter_coef();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
    return 1;
  }
  if (failures == 0) std::printf("all fastnas C++ op tests passed\n");
  return failures == 0 ? 0 : 1;
}
