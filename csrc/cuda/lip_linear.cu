// LipLinear's spectral path on CUDA: y = scale * (x W^T) + b and its analytic backward.
//
// The scale lives on the device (k / sigma from the power iteration), so it never becomes a
// GEMM alpha (that would need a host sync): the forward is a GEMM and one fused epilogue pass;
// the backward scales grad once, runs the two GEMMs on it, takes <G, y - b> as <grad_x, x>
// (or from y when x needs no gradient) and adds the rank-1 term of d sigma / dW in place, its
// coefficient read on the device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cuda/launch.cuh"
#include "lip_linear.h"

namespace crvae_ext_cpp {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t work) { return grid_for(work, kThreads); }

// Scale and accumulation type: fp64 for fp64 tensors, fp32 otherwise.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
at::ScalarType acc_type() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

// y = y * scale + b in place (b may be null).
template <typename T>
__global__ void scale_bias(T* __restrict__ y, int64_t rows, int64_t cols,
                           const T* __restrict__ bias, const Acc<T>* __restrict__ scale) {
  using Op = at::opmath_type<T>;
  const Op s = static_cast<Op>(*scale);
  const int64_t n = rows * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const Op b = bias == nullptr ? Op(0) : static_cast<Op>(bias[e % cols]);
    y[e] = static_cast<T>(static_cast<Op>(y[e]) * s + b);
  }
}

// g = grad * scale, elementwise over dense tensors.
template <typename T>
__global__ void scale_grad(const T* __restrict__ grad, int64_t n, const Acc<T>* __restrict__ scale,
                           T* __restrict__ g) {
  using A = Acc<T>;
  const A s = *scale;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    g[e] = static_cast<T>(static_cast<A>(grad[e]) * s);
  }
}

// *total += <a, b> over dense tensors: per-thread sums, warp shuffles, one atomic per block.
template <typename T>
__global__ void dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n,
                    Acc<T>* __restrict__ total) {
  using A = Acc<T>;
  __shared__ A warp_totals[kThreads / 32];
  A sum = 0;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    sum += static_cast<A>(a[e]) * static_cast<A>(b[e]);
  }
  sum = warp_sum(sum);
  if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    A block_total = 0;
    for (int w = 0; w < kThreads / 32; ++w) block_total += warp_totals[w];
    atomicAdd(total, block_total);
  }
}

// grad_w[i, j] += coef * u[i] * v[j], coef = -(<grad, y> - <grad_b, b>) * scale / k.
template <typename T>
__global__ void add_rank1(T* __restrict__ grad_w, int64_t rows, int64_t cols,
                          const Acc<T>* __restrict__ u, const Acc<T>* __restrict__ v,
                          const Acc<T>* __restrict__ inner, const Acc<T>* __restrict__ bias_dot,
                          const Acc<T>* __restrict__ scale, double lipschitz) {
  using A = Acc<T>;
  const A dot = *inner - (bias_dot == nullptr ? A(0) : *bias_dot);
  const A coef = -dot * *scale / static_cast<A>(lipschitz);
  const int64_t n = rows * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = e / cols, j = e % cols;
    grad_w[e] = static_cast<T>(static_cast<A>(grad_w[e]) + coef * u[i] * v[j]);
  }
}

at::Tensor lip_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& scale) {
  check_lip_linear_args(x, weight, bias, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::mm(x, weight.t()).contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "lip_linear_cuda", [&] {
        const at::Tensor s = scale.to(out.options().dtype(acc_type<scalar_t>())).reshape({});
        scale_bias<scalar_t><<<blocks_for(out.numel()), kThreads, 0, current_stream()>>>(
            out.mutable_data_ptr<scalar_t>(), out.size(0), out.size(1),
            has_bias ? b.const_data_ptr<scalar_t>() : nullptr, s.const_data_ptr<Acc<scalar_t>>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lip_linear_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias_opt, const std::optional<at::Tensor>& out,
    const at::Tensor& scale, const at::Tensor& u, const at::Tensor& v, double lipschitz,
    std::array<bool, 3> needs) {
  const auto [need_x, need_w, need_b] = needs;
  check_lip_linear_backward_args(grad_in, x_in, weight, bias_opt, out, scale, u, v, need_x, need_w);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  at::Tensor grad_x, grad_w, grad_b;
  const at::Tensor grad = grad_in.contiguous();
  if (has_bias && (need_b || (need_w && !need_x))) grad_b = grad.sum(0);
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "lip_linear_backward_cuda", [&] {
        using A = Acc<scalar_t>;
        if (!need_x && !need_w) return;
        const auto acc = grad.options().dtype(acc_type<scalar_t>());
        const at::Tensor s = scale.to(acc).reshape({});
        at::Tensor g = at::empty_like(grad);
        scale_grad<scalar_t><<<blocks_for(grad.numel()), kThreads, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), grad.numel(), s.const_data_ptr<A>(),
            g.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (need_x) grad_x = at::mm(g, weight);
        if (!need_w) return;
        // <G, y - b> = <s G W, x> = <grad_x, x> when grad_x exists, else <G, y> - <1^T G, b>.
        at::Tensor inner = at::zeros({}, acc), bias_dot;
        const at::Tensor a = need_x ? grad_x.contiguous() : grad;
        const at::Tensor b = need_x ? x_in.contiguous() : out->contiguous();
        dot<scalar_t><<<blocks_for(a.numel()), kThreads, 0, stream>>>(
            a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), a.numel(),
            inner.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (!need_x && has_bias) bias_dot = at::dot(grad_b.to(acc), bias_opt->to(acc));
        grad_w = at::mm(g.t(), x_in).contiguous();
        const at::Tensor uu = u.to(acc).contiguous(), vv = v.to(acc).contiguous();
        add_rank1<scalar_t><<<blocks_for(grad_w.numel()), kThreads, 0, stream>>>(
            grad_w.mutable_data_ptr<scalar_t>(), grad_w.size(0), grad_w.size(1),
            uu.const_data_ptr<A>(), vv.const_data_ptr<A>(), inner.const_data_ptr<A>(),
            bias_dot.defined() ? bias_dot.const_data_ptr<A>() : nullptr, s.const_data_ptr<A>(),
            lipschitz);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  if (!need_b) grad_b = at::Tensor();
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(crvae_ext_cpp, CUDA, m) {
  m.impl("lip_linear", &lip_linear_cuda);
  m.impl("lip_linear_backward", &lip_linear_backward_cuda);
}

}  // namespace crvae_ext_cpp
