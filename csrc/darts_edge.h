// The fused DARTS edge and the PC-DARTS node as whole ops.
//
// The orchestration of the building blocks (multi_depthwise, the stacked batch
// norms, darts_sum, partial_channel_node_sum) is written once here, against the
// dispatcher and ATen: the same functions are the kernel of every device whose
// building blocks have kernels (csrc/cpu/darts_edge.cpp registers them for the
// CPU; a CUDA file registers the same functions for CUDA). Arguments are checked
// once, at the op's boundary; the static structure of an edge comes as a list of
// ints that fastnas.ops.darts_edge.EdgeSpec encodes once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/SmallVector.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

namespace fastnas {
namespace edge {

// The static structure of one edge, decoded from EdgeSpec.encoded:
//   [stride, K, ns, nd, max_index, avg_index, skip_index, reduce_index,
//    (kernel size, weight index, activation) of each separable convolution,
//    (kernel size, weight index, activation) of each dilated convolution]
// with -1 for an absent candidate. Parameters come per separable convolution
// (dw1, pw1, dw2, pw2), per dilated one (dw, pw), then the factorized reduce's
// two 1x1 convolutions; batch-norm buffers in the order of the statistics rows:
// separable middles, dilated, separable ends, reduce, max pool, avg pool.
struct Spec {
  static constexpr int64_t kHeader = 8;
  int64_t stride = 1, K = 0, ns = 0, nd = 0;
  int64_t max_index = -1, avg_index = -1, skip_index = -1, reduce_index = -1;
  c10::SmallVector<int64_t, 4> sep_k, sep_i, dil_k, dil_i;
  // The activation code (fastnas_math.h) in place of each convolution's ReLUs: the
  // first depthwise convolutions' (seps, then dils) and the seps' second ones.
  c10::SmallVector<int64_t, 8> act1, act2;
  double eps = 1e-5, momentum = 0.1;

  bool has_max() const { return max_index >= 0; }
  bool has_avg() const { return avg_index >= 0; }
  bool has_skip() const { return skip_index >= 0; }
  bool has_reduce() const { return reduce_index >= 0; }
  int64_t J1() const { return ns + nd; }
  // Rows of the pre-BN buffer darts_sum normalises: [dilated, separable ends, reduce].
  int64_t nz() const { return nd + ns + (has_reduce() ? 1 : 0); }
  int64_t n_params() const { return 4 * ns + 2 * nd + (has_reduce() ? 2 : 0); }
  int64_t n_norms() const { return 2 * ns + nd + (has_reduce() ? 1 : 0) + has_max() + has_avg(); }
  int64_t encoded_size() const { return kHeader + 3 * (ns + nd); }
};

// The spec that starts at encoded[offset], checked: names op in its errors.
Spec decode_spec(const char* op, at::IntArrayRef encoded, int64_t offset, double eps, double momentum);

// An edge's batch-norm buffers: empty lists, or n_norms tensors each.
struct Buffers {
  at::TensorList mean, var, count;
  bool empty() const { return mean.empty() && var.empty() && count.empty(); }
};

// What backward reads besides x, the weights and the parameters: zs (undefined
// under memory "recompute") and the forward's batch statistics.
struct Saved {
  at::Tensor zs, mid_mean, mid_rstd, mean, rstd;
};

// The checks at the boundary of the edge ops, once per call.
void check_memory(const char* op, c10::string_view memory);
void check_edge(const char* op, const Spec& s, const at::Tensor& x, const at::Tensor& weights, at::TensorList params,
                const Buffers& buffers);
// out_like: grad_out, or (the node) an edge's saved output; named out_name in errors.
void check_saved(const char* op, const Spec& s, const at::Tensor& x, const at::Tensor& out_like, const Saved& saved,
                 const char* out_name = "grad_out");

// The weights' gradient (K, in weights_dtype) from darts_sum's coefficient gradient
// (one per coefficient, absent max/avg/skip ones zero). `generic`: the ATen ops any
// device runs, two launches whatever K is (what a GPU runs); else the CPU's loop.
at::Tensor scatter_coef(const Spec& s, const at::Tensor& grad_coef, at::ScalarType weights_dtype, bool generic);

// Bumps the version counters of tensors that a kernel wrote through raw pointers.
void bump_versions(std::initializer_list<at::TensorList> lists);

// A whole-edge or node op's backward: grad mode is on there only under create_graph,
// and the building blocks have no derivatives of their backward, so the result would
// lack its second-order terms: refused.
inline void check_not_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op, ": double backward (create_graph=True) is not supported; ",
              "run the edges on backend='reference' to differentiate twice");
}

// Whether the orchestration runs a small step as a loop on the host, for tensors on
// the CPU, instead of the ATen ops a GPU runs. The CUDA emulation
// (tests/cuda_emulation) defines FASTNAS_EMULATE_DEVICE_PATHS: its CPU tensors stand
// for device tensors, so it takes the GPU's path.
inline bool host_loops(const at::Tensor& t) {
#ifdef FASTNAS_EMULATE_DEVICE_PATHS
  (void)t;
  return false;
#else
  return t.is_cpu();
#endif
}

// out, zs (the pre-BN tensors darts_sum normalised, (nz, C, N, Ho, Wo)), the
// statistics of the separable middles (mid_mean, mid_rstd, (ns, C)) and
// darts_sum's (mean, rstd, (nz + 2, C)). Only out is differentiable.
using EdgeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// grad_x, grad_weights, grad_params.
using EdgeGrads = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// The edge's computation on checked arguments (x contiguous or not): the core of
// darts_edge and of each edge of partial_channel_node.
// zs_out, when defined, is where zs goes ((nz, C, N, Ho, Wo), contiguous).
EdgeOutputs edge_forward(const Spec& s, const at::Tensor& x, const at::Tensor& weights, at::TensorList params,
                         const Buffers& buffers, const at::Tensor& zs_out = at::Tensor());
EdgeGrads edge_backward(const Spec& s, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weights,
                        at::TensorList params, const Saved& saved);

// fastnas::darts_edge: the forward, with the running statistics updated in place.
EdgeOutputs darts_edge(const at::Tensor& x, const at::Tensor& weights, at::TensorList params,
                       at::TensorList running_mean, at::TensorList running_var, at::TensorList num_batches_tracked,
                       at::IntArrayRef spec, double eps, double momentum, c10::string_view memory);

// fastnas::darts_edge_backward: zs is the forward's (memory "save") or None (memory
// "recompute": the candidates are computed again from x).
EdgeGrads darts_edge_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weights,
                              at::TensorList params, const std::optional<at::Tensor>& zs, const at::Tensor& mid_mean,
                              const at::Tensor& mid_rstd, const at::Tensor& mean, const at::Tensor& rstd,
                              at::IntArrayRef spec);

// out, then the edges' tensors packed along dim 0 in edge order (a mutable op's
// outputs must be single tensors to be functionalized): mixed (E, N, C/groups, Ho,
// Wo), each edge's output, which the edge weights' gradient reads; zs, mid_mean,
// mid_rstd, mean, rstd, as darts_edge returns them.
using NodeOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// grad_states, grad_weights (E, K), grad_edge_weights (E,), grad_params.
using NodeGrads = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// fastnas::partial_channel_node: a PC-DARTS node, every incoming edge's fused
// candidates on its first C / groups channels, the bypass, shuffle and edge weights.
NodeOutputs partial_channel_node(at::TensorList states, const at::Tensor& weights, const at::Tensor& edge_weights,
                                 at::TensorList params, at::TensorList running_mean, at::TensorList running_var,
                                 at::TensorList num_batches_tracked, at::IntArrayRef specs, at::ArrayRef<double> eps,
                                 at::ArrayRef<double> momentum, int64_t groups, c10::string_view memory);

NodeGrads partial_channel_node_backward(const at::Tensor& grad_out, at::TensorList states, const at::Tensor& weights,
                                        const at::Tensor& edge_weights, at::TensorList params, const at::Tensor& mixed,
                                        const std::optional<at::Tensor>& zs, const at::Tensor& mid_mean,
                                        const at::Tensor& mid_rstd, const at::Tensor& mean, const at::Tensor& rstd,
                                        at::IntArrayRef specs, int64_t groups);

}  // namespace edge
}  // namespace fastnas
