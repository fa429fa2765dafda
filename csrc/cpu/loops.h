// Loop shapes shared by the CPU kernels: fixed-size work chunks, lane sums in
// a fixed order, walks over the rows of a chunk of a plane.
//
// Work is cut by the shape, never by the number of threads, and every sum runs
// over a fixed number of lanes combined pairwise in a fixed order: gcc
// vectorises the lanes without -ffast-math, and results are bit-identical
// whatever the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

// The streaming loops are compiled for AVX-512, AVX2 and the baseline, and the
// dynamic loader picks the widest one the CPU runs (GNU ifunc): a function
// marked FASTNAS_CPU_CLONES gets the clones, and the loops inlined into it with
// them. The build's -ffp-contract=off keeps every clone's rounding the same (no
// fused multiply-add), so the results are the same bits on every CPU.
// (multi_depthwise.cpp's convolution taps have their own clones, with FMA.)
// GCC 12 is the oldest checked to build these (x86-64-v4 arrived in GCC 11).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define FASTNAS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTNAS_CPU_CLONES
#endif

namespace fastnas {
namespace cpu {

// Elements per chunk of the streaming kernels: a chunk of every input stream
// stays in L1/L2.
constexpr int64_t kChunk = 2048;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tasks per parallel grain: below at::internal::GRAIN_SIZE elements of work,
// the thread hand-off costs more than it saves.
inline int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_task));
}

// A chunk of kChunk elements of one plane: plane index and element range.
struct PlaneChunk {
  int64_t plane, off, len;
};

inline PlaneChunk plane_chunk(int64_t task, int64_t chunks_per_plane, int64_t plane_size) {
  PlaneChunk pc;
  pc.plane = task / chunks_per_plane;
  pc.off = (task - pc.plane * chunks_per_plane) * kChunk;
  pc.len = std::min(kChunk, plane_size - pc.off);
  return pc;
}

// Calls body(i, lane) for i in [0, len): full groups of kLanes first, lane j
// taking element i + j, then the tail on lanes 0, 1, ...
template <int kLanes, typename Body>
C10_ALWAYS_INLINE void for_lanes(int64_t len, Body&& body) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) body(i + j, j);
  }
  for (int j = 0; i < len; ++i, ++j) body(i, j);
}

// The lanes added pairwise: s[j] += s[j + width] for width = kLanes / 2, ..., 1.
template <int kLanes, typename acc_t>
C10_ALWAYS_INLINE acc_t combine_lanes(acc_t* s) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) s[j] += s[j + width];
  }
  return s[0];
}

// sum_{i < len} term(i) over kLanes lanes, in the order above.
template <int kLanes, typename acc_t, typename Term>
C10_ALWAYS_INLINE acc_t lane_sum(int64_t len, Term&& term) {
  acc_t s[kLanes] = {};
  for_lanes<kLanes>(len, [&](int64_t i, int j) { s[j] += term(i); });
  return combine_lanes<kLanes>(s);
}

// Positions [off, off + len) of a plane w columns wide, as runs within rows:
// body(oh, ow, i, run) for the run of `run` positions starting at row oh,
// column ow, which is position off + i.
template <typename Body>
C10_ALWAYS_INLINE void for_row_runs(int64_t off, int64_t len, int64_t w, Body&& body) {
  int64_t oh = off / w, ow = off - (off / w) * w;
  for (int64_t i = 0; i < len; ++oh, ow = 0) {
    const int64_t run = std::min(w - ow, len - i);
    body(oh, ow, i, run);
    i += run;
  }
}

}  // namespace cpu
}  // namespace fastnas
