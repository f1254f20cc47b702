// GroupSort on CUDA: stable ascending sort inside groups of `group_size` along `dim`.
//
// Groups of 2, 4 and 8: one thread per group, ranked in registers by pairwise comparisons.
// Other sizes: one thread per element, which counts the elements of its group sorting before
// it (O(group_size) per element). Grid-stride loops, 64-bit indices, any strides in and a
// contiguous output. Order as on the CPU and in torch.sort: ascending, NaN last, ties stable.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/launch.cuh"
#include "groupsort.h"

namespace crvae_ext_cpp {
namespace {

constexpr int kThreads = 256;

struct Strides {
  int64_t outer, dim, inner;
};

struct Geometry {
  int64_t outer, channels, inner, group_size;
};

Strides strides_of(const Lines& lines) { return {lines.s_outer, lines.s_dim, lines.s_inner}; }

Geometry geometry_of(const Lines& lines, int64_t group_size) {
  return {lines.outer, lines.channels, lines.inner, group_size};
}

// a sorts strictly before b: ascending, NaN last.
template <typename T>
__device__ __forceinline__ bool before(T a_in, T b_in) {
  using K = at::opmath_type<T>;
  const K a = static_cast<K>(a_in), b = static_cast<K>(b_in);
  return a < b || (b != b && a == a);
}

int blocks_for(int64_t work) { return grid_for(work, kThreads); }

// Rank of each of G register values in their stable ascending order.
template <typename T, int G>
__device__ __forceinline__ void ranks(const T (&v)[G], int (&r)[G]) {
#pragma unroll
  for (int k = 0; k < G; ++k) r[k] = 0;
#pragma unroll
  for (int a = 0; a < G; ++a) {
#pragma unroll
    for (int b = a + 1; b < G; ++b) {
      const int b_first = before(v[b], v[a]);
      r[a] += b_first;
      r[b] += 1 - b_first;
    }
  }
}

// One thread per group; `grad` null means forward (sort x into out), else route grad into out.
template <typename T, int G>
__global__ void groupsort_small(const T* __restrict__ x, Strides xs, const T* __restrict__ grad,
                                Strides gs, T* __restrict__ out, Geometry geo) {
  const int64_t groups = geo.channels / G;
  const int64_t lanes = geo.outer * groups * geo.inner;
  for (int64_t lane = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; lane < lanes;
       lane += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = lane % geo.inner, rest = lane / geo.inner;
    const int64_t c0 = (rest % groups) * G, o = rest / groups;
    const T* xp = x + o * xs.outer + c0 * xs.dim + i * xs.inner;
    T* op = out + (o * geo.channels + c0) * geo.inner + i;
    T v[G];
    int r[G];
#pragma unroll
    for (int k = 0; k < G; ++k) v[k] = xp[k * xs.dim];
    ranks<T, G>(v, r);
    if (grad == nullptr) {
#pragma unroll
      for (int k = 0; k < G; ++k) op[r[k] * geo.inner] = v[k];
    } else {
      const T* gp = grad + o * gs.outer + c0 * gs.dim + i * gs.inner;
#pragma unroll
      for (int k = 0; k < G; ++k) op[k * geo.inner] = gp[r[k] * gs.dim];
    }
  }
}

// One thread per element for any group size: its rank is counted across its group.
template <typename T>
__global__ void groupsort_any(const T* __restrict__ x, Strides xs, const T* __restrict__ grad,
                              Strides gs, T* __restrict__ out, Geometry geo) {
  const int64_t n = geo.outer * geo.channels * geo.inner;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = e % geo.inner, rest = e / geo.inner;
    const int64_t c = rest % geo.channels, o = rest / geo.channels;
    const int64_t k = c % geo.group_size, c0 = c - k;
    const T* base = x + o * xs.outer + c0 * xs.dim + i * xs.inner;
    const T mine = base[k * xs.dim];
    int64_t rank = 0;
    for (int64_t j = 0; j < geo.group_size; ++j) {
      const T other = base[j * xs.dim];
      rank += j < k ? !before(mine, other) : (j > k && before(other, mine));
    }
    if (grad == nullptr) {
      out[(o * geo.channels + c0 + rank) * geo.inner + i] = mine;
    } else {
      out[e] = grad[o * gs.outer + (c0 + rank) * gs.dim + i * gs.inner];
    }
  }
}

template <typename T>
void launch(const T* x, const Lines& x_lines, const T* grad, const Lines& g_lines, T* out,
            int64_t group_size) {
  const Geometry geo = geometry_of(x_lines, group_size);
  const Strides xs = strides_of(x_lines), gs = strides_of(g_lines);
  const auto stream = current_stream();
  const int64_t elements = geo.outer * geo.channels * geo.inner;
  switch (group_size) {
    case 2:
      groupsort_small<T, 2>
          <<<blocks_for(elements / 2), kThreads, 0, stream>>>(x, xs, grad, gs, out, geo);
      break;
    case 4:
      groupsort_small<T, 4>
          <<<blocks_for(elements / 4), kThreads, 0, stream>>>(x, xs, grad, gs, out, geo);
      break;
    case 8:
      groupsort_small<T, 8>
          <<<blocks_for(elements / 8), kThreads, 0, stream>>>(x, xs, grad, gs, out, geo);
      break;
    default:
      groupsort_any<T><<<blocks_for(elements), kThreads, 0, stream>>>(x, xs, grad, gs, out, geo);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor groupsort_cuda(const at::Tensor& x_in, int64_t group_size, int64_t dim) {
  check_groupsort_args(x_in, group_size, dim);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out =
      at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (x_in.numel() == 0) return out;
  Lines lines;
  const at::Tensor x = viewable(x_in, dim, lines);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "groupsort_cuda", [&] {
    launch<scalar_t>(x.const_data_ptr<scalar_t>(), lines, nullptr, lines,
                     out.mutable_data_ptr<scalar_t>(), group_size);
  });
  return out;
}

at::Tensor groupsort_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                   int64_t group_size, int64_t dim) {
  check_groupsort_backward_args(grad_in, x_in, group_size, dim);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out =
      at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (x_in.numel() == 0) return out;
  Lines x_lines, g_lines;
  const at::Tensor x = viewable(x_in, dim, x_lines);
  const at::Tensor grad = viewable(grad_in, dim, g_lines);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "groupsort_backward_cuda", [&] {
        launch<scalar_t>(x.const_data_ptr<scalar_t>(), x_lines, grad.const_data_ptr<scalar_t>(),
                         g_lines, out.mutable_data_ptr<scalar_t>(), group_size);
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crvae_ext_cpp, CUDA, m) {
  m.impl("groupsort", &groupsort_cuda);
  m.impl("groupsort_backward", &groupsort_backward_cuda);
}

}  // namespace crvae_ext_cpp
