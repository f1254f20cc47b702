// Power iteration on CUDA with one read of W from device memory per step.
//
// Each block takes tiles of kTile rows: a warp computes kRowsPerWarp dot products t_r = w_r . v
// (coalesced along the row, warp-shuffle reduction), then the block adds sum_r t_r w_r into s
// re-reading the tile from cache, one atomic add per column and tile. A one-block kernel then
// normalises (u = t / |t|, sigma = |W^T u|, v = W^T u / sigma) without a host round trip.
// Accumulation is in fp32 for fp16/bf16/fp32 weights and fp64 for fp64. The atomic adds make
// the last bits depend on scheduling.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "cuda/launch.cuh"

namespace crvae_ext_cpp {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 4;
constexpr int kTile = kWarps * kRowsPerWarp;
constexpr double kEps = 1e-12;  // as reference.power_iteration

// Sum over the block; every thread gets the total. `scratch` holds one value per warp.
template <typename A>
__device__ A block_sum(A value, A* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  value = warp_sum(value);
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// t = W v for the block's row tiles and s += W^T t (s zeroed by the caller).
template <typename T, typename A>
__global__ void rows_pass(const T* __restrict__ w, int64_t m, int64_t n, int64_t ld,
                          const A* __restrict__ v, A* __restrict__ t, A* __restrict__ s) {
  __shared__ A tile_t[kTile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t tiles = (m + kTile - 1) / kTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t r0 = tile * kTile;
    A acc[kRowsPerWarp];
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) acc[q] = 0;
    for (int64_t j = lane; j < n; j += 32) {
      const A vj = v[j];
#pragma unroll
      for (int q = 0; q < kRowsPerWarp; ++q) {
        const int64_t row = r0 + warp * kRowsPerWarp + q;
        if (row < m) acc[q] += static_cast<A>(w[row * ld + j]) * vj;
      }
    }
#pragma unroll
    for (int q = 0; q < kRowsPerWarp; ++q) {
      const A total = warp_sum(acc[q]);
      const int64_t row = r0 + warp * kRowsPerWarp + q;
      if (lane == 0) {
        tile_t[warp * kRowsPerWarp + q] = row < m ? total : A(0);
        if (row < m) t[row] = total;
      }
    }
    __syncthreads();
    const int rows = static_cast<int>(m - r0 < kTile ? m - r0 : kTile);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      A partial = 0;
      for (int r = 0; r < rows; ++r) partial += static_cast<A>(w[(r0 + r) * ld + j]) * tile_t[r];
      atomicAdd(s + j, partial);
    }
    __syncthreads();
  }
}

// u = t / |t| (in place), sigma = |s| / |t|, v = s / (|t| sigma), norms clamped to kEps.
template <typename A>
__global__ void normalise(A* __restrict__ t, int64_t m, const A* __restrict__ s, int64_t n,
                          A* __restrict__ v, A* __restrict__ sigma) {
  __shared__ A scratch[32];
  A tt = 0, ss = 0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) tt += t[i] * t[i];
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) ss += s[j] * s[j];
  tt = block_sum(tt, scratch);
  ss = block_sum(ss, scratch);
  const A t_norm = max(sqrt(tt), A(kEps));
  const A sig = sqrt(ss) / t_norm;
  const A v_norm = max(sig, A(kEps));
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) t[i] /= t_norm;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) v[j] = s[j] / t_norm / v_norm;
  if (threadIdx.x == 0) *sigma = sig;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cuda(const at::Tensor& weight_in,
                                                                    const at::Tensor& v_in,
                                                                    int64_t n_iters) {
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.is_floating_point(),
              "power_iteration: weight must be a 2-D floating-point tensor");
  TORCH_CHECK(v_in.dim() == 1 && v_in.size(0) == weight_in.size(1) && v_in.is_floating_point(),
              "power_iteration: v must be a floating-point vector of length ", weight_in.size(1));
  TORCH_CHECK(v_in.device() == weight_in.device(), "power_iteration: v and weight devices differ");
  TORCH_CHECK(n_iters >= 1, "power_iteration: n_iters must be >= 1, got ", n_iters);
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const int64_t m = weight_in.size(0), n = weight_in.size(1);
  // Rows read in place only when each is dense and none overlaps the next (an expanded weight
  // has row stride 0); anything else is copied once.
  const bool rows_dense =
      (n <= 1 || weight_in.stride(1) == 1) && (m <= 1 || weight_in.stride(0) >= n);
  const at::Tensor weight = rows_dense ? weight_in : weight_in.contiguous();
  const int64_t ld = weight.stride(0);
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = weight.options().dtype(acc);
  at::Tensor v = v_in.to(options, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor u = at::empty({m}, options), s = at::empty({n}, options);
  at::Tensor sigma = at::zeros({}, options);
  const auto stream = current_stream();
  const int blocks = grid_for(((m + kTile - 1) / kTile) * kWarps * 32, kWarps * 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "power_iteration_cuda", [&] {
        using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        for (int64_t step = 0; step < n_iters; ++step) {
          s.zero_();
          rows_pass<scalar_t, A><<<blocks, kWarps * 32, 0, stream>>>(
              weight.const_data_ptr<scalar_t>(), m, n, ld, v.const_data_ptr<A>(),
              u.mutable_data_ptr<A>(), s.mutable_data_ptr<A>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          normalise<A><<<1, 1024, 0, stream>>>(u.mutable_data_ptr<A>(), m, s.const_data_ptr<A>(), n,
                                               v.mutable_data_ptr<A>(),
                                               sigma.mutable_data_ptr<A>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {sigma, u, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(crvae_ext_cpp, CUDA, m) { m.impl("power_iteration", &power_iteration_cuda); }

}  // namespace crvae_ext_cpp
