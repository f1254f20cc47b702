// LipLinear's training forward on the CPU with the power iteration hidden in the GEMM.
//
// y = s x W^T + b needs s = k / sigma, and sigma needs the power iteration (one thread's work at
// LipLinear's usual sizes). Done in order, the other threads wait for it. Here the threads split
// the GEMM instead (gemm_split.h: y's columns for a small batch, else its rows): the first runs
// the power iteration and then a smaller share, the others their shares at once, each a
// single-threaded GEMM into its slice of y, scaled and biased while still in cache where the
// scale is known by then (else after the region).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>

#include "gemm_split.h"
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
  const SplitPlan plan = split_plan(batch, n);
  const int64_t parts = plan.parts;
  const bool by_rows = plan.by_rows;
  const bool dense = x.is_contiguous() && weight.is_contiguous() &&
                     (!bias.has_value() || !bias->defined() || bias->is_contiguous());
  const auto dtype = x.scalar_type();
  if (parts < 2 || !dense || (dtype != at::kFloat && dtype != at::kDouble)) {
    return std::nullopt;
  }
  // The power iteration in units of the split: n_iters * kPowerCost rows of x, or that times
  // n / batch columns of y.
  const double rows = kPowerCost * static_cast<double>(n_iters);
  const double lead = by_rows ? rows : rows * static_cast<double>(n) / static_cast<double>(batch);
  const Bounds bounds = split_range(by_rows ? batch : n, parts, lead);
  at::Tensor out = at::empty({batch, n}, x.options());
  TrainForward result{};
  std::atomic<bool> scaled{false};  // the scale is known (set by part 0 after its power iteration)
  std::array<bool, kMaxParts> finished{};
  AT_DISPATCH_FLOATING_TYPES(dtype, "lip_linear_train_overlapped", [&] {
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() && bias->defined() ? bias->const_data_ptr<scalar_t>()
                                                            : nullptr;
    scalar_t s = 0;
    const auto finish = [&](int64_t c) {
      const int64_t a = bounds[c], e = bounds[c + 1];
      if (by_rows) {
        scale_columns(y + a * n, e - a, n, 0, n, s, b);
      } else {
        scale_columns(y, batch, n, a, e, s, b);
      }
    };
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
        if (width > 0 && by_rows) {
          at::Tensor slice = out.narrow(0, a, width);
          at::cpu::mm_out(slice, x.narrow(0, a, width), weight.t());
        } else if (width > 0) {
          at::Tensor slice = out.narrow(1, a, width);
          at::cpu::mm_out(slice, x, weight.narrow(0, a, width).t());
        }
        // A part done before the scale is known leaves its slice to the loop after the region.
        if (scaled.load(std::memory_order_acquire)) {
          finish(c);
          finished[c] = true;
        }
      }
    });
    for (int64_t c = 0; c < parts; ++c) {
      if (!finished[c]) finish(c);
    }
    // A zero scale (sigma beyond the dtype's range) gives y = bias, as the GEMM with alpha = 0
    // does (it never reads x W^T, which may hold an inf), whichever thread ran first.
    if (s == 0) {
      for (int64_t i = 0; i < batch; ++i) {
        if (b != nullptr) {
          std::copy_n(b, n, y + i * n);
        } else {
          std::fill_n(y + i * n, n, scalar_t(0));
        }
      }
    }
    result.scale = at::empty({}, result.step.u.options());
    *result.scale.mutable_data_ptr<scalar_t>() = s;
  });
  result.out = out;
  return result;
}

}  // namespace crvae_ext_cpp
