// LipLinear's training forward on the CPU with the power iteration hidden in the GEMM.
//
// y = s x W^T + b needs s = k / sigma, and sigma needs the power iteration (one thread's work at
// LipLinear's usual sizes). Done in order, the other threads wait for it. Here the threads split
// the output columns instead: the first runs the power iteration and then a smaller share of
// columns, the others their shares at once, each a single-threaded GEMM of its slice of W into
// its slice of y, scaled and biased while still in cache. The split pays where x is small
// next to W (few rows: every thread reads all of x); elsewhere the caller keeps the one
// multi-threaded GEMM.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <array>
#include <atomic>
#include <optional>

#include "column_split.h"
#include "lip_linear_train.h"

namespace crvae_ext_cpp {
namespace {

// One power-iteration step over a weight element costs about this many GEMM multiply-adds
// (two products in double against one fp32 FMA lane, and the thread's cache refilled after).
constexpr double kPowerCost = 6.0;

// y[:, a:b] = s * y[:, a:b] + bias[a:b] (bias may be null), in place.
template <typename T>
void scale_columns(T* y, int64_t rows, int64_t ld, int64_t a, int64_t b, T s, const T* bias) {
  for (int64_t i = 0; i < rows; ++i) {
    T* row = y + i * ld;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t j = a; j < b; ++j) row[j] = s * row[j] + bias[j];
    } else {
#pragma omp simd
      for (int64_t j = a; j < b; ++j) row[j] = s * row[j];
    }
  }
}

}  // namespace

std::optional<TrainForward> lip_linear_train_overlapped(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& v, int64_t n_iters, double lipschitz, double sigma_floor) {
  const int64_t batch = x.size(0), n = weight.size(0);
  const int64_t parts = split_parts(batch, n);
  const bool dense = x.is_contiguous() && weight.is_contiguous() &&
                     (!bias.has_value() || !bias->defined() || bias->is_contiguous());
  const auto dtype = x.scalar_type();
  if (parts < 2 || !dense || (dtype != at::kFloat && dtype != at::kDouble)) {
    return std::nullopt;
  }
  const double lead = kPowerCost * static_cast<double>(n_iters * n) / static_cast<double>(batch);
  const auto bounds = split_columns(n, parts, lead);
  at::Tensor out = at::empty({batch, n}, x.options());
  TrainForward result{};
  std::atomic<bool> scaled{false};  // the scale is known (set by part 0 after its power iteration)
  std::array<bool, kMaxParts> finished{};
  AT_DISPATCH_FLOATING_TYPES(dtype, "lip_linear_train_overlapped", [&] {
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() && bias->defined() ? bias->const_data_ptr<scalar_t>()
                                                            : nullptr;
    scalar_t s = 0;
    at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
      // per thread: the slices are plain views, written by the CPU kernel directly
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t c = first; c < last; ++c) {
        if (c == 0) {
          result.step = power_iteration_step(weight, v, n_iters);
          s = scale_of(static_cast<scalar_t>(result.step.sigma), lipschitz, sigma_floor);
          scaled.store(true, std::memory_order_release);
        }
        const int64_t a = bounds[c], width = bounds[c + 1] - bounds[c];
        if (width > 0) {
          at::Tensor slice = out.narrow(1, a, width);
          at::cpu::mm_out(slice, x, weight.narrow(0, a, width).t());
        }
        // A part done before the scale is known leaves its columns to the loop after the region.
        if (scaled.load(std::memory_order_acquire)) {
          scale_columns(y, batch, n, a, a + width, s, b);
          finished[c] = true;
        }
      }
    });
    for (int64_t c = 0; c < parts; ++c) {
      if (!finished[c]) scale_columns(y, batch, n, bounds[c], bounds[c + 1], s, b);
    }
    result.scale = at::empty({}, result.step.u.options());
    *result.scale.mutable_data_ptr<scalar_t>() = s;
  });
  result.out = out;
  return result;
}

}  // namespace crvae_ext_cpp
