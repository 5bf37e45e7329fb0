// Helpers shared by the kernels: the accumulation type, row conversion to and from
// it, vectorized row reductions and the GELU flavours.
//
// Vectorized<T> is ATen's SIMD wrapper. Which instruction set it uses is fixed when
// this file is compiled, by the CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 defines
// (and the matching -m flags) that the build passes; without them it is ATen's
// portable implementation. See CMakeLists.txt and fastvit_kernels/_cpp.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastvit {

using at::vec::Vectorized;

// Kernels run below autograd: the ATen ops they call internally (GEMMs on tiles, copies)
// must not be recorded even when the op's inputs require grad.
#define FASTVIT_BELOW_AUTOGRAD at::AutoDispatchBelowADInplaceOrView below_autograd_guard_

// Reduced types (bf16, fp16) and fp32 compute in fp32; fp64 stays in fp64.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline at::ScalarType acc_dtype() {
  return std::is_same_v<T, double> ? at::kDouble : at::kFloat;
}

// dst[0:n] = src[0:n] converted to the accumulation type.
template <typename T>
inline void load_row(const T* src, acc_t<T>* dst, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else {
    using BV = Vectorized<T>;
    constexpr int64_t F = Vectorized<float>::size();
    int64_t i = 0;
    for (; i + BV::size() <= n; i += BV::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(BV::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + F);
    }
    for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// dst[0:n] = src[0:n] rounded to T.
template <typename T>
inline void store_row(const acc_t<T>* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    if (dst != src) std::memcpy(dst, src, n * sizeof(T));
  } else {
    using BV = Vectorized<T>;
    constexpr int64_t F = Vectorized<float>::size();
    int64_t i = 0;
    for (; i + BV::size() <= n; i += BV::size()) {
      auto lo = Vectorized<float>::loadu(src + i);
      auto hi = Vectorized<float>::loadu(src + i + F);
      at::vec::convert_from_float<T>(lo, hi).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// The row as acc_t: `src` itself when T already is acc_t, else a converted copy in buf.
template <typename T>
inline const acc_t<T>* row_as_acc(const T* src, acc_t<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return src;
  } else {
    load_row(src, buf, n);
    return buf;
  }
}

// Four independent accumulators: one add chain per vector would make these latency
// bound (a row of 384 floats is only 48 AVX2 vectors).
template <typename A>
inline A row_sum(const A* x, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 += V::loadu(x + i);
    a1 += V::loadu(x + i + W);
    a2 += V::loadu(x + i + 2 * W);
    a3 += V::loadu(x + i + 3 * W);
  }
  for (; i + W <= n; i += W) a0 += V::loadu(x + i);
  A s = at::vec::vec_reduce_all<A>([](V& p, V& q) { return p + q; }, (a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += x[i];
  return s;
}

template <typename A>
inline A row_max(const A* x, int64_t n) {
  using V = Vectorized<A>;
  A m = -std::numeric_limits<A>::infinity();
  int64_t i = 0;
  if (n >= V::size()) {
    V acc = V::loadu(x);
    for (i = V::size(); i + V::size() <= n; i += V::size()) acc = at::vec::maximum(acc, V::loadu(x + i));
    m = at::vec::vec_reduce_all<A>([](V& p, V& q) { return at::vec::maximum(p, q); }, acc);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// sum((x - c)^2): the variance's numerator, two-pass for accuracy (the row is in L1).
template <typename A>
inline A row_sq_dev(const A* x, A c, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V cv(c);
  V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    V d0 = V::loadu(x + i) - cv, d1 = V::loadu(x + i + W) - cv;
    V d2 = V::loadu(x + i + 2 * W) - cv, d3 = V::loadu(x + i + 3 * W) - cv;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
  }
  for (; i + W <= n; i += W) {
    V d = V::loadu(x + i) - cv;
    a0 = at::vec::fmadd(d, d, a0);
  }
  A s = at::vec::vec_reduce_all<A>([](V& p, V& q) { return p + q; }, (a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += (x[i] - c) * (x[i] - c);
  return s;
}

// ----------------------------------------------------------------------------- GELU
// Exact: 0.5 x (1 + erf(x / sqrt 2)). Tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
// Quick (CLIP's QuickGELU): x * sigmoid(1.702 x).
// The flavour is a template argument: the callers pick it once per call, outside the row
// loops, so each loop is compiled for one formula.
enum class Gelu { kErf, kTanh, kQuick };

constexpr double kSqrtHalf = 0.70710678118654752440;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kTanhCoef = 0.044715;
constexpr double kQuickCoef = 1.702;

// erf for fp32 vectors without an exp: erf(x) = x P(x^2) / Q(x^2) on [-4, 4], clamped
// outside (|erf| rounds to 1 there in fp32). ATen's Vectorized<float>::erf calls Sleef's exp
// on top of a division and was most of the GELU pass's time. The coefficients are our own
// fit (weighted least squares iterated toward minimax, in fp64): max |error| 5.5e-8 in
// exact arithmetic, 3.1e-7 evaluated in fp32, against ATen's ~1.5e-7.
inline Vectorized<float> erf_fast(Vectorized<float> x) {
  using V = Vectorized<float>;
  constexpr float kP[] = {1.1283786296844482f,    0.2139434665441513f,     0.052433378994464874f,
                          0.0042929742485284805f, 0.000155532150529325f,   -1.9902552139683394e-06f,
                          1.921647729830056e-08f};
  constexpr float kQ[] = {1.0f, 0.5229301452636719f, 0.12079916149377823f, 0.015550999902188778f,
                          0.0010980084771290421f};
  const V xc = at::vec::clamp(x, V(-4.0f), V(4.0f));
  const V u = xc * xc;
  V p(kP[6]);
  for (int i = 5; i >= 0; --i) p = at::vec::fmadd(p, u, V(kP[i]));
  V q(kQ[4]);
  for (int i = 3; i >= 0; --i) q = at::vec::fmadd(q, u, V(kQ[i]));
  return at::vec::clamp(xc * p / q, V(-1.0f), V(1.0f));
}

template <typename A>
inline Vectorized<A> erf_vec(Vectorized<A> x) {
  if constexpr (std::is_same_v<A, float>) {
    return erf_fast(x);
  } else {
    return x.erf();
  }
}

// sigmoid(1.702 x) = 1 / (1 + exp(-1.702 x)). For x -> -inf the exp overflows to inf and
// the result is 0, not NaN; for x -> +inf it is 1.
template <typename A>
inline Vectorized<A> quick_sigmoid_vec(Vectorized<A> x) {
  using V = Vectorized<A>;
  const V one(A(1));
  return one / (one + (x * V(A(-kQuickCoef))).exp());
}

template <typename A>
inline A quick_sigmoid_scalar(A x) {
  return A(1) / (A(1) + std::exp(A(-kQuickCoef) * x));
}

template <Gelu G, typename A>
inline Vectorized<A> gelu_vec(Vectorized<A> x) {
  using V = Vectorized<A>;
  const V half(A(0.5)), one(A(1));
  if constexpr (G == Gelu::kQuick) {
    return x * quick_sigmoid_vec(x);
  } else if constexpr (G == Gelu::kTanh) {
    V inner = V(A(kSqrt2OverPi)) * at::vec::fmadd(V(A(kTanhCoef)) * x * x, x, x);
    return half * x * (one + inner.tanh());
  } else {
    return half * x * (one + erf_vec(x * V(A(kSqrtHalf))));
  }
}

template <Gelu G, typename A>
inline A gelu_scalar(A x) {
  if constexpr (G == Gelu::kQuick) {
    return x * quick_sigmoid_scalar(x);
  } else if constexpr (G == Gelu::kTanh) {
    return A(0.5) * x * (A(1) + std::tanh(A(kSqrt2OverPi) * (x + A(kTanhCoef) * x * x * x)));
  } else {
    return A(0.5) * x * (A(1) + std::erf(x * A(kSqrtHalf)));
  }
}

// d GELU(x) / dx; QuickGELU's is s + 1.702 x s (1 - s), s = sigmoid(1.702 x).
template <Gelu G, typename A>
inline Vectorized<A> gelu_grad_vec(Vectorized<A> x) {
  using V = Vectorized<A>;
  const V half(A(0.5)), one(A(1));
  if constexpr (G == Gelu::kQuick) {
    V s = quick_sigmoid_vec(x);
    return at::vec::fmadd(V(A(kQuickCoef)) * x * s, one - s, s);
  } else if constexpr (G == Gelu::kTanh) {
    V x2 = x * x;
    V t = (V(A(kSqrt2OverPi)) * at::vec::fmadd(V(A(kTanhCoef)) * x2, x, x)).tanh();
    V dinner = V(A(kSqrt2OverPi)) * at::vec::fmadd(V(A(3 * kTanhCoef)), x2, one);
    return half * (one + t) + half * x * (one - t * t) * dinner;
  } else {
    V cdf = half * (one + erf_vec(x * V(A(kSqrtHalf))));
    V pdf = V(A(kInvSqrt2Pi)) * (V(A(-0.5)) * x * x).exp();
    return at::vec::fmadd(x, pdf, cdf);
  }
}

template <Gelu G, typename A>
inline A gelu_grad_scalar(A x) {
  if constexpr (G == Gelu::kQuick) {
    A s = quick_sigmoid_scalar(x);
    return s + A(kQuickCoef) * x * s * (A(1) - s);
  } else if constexpr (G == Gelu::kTanh) {
    A t = std::tanh(A(kSqrt2OverPi) * (x + A(kTanhCoef) * x * x * x));
    A dinner = A(kSqrt2OverPi) * (A(1) + A(3 * kTanhCoef) * x * x);
    return A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * dinner;
  } else {
    return A(0.5) * (A(1) + std::erf(x * A(kSqrtHalf))) + x * A(kInvSqrt2Pi) * std::exp(A(-0.5) * x * x);
  }
}

// Calls fn(std::integral_constant<Gelu, G>{}) for the runtime flavour g.
template <typename Fn>
inline void dispatch_gelu(Gelu g, Fn&& fn) {
  switch (g) {
    case Gelu::kTanh:
      fn(std::integral_constant<Gelu, Gelu::kTanh>{});
      break;
    case Gelu::kQuick:
      fn(std::integral_constant<Gelu, Gelu::kQuick>{});
      break;
    default:
      fn(std::integral_constant<Gelu, Gelu::kErf>{});
  }
}

// Ask for a row ahead of use, so memory streams in while the current row is computed
// on from L1 (the statistics and normalize passes otherwise leave the memory idle).
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
#if defined(__GNUC__) || defined(__clang__)
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off);
#endif
}

// Rows per parallel task so that a task touches at least ~32K elements.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len));
}

// Per-thread fp32/fp64 partial sums for column reductions (LayerNorm's dweight/dbias,
// a Linear's dbias) inside at::parallel_for; summed across threads afterwards.
template <typename A>
struct ThreadPartials {
  int64_t width;
  std::vector<A> data;
  ThreadPartials(int64_t count, int64_t width_)
      : width(width_), data(static_cast<size_t>(at::get_num_threads() * count * width_), A(0)) {}
  A* get(int64_t which = 0, int64_t count = 1) {
    return data.data() + (at::get_thread_num() * count + which) * width;
  }
  // Sum of partial `which` over threads.
  at::Tensor reduce(int64_t which, int64_t count, at::ScalarType out_dtype) const {
    at::Tensor out = at::zeros({width}, at::TensorOptions().dtype(sizeof(A) == 8 ? at::kDouble : at::kFloat));
    A* o = out.data_ptr<A>();
    for (int64_t t = 0; t < at::get_num_threads(); ++t) {
      const A* p = data.data() + (t * count + which) * width;
      for (int64_t i = 0; i < width; ++i) o[i] += p[i];
    }
    return out.to(out_dtype);
  }
};

}  // namespace fastvit
