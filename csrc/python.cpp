// Python entry points for the two ops the layers call on every eager step (GroupSort's and
// LipLinear's training forward). Each calls the registered op through the dispatcher, so
// profilers and dispatch modes still see it, but skips torch.ops' per-call parsing of the
// arguments against the schema; the GIL is released as torch's own bindings do.
// crvae_ext/_cpp/__init__.py loads this module from the library's file and falls back to
// torch.ops where it cannot.
#include <torch/extension.h>

#include <optional>

#include "dispatch.h"

namespace crvae_ext_cpp {
namespace {

at::Tensor groupsort_autograd(const at::Tensor& x, int64_t group_size, int64_t dim) {
  static const auto op = find_op<Groupsort>("crvae_ext_cpp::groupsort_autograd");
  return op.call(x, group_size, dim);
}

using Train = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         at::Tensor&, at::Tensor&, int64_t, double, double);

at::Tensor lip_linear_train(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::Tensor u, at::Tensor v,
                            int64_t n_iters, double lipschitz, double sigma_floor) {
  static const auto op = find_op<Train>("crvae_ext_cpp::lip_linear_train");
  return op.call(x, weight, bias, u, v, n_iters, lipschitz, sigma_floor);
}

}  // namespace
}  // namespace crvae_ext_cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using Release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("groupsort_autograd", &crvae_ext_cpp::groupsort_autograd, Release());
  m.def("lip_linear_train", &crvae_ext_cpp::lip_linear_train, Release());
}
