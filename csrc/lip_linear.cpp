// LipLinear's spectral path on the CPU: y = scale * (x W^T) + b and its analytic backward.
//
// The scale is a CPU scalar here, so it rides in the GEMMs' alpha: the forward is the same
// single addmm as nn.Linear, and the backward never forms grad * scale. What the backward adds
// to nn.Linear's is one fused pass over (grad, y) for the bias gradient and <grad, y>, and the
// rank-1 term of d sigma / dW added in place to the weight gradient.
#include "lip_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "cpu_utils.h"

namespace crvae_ext_cpp {
namespace {

// alpha * a @ b into a fresh tensor: beta = 0 makes the GEMM ignore the uninitialised output.
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0, alpha);
}

at::Tensor lip_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const at::Tensor& scale) {
  check_lip_linear_args(x, weight, bias, scale);
  const double alpha = scalar_value(scale);
  if (bias.has_value() && bias->defined()) return at::addmm(*bias, x, weight.t(), 1, alpha);
  return scaled_mm(x, weight.t(), alpha);
}

// One parallel pass over the B rows: the column sums of g into colsum (if not null) and the
// inner product <a, b> (if a is not null; a and b of one shape, any strides), in double.
template <typename T>
double rows_pass(const at::Tensor& g, T* colsum, const at::Tensor* a, const at::Tensor* b) {
  const int64_t rows = g.size(0), cols = g.size(1), width = a != nullptr ? a->size(1) : 0;
  const T* gp = g.const_data_ptr<T>();
  const T* ap = a != nullptr ? a->const_data_ptr<T>() : nullptr;
  const T* bp = a != nullptr ? b->const_data_ptr<T>() : nullptr;
  const int64_t gr = g.stride(0), gc = g.stride(1);
  const int64_t ar = a != nullptr ? a->stride(0) : 0, ac = a != nullptr ? a->stride(1) : 0;
  const int64_t br = a != nullptr ? b->stride(0) : 0, bc = a != nullptr ? b->stride(1) : 0;
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), rows * (cols + width) / (1 << 15)));
  const int64_t sum_cols = colsum != nullptr ? cols : 0;
  double* dots = scratch<double, Scratch::kRowSums>(static_cast<size_t>(chunks * (sum_cols + 1)));
  double* sums = dots + chunks;
  std::fill(dots, sums + chunks * sum_cols, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      double dot = 0;
      for (int64_t r = rows * c / chunks; r < rows * (c + 1) / chunks; ++r) {
        if (colsum != nullptr) {
          double* sum = sums + c * cols;
          const T* row = gp + r * gr;
#pragma omp simd
          for (int64_t j = 0; j < cols; ++j) sum[j] += static_cast<double>(row[j * gc]);
        }
        if (ap == nullptr) continue;
        const T* arow = ap + r * ar;
        const T* brow = bp + r * br;
        if (ac == 1 && bc == 1) {
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < width; ++j) {
            dot += static_cast<double>(arow[j]) * static_cast<double>(brow[j]);
          }
        } else {
          for (int64_t j = 0; j < width; ++j) {
            dot += static_cast<double>(arow[j * ac]) * static_cast<double>(brow[j * bc]);
          }
        }
      }
      dots[c] = dot;
    }
  });
  double inner = 0;
  for (int64_t c = 0; c < chunks; ++c) inner += dots[c];
  for (int64_t j = 0; colsum != nullptr && j < cols; ++j) {
    double total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += sums[c * cols + j];
    colsum[j] = static_cast<T>(total);
  }
  return inner;
}

// <colsum, b> in double.
template <typename T>
double dot_with(const T* colsum, const at::Tensor& b) {
  const T* bp = b.const_data_ptr<T>();
  double total = 0;
  for (int64_t j = 0; j < b.numel(); ++j) {
    total += static_cast<double>(colsum[j]) * static_cast<double>(bp[j]);
  }
  return total;
}

// grad_w = alpha * u v^T, written (not added) into the dense weight gradient: the GEMM then
// adds s G^T x with beta = 1, so the rank-1 term costs one write of grad_w and no extra read.
template <typename T>
void write_rank1(T* grad_w, int64_t rows, int64_t cols, const at::Tensor& u_in,
                 const at::Tensor& v_in, double alpha) {
  using Op = at::opmath_type<T>;
  double* u = scratch<double, Scratch::kRank1U>(static_cast<size_t>(rows));
  double* v = scratch<double, Scratch::kRank1V>(static_cast<size_t>(cols));
  to_doubles(u_in, u, rows);
  to_doubles(v_in, v, cols);
  Op* vp = scratch<Op, Scratch::kRank1Row>(static_cast<size_t>(cols));
  std::copy_n(v, cols, vp);
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end; ++i) {
                       const Op c = static_cast<Op>(alpha * u[i]);
                       T* row = grad_w + i * cols;
#pragma omp simd
                       for (int64_t j = 0; j < cols; ++j) row[j] = static_cast<T>(c * vp[j]);
                     }
                   });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lip_linear_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias_opt, const std::optional<at::Tensor>& out,
    const at::Tensor& scale, const at::Tensor& u, const at::Tensor& v, double lipschitz,
    std::array<bool, 3> needs) {
  const auto [need_x, need_w, need_b] = needs;
  check_lip_linear_backward_args(grad_in, x, weight, bias_opt, out, scale, u, v, need_x, need_w);
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const double alpha = scalar_value(scale);
  // <G, y - b> = <G, s x W^T> = <s G W, x> = <grad_x, x>: with grad_x at hand, neither y nor the
  // bias enter (no cancellation against a large bias); else <G, y> - <1^T G, b>.
  const bool via_y = need_w && !need_x;
  const bool sums = has_bias && (need_b || via_y);
  // The outputs first, in nn.Linear's order (x's gradient, then W's), temporaries in per-thread
  // scratch (cpu_utils.h): the freed gradients of the previous step are then reused whole
  // instead of being split by a temporary (fresh pages would fault on first touch).
  const auto dense = weight.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_x = need_x ? at::empty({x.size(0), x.size(1)}, x.options()) : at::Tensor();
  at::Tensor grad_w = need_w ? at::empty(weight.sizes(), dense) : at::Tensor();
  at::Tensor grad_b = sums ? at::empty({weight.size(0)}, grad_in.options()) : at::Tensor();
  // One dense copy of an expanded or strided grad (y.sum() gives a stride-0 one) serves both
  // GEMMs and the row pass; each GEMM would otherwise make its own.
  const at::Tensor grad = grad_in.is_contiguous() ? grad_in : grad_in.contiguous();
  if (need_x) at::addmm_out(grad_x, grad_x, grad, weight, /*beta=*/0, alpha);
  double inner = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "lip_linear_backward", [&] {
        scalar_t* colsum = sums ? grad_b.mutable_data_ptr<scalar_t>() : nullptr;
        if (!need_w) {
          if (sums) rows_pass<scalar_t>(grad, colsum, nullptr, nullptr);
        } else if (via_y) {
          inner = rows_pass<scalar_t>(grad, colsum, &grad, &*out);
          if (has_bias) inner -= dot_with(colsum, bias_opt->contiguous());
        } else {
          inner = rows_pass<scalar_t>(grad, colsum, &grad_x, &x);
        }
      });
  if (need_w) {
    // dW = s G^T x - (s / k) <G, y - b> u v^T: the rank-1 term first, then the GEMM adds to it.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_w.scalar_type(), "rank1", [&] {
      write_rank1(grad_w.mutable_data_ptr<scalar_t>(), grad_w.size(0), grad_w.size(1),
                  u, v, -inner * alpha / lipschitz);
    });
    at::addmm_out(grad_w, grad_w, grad.t(), x, /*beta=*/1, alpha);
  }
  if (!need_b) grad_b = at::Tensor();
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(crvae_ext_cpp, CPU, m) {
  m.impl("lip_linear", &lip_linear_cpu);
  m.impl("lip_linear_backward", &lip_linear_backward_cpu);
}

}  // namespace crvae_ext_cpp
