// The fused DARTS edge and the PC-DARTS node on CUDA: the device-generic
// orchestration of csrc/darts_edge.cpp and csrc/partial_channel_node.cpp on the
// CUDA kernels of their building blocks.
#include <torch/library.h>

#include "darts_edge.h"

TORCH_LIBRARY_IMPL(fastnas, CUDA, m) {
  m.impl("darts_edge", &fastnas::edge::darts_edge);
  m.impl("darts_edge_backward", &fastnas::edge::darts_edge_backward);
  m.impl("partial_channel_node", &fastnas::edge::partial_channel_node);
  m.impl("partial_channel_node_backward", &fastnas::edge::partial_channel_node_backward);
}
