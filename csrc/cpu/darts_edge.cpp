// The fused DARTS edge on the CPU: the device-generic orchestration of
// csrc/darts_edge.cpp on the CPU kernels of its building blocks.
#include <torch/library.h>

#include "darts_edge.h"

TORCH_LIBRARY_IMPL(fastnas, CPU, m) {
  m.impl("darts_edge", &fastnas::edge::darts_edge);
  m.impl("darts_edge_backward", &fastnas::edge::darts_edge_backward);
}
