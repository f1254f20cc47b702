// Splitting a GEMM's output columns over the threads, one single-threaded GEMM per part: BLAS
// called inside a parallel region runs on the calling thread. Where one operand is small (a
// batch of a few rows), every part reading all of it costs little, and each part's extra work
// on its slice (a scale, a bias, a partial sum) runs while the slice is still in cache.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

namespace crvae_ext_cpp {

constexpr int64_t kMaxParts = 16;
constexpr int64_t kMinColumns = 32;  // per part: narrower GEMMs lose more to packing than they gain
constexpr int64_t kAlign = 8;        // part boundaries, in columns

// How many parts to split `columns` output columns into for a batch of `batch` rows: at least 2
// where the split pays (a batch of at least one row and at most a quarter of the columns), else
// 1.
inline int64_t split_parts(int64_t batch, int64_t columns) {
  if (batch < 1 || 4 * batch > columns) return 1;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  return std::max<int64_t>(1, std::min({threads, kMaxParts, columns / kMinColumns}));
}

using Bounds = std::array<int64_t, kMaxParts + 1>;

// Columns [bounds[c], bounds[c + 1]) of part c of n, the first part lighter by `lead` columns'
// worth of other work.
inline Bounds split_columns(int64_t n, int64_t parts, double lead = 0) {
  Bounds bounds{};
  const double share = (static_cast<double>(n) + lead) / static_cast<double>(parts);
  const auto first = static_cast<int64_t>(std::llround((share - lead) / kAlign) * kAlign);
  bounds[1] = std::clamp<int64_t>(first, 0, n);
  for (int64_t c = 2; c <= parts; ++c) {
    bounds[c] = bounds[1] + (n - bounds[1]) * (c - 1) / (parts - 1);
  }
  return bounds;
}

}  // namespace crvae_ext_cpp
