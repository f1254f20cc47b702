// Splitting a GEMM's output over the threads, one single-threaded GEMM per part: MKL (with
// OpenMP, as torch's x86 builds link it) called inside a parallel region runs on the calling
// thread; builds without MKL do not split. Each part's extra work on its slice (a scale, a
// bias, a partial sum) then runs while the slice is still in cache, and one part can take on
// other work (the power iteration) for a smaller share.
//
// By columns where the batch is small next to them (every part reads all of x or G, a few
// rows); by rows of the batch otherwise (every part reads all of W).
#pragma once

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

namespace crvae_ext_cpp {

constexpr int64_t kMaxParts = 16;
constexpr int64_t kMinColumns = 32;  // per part: narrower GEMMs lose more to packing than they gain
constexpr int64_t kMinRows = 32;     // per part, in a split of the batch's rows
constexpr int64_t kAlign = 8;        // the first part's end (the others share the rest)

// The threads a split may use: one inside a parallel region (it would run serially) or
// without MKL.
inline int64_t split_threads() {
  if (at::in_parallel_region() || !at::hasMKL()) return 1;
  return std::min<int64_t>(at::get_num_threads(), kMaxParts);
}

// How many parts to split `columns` output columns into for a batch of `batch` rows: at least 2
// where that pays (a batch of at least one row and at most a quarter of the columns), else 1.
inline int64_t column_parts(int64_t batch, int64_t columns) {
  if (batch < 1 || 4 * batch > columns) return 1;
  return std::max<int64_t>(1, std::min(split_threads(), columns / kMinColumns));
}

// How many parts to split a batch of `batch` rows into (of a GEMM with `columns` output
// columns): at least 2 where each gets kMinRows rows and the output kMinColumns columns.
inline int64_t row_parts(int64_t batch, int64_t columns) {
  if (columns < kMinColumns) return 1;
  return std::max<int64_t>(1, std::min(split_threads(), batch / kMinRows));
}

// How a GEMM with a batch of `batch` rows and `columns` output columns is split: by columns
// where that gives two or more parts, else by rows (parts < 2: not split).
struct SplitPlan {
  int64_t parts;
  bool by_rows;
};

inline SplitPlan split_plan(int64_t batch, int64_t columns) {
  const int64_t by_columns = column_parts(batch, columns);
  if (by_columns >= 2) return {by_columns, false};
  return {row_parts(batch, columns), true};
}

using Bounds = std::array<int64_t, kMaxParts + 1>;

// [bounds[c], bounds[c + 1]) of part c of [0, n), the first part lighter by `lead` units' worth
// of other work.
inline Bounds split_range(int64_t n, int64_t parts, double lead = 0) {
  Bounds bounds{};
  if (parts <= 1) {
    bounds[1] = n;
    return bounds;
  }
  const double share = (static_cast<double>(n) + lead) / static_cast<double>(parts);
  const double units = std::clamp((share - lead) / kAlign, 0.0, static_cast<double>(n) / kAlign);
  bounds[1] = std::min(n, static_cast<int64_t>(std::llround(units)) * kAlign);
  for (int64_t c = 2; c <= parts; ++c) {
    bounds[c] = bounds[1] + (n - bounds[1]) * (c - 1) / (parts - 1);
  }
  return bounds;
}

}  // namespace crvae_ext_cpp
