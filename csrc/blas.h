// Row-major GEMM on raw pointers, for the small tiles of the attention kernels.
//
// at::mm on a tile costs tens of microseconds before any arithmetic (a Tensor per operand,
// the dispatcher, shape checks); the attention kernels multiply thousands of tiles per call,
// so that overhead alone was ~15% of their time at ViT-S shapes. Here the tiles go straight
// to the Fortran BLAS that libtorch_cpu exports (MKL in the x86 wheels; inside a parallel
// region it runs single-threaded, which is what each task wants). The symbols are weak: on a
// torch build that exports none, they are null and the same call goes through at::mm.
//
// bf16 / fp16 tiles have a faster route where the CPU multiplies them natively (AVX512-BF16,
// AMX): oneDNN's batch-reduce GEMM micro-kernel, which ATen exports as cpublas::brgemm, at
// 175-210 GFLOP/s per core on attention tiles against 80-90 for fp32 sgemm (AMD EPYC with
// avx512_bf16, ViT-S shapes). It reads B in the VNNI layout (pairs of B's rows interleaved,
// pack_vnni below) and accumulates into fp32 C. Detected once per dtype: the CPU flag (CPUID),
// then a small probe product that must come out right (a build or CPU without the micro-kernel
// throws).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>
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

#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
#define FASTVIT_HAS_BRGEMM 1
#endif

// C (m x n fp32, row stride ldc) = (or += when accumulate) A (m x k, row stride lda) times B,
// B given in the VNNI layout of pack_vnni with row stride ldb (columns of B). k must be even.
// Only called where vnni_gemm_available<T>() said yes.
template <typename T>
void gemm_vnni(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b_vnni, int64_t ldb,
               bool accumulate, float* c, int64_t ldc) {
#ifdef FASTVIT_HAS_BRGEMM
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b_vnni, c, /*is_vnni=*/true);
#else
  TORCH_CHECK(false, "fastvit: gemm_vnni called on a torch without cpublas::brgemm");
#endif
}

// Ends a run of gemm_vnni calls on this thread (releases AMX tile state where it was taken).
inline void gemm_vnni_done() {
#ifdef FASTVIT_HAS_BRGEMM
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
#endif
}

// B (k x n) in the VNNI layout: row pair p of B becomes row p of the result, its two values
// for column j side by side: out[(p * ldo + j) * 2 + e] = B[2p + e][j], zero past row k.
// B is addressed as element(i, j) = b[i * row_stride + j * col_stride], so that both K^T
// (col_stride = the key rows' stride) and V (row_stride = it) pack from their inputs.
template <typename T>
void pack_vnni(const T* b, int64_t row_stride, int64_t col_stride, int64_t k, int64_t n, T* out, int64_t ldo) {
  for (int64_t p = 0; p < (k + 1) / 2; ++p) {
    const T* r0 = b + (2 * p) * row_stride;
    const bool has_r1 = 2 * p + 1 < k;
    T* o = out + p * ldo * 2;
    for (int64_t j = 0; j < n; ++j) {
      o[2 * j] = r0[j * col_stride];
      o[2 * j + 1] = has_r1 ? r0[row_stride + j * col_stride] : T(0);
    }
  }
}

namespace detail {
// Whether the CPU multiplies T natively (CPUID leaf 7): AVX512-BF16 or AMX-BF16 for bf16,
// AVX512-FP16 or AMX-FP16 for fp16. Read from CPUID rather than torch's helpers, whose names
// changed between torch releases. Only in an AVX-512 build of this extension (built so
// because torch found AVX-512 usable on this machine, OS support included).
template <typename T>
bool native_cpu_support() {
#if defined(CPU_CAPABILITY_AVX512) && (defined(__x86_64__) || defined(__i386__))
  unsigned a0 = 0, b0 = 0, c0 = 0, d0 = 0, a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  if (__get_cpuid_count(7, 0, &a0, &b0, &c0, &d0) == 0) return false;
  if (a0 < 1 || __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) == 0) a1 = 0;  // a0: highest subleaf of 7
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    return (a1 >> 5 & 1) || (d0 >> 22 & 1);  // AVX512_BF16, AMX-BF16
  } else {
    return (d0 >> 23 & 1) || (a1 >> 21 & 1);  // AVX512_FP16, AMX-FP16
  }
#else
  return false;
#endif
}

template <typename T>
bool probe_vnni_gemm() {
#ifdef FASTVIT_HAS_BRGEMM
  const char* env = std::getenv("FASTVIT_CPP_GEMM");
  if (env != nullptr && std::strcmp(env, "aten") == 0) return false;
  if (!native_cpu_support<T>()) return false;
  try {  // A (3 x 4) B (4 x 5) with small integers: exact in every dtype, so any layout slip shows
    constexpr int64_t M = 3, N = 5, K = 4;
    T a[M * K], b[K * N], bp[K * N];
    float c[M * N];
    for (int64_t i = 0; i < M * K; ++i) a[i] = T(static_cast<float>(i % 7) - 3);
    for (int64_t i = 0; i < K * N; ++i) b[i] = T(static_cast<float>(i % 5) - 2);
    pack_vnni(b, N, 1, K, N, bp, N);
    gemm_vnni(M, N, K, a, K, bp, N, false, c, N);
    gemm_vnni_done();
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) {
        float want = 0;
        for (int64_t l = 0; l < K; ++l) want += static_cast<float>(a[i * K + l]) * static_cast<float>(b[l * N + j]);
        if (c[i * N + j] != want) return false;
      }
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
#else
  return false;
#endif
}
}  // namespace detail

// Whether gemm_vnni runs for T (bf16 or fp16) on this CPU; FASTVIT_CPP_GEMM=aten turns it off
// as it turns off oneDNN's Linear GEMMs (gemm.h).
template <typename T>
bool vnni_gemm_available() {
  if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
    static const bool ok = detail::probe_vnni_gemm<T>();
    return ok;
  } else {
    return false;
  }
}

}  // namespace fastvit
