// The per-element math the CPU and CUDA kernels share (csrc/fastnas_math.h),
// against definitions written the obvious way.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fastnas_math.h"

namespace {

namespace math = fastnas::math;
int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

// max_pool2d's rule, written out: from -inf, take an element when it is
// greater or NaN; the position of the last element taken.
struct Scan {
  double value;
  int64_t arg;
};

Scan scan(const std::vector<double>& plane, int64_t w, int64_t h0, int64_t h1, int64_t w0, int64_t w1) {
  Scan s{-std::numeric_limits<double>::infinity(), -1};
  for (int64_t ih = h0; ih < h1; ++ih) {
    for (int64_t iw = w0; iw < w1; ++iw) {
      const double v = plane[ih * w + iw];
      if (v > s.value || std::isnan(v)) s = {v, ih * w + iw};
    }
  }
  return s;
}

void test_pool_window() {
  std::mt19937 gen(0);
  std::uniform_int_distribution<int> small(-2, 2);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t h = 1 + trial % 6, w = 1 + (trial / 6) % 7, stride = 1 + trial % 2;
    std::vector<double> plane(h * w);
    // Few distinct values: many ties; some NaNs.
    for (auto& v : plane) v = small(gen) == 2 && trial % 3 == 0 ? std::nan("") : small(gen);
    const auto load = [&](int64_t ih, int64_t iw) { return plane[ih * w + iw]; };
    const int64_t ho = math::same_padding_out_size(h, stride), wo = math::same_padding_out_size(w, stride);
    for (int64_t oh = 0; oh < ho; ++oh) {
      for (int64_t ow = 0; ow < wo; ++ow) {
        const int64_t h0 = std::max<int64_t>(oh * stride - 1, 0), h1 = std::min<int64_t>(oh * stride + 2, h);
        const int64_t w0 = std::max<int64_t>(ow * stride - 1, 0), w1 = std::min<int64_t>(ow * stride + 2, w);
        const auto win = math::pool_window_3x3<double>(load, h, w, oh, ow, stride);
        const Scan want = scan(plane, w, h0, h1, w0, w1);
        double sum = 0;
        for (int64_t ih = h0; ih < h1; ++ih) {
          for (int64_t iw = w0; iw < w1; ++iw) sum += plane[ih * w + iw];
        }
        const std::string where = "pool window " + std::to_string(h) + "x" + std::to_string(w) + " stride " +
                                  std::to_string(stride) + " at (" + std::to_string(oh) + ", " + std::to_string(ow) +
                                  ")";
        expect(same(win.max, want.value), where + ": max");
        expect(win.arg == want.arg, where + ": argmax " + std::to_string(win.arg) + " != " + std::to_string(want.arg));
        expect(same(win.sum, sum), where + ": sum");
        expect(win.count == static_cast<double>((h1 - h0) * (w1 - w0)), where + ": count");
      }
    }
  }
}

void test_max_pool_2x2() {
  const double nan = std::nan("");
  const double cases[][4] = {{1, 2, 3, 4}, {4, 3, 2, 1}, {2, 5, 5, 1}, {nan, 1, 2, 3}, {1, nan, 2, nan}, {7, 7, 7, 7}};
  for (const auto& c : cases) {
    const auto r = math::max_pool_2x2<double>(c[0], c[1], c[2], c[3]);
    const std::vector<double> plane(c, c + 4);
    const Scan want = scan(plane, 2, 0, 2, 0, 2);
    expect(same(r.value, want.value) && r.index == want.arg, "max_pool_2x2 of {" + std::to_string(c[0]) + ", " +
                                                                 std::to_string(c[1]) + ", " + std::to_string(c[2]) +
                                                                 ", " + std::to_string(c[3]) + "}");
    for (int p = 0; p < 4; ++p)
      expect(math::pool_grad_at(p, r.index, 1.0) == (p == want.arg ? 1.0 : 0.0), "pool_grad_at");
  }
}

void test_merge_moments() {
  std::mt19937 gen(1);
  std::normal_distribution<double> normal(5.0, 2.0);
  std::vector<double> values(1000);
  for (auto& v : values) v = normal(gen);
  double count = 0, mean = 0, m2 = 0;
  for (size_t start = 0; start < values.size(); start += 137) {
    const size_t end = std::min(values.size(), start + 137);
    double mb = 0, m2b = 0;
    for (size_t i = start; i < end; ++i) mb += values[i];
    mb /= static_cast<double>(end - start);
    for (size_t i = start; i < end; ++i) m2b += (values[i] - mb) * (values[i] - mb);
    math::merge_moments(count, mean, m2, static_cast<double>(end - start), mb, m2b);
  }
  double want_mean = 0, want_m2 = 0;
  for (const double v : values) want_mean += v;
  want_mean /= static_cast<double>(values.size());
  for (const double v : values) want_m2 += (v - want_mean) * (v - want_mean);
  expect(count == 1000.0, "merge_moments: count");
  expect(std::abs(mean - want_mean) < 1e-12, "merge_moments: mean");
  expect(std::abs(m2 - want_m2) < 1e-9 * want_m2, "merge_moments: m2");
}

void test_batch_norm_terms() {
  // bn_input_grad is d/dp of coef * (p - mean) * rstd with mean and rstd of the
  // batch: scale * (g - mean(g) - (p - mean) * slope).
  const double scale = 0.7, gc = 0.3, p = 2.0, mean = 1.5, slope = 0.2;
  expect(math::bn_input_grad(scale, gc, p, mean, slope) == scale * (gc - (p - mean) * slope), "bn_input_grad");
  expect(math::bn_slope(4.0, 0.5, 0.25) == 4.0 * 0.5 * 0.25 * 0.5, "bn_slope");
  expect(math::batch_norm_grad(1.0, 0.5, 2.0, 0.25, 0.1) == 2.0 * (1.0 - 0.25 - 0.5 * 0.1), "batch_norm_grad");
  expect(math::normalized_term(2.0, 3.0, 1.0) == 4.0, "normalized_term");
}

void test_depthwise() {
  expect(math::depthwise_activation(-1.0, false, 0.0, 1.0) == 0.0, "relu of a negative");
  expect(math::depthwise_activation(2.0, true, 1.0, 3.0) == 3.0, "batch-norm prologue: (2 - 1) * 3");
  expect(math::depthwise_activation(std::nan(""), false, 0.0, 1.0) == 0.0, "a NaN activation is 0");
  expect(math::depthwise_grad_passes(0.0, 5.0) == 0.0 && math::depthwise_grad_passes(1e-30, 5.0) == 5.0,
         "the gradient passes where the activation is positive");
  for (int64_t k = 1; k <= 15; k += 2) {
    for (int64_t d = 1; d <= 3; ++d) {
      const int64_t p = math::depthwise_padding(k, d);
      for (int64_t size = 1; size <= 9; ++size) {
        for (int64_t stride = 1; stride <= 2; ++stride) {
          // conv2d's output size with this padding is the same for every candidate.
          const int64_t conv = (size + 2 * p - d * (k - 1) - 1) / stride + 1;
          expect(conv == math::same_padding_out_size(size, stride), "output size k=" + std::to_string(k));
        }
      }
    }
  }
}

void test_activations() {
  // The definitions PyTorch documents (ELU alpha 1, leaky slope 0.01, swish = SiLU).
  auto want = [](int code, double v) {
    switch (code) {
      case math::kRelu6:
        return std::min(std::max(v, 0.0), 6.0);
      case math::kElu:
        return v > 0 ? v : std::exp(v) - 1.0;
      case math::kLeakyRelu:
        return v > 0 ? v : 0.01 * v;
      case math::kSwish:
        return v / (1.0 + std::exp(-v));
      case math::kHardswish:
        return v * std::min(std::max(v + 3.0, 0.0), 6.0) / 6.0;
      default:
        return std::max(v, 0.0);
    }
  };
  for (int code = 0; code < math::kNumActivations; ++code) {
    const std::string name = "activation " + std::to_string(code);
    expect(math::activation_forward(code, 0.0) == 0.0, name + " maps 0 to 0 (zero padding commutes with it)");
    for (double v = -7.75; v <= 7.75; v += 0.5) {  // no kink (0, +-3, 6) among these points
      expect(std::abs(math::activation_forward(code, v) - want(code, v)) <= 1e-12, name + " at " + std::to_string(v));
      const double h = 1e-6;
      const double fd = (want(code, v + h) - want(code, v - h)) / (2 * h);
      expect(std::abs(math::activation_derivative(code, v) - fd) <= 1e-6, name + " derivative at " + std::to_string(v));
      expect(std::abs(math::activation_forward(code, static_cast<float>(v)) - static_cast<float>(want(code, v))) <=
                 1e-5f * std::max(1.0, std::abs(v)),
             name + " in float at " + std::to_string(v));
    }
  }
  expect(math::activation_forward(math::kRelu, std::nan("")) == 0.0, "relu of NaN is 0, as depthwise_activation");
}

}  // namespace

int main() {
  test_pool_window();
  test_max_pool_2x2();
  test_merge_moments();
  test_batch_norm_terms();
  test_depthwise();
  test_activations();
  if (failures == 0) std::printf("all fastnas math tests passed\n");
  return failures == 0 ? 0 : 1;
}
