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
#include <vector>

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

// One pass over grad (B x m): the column sums of grad into colsum (if not null) and, if y is
// not null, <grad, y - b> = <grad, y> - <colsum, b> (b may be null), accumulated in double.
template <typename T>
double bias_grad_and_inner(const at::Tensor& grad, const at::Tensor* y, const T* bias, T* colsum) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const T* g = grad.const_data_ptr<T>();
  const T* yp = y != nullptr ? y->const_data_ptr<T>() : nullptr;
  const int64_t gr = grad.stride(0), gc = grad.stride(1);
  const int64_t yr = y != nullptr ? y->stride(0) : 0, yc = y != nullptr ? y->stride(1) : 0;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows * cols / (1 << 15)));
  std::vector<double> sums(static_cast<size_t>(chunks * cols), 0.0);
  std::vector<double> dots(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      double* sum = sums.data() + c * cols;
      double dot = 0;
      for (int64_t b = rows * c / chunks; b < rows * (c + 1) / chunks; ++b) {
        const T* grow = g + b * gr;
        const T* yrow = yp + b * yr;
        if (yp != nullptr && gc == 1 && yc == 1) {
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < cols; ++j) {
            const double gj = static_cast<double>(grow[j]);
            dot += gj * static_cast<double>(yrow[j]);
            sum[j] += gj;
          }
        } else if (yp != nullptr) {
          for (int64_t j = 0; j < cols; ++j) {
            const double gj = static_cast<double>(grow[j * gc]);
            dot += gj * static_cast<double>(yrow[j * yc]);
            sum[j] += gj;
          }
        } else {
          for (int64_t j = 0; j < cols; ++j) sum[j] += static_cast<double>(grow[j * gc]);
        }
      }
      dots[c] = dot;
    }
  });
  double inner = 0;
  for (int64_t c = 0; c < chunks; ++c) inner += dots[c];
  for (int64_t j = 0; j < cols; ++j) {
    double total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += sums[c * cols + j];
    if (colsum != nullptr) colsum[j] = static_cast<T>(total);
    if (bias != nullptr) inner -= total * static_cast<double>(bias[j]);
  }
  return inner;
}

// grad_w = alpha * u v^T, written (not added) into the dense weight gradient: the GEMM then
// adds s G^T x with beta = 1, so the rank-1 term costs one write of grad_w and no extra read.
template <typename T>
void write_rank1(T* grad_w, int64_t rows, int64_t cols, const std::vector<double>& u,
                 const std::vector<double>& v, double alpha) {
  using Op = at::opmath_type<T>;
  std::vector<Op> v_op(v.begin(), v.end());
  const Op* vp = v_op.data();
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
    const std::optional<at::Tensor>& bias_opt, const at::Tensor& out, const at::Tensor& scale,
    const at::Tensor& u, const at::Tensor& v, double lipschitz, std::array<bool, 3> needs) {
  check_lip_linear_backward_args(grad_in, x, weight, bias_opt, out, scale, u, v);
  // One dense copy of an expanded or strided grad (y.sum() gives a stride-0 one) serves both
  // GEMMs and the fused pass; each GEMM would otherwise make its own.
  const at::Tensor grad = grad_in.is_contiguous() ? grad_in : grad_in.contiguous();
  const auto [need_x, need_w, need_b] = needs;
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const double alpha = scalar_value(scale);
  at::Tensor grad_x, grad_w, grad_b;
  if (need_x) grad_x = scaled_mm(grad, weight, alpha);
  if (!need_w && !(has_bias && need_b)) return {grad_x, grad_w, grad_b};
  if (has_bias) grad_b = at::empty({weight.size(0)}, grad.options());
  const at::Tensor bias = has_bias ? bias_opt->contiguous() : at::Tensor();
  double inner = 0;  // <grad, y - b>
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "lip_linear_backward", [&] {
        inner = bias_grad_and_inner<scalar_t>(
            grad, need_w ? &out : nullptr,
            has_bias && need_w ? bias.const_data_ptr<scalar_t>() : nullptr,
            has_bias ? grad_b.mutable_data_ptr<scalar_t>() : nullptr);
      });
  if (need_w) {
    // dW = s G^T x - (s / k) <G, y - b> u v^T: the rank-1 term first, then the GEMM adds to it.
    grad_w =
        at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_w.scalar_type(), "rank1", [&] {
      write_rank1(grad_w.mutable_data_ptr<scalar_t>(), grad_w.size(0), grad_w.size(1),
                  to_doubles(u), to_doubles(v), -inner * alpha / lipschitz);
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
