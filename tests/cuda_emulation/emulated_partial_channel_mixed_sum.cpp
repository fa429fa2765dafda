// The CUDA kernels of partial_channel_mixed_sum, compiled for the host emulation.
#define FASTNAS_CUDA_EMULATION
#include "cuda/partial_channel_mixed_sum.cu"
