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

// The result of a 2x2 max pool: the value and which of the four window
// elements (0..3, row-major) it came from.
template <typename acc_t>
struct PoolResult {
  acc_t value;
  int index;
};

// Same rule as PyTorch's max_pool2d kernels: start at -inf with the first
// element as argmax, take an element when it is strictly greater or NaN. So
// ties go to the first maximum and a NaN always propagates (the last NaN wins).
// Starting from the first element instead of -inf gives the same result.
// Selects rather than branches: on random data the comparisons are coin flips.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline PoolResult<acc_t> max_pool_2x2(scalar_t a, scalar_t b, scalar_t c, scalar_t d) {
  const acc_t v[4] = {static_cast<acc_t>(a), static_cast<acc_t>(b), static_cast<acc_t>(c), static_cast<acc_t>(d)};
  PoolResult<acc_t> r{v[0], 0};
  for (int i = 1; i < 4; ++i) {
    const bool take = (v[i] > r.value) | is_nan(v[i]);
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

}  // namespace math
}  // namespace fastnas
