// A PC-DARTS node (fastnas::partial_channel_node) in one call per direction: every
// incoming edge's fused candidates (csrc/darts_edge.cpp) on the first C / groups
// channels of its input, then partial_channel_node_sum over the edges' outputs,
// their bypass channels and the edge weights; its autograd.
//
// The arithmetic is that of the modules' path (one fastnas.ops.darts_edge per edge
// on h[:, :C/groups], then partial_channel_node_sum), op for op.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "darts_edge.h"

namespace fastnas {
namespace edge {

using at::Tensor;
using at::TensorList;

namespace {

// The node's edges: their specs and where each one's parameters and buffers start.
struct Node {
  std::vector<Spec> specs;
  // Where each edge starts in the flat parameter and buffer lists, and in the
  // packed zs (nz rows), mid statistics (ns rows) and statistics (nz + 2 rows).
  std::vector<int64_t> param_start, norm_start, zs_start, mid_start, stat_start, strides;
  int64_t channels = 0, part = 0;  // C, and the C / groups channels through the candidates
};

Node decode_node(const char* op, TensorList states, at::IntArrayRef encoded, at::ArrayRef<double> eps,
                 at::ArrayRef<double> momentum, int64_t groups) {
  const int64_t E = static_cast<int64_t>(states.size());
  TORCH_CHECK_VALUE(E >= 1, op, ": states is empty; a node needs at least one edge");
  TORCH_CHECK_VALUE(static_cast<int64_t>(eps.size()) == E && static_cast<int64_t>(momentum.size()) == E, op,
                    ": eps and momentum need one entry per edge (", E, "), got ", eps.size(), " and ", momentum.size());
  Node node;
  int64_t offset = 0, params = 0, norms = 0, zs = 0, mid = 0, stats = 0;
  for (int64_t e = 0; e < E; ++e) {
    node.specs.push_back(decode_spec(op, encoded, offset, eps[e], momentum[e]));
    const Spec& s = node.specs.back();
    offset += s.encoded_size();
    node.param_start.push_back(params);
    node.norm_start.push_back(norms);
    node.zs_start.push_back(zs);
    node.mid_start.push_back(mid);
    node.stat_start.push_back(stats);
    node.strides.push_back(s.stride);
    params += s.n_params();
    norms += s.n_norms();
    zs += s.nz();
    mid += s.ns;
    stats += s.nz() + 2;
  }
  node.param_start.push_back(params);
  node.norm_start.push_back(norms);
  node.zs_start.push_back(zs);
  node.mid_start.push_back(mid);
  node.stat_start.push_back(stats);
  TORCH_CHECK_VALUE(offset == static_cast<int64_t>(encoded.size()), op, ": specs has ", encoded.size(), " ints; the ",
                    E, " edges' headers describe ", offset);
  const Tensor& s0 = states[0];
  TORCH_CHECK_VALUE(s0.dim() == 4, op, ": states[0] must be (N, C, H, W), got shape ", s0.sizes());
  node.channels = s0.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && node.channels % groups == 0, op, ": groups=", groups,
                    " must be >= 1 and divide the ", node.channels, " channels");
  node.part = node.channels / groups;
  for (int64_t e = 0; e < E; ++e) {
    const Tensor& h = states[e];
    TORCH_CHECK_VALUE(h.dim() == 4 && h.size(0) == s0.size(0) && h.size(1) == node.channels, op, ": states[", e,
                      "] has shape ", h.sizes(), "; every state must be (N, C) = (", s0.size(0), ", ", node.channels,
                      ", H, W)");
    TORCH_CHECK_VALUE(h.size(2) == node.strides[e] * ((s0.size(2) - 1) / node.strides[0] + 1) &&
                          h.size(3) == node.strides[e] * ((s0.size(3) - 1) / node.strides[0] + 1),
                      op, ": states[", e, "] is ", h.size(2), "x", h.size(3), "; with stride ", node.strides[e],
                      " every edge of the node must output ", (s0.size(2) - 1) / node.strides[0] + 1, "x",
                      (s0.size(3) - 1) / node.strides[0] + 1);
    TORCH_CHECK_TYPE(h.scalar_type() == s0.scalar_type(), op, ": states[", e, "] has dtype ", h.scalar_type(),
                     " but states[0] has ", s0.scalar_type());
  }
  return node;
}

// Edge e's slice of a flat list, and of a packed tensor.
TensorList slice(TensorList list, const std::vector<int64_t>& start, int64_t e) {
  return list.empty() ? list : list.slice(start[e], start[e + 1] - start[e]);
}

Tensor rows(const Tensor& packed, const std::vector<int64_t>& start, int64_t e) {
  return packed.narrow(0, start[e], start[e + 1] - start[e]);
}

void check_node(const char* op, const Node& node, TensorList states, const Tensor& weights, const Tensor& edge_weights,
                TensorList params, const Buffers& buffers) {
  const int64_t E = static_cast<int64_t>(states.size());
  const int64_t K = node.specs[0].K;
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == E && weights.size(1) == K, op,
                    ": weights must have shape (edges, candidates) = (", E, ", ", K, "), got ", weights.sizes());
  TORCH_CHECK_VALUE(edge_weights.dim() == 1 && edge_weights.size(0) == E, op, ": edge_weights must have shape (", E,
                    ",), one per edge, got ", edge_weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(edge_weights.scalar_type()), op, ": edge_weights has dtype ",
                   edge_weights.scalar_type(), "; expected a floating dtype");
  TORCH_CHECK_VALUE(edge_weights.device() == states[0].device(), op, ": edge_weights is on ", edge_weights.device(),
                    " but the states are on ", states[0].device());
  TORCH_CHECK_VALUE(static_cast<int64_t>(params.size()) == node.param_start[E], op, ": expected ", node.param_start[E],
                    " parameter tensors for the node's ", E, " edges, got ", params.size());
  if (!buffers.empty()) {
    const std::pair<const char*, TensorList> lists[] = {
        {"running_mean", buffers.mean}, {"running_var", buffers.var}, {"num_batches_tracked", buffers.count}};
    for (const auto& [name, list] : lists) {
      TORCH_CHECK_VALUE(static_cast<int64_t>(list.size()) == node.norm_start[E], op, ": ", name, " has ", list.size(),
                        " tensors; the node's edges have ", node.norm_start[E], " batch norms");
    }
  }
  for (int64_t e = 0; e < E; ++e) {
    const Spec& s = node.specs[e];
    TORCH_CHECK_VALUE(s.K == K, op, ": every edge needs K=", K, " weights; edge ", e, " has K=", s.K);
    const Buffers b{slice(buffers.mean, node.norm_start, e), slice(buffers.var, node.norm_start, e),
                    slice(buffers.count, node.norm_start, e)};
    const std::string edge_op = std::string(op) + " (edge " + std::to_string(e) + ")";
    check_edge(edge_op.c_str(), s, states[e].narrow(1, 0, node.part), weights.select(0, e),
               slice(params, node.param_start, e), b);
  }
}

using NodeSum = Tensor(TensorList, TensorList, const Tensor&, int64_t, at::IntArrayRef);
using NodeSumBackward = std::tuple<std::vector<Tensor>, std::vector<Tensor>, Tensor>(const Tensor&, TensorList,
                                                                                     TensorList, const Tensor&, int64_t,
                                                                                     at::IntArrayRef,
                                                                                     const c10::List<bool>&,
                                                                                     const c10::List<bool>&, bool);

const c10::TypedOperatorHandle<NodeSum>& node_sum_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastnas::partial_channel_node_sum", "").typed<NodeSum>();
  return op;
}

const c10::TypedOperatorHandle<NodeSumBackward>& node_sum_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnas::partial_channel_node_sum_backward", "")
                             .typed<NodeSumBackward>();
  return op;
}

std::vector<Tensor> bypass_of(const Node& node, TensorList states) {
  std::vector<Tensor> bypass;
  bypass.reserve(states.size());
  for (const Tensor& h : states) bypass.push_back(h.narrow(1, node.part, node.channels - node.part));
  return bypass;
}

}  // namespace

NodeOutputs partial_channel_node(TensorList states, const Tensor& weights, const Tensor& edge_weights,
                                 TensorList params, TensorList running_mean, TensorList running_var,
                                 TensorList num_batches_tracked, at::IntArrayRef specs, at::ArrayRef<double> eps,
                                 at::ArrayRef<double> momentum, int64_t groups, c10::string_view memory) {
  constexpr const char* op = "partial_channel_node";
  check_memory(op, memory);
  const Node node = decode_node(op, states, specs, eps, momentum, groups);
  const Buffers buffers{running_mean, running_var, num_batches_tracked};
  check_node(op, node, states, weights, edge_weights, params, buffers);
  const int64_t E = static_cast<int64_t>(states.size());
  const Tensor& h0 = states[0];
  const int64_t N = h0.size(0), Ho = (h0.size(2) - 1) / node.strides[0] + 1,
                Wo = (h0.size(3) - 1) / node.strides[0] + 1;
  // Each edge writes its pre-BN tensors straight into its rows of the packed zs.
  const Tensor zs = at::empty({node.zs_start[E], node.part, N, Ho, Wo}, h0.options());
  std::vector<Tensor> mixed, mid_mean, mid_rstd, mean, rstd;
  for (int64_t e = 0; e < E; ++e) {
    const Buffers b{slice(running_mean, node.norm_start, e), slice(running_var, node.norm_start, e),
                    slice(num_batches_tracked, node.norm_start, e)};
    auto [out, z, m1, r1, m, r] = edge_forward(node.specs[e], states[e].narrow(1, 0, node.part), weights.select(0, e),
                                               slice(params, node.param_start, e), b, rows(zs, node.zs_start, e));
    mixed.push_back(std::move(out));
    mid_mean.push_back(std::move(m1));
    mid_rstd.push_back(std::move(r1));
    mean.push_back(std::move(m));
    rstd.push_back(std::move(r));
  }
  Tensor out = node_sum_op().call(mixed, bypass_of(node, states), edge_weights, groups, node.strides);
  return {std::move(out), at::stack(mixed), zs, at::cat(mid_mean), at::cat(mid_rstd), at::cat(mean), at::cat(rstd)};
}

NodeGrads partial_channel_node_backward(const Tensor& grad_out, TensorList states, const Tensor& weights,
                                        const Tensor& edge_weights, TensorList params, const Tensor& mixed,
                                        const std::optional<Tensor>& zs_opt, const Tensor& mid_mean,
                                        const Tensor& mid_rstd, const Tensor& mean, const Tensor& rstd,
                                        at::IntArrayRef specs, int64_t groups) {
  constexpr const char* op = "partial_channel_node_backward";
  const int64_t E = static_cast<int64_t>(states.size());
  const std::vector<double> zeros(E, 0.0);
  const Node node = decode_node(op, states, specs, zeros, zeros, groups);
  check_node(op, node, states, weights, edge_weights, params, Buffers{});
  const Tensor zs = zs_opt.has_value() ? *zs_opt : Tensor();
  const std::tuple<const char*, const Tensor*, int64_t> packed[] = {{"zs", &zs, node.zs_start[E]},
                                                                    {"mid_mean", &mid_mean, node.mid_start[E]},
                                                                    {"mid_rstd", &mid_rstd, node.mid_start[E]},
                                                                    {"mean", &mean, node.stat_start[E]},
                                                                    {"rstd", &rstd, node.stat_start[E]}};
  for (const auto& [name, t, n] : packed) {
    TORCH_CHECK_VALUE(!t->defined() || (t->dim() >= 2 && t->size(0) == n), op, ": ", name, " must pack ", n,
                      " rows, one block per edge, got shape ", t->sizes());
  }
  TORCH_CHECK_VALUE(mixed.dim() == 5 && mixed.size(0) == E, op, ": mixed must be (E, N, C / groups, Ho, Wo) with E=", E,
                    ", got shape ", mixed.sizes());
  std::vector<Tensor> parts, mixed_e;
  std::vector<Saved> saved;
  for (int64_t e = 0; e < E; ++e) {
    parts.push_back(states[e].narrow(1, 0, node.part));
    mixed_e.push_back(mixed.select(0, e));
    saved.push_back({zs.defined() ? rows(zs, node.zs_start, e) : Tensor(), rows(mid_mean, node.mid_start, e),
                     rows(mid_rstd, node.mid_start, e), rows(mean, node.stat_start, e),
                     rows(rstd, node.stat_start, e)});
    check_saved(op, node.specs[e], parts[e], mixed_e[e], saved[e], "each edge's mixed output");
  }
  c10::List<bool> all;
  all.reserve(E);
  for (int64_t e = 0; e < E; ++e) all.push_back(true);
  auto [grad_mixed, grad_bypass, grad_edge_weights] = node_sum_backward_op().call(
      grad_out, mixed_e, bypass_of(node, states), edge_weights, groups, node.strides, all, all, true);
  std::vector<Tensor> grad_states, grad_weights, grad_params;
  grad_params.reserve(params.size());
  for (int64_t e = 0; e < E; ++e) {
    auto [grad_part, grad_w, grads] = edge_backward(node.specs[e], grad_mixed[e], parts[e], weights.select(0, e),
                                                    slice(params, node.param_start, e), saved[e]);
    Tensor grad = at::empty(states[e].sizes(), grad_part.options().memory_format(at::MemoryFormat::Contiguous));
    grad.narrow(1, 0, node.part).copy_(grad_part);
    grad.narrow(1, node.part, node.channels - node.part).copy_(grad_bypass[e]);
    grad_states.push_back(std::move(grad));
    grad_weights.push_back(std::move(grad_w));
    std::move(grads.begin(), grads.end(), std::back_inserter(grad_params));
  }
  return {std::move(grad_states), at::stack(grad_weights), std::move(grad_edge_weights), std::move(grad_params)};
}

// --- autograd ---------------------------------------------------------------------------

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct NodeArgs {
  TensorList running_mean, running_var, num_batches_tracked;
  at::IntArrayRef specs;
  at::ArrayRef<double> eps, momentum;
  int64_t groups;
  c10::string_view memory;
};

class PartialChannelNodeFunction : public torch::autograd::Function<PartialChannelNodeFunction> {
 public:
  // Differentiable inputs: states, weights, edge_weights, params; the rest in args.
  static variable_list forward(AutogradContext* ctx, c10::DispatchKeySet keys, TensorList states, const Tensor& weights,
                               const Tensor& edge_weights, TensorList params, NodeArgs args) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastnas::partial_channel_node", "")
                               .typed<decltype(fastnas::edge::partial_channel_node)>();
    // The building blocks this op calls skip autograd (they would each pass through
    // its dispatch, a Python function for the ops registered from Python).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mixed, zs, mid_mean, mid_rstd, mean, rstd] = op.redispatch(
        keys & c10::after_autograd_keyset, states, weights, edge_weights, params, args.running_mean, args.running_var,
        args.num_batches_tracked, args.specs, args.eps, args.momentum, args.groups, args.memory);
    bump_versions({args.running_mean, args.running_var, args.num_batches_tracked});
    std::vector<Tensor> saved(states.begin(), states.end());
    saved.insert(saved.end(), {weights, edge_weights});
    saved.insert(saved.end(), params.begin(), params.end());
    saved.insert(saved.end(), {mixed, args.memory == "save" ? zs : Tensor(), mid_mean, mid_rstd, mean, rstd});
    ctx->save_for_backward(saved);
    ctx->saved_data["specs"] = args.specs.vec();
    ctx->saved_data["groups"] = args.groups;
    ctx->saved_data["edges"] = static_cast<int64_t>(states.size());
    ctx->mark_non_differentiable({mixed, zs, mid_mean, mid_rstd, mean, rstd});
    // The non-differentiable outputs' gradients stay undefined (materialised, they
    // would be one zero-filled launch each per backward); backward reads only grads[0].
    ctx->set_materialize_grads(false);
    return {out, mixed, zs, mid_mean, mid_rstd, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastnas::partial_channel_node_backward", "")
                               .typed<decltype(fastnas::edge::partial_channel_node_backward)>();
    const variable_list saved = ctx->get_saved_variables();
    const int64_t E = ctx->saved_data["edges"].toInt();
    const int64_t P = static_cast<int64_t>(saved.size()) - E - 8;
    // One entry per forward argument: keys, states..., weights, edge_weights, params..., args.
    variable_list result(E + P + 4);
    if (!grads[0].defined()) return result;
    const Tensor* p = saved.data();
    const TensorList states(p, E), params(p + E + 2, P);
    const Tensor* packed = p + E + 2 + P;
    const std::vector<int64_t> specs = ctx->saved_data["specs"].toIntVector();
    check_not_double_backward("partial_channel_node");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_states, grad_weights, grad_edge_weights, grad_params] =
        op.call(grads[0], states, p[E], p[E + 1], params, packed[0],
                packed[1].defined() ? std::optional<Tensor>(packed[1]) : std::nullopt, packed[2], packed[3], packed[4],
                packed[5], specs, ctx->saved_data["groups"].toInt());
    std::move(grad_states.begin(), grad_states.end(), result.begin() + 1);
    result[E + 1] = std::move(grad_weights);
    result[E + 2] = std::move(grad_edge_weights);
    std::move(grad_params.begin(), grad_params.end(), result.begin() + E + 3);
    return result;
  }
};

NodeOutputs partial_channel_node_autograd(c10::DispatchKeySet keys, TensorList states, const Tensor& weights,
                                          const Tensor& edge_weights, TensorList params, TensorList running_mean,
                                          TensorList running_var, TensorList num_batches_tracked, at::IntArrayRef specs,
                                          at::ArrayRef<double> eps, at::ArrayRef<double> momentum, int64_t groups,
                                          c10::string_view memory) {
  check_memory("partial_channel_node", memory);
  const NodeArgs args{running_mean, running_var, num_batches_tracked, specs, eps, momentum, groups, memory};
  const variable_list out = PartialChannelNodeFunction::apply(keys, states, weights, edge_weights, params, args);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

}  // namespace

}  // namespace edge
}  // namespace fastnas

TORCH_LIBRARY_IMPL(fastnas, Autograd, m) {
  m.impl("partial_channel_node", &fastnas::edge::partial_channel_node_autograd);
}
