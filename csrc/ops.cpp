// Schemas of the C++ backend's ops (namespace crvae_ext_cpp); kernels register per device in
// groupsort.cpp, power_iteration.cpp, lip_linear.cpp (CPU) and cuda/*.cu (CUDA); the *_autograd
// ops are C++ autograd nodes over them (autograd.cpp), any device, and lip_linear_train the
// LipLinear training forward in one call (autograd.cpp, CPU).
#include <torch/library.h>

TORCH_LIBRARY(crvae_ext_cpp, m) {
  m.def("groupsort(Tensor x, int group_size, int dim) -> Tensor");
  m.def("groupsort_backward(Tensor grad, Tensor x, int group_size, int dim) -> Tensor");
  m.def("groupsort_autograd(Tensor x, int group_size, int dim) -> Tensor");
  m.def("power_iteration(Tensor weight, Tensor v, int n_iters) -> (Tensor, Tensor, Tensor)");
  m.def("lip_linear(Tensor x, Tensor weight, Tensor? bias, Tensor scale) -> Tensor");
  m.def(
      "lip_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor? out, "
      "Tensor scale, Tensor u, Tensor v, float lipschitz, bool[3] needs) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "lip_linear_autograd(Tensor x, Tensor weight, Tensor? bias, Tensor scale, Tensor u, "
      "Tensor v, float lipschitz) -> Tensor");
  m.def(
      "lip_linear_train(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) u, Tensor(b!) v, "
      "int n_iters, float lipschitz, float sigma_floor) -> Tensor");
}
