// partial_channel_node_sum on CUDA: a PC-DARTS node,
// sum_e weights[e] * channel_shuffle(cat([mixed[e], P_e(bypass[e])], 1), groups),
// in one pass, and its backward.
//
// One thread per output element: it finds the concatenated channel its
// shuffled channel comes from and reads the E sources there, the bypass
// through its strides (the bypass is usually the view h_e[:, Cp:]) and 2x2
// max-pooled on stride-2 edges (math::max_pool_2x2, the CPU kernel's rule).
// The edges' pointers and strides travel by value in a kernel argument, so a
// launch needs no host-to-device copy and CUDA graphs can capture it. The
// backward reads the output gradient once and writes every input gradient
// element once; the weights' gradient is a fixed-order two-stage reduction.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/common.cuh"
#include "fastnas_math.h"
#include "host/partial_channel_node_sum.h"

namespace fastnas {
namespace cuda {
namespace {

constexpr const char* kForward = "partial_channel_node_sum";
constexpr const char* kBackward = "partial_channel_node_sum_backward";

// Edges per call: the table below travels in a kernel argument (4 KiB at
// most); a PC-DARTS node has a handful.
constexpr int kMaxEdges = 32;

template <typename scalar_t>
struct NodeEdges {
  const scalar_t* mixed[kMaxEdges];   // contiguous (N, Cp, H, W); not read unless the weights need a gradient
  const scalar_t* bypass[kMaxEdges];  // (N, Cb, s*H, s*W) through its strides
  int64_t sn[kMaxEdges], sc[kMaxEdges], sh[kMaxEdges], sw[kMaxEdges];
  int32_t stride[kMaxEdges];
};

// Input gradients: null where not needed; the bypass ones are contiguous.
template <typename scalar_t>
struct NodeGrads {
  scalar_t* mixed[kMaxEdges];
  scalar_t* bypass[kMaxEdges];
};

// The node's sizes in index_t: 32-bit where every offset fits (64-bit
// division is slow).
template <typename index_t>
struct NodeIndex {
  index_t hw, w, cp, cb, channels, cpg, groups;

  // Output element i: its image, its concatenated channel and its position.
  __device__ __forceinline__ void locate(index_t i, index_t& n, index_t& c, index_t& p) const {
    const index_t plane = i / hw;
    p = i - plane * hw;
    n = plane / channels;
    c = math::unshuffled_channel(plane - n * channels, cpg, groups);
  }
};

template <typename index_t>
NodeIndex<index_t> node_index(const NodeShape& s) {
  return {static_cast<index_t>(s.plane()),    static_cast<index_t>(s.w),
          static_cast<index_t>(s.cp),         static_cast<index_t>(s.cb),
          static_cast<index_t>(s.channels()), static_cast<index_t>(s.channels_per_group()),
          static_cast<index_t>(s.groups)};
}

// P_e(bypass[e]) at (n, cb, oh, ow); on stride-2 edges *arg is the window
// element (0..3, row-major) the maximum came from.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t bypass_value(const NodeEdges<scalar_t>& t, int e, int64_t n, int64_t cb, int64_t oh,
                                              int64_t ow, int* arg) {
  const scalar_t* plane = t.bypass[e] + n * t.sn[e] + cb * t.sc[e];
  const int64_t sh = t.sh[e], sw = t.sw[e];
  if (t.stride[e] == 1) return static_cast<acc_t>(plane[oh * sh + ow * sw]);
  const scalar_t* top = plane + (2 * oh) * sh + (2 * ow) * sw;
  const auto r = math::max_pool_2x2<acc_t>(top[0], top[sw], top[sh], top[sh + sw]);
  *arg = r.index;
  return r.value;
}

template <typename scalar_t, typename index_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    node_forward_kernel(NodeEdges<scalar_t> t, int edges, const acc_t* __restrict__ w, NodeIndex<index_t> ix,
                        int64_t total, scalar_t* __restrict__ out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += step) {
    index_t n, c, p;
    ix.locate(static_cast<index_t>(i), n, c, p);
    acc_t acc = acc_t(0);
    if (c < ix.cp) {
      const int64_t src = (static_cast<int64_t>(n) * ix.cp + c) * ix.hw + p;
      for (int e = 0; e < edges; ++e) acc = math::weighted_accumulate(acc, w[e], t.mixed[e][src]);
    } else {
      const index_t oh = p / ix.w, ow = p - (p / ix.w) * ix.w;
      int arg = 0;
      for (int e = 0; e < edges; ++e) {
        acc = math::weighted_accumulate(acc, w[e], bypass_value<scalar_t, acc_t>(t, e, n, c - ix.cp, oh, ow, &arg));
      }
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

// Each output-gradient element g, read once, goes to every edge's source of
// that element: w[e] * g to its gradient (on stride-2 edges to the argmax of
// the window, zeros to the rest of it), and g * source to the block's partial
// sum for weights[e] (when need_w), in partials[block][e]. Every thread of a
// block runs the same number of iterations so the warp sums see all lanes.
template <typename scalar_t, typename index_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    node_backward_kernel(const scalar_t* __restrict__ grad_out, NodeEdges<scalar_t> t, NodeGrads<scalar_t> gr,
                         int edges, const acc_t* __restrict__ w, bool need_w, NodeIndex<index_t> ix, int64_t total,
                         acc_t* __restrict__ partials) {
  __shared__ acc_t warp_dots[kWarps][kMaxEdges];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int k = threadIdx.x; k < kWarps * kMaxEdges; k += kThreads) warp_dots[k / kMaxEdges][k % kMaxEdges] = acc_t(0);
  __syncthreads();
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < total; base += step) {
    const int64_t i = base + threadIdx.x;
    const bool active = i < total;
    index_t n = 0, c = 0, p = 0;
    if (active) ix.locate(static_cast<index_t>(i), n, c, p);
    const acc_t g = active ? static_cast<acc_t>(grad_out[i]) : acc_t(0);
    const bool mixed = c < ix.cp;
    const index_t cb = mixed ? 0 : c - ix.cp;
    const index_t oh = p / ix.w, ow = p - (p / ix.w) * ix.w;
    for (int e = 0; e < edges; ++e) {
      acc_t d = acc_t(0);
      if (active && mixed) {
        const int64_t src = (static_cast<int64_t>(n) * ix.cp + c) * ix.hw + p;
        if (gr.mixed[e] != nullptr) gr.mixed[e][src] = static_cast<scalar_t>(w[e] * g);
        if (need_w) d = math::dot_accumulate(acc_t(0), g, t.mixed[e][src]);
      } else if (active) {
        const bool pooled = t.stride[e] == 2;
        scalar_t* gb = gr.bypass[e];
        int arg = 0;
        acc_t v = acc_t(0);
        if (need_w || (pooled && gb != nullptr)) v = bypass_value<scalar_t, acc_t>(t, e, n, cb, oh, ow, &arg);
        if (need_w) d = g * v;
        if (gb != nullptr) {
          const scalar_t wg = static_cast<scalar_t>(w[e] * g);
          const int64_t plane = static_cast<int64_t>(n) * ix.cb + cb;
          if (!pooled) {
            gb[plane * ix.hw + p] = wg;
          } else {
            const int64_t row = 2 * static_cast<int64_t>(ix.w);
            scalar_t* top = gb + plane * 4 * ix.hw + (2 * static_cast<int64_t>(oh)) * row + 2 * ow;
            top[0] = math::pool_grad_at(0, arg, wg);
            top[1] = math::pool_grad_at(1, arg, wg);
            top[row] = math::pool_grad_at(2, arg, wg);
            top[row + 1] = math::pool_grad_at(3, arg, wg);
          }
        }
      }
      if (need_w) {
        d = warp_sum(d);
        if (lane == 0) warp_dots[warp][e] += d;
      }
    }
  }
  if (need_w) {
    __syncthreads();
    for (int e = threadIdx.x; e < edges; e += kThreads) {
      acc_t s = warp_dots[0][e];
#pragma unroll
      for (int k = 1; k < kWarps; ++k) s += warp_dots[k][e];
      partials[static_cast<int64_t>(blockIdx.x) * edges + e] = s;
    }
  }
}

void check_edge_count(const char* op, const NodeShape& s) {
  TORCH_CHECK(s.edges <= kMaxEdges, op, ": ", s.edges, " edges; the CUDA kernel takes at most ", kMaxEdges,
              " per call");
}

template <typename scalar_t>
NodeEdges<scalar_t> edge_table(const std::vector<at::Tensor>& mixed, at::TensorList bypass, at::IntArrayRef strides) {
  NodeEdges<scalar_t> t{};
  for (size_t e = 0; e < strides.size(); ++e) {
    t.mixed[e] = e < mixed.size() ? mixed[e].data_ptr<scalar_t>() : nullptr;
    const at::Tensor& b = bypass[e];
    t.bypass[e] = b.data_ptr<scalar_t>();
    t.sn[e] = b.stride(0);
    t.sc[e] = b.stride(1);
    t.sh[e] = b.stride(2);
    t.sw[e] = b.stride(3);
    t.stride[e] = static_cast<int32_t>(strides[e]);
  }
  return t;
}

at::Tensor partial_channel_node_sum(at::TensorList mixed, at::TensorList bypass, const at::Tensor& weights,
                                    int64_t groups, at::IntArrayRef strides) {
  const NodeShape s = check_node_forward(kForward, mixed, bypass, weights, groups, strides, kDevice);
  check_edge_count(kForward, s);
  const DeviceGuard guard(mixed[0].device());
  const auto dtype = mixed[0].scalar_type();
  at::Tensor out = at::empty({s.n, s.channels(), s.h, s.w}, mixed[0].options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const auto mc = contiguous_all(mixed);
  const at::Tensor w = for_accumulation(weights, dtype);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "partial_channel_node_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto t = edge_table<scalar_t>(mc, bypass, strides);
    const int edges = static_cast<int>(s.edges);
    if (s.offsets_fit_int32()) {
      launch(node_forward_kernel<scalar_t, uint32_t>, blocks_for(total), 0, t, edges, w.data_ptr<acc_t>(),
             node_index<uint32_t>(s), total, out.data_ptr<scalar_t>());
    } else {
      launch(node_forward_kernel<scalar_t, int64_t>, blocks_for(total), 0, t, edges, w.data_ptr<acc_t>(),
             node_index<int64_t>(s), total, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> partial_channel_node_sum_backward(
    const at::Tensor& grad_out, at::TensorList mixed, at::TensorList bypass, const at::Tensor& weights, int64_t groups,
    at::IntArrayRef strides, const c10::List<bool>& mixed_need_grad_list, const c10::List<bool>& bypass_need_grad_list,
    bool weights_need_grad) {
  const std::vector<bool> mixed_need = mixed_need_grad_list.vec();
  const std::vector<bool> bypass_need = bypass_need_grad_list.vec();
  const NodeShape s = check_node_backward(kBackward, grad_out, mixed, bypass, weights, groups, strides, mixed_need,
                                          bypass_need, kDevice);
  check_edge_count(kBackward, s);
  const DeviceGuard guard(grad_out.device());
  const auto dtype = grad_out.scalar_type();
  const auto acc_dtype = accumulate_dtype(dtype);
  std::vector<at::Tensor> grad_mixed = new_input_grads(mixed[0].sizes(), grad_out.options(), mixed_need);
  std::vector<at::Tensor> grad_bypass;
  for (int64_t e = 0; e < s.edges; ++e) {
    if (bypass_need[e]) grad_bypass.push_back(empty_contiguous(bypass[e].sizes(), grad_out.options()));
  }
  at::Tensor grad_w_acc = at::zeros({weights_need_grad ? s.edges : 0}, weights.options().dtype(acc_dtype));
  const int64_t total = grad_out.numel();
  const bool any_input_grad = !grad_mixed.empty() || !grad_bypass.empty();
  if (total == 0 || (!any_input_grad && !weights_need_grad)) {
    return {std::move(grad_mixed), std::move(grad_bypass), grad_w_acc.to(weights.scalar_type())};
  }
  const at::Tensor go = grad_out.contiguous();
  // Unless the weights need a gradient, mixed may be zero-stride stand-ins
  // that only carry the shape: never read or copy them then.
  const auto mc = weights_need_grad ? contiguous_all(mixed) : std::vector<at::Tensor>{};
  const at::Tensor w = for_accumulation(weights, dtype);
  const int64_t blocks = blocks_for(total);
  at::Tensor partials = at::empty({weights_need_grad ? blocks : 0, s.edges}, weights.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "partial_channel_node_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto t = edge_table<scalar_t>(mc, bypass, strides);
    NodeGrads<scalar_t> gr{};
    for (int64_t e = 0, i = 0, j = 0; e < s.edges; ++e) {
      gr.mixed[e] = mixed_need[e] ? grad_mixed[i++].data_ptr<scalar_t>() : nullptr;
      gr.bypass[e] = bypass_need[e] ? grad_bypass[j++].data_ptr<scalar_t>() : nullptr;
    }
    const int edges = static_cast<int>(s.edges);
    acc_t* pp = weights_need_grad ? partials.data_ptr<acc_t>() : nullptr;
    if (s.offsets_fit_int32()) {
      launch(node_backward_kernel<scalar_t, uint32_t>, blocks, 0, go.data_ptr<scalar_t>(), t, gr, edges,
             w.data_ptr<acc_t>(), weights_need_grad, node_index<uint32_t>(s), total, pp);
    } else {
      launch(node_backward_kernel<scalar_t, int64_t>, blocks, 0, go.data_ptr<scalar_t>(), t, gr, edges,
             w.data_ptr<acc_t>(), weights_need_grad, node_index<int64_t>(s), total, pp);
    }
    if (weights_need_grad) launch_strided_sums(pp, s.edges, blocks, 1, s.edges, grad_w_acc.data_ptr<acc_t>());
  });
  return {std::move(grad_mixed), std::move(grad_bypass), grad_w_acc.to(weights.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace fastnas

FASTNAS_CUDA_LIBRARY_IMPL(m) {
  m.impl("partial_channel_node_sum", &fastnas::cuda::partial_channel_node_sum);
  m.impl("partial_channel_node_sum_backward", &fastnas::cuda::partial_channel_node_sum_backward);
}
