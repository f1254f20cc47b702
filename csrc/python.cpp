// Python entry points for the two ops the layers call on every eager step (GroupSort's and
// LipLinear's training forward), and the GEMM split plan the tests check. Each entry calls the
// registered op through the dispatcher, so profilers and dispatch modes still see it, but skips
// torch.ops' per-call parsing of the arguments against the schema and releases the GIL as
// torch's own bindings do. Each returns None, before any work, where the caller must take its
// Python path instead: x not a plain tensor (a subclass's __torch_function__), a
// TorchFunctionMode active (it must see the call), or a functorch transform active (vmap,
// grad, ...: the ops' Python rules). Only x is checked: LipLinear passes its own plain
// parameters and buffers as the other tensors (modules/lip_linear.py, _fusable).
// crvae_ext/_cpp/__init__.py loads this module from the library's file and falls back to
// torch.ops where it cannot.
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <optional>

#include "dispatch.h"
#include "gemm_split.h"

namespace crvae_ext_cpp {
namespace {

namespace py = pybind11;

// functorch marks an active transform by including its layer keys in the thread's dispatch key
// set (what torch._C._are_functorch_transforms_active reads).
bool functorch_active() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

// The tensor behind x where the call may run here, else nullptr.
const at::Tensor* plain_tensor(py::handle x) {
  if (!THPVariable_CheckExact(x.ptr()) || at::impl::torch_function_mode_enabled() ||
      functorch_active()) {
    return nullptr;
  }
  return &THPVariable_Unpack(x.ptr());
}

// fn(the tensor behind x) with the GIL released, as a Python tensor; None where x may not run
// here (plain_tensor).
template <typename Fn>
py::object call_plain(py::handle x, const Fn& fn) {
  const at::Tensor* input = plain_tensor(x);
  if (input == nullptr) return py::none();
  at::Tensor out;
  {
    py::gil_scoped_release release;
    out = fn(*input);
  }
  PyObject* wrapped = THPVariable_Wrap(std::move(out));
  if (wrapped == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(wrapped);
}

py::object groupsort_autograd(py::handle x, int64_t group_size, int64_t dim) {
  static const auto op = find_op<Groupsort>("crvae_ext_cpp::groupsort_autograd");
  return call_plain(x, [&](const at::Tensor& input) { return op.call(input, group_size, dim); });
}

using Train = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         at::Tensor&, at::Tensor&, int64_t, double, double);

py::object lip_linear_train(py::handle x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::Tensor u, at::Tensor v,
                            int64_t n_iters, double lipschitz, double sigma_floor) {
  static const auto op = find_op<Train>("crvae_ext_cpp::lip_linear_train");
  return call_plain(x, [&](const at::Tensor& input) {
    return op.call(input, weight, bias, u, v, n_iters, lipschitz, sigma_floor);
  });
}

// (parts, "columns" or "rows"): how the cpp LipLinear kernels split a GEMM of `batch` rows and
// `columns` output columns on this thread's settings (gemm_split.h), for the tests to check
// that their shapes take the split they mean to test.
py::tuple split_plan_tuple(int64_t batch, int64_t columns) {
  const SplitPlan plan = crvae_ext_cpp::split_plan(batch, columns);
  return py::make_tuple(plan.parts, plan.by_rows ? "rows" : "columns");
}

}  // namespace
}  // namespace crvae_ext_cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("groupsort_autograd", &crvae_ext_cpp::groupsort_autograd);
  m.def("lip_linear_train", &crvae_ext_cpp::lip_linear_train);
  m.def("split_plan", &crvae_ext_cpp::split_plan_tuple);
}
