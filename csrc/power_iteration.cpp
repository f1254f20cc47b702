// Power iteration on the CPU with one read of W per step.
//
// A step needs t = W v and s = W^T t: both come out of one pass over row blocks of W, since
// s = sum_i w_i (w_i . v) and a block of rows is still in cache when its t_i are known. Threads
// take contiguous row blocks with private partial sums of s, added up after the pass. Every
// sum is accumulated in double, whatever the weight's dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace crvae_ext_cpp {
namespace {

constexpr double kEps = 1e-12;  // as reference.power_iteration: |.| is clamped to >= kEps
constexpr int64_t kRows = 4;    // rows per block: v and s are streamed once per block

// t[r] = w_r . v for kRows rows at w (row stride ld), then s += sum_r t[r] w_r.
template <typename T>
inline void row_block(const T* w, int64_t ld, int64_t n, const double* v, double* t, double* s) {
  const T *w0 = w, *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t j = 0; j < n; ++j) {
    const double vj = v[j];
    a0 += static_cast<double>(w0[j]) * vj;
    a1 += static_cast<double>(w1[j]) * vj;
    a2 += static_cast<double>(w2[j]) * vj;
    a3 += static_cast<double>(w3[j]) * vj;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    s[j] += static_cast<double>(w0[j]) * a0 + static_cast<double>(w1[j]) * a1 +
            static_cast<double>(w2[j]) * a2 + static_cast<double>(w3[j]) * a3;
  }
  t[0] = a0;
  t[1] = a1;
  t[2] = a2;
  t[3] = a3;
}

// The same for a single row (the tail of a row range).
template <typename T>
inline void one_row(const T* w, int64_t n, const double* v, double* t, double* s) {
  double a = 0;
#pragma omp simd reduction(+ : a)
  for (int64_t j = 0; j < n; ++j) a += static_cast<double>(w[j]) * v[j];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] += static_cast<double>(w[j]) * a;
  *t = a;
}

// Rows [begin, end) of W: t for those rows and their share of s (overwritten).
template <typename T>
void rows_pass(const T* w, int64_t ld, int64_t n, int64_t begin, int64_t end, const double* v,
               double* t, double* s) {
  std::fill(s, s + n, 0.0);
  int64_t i = begin;
  for (; i + kRows <= end; i += kRows) row_block(w + i * ld, ld, n, v, t + i, s);
  for (; i < end; ++i) one_row(w + i * ld, n, v, t + i, s);
}

inline double norm(const double* a, int64_t n) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * a[j];
  return std::sqrt(sum);
}

// n_iters steps from v (length n, updated in place); writes u (length m), returns sigma.
template <typename T>
double iterate(const T* w, int64_t m, int64_t n, int64_t ld, int64_t n_iters, double* v,
               double* u) {
  const int64_t work = m * n;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work / (1 << 16)));
  const int64_t rows_per_chunk = (m / chunks + kRows - 1) / kRows * kRows;
  std::vector<double> partial(static_cast<size_t>(chunks * n));
  double sigma = 0;
  for (int64_t step = 0; step < n_iters; ++step) {
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const int64_t begin = std::min(m, c * rows_per_chunk);
        const int64_t end = c + 1 == chunks ? m : std::min(m, begin + rows_per_chunk);
        rows_pass(w, ld, n, begin, end, v, u, partial.data() + c * n);
      }
    });
    double* s = partial.data();
    for (int64_t c = 1; c < chunks; ++c) {
      const double* other = partial.data() + c * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] += other[j];
    }
    // u = t / |t|, s = W^T u = s / |t|, sigma = |s|, v = s / sigma (norms clamped to kEps).
    const double t_norm = std::max(norm(u, m), kEps);
    for (int64_t i = 0; i < m; ++i) u[i] /= t_norm;
    for (int64_t j = 0; j < n; ++j) s[j] /= t_norm;
    sigma = norm(s, n);
    const double v_norm = std::max(sigma, kEps);
    for (int64_t j = 0; j < n; ++j) v[j] = s[j] / v_norm;
  }
  return sigma;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cpu(const at::Tensor& weight_in,
                                                                   const at::Tensor& v_in,
                                                                   int64_t n_iters) {
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.is_floating_point(),
              "power_iteration: weight must be a 2-D floating-point tensor, got ", weight_in.dim(),
              "-D ", weight_in.scalar_type());
  TORCH_CHECK(v_in.dim() == 1 && v_in.size(0) == weight_in.size(1) && v_in.is_floating_point(),
              "power_iteration: v must be a floating-point vector of length ", weight_in.size(1),
              ", got shape ", v_in.sizes());
  TORCH_CHECK(n_iters >= 1, "power_iteration: n_iters must be >= 1, got ", n_iters);
  const int64_t m = weight_in.size(0), n = weight_in.size(1);
  const bool rows_dense = weight_in.stride(1) == 1 || n <= 1;
  const at::Tensor weight = rows_dense ? weight_in : weight_in.contiguous();
  const int64_t ld = std::max<int64_t>(weight.stride(0), 1);
  const auto out_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto f64 = weight.options().dtype(at::kDouble);
  at::Tensor v = v_in.to(f64, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor u = at::empty({m}, f64);
  double sigma = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "power_iteration", [&] {
        sigma = iterate(weight.const_data_ptr<scalar_t>(), m, n, ld, n_iters,
                        v.mutable_data_ptr<double>(), u.mutable_data_ptr<double>());
      });
  const auto out = weight.options().dtype(out_dtype);
  return {at::scalar_tensor(sigma, out), u.to(out_dtype), v.to(out_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(crvae_ext_cpp, CPU, m) { m.impl("power_iteration", &power_iteration_cpu); }

}  // namespace crvae_ext_cpp
