// Non-causal scaled dot-product attention, flash style: parallel over (batch, head,
// query block); each task multiplies its query block with blocks of keys by the BLAS GEMM
// on raw tile pointers (blas.h; no copies for fp32/fp64: tiles are strided views of the inputs),
// keeps a running max and sum (online softmax) so the N x N score matrix never exists,
// and writes its rows of the output directly. The packed form reads q, k and v straight
// from the qkv Linear's (B, N, 3, H, d) output and writes (B, N, H*d), so the model needs
// no permute or reshape copies around it. bf16/fp16: where the CPU multiplies them natively
// (AVX512-BF16, AMX) the forward's products take them as they are, accumulating in fp32
// (attention_fwd_kernel_vnni); otherwise tiles are converted to fp32 once per task and
// multiplied in fp32, as ATen's own CPU flash attention accumulates.
//
// Backward recomputes the probabilities from the saved log-sum-exp, per (batch, head):
// dV += P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = dS K scale, dK += dS^T Q scale.
#include "checks.h"
#include "blas.h"
#include "common.h"
#include "attention.h"
#include "ops.h"

namespace fastvit {
namespace {

// One (B, H, N, d) operand: base pointer and element strides of b, h, n (d is contiguous).
template <typename T>
struct Operand {
  T* ptr;
  int64_t sb, sh, sn;
  T* row(int64_t b, int64_t h, int64_t n) const { return ptr + b * sb + h * sh + n * sn; }
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {  // t: (B, H, N, d) view with stride(-1) == 1
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

struct Dims {
  int64_t B, H, Nq, Nk, d;
};

// A row-major tile: base pointer and row stride (columns are contiguous).
template <typename A>
struct Tile {
  const A* ptr;
  int64_t ld;
  const A* row(int64_t i) const { return ptr + i * ld; }
};

// `rows` rows of an operand for (b, h), starting at row n0, as an acc_t tile: the input
// itself when T is acc_t, else converted into buf (rows x d, contiguous).
template <typename T>
Tile<acc_t<T>> rows_as_acc(const Operand<T>& x, int64_t b, int64_t h, int64_t n0, int64_t rows, int64_t d,
                           acc_t<T>* buf) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return {x.row(b, h, n0), x.sn};
  } else {
    for (int64_t i = 0; i < rows; ++i) load_row(x.row(b, h, n0 + i), buf + i * d, d);
    return {buf, d};
  }
}

template <typename A>
inline Vectorized<A> vexp(Vectorized<A> x) {
  if constexpr (std::is_same_v<A, float>) {
    return x.exp_u20();  // ATen's fast fp32 exp, the one its flash attention uses
  } else {
    return x.exp();
  }
}

// p[j] = exp(s[j] * scale - shift) in place; returns sum_j p[j].
template <typename A>
inline A exp_and_sum(A* s, int64_t n, A scale, A shift) {
  using V = Vectorized<A>;
  const V vs(scale), vsh(shift);
  V acc(A(0));
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) {
    V p = vexp(at::vec::fmsub(V::loadu(s + j), vs, vsh));
    p.store(s + j);
    acc += p;
  }
  A sum = at::vec::vec_reduce_all<A>([](V& a, V& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] * scale - shift);
    sum += s[j];
  }
  return sum;
}

inline void scale_row(float* x, int64_t n, float f) {
  at::vec::map([f](Vectorized<float> v) { return v * Vectorized<float>(f); }, x, x, n);
}
inline void scale_row(double* x, int64_t n, double f) {
  at::vec::map([f](Vectorized<double> v) { return v * Vectorized<double>(f); }, x, x, n);
}

// One query row's step of the online softmax over a key block: the scores s (cols) become
// exp(s * scale - new max) in place, the running max m and sum l move on, and the row's output
// accumulated from earlier blocks (o, d values) is rescaled to the new max.
template <typename A>
inline void online_softmax_row(A* s, int64_t cols, A scale, bool first_block, A& m, A& l, A* o, int64_t d) {
  const A m_new = std::max(m, row_max(s, cols) * scale);
  const A row_sum_p = exp_and_sum(s, cols, scale, m_new);
  if (first_block) {
    l = row_sum_p;
  } else {
    const A alpha = std::exp(m - m_new);
    l = l * alpha + row_sum_p;
    scale_row(o, d, alpha);
  }
  m = m_new;
}

// Query rows per task: big enough to amortize the per-tile GEMM calls, small enough to
// leave several tasks per thread.
int64_t query_block(const Dims& s) {
  int64_t qb = 128;
  const int64_t want = 4 * at::get_num_threads();
  while (qb > 16 && s.B * s.H * ((s.Nq + qb - 1) / qb) < want) qb /= 2;
  return std::min<int64_t>(qb, std::max<int64_t>(s.Nq, 1));
}

// Keys per block: ViT sequences (<= 1024) take one block, so no rescaling is needed.
int64_t key_block(const Dims& s) { return s.Nk <= 1024 ? std::max<int64_t>(s.Nk, 1) : 512; }

template <typename T>
void attention_fwd_kernel(const Operand<T>& q, const Operand<T>& k, const Operand<T>& v, const Operand<T>& o,
                          acc_t<T>* lse, const Dims& s, acc_t<T> scale) {
  using A = acc_t<T>;
  constexpr bool kSame = std::is_same_v<T, A>;
  const int64_t qb = query_block(s), kb = key_block(s), d = s.d;
  const int64_t nqb = (s.Nq + qb - 1) / qb;
  const bool one_kblock = kb >= s.Nk;
  at::parallel_for(0, s.B * s.H * nqb, 1, [&](int64_t t0, int64_t t1) {
    FASTVIT_BELOW_AUTOGRAD;  // thread-local: each worker thread needs its own
    std::vector<A> sbuf(qb * kb), obuf(qb * d), m(qb), l(qb);
    std::vector<A> qbuf(kSame ? 0 : qb * d), kbuf(kSame ? 0 : s.Nk * d), vbuf(kSame ? 0 : s.Nk * d);
    int64_t cached_bh = -1;  // which (b, h) kbuf/vbuf hold
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / nqb, b = bh / s.H, h = bh % s.H;
      const int64_t i0 = (task % nqb) * qb, rows = std::min(qb, s.Nq - i0);
      const Tile<A> Q = rows_as_acc(q, b, h, i0, rows, d, qbuf.data());
      if (!kSame && cached_bh != bh) {
        rows_as_acc(k, b, h, 0, s.Nk, d, kbuf.data());
        rows_as_acc(v, b, h, 0, s.Nk, d, vbuf.data());
        cached_bh = bh;
      }
      const Tile<A> K = kSame ? Tile<A>{reinterpret_cast<const A*>(k.row(b, h, 0)), k.sn} : Tile<A>{kbuf.data(), d};
      const Tile<A> V = kSame ? Tile<A>{reinterpret_cast<const A*>(v.row(b, h, 0)), v.sn} : Tile<A>{vbuf.data(), d};
      // fp32/fp64 with a single key block: accumulate straight into the output rows.
      const bool direct = kSame && one_kblock;
      A* O = direct ? reinterpret_cast<A*>(o.row(b, h, i0)) : obuf.data();
      const int64_t ldo = direct ? o.sn : d;
      std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<A>::infinity());
      std::fill(l.begin(), l.begin() + rows, A(0));
      for (int64_t j0 = 0; j0 < s.Nk; j0 += kb) {
        const int64_t cols = std::min(kb, s.Nk - j0);
        gemm_rm<A>(false, true, rows, cols, d, A(1), Q.ptr, Q.ld, K.row(j0), K.ld, A(0), sbuf.data(), kb);
        for (int64_t i = 0; i < rows; ++i) {
          online_softmax_row(sbuf.data() + i * kb, cols, scale, j0 == 0, m[i], l[i], obuf.data() + i * d, d);
        }
        gemm_rm<A>(false, false, rows, d, cols, A(1), sbuf.data(), kb, V.row(j0), V.ld, j0 == 0 ? A(0) : A(1), O,
                   ldo);
      }
      A* lse_row = lse + bh * s.Nq + i0;
      for (int64_t i = 0; i < rows; ++i) {
        lse_row[i] = m[i] + std::log(l[i]);
        const A inv = A(1) / l[i];
        if (direct) {
          scale_row(reinterpret_cast<A*>(o.row(b, h, i0 + i)), d, inv);
        } else {
          A* oi = obuf.data() + i * d;
          scale_row(oi, d, inv);
          store_row<T>(oi, o.row(b, h, i0 + i), d);
        }
      }
    }
  });
}

// The forward for bf16 / fp16 where the CPU multiplies them natively (blas.h: gemm_vnni):
// the same flash loop, but the two products take the inputs as they are, with fp32
// accumulation. Q is read in place; K^T and V are packed into the VNNI layout once per
// (batch, head) and thread; the probabilities are rounded to T for P V, as ATen's CPU flash
// attention and the GPU kernels do (the row sums stay fp32, of the unrounded values). d even.
template <typename T>
void attention_fwd_kernel_vnni(const Operand<T>& q, const Operand<T>& k, const Operand<T>& v, const Operand<T>& o,
                               float* lse, const Dims& s, float scale) {
  const int64_t qb = query_block(s), kb = key_block(s), d = s.d;
  const int64_t nqb = (s.Nq + qb - 1) / qb, kb2 = kb + kb % 2, nk2 = s.Nk + s.Nk % 2;
  at::parallel_for(0, s.B * s.H * nqb, 1, [&](int64_t t0, int64_t t1) {
    FASTVIT_BELOW_AUTOGRAD;
    std::vector<float> sbuf(qb * kb), obuf(qb * d), m(qb), l(qb);
    std::vector<T> pbuf(qb * kb2), kpack(d * s.Nk), vpack(nk2 * d);
    int64_t cached_bh = -1;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bh = task / nqb, b = bh / s.H, h = bh % s.H;
      const int64_t i0 = (task % nqb) * qb, rows = std::min(qb, s.Nq - i0);
      if (cached_bh != bh) {
        // K^T (d x Nk): element (i, j) = K[j][i]; V (Nk x d) as it is, zero row past Nk when odd.
        pack_vnni(k.row(b, h, 0), 1, k.sn, d, s.Nk, kpack.data(), s.Nk);
        pack_vnni(v.row(b, h, 0), v.sn, 1, s.Nk, d, vpack.data(), d);
        cached_bh = bh;
      }
      std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + rows, 0.f);
      for (int64_t j0 = 0; j0 < s.Nk; j0 += kb) {
        const int64_t cols = std::min(kb, s.Nk - j0), cols2 = cols + cols % 2;  // j0 is even: kb is
        gemm_vnni<T>(rows, cols, d, q.row(b, h, i0), q.sn, kpack.data() + 2 * j0, s.Nk, false, sbuf.data(), kb);
        for (int64_t i = 0; i < rows; ++i) {
          float* si = sbuf.data() + i * kb;
          online_softmax_row(si, cols, scale, j0 == 0, m[i], l[i], obuf.data() + i * d, d);
          T* pi = pbuf.data() + i * kb2;
          store_row<T>(si, pi, cols);
          if (cols2 > cols) pi[cols] = T(0);  // meets the zero row of vpack
        }
        gemm_vnni<T>(rows, d, cols2, pbuf.data(), kb2, vpack.data() + j0 * d, d, j0 > 0, obuf.data(), d);
      }
      float* lse_row = lse + bh * s.Nq + i0;
      for (int64_t i = 0; i < rows; ++i) {
        lse_row[i] = m[i] + std::log(l[i]);
        float* oi = obuf.data() + i * d;
        scale_row(oi, d, 1.f / l[i]);
        store_row<T>(oi, o.row(b, h, i0 + i), d);
      }
    }
    gemm_vnni_done();
  });
}

// The forward kernel that suits T on this CPU.
template <typename T>
void attention_fwd_any(const Operand<T>& q, const Operand<T>& k, const Operand<T>& v, const Operand<T>& o,
                       acc_t<T>* lse, const Dims& s, acc_t<T> scale) {
  if constexpr (!std::is_same_v<T, acc_t<T>>) {
    if (s.d % 2 == 0 && vnni_gemm_available<T>()) return attention_fwd_kernel_vnni<T>(q, k, v, o, lse, s, scale);
  }
  attention_fwd_kernel<T>(q, k, v, o, lse, s, scale);
}

template <typename T>
void attention_bwd_kernel(const Operand<T>& q, const Operand<T>& k, const Operand<T>& v, const Operand<T>& o,
                          const Operand<T>& dout, const acc_t<T>* lse, const Operand<T>& dq, const Operand<T>& dk,
                          const Operand<T>& dv, const Dims& s, acc_t<T> scale) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  const int64_t d = s.d, qb = std::min<int64_t>(128, std::max<int64_t>(s.Nq, 1));
  const int64_t kb = key_block(s);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t t0, int64_t t1) {
    FASTVIT_BELOW_AUTOGRAD;
    std::vector<A> qbuf(qb * d), dobuf(qb * d), obuf(qb * d), dqbuf(qb * d), kbuf(s.Nk * d), vbuf(s.Nk * d);
    std::vector<A> dkbuf(s.Nk * d), dvbuf(s.Nk * d), pbuf(qb * kb), dpbuf(qb * kb), delta(qb);
    for (int64_t bh = t0; bh < t1; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const Tile<A> K = rows_as_acc(k, b, h, 0, s.Nk, d, kbuf.data());
      const Tile<A> V = rows_as_acc(v, b, h, 0, s.Nk, d, vbuf.data());
      A* dK = dkbuf.data();  // Nk x d, contiguous
      A* dV = dvbuf.data();
      for (int64_t i0 = 0; i0 < s.Nq; i0 += qb) {
        const int64_t rows = std::min(qb, s.Nq - i0);
        const Tile<A> Q = rows_as_acc(q, b, h, i0, rows, d, qbuf.data());
        const Tile<A> dO = rows_as_acc(dout, b, h, i0, rows, d, dobuf.data());
        const Tile<A> O = rows_as_acc(o, b, h, i0, rows, d, obuf.data());
        // delta_i = rowsum(dO_i * O_i)
        for (int64_t i = 0; i < rows; ++i) {
          delta[i] = at::vec::map2_reduce_all<A>([](Vec x, Vec y) { return x * y; },
                                                 [](Vec x, Vec y) { return x + y; }, dO.row(i), O.row(i), d);
        }
        A* dQ = dqbuf.data();  // rows x d, contiguous
        const A* lse_row = lse + bh * s.Nq + i0;
        for (int64_t j0 = 0; j0 < s.Nk; j0 += kb) {
          const int64_t cols = std::min(kb, s.Nk - j0);
          A* P = pbuf.data();  // rows x cols, row stride kb
          A* dP = dpbuf.data();
          gemm_rm<A>(false, true, rows, cols, d, A(1), Q.ptr, Q.ld, K.row(j0), K.ld, A(0), P, kb);
          gemm_rm<A>(false, true, rows, cols, d, A(1), dO.ptr, dO.ld, V.row(j0), V.ld, A(0), dP, kb);
          for (int64_t i = 0; i < rows; ++i) {
            A* pi = P + i * kb;
            A* dpi = dP + i * kb;
            exp_and_sum(pi, cols, scale, lse_row[i]);
            // dS = P * (dP - delta) * scale, into dP
            const Vec vdelta(delta[i]), vscale(scale);
            int64_t j = 0;
            for (; j + Vec::size() <= cols; j += Vec::size()) {
              (Vec::loadu(pi + j) * (Vec::loadu(dpi + j) - vdelta) * vscale).store(dpi + j);
            }
            for (; j < cols; ++j) dpi[j] = pi[j] * (dpi[j] - delta[i]) * scale;
          }
          // The first product into each accumulator overwrites it (beta 0): no zero fill.
          const A first_q = i0 == 0 ? A(0) : A(1);
          gemm_rm<A>(true, false, cols, d, rows, A(1), P, kb, dO.ptr, dO.ld, first_q, dV + j0 * d, d);
          gemm_rm<A>(true, false, cols, d, rows, A(1), dP, kb, Q.ptr, Q.ld, first_q, dK + j0 * d, d);
          gemm_rm<A>(false, false, rows, d, cols, A(1), dP, kb, K.row(j0), K.ld, j0 == 0 ? A(0) : A(1), dQ, d);
        }
        for (int64_t i = 0; i < rows; ++i) store_row<T>(dqbuf.data() + i * d, dq.row(b, h, i0 + i), d);
      }
      for (int64_t j = 0; j < s.Nk; ++j) {
        store_row<T>(dkbuf.data() + j * d, dk.row(b, h, j), d);
        store_row<T>(dvbuf.data() + j * d, dv.row(b, h, j), d);
      }
    }
  });
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const char* op = "fastvit::attention";
  FASTVIT_CHECK_CPU(q);
  FASTVIT_CHECK_FLOATING(q);
  FASTVIT_CHECK_DIM(q, 4);
  FASTVIT_CHECK_INPUT(k, q);
  FASTVIT_CHECK_INPUT(v, q);
  FASTVIT_CHECK_DIM(k, 4);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              op, ": q must be (B, H, Nq, d) with B, H, d of k ", k.sizes(), ", got ", q.sizes());
  TORCH_CHECK(scale > 0, op, ": scale must be positive, got ", scale);
}

// (B, N, 3*D) -> the q, k, v (B, H, N, d) views
std::array<at::Tensor, 3> split_packed(const at::Tensor& qkv, int64_t H) {
  const int64_t B = qkv.size(0), N = qkv.size(1), d = qkv.size(2) / (3 * H);
  const at::Tensor view = qkv.view({B, N, 3, H, d}).permute({2, 0, 3, 1, 4});
  return {view[0], view[1], view[2]};
}

// The one forward path of both entry points: fills ``out`` (a (B, H, Nq, d) view) and
// returns the log-sum-exp in the accumulation dtype, handling the empty cases.
at::Tensor run_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& out, const Dims& s, double scale) {
  at::Tensor lse;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_fwd", [&] {
    using A = acc_t<scalar_t>;
    lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(acc_dtype<scalar_t>()));
    if (s.Nk == 0) {  // softmax over no keys: SDPA gives zeros
      out.zero_();
      lse.fill_(-std::numeric_limits<A>::infinity());
      return;
    }
    if (s.d == 0) {  // every score is an empty dot product, 0: uniform softmax over Nk keys
      lse.fill_(std::log(static_cast<A>(s.Nk)));
      return;
    }
    if (out.numel() == 0) return;
    attention_fwd_any<scalar_t>(operand<scalar_t>(q), operand<scalar_t>(k), operand<scalar_t>(v),
                                operand<scalar_t>(out), lse.data_ptr<A>(), s, static_cast<A>(scale));
  });
  return lse;
}

// The one backward path of both entry points: writes dq, dk, dv (views in the inputs' layout).
void run_attention_bwd(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& o, const at::Tensor& go, const at::Tensor& lse,
                       const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const Dims& s,
                       double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_bwd", [&] {
    using A = acc_t<scalar_t>;
    TORCH_CHECK(lse.scalar_type() == acc_dtype<scalar_t>(), op, ": lse must be ",
                acc_dtype<scalar_t>(), ", got ", lse.scalar_type());
    attention_bwd_kernel<scalar_t>(operand<scalar_t>(q), operand<scalar_t>(k), operand<scalar_t>(v),
                                   operand<scalar_t>(o), operand<scalar_t>(go), lse.data_ptr<A>(),
                                   operand<scalar_t>(dq), operand<scalar_t>(dk), operand<scalar_t>(dv), s,
                                   static_cast<A>(scale));
  });
}

}  // namespace

void check_packed_qkv(const char* op, const at::Tensor& qkv, int64_t dims, int64_t num_heads, double scale) {
  FASTVIT_CHECK_CPU(qkv);
  FASTVIT_CHECK_FLOATING(qkv);
  FASTVIT_CHECK_DIM(qkv, dims);
  TORCH_CHECK(num_heads > 0 && qkv.size(-1) % (3 * num_heads) == 0, op, ": qkv's last dimension ",
              qkv.size(-1), " must be 3 * num_heads * head_dim with num_heads=", num_heads);
  TORCH_CHECK(scale > 0, op, ": scale must be positive, got ", scale);
}

// One attention on (B, H, N, d) views with a unit stride on d, for varlen_attention.cpp
// (attention.h): the forward and backward paths of the entry points below.
at::Tensor attention_fwd_views(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, double scale) {
  return run_attention_fwd(q, k, v, out, Dims{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)}, scale);
}

void attention_bwd_views(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& o, const at::Tensor& go, const at::Tensor& lse, const at::Tensor& dq,
                         const at::Tensor& dk, const at::Tensor& dv, double scale) {
  run_attention_bwd(op, q, k, v, o, go, lse, dq, dk, dv,
                    Dims{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)}, scale);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, double scale) {
  FASTVIT_BELOW_AUTOGRAD;
  check_qkv(q_in, k_in, v_in, scale);
  const at::Tensor q = tile_ready(q_in, 2), k = tile_ready(k_in, 2), v = tile_ready(v_in, 2);
  const Dims s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  at::Tensor out = at::empty({s.B, s.H, s.Nq, s.d}, q.options());
  at::Tensor lse = run_attention_fwd(q, k, v, out, s, scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& grad_out, const at::Tensor& q_in,
                                                             const at::Tensor& k_in, const at::Tensor& v_in,
                                                             const at::Tensor& out_in, const at::Tensor& lse_in,
                                                             double scale) {
  FASTVIT_BELOW_AUTOGRAD;
  check_qkv(q_in, k_in, v_in, scale);
  const char* op = "fastvit::attention_bwd";
  FASTVIT_CHECK_INPUT(grad_out, q_in);
  FASTVIT_CHECK_INPUT(out_in, q_in);
  TORCH_CHECK(grad_out.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              op, ": grad_out and out must have q's shape ", q_in.sizes(), ", got ",
              grad_out.sizes(), " and ", out_in.sizes());
  const at::Tensor q = tile_ready(q_in, 2), k = tile_ready(k_in, 2), v = tile_ready(v_in, 2);
  const at::Tensor go = tile_ready(grad_out, 2), o = tile_ready(out_in, 2), lse = lse_in.contiguous();
  const Dims s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(lse.numel() == s.B * s.H * s.Nq, op, ": lse must have shape (B, H, Nq) = (", s.B,
              ", ", s.H, ", ", s.Nq, "), got ", lse.sizes());
  at::Tensor dq = at::zeros({s.B, s.H, s.Nq, s.d}, q.options());
  at::Tensor dk = at::zeros({s.B, s.H, s.Nk, s.d}, q.options());
  at::Tensor dv = at::zeros({s.B, s.H, s.Nk, s.d}, q.options());
  if (s.B * s.H == 0 || s.Nq == 0 || s.Nk == 0 || s.d == 0) return {dq, dk, dv};
  run_attention_bwd(op, q, k, v, o, go, lse, dq, dk, dv, s, scale);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor& qkv_in, int64_t num_heads, double scale) {
  FASTVIT_BELOW_AUTOGRAD;
  check_packed_qkv("fastvit::packed_attention", qkv_in, 3, num_heads, scale);
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, d = D / num_heads;
  auto [q, k, v] = split_packed(qkv, num_heads);
  at::Tensor out = at::empty({B, N, D}, qkv.options());
  // (B, N, H, d) -> (B, H, N, d) view of the output: rows of the result land in place.
  at::Tensor out_view = out.view({B, N, num_heads, d}).transpose(1, 2);
  const Dims s{B, num_heads, N, N, d};
  at::Tensor lse = run_attention_fwd(q, k, v, out_view, s, scale);
  return {out, lse};
}

at::Tensor packed_attention_bwd(const at::Tensor& grad_out, const at::Tensor& qkv_in, const at::Tensor& out,
                                const at::Tensor& lse_in, int64_t num_heads, double scale) {
  FASTVIT_BELOW_AUTOGRAD;
  check_packed_qkv("fastvit::packed_attention", qkv_in, 3, num_heads, scale);
  const char* op = "fastvit::packed_attention_bwd";
  FASTVIT_CHECK_INPUT(grad_out, qkv_in);
  FASTVIT_CHECK_INPUT(out, qkv_in);
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, d = D / num_heads;
  FASTVIT_CHECK_SHAPE(grad_out, B, N, D);
  FASTVIT_CHECK_SHAPE(out, B, N, D);
  const at::Tensor lse = lse_in.contiguous();
  TORCH_CHECK(lse.numel() == B * num_heads * N, op, ": lse must have shape (B, H, N) = (",
              B, ", ", num_heads, ", ", N, "), got ", lse.sizes());
  auto [q, k, v] = split_packed(qkv, num_heads);
  const at::Tensor go = grad_out.contiguous().view({B, N, num_heads, d}).transpose(1, 2);
  const at::Tensor o = out.contiguous().view({B, N, num_heads, d}).transpose(1, 2);
  at::Tensor dqkv = at::zeros_like(qkv);
  if (dqkv.numel() == 0) return dqkv;
  auto [dq, dk, dv] = split_packed(dqkv, num_heads);
  const Dims s{B, num_heads, N, N, d};
  run_attention_bwd(op, q, k, v, o, go, lse, dq, dk, dv, s, scale);
  return dqkv;
}

}  // namespace fastvit
