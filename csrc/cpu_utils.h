// Small CPU helpers that read and write vectors and scalars without launching ATen ops: each
// small ATen op (a .to(), an .item()) has a fixed dispatch cost that adds up per step.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <vector>

namespace crvae_ext_cpp {

// The elements of a 1-D floating tensor (any stride, any floating dtype) as doubles.
inline std::vector<double> to_doubles(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 1 && t.is_floating_point(), "expected a 1-D floating tensor");
  std::vector<double> out(static_cast<size_t>(t.size(0)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "to_doubles", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i * stride]);
  });
  return out;
}

// Writes values into a contiguous floating tensor of any floating dtype.
inline void from_doubles(const double* values, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "from_doubles", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < out.numel(); ++i) p[i] = static_cast<scalar_t>(values[i]);
  });
}

// The value of a one-element CPU tensor.
inline double scalar_value(const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1 && t.is_cpu(), "expected a one-element CPU tensor");
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "scalar_value", [&] {
    value = static_cast<double>(*t.const_data_ptr<scalar_t>());
  });
  return value;
}

}  // namespace crvae_ext_cpp
