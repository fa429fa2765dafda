// A host emulation of the CUDA execution model, enough to run the fastnas
// kernels on CPU tensors: compiled with FASTNAS_CUDA_EMULATION (by
// tests/cuda_emulation, never into fastnas._C), the .cu files become host code
// whose kernels run here, block after block.
//
// The threads of a block are coroutines (ucontext) scheduled in turn, each
// running until it reaches __syncthreads(), a warp shuffle or its end; a
// barrier opens only when every live thread of the block (or lane of the
// warp) has reached it, so a barrier that some threads skip, or a shuffle in
// divergent code, stops the run with an error instead of hanging. Dynamic
// shared memory starts filled with NaN bytes, so a read of a value no thread
// wrote shows up in the results. Not emulated: timing, memory coalescing,
// and races between threads that a missing barrier would allow on a GPU but
// that cooperative scheduling hides.
#pragma once

#include <ATen/ATen.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Blocks run one after the other, so a function-local static is one block's
// shared memory.
#define __shared__ static
#define FASTNAS_DYNAMIC_SHARED(name) unsigned char* name = ::fastnas::emu::dynamic_shared()
#define FASTNAS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(fastnas_emu, CPU, m)
#define C10_CUDA_KERNEL_LAUNCH_CHECK()
#define threadIdx (::fastnas::emu::thread_index())
#define blockIdx (::fastnas::emu::block_index())
#define gridDim (::fastnas::emu::grid_dim())
#define blockDim (::fastnas::emu::block_dim())

namespace fastnas {
namespace emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct Runner {
  enum State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };
  static constexpr size_t kStack = 256 * 1024;
  unsigned threads = 0;
  Dim3 block, grid, block_dim;
  std::vector<Dim3> thread_ids;
  std::vector<State> state;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  ucontext_t scheduler;
  unsigned current = 0;
  std::vector<unsigned char> shared;
  std::vector<uint64_t> lanes;
  const std::function<void()>* body = nullptr;
};

inline Runner& runner() {
  static Runner r;
  return r;
}

inline const Dim3& thread_index() { return runner().thread_ids[runner().current]; }
inline const Dim3& block_index() { return runner().block; }
inline const Dim3& grid_dim() { return runner().grid; }
inline const Dim3& block_dim() { return runner().block_dim; }
inline unsigned char* dynamic_shared() { return runner().shared.data(); }

inline void yield_with(Runner::State s) {
  Runner& r = runner();
  r.state[r.current] = s;
  swapcontext(&r.ctx[r.current], &r.scheduler);
}

inline void thread_entry() {
  Runner& r = runner();
  (*r.body)();
  yield_with(Runner::kDone);
}

// Every thread of the block runs body (the kernel call) as block b of `blocks`.
inline void run(int64_t blocks, unsigned threads, int64_t smem_bytes, const std::function<void()>& body) {
  Runner& r = runner();
  r.threads = threads;
  r.grid = Dim3{static_cast<unsigned>(blocks), 1, 1};
  r.block_dim = Dim3{threads, 1, 1};
  r.thread_ids.resize(threads);
  for (unsigned t = 0; t < threads; ++t) r.thread_ids[t] = Dim3{t, 1, 1};
  r.state.assign(threads, Runner::kDone);
  r.ctx.resize(threads);
  r.stacks.resize(threads);
  for (auto& s : r.stacks) s.resize(Runner::kStack);
  r.lanes.assign(threads, 0);
  r.body = &body;
  for (int64_t b = 0; b < blocks; ++b) {
    r.block = Dim3{static_cast<unsigned>(b), 1, 1};
    r.shared.assign(static_cast<size_t>(smem_bytes), 0xFF);
    for (unsigned t = 0; t < threads; ++t) {
      getcontext(&r.ctx[t]);
      r.ctx[t].uc_stack.ss_sp = r.stacks[t].data();
      r.ctx[t].uc_stack.ss_size = r.stacks[t].size();
      r.ctx[t].uc_link = nullptr;
      makecontext(&r.ctx[t], &thread_entry, 0);
      r.state[t] = Runner::kReady;
    }
    while (true) {
      for (unsigned t = 0; t < threads; ++t) {
        if (r.state[t] != Runner::kReady) continue;
        r.current = t;
        swapcontext(&r.scheduler, &r.ctx[t]);
      }
      bool released = false, all_done = true, any_block = false, all_block = true;
      for (unsigned w = 0; w < threads; w += 32) {
        bool any_warp = false, all_warp = true;
        for (unsigned t = w; t < w + 32 && t < threads; ++t) {
          any_warp |= r.state[t] == Runner::kAtWarpBarrier;
          all_warp &= r.state[t] == Runner::kAtWarpBarrier;
        }
        if (any_warp && !all_warp) {
          throw std::runtime_error("CUDA emulation: block " + std::to_string(b) + ", warp " + std::to_string(w / 32) +
                                   ": a warp shuffle that not every lane reached");
        }
        if (all_warp) {
          for (unsigned t = w; t < w + 32 && t < threads; ++t) r.state[t] = Runner::kReady;
          released = true;
        }
      }
      for (unsigned t = 0; t < threads; ++t) {
        all_done &= r.state[t] == Runner::kDone;
        any_block |= r.state[t] == Runner::kAtBlockBarrier;
        all_block &= r.state[t] == Runner::kAtBlockBarrier || r.state[t] == Runner::kDone;
      }
      if (all_done) break;
      if (any_block && all_block) {
        for (unsigned t = 0; t < threads; ++t) {
          if (r.state[t] == Runner::kAtBlockBarrier) r.state[t] = Runner::kReady;
        }
        released = true;
      }
      if (!released) {
        throw std::runtime_error("CUDA emulation: block " + std::to_string(b) +
                                 ": threads wait at different barriers (a __syncthreads() some threads skip)");
      }
    }
  }
}

// __shfl_down_sync over a full warp: every lane writes its value, waits for
// the others, reads lane + offset's (its own past the warp's end), and waits
// again before the slots are reused.
template <typename T>
T shfl_down(T v, unsigned offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles of at most 8 bytes");
  Runner& r = runner();
  const unsigned t = r.current, lane = t % 32;
  std::memcpy(&r.lanes[t], &v, sizeof(T));
  yield_with(Runner::kAtWarpBarrier);
  T out = v;
  if (lane + offset < 32) std::memcpy(&out, &r.lanes[t + offset], sizeof(T));
  yield_with(Runner::kAtWarpBarrier);
  return out;
}

}  // namespace emu
}  // namespace fastnas

inline void __syncthreads() { ::fastnas::emu::yield_with(::fastnas::emu::Runner::kAtBlockBarrier); }

template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned offset) {
  return ::fastnas::emu::shfl_down(v, offset);
}

namespace fastnas {
namespace cuda {

using std::max;
using std::min;

constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), int64_t blocks, int64_t smem_bytes, Args&&... args) {
  const std::function<void()> body = [&] { kernel(args...); };
  emu::run(blocks, kThreads, smem_bytes, body);
}

}  // namespace cuda
}  // namespace fastnas
