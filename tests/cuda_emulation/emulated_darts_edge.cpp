// The fused DARTS edge's orchestration and its CUDA registration, compiled for
// the host emulation (see orchestration.h).
#include "orchestration.h"
// clang-format off
#include "darts_edge.cpp"
#include "cuda/darts_edge.cu"
// clang-format on
