// Row-major GEMM on raw pointers, for the small tiles of the attention kernels.
//
// at::mm on a tile costs tens of microseconds before any arithmetic (a Tensor per operand,
// the dispatcher, shape checks); the attention kernels multiply thousands of tiles per call,
// so that overhead alone was ~15% of their time at ViT-S shapes. Here the tiles go straight
// to the Fortran BLAS that libtorch_cpu exports (MKL in the x86 wheels; inside a parallel
// region it runs single-threaded, which is what each task wants). The symbols are weak: on a
// torch build that exports none, they are null and the same call goes through at::mm.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastvit {

// C (m x n, row stride ldc) = alpha * op(A) op(B) + beta * C, all row-major with unit
// column stride; op(X) = X^T when the flag is set. A is m x k after op, B is k x n after op.
// beta == 0 means C is not read (it may hold garbage).
template <typename A>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda,
             const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  static_assert(std::is_same_v<A, float> || std::is_same_v<A, double>, "gemm_rm: float or double");
  if (m == 0 || n == 0) return;
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  const bool fits = m <= kMaxInt && n <= kMaxInt && k <= kMaxInt && lda <= kMaxInt && ldb <= kMaxInt &&
                    ldc <= kMaxInt;
  auto* blas = [] {
    if constexpr (std::is_same_v<A, float>) {
      return &sgemm_;
    } else {
      return &dgemm_;
    }
  }();
  if (blas != nullptr && fits && k > 0) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, and a row-major
    // matrix is its own transpose in column-major: swap the operands, keep the flags.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    // BLAS wants leading dimensions >= max(1, rows of the stored column-major matrix).
    auto ld = [](int64_t v, int64_t min_rows) { return static_cast<int>(std::max<int64_t>({v, min_rows, 1})); };
    const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
    const int l_b = ld(ldb, trans_b ? k : n), l_a = ld(lda, trans_a ? m : k), l_c = ld(ldc, n);
    blas(&ta, &tb, &mm, &nn, &kk, &alpha, b, &l_b, a, &l_a, &beta, c, &l_c);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  auto view = [&](const A* p, int64_t rows, int64_t cols, int64_t stride, bool trans) {
    at::Tensor t = at::from_blob(const_cast<A*>(p), {trans ? cols : rows, trans ? rows : cols}, {stride, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  // addmm_ with beta == 0 ignores C's contents, NaN included, as BLAS does.
  C.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

}  // namespace fastvit
