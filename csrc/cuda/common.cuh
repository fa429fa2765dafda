// Launch sizes and fixed-order reductions shared by the CUDA kernels.
//
// Every reduction here adds its terms in an order fixed by the problem size
// alone (thread-strided partial sums, a butterfly within each warp, the warps
// in order), never by scheduling or the device, and uses no atomics: the same
// inputs give the same bits on every run. Grid sizes that shape a reduction
// depend on the problem size only.
#pragma once

#include <c10/core/DeviceType.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace fastnas {
namespace cuda {

// Threads per block of every kernel.
constexpr int kThreads = 256;
}  // namespace cuda
}  // namespace fastnas

#ifdef FASTNAS_CUDA_EMULATION
// The kernels compiled for the host, run by an emulation of blocks, warps and
// shared memory on CPU tensors (tests/cuda_emulation): the same kernel code,
// checked where no GPU is.
#include "cuda/emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

// A kernel's dynamic shared memory.
#define FASTNAS_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
// Where the CUDA kernels of the fastnas ops are registered.
#define FASTNAS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fastnas, CUDA, m)

namespace fastnas {
namespace cuda {

constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
using DeviceGuard = c10::cuda::CUDAGuard;

// kernel<<<blocks, kThreads, smem_bytes>>>(args...) on the current stream.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), int64_t blocks, int64_t smem_bytes, Args&&... args) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // clang-format would split the launch's >>>.
  // clang-format off
  kernel<<<blocks, kThreads, smem_bytes, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fastnas
#endif

namespace fastnas {
namespace cuda {

constexpr int kWarps = kThreads / 32;
// A grid size that depends on the problem size only, never on the device, so
// the weight gradients are bit-identical wherever they run; enough blocks to
// fill an H100 several times over.
constexpr int64_t kMaxBlocks = 2048;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t blocks_for(int64_t work_items) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, ceil_div(work_items, kThreads)));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Sum over a warp in a fixed butterfly order; lane 0 holds the total. Every
// lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a block of kThreads threads, returned to every thread: the warps'
// sums added in warp order. Every thread of the block must call it; scratch
// holds kWarps values and may be reused as soon as it returns.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  acc_t total = scratch[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) total += scratch[i];
  __syncthreads();
  return total;
}

// out[r] = sum_{p < count} data[r * row_stride + p * elem_stride], one block
// per r: thread-strided partial sums, then block_sum. The second stage of the
// two-stage reductions.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    strided_sums_kernel(const acc_t* __restrict__ data, int64_t count, int64_t row_stride, int64_t elem_stride,
                        acc_t* __restrict__ out) {
  __shared__ acc_t scratch[kWarps];
  const acc_t* row = data + static_cast<int64_t>(blockIdx.x) * row_stride;
  acc_t v = acc_t(0);
  for (int64_t p = threadIdx.x; p < count; p += kThreads) v += row[p * elem_stride];
  v = block_sum(v, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// Launches strided_sums_kernel for `rows` rows on the current stream.
template <typename acc_t>
void launch_strided_sums(const acc_t* data, int64_t rows, int64_t count, int64_t row_stride, int64_t elem_stride,
                         acc_t* out) {
  if (rows == 0) return;
  launch(strided_sums_kernel<acc_t>, rows, 0, data, count, row_stride, elem_stride, out);
}

}  // namespace cuda
}  // namespace fastnas
