// The schemas of the fastnas C++ ops. Kernels for each device are registered
// next to their code (csrc/cpu, csrc/cuda); fake impls and autograd are
// registered from Python (fastnas/ops).
#include <torch/library.h>

TORCH_LIBRARY(fastnas, m) {
  m.def("mixed_sum(Tensor[] xs, Tensor weights) -> Tensor");
  m.def(
      "mixed_sum_backward(Tensor grad_out, Tensor[] xs, Tensor weights, bool[] xs_need_grad, "
      "bool weights_need_grad) -> (Tensor[], Tensor)");
  m.def(
      "partial_channel_mixed_sum(Tensor[] xs, Tensor weights, Tensor bypass, int groups, "
      "bool bypass_pool) -> Tensor");
  m.def(
      "partial_channel_mixed_sum_backward(Tensor grad_out, Tensor[] xs, Tensor weights, Tensor bypass, "
      "int groups, bool bypass_pool, bool[] xs_need_grad, bool weights_need_grad, bool bypass_need_grad) "
      "-> (Tensor[], Tensor, Tensor)");

  // The memory engine's building blocks. Stacked tensors are channel-major,
  // (J, C, N, H, W): J candidates, each a (C, N*H*W) matrix, so a pointwise
  // convolution of all J is one bmm and per-channel statistics read rows.
  m.def(
      "multi_depthwise(Tensor x, Tensor[] weights, int[] dilations, int stride, Tensor? mean, "
      "Tensor? rstd, int[] activations=[]) -> Tensor");
  m.def(
      "multi_depthwise_backward(Tensor grad_out, Tensor x, Tensor[] weights, int[] dilations, int stride, "
      "Tensor? mean, Tensor? rstd, bool input_need_grad, int[] activations=[]) -> (Tensor, Tensor[])");
  m.def("stacked_batch_norm_stats(Tensor z, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("stacked_batch_norm_backward(Tensor grad_yhat, Tensor z, Tensor mean, Tensor rstd) -> Tensor");
  m.def(
      "update_running_stats(Tensor(a!)[] running_mean, Tensor(b!)[] running_var, Tensor(c!)[] num_batches_tracked, "
      "Tensor mean, Tensor var, int[] rows, float momentum, int count) -> ()");
  m.def("pool_batch_norm_stats(Tensor x, int stride, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "darts_sum(Tensor x, Tensor z, Tensor mean, Tensor rstd, Tensor coef, int stride, bool has_max, "
      "bool has_avg, bool has_skip) -> Tensor");
  m.def(
      "darts_sum_backward(Tensor grad_out, Tensor x, Tensor z, Tensor mean, Tensor rstd, Tensor coef, "
      "int stride, bool has_max, bool has_avg, bool has_skip, bool x_need_grad) -> (Tensor, Tensor, Tensor)");

  // A PC-DARTS node: sum_e weights[e] * channel_shuffle(cat([mixed[e], pool?(bypass[e])], 1), groups).
  m.def(
      "partial_channel_node_sum(Tensor[] mixed, Tensor[] bypass, Tensor weights, int groups, int[] strides) "
      "-> Tensor");
  m.def(
      "partial_channel_node_sum_backward(Tensor grad_out, Tensor[] mixed, Tensor[] bypass, Tensor weights, "
      "int groups, int[] strides, bool[] mixed_need_grad, bool[] bypass_need_grad, bool weights_need_grad) "
      "-> (Tensor[], Tensor[], Tensor)");

  // A whole DARTS edge on the building blocks (csrc/darts_edge.h): spec is
  // EdgeSpec.encoded; the running statistics are updated in place; zs and the
  // statistics are what backward reads (zs only under memory "save").
  m.def(
      "darts_edge(Tensor x, Tensor weights, Tensor[] params, Tensor(a!)[] running_mean, Tensor(b!)[] running_var, "
      "Tensor(c!)[] num_batches_tracked, int[] spec, float eps, float momentum, str memory) "
      "-> (Tensor out, Tensor zs, Tensor mid_mean, Tensor mid_rstd, Tensor mean, Tensor rstd)");
  m.def(
      "darts_edge_backward(Tensor grad_out, Tensor x, Tensor weights, Tensor[] params, Tensor? zs, Tensor mid_mean, "
      "Tensor mid_rstd, Tensor mean, Tensor rstd, int[] spec) -> (Tensor grad_x, Tensor grad_weights, "
      "Tensor[] grad_params)");

  // A PC-DARTS node in one call: every incoming edge's fused candidates (specs:
  // the edges' EdgeSpec.encoded one after the other) on the first C / groups
  // channels of its state, then partial_channel_node_sum with the edge weights.
  // The edges' mixed outputs and what darts_edge returns, packed along dim 0.
  m.def(
      "partial_channel_node(Tensor[] states, Tensor weights, Tensor edge_weights, Tensor[] params, "
      "Tensor(a!)[] running_mean, Tensor(b!)[] running_var, Tensor(c!)[] num_batches_tracked, int[] specs, "
      "float[] eps, float[] momentum, int groups, str memory) -> (Tensor out, Tensor mixed, Tensor zs, "
      "Tensor mid_mean, Tensor mid_rstd, Tensor mean, Tensor rstd)");
  m.def(
      "partial_channel_node_backward(Tensor grad_out, Tensor[] states, Tensor weights, Tensor edge_weights, "
      "Tensor[] params, Tensor mixed, Tensor? zs, Tensor mid_mean, Tensor mid_rstd, Tensor mean, Tensor rstd, "
      "int[] specs, int groups) -> (Tensor[] grad_states, Tensor grad_weights, Tensor grad_edge_weights, "
      "Tensor[] grad_params)");

  // A DARTS cell's input preprocessing (csrc/relu_conv_bn.cpp): ReLU, one 1x1
  // convolution (or two stride-2 ones, a factorized reduce), a non-affine batch
  // norm in training mode; backward recomputes the convolution from x.
  m.def(
      "relu_conv_bn(Tensor x, Tensor[] weights, Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!) num_batches_tracked, float eps, float momentum) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "relu_conv_bn_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor mean, Tensor rstd, float eps) "
      "-> (Tensor grad_x, Tensor[] grad_weights)");
}
