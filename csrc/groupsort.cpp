// GroupSort on the CPU: stable ascending sort inside groups of `group_size` along `dim`.
//
// Groups of 2, 4 and 8 (float, double) are ranked by branch-free pairwise comparisons on
// at::vec vectors that hold one group element per lane: across a contiguous inner dimension,
// or, when a group's elements are adjacent, de-interleaved in registers. Other sizes, fp16/bf16
// and other layouts argsort each group (insertion sort when small). The order is torch.sort's:
// ascending, NaN after +inf, equal keys (NaNs too) keep their input order. The backward
// recomputes that order from x and routes each gradient back to its source.
#include "groupsort.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace crvae_ext_cpp {
namespace {

using at::vec::Vectorized;

// a sorts strictly before b: ascending, NaN last.
template <typename K>
inline bool before(K a, K b) {
  return a < b || (b != b && a == a);
}

// The same, lane by lane, as a bit mask.
template <typename T>
inline Vectorized<T> before(const Vectorized<T>& a, const Vectorized<T>& b) {
  const Vectorized<T> nan_a = a.isnan(), nan_b = b.isnan();
  return (a < b) | ((nan_a ^ nan_b) & nan_b);
}

template <typename T, int G>
using Lanes = std::array<Vectorized<T>, G>;

// Position of each of G values in their stable order, lane by lane (exact small counts).
template <typename T, int G>
Lanes<T, G> ranks(const Lanes<T, G>& v) {
  const Vectorized<T> one(T(1));
  Lanes<T, G> r;
  r.fill(Vectorized<T>(T(0)));
  for (int a = 0; a < G; ++a) {
    for (int b = a + 1; b < G; ++b) {
      const Vectorized<T> b_first = before(v[b], v[a]) & one;
      r[a] = r[a] + b_first;
      r[b] = r[b] + (one - b_first);
    }
  }
  return r;
}

// Sorted values: out[q] = v[k] where k has rank q.
template <typename T, int G>
Lanes<T, G> sort_lanes(const Lanes<T, G>& v) {
  Lanes<T, G> out;
  if constexpr (G == 2) {
    const Vectorized<T> swap = before(v[1], v[0]);
    out[0] = Vectorized<T>::blendv(v[0], v[1], swap);
    out[1] = Vectorized<T>::blendv(v[1], v[0], swap);
  } else {
    const Lanes<T, G> r = ranks<T, G>(v);
    for (int q = 0; q < G; ++q) {
      Vectorized<T> o = v[0];
      for (int k = 1; k < G; ++k) o = Vectorized<T>::blendv(o, v[k], r[k] == Vectorized<T>(q));
      out[q] = o;
    }
  }
  return out;
}

// Gradient routing: out[k] = g[rank of x[k]].
template <typename T, int G>
Lanes<T, G> route_lanes(const Lanes<T, G>& x, const Lanes<T, G>& g) {
  Lanes<T, G> out;
  if constexpr (G == 2) {
    const Vectorized<T> swap = before(x[1], x[0]);
    out[0] = Vectorized<T>::blendv(g[0], g[1], swap);
    out[1] = Vectorized<T>::blendv(g[1], g[0], swap);
  } else {
    const Lanes<T, G> r = ranks<T, G>(x);
    for (int k = 0; k < G; ++k) {
      Vectorized<T> o = g[0];
      for (int q = 1; q < G; ++q) o = Vectorized<T>::blendv(o, g[q], r[k] == Vectorized<T>(q));
      out[k] = o;
    }
  }
  return out;
}

// G vectors of consecutive elements -> G streams (stream k: elements k, k + G, ...).
template <typename T, int G>
Lanes<T, G> deinterleave(const Lanes<T, G>& in) {
  if constexpr (G == 1) {
    return in;
  } else {
    Lanes<T, G / 2> even, odd;
    for (int i = 0; i < G / 2; ++i) {
      std::tie(even[i], odd[i]) = at::vec::deinterleave2(in[2 * i], in[2 * i + 1]);
    }
    const Lanes<T, G / 2> e = deinterleave<T, G / 2>(even), o = deinterleave<T, G / 2>(odd);
    Lanes<T, G> out;
    for (int k = 0; k < G / 2; ++k) {
      out[2 * k] = e[k];
      out[2 * k + 1] = o[k];
    }
    return out;
  }
}

// The inverse of deinterleave.
template <typename T, int G>
Lanes<T, G> interleave(const Lanes<T, G>& streams) {
  if constexpr (G == 1) {
    return streams;
  } else {
    Lanes<T, G / 2> even, odd;
    for (int k = 0; k < G / 2; ++k) {
      even[k] = streams[2 * k];
      odd[k] = streams[2 * k + 1];
    }
    const Lanes<T, G / 2> e = interleave<T, G / 2>(even), o = interleave<T, G / 2>(odd);
    Lanes<T, G> out;
    for (int i = 0; i < G / 2; ++i) {
      std::tie(out[2 * i], out[2 * i + 1]) = at::vec::interleave2(e[i], o[i]);
    }
    return out;
  }
}

// Stable argsort of one group of any size (insertion sort when small), scratch kept.
template <typename T>
class GroupArgsort {
 public:
  explicit GroupArgsort(int64_t size) : keys_(size), order_(size) {}

  const int64_t* operator()(const T* x, int64_t stride) {
    const int64_t size = static_cast<int64_t>(keys_.size());
    for (int64_t k = 0; k < size; ++k) keys_[k] = static_cast<K>(x[k * stride]);
    std::iota(order_.begin(), order_.end(), int64_t{0});
    const auto less = [this](int64_t a, int64_t b) { return before(keys_[a], keys_[b]); };
    if (size <= 32) {
      for (int64_t i = 1; i < size; ++i) {
        const int64_t item = order_[i];
        int64_t j = i;
        for (; j > 0 && less(item, order_[j - 1]); --j) order_[j] = order_[j - 1];
        order_[j] = item;
      }
    } else {
      std::stable_sort(order_.begin(), order_.end(), less);
    }
    return order_.data();
  }

 private:
  using K = at::opmath_type<T>;
  std::vector<K> keys_;
  std::vector<int64_t> order_;
};

// Calls fn(o, c0, n) on runs that cover every group, split over threads. With inner == 1 a run
// is n consecutive groups of row o starting at channel c0; else one group across n = inner.
template <typename Fn>
void for_each_run(const Lines& lines, int64_t group_size, const Fn& fn) {
  const int64_t groups = lines.channels / group_size, count = lines.outer * groups;
  const int64_t grain = std::max<int64_t>(1, 32768 / (group_size * lines.inner));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end;) {
      const int64_t o = line / groups, group = line % groups;
      const int64_t n = lines.inner == 1 ? std::min(end - line, groups - group) : 1;
      fn(o, group * group_size, lines.inner == 1 ? n : lines.inner);
      line += n;
    }
  });
}

// Element strides of a run: from one group to the next (lane) and inside a group (k).
struct Step {
  int64_t lane, k;
};

// Where the run at (o, c0) starts in a strided tensor, and its strides.
struct Strided {
  const Lines& lines;
  int64_t group_size;

  int64_t offset(int64_t o, int64_t c0) const { return o * lines.s_outer + c0 * lines.s_dim; }
  Step step() const {
    return lines.inner == 1 ? Step{group_size * lines.s_dim, lines.s_dim}
                            : Step{lines.s_inner, lines.s_dim};
  }
};

// The same in the contiguous output.
struct Dense {
  const Lines& lines;
  int64_t group_size;

  int64_t offset(int64_t o, int64_t c0) const { return (o * lines.channels + c0) * lines.inner; }
  Step step() const { return lines.inner == 1 ? Step{group_size, 1} : Step{1, lines.inner}; }
};

// Vector paths: groups of consecutive elements (packed) or groups across a contiguous inner
// dimension (rows); anything else takes the scalar argsort.
enum Kind { kPacked, kRows, kScalar };

Kind kind_of(const Lines& lines) {
  if (lines.inner == 1 && lines.s_dim == 1) return kPacked;
  if (lines.inner > 1 && lines.s_inner == 1) return kRows;
  return kScalar;
}

// Packed rows that follow each other in memory form one long row: fewer, longer runs.
bool flattenable(const Lines& lines) {
  return kind_of(lines) == kPacked && (lines.outer == 1 || lines.s_outer == lines.channels);
}

void flatten(Lines& lines) {
  lines.channels *= lines.outer;
  lines.outer = 1;
  lines.s_outer = 0;
}

template <typename T>
void forward_scalar(const T* x, Step xs, T* y, Step ys, int64_t n, int64_t group_size) {
  GroupArgsort<T> argsort(group_size);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t* order = argsort(x + j * xs.lane, xs.k);
    for (int64_t q = 0; q < group_size; ++q) {
      y[j * ys.lane + q * ys.k] = x[j * xs.lane + order[q] * xs.k];
    }
  }
}

template <typename T>
void backward_scalar(const T* g, Step gs, const T* x, Step xs, T* out, Step os, int64_t n,
                     int64_t group_size) {
  GroupArgsort<T> argsort(group_size);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t* order = argsort(x + j * xs.lane, xs.k);
    for (int64_t q = 0; q < group_size; ++q) {
      out[j * os.lane + order[q] * os.k] = g[j * gs.lane + q * gs.k];
    }
  }
}

template <typename T, int G>
void forward_rows(const T* x, int64_t xk, T* y, int64_t yk, int64_t n) {
  constexpr int64_t V = Vectorized<T>::size();
  for (int64_t i = 0; i < n; i += V) {
    const int64_t count = std::min(V, n - i);
    Lanes<T, G> v;
    for (int k = 0; k < G; ++k) v[k] = Vectorized<T>::loadu(x + k * xk + i, count);
    const Lanes<T, G> out = sort_lanes<T, G>(v);
    for (int q = 0; q < G; ++q) out[q].store(y + q * yk + i, count);
  }
}

template <typename T, int G>
void backward_rows(const T* g, int64_t gk, const T* x, int64_t xk, T* out, int64_t ok, int64_t n) {
  constexpr int64_t V = Vectorized<T>::size();
  for (int64_t i = 0; i < n; i += V) {
    const int64_t count = std::min(V, n - i);
    Lanes<T, G> xv, gv;
    for (int k = 0; k < G; ++k) xv[k] = Vectorized<T>::loadu(x + k * xk + i, count);
    for (int q = 0; q < G; ++q) gv[q] = Vectorized<T>::loadu(g + q * gk + i, count);
    const Lanes<T, G> back = route_lanes<T, G>(xv, gv);
    for (int k = 0; k < G; ++k) back[k].store(out + k * ok + i, count);
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// Raw AVX2 operations for groups of 2 stored as adjacent pairs: the pair's swap flag is
// computed in its even lane and copied to the odd lane, with in-lane shuffles only.
template <typename T>
struct Avx2;

template <>
struct Avx2<float> {
  using R = __m256;
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R mate(R v) { return _mm256_permute_ps(v, 0xB1); }
  static R nan(R v) { return _mm256_cmp_ps(v, v, _CMP_UNORD_Q); }
  static R not_at_most(R a, R b) { return _mm256_cmp_ps(a, b, _CMP_NLE_UQ); }  // !(a <= b)
  static R but_not(R a, R b) { return _mm256_andnot_ps(a, b); }  // b & ~a
  static R even_to_odd(R v) { return _mm256_moveldup_ps(v); }
  static R select(R a, R b, R mask) { return _mm256_blendv_ps(a, b, mask); }
};

template <>
struct Avx2<double> {
  using R = __m256d;
  static R load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  static R mate(R v) { return _mm256_permute_pd(v, 0x5); }
  static R nan(R v) { return _mm256_cmp_pd(v, v, _CMP_UNORD_Q); }
  static R not_at_most(R a, R b) { return _mm256_cmp_pd(a, b, _CMP_NLE_UQ); }  // !(a <= b)
  static R but_not(R a, R b) { return _mm256_andnot_pd(a, b); }
  static R even_to_odd(R v) { return _mm256_movedup_pd(v); }
  static R select(R a, R b, R mask) { return _mm256_blendv_pd(a, b, mask); }
};

// All ones in both lanes of each pair (a, b) whose b sorts strictly before a: b < a, or a is
// NaN and b is not; that is !(a <= b) (true when either is NaN) and b is not NaN.
template <typename T>
inline typename Avx2<T>::R pair_swap(typename Avx2<T>::R v) {
  using A = Avx2<T>;
  const typename A::R mate = A::mate(v);
  return A::even_to_odd(A::but_not(A::nan(mate), A::not_at_most(v, mate)));
}

// n adjacent pairs: out = sorted x (g == nullptr) or g routed back by the order of x.
template <typename T>
int64_t pairs_avx2(const T* x, const T* g, T* out, int64_t n) {
  using A = Avx2<T>;
  constexpr int64_t width = 32 / sizeof(T);
  int64_t i = 0;
  for (; i + width <= 2 * n; i += width) {
    const typename A::R v = A::load(x + i);
    const typename A::R swap = pair_swap<T>(v);
    const typename A::R src = g == nullptr ? v : A::load(g + i);
    A::store(out + i, A::select(src, A::mate(src), swap));
  }
  return i / 2;  // pairs done
}
#endif

#if defined(CRVAE_AVX512)
// The same for float with 512-bit registers: the swap flag is a mask bit, computed for each
// pair's even lane (the not-NaN test of the mate masks the compare) and spread to its odd lane
// by a shift. AVX-512 code is generated for these functions only; the build defines
// CRVAE_AVX512 where the CPU has AVX-512 F and DQ (crvae_ext/_cpp/_build.py).
#define CRVAE_AVX512_FN __attribute__((target("avx512f,avx512dq")))

struct Avx512 {
  using R = __m512;
  using M = __mmask16;
  static constexpr M kEven = 0x5555;
  CRVAE_AVX512_FN static R load(const float* p) { return _mm512_loadu_ps(p); }
  CRVAE_AVX512_FN static R mate(R v) { return _mm512_permute_ps(v, 0xB1); }
  CRVAE_AVX512_FN static M even_swap(R v, R mate) {
    const M ordered = _mm512_mask_cmp_ps_mask(kEven, mate, mate, _CMP_ORD_Q);
    return _mm512_mask_cmp_ps_mask(ordered, v, mate, _CMP_NLE_UQ);
  }
  CRVAE_AVX512_FN static M spread(M even) { return _kor_mask16(even, _kshiftli_mask16(even, 1)); }
};

// n adjacent float pairs as pairs_avx2 does them, 16 floats at a time; returns pairs done.
CRVAE_AVX512_FN int64_t pairs_avx512(const float* x, const float* g, float* out, int64_t n) {
  using A = Avx512;
  int64_t i = 0;
  for (; i + 16 <= 2 * n; i += 16) {
    const A::R v = A::load(x + i);
    const A::M swap = A::spread(A::even_swap(v, A::mate(v)));
    const A::R src = g == nullptr ? v : A::load(g + i);
    _mm512_storeu_ps(out + i, _mm512_mask_mov_ps(src, swap, A::mate(src)));
  }
  return i / 2;
}
#endif

// n adjacent pairs with the widest vectors this build has (sorted x, or g routed back by the
// order of x as in pairs_avx2); returns pairs done, the rest is left to the caller.
template <typename T>
int64_t pairs_simd(const T* x, const T* g, T* out, int64_t n) {
  int64_t j = 0;
#if defined(CRVAE_AVX512)
  if constexpr (std::is_same_v<T, float>) j = pairs_avx512(x, g, out, n);
#endif
#if defined(CPU_CAPABILITY_AVX2)
  j += pairs_avx2<T>(x + 2 * j, g == nullptr ? nullptr : g + 2 * j, out + 2 * j, n - j);
#endif
  return j;
}

template <typename T, int G>
void forward_packed(const T* x, T* y, int64_t n) {
  constexpr int64_t V = Vectorized<T>::size();
  int64_t j = 0;
  if constexpr (G == 2) j = pairs_simd<T>(x, nullptr, y, n);
  for (; j + V <= n; j += V) {
    Lanes<T, G> in;
    for (int k = 0; k < G; ++k) in[k] = Vectorized<T>::loadu(x + j * G + k * V);
    const Lanes<T, G> out = interleave<T, G>(sort_lanes<T, G>(deinterleave<T, G>(in)));
    for (int k = 0; k < G; ++k) out[k].store(y + j * G + k * V);
  }
  if (j < n) forward_scalar(x + j * G, Step{G, 1}, y + j * G, Step{G, 1}, n - j, G);
}

template <typename T, int G>
void backward_packed(const T* g, const T* x, T* out, int64_t n) {
  constexpr int64_t V = Vectorized<T>::size();
  int64_t j = 0;
  if constexpr (G == 2) j = pairs_simd<T>(x, g, out, n);
  for (; j + V <= n; j += V) {
    Lanes<T, G> xv, gv;
    for (int k = 0; k < G; ++k) xv[k] = Vectorized<T>::loadu(x + j * G + k * V);
    for (int k = 0; k < G; ++k) gv[k] = Vectorized<T>::loadu(g + j * G + k * V);
    const Lanes<T, G> back =
        interleave<T, G>(route_lanes<T, G>(deinterleave<T, G>(xv), deinterleave<T, G>(gv)));
    for (int k = 0; k < G; ++k) back[k].store(out + j * G + k * V);
  }
  if (j < n) {
    const Step packed{G, 1};
    backward_scalar(g + j * G, packed, x + j * G, packed, out + j * G, packed, n - j, G);
  }
}

template <typename T, int G>
void forward_vector(const T* x, const Lines& lines, Kind kind, T* y) {
  const Strided in{lines, G};
  const Dense dense{lines, G};
  for_each_run(lines, G, [&](int64_t o, int64_t c0, int64_t n) {
    const T* xp = x + in.offset(o, c0);
    T* yp = y + dense.offset(o, c0);
    if (kind == kPacked) {
      forward_packed<T, G>(xp, yp, n);
    } else {
      forward_rows<T, G>(xp, lines.s_dim, yp, lines.inner, n);
    }
  });
}

template <typename T, int G>
void backward_vector(const T* g, const Lines& g_lines, const T* x, const Lines& x_lines, Kind kind,
                     T* out) {
  const Strided gs{g_lines, G}, xs{x_lines, G};
  const Dense dense{x_lines, G};
  for_each_run(x_lines, G, [&](int64_t o, int64_t c0, int64_t n) {
    const T* gp = g + gs.offset(o, c0);
    const T* xp = x + xs.offset(o, c0);
    T* op = out + dense.offset(o, c0);
    if (kind == kPacked) {
      backward_packed<T, G>(gp, xp, op, n);
    } else {
      backward_rows<T, G>(gp, g_lines.s_dim, xp, x_lines.s_dim, op, x_lines.inner, n);
    }
  });
}

template <typename T>
void forward_any(const T* x, const Lines& lines, int64_t group_size, T* y) {
  const Strided in{lines, group_size};
  const Dense dense{lines, group_size};
  for_each_run(lines, group_size, [&](int64_t o, int64_t c0, int64_t n) {
    forward_scalar(x + in.offset(o, c0), in.step(), y + dense.offset(o, c0), dense.step(), n,
                   group_size);
  });
}

template <typename T>
void backward_any(const T* g, const Lines& g_lines, const T* x, const Lines& x_lines,
                  int64_t group_size, T* out) {
  const Strided gs{g_lines, group_size}, xs{x_lines, group_size};
  const Dense dense{x_lines, group_size};
  for_each_run(x_lines, group_size, [&](int64_t o, int64_t c0, int64_t n) {
    backward_scalar(g + gs.offset(o, c0), gs.step(), x + xs.offset(o, c0), xs.step(),
                    out + dense.offset(o, c0), dense.step(), n, group_size);
  });
}

template <typename T>
constexpr bool kVectorised = std::is_same_v<T, float> || std::is_same_v<T, double>;

template <typename T>
void forward(const T* x, Lines lines, int64_t group_size, T* y) {
  if (flattenable(lines)) flatten(lines);
  const Kind kind = kind_of(lines);
  if constexpr (kVectorised<T>) {
    if (kind != kScalar) {
      switch (group_size) {
        case 2:
          return forward_vector<T, 2>(x, lines, kind, y);
        case 4:
          return forward_vector<T, 4>(x, lines, kind, y);
        case 8:
          return forward_vector<T, 8>(x, lines, kind, y);
        default:
          break;
      }
    }
  }
  forward_any(x, lines, group_size, y);
}

template <typename T>
void backward(const T* g, Lines g_lines, const T* x, Lines x_lines, int64_t group_size, T* out) {
  if (flattenable(g_lines) && flattenable(x_lines)) {
    flatten(g_lines);
    flatten(x_lines);
  }
  const Kind kind = kind_of(x_lines) == kind_of(g_lines) ? kind_of(x_lines) : kScalar;
  if constexpr (kVectorised<T>) {
    if (kind != kScalar) {
      switch (group_size) {
        case 2:
          return backward_vector<T, 2>(g, g_lines, x, x_lines, kind, out);
        case 4:
          return backward_vector<T, 4>(g, g_lines, x, x_lines, kind, out);
        case 8:
          return backward_vector<T, 8>(g, g_lines, x, x_lines, kind, out);
        default:
          break;
      }
    }
  }
  backward_any(g, g_lines, x, x_lines, group_size, out);
}

at::Tensor dense_like(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor groupsort_cpu(const at::Tensor& x_in, int64_t group_size, int64_t dim) {
  check_groupsort_args(x_in, group_size, dim);
  at::Tensor y = dense_like(x_in);
  if (x_in.numel() == 0) return y;
  Lines lines;
  const at::Tensor x = viewable(x_in, dim, lines);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "groupsort", [&] {
    forward(x.const_data_ptr<scalar_t>(), lines, group_size, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor groupsort_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                  int64_t group_size, int64_t dim) {
  check_groupsort_backward_args(grad_in, x_in, group_size, dim);
  at::Tensor out = dense_like(x_in);
  if (x_in.numel() == 0) return out;
  Lines g_lines, x_lines;
  const at::Tensor grad = viewable(grad_in, dim, g_lines);
  const at::Tensor x = viewable(x_in, dim, x_lines);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "groupsort_backward", [&] {
        backward(grad.const_data_ptr<scalar_t>(), g_lines, x.const_data_ptr<scalar_t>(), x_lines,
                 group_size, out.mutable_data_ptr<scalar_t>());
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crvae_ext_cpp, CPU, m) {
  m.impl("groupsort", &groupsort_cpu);
  m.impl("groupsort_backward", &groupsort_backward_cpu);
}

}  // namespace crvae_ext_cpp
