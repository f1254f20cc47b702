// LipLinear argument checks shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>

#include <optional>

namespace crvae_ext_cpp {

inline void check_lip_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "lip_linear: x and weight must be 2-D, got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "lip_linear: x has ", x.size(1),
              " features but weight expects ", weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && x.is_floating_point(),
              "lip_linear: x and weight must share a floating dtype, got ", x.scalar_type(),
              " and ", weight.scalar_type());
  TORCH_CHECK(scale.numel() == 1, "lip_linear: scale must hold one value, got shape ",
              scale.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "lip_linear: bias must have shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "lip_linear: bias has dtype ",
                bias->scalar_type(), " but weight has dtype ", weight.scalar_type());
  }
}

// `out` (the forward output y) is needed only when W needs a gradient and x does not: with
// grad_x at hand the rank-1 coefficient comes from <grad_x, x> instead.
inline void check_lip_linear_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                           const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& out,
                                           const at::Tensor& scale, const at::Tensor& u,
                                           const at::Tensor& v, bool need_x, bool need_w) {
  check_lip_linear_args(x, weight, bias, scale);
  const auto expected = std::vector<int64_t>{x.size(0), weight.size(0)};
  TORCH_CHECK(grad.sizes() == expected, "lip_linear_backward: grad must have shape ",
              at::IntArrayRef(expected), ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(),
              "lip_linear_backward: grad must have x's dtype ", x.scalar_type());
  const bool has_out = out.has_value() && out->defined();
  TORCH_CHECK(has_out || !need_w || need_x,
              "lip_linear_backward: out is required when weight needs a gradient and x does not");
  if (has_out) {
    TORCH_CHECK(out->sizes() == expected && out->scalar_type() == x.scalar_type(),
                "lip_linear_backward: out must have shape ", at::IntArrayRef(expected),
                " and x's dtype, got ", out->sizes(), " ", out->scalar_type());
  }
  TORCH_CHECK(
      u.dim() == 1 && u.size(0) == weight.size(0) && v.dim() == 1 && v.size(0) == weight.size(1),
      "lip_linear_backward: u, v must have shapes (", weight.size(0), ",), (", weight.size(1),
      ",), got ", u.sizes(), ", ", v.sizes());
}

}  // namespace crvae_ext_cpp
