// A host emulation of the CUDA execution model, enough to run the fastnas
// kernels on CPU tensors: compiled with FASTNAS_CUDA_EMULATION (by
// tests/cuda_emulation, never into fastnas._C), the .cu files become host code
// whose kernels run here, block after block.
//
// The threads of a block are coroutines (ucontext, switched by _setjmp and
// _longjmp) scheduled in turn, each
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
#include <torch/library.h>
#include <setjmp.h>
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
// The kernels register as the fastnas_emu ops, and also as the CPU kernels of the
// fastnas ops when emulate_cpu(true) asks (tests/cuda_emulation/registration.cpp).
#define FASTNAS_CUDA_LIBRARY_IMPL(m) FASTNAS_EMU_LIBRARY_IMPL(m, C10_UID)
#define FASTNAS_EMU_LIBRARY_IMPL(m, uid)                                                                     \
  static void C10_CONCATENATE(fastnas_emu_kernels_, uid)(torch::Library&);                                   \
  static const ::fastnas::emu::AddKernels C10_CONCATENATE(fastnas_emu_add_,                                  \
                                                          uid)(&C10_CONCATENATE(fastnas_emu_kernels_, uid)); \
  _TORCH_LIBRARY_IMPL(fastnas_emu, CPU, lib, uid) { C10_CONCATENATE(fastnas_emu_kernels_, uid)(lib); }       \
  static void C10_CONCATENATE(fastnas_emu_kernels_, uid)(torch::Library & m)
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
  // Each thread's coroutine is made once (ucontext) and then kept: it runs the
  // current body, parks at its end and runs the next block's or launch's when
  // resumed. Switches are _setjmp/_longjmp, which unlike swapcontext make no
  // system call (the signal mask stays as it is): kernels run about 7x faster.
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  struct Jump {
    jmp_buf buf;
  };
  std::vector<bool> started;
  std::vector<Jump> jumps;
  jmp_buf scheduler;
  ucontext_t entry;
  unsigned current = 0;
  std::vector<unsigned char> shared;
  std::vector<uint64_t> lanes;
  const std::function<void()>* body = nullptr;
};

inline Runner& runner() {
  static Runner r;
  return r;
}

// Every launch() so far in this process: the device launches the emulated code
// would make on a GPU (read by fastnas_emu::launches).
inline int64_t& launches() {
  static int64_t n = 0;
  return n;
}

// The functions that register one file's kernels on a library (a
// FASTNAS_CUDA_LIBRARY_IMPL block each), so that they can be registered again as
// the fastnas ops' CPU kernels.
using KernelRegistrar = void (*)(torch::Library&);
inline std::vector<KernelRegistrar>& kernel_registrars() {
  static std::vector<KernelRegistrar> registrars;
  return registrars;
}
struct AddKernels {
  explicit AddKernels(KernelRegistrar f) { kernel_registrars().push_back(f); }
};

inline const Dim3& thread_index() { return runner().thread_ids[runner().current]; }
inline const Dim3& block_index() { return runner().block; }
inline const Dim3& grid_dim() { return runner().grid; }
inline const Dim3& block_dim() { return runner().block_dim; }
inline unsigned char* dynamic_shared() { return runner().shared.data(); }

inline void yield_with(Runner::State s) {
  Runner& r = runner();
  r.state[r.current] = s;
  if (!_setjmp(r.jumps[r.current].buf)) _longjmp(r.scheduler, 1);
}

inline void thread_entry() {
  Runner& r = runner();
  for (;;) {
    (*r.body)();
    yield_with(Runner::kDone);
  }
}

// Runs thread t until it yields.
inline void resume(unsigned t) {
  Runner& r = runner();
  r.current = t;
  if (_setjmp(r.scheduler)) return;
  if (r.started[t]) _longjmp(r.jumps[t].buf, 1);
  r.started[t] = true;
  getcontext(&r.ctx[t]);
  r.ctx[t].uc_stack.ss_sp = r.stacks[t].data();
  r.ctx[t].uc_stack.ss_size = r.stacks[t].size();
  r.ctx[t].uc_link = nullptr;
  makecontext(&r.ctx[t], &thread_entry, 0);
  swapcontext(&r.entry, &r.ctx[t]);  // comes back through the _setjmp above
}

// Every thread of the block runs body (the kernel call) as block b of `blocks`.
inline void run_blocks(int64_t blocks, unsigned threads, int64_t smem_bytes) {
  Runner& r = runner();
  for (int64_t b = 0; b < blocks; ++b) {
    r.block = Dim3{static_cast<unsigned>(b), 1, 1};
    r.shared.assign(static_cast<size_t>(smem_bytes), 0xFF);
    r.state.assign(threads, Runner::kReady);
    while (true) {
      for (unsigned t = 0; t < threads; ++t) {
        if (r.state[t] == Runner::kReady) resume(t);
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

inline void run(int64_t blocks, unsigned threads, int64_t smem_bytes, const std::function<void()>& body) {
  Runner& r = runner();
  r.threads = threads;
  r.grid = Dim3{static_cast<unsigned>(blocks), 1, 1};
  r.block_dim = Dim3{threads, 1, 1};
  if (r.thread_ids.size() < threads) {
    r.ctx.resize(threads);
    r.stacks.resize(threads);
    for (auto& s : r.stacks) s.resize(Runner::kStack);
    r.jumps.resize(threads);
    r.started.assign(threads, false);  // their buffers moved: make every coroutine afresh
  }
  r.thread_ids.resize(threads);
  for (unsigned t = 0; t < threads; ++t) r.thread_ids[t] = Dim3{t, 1, 1};
  r.lanes.assign(threads, 0);
  r.body = &body;
  try {
    run_blocks(blocks, threads, smem_bytes);
  } catch (...) {
    // Threads stopped mid-kernel cannot run the next one: start them afresh.
    r.started.assign(r.started.size(), false);
    throw;
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
  ++emu::launches();
  emu::run(blocks, kThreads, smem_bytes, body);
}

}  // namespace cuda
}  // namespace fastnas
