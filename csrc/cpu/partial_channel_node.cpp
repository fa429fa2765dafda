// A PC-DARTS node on the CPU: the device-generic orchestration of
// csrc/partial_channel_node.cpp on the CPU kernels of its building blocks.
#include <torch/library.h>

#include "darts_edge.h"

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("partial_channel_node", &fastnas::edge::partial_channel_node);
  m.impl("partial_channel_node_backward", &fastnas::edge::partial_channel_node_backward);
}
