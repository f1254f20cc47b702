// The CPU power iteration's core, shared by the power_iteration op and lip_linear_train.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace crvae_ext_cpp {

// n_iters steps u = W v / |W v|, v = W^T u / |W^T u| on a 2-D floating CPU weight (any strides,
// any floating dtype), in double: v (length n) is updated in place, u (length m) is written,
// and sigma = |W^T u| is returned.
double power_iteration_doubles(const at::Tensor& weight, std::vector<double>& v,
                               std::vector<double>& u, int64_t n_iters);

}  // namespace crvae_ext_cpp
