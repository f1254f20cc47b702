// GroupSort shared by the CPU and CUDA kernels: argument checks and the [outer, channels,
// inner] strided view that lets both read non-contiguous input without a copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

namespace crvae_ext_cpp {

// x viewed as [outer, channels, inner] (channels = size of the sorted dim), one stride each.
struct Lines {
  int64_t outer = 1, channels = 1, inner = 1;
  int64_t s_outer = 0, s_dim = 0, s_inner = 0;
};

// Merge dims [begin, end) of t into one (size, stride); false if they are not evenly strided.
inline bool merge_dims(const at::Tensor& t, int64_t begin, int64_t end, int64_t& size,
                       int64_t& stride) {
  size = 1;
  stride = 0;
  for (int64_t d = end - 1; d >= begin; --d) {
    const int64_t n = t.size(d);
    if (n == 1) continue;
    if (size == 1) {
      stride = t.stride(d);
    } else if (t.stride(d) != stride * size) {
      return false;
    }
    size *= n;
  }
  return true;
}

// The strided [outer, channels, inner] view of t around dim, or false if none exists.
inline bool lines_of(const at::Tensor& t, int64_t dim, Lines& lines) {
  lines.channels = t.size(dim);
  lines.s_dim = t.stride(dim);
  return merge_dims(t, 0, dim, lines.outer, lines.s_outer) &&
         merge_dims(t, dim + 1, t.dim(), lines.inner, lines.s_inner);
}

// t itself when it has a strided [outer, channels, inner] view, else a contiguous copy.
inline at::Tensor viewable(const at::Tensor& t, int64_t dim, Lines& lines) {
  if (lines_of(t, dim, lines)) return t;
  at::Tensor copy = t.contiguous();
  lines_of(copy, dim, lines);
  return copy;
}

inline void check_groupsort_args(const at::Tensor& x, int64_t group_size, int64_t dim) {
  TORCH_CHECK(x.is_floating_point(), "groupsort: x must be a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "groupsort: x must have at least one dimension");
  TORCH_CHECK(dim >= 0 && dim < x.dim(), "groupsort: dim=", dim,
              " is out of range for a tensor with ", x.dim(), " dimensions");
  TORCH_CHECK(group_size >= 1, "groupsort: group_size must be >= 1, got ", group_size);
  TORCH_CHECK(x.size(dim) % group_size == 0, "groupsort: group_size=", group_size,
              " does not divide size ", x.size(dim), " of dim ", dim);
}

inline void check_groupsort_backward_args(const at::Tensor& grad, const at::Tensor& x,
                                          int64_t group_size, int64_t dim) {
  check_groupsort_args(x, group_size, dim);
  TORCH_CHECK(grad.sizes() == x.sizes(), "groupsort_backward: grad has shape ", grad.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "groupsort_backward: grad has dtype ",
              grad.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), "groupsort_backward: grad is on ", grad.device(),
              " but x is on ", x.device());
}

}  // namespace crvae_ext_cpp
