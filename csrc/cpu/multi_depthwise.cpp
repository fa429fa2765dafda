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
#include <utility>
#include <vector>

#include "checks.h"
#include "fastnas_math.h"
#include "host/multi_depthwise.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
// The build targets baseline x86-64 (SSE2); these clones let the hot loops use
// AVX2 and FMA where the CPU has them, chosen once at load time (fused
// multiply-adds need fp-contract, which the build turns off elsewhere; the
// other CPU kernels' clones, FASTNAS_CPU_CLONES in cpu/loops.h, keep it off).
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

// Tile width in elements: as wide as the rows, up to 32 (four AVX registers of fp32).
constexpr int kTileMax = 32;

// A padded plane: row y, column x lives at y * row + (x % phases) * wq + x / phases.
struct Layout {
  int64_t row, wq, phases;
};

// The padded-buffer layout of one call, on top of its shape.
struct Geometry : DepthwiseShape {
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

Geometry geometry(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations, int64_t stride,
                  std::vector<Candidate>& cands) {
  Geometry g{};
  static_cast<DepthwiseShape&>(g) = depthwise_shape(x, weights, stride);
  const std::vector<DepthwiseCandidate> dc = depthwise_candidates(weights, dilations);
  g.P = 0;
  for (const auto& cd : dc) g.P = std::max(g.P, cd.pad);
  cands.clear();
  for (const auto& cd : dc) cands.push_back({cd.k, cd.d, g.P - cd.pad});
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
  static constexpr int kMaxK = kMaxDepthwiseKernel;
  int64_t k, kc, s, row;  // k rows by kc columns of taps
  int64_t rows[kMaxK], cols[kMaxK];
};

Taps make_taps(Layout l, int64_t k, int64_t d, int64_t o) {
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
        prow[w + g.P] = math::depthwise_activation(static_cast<acc_t>(srow[w]), bn, mean, rstd);
      }
    } else {
      // Even and odd padded columns in turn, each a contiguous run of its phase.
      for (int64_t phase = 0; phase < 2; ++phase) {
        const int64_t w0 = (phase + g.P) & 1;  // the first w with (w + P) % 2 == phase
        acc_t* dst = prow + phase * g.Wq + ((w0 + g.P) >> 1);
        const int64_t count = g.W > w0 ? (g.W - w0 + 1) / 2 : 0;
        for (int64_t i = 0; i < count; ++i) {
          dst[i] = math::depthwise_activation(static_cast<acc_t>(srow[w0 + 2 * i]), bn, mean, rstd);
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
  int64_t count() const { return static_cast<int64_t>(codes.size()); }
  bool relu_only() const { return codes.size() == 1 && codes[0] == math::kRelu; }
};

ActivationSlots activation_slots(const char* op, at::IntArrayRef activations, int64_t J) {
  TORCH_CHECK_VALUE(activations.empty() || static_cast<int64_t>(activations.size()) == J, op, ": activations has ",
                    activations.size(), " entries but weights has ", J);
  ActivationSlots slots;
  for (int64_t j = 0; j < J; ++j) {
    const int64_t code = activations.empty() ? math::kRelu : activations[j];
    TORCH_CHECK_VALUE(code >= 0 && code < math::kNumActivations, op, ": activations[", j, "] is ", code,
                      "; activation codes run from 0 to ", math::kNumActivations - 1);
    const auto it = std::find(slots.codes.begin(), slots.codes.end(), static_cast<int>(code));
    if (it == slots.codes.end()) {
      slots.of.push_back(slots.count());
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

// --- forward -------------------------------------------------------------------------

at::Tensor multi_depthwise(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef dilations, int64_t stride,
                           const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& rstd,
                           at::IntArrayRef activations) {
  check_multi_depthwise(kForward, x_in, weights, dilations, stride, mean, rstd, at::kCPU);
  const ActivationSlots slots = activation_slots(kForward, activations, static_cast<int64_t>(weights.size()));
  std::vector<Candidate> cands;
  const Geometry g = geometry(x_in, weights, dilations, stride, cands);
  at::Tensor out = at::empty({g.J, g.C, g.N, g.Ho, g.Wo}, x_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = x_in.contiguous();
  const auto dtype = x.scalar_type();
  const auto ws = for_accumulation_all(weights, dtype);
  const bool bn = mean.has_value();
  const at::Tensor mean_acc = bn ? for_accumulation(*mean, dtype) : at::Tensor();
  const at::Tensor rstd_acc = bn ? for_accumulation(*rstd, dtype) : at::Tensor();

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
      std::vector<acc_t> pad(slots.count() * g.size(), acc_t(0));
      std::vector<acc_t> tmp(direct ? 0 : out_plane);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task % g.N, group = task / g.N;
        const int64_t c = g.shared ? group : group % g.C;
        const int64_t j0 = g.shared ? 0 : group / g.C, j1 = g.shared ? g.J : j0 + 1;
        const int64_t s0 = g.shared ? 0 : slots.of[j0], s1 = g.shared ? slots.count() : s0 + 1;
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
//
// One task is a group (a channel c with its J candidates, or one (j, c) pair)
// and a fixed slice of the batch (split_batch). For every image it writes the
// activation into the padded buffer, then per candidate adds the weights'
// gradient (tap_dots) and the input gradient (a correlation of the output
// gradient with the flipped kernel: input_grad_dense at stride 1,
// input_grad_phased at stride 2), and finally stores the input gradient where
// the activation is positive (store_input_grad). The tasks' weight-gradient
// partials are summed in task order (sum_over_chunks).

// A fixed split of the batch, from the shape alone: the weights' gradient then
// sums the same partials in the same order on any number of threads.
struct BatchSplit {
  int64_t chunks, per_chunk;
};

BatchSplit split_batch(const Geometry& g) {
  const int64_t groups = g.groups();
  const int64_t chunks =
      g.N == 0 ? 1 : std::min(g.N, std::max<int64_t>(1, kTargetTasks / std::max<int64_t>(1, groups)));
  return {chunks, g.N == 0 ? 0 : (g.N + chunks - 1) / chunks};
}

// Stride 2: the zero grid would waste three taps in four, so the input
// gradient is computed per (row, column) parity phase instead, each phase a
// dense correlation of the compact output gradient (padded by Q) with the taps
// whose output lands on the grid. Those sub-kernels depend on the candidate only.
struct Phase {
  Taps taps;
  std::vector<int64_t> us, vs;
  int64_t rows, cols;
};

std::vector<Phase> stride_two_phases(const Geometry& g, const std::vector<Candidate>& cands, int64_t Q, Layout cl) {
  std::vector<Phase> phases;  // [j * 4 + qh * 2 + qw]
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
  return phases;
}

// Everything a backward task reads, fixed for the call.
template <typename scalar_t, typename acc_t>
struct BackwardPlan {
  const Geometry& g;
  const std::vector<Candidate>& cands;
  const ActivationSlots& slots;
  BatchSplit split;
  std::vector<int64_t> tap_offset;  // tap_offsets(...): candidate j's taps in a task's row of partials
  int64_t taps_all;
  bool input_need_grad, bn, phased;
  // The data, in acc_t where the kernels compute in it; flipped kernels for the input gradient.
  const scalar_t *x, *grad_out;
  std::vector<const acc_t*> wflip;
  const acc_t *mean, *rstd;
  scalar_t* grad_pre;
  // Tap layouts: the activation buffer (forward taps), the stride-1 gradient
  // buffer (grad taps), the compact stride-2 gradient buffer and its phases.
  std::vector<Taps> fwd_taps, grad_taps;
  Layout gl, cl;
  int64_t gpitch, Q;
  std::vector<Phase> phases;
  int64_t phase_cols0, phase_cols1, phase_size;

  BackwardPlan(const Geometry& geo, const std::vector<Candidate>& cs, const ActivationSlots& sl,
               std::vector<int64_t> offsets, bool need_in)
      : g(geo),
        cands(cs),
        slots(sl),
        split(split_batch(geo)),
        tap_offset(std::move(offsets)),
        input_need_grad(need_in) {
    taps_all = tap_offset.back();
    phased = input_need_grad && g.stride == 2;
    gl = Layout{g.W + 2 * g.P, g.W + 2 * g.P, 1};
    gpitch = grad_pitch<acc_t>(g.Wo);
    for (const auto& cd : cands) {
      fwd_taps.push_back(make_taps(g.layout(), cd.k, cd.d, cd.o));
      grad_taps.push_back(make_taps(gl, cd.k, cd.d, cd.o));
    }
    Q = (g.P + 1) / 2 + 1;
    cl = Layout{g.Wo + 2 * Q, g.Wo + 2 * Q, 1};
    if (g.stride == 2) phases = stride_two_phases(g, cands, Q, cl);
    phase_cols0 = (g.W + 1) / 2;
    phase_cols1 = g.W / 2;
    phase_size = ((g.H + 1) / 2) * phase_cols0;
  }
};

// One thread's buffers.
template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> pad;           // the activation, padded (Geometry), one buffer per activation slot
  std::vector<acc_t> grad;          // one output-gradient plane, rows of gpitch, zeros past Wo
  std::vector<acc_t> taps;          // the task's weight-gradient sums
  std::vector<acc_t> gc, gq, wsub;  // stride 2: compact padded gradient, the four phases' sums, a sub-kernel
  std::vector<acc_t> gz, ga;        // stride 1: the gradient on the padded grid, the input-gradient sums
  // (gq and ga hold one sum per activation slot: each is multiplied by its activation's derivative)

  template <typename scalar_t>
  explicit BackwardScratch(const BackwardPlan<scalar_t, acc_t>& pl)
      : pad(pl.slots.count() * pl.g.size(), acc_t(0)),
        grad(pl.g.Ho * pl.gpitch, acc_t(0)),
        taps(pl.taps_all),
        gc(pl.phased ? (pl.g.Ho + 2 * pl.Q + 1) * pl.cl.row + kTileMax : 0, acc_t(0)),
        gq(pl.phased ? pl.slots.count() * 4 * pl.phase_size : 0),
        wsub(Taps::kMaxK * Taps::kMaxK),
        gz(pl.input_need_grad && !pl.phased ? (pl.g.Hp + 1) * pl.gl.row + kTileMax : 0, acc_t(0)),
        ga(pl.input_need_grad && !pl.phased ? pl.slots.count() * pl.g.in_plane() : 0) {}
};

// One output-gradient plane into the scratch's pitched buffer, in acc_t.
template <typename scalar_t, typename acc_t>
void load_grad_plane(const BackwardPlan<scalar_t, acc_t>& pl, const scalar_t* gsrc, BackwardScratch<acc_t>& sc) {
  for (int64_t ho = 0; ho < pl.g.Ho; ++ho) {
    for (int64_t wo = 0; wo < pl.g.Wo; ++wo) sc.grad[ho * pl.gpitch + wo] = static_cast<acc_t>(gsrc[ho * pl.g.Wo + wo]);
  }
}

// Stride 2: adds candidate j's input gradient to the four phase sums.
template <typename scalar_t, typename acc_t>
void input_grad_phased(const BackwardPlan<scalar_t, acc_t>& pl, int64_t j, int64_t c, BackwardScratch<acc_t>& sc) {
  const Geometry& g = pl.g;
  const Candidate& cd = pl.cands[j];
  for (int64_t ho = 0; ho < g.Ho; ++ho) {
    std::copy(sc.grad.data() + ho * pl.gpitch, sc.grad.data() + ho * pl.gpitch + g.Wo,
              sc.gc.data() + (ho + pl.Q) * pl.cl.row + pl.Q);
  }
  const acc_t* wf = pl.wflip[j] + c * cd.k * cd.k;
  for (int64_t q = 0; q < 4; ++q) {
    const Phase& ph = pl.phases[j * 4 + q];
    if (ph.us.empty() || ph.vs.empty() || ph.rows == 0 || ph.cols == 0) continue;
    for (size_t i = 0; i < ph.us.size(); ++i) {
      for (size_t l = 0; l < ph.vs.size(); ++l) sc.wsub[i * ph.vs.size() + l] = wf[ph.us[i] * cd.k + ph.vs[l]];
    }
    const int64_t sum = (pl.slots.of[j] * 4 + q) * pl.phase_size;
    correlate(sc.gc.data(), ph.taps, sc.wsub.data(), ph.rows, ph.cols, sc.gq.data() + sum, true);
  }
}

// Stride 1: candidate j's input gradient, the output gradient on the padded
// grid correlated with the flipped kernel; the first candidate of the task in
// each activation slot writes the slot's sum, the others add to it.
template <typename scalar_t, typename acc_t>
void input_grad_dense(const BackwardPlan<scalar_t, acc_t>& pl, int64_t j, int64_t c, bool first,
                      BackwardScratch<acc_t>& sc) {
  const Geometry& g = pl.g;
  const Candidate& cd = pl.cands[j];
  for (int64_t ho = 0; ho < g.Ho; ++ho) {
    acc_t* zrow = sc.gz.data() + (ho * g.stride + g.P) * pl.gl.row + g.P;
    for (int64_t wo = 0; wo < g.Wo; ++wo) zrow[wo * g.stride] = sc.grad[ho * pl.gpitch + wo];
  }
  correlate(sc.gz.data(), pl.grad_taps[j], pl.wflip[j] + c * cd.k * cd.k, g.H, g.W,
            sc.ga.data() + pl.slots.of[j] * g.in_plane(), !first);
}

// Other activations than ReLU: each slot's gradient sum times its activation's
// derivative at pre = x or (x - mean) * rstd, summed over the task's slots [s0, s1).
template <typename scalar_t, typename acc_t>
void store_input_grad_activations(const BackwardPlan<scalar_t, acc_t>& pl, const BackwardScratch<acc_t>& sc,
                                  const scalar_t* x, acc_t mean, acc_t rstd, int64_t s0, int64_t s1, scalar_t* dst) {
  const Geometry& g = pl.g;
  for (int64_t h = 0; h < g.H; ++h) {
    for (int64_t w = 0; w < g.W; ++w) {
      acc_t pre = static_cast<acc_t>(x[h * g.W + w]);
      if (pl.bn) pre = (pre - mean) * rstd;
      const int64_t q = (h & 1) * 2 + (w & 1);
      const int64_t pc = (w & 1) ? pl.phase_cols1 : pl.phase_cols0;
      acc_t sum = acc_t(0);
      for (int64_t s = s0; s < s1; ++s) {
        const acc_t v = pl.phased ? sc.gq[(s * 4 + q) * pl.phase_size + (h >> 1) * pc + (w >> 1)]
                                  : sc.ga[s * g.in_plane() + h * g.W + w];
        sum += math::activation_derivative(pl.slots.codes[s], pre) * v;
      }
      dst[h * g.W + w] = static_cast<scalar_t>(sum);
    }
  }
}

// The summed input gradient of one image, where the activation (ReLU) is positive.
template <typename scalar_t, typename acc_t>
void store_input_grad(const BackwardPlan<scalar_t, acc_t>& pl, const BackwardScratch<acc_t>& sc, scalar_t* dst) {
  const Geometry& g = pl.g;
  for (int64_t h = 0; h < g.H && pl.phased; ++h) {
    for (int64_t w = 0; w < g.W; ++w) {
      const acc_t a = sc.pad[g.at(h + g.P, w + g.P)];
      const int64_t q = (h & 1) * 2 + (w & 1);
      const int64_t pc = (w & 1) ? pl.phase_cols1 : pl.phase_cols0;
      const acc_t v = sc.gq[q * pl.phase_size + (h >> 1) * pc + (w >> 1)];
      dst[h * g.W + w] = static_cast<scalar_t>(math::depthwise_grad_passes(a, v));
    }
  }
  for (int64_t h = 0; h < g.H && !pl.phased; ++h) {
    for (int64_t w = 0; w < g.W; ++w) {
      const acc_t a = sc.pad[g.at(h + g.P, w + g.P)];
      dst[h * g.W + w] = static_cast<scalar_t>(math::depthwise_grad_passes(a, sc.ga[h * g.W + w]));
    }
  }
}

// One task: its images, its candidates; its weight-gradient sums go to partial.
template <typename scalar_t, typename acc_t>
void backward_task(const BackwardPlan<scalar_t, acc_t>& pl, int64_t task, BackwardScratch<acc_t>& sc, acc_t* partial) {
  const Geometry& g = pl.g;
  const int64_t group = task / pl.split.chunks, chunk = task % pl.split.chunks;
  const int64_t c = g.shared ? group : group % g.C;
  const int64_t j0 = g.shared ? 0 : group / g.C, j1 = g.shared ? g.J : j0 + 1;
  const int64_t s0 = g.shared ? 0 : pl.slots.of[j0], s1 = g.shared ? pl.slots.count() : s0 + 1;
  const acc_t m = pl.bn ? pl.mean[group] : acc_t(0), r = pl.bn ? pl.rstd[group] : acc_t(1);
  const int64_t in_plane = g.in_plane(), out_plane = g.out_plane();
  std::fill(sc.taps.begin(), sc.taps.end(), acc_t(0));
  const int64_t n_end = std::min(g.N, (chunk + 1) * pl.split.per_chunk);
  for (int64_t n = chunk * pl.split.per_chunk; n < n_end; ++n) {
    const int64_t in_index = g.shared ? (n * g.C + c) : (group * g.N + n);
    fill_activations<scalar_t, acc_t>(g, pl.x + in_index * in_plane, pl.bn, m, r, pl.slots, s0, s1, sc.pad.data());
    if (pl.phased) std::fill(sc.gq.begin(), sc.gq.end(), acc_t(0));
    for (int64_t j = j0; j < j1; ++j) {
      load_grad_plane(pl, pl.grad_out + ((j * g.C + c) * g.N + n) * out_plane, sc);
      const int64_t slot = pl.slots.of[j];
      tap_dots(sc.pad.data() + slot * g.size(), pl.fwd_taps[j], g.Ho, g.Wo, sc.grad.data(),
               sc.taps.data() + pl.tap_offset[j]);
      if (pl.phased) {
        input_grad_phased(pl, j, c, sc);
      } else if (pl.input_need_grad) {
        input_grad_dense(pl, j, c, g.shared ? j == pl.slots.first[slot] : true, sc);
      }
    }
    if (pl.input_need_grad && pl.slots.relu_only()) {
      store_input_grad(pl, sc, pl.grad_pre + in_index * in_plane);
    } else if (pl.input_need_grad) {
      store_input_grad_activations(pl, sc, pl.x + in_index * in_plane, m, r, s0, s1, pl.grad_pre + in_index * in_plane);
    }
  }
  std::copy(sc.taps.begin(), sc.taps.end(), partial + task * pl.taps_all);
}

// Second stage, in a fixed order: summed[group] = sum over the group's chunks of their partials.
template <typename acc_t>
void sum_over_chunks(const acc_t* partials, int64_t groups, int64_t chunks, int64_t taps_all, acc_t* summed) {
  for (int64_t group = 0; group < groups; ++group) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const acc_t* part = partials + (group * chunks + chunk) * taps_all;
      for (int64_t t = 0; t < taps_all; ++t) summed[group * taps_all + t] += part[t];
    }
  }
}

// The weights' gradients from their sums per group, (groups, taps of all
// candidates): for shared x a group is a channel and holds every candidate's
// taps; per candidate, group j * C + c holds candidate j's.
std::vector<at::Tensor> depthwise_weight_grads(const at::Tensor& summed, const DepthwiseShape& s,
                                               const std::vector<DepthwiseCandidate>& cands, at::TensorList weights) {
  const std::vector<int64_t> offsets = tap_offsets(cands);
  std::vector<at::Tensor> grad_ws;
  for (int64_t j = 0; j < s.J; ++j) {
    const int64_t k = cands[j].k;
    const at::Tensor rows =
        s.shared ? summed.narrow(1, offsets[j], k * k) : summed.narrow(0, j * s.C, s.C).narrow(1, offsets[j], k * k);
    grad_ws.push_back(rows.reshape({s.C, 1, k, k}).to(weights[j].scalar_type()).contiguous());
  }
  return grad_ws;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> multi_depthwise_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef dilations,
    int64_t stride, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& rstd, bool input_need_grad,
    at::IntArrayRef activations) {
  check_multi_depthwise(kBackward, x_in, weights, dilations, stride, mean, rstd, at::kCPU);
  const ActivationSlots slots = activation_slots(kBackward, activations, static_cast<int64_t>(weights.size()));
  std::vector<Candidate> cands;
  const Geometry g = geometry(x_in, weights, dilations, stride, cands);
  check_multi_depthwise_grad_out(kBackward, grad_out_in, x_in, g);

  const auto dtype = x_in.scalar_type();
  const auto acc_dtype = accumulate_dtype(dtype);
  at::Tensor grad_pre =
      input_need_grad ? empty_contiguous(x_in.sizes(), x_in.options()) : at::empty({0}, x_in.options());
  const BatchSplit split = split_batch(g);
  const int64_t groups = g.groups();
  const std::vector<DepthwiseCandidate> dc = depthwise_candidates(weights, dilations);
  const int64_t taps_all = tap_offsets(dc).back();
  at::Tensor partials = at::zeros({groups, split.chunks, taps_all}, x_in.options().dtype(acc_dtype));
  at::Tensor summed = at::zeros({groups, taps_all}, x_in.options().dtype(acc_dtype));

  if (g.N > 0 && g.C > 0 && g.Ho > 0 && g.Wo > 0) {
    const at::Tensor x = x_in.contiguous();
    const at::Tensor go = grad_out_in.contiguous();
    std::vector<at::Tensor> wflip;
    for (const auto& w : weights) wflip.push_back(w.to(acc_dtype).flip({2, 3}).contiguous());
    const bool bn = mean.has_value();
    const at::Tensor mean_acc = bn ? for_accumulation(*mean, dtype) : at::Tensor();
    const at::Tensor rstd_acc = bn ? for_accumulation(*rstd, dtype) : at::Tensor();

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "multi_depthwise_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      BackwardPlan<scalar_t, acc_t> plan(g, cands, slots, tap_offsets(dc), input_need_grad);
      plan.bn = bn;
      plan.x = x.data_ptr<scalar_t>();
      plan.grad_out = go.data_ptr<scalar_t>();
      for (const auto& w : wflip) plan.wflip.push_back(w.data_ptr<acc_t>());
      plan.mean = bn ? mean_acc.data_ptr<acc_t>() : nullptr;
      plan.rstd = bn ? rstd_acc.data_ptr<acc_t>() : nullptr;
      plan.grad_pre = input_need_grad ? grad_pre.data_ptr<scalar_t>() : nullptr;
      acc_t* pp = partials.data_ptr<acc_t>();
      at::parallel_for(0, groups * split.chunks, 1, [&](int64_t begin, int64_t end) {
        BackwardScratch<acc_t> scratch(plan);
        for (int64_t task = begin; task < end; ++task) backward_task(plan, task, scratch, pp);
      });
      sum_over_chunks(pp, groups, split.chunks, taps_all, summed.data_ptr<acc_t>());
    });
  }
  return {grad_pre, depthwise_weight_grads(summed, g, dc, weights)};
}

}  // namespace
}  // namespace cpu
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("multi_depthwise", &fastnas::cpu::multi_depthwise);
  m.impl("multi_depthwise_backward", &fastnas::cpu::multi_depthwise_backward);
}
