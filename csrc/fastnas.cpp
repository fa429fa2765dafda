// The schemas of the fastnas C++ ops. Kernels for each device are registered
// next to their code (csrc/cpu, csrc/cuda); fake impls and autograd are
// registered from Python (fastnas/ops).
#include <torch/library.h>

TORCH_LIBRARY(fastnas, m) {
  m.def("mixed_sum(Tensor[] xs, Tensor weights) -> Tensor");
  m.def(
      "mixed_sum_backward(Tensor grad_out, Tensor[] xs, Tensor weights, bool[] xs_need_grad, "
      "bool weights_need_grad) -> (Tensor[], Tensor)");
  m.def(
      "partial_channel_mixed_sum(Tensor[] xs, Tensor weights, Tensor bypass, int groups, "
      "bool bypass_pool) -> Tensor");
  m.def(
      "partial_channel_mixed_sum_backward(Tensor grad_out, Tensor[] xs, Tensor weights, Tensor bypass, "
      "int groups, bool bypass_pool, bool[] xs_need_grad, bool weights_need_grad, bool bypass_need_grad) "
      "-> (Tensor[], Tensor, Tensor)");
}
