// The CUDA kernels of darts_sum, compiled for the host emulation.
#define FASTNAS_CUDA_EMULATION
#include "cuda/darts_sum.cu"
