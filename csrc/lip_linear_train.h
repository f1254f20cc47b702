// LipLinear's one-call training forward on the CPU (autograd.cpp's lip_linear_train): the
// scale formula and the forward that hides the power iteration in the GEMM.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include "power_iteration.h"

namespace crvae_ext_cpp {

// k / max(sigma, floor) in T as the Python path computes it on a 0-dim tensor: clamp_min (NaN
// kept), reciprocal, then times k cast to T.
template <typename T>
T scale_of(T sigma, double lipschitz, double sigma_floor) {
  const T clamped = std::isnan(sigma) ? sigma : std::max(sigma, static_cast<T>(sigma_floor));
  return (T(1) / clamped) * static_cast<T>(lipschitz);
}

struct TrainForward {
  PowerIterationStep step;
  at::Tensor scale;  // k / max(sigma, floor), 0-dim, in step.u's dtype
  at::Tensor out;    // scale * x W^T + bias
};

// The power iteration from v and the forward output in one parallel region
// (lip_linear_train.cpp), for dense fp32/fp64 CPU tensors; std::nullopt where it does not apply
// (x, W or the bias not dense, fp16/bf16, one thread, inside a parallel region, no MKL, or a
// small batch with a narrow W: the caller then runs the two in turn). The arguments are checked
// by the caller.
std::optional<TrainForward> lip_linear_train_overlapped(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& v, int64_t n_iters, double lipschitz, double sigma_floor);

}  // namespace crvae_ext_cpp
