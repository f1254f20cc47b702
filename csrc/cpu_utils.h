// Small CPU helpers that read and write vectors and scalars without launching ATen ops: each
// small ATen op (a .to(), an .item()) has a fixed dispatch cost that adds up per step.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <vector>

namespace crvae_ext_cpp {

// Where a scratch buffer serves; buffers of one name are never in use twice at once.
enum class Scratch {
  kPowerV,
  kPowerU,
  kPowerPartial,
  kRowSums,
  kRowBlock,
  kRank1U,
  kRank1V,
  kRank1Row
};

// n values of T, kept per thread across calls. A training step's temporaries then take no heap
// allocation: one would be carved out of the weight gradient that zero_grad freed, the next
// gradient would no longer fit there, and the fresh pages it takes fault on first touch.
template <typename T, Scratch Name>
T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// The n elements of a 1-D floating tensor (any stride, any floating dtype) as doubles, into out
// (room for n).
inline void to_doubles(const at::Tensor& t, double* out, int64_t n) {
  TORCH_CHECK(t.dim() == 1 && t.is_floating_point() && t.size(0) == n,
              "expected a 1-D floating tensor of length ", n, ", got shape ", t.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "to_doubles", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    if (stride == 1) {
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(p[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(p[i * stride]);
    }
  });
}

// Writes values into a contiguous floating tensor of any floating dtype.
inline void from_doubles(const double* values, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "from_doubles", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    const int64_t n = out.numel();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(values[i]);
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
