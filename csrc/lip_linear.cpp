// LipLinear's spectral path on the CPU: y = scale * (x W^T) + b and its analytic backward.
//
// The scale is a CPU scalar here, so it rides in the GEMMs' alpha: the forward is the same
// single addmm as nn.Linear, and the backward never forms grad * scale. What the backward adds
// to nn.Linear's is one fused pass over the rows for the bias gradient and <G, y - b>, and the
// rank-1 term of d sigma / dW written into the weight gradient before its GEMM. Where x needs
// a gradient and the GEMMs split over the threads (gemm_split.h), each thread takes one slice
// through every pass instead.
#include "lip_linear.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "cpu_utils.h"
#include "gemm_split.h"

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

// Products and sums within a row, and column sums over blocks of kBlock rows, are taken in T's
// opmath type (as torch's own float sums are); the rows' and blocks' totals in double.
constexpr int64_t kBlock = 8;

// sum over rows [r0, r1) of <a_r, b_r> restricted to columns [c0, c1); dense rows (row strides
// lda, ldb).
template <typename T>
double dot_rows(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t r0, int64_t r1,
                int64_t c0, int64_t c1) {
  using Op = at::opmath_type<T>;
  double total = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* arow = a + r * lda;
    const T* brow = b + r * ldb;
    Op row_dot = 0;
#pragma omp simd reduction(+ : row_dot)
    for (int64_t j = c0; j < c1; ++j) {
      row_dot += static_cast<Op>(arow[j]) * static_cast<Op>(brow[j]);
    }
    total += static_cast<double>(row_dot);
  }
  return total;
}

// sum[j] += sum over rows [r0, r1) of g[r, j] for j in [c0, c1) (dense rows, row stride ld);
// block (room for c1 - c0) holds one block's sums.
template <typename T>
void sum_columns(const T* g, int64_t ld, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                 at::opmath_type<T>* block, double* sum) {
  using Op = at::opmath_type<T>;
  const int64_t n = c1 - c0;
  for (int64_t b0 = r0; b0 < r1; b0 += kBlock) {
    std::fill(block, block + n, Op(0));
    for (int64_t r = b0; r < std::min(r1, b0 + kBlock); ++r) {
      const T* row = g + r * ld + c0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) block[j] += static_cast<Op>(row[j]);
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sum[c0 + j] += static_cast<double>(block[j]);
  }
}

// One parallel pass over the B rows: the column sums of g (dense) into colsum (if not null) and
// the inner product <a, b> (if a is not null; a and b of one shape, any strides).
template <typename T>
double rows_pass(const at::Tensor& g, T* colsum, const at::Tensor* a, const at::Tensor* b) {
  using Op = at::opmath_type<T>;
  TORCH_CHECK(g.is_contiguous(), "rows_pass: g must be dense");
  const int64_t rows = g.size(0), cols = g.size(1), width = a != nullptr ? a->size(1) : 0;
  const T* gp = g.const_data_ptr<T>();
  const T* ap = a != nullptr ? a->const_data_ptr<T>() : nullptr;
  const T* bp = a != nullptr ? b->const_data_ptr<T>() : nullptr;
  const int64_t ar = a != nullptr ? a->stride(0) : 0, ac = a != nullptr ? a->stride(1) : 0;
  const int64_t br = a != nullptr ? b->stride(0) : 0, bc = a != nullptr ? b->stride(1) : 0;
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), rows * (cols + width) / (1 << 15)));
  const int64_t sum_cols = colsum != nullptr ? cols : 0;
  double* dots = scratch<double, Scratch::kRowSums>(static_cast<size_t>(chunks * (sum_cols + 1)));
  double* sums = dots + chunks;
  Op* blocks = scratch<Op, Scratch::kRowBlock>(static_cast<size_t>(chunks * sum_cols));
  std::fill(dots, sums + chunks * sum_cols, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t r0 = rows * c / chunks, r1 = rows * (c + 1) / chunks;
      if (colsum != nullptr) {
        sum_columns(gp, cols, r0, r1, 0, cols, blocks + c * cols, sums + c * cols);
      }
      if (ap == nullptr) continue;
      if (ac == 1 && bc == 1) {
        dots[c] = dot_rows(ap, ar, bp, br, r0, r1, 0, width);
        continue;
      }
      double dot = 0;
      for (int64_t r = r0; r < r1; ++r) {
        Op row_dot = 0;
        for (int64_t j = 0; j < width; ++j) {
          row_dot += static_cast<Op>(ap[r * ar + j * ac]) * static_cast<Op>(bp[r * br + j * bc]);
        }
        dot += static_cast<double>(row_dot);
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
  const int64_t n = b.numel();
  double total = 0;
  for (int64_t j = 0; j < n; ++j) {
    total += static_cast<double>(colsum[j]) * static_cast<double>(bp[j]);
  }
  return total;
}

// The rank-1 term's factors: u in double, v in T's opmath type (per-thread scratch).
template <typename T>
std::pair<const double*, const at::opmath_type<T>*> rank1_factors(const at::Tensor& u_in,
                                                                  const at::Tensor& v_in) {
  using Op = at::opmath_type<T>;
  const int64_t rows = u_in.size(0), cols = v_in.size(0);
  double* u = scratch<double, Scratch::kRank1U>(static_cast<size_t>(rows));
  double* v = scratch<double, Scratch::kRank1V>(static_cast<size_t>(cols));
  to_doubles(u_in, u, rows);
  to_doubles(v_in, v, cols);
  Op* vp = scratch<Op, Scratch::kRank1Row>(static_cast<size_t>(cols));
  std::copy_n(v, cols, vp);
  return {u, vp};
}

// Rows [i0, i1) of grad_w (dense, cols wide) = alpha * u v^T, written (not added).
template <typename T>
void rank1_rows(T* grad_w, int64_t cols, int64_t i0, int64_t i1, double alpha, const double* u,
                const at::opmath_type<T>* v) {
  using Op = at::opmath_type<T>;
  for (int64_t i = i0; i < i1; ++i) {
    const Op c = static_cast<Op>(alpha * u[i]);
    T* row = grad_w + i * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) row[j] = static_cast<T>(c * v[j]);
  }
}

// grad_w = alpha * u v^T, written (not added) into the dense weight gradient: the GEMM then
// adds s G^T x with beta = 1, so the rank-1 term costs one write of grad_w and no extra read.
template <typename T>
void write_rank1(T* grad_w, int64_t rows, int64_t cols, const at::Tensor& u_in,
                 const at::Tensor& v_in, double alpha) {
  const auto [u, v] = rank1_factors<T>(u_in, v_in);
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
                     rank1_rows(grad_w, cols, begin, end, alpha, u, v);
                   });
}

// The backward with its GEMMs split over the threads (gemm_split.h) where x needs a gradient:
// each part computes its slice of grad_x (columns for a small batch, else rows), then its share
// of <grad_x, x> and of the bias gradient; then each computes its rows of W's gradient, the
// rank-1 term first and its GEMM adding s G^T x to them.
template <typename T>
void lip_linear_backward_split(const at::Tensor& grad, const at::Tensor& x,
                               const at::Tensor& weight, T* colsum, const at::Tensor& u,
                               const at::Tensor& v, double alpha, double lipschitz,
                               int64_t parts, bool by_rows, at::Tensor& grad_x,
                               at::Tensor* grad_w) {
  using Op = at::opmath_type<T>;
  const int64_t batch = x.size(0), k = x.size(1), n = weight.size(0);
  const Bounds slices = split_range(by_rows ? batch : k, parts), out_cols = split_range(n, parts);
  std::array<double, kMaxParts> dots{};
  // column sums: per part over its rows (added up after), or each part's own columns
  const int64_t sums_size = colsum == nullptr ? 0 : by_rows ? parts * n : n;
  double* sums = scratch<double, Scratch::kRowSums>(static_cast<size_t>(sums_size));
  Op* blocks = scratch<Op, Scratch::kRowBlock>(static_cast<size_t>(sums_size));
  std::fill(sums, sums + sums_size, 0.0);
  const T *gp = grad.const_data_ptr<T>(), *xp = x.const_data_ptr<T>();
  const T* gxp = grad_x.const_data_ptr<T>();
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    // per thread: the slices are plain views, written by the CPU kernels directly
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t c = first; c < last; ++c) {
      const int64_t a = slices[c], width = slices[c + 1] - slices[c];
      if (width > 0 && by_rows) {
        at::Tensor slice = grad_x.narrow(0, a, width);
        at::cpu::addmm_out(slice, slice, grad.narrow(0, a, width), weight, 0, alpha);
        if (grad_w != nullptr) dots[c] = dot_rows(gxp, k, xp, k, a, a + width, 0, k);
        if (colsum != nullptr) sum_columns(gp, n, a, a + width, 0, n, blocks + c * n, sums + c * n);
      } else if (width > 0) {
        at::Tensor slice = grad_x.narrow(1, a, width);
        at::cpu::addmm_out(slice, slice, grad, weight.narrow(1, a, width), 0, alpha);
        if (grad_w != nullptr) dots[c] = dot_rows(gxp, k, xp, k, 0, batch, a, a + width);
      }
      if (colsum == nullptr || by_rows) continue;
      const int64_t b0 = out_cols[c], b1 = out_cols[c + 1];
      sum_columns(gp, n, 0, batch, b0, b1, blocks + b0, sums);
      for (int64_t j = b0; j < b1; ++j) colsum[j] = static_cast<T>(sums[j]);
    }
  });
  for (int64_t j = 0; colsum != nullptr && by_rows && j < n; ++j) {
    double total = 0;
    for (int64_t c = 0; c < parts; ++c) total += sums[c * n + j];
    colsum[j] = static_cast<T>(total);
  }
  if (grad_w == nullptr) return;
  double inner = 0;
  for (int64_t c = 0; c < parts; ++c) inner += dots[c];
  const double coefficient = -inner * alpha / lipschitz;
  const auto [up, vp] = rank1_factors<T>(u, v);
  T* gw = grad_w->mutable_data_ptr<T>();
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t c = first; c < last; ++c) {
      const int64_t a = out_cols[c], rows = out_cols[c + 1] - out_cols[c];
      if (rows == 0) continue;
      rank1_rows(gw, k, a, a + rows, coefficient, up, vp);
      at::Tensor slice = grad_w->narrow(0, a, rows);
      at::cpu::addmm_out(slice, slice, grad.narrow(1, a, rows).t(), x, 1, alpha);
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
  const auto dtype = grad.scalar_type();
  const int64_t batch = x.size(0), narrower = std::min(x.size(1), weight.size(0));
  const SplitPlan plan = split_plan(batch, narrower);
  const int64_t parts = plan.parts;
  const bool by_rows = plan.by_rows;
  if (need_x && parts >= 2 && (dtype == at::kFloat || dtype == at::kDouble) &&
      x.is_contiguous() && weight.is_contiguous()) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "lip_linear_backward_split", [&] {
      lip_linear_backward_split<scalar_t>(
          grad, x, weight, sums ? grad_b.mutable_data_ptr<scalar_t>() : nullptr, u, v, alpha,
          lipschitz, parts, by_rows, grad_x, need_w ? &grad_w : nullptr);
    });
    if (!need_b) grad_b = at::Tensor();
    return {grad_x, grad_w, grad_b};
  }
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
