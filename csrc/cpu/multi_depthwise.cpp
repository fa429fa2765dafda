// multi_depthwise on CPU: J depthwise convolutions of act_j(x) (or of
// act_j((x - mean) * rstd) per candidate), stacked as (J, C, N, Ho, Wo), and
// their backward. act_j is ReLU unless `activations` names another one
// (fastnas_math.h); candidates of several activations read each input plane once
// and write one padded buffer per distinct activation ("slot").
//
// Each task takes one channel (shared x: all J candidates; per-candidate x: one
// (j, c) pair) and a fixed slice of the batch. For every image it writes the
// activation once into a zero-bordered thread-local buffer, so the taps need no
// bounds checks and every inner loop runs over a contiguous output row. With
// stride 2 the buffer keeps even and odd columns apart ("phases"), which turns
// the strided reads into contiguous ones too.
//
// The backward scatters w * grad_out into a second padded buffer (thread-local,
// so no atomics) and reads the input gradient back from its interior; the
// weights' gradient is summed per task into per-tap row accumulators. Tasks
// depend on the shape only, and their partial sums are added in task order, so
// the result does not depend on the thread count and reruns are bit-identical.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "fastnas_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// The build targets baseline x86-64 (SSE2); these clones let the hot loops use
// AVX2 and FMA where the CPU has them, chosen once at load time (fused
// multiply-adds need fp-contract, which strict -std=c++20 turns off).
#define FASTNAS_DW_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), optimize("fp-contract=fast")))
#else
#define FASTNAS_DW_CLONES
#endif

namespace fastnas {
namespace cpu {
namespace {

constexpr const char* kForward = "multi_depthwise";
constexpr const char* kBackward = "multi_depthwise_backward";
// Tasks a backward call aims for: enough to keep every core busy, few enough
// that each one's weight-gradient partial sums stay cheap to add up.
constexpr int64_t kTargetTasks = 64;

int64_t out_size(int64_t size, int64_t stride) { return size == 0 ? 0 : (size - 1) / stride + 1; }

// Tile width in elements: as wide as the rows, up to 32 (four AVX registers of fp32).
constexpr int kTileMax = 32;

// A padded plane: row y, column x lives at y * row + (x % phases) * wq + x / phases.
struct Layout {
  int64_t row, wq, phases;
};

// Shapes and the padded-buffer layout of one call.
struct Geometry {
  int64_t J, C, N, H, W, Ho, Wo, stride;
  bool shared;
  int64_t P;   // the largest padding over candidates
  int64_t Hp;  // rows of the padded buffer
  int64_t Wq;  // columns of one phase of a padded row
  int64_t row() const { return stride * Wq; }
  // Elements of a padded buffer, with the slack the tiled loops may read past its end.
  int64_t size() const { return (Hp + 1) * row() + kTileMax; }
  Layout layout() const { return {row(), Wq, stride}; }
  // Offset of padded position (y, x).
  // Stride is 1 or 2: shifts, as a division per element would dominate the copy loops.
  int64_t at(int64_t y, int64_t x) const { return stride == 1 ? y * row() + x : y * row() + (x & 1) * Wq + (x >> 1); }
};

struct Candidate {
  int64_t k, d, o;  // kernel size, dilation, offset P - p of its window in the padded buffer
};

void check_forward_args(const char* op, const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
                        int64_t stride, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& rstd) {
  TORCH_CHECK(supported_dtype(x.scalar_type()), op, ": x has dtype ", x.scalar_type(),
              "; expected float32, float64, float16 or bfloat16");
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, op,
              ": x must be (N, C, H, W) shared by all candidates or (J, C, N, H, W) per candidate, got shape ",
              x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": the CPU kernel got x on ", x.device());
  const int64_t J = static_cast<int64_t>(weights.size());
  TORCH_CHECK(J >= 1, op, ": weights is empty; it needs at least one candidate");
  TORCH_CHECK(static_cast<int64_t>(dilations.size()) == J, op, ": dilations has ", dilations.size(),
              " entries but weights has ", J);
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  const bool shared = x.dim() == 4;
  const int64_t C = x.size(1);
  if (!shared) {
    TORCH_CHECK(x.size(0) == J, op, ": x has ", x.size(0), " candidates (dim 0) but weights has ", J);
  }
  for (int64_t j = 0; j < J; ++j) {
    const at::Tensor& w = weights[j];
    TORCH_CHECK(w.dim() == 4 && w.size(0) == C && w.size(1) == 1 && w.size(2) == w.size(3), op, ": weights[", j,
                "] must be (", C, ", 1, k, k) for x's ", C, " channels, got shape ", w.sizes());
    TORCH_CHECK(w.size(2) % 2 == 1, op, ": weights[", j, "] has an even kernel size ", w.size(2), "; it must be odd");
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": weights[", j, "] has dtype ", w.scalar_type(),
                " but x has dtype ", x.scalar_type());
    TORCH_CHECK(w.device() == x.device(), op, ": weights[", j, "] is on ", w.device(), " but x is on ", x.device());
    TORCH_CHECK(dilations[j] >= 1, op, ": dilations[", j, "] must be >= 1, got ", dilations[j]);
  }
  TORCH_CHECK(mean.has_value() == rstd.has_value(), op, ": mean and rstd must be given together (got only ",
              mean.has_value() ? "mean" : "rstd", ")");
  if (mean.has_value()) {
    TORCH_CHECK(!shared, op, ": mean/rstd need a per-candidate x of shape (J, C, N, H, W); x is shared, shape ",
                x.sizes());
    for (const auto* t : {&*mean, &*rstd}) {
      const char* name = t == &*mean ? "mean" : "rstd";
      TORCH_CHECK(t->dim() == 2 && t->size(0) == J && t->size(1) == C, op, ": ", name, " must have shape (", J, ", ", C,
                  "), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
      TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
    }
  }
}

Geometry geometry(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations, int64_t stride,
                  std::vector<Candidate>& cands) {
  Geometry g{};
  g.shared = x.dim() == 4;
  g.J = static_cast<int64_t>(weights.size());
  g.C = x.size(1);
  g.N = g.shared ? x.size(0) : x.size(2);
  g.H = x.size(g.shared ? 2 : 3);
  g.W = x.size(g.shared ? 3 : 4);
  g.stride = stride;
  g.Ho = out_size(g.H, stride);
  g.Wo = out_size(g.W, stride);
  g.P = 0;
  for (int64_t j = 0; j < g.J; ++j) g.P = std::max(g.P, dilations[j] * (weights[j].size(2) - 1) / 2);
  cands.clear();
  for (int64_t j = 0; j < g.J; ++j) {
    const int64_t k = weights[j].size(2), d = dilations[j];
    cands.push_back({k, d, g.P - d * (k - 1) / 2});
  }
  g.Hp = g.H + 2 * g.P;
  g.Wq = (g.W + 2 * g.P + stride - 1) / stride + 1;
  return g;
}

// --- the hot loops, on the accumulation type ----------------------------------------
//
// Both work on tiles of kTile consecutive output columns held in registers:
// every tap adds a broadcast weight times a contiguous run of the padded
// buffer, so a tile is loaded and stored once for all k*k taps. Buffers carry
// kTile elements of slack, so the last tile of a row may read past its end;
// those lanes are never stored (correlate) or are multiplied by zeros (tap_dots).

// Where the taps of one candidate read in a padded plane: row u is at
// (r * s + rows[u]) * row, column v at cols[v] past the tile's start.
struct Taps {
  static constexpr int kMaxK = 15;
  int64_t k, kc, s, row;  // k rows by kc columns of taps
  int64_t rows[kMaxK], cols[kMaxK];
};

Taps make_taps(Layout l, int64_t k, int64_t d, int64_t o) {
  TORCH_CHECK(k <= Taps::kMaxK, "multi_depthwise: kernel size ", k, "; at most ", Taps::kMaxK, " is supported");
  Taps t{};
  t.k = k;
  t.kc = k;
  t.s = l.phases;
  t.row = l.row;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t x = i * d + o;
    t.rows[i] = x;
    t.cols[i] = (x % l.phases) * l.wq + x / l.phases;
  }
  return t;
}

// 32-byte vectors (GCC/Clang vector extensions): one AVX register, or two SSE
// registers in the baseline build. Loads and stores go through memcpy, which
// compiles to unaligned vector moves.
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int lanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int lanes = 4;
};

template <typename V>
C10_ALWAYS_INLINE V vload(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
C10_ALWAYS_INLINE void vstore(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// out[r][c] (=, or += when accumulate) sum_{u,v} w[u][v] * src(r * s + u * d + o, c * s + v * d + o);
// out has rows x cols, pitch cols. A tile is NV vectors; K > 0 fixes the kernel size.
template <int NV, int K, typename acc_t>
C10_ALWAYS_INLINE void correlate_impl(const acc_t* __restrict src, const Taps& tp, const acc_t* __restrict w,
                                      int64_t rows, int64_t cols, acc_t* __restrict out, bool accumulate) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes, T = NV * L;
  const int64_t kr = K > 0 ? K : tp.k, kc = K > 0 ? K : tp.kc;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* orow = out + r * cols;
    for (int64_t c0 = 0; c0 < cols; c0 += T) {
      const int64_t len = std::min<int64_t>(T, cols - c0);
      V acc[NV];
      if (accumulate) {
        acc_t tmp[T] = {};
        std::memcpy(tmp, orow + c0, len * sizeof(acc_t));
#pragma GCC unroll 4
        for (int i = 0; i < NV; ++i) acc[i] = vload<V>(tmp + i * L);
      } else {
#pragma GCC unroll 4
        for (int i = 0; i < NV; ++i) acc[i] = V{} + acc_t(0);
      }
#pragma GCC unroll 7
      for (int64_t u = 0; u < kr; ++u) {
        const acc_t* srow = src + (r * tp.s + tp.rows[u]) * tp.row + c0;
#pragma GCC unroll 7
        for (int64_t v = 0; v < kc; ++v) {
          const acc_t* p = srow + tp.cols[v];
          const V wv = V{} + w[u * kc + v];
#pragma GCC unroll 4
          for (int i = 0; i < NV; ++i) acc[i] += wv * vload<V>(p + i * L);
        }
      }
      if (len == T) {
#pragma GCC unroll 4
        for (int i = 0; i < NV; ++i) vstore(orow + c0 + i * L, acc[i]);
      } else {
        acc_t tmp[T];
#pragma GCC unroll 4
        for (int i = 0; i < NV; ++i) vstore(tmp + i * L, acc[i]);
        std::memcpy(orow + c0, tmp, len * sizeof(acc_t));
      }
    }
  }
}

// taps[u * k + v] += sum_{r,c} g[r][c] * src(r * s + u * d + o, c * s + v * d + o); g has pitch
// gpitch (a multiple of the tile) and zeros past the row's end. Lanes are added in a fixed order.
template <int NV, int K, typename acc_t>
C10_ALWAYS_INLINE void tap_dots_impl(const acc_t* __restrict src, const Taps& tp, int64_t rows, int64_t gpitch,
                                     const acc_t* __restrict g, acc_t* __restrict taps) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes, T = NV * L;
  const int64_t k = K > 0 ? K : tp.k;
  for (int64_t u = 0; u < k; ++u) {
    for (int64_t v = 0; v < k; ++v) {
      V acc[NV];
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i) acc[i] = V{} + acc_t(0);
      const acc_t* base = src + tp.rows[u] * tp.row + tp.cols[v];
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t* p = base + r * tp.s * tp.row;
        const acc_t* grow = g + r * gpitch;
        for (int64_t c0 = 0; c0 < gpitch; c0 += T) {
#pragma GCC unroll 4
          for (int i = 0; i < NV; ++i) acc[i] += vload<V>(grow + c0 + i * L) * vload<V>(p + c0 + i * L);
        }
      }
      acc_t lanes[T];
#pragma GCC unroll 4
      for (int i = 0; i < NV; ++i) vstore(lanes + i * L, acc[i]);
      acc_t sum = taps[u * k + v];
      for (int t = 0; t < T; ++t) sum += lanes[t];
      taps[u * k + v] = sum;
    }
  }
}

// Vectors per tile: as wide as the rows, up to four.
template <typename acc_t>
inline int vectors_for(int64_t cols) {
  constexpr int L = Vec<acc_t>::lanes;
  return cols > 2 * L ? 4 : (cols > L ? 2 : 1);
}

#define FASTNAS_DW_BY_K(NV, CALL)     \
  switch (tp.k == tp.kc ? tp.k : 0) { \
    case 3:                           \
      return CALL(NV, 3);             \
    case 5:                           \
      return CALL(NV, 5);             \
    case 7:                           \
      return CALL(NV, 7);             \
    default:                          \
      return CALL(NV, 0);             \
  }
#define FASTNAS_DW_BY_TILE(CALL)      \
  switch (vectors_for<acc_t>(cols)) { \
    case 4:                           \
      FASTNAS_DW_BY_K(4, CALL)        \
    case 2:                           \
      FASTNAS_DW_BY_K(2, CALL)        \
    default:                          \
      FASTNAS_DW_BY_K(1, CALL)        \
  }

template <typename acc_t>
C10_ALWAYS_INLINE void correlate_any(const acc_t* src, const Taps& tp, const acc_t* w, int64_t rows, int64_t cols,
                                     acc_t* out, bool accumulate) {
#define FASTNAS_DW_CALL(NV, K) correlate_impl<NV, K>(src, tp, w, rows, cols, out, accumulate)
  FASTNAS_DW_BY_TILE(FASTNAS_DW_CALL)
#undef FASTNAS_DW_CALL
}

// The row pitch of a gradient plane handed to tap_dots.
template <typename acc_t>
inline int64_t grad_pitch(int64_t cols) {
  const int64_t tile = vectors_for<acc_t>(cols) * Vec<acc_t>::lanes;
  return (cols + tile - 1) / tile * tile;
}

template <typename acc_t>
C10_ALWAYS_INLINE void tap_dots_any(const acc_t* src, const Taps& tp, int64_t rows, int64_t cols, const acc_t* g,
                                    acc_t* taps) {
  const int64_t gpitch = grad_pitch<acc_t>(cols);
#define FASTNAS_DW_CALL(NV, K) tap_dots_impl<NV, K>(src, tp, rows, gpitch, g, taps)
  FASTNAS_DW_BY_TILE(FASTNAS_DW_CALL)
#undef FASTNAS_DW_CALL
}

FASTNAS_DW_CLONES void correlate(const float* src, const Taps& tp, const float* w, int64_t rows, int64_t cols,
                                 float* out, bool accumulate) {
  correlate_any(src, tp, w, rows, cols, out, accumulate);
}
FASTNAS_DW_CLONES void correlate(const double* src, const Taps& tp, const double* w, int64_t rows, int64_t cols,
                                 double* out, bool accumulate) {
  correlate_any(src, tp, w, rows, cols, out, accumulate);
}
FASTNAS_DW_CLONES void tap_dots(const float* src, const Taps& tp, int64_t rows, int64_t cols, const float* g,
                                float* taps) {
  tap_dots_any(src, tp, rows, cols, g, taps);
}
FASTNAS_DW_CLONES void tap_dots(const double* src, const Taps& tp, int64_t rows, int64_t cols, const double* g,
                                double* taps) {
  tap_dots_any(src, tp, rows, cols, g, taps);
}

// Writes relu(pre) of one (H, W) input plane into the padded buffer's interior,
// pre = x or (x - mean) * rstd.
template <typename scalar_t, typename acc_t>
void fill_activation(const Geometry& g, const scalar_t* src, bool bn, acc_t mean, acc_t rstd, acc_t* pad) {
  for (int64_t h = 0; h < g.H; ++h) {
    const scalar_t* srow = src + h * g.W;
    acc_t* prow = pad + (h + g.P) * g.row();
    if (g.stride == 1) {
      for (int64_t w = 0; w < g.W; ++w) {
        acc_t v = static_cast<acc_t>(srow[w]);
        if (bn) v = (v - mean) * rstd;
        prow[w + g.P] = v > acc_t(0) ? v : acc_t(0);
      }
    } else {
      // Even and odd padded columns in turn, each a contiguous run of its phase.
      for (int64_t phase = 0; phase < 2; ++phase) {
        const int64_t w0 = (phase + g.P) & 1;  // the first w with (w + P) % 2 == phase
        acc_t* dst = prow + phase * g.Wq + ((w0 + g.P) >> 1);
        const int64_t count = g.W > w0 ? (g.W - w0 + 1) / 2 : 0;
        for (int64_t i = 0; i < count; ++i) {
          acc_t v = static_cast<acc_t>(srow[w0 + 2 * i]);
          if (bn) v = (v - mean) * rstd;
          dst[i] = v > acc_t(0) ? v : acc_t(0);
        }
      }
    }
  }
}

// The distinct activations of a call's candidates, one padded buffer ("slot") each.
struct ActivationSlots {
  std::vector<int> codes;      // activation code of each slot
  std::vector<int64_t> of;     // slot of each candidate
  std::vector<int64_t> first;  // first candidate of each slot
  bool relu_only() const { return codes.size() == 1 && codes[0] == math::kRelu; }
};

ActivationSlots activation_slots(const char* op, at::IntArrayRef activations, int64_t J) {
  TORCH_CHECK(activations.empty() || static_cast<int64_t>(activations.size()) == J, op, ": activations has ",
              activations.size(), " entries but weights has ", J);
  ActivationSlots slots;
  for (int64_t j = 0; j < J; ++j) {
    const int64_t code = activations.empty() ? math::kRelu : activations[j];
    TORCH_CHECK(code >= 0 && code < math::kNumActivations, op, ": activations[", j, "] is ", code,
                "; activation codes run from 0 to ", math::kNumActivations - 1);
    const auto it = std::find(slots.codes.begin(), slots.codes.end(), static_cast<int>(code));
    if (it == slots.codes.end()) {
      slots.of.push_back(static_cast<int64_t>(slots.codes.size()));
      slots.first.push_back(j);
      slots.codes.push_back(static_cast<int>(code));
    } else {
      slots.of.push_back(it - slots.codes.begin());
    }
  }
  return slots;
}

// Writes act_s(pre) of one (H, W) input plane into the interior of the padded buffer
// of each slot s in [s0, s1), reading the plane once, pre = x or (x - mean) * rstd.
template <typename scalar_t, typename acc_t>
void fill_activations(const Geometry& g, const scalar_t* src, bool bn, acc_t mean, acc_t rstd,
                      const ActivationSlots& slots, int64_t s0, int64_t s1, acc_t* pads) {
  if (slots.relu_only()) return fill_activation<scalar_t, acc_t>(g, src, bn, mean, rstd, pads);
  const int64_t size = g.size();
  for (int64_t h = 0; h < g.H; ++h) {
    const scalar_t* srow = src + h * g.W;
    for (int64_t w = 0; w < g.W; ++w) {
      acc_t v = static_cast<acc_t>(srow[w]);
      if (bn) v = (v - mean) * rstd;
      const int64_t at = g.at(h + g.P, w + g.P);
      for (int64_t s = s0; s < s1; ++s) pads[s * size + at] = math::activation_forward(slots.codes[s], v);
    }
  }
}

// Per-candidate weights in the accumulation type, contiguous.
std::vector<at::Tensor> weights_in(at::TensorList weights, at::ScalarType acc) {
  std::vector<at::Tensor> out;
  for (const auto& w : weights) out.push_back(w.to(acc).contiguous());
  return out;
}

// --- forward -------------------------------------------------------------------------

at::Tensor multi_depthwise(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef dilations, int64_t stride,
                           const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& rstd,
                           at::IntArrayRef activations) {
  check_forward_args(kForward, x_in, weights, dilations, stride, mean, rstd);
  const ActivationSlots slots = activation_slots(kForward, activations, static_cast<int64_t>(weights.size()));
  const int64_t num_slots = static_cast<int64_t>(slots.codes.size());
  std::vector<Candidate> cands;
  const Geometry g = geometry(x_in, weights, dilations, stride, cands);
  at::Tensor out = at::empty({g.J, g.C, g.N, g.Ho, g.Wo}, x_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous();
  const auto dtype = x.scalar_type();
  const auto acc_dtype = accumulate_dtype(dtype);
  const auto ws = weights_in(weights, acc_dtype);
  const bool bn = mean.has_value();
  const at::Tensor mean_acc = bn ? mean->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor rstd_acc = bn ? rstd->to(acc_dtype).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_depthwise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
    std::vector<const acc_t*> wp;
    for (const auto& w : ws) wp.push_back(w.data_ptr<acc_t>());
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* mp = bn ? mean_acc.data_ptr<acc_t>() : nullptr;
    const acc_t* rp = bn ? rstd_acc.data_ptr<acc_t>() : nullptr;
    const int64_t in_plane = g.H * g.W, out_plane = g.Ho * g.Wo;
    std::vector<Taps> taps;
    for (const auto& cd : cands) taps.push_back(make_taps(g.layout(), cd.k, cd.d, cd.o));
    // Shared x: a task is one (c, n) for all J; per candidate: one (j, c, n).
    const int64_t groups = g.shared ? g.C : g.J * g.C;
    at::parallel_for(0, groups * g.N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> pad(num_slots * g.size(), acc_t(0));
      std::vector<acc_t> tmp(direct ? 0 : out_plane);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task % g.N, group = task / g.N;
        const int64_t c = g.shared ? group : group % g.C;
        const int64_t j0 = g.shared ? 0 : group / g.C, j1 = g.shared ? g.J : j0 + 1;
        const int64_t s0 = g.shared ? 0 : slots.of[j0], s1 = g.shared ? num_slots : s0 + 1;
        const scalar_t* src = g.shared ? xp + (n * g.C + c) * in_plane : xp + (group * g.N + n) * in_plane;
        fill_activations<scalar_t, acc_t>(g, src, bn, bn ? mp[group] : acc_t(0), bn ? rp[group] : acc_t(1), slots, s0,
                                          s1, pad.data());
        for (int64_t j = j0; j < j1; ++j) {
          const Candidate& cd = cands[j];
          scalar_t* dst = op + ((j * g.C + c) * g.N + n) * out_plane;
          acc_t* acc = nullptr;
          if constexpr (direct) {
            acc = reinterpret_cast<acc_t*>(dst);  // the same type here
          } else {
            acc = tmp.data();
          }
          correlate(pad.data() + slots.of[j] * g.size(), taps[j], wp[j] + c * cd.k * cd.k, g.Ho, g.Wo, acc, false);
          if constexpr (!direct) {
            for (int64_t i = 0; i < out_plane; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
          }
        }
      }
    });
  });
  return out;
}

// --- backward ------------------------------------------------------------------------

std::tuple<at::Tensor, std::vector<at::Tensor>> multi_depthwise_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef dilations,
    int64_t stride, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& rstd, bool input_need_grad,
    at::IntArrayRef activations) {
  check_forward_args(kBackward, x_in, weights, dilations, stride, mean, rstd);
  const ActivationSlots slots = activation_slots(kBackward, activations, static_cast<int64_t>(weights.size()));
  const int64_t num_slots = static_cast<int64_t>(slots.codes.size());
  std::vector<Candidate> cands;
  const Geometry g = geometry(x_in, weights, dilations, stride, cands);
  const std::vector<int64_t> out_shape{g.J, g.C, g.N, g.Ho, g.Wo};
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef(out_shape), kBackward, ": grad_out has shape ",
              grad_out_in.sizes(), "; expected ", at::IntArrayRef(out_shape));
  TORCH_CHECK(grad_out_in.scalar_type() == x_in.scalar_type(), kBackward, ": grad_out has dtype ",
              grad_out_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  TORCH_CHECK(grad_out_in.device() == x_in.device(), kBackward, ": grad_out is on ", grad_out_in.device(),
              " but x is on ", x_in.device());

  const auto dtype = x_in.scalar_type();
  const auto acc_dtype = accumulate_dtype(dtype);
  at::Tensor grad_pre = input_need_grad
                            ? at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous))
                            : at::empty({0}, x_in.options());
  const int64_t groups = g.shared ? g.C : g.J * g.C;
  // A fixed split of the batch, from the shape alone: the weights' gradient
  // then sums the same partials in the same order on any number of threads.
  const int64_t chunks =
      g.N == 0 ? 1 : std::min(g.N, std::max<int64_t>(1, kTargetTasks / std::max<int64_t>(1, groups)));
  const int64_t per_chunk = g.N == 0 ? 0 : (g.N + chunks - 1) / chunks;
  // partial[task][j][c-free taps]: each task owns the taps of its candidates for its channel.
  std::vector<int64_t> tap_offset(g.J + 1, 0);
  for (int64_t j = 0; j < g.J; ++j) tap_offset[j + 1] = tap_offset[j] + cands[j].k * cands[j].k;
  const int64_t taps_all = tap_offset[g.J];
  at::Tensor partials = at::zeros({groups, chunks, taps_all}, x_in.options().dtype(acc_dtype));
  at::Tensor summed = at::zeros({groups, taps_all}, x_in.options().dtype(acc_dtype));

  if (g.N > 0 && g.C > 0 && g.Ho > 0 && g.Wo > 0) {
    const at::Tensor x = x_in.contiguous();
    const at::Tensor go = grad_out_in.contiguous();
    std::vector<at::Tensor> wflip;
    for (const auto& w : weights) wflip.push_back(w.to(acc_dtype).flip({2, 3}).contiguous());
    const bool bn = mean.has_value();
    const at::Tensor mean_acc = bn ? mean->to(acc_dtype).contiguous() : at::Tensor();
    const at::Tensor rstd_acc = bn ? rstd->to(acc_dtype).contiguous() : at::Tensor();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_depthwise_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<const acc_t*> wfp;
      for (const auto& w : wflip) wfp.push_back(w.data_ptr<acc_t>());
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = go.data_ptr<scalar_t>();
      scalar_t* gxp = input_need_grad ? grad_pre.data_ptr<scalar_t>() : nullptr;
      acc_t* pp = partials.data_ptr<acc_t>();
      const acc_t* mp = bn ? mean_acc.data_ptr<acc_t>() : nullptr;
      const acc_t* rp = bn ? rstd_acc.data_ptr<acc_t>() : nullptr;
      const int64_t in_plane = g.H * g.W, out_plane = g.Ho * g.Wo;

      // The input gradient in gather form: the output gradient spread on the
      // stride grid of a zero buffer, correlated with the flipped kernel.
      const Layout gl{g.W + 2 * g.P, g.W + 2 * g.P, 1};
      const int64_t gpitch = grad_pitch<acc_t>(g.Wo);
      std::vector<Taps> fwd_taps, grad_taps;
      for (const auto& cd : cands) {
        fwd_taps.push_back(make_taps(g.layout(), cd.k, cd.d, cd.o));
        grad_taps.push_back(make_taps(gl, cd.k, cd.d, cd.o));
      }
      // Stride 2: the zero grid would waste three taps in four, so the input
      // gradient is computed per (row, column) parity phase instead, each phase
      // a dense correlation of the compact output gradient with the taps whose
      // output lands on the grid. Those sub-kernels depend on the candidate only.
      const int64_t Q = (g.P + 1) / 2 + 1;
      const Layout cl{g.Wo + 2 * Q, g.Wo + 2 * Q, 1};
      struct Phase {
        Taps taps;
        std::vector<int64_t> us, vs;
        int64_t rows, cols;
      };
      std::vector<Phase> phases;  // [j * 4 + qh * 2 + qw]
      if (g.stride == 2) {
        for (const auto& cd : cands) {
          const int64_t p = g.P - cd.o;
          for (int64_t q = 0; q < 4; ++q) {
            const int64_t qh = q / 2, qw = q % 2;
            Phase ph{};
            for (int64_t u = 0; u < cd.k; ++u) {
              if (((qh + u * cd.d - p) % 2 + 2) % 2 == 0) ph.us.push_back(u);
              if (((qw + u * cd.d - p) % 2 + 2) % 2 == 0) ph.vs.push_back(u);
            }
            ph.taps.k = static_cast<int64_t>(ph.us.size());
            ph.taps.kc = static_cast<int64_t>(ph.vs.size());
            ph.taps.s = 1;
            ph.taps.row = cl.row;
            for (size_t i = 0; i < ph.us.size(); ++i) ph.taps.rows[i] = (qh + ph.us[i] * cd.d - p) / 2 + Q;
            for (size_t i = 0; i < ph.vs.size(); ++i) ph.taps.cols[i] = (qw + ph.vs[i] * cd.d - p) / 2 + Q;
            ph.rows = (g.H - qh + 1) / 2;
            ph.cols = (g.W - qw + 1) / 2;
            phases.push_back(std::move(ph));
          }
        }
      }
      const int64_t phase_cols0 = (g.W + 1) / 2, phase_cols1 = g.W / 2;
      const int64_t phase_size = ((g.H + 1) / 2) * phase_cols0;
      at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
        // Per activation slot: the padded activation, and the input gradient before its derivative.
        std::vector<acc_t> pad(num_slots * g.size(), acc_t(0));
        const bool phased = input_need_grad && g.stride == 2;
        std::vector<acc_t> gc(phased ? (g.Ho + 2 * Q + 1) * cl.row + kTileMax : 0, acc_t(0));
        std::vector<acc_t> gq(phased ? num_slots * 4 * phase_size : 0);
        std::vector<acc_t> wsub(Taps::kMaxK * Taps::kMaxK);
        std::vector<acc_t> gz(input_need_grad && !phased ? (g.Hp + 1) * gl.row + kTileMax : 0, acc_t(0));
        std::vector<acc_t> ga(input_need_grad && !phased ? num_slots * in_plane : 0);
        std::vector<acc_t> grad(g.Ho * gpitch, acc_t(0));  // zeros past Wo stay zero
        std::vector<acc_t> taps(taps_all);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t group = task / chunks, chunk = task % chunks;
          const int64_t c = g.shared ? group : group % g.C;
          const int64_t j0 = g.shared ? 0 : group / g.C, j1 = g.shared ? g.J : j0 + 1;
          const int64_t s0 = g.shared ? 0 : slots.of[j0], s1 = g.shared ? num_slots : s0 + 1;
          const acc_t m = bn ? mp[group] : acc_t(0), r = bn ? rp[group] : acc_t(1);
          std::fill(taps.begin(), taps.end(), acc_t(0));
          const int64_t n_end = std::min(g.N, (chunk + 1) * per_chunk);
          for (int64_t n = chunk * per_chunk; n < n_end; ++n) {
            const int64_t in_index = g.shared ? (n * g.C + c) : (group * g.N + n);
            fill_activations<scalar_t, acc_t>(g, xp + in_index * in_plane, bn, m, r, slots, s0, s1, pad.data());
            if (phased) std::fill(gq.begin(), gq.end(), acc_t(0));
            for (int64_t j = j0; j < j1; ++j) {
              const Candidate& cd = cands[j];
              const int64_t slot = slots.of[j];
              const scalar_t* gsrc = gp + ((j * g.C + c) * g.N + n) * out_plane;
              for (int64_t ho = 0; ho < g.Ho; ++ho) {
                for (int64_t wo = 0; wo < g.Wo; ++wo) grad[ho * gpitch + wo] = static_cast<acc_t>(gsrc[ho * g.Wo + wo]);
              }
              tap_dots(pad.data() + slot * g.size(), fwd_taps[j], g.Ho, g.Wo, grad.data(), taps.data() + tap_offset[j]);
              if (phased) {
                for (int64_t ho = 0; ho < g.Ho; ++ho) {
                  std::copy(grad.data() + ho * gpitch, grad.data() + ho * gpitch + g.Wo,
                            gc.data() + (ho + Q) * cl.row + Q);
                }
                const acc_t* wf = wfp[j] + c * cd.k * cd.k;
                for (int64_t q = 0; q < 4; ++q) {
                  const Phase& ph = phases[j * 4 + q];
                  if (ph.us.empty() || ph.vs.empty() || ph.rows == 0 || ph.cols == 0) continue;
                  for (size_t i = 0; i < ph.us.size(); ++i) {
                    for (size_t l = 0; l < ph.vs.size(); ++l)
                      wsub[i * ph.vs.size() + l] = wf[ph.us[i] * cd.k + ph.vs[l]];
                  }
                  correlate(gc.data(), ph.taps, wsub.data(), ph.rows, ph.cols, gq.data() + (slot * 4 + q) * phase_size,
                            true);
                }
              } else if (input_need_grad) {
                for (int64_t ho = 0; ho < g.Ho; ++ho) {
                  acc_t* zrow = gz.data() + (ho * g.stride + g.P) * gl.row + g.P;
                  for (int64_t wo = 0; wo < g.Wo; ++wo) zrow[wo * g.stride] = grad[ho * gpitch + wo];
                }
                // The first candidate of a slot writes its buffer, the others add to it.
                const bool accumulate = g.shared && j > slots.first[slot];
                correlate(gz.data(), grad_taps[j], wfp[j] + c * cd.k * cd.k, g.H, g.W, ga.data() + slot * in_plane,
                          accumulate);
              }
            }
            if (input_need_grad && !slots.relu_only()) {
              // Each slot's gradient times its activation's derivative at pre, summed over the slots.
              scalar_t* dst = gxp + in_index * in_plane;
              const scalar_t* src = xp + in_index * in_plane;
              for (int64_t h = 0; h < g.H; ++h) {
                for (int64_t w = 0; w < g.W; ++w) {
                  acc_t pre = static_cast<acc_t>(src[h * g.W + w]);
                  if (bn) pre = (pre - m) * r;
                  const int64_t q = (h & 1) * 2 + (w & 1);
                  const int64_t pc = (w & 1) ? phase_cols1 : phase_cols0;
                  acc_t sum = acc_t(0);
                  for (int64_t sl = s0; sl < s1; ++sl) {
                    const acc_t v = phased ? gq[(sl * 4 + q) * phase_size + (h >> 1) * pc + (w >> 1)]
                                           : ga[sl * in_plane + h * g.W + w];
                    sum += math::activation_derivative(slots.codes[sl], pre) * v;
                  }
                  dst[h * g.W + w] = static_cast<scalar_t>(sum);
                }
              }
            } else if (input_need_grad) {
              // The gradient passes the ReLU where pre > 0, i.e. where the activation is positive.
              scalar_t* dst = gxp + in_index * in_plane;
              for (int64_t h = 0; h < g.H && phased; ++h) {
                for (int64_t w = 0; w < g.W; ++w) {
                  const acc_t a = pad[g.at(h + g.P, w + g.P)];
                  const int64_t q = (h & 1) * 2 + (w & 1);
                  const int64_t pc = (w & 1) ? phase_cols1 : phase_cols0;
                  const acc_t v = gq[q * phase_size + (h >> 1) * pc + (w >> 1)];
                  dst[h * g.W + w] = static_cast<scalar_t>(a > acc_t(0) ? v : acc_t(0));
                }
              }
              for (int64_t h = 0; h < g.H && !phased; ++h) {
                for (int64_t w = 0; w < g.W; ++w) {
                  const acc_t a = pad[g.at(h + g.P, w + g.P)];
                  dst[h * g.W + w] = static_cast<scalar_t>(a > acc_t(0) ? ga[h * g.W + w] : acc_t(0));
                }
              }
            }
          }
          std::copy(taps.begin(), taps.end(), pp + task * taps_all);
        }
      });
      // Second stage, in a fixed order: the sum over the batch chunks.
      acc_t* sp = summed.data_ptr<acc_t>();
      for (int64_t group = 0; group < groups; ++group) {
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const acc_t* part = pp + (group * chunks + chunk) * taps_all;
          for (int64_t t = 0; t < taps_all; ++t) sp[group * taps_all + t] += part[t];
        }
      }
    });
  }

  std::vector<at::Tensor> grad_ws;
  for (int64_t j = 0; j < g.J; ++j) {
    const int64_t k = cands[j].k;
    at::Tensor rows = g.shared ? summed.narrow(1, tap_offset[j], k * k)
                               : summed.narrow(0, j * g.C, g.C).narrow(1, tap_offset[j], k * k);
    grad_ws.push_back(rows.reshape({g.C, 1, k, k}).to(weights[j].scalar_type()).contiguous());
  }
  return {grad_pre, grad_ws};
}

}  // namespace
}  // namespace cpu
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("multi_depthwise", &fastnas::cpu::multi_depthwise);
  m.impl("multi_depthwise_backward", &fastnas::cpu::multi_depthwise_backward);
}
