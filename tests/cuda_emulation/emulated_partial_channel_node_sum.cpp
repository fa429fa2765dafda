// The CUDA kernels of partial_channel_node_sum, compiled for the host emulation.
#define FASTNAS_CUDA_EMULATION
#include "cuda/partial_channel_node_sum.cu"
