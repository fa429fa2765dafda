// The CUDA runtime version these kernels were compiled against, for
// fastnas._C.build_info(); only nvcc sees the toolkit's own headers.
#include <cuda_runtime_api.h>

namespace fastnas {

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace fastnas
