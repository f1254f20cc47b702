// Power iteration on the CPU with one read of W per step.
//
// A step needs t = W v and s = W^T t: both come out of one pass over row blocks of W, since
// s = sum_i w_i (w_i . v) and a block of rows is still in cache when its t_i are known. Threads
// take contiguous row blocks with private partial sums of s, added up after the pass. Every
// sum is accumulated in double, whatever the weight's dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/intrinsics.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "cpu_utils.h"
#include "power_iteration.h"

namespace crvae_ext_cpp {
namespace {

constexpr double kEps = 1e-12;  // as reference.power_iteration: |.| is clamped to >= kEps
constexpr int64_t kRows = 4;    // rows per block: v and s are streamed once per block
static_assert(kRows == 4, "row_block is written out for four rows");

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
    s[j] += (static_cast<double>(w0[j]) * a0 + static_cast<double>(w1[j]) * a1) +
            (static_cast<double>(w2[j]) * a2 + static_cast<double>(w3[j]) * a3);
  }
  t[0] = a0;
  t[1] = a1;
  t[2] = a2;
  t[3] = a3;
}

#if defined(CPU_CAPABILITY_AVX2)
// The float case with AVX2 by hand: 8 columns per step, two double accumulators per row.
inline double sum4(__m256d a) {
  const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
}

template <>
inline void row_block<float>(const float* w, int64_t ld, int64_t n, const double* v, double* t,
                             double* s) {
  const float* rows[kRows] = {w, w + ld, w + 2 * ld, w + 3 * ld};
  __m256d lo[kRows], hi[kRows];
  for (int r = 0; r < kRows; ++r) lo[r] = hi[r] = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256d v_lo = _mm256_loadu_pd(v + j), v_hi = _mm256_loadu_pd(v + j + 4);
    for (int r = 0; r < kRows; ++r) {
      lo[r] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(rows[r] + j)), v_lo, lo[r]);
      hi[r] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(rows[r] + j + 4)), v_hi, hi[r]);
    }
  }
  double a[kRows];
  for (int r = 0; r < kRows; ++r) {
    a[r] = sum4(_mm256_add_pd(lo[r], hi[r]));
    for (int64_t k = j; k < n; ++k) a[r] += static_cast<double>(rows[r][k]) * v[k];
    t[r] = a[r];
  }
  __m256d coef[kRows];
  for (int r = 0; r < kRows; ++r) coef[r] = _mm256_set1_pd(a[r]);
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    __m256d acc = _mm256_loadu_pd(s + k);
    for (int r = 0; r < kRows; ++r) {
      acc = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(rows[r] + k)), coef[r], acc);
    }
    _mm256_storeu_pd(s + k, acc);
  }
  for (; k < n; ++k) {
    for (int r = 0; r < kRows; ++r) s[k] += static_cast<double>(rows[r][k]) * a[r];
  }
}
#endif

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
  double* partial = scratch<double, Scratch::kPowerPartial>(static_cast<size_t>(chunks * n));
  double sigma = 0;
  for (int64_t step = 0; step < n_iters; ++step) {
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const int64_t begin = std::min(m, c * rows_per_chunk);
        const int64_t end = c + 1 == chunks ? m : std::min(m, begin + rows_per_chunk);
        rows_pass(w, ld, n, begin, end, v, u, partial + c * n);
      }
    });
    double* s = partial;
    for (int64_t c = 1; c < chunks; ++c) {
      const double* other = partial + c * n;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cpu(const at::Tensor& weight,
                                                                   const at::Tensor& v_in,
                                                                   int64_t n_iters) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_floating_point(),
              "power_iteration: weight must be a 2-D floating-point tensor, got ", weight.dim(),
              "-D ", weight.scalar_type());
  TORCH_CHECK(v_in.dim() == 1 && v_in.size(0) == weight.size(1) && v_in.is_floating_point(),
              "power_iteration: v must be a floating-point vector of length ", weight.size(1),
              ", got shape ", v_in.sizes());
  TORCH_CHECK(n_iters >= 1, "power_iteration: n_iters must be >= 1, got ", n_iters);
  PowerIterationStep step = power_iteration_step(weight, v_in, n_iters);
  at::Tensor sigma_out = at::empty({}, step.u.options());
  from_doubles(&step.sigma, sigma_out);
  return {sigma_out, step.u, step.v};
}

}  // namespace

PowerIterationStep power_iteration_step(const at::Tensor& weight_in, const at::Tensor& v_in,
                                        int64_t n_iters) {
  const int64_t m = weight_in.size(0), n = weight_in.size(1);
  // Rows read in place only when each is dense and none overlaps the next (an expanded weight
  // has row stride 0); anything else is copied once.
  const bool rows_dense =
      (n <= 1 || weight_in.stride(1) == 1) && (m <= 1 || weight_in.stride(0) >= n);
  const at::Tensor weight = rows_dense ? weight_in : weight_in.contiguous();
  const int64_t ld = weight.stride(0);
  double* v = scratch<double, Scratch::kPowerV>(static_cast<size_t>(n));
  double* u = scratch<double, Scratch::kPowerU>(static_cast<size_t>(m));
  to_doubles(v_in, v, n);
  PowerIterationStep step{};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "power_iteration", [&] {
        step.sigma =
            iterate(weight.const_data_ptr<scalar_t>(), m, n, ld, n_iters, v, u);
      });
  const auto out =
      weight.options().dtype(weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  step.u = at::empty({m}, out);
  step.v = at::empty({n}, out);
  from_doubles(u, step.u);
  from_doubles(v, step.v);
  return step;
}

TORCH_LIBRARY_IMPL(crvae_ext_cpp, CPU, m) { m.impl("power_iteration", &power_iteration_cpu); }

}  // namespace crvae_ext_cpp
