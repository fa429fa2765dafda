// The CUDA kernels of mixed_sum, compiled for the host emulation.
#define FASTNAS_CUDA_EMULATION
#include "cuda/mixed_sum.cu"
