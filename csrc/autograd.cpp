// Autograd kernel of crvae_ext_cpp::groupsort: the backward node runs in C++.
//
// GroupSort is a cheap activation called once per layer, so a Python autograd Function around
// it costs as much as its kernels at typical sizes. With this kernel the eager fast path
// (crvae_ext/_cpp/_eager.py) calls the op directly and nothing in Python runs in the backward.
// The public crvae_ext::groupsort op calls crvae_ext_cpp::groupsort below autograd and keeps its
// own formula; both use crvae_ext_cpp::groupsort_backward.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace crvae_ext_cpp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_groupsort(const at::Tensor& x, int64_t group_size, int64_t dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("crvae_ext_cpp::groupsort", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
  return op.call(x, group_size, dim);
}

at::Tensor call_groupsort_backward(const at::Tensor& grad, const at::Tensor& x, int64_t group_size,
                                   int64_t dim) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("crvae_ext_cpp::groupsort_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(grad, x, group_size, dim);
}

class GroupSortFunction : public torch::autograd::Function<GroupSortFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t group_size,
                            int64_t dim) {
    ctx->save_for_backward({x});
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["dim"] = dim;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_groupsort(x, group_size, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    const int64_t group_size = ctx->saved_data["group_size"].toInt();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    return {call_groupsort_backward(grads[0], x, group_size, dim), at::Tensor(), at::Tensor()};
  }
};

// The backward's own node: differentiating it again (create_graph, e.g. a gradient penalty)
// raises, as the public op does, instead of silently dropping that part of the graph.
class GroupSortBackwardFunction : public torch::autograd::Function<GroupSortBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& x,
                            int64_t group_size, int64_t dim) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_groupsort_backward(grad, x, group_size, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false,
                "crvae_ext: double backward through groupsort is not implemented "
                "(crvae_ext_cpp::groupsort_backward has no derivative)");
    return {};
  }
};

at::Tensor groupsort_autograd(const at::Tensor& x, int64_t group_size, int64_t dim) {
  return GroupSortFunction::apply(x, group_size, dim);
}

at::Tensor groupsort_backward_autograd(const at::Tensor& grad, const at::Tensor& x,
                                       int64_t group_size, int64_t dim) {
  return GroupSortBackwardFunction::apply(grad, x, group_size, dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(crvae_ext_cpp, Autograd, m) {
  m.impl("groupsort", &groupsort_autograd);
  m.impl("groupsort_backward", &groupsort_backward_autograd);
}

}  // namespace crvae_ext_cpp
