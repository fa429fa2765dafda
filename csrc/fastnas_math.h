// Per-element arithmetic of the fused ops, shared by the CPU loops and the
// CUDA kernels so that the CPU tests exercise the same math the GPU runs.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fastnas {
namespace math {

// Upper bound on K: the CUDA kernels receive the K pointers by value in a
// kernel argument, whose size is bounded.
constexpr int kMaxInputs = 128;

template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t weighted_accumulate(acc_t acc, acc_t weight, scalar_t x) {
  return acc + weight * static_cast<acc_t>(x);
}

template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t dot_accumulate(acc_t acc, acc_t grad, scalar_t x) {
  return acc + grad * static_cast<acc_t>(x);
}

// channel_shuffle(x, groups) views C as (groups, C/groups) and transposes it,
// so concat channel c lands on output channel (c % (C/g)) * g + c / (C/g).
template <typename index_t>
C10_HOST_DEVICE inline index_t shuffled_channel(index_t c, index_t channels_per_group, index_t groups) {
  return (c % channels_per_group) * groups + c / channels_per_group;
}

template <typename index_t>
C10_HOST_DEVICE inline index_t unshuffled_channel(index_t out_c, index_t channels_per_group, index_t groups) {
  return (out_c % groups) * channels_per_group + out_c / groups;
}

template <typename T>
C10_HOST_DEVICE inline bool is_nan(T v) {
  return v != v;
}

// --- max pooling -----------------------------------------------------------------

// PyTorch's max_pool2d rule, the one home of it: scanning a window in row-major
// order from -inf with the first element as argmax, an element is taken when it
// is strictly greater than the best so far or NaN. So ties go to the first
// maximum and a NaN always propagates (the last NaN wins). Starting from the
// window's first element instead of -inf gives the same result.
template <typename acc_t>
C10_HOST_DEVICE inline bool max_takes(acc_t v, acc_t best) {
  return (v > best) | is_nan(v);
}

// The result of a 2x2 max pool: the value and which of the four window
// elements (0..3, row-major) it came from.
template <typename acc_t>
struct PoolResult {
  acc_t value;
  int index;
};

// Selects rather than branches: on random data the comparisons are coin flips.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline PoolResult<acc_t> max_pool_2x2(scalar_t a, scalar_t b, scalar_t c, scalar_t d) {
  const acc_t v[4] = {static_cast<acc_t>(a), static_cast<acc_t>(b), static_cast<acc_t>(c), static_cast<acc_t>(d)};
  PoolResult<acc_t> r{v[0], 0};
  for (int i = 1; i < 4; ++i) {
    const bool take = max_takes(v[i], r.value);
    r.value = take ? v[i] : r.value;
    r.index = take ? i : r.index;
  }
  return r;
}

// Where the gradient of one pooled output goes in its 2x2 window.
template <typename scalar_t>
C10_HOST_DEVICE inline scalar_t pool_grad_at(int position, int argmax, scalar_t grad) {
  return position == argmax ? grad : scalar_t(0);
}

// The activations a depthwise prologue applies (fastnas/ops/activations.py: a
// name's code is its position in ACTIVATIONS). ELU and leaky ReLU take PyTorch's
// defaults; swish is x * sigmoid(x). Every one maps 0 to 0, so zero padding
// before or after the activation is the same.
enum Activation : int { kRelu = 0, kRelu6 = 1, kElu = 2, kLeakyRelu = 3, kSwish = 4, kHardswish = 5 };
constexpr int kNumActivations = 6;
constexpr double kEluAlpha = 1.0;
constexpr double kLeakyReluSlope = 0.01;

template <typename T>
C10_HOST_DEVICE inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

template <typename T>
C10_HOST_DEVICE inline T activation_forward(int code, T v) {
  switch (code) {
    case kRelu6:
      return v > T(0) ? (v < T(6) ? v : T(6)) : T(0);
    case kElu:
      return v > T(0) ? v : T(kEluAlpha) * std::expm1(v);
    case kLeakyRelu:
      return v > T(0) ? v : T(kLeakyReluSlope) * v;
    case kSwish:
      return v * sigmoid(v);
    case kHardswish:
      return v <= T(-3) ? T(0) : (v >= T(3) ? v : v * (v + T(3)) / T(6));
    default:
      return v > T(0) ? v : T(0);
  }
}

// d activation / d pre at pre = v, with PyTorch's choices at the kinks.
template <typename T>
C10_HOST_DEVICE inline T activation_derivative(int code, T v) {
  switch (code) {
    case kRelu6:
      return (v > T(0) && v < T(6)) ? T(1) : T(0);
    case kElu:
      return v > T(0) ? T(1) : T(kEluAlpha) * std::exp(v);
    case kLeakyRelu:
      return v > T(0) ? T(1) : T(kLeakyReluSlope);
    case kSwish: {
      const T s = sigmoid(v);
      return s * (T(1) + v * (T(1) - s));
    }
    case kHardswish:
      return v <= T(-3) ? T(0) : (v >= T(3) ? T(1) : v / T(3) + T(0.5));
    default:
      return v > T(0) ? T(1) : T(0);
  }
}

// Output size of a window of size 2 * pad + 1 sliding over `size` elements
// with padding `pad` and `stride`: (size - 1) / stride + 1, 0 for an empty input.
C10_HOST_DEVICE inline int64_t same_padding_out_size(int64_t size, int64_t stride) {
  return size == 0 ? 0 : (size - 1) / stride + 1;
}

// The 3x3, padding-1 window of pooled output (oh, ow) of an (h, w) plane: its
// maximum and that maximum's flat position ih * w + iw by the max-pool rule,
// the sum of its valid elements (each row summed left to right, then the rows
// top to bottom) and their count (rows * columns, as count_include_pad=False
// divides). load(ih, iw) returns the element in acc_t.
template <typename acc_t>
struct PoolWindow {
  acc_t max;
  int64_t arg;
  acc_t sum;
  acc_t count;
  C10_HOST_DEVICE acc_t avg() const { return sum / count; }
};

template <typename acc_t, typename Load>
C10_HOST_DEVICE inline PoolWindow<acc_t> pool_window_3x3(const Load& load, int64_t h, int64_t w, int64_t oh, int64_t ow,
                                                         int64_t stride) {
  const int64_t h0 = oh * stride - 1 > 0 ? oh * stride - 1 : 0;
  const int64_t h1 = oh * stride + 2 < h ? oh * stride + 2 : h;
  const int64_t w0 = ow * stride - 1 > 0 ? ow * stride - 1 : 0;
  const int64_t w1 = ow * stride + 2 < w ? ow * stride + 2 : w;
  PoolWindow<acc_t> r;
  r.max = load(h0, w0);
  r.arg = h0 * w + w0;
  for (int64_t ih = h0; ih < h1; ++ih) {
    acc_t row = load(ih, w0);
    if (ih != h0) {
      const bool take = max_takes(row, r.max);
      r.max = take ? row : r.max;
      r.arg = take ? ih * w + w0 : r.arg;
    }
    for (int64_t iw = w0 + 1; iw < w1; ++iw) {
      const acc_t v = load(ih, iw);
      const bool take = max_takes(v, r.max);
      r.max = take ? v : r.max;
      r.arg = take ? ih * w + iw : r.arg;
      row += v;
    }
    r.sum = ih == h0 ? row : r.sum + row;
  }
  r.count = static_cast<acc_t>(h1 - h0) * static_cast<acc_t>(w1 - w0);
  return r;
}

// --- batch norm --------------------------------------------------------------------

// Chan, Golub and LeVeque: (count, mean, m2) of a set merged with those of
// another, (count_b, mean_b, m2_b); m2 is the sum of squared deviations.
template <typename T>
C10_HOST_DEVICE inline void merge_moments(T& count, T& mean, T& m2, T count_b, T mean_b, T m2_b) {
  const T total = count + count_b;
  const T delta = mean_b - mean;
  mean += delta * (count_b / total);
  m2 += m2_b + delta * delta * (count * count_b / total);
  count = total;
}

// The moments of a row of m values from those of its chunks of `chunk` values
// (the last one shorter), merged in order: chunks * (mean, m2) at part_mean and
// part_m2, combined in double into (count, mean, m2).
template <typename T>
C10_HOST_DEVICE inline void merge_chunk_moments(const T* part_mean, const T* part_m2, int64_t m, int64_t chunks,
                                                int64_t chunk, double& count, double& mean, double& m2) {
  count = mean = m2 = 0;
  for (int64_t p = 0; p < chunks; ++p) {
    const double len = static_cast<double>(m - p * chunk < chunk ? m - p * chunk : chunk);
    merge_moments(count, mean, m2, len, static_cast<double>(part_mean[p]), static_cast<double>(part_m2[p]));
  }
}

// One normalised candidate's term in a weighted sum, scale * (p - mean), with
// scale = coefficient * rstd.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t normalized_term(acc_t scale, acc_t p, acc_t mean) {
  return scale * (p - mean);
}

// Training-mode batch-norm backward of a weighted candidate, for its pre-BN
// value p: scale * ((g - mean(g)) - (p - mean) * slope), where scale =
// coefficient * rstd and slope = mean(g * yhat) * rstd (bn_slope).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_input_grad(acc_t scale, acc_t g_centered, acc_t p, acc_t mean, acc_t slope) {
  return scale * (g_centered - (p - mean) * slope);
}

// slope from sum(g * (p - mean)) over the m values of a channel: mean(g * yhat) * rstd.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_slope(acc_t sum_g_centered_p, acc_t rstd, acc_t inv_m) {
  return sum_g_centered_p * rstd * inv_m * rstd;
}

// Batch-norm backward without the coefficient: rstd * (g - mean(g) - yhat * mean(g * yhat)).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t batch_norm_grad(acc_t g, acc_t yhat, acc_t rstd, acc_t mean_g, acc_t mean_gy) {
  return rstd * (g - mean_g - yhat * mean_gy);
}

// --- depthwise convolution ----------------------------------------------------------

// The activation a depthwise candidate convolves: relu(pre), pre = x or, with
// the candidate's batch-norm prologue, (x - mean) * rstd. A NaN pre gives 0 (the
// comparison is false), and the input gradient passes where the activation is
// positive (depthwise_grad_passes).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t depthwise_activation(acc_t x, bool bn, acc_t mean, acc_t rstd) {
  const acc_t pre = bn ? (x - mean) * rstd : x;
  return pre > acc_t(0) ? pre : acc_t(0);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t depthwise_grad_passes(acc_t activation, acc_t grad) {
  return activation > acc_t(0) ? grad : acc_t(0);
}

// Zero padding of a candidate with kernel size k and dilation d: every
// candidate keeps the size (H - 1) / stride + 1.
C10_HOST_DEVICE inline int64_t depthwise_padding(int64_t k, int64_t d) { return d * (k - 1) / 2; }

}  // namespace math
}  // namespace fastnas
