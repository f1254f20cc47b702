// Autograd nodes in C++ for the cpp backend in plain eager mode: the same formulas as the
// public ops' (crvae_ext/ops.py), without a Python node's per-call cost in forward and backward.
//
// groupsort_autograd: forward is the groupsort kernel; backward routes the gradient back by the
// order recomputed from x (groupsort_backward). A gradient with stride 0 along dim (y.sum()) is
// equal inside every group, so no permutation moves it: it is passed on as it is. Under
// create_graph the backward calls the public op crvae_ext::groupsort_backward, whose own
// autograd (ops.py) differentiates it again.
//
// lip_linear_autograd: forward is the lip_linear kernel; backward is lip_linear_backward, y
// saved only when x needs no gradient (else <grad_x, x> stands in for <G, y - b>, and a backward
// that asks for W alone computes grad_x for it and drops it). Under
// create_graph the gradients are built from differentiable ATen ops, with sigma = u^T W v
// recomputed from W: the expressions of ops._lip_linear_grads_differentiable.
//
// lip_linear_train: LipLinear's whole training forward in one call, as the layer's Python path
// does it (modules/lip_linear.py: _iterate, then functional.lip_linear): n power-iteration steps
// from the buffer v, the buffers u, v overwritten unless sigma is 0 (or NaN), the scale
// k / max(sigma, floor) computed as reciprocal times k, then lip_linear_autograd. CPU tensors:
// the power iteration's core runs in place, sigma and the scale are computed on the host; where
// the GEMM splits over the threads the power iteration runs alongside it (lip_linear_train.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "dispatch.h"
#include "lip_linear_train.h"

namespace crvae_ext_cpp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using GroupsortBackward = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t);
using PublicGroupsortBackward =
    at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, c10::string_view);
using OptionalTensor = std::optional<at::Tensor>;
using LipLinear = at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                             const at::Tensor&);
using LipLinearBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&,
    const OptionalTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
    std::array<bool, 3>);

class GroupsortFunction : public torch::autograd::Function<GroupsortFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t group_size,
                            int64_t dim) {
    static const auto op = find_op<Groupsort>("crvae_ext_cpp::groupsort");
    ctx->save_for_backward({x});
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["dim"] = dim;
    return op.call(x, group_size, dim);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    const int64_t group_size = ctx->saved_data["group_size"].toInt();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const at::Tensor& grad = grads[0];
    if (at::GradMode::is_enabled()) {
      static const auto op =
          find_op<PublicGroupsortBackward>("crvae_ext::groupsort_backward");
      return {op.call(grad, x, group_size, dim, "cpp"), at::Tensor(), at::Tensor()};
    }
    if (grad.stride(dim) == 0) return {grad, at::Tensor(), at::Tensor()};
    static const auto op = find_op<GroupsortBackward>("crvae_ext_cpp::groupsort_backward");
    return {op.call(grad.contiguous(), x, group_size, dim), at::Tensor(), at::Tensor()};
  }
};

// Checks its arguments first, raising ValueError or TypeError for the caller's Python checks to
// take over and name the argument (functional.py), then records a node only where a gradient
// is wanted.
at::Tensor groupsort_autograd(const at::Tensor& x, int64_t group_size, int64_t dim) {
  TORCH_CHECK_TYPE(x.is_floating_point(), "groupsort: x must be a floating-point tensor");
  const int64_t ndim = x.dim();
  TORCH_CHECK_VALUE(ndim > 0 && -ndim <= dim && dim < ndim, "groupsort: dim out of range");
  const int64_t d = dim < 0 ? dim + ndim : dim;
  TORCH_CHECK_VALUE(group_size >= 2 && x.size(d) % group_size == 0,
                    "groupsort: group_size must be >= 2 and divide x.shape[dim]");
  if (!(x.requires_grad() && at::GradMode::is_enabled())) {
    static const auto op = find_op<Groupsort>("crvae_ext_cpp::groupsort");
    at::AutoDispatchBelowADInplaceOrView no_node;  // nothing to record: straight to the kernel
    return op.call(x, group_size, d);
  }
  return GroupsortFunction::apply(x, group_size, d);
}

OptionalTensor optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : std::nullopt;
}

// (grad_x, grad_w, grad_b) from differentiable ATen ops; undefined where not needed.
std::array<at::Tensor, 3> differentiable_grads(const at::Tensor& grad, const at::Tensor& x,
                                               const at::Tensor& weight, const at::Tensor& u,
                                               const at::Tensor& v, double lipschitz,
                                               std::array<bool, 3> needs) {
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  const at::Tensor w = weight.to(acc), g = grad.to(acc);
  const at::Tensor sigma = u.to(acc).dot(w.mv(v.to(acc)));
  const at::Tensor s = sigma.reciprocal().mul(lipschitz);
  std::array<at::Tensor, 3> out;
  if (needs[0]) out[0] = g.mm(w).mul(s).to(x.scalar_type());
  if (needs[1]) {
    const at::Tensor xa = x.to(acc);
    const at::Tensor inner = g.mul(xa.mm(w.t())).sum();
    const at::Tensor rank1 = u.to(acc).outer(v.to(acc)).mul(s.div(sigma).mul(inner));
    out[1] = g.t().mm(xa).mul(s).sub(rank1).to(weight.scalar_type());
  }
  if (needs[2]) out[2] = grad.sum(0);
  return out;
}

// The forward output when the caller has computed it already (lip_linear_train_overlapped); held
// in a struct so that the autograd node does not take it for one of its inputs.
struct Computed {
  at::Tensor out;
};

class LipLinearFunction : public torch::autograd::Function<LipLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptionalTensor& bias, const at::Tensor& scale,
                            const at::Tensor& u, const at::Tensor& v, double lipschitz,
                            const Computed& computed) {
    static const auto op = find_op<LipLinear>("crvae_ext_cpp::lip_linear");
    at::Tensor out = computed.out.defined() ? computed.out : op.call(x, weight, bias, scale);
    const at::Tensor kept = x.requires_grad() ? at::Tensor() : out;
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor()), scale, u, v, kept});
    ctx->saved_data["lipschitz"] = lipschitz;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &scale = saved[3];
    const at::Tensor &u = saved[4], &v = saved[5], &out = saved[6];
    const double lipschitz = ctx->saved_data["lipschitz"].toDouble();
    // what this backward pass asks for (autograd.grad may ask for W alone even though x
    // requires a gradient); the node's inputs are its tensor arguments, so bias is input 2
    // only when it is given
    const bool need_x = ctx->needs_input_grad(0);
    std::array<bool, 3> needs = {need_x, ctx->needs_input_grad(1),
                                 bias.defined() && ctx->needs_input_grad(2)};
    std::array<at::Tensor, 3> g;
    if (at::GradMode::is_enabled()) {
      g = differentiable_grads(grads[0], x, weight, u, v, lipschitz, needs);
    } else {
      // without the saved y, grad_x is what gives <G, y - b> (= <grad_x, x>) to dW
      needs[0] = need_x || (needs[1] && !out.defined());
      static const auto op = find_op<LipLinearBackward>("crvae_ext_cpp::lip_linear_backward");
      std::tie(g[0], g[1], g[2]) = op.call(grads[0], x, weight, optional(bias), optional(out),
                                           scale, u, v, lipschitz, needs);
      if (!need_x) g[0] = at::Tensor();
    }
    return {g[0], g[1], g[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor lip_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                               const OptionalTensor& bias, const at::Tensor& scale,
                               const at::Tensor& u, const at::Tensor& v, double lipschitz) {
  return LipLinearFunction::apply(x, weight, bias, scale, u, v, lipschitz, Computed{});
}

// The layer's buffer takes the step's vector: written directly where it is a dense tensor of
// the vector's dtype (its version bumped first, as copy_ does, which also refuses an inference
// tensor outside inference mode), else by copy_.
void store(at::Tensor& buffer, const at::Tensor& value) {
  if (buffer.scalar_type() != value.scalar_type() || !buffer.is_contiguous()) {
    buffer.copy_(value);
    return;
  }
  buffer.unsafeGetTensorImpl()->bump_version();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "store", [&] {
    std::copy_n(value.const_data_ptr<scalar_t>(), value.numel(),
                buffer.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor lip_linear_train(const at::Tensor& x, const at::Tensor& weight,
                            const OptionalTensor& bias, at::Tensor& u, at::Tensor& v,
                            int64_t n_iters, double lipschitz, double sigma_floor) {
  const bool has_bias = bias.has_value() && bias->defined();
  // The caller's Python path takes over on a ValueError or TypeError raised here, before any
  // buffer changes, and says what is wrong (modules/lip_linear.py).
  TORCH_CHECK_VALUE(x.is_cpu() && weight.is_cpu() && u.is_cpu() && v.is_cpu() &&
                        (!has_bias || bias->is_cpu()),
                    "lip_linear_train: CPU tensors only (sigma is read on the host)");
  TORCH_CHECK_VALUE(weight.dim() == 2 && x.dim() == 2 && x.size(1) == weight.size(1),
                    "lip_linear_train: x ", x.sizes(), " does not fit weight ", weight.sizes());
  TORCH_CHECK_TYPE(x.is_floating_point() && x.scalar_type() == weight.scalar_type() &&
                       v.is_floating_point() &&
                       (!has_bias || bias->scalar_type() == weight.scalar_type()),
                   "lip_linear_train: x, weight and bias must share one floating dtype");
  TORCH_CHECK_VALUE(u.dim() == 1 && u.size(0) == weight.size(0) && v.dim() == 1 &&
                        v.size(0) == weight.size(1) &&
                        (!has_bias || (bias->dim() == 1 && bias->size(0) == weight.size(0))),
                    "lip_linear_train: u, v or bias do not fit weight ", weight.sizes());
  TORCH_CHECK_VALUE(n_iters >= 1, "lip_linear_train: n_iters must be >= 1, got ", n_iters);
  // Where it pays, the power iteration runs within the forward's GEMM (lip_linear_train.cpp);
  // else the two run in turn, the node's forward calling the lip_linear kernel.
  std::optional<TrainForward> overlapped =
      lip_linear_train_overlapped(x, weight, bias, v, n_iters, lipschitz, sigma_floor);
  const bool fused = overlapped.has_value();
  TrainForward f = fused ? std::move(*overlapped) : TrainForward{};
  if (!fused) {
    f.step = power_iteration_step(weight, v, n_iters);
    f.scale = at::empty({}, f.step.u.options());
  }
  AT_DISPATCH_FLOATING_TYPES(f.scale.scalar_type(), "lip_linear_train", [&] {
    const auto sigma_t = static_cast<scalar_t>(f.step.sigma);
    if (!fused) *f.scale.mutable_data_ptr<scalar_t>() = scale_of(sigma_t, lipschitz, sigma_floor);
    if (sigma_t > 0) {
      const at::NoGradGuard no_grad;
      store(u, f.step.u);
      store(v, f.step.v);
    }
  });
  return LipLinearFunction::apply(x, weight, bias, f.scale, f.step.u, f.step.v, lipschitz,
                                  Computed{f.out});
}

}  // namespace

TORCH_LIBRARY_IMPL(crvae_ext_cpp, CompositeImplicitAutograd, m) {
  m.impl("groupsort_autograd", &groupsort_autograd);
  m.impl("lip_linear_autograd", &lip_linear_autograd);
  m.impl("lip_linear_train", &lip_linear_train);
}

}  // namespace crvae_ext_cpp
