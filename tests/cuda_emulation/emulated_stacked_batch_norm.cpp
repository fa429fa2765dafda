// The CUDA kernels of stacked_batch_norm, compiled for the host emulation.
#define FASTNAS_CUDA_EMULATION
#include "cuda/stacked_batch_norm.cu"
