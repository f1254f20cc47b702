// The CPU power iteration's core, shared by the power_iteration op and lip_linear_train.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace crvae_ext_cpp {

struct PowerIterationStep {
  double sigma;     // |W^T u|, in double
  at::Tensor u, v;  // fp32 (fp64 for a double weight), as the power_iteration op returns them
};

// n_iters steps u = W v / |W v|, v = W^T u / |W^T u| from the vector v_in on a 2-D floating CPU
// weight (any strides, any floating dtype), every sum in double; the arguments unchecked but
// for v_in's length.
PowerIterationStep power_iteration_step(const at::Tensor& weight, const at::Tensor& v_in,
                                        int64_t n_iters);

}  // namespace crvae_ext_cpp
