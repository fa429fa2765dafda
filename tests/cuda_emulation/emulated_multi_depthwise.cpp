// The CUDA kernels of multi_depthwise, compiled for the host emulation.
#define FASTNAS_CUDA_EMULATION
#include "cuda/multi_depthwise.cu"
