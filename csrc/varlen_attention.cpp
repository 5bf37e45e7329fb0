// Variable-length attention: the tokens of several sequences packed back to back in one
// (total, H, d) tensor, sequence i being rows cu_seqlens[i]:cu_seqlens[i+1] (the
// flash-attention varlen convention); each sequence attends only to itself, non-causal.
//
// Each sequence's rows are a (1, H, n, d) strided view of the packed tensors, and
// attention.cpp's flash-attention paths (attention.h) run on those views in place: no
// copies, no padding, and no score between two sequences is ever computed. The
// log-sum-exp is kept as (H, total), the layout of the Triton backend's.
#include <vector>

#include "attention.h"
#include "checks.h"
#include "common.h"
#include "ops.h"

namespace fastvit {
namespace {

// The sequence boundaries cu_seqlens holds, checked: int32, 0 first, non-decreasing,
// `total` last, no sequence longer than max_seqlen.
std::vector<int64_t> sequence_bounds(const char* op, const at::Tensor& cu_seqlens, int64_t total,
                                     int64_t max_seqlen) {
  TORCH_CHECK(cu_seqlens.device().is_cpu(), op, ": cu_seqlens must be a CPU tensor, got a tensor on ",
              cu_seqlens.device());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2, op,
              ": cu_seqlens must have shape (n_seq + 1,) with n_seq >= 1, got ", cu_seqlens.sizes());
  const at::Tensor c = cu_seqlens.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  std::vector<int64_t> bounds(p, p + c.numel());
  TORCH_CHECK(bounds.front() == 0, op, ": cu_seqlens must start at 0, got ", bounds.front());
  TORCH_CHECK(bounds.back() == total, op, ": cu_seqlens must end at the token count ", total, ", got ",
              bounds.back());
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    TORCH_CHECK(bounds[i + 1] >= bounds[i], op, ": cu_seqlens must be non-decreasing, got ", bounds[i],
                " then ", bounds[i + 1], " at index ", i);
    TORCH_CHECK(bounds[i + 1] - bounds[i] <= max_seqlen, op, ": max_seqlen must be at least every sequence's "
                "length, got ", max_seqlen, " and a sequence of ", bounds[i + 1] - bounds[i]);
  }
  return bounds;
}

void check_tokens(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const char* op = "fastvit::varlen_attention";
  FASTVIT_CHECK_CPU(q);
  FASTVIT_CHECK_FLOATING(q);
  FASTVIT_CHECK_DIM(q, 3);
  FASTVIT_CHECK_INPUT(k, q);
  FASTVIT_CHECK_INPUT(v, q);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": q, k and v must have one shape "
              "(total, H, d), got ", q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(scale > 0, op, ": scale must be positive, got ", scale);
}

// Rows [a, b) of a (total, H, d) tensor as the (1, H, b - a, d) view attention.h takes.
at::Tensor rows(const at::Tensor& t, int64_t a, int64_t b) { return t.slice(0, a, b).transpose(0, 1).unsqueeze(0); }

// (total, 3*D) laid out (total, 3, H, d) -> q, k, v as (total, H, d) views.
std::array<at::Tensor, 3> split_packed(const at::Tensor& qkv, int64_t H) {
  const at::Tensor view = qkv.view({qkv.size(0), 3, H, qkv.size(1) / (3 * H)});
  return {view.select(1, 0), view.select(1, 1), view.select(1, 2)};
}

// The forward of both entry points: fills `out` ((total, H, d) view) sequence by sequence
// and returns the log-sum-exp (H, total).
at::Tensor run_varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                          const std::vector<int64_t>& bounds, double scale) {
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(acc));
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    const int64_t a = bounds[i], b = bounds[i + 1];
    if (a == b) continue;
    const at::Tensor seq_lse = attention_fwd_views(rows(q, a, b), rows(k, a, b), rows(v, a, b), rows(out, a, b), scale);
    lse.slice(1, a, b).copy_(seq_lse[0]);
  }
  return lse;
}

// The backward of both entry points: writes every row of dq, dk, dv ((total, H, d) views).
void run_varlen_bwd(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& o, const at::Tensor& go, const at::Tensor& lse, const at::Tensor& dq,
                    const at::Tensor& dk, const at::Tensor& dv, const std::vector<int64_t>& bounds, double scale) {
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({q.size(1), q.size(0)}), op, ": lse must have shape (H, total) = (",
              q.size(1), ", ", q.size(0), "), got ", lse.sizes());
  if (q.numel() == 0) return;
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    const int64_t a = bounds[i], b = bounds[i + 1];
    if (a == b) continue;
    attention_bwd_views(op, rows(q, a, b), rows(k, a, b), rows(v, a, b), rows(o, a, b), rows(go, a, b),
                        lse.slice(1, a, b).unsqueeze(0).contiguous(), rows(dq, a, b), rows(dk, a, b),
                        rows(dv, a, b), scale);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& cu_seqlens,
                                                        int64_t max_seqlen, double scale) {
  FASTVIT_BELOW_AUTOGRAD;
  check_tokens(q_in, k_in, v_in, scale);
  const auto bounds = sequence_bounds("fastvit::varlen_attention", cu_seqlens, q_in.size(0), max_seqlen);
  const at::Tensor q = tile_ready(q_in, 0), k = tile_ready(k_in, 0), v = tile_ready(v_in, 0);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = run_varlen_fwd(q, k, v, out, bounds, scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double scale) {
  FASTVIT_BELOW_AUTOGRAD;
  check_tokens(q_in, k_in, v_in, scale);
  const char* op = "fastvit::varlen_attention_bwd";
  FASTVIT_CHECK_INPUT(grad_out, q_in);
  FASTVIT_CHECK_INPUT(out_in, q_in);
  TORCH_CHECK(grad_out.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), op,
              ": grad_out and out must have q's shape ", q_in.sizes(), ", got ", grad_out.sizes(), " and ",
              out_in.sizes());
  const auto bounds = sequence_bounds(op, cu_seqlens, q_in.size(0), max_seqlen);
  const at::Tensor q = tile_ready(q_in, 0), k = tile_ready(k_in, 0), v = tile_ready(v_in, 0);
  const at::Tensor go = tile_ready(grad_out, 0), o = tile_ready(out_in, 0);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options()),
             dv = at::empty(q.sizes(), q.options());
  run_varlen_bwd(op, q, k, v, o, go, lse, dq, dk, dv, bounds, scale);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> varlen_packed_attention_fwd(const at::Tensor& qkv_in,
                                                               const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                                               int64_t num_heads, double scale) {
  FASTVIT_BELOW_AUTOGRAD;
  check_packed_qkv("fastvit::varlen_packed_attention", qkv_in, 2, num_heads, scale);
  const auto bounds = sequence_bounds("fastvit::varlen_packed_attention", cu_seqlens, qkv_in.size(0), max_seqlen);
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t total = qkv.size(0), D = qkv.size(1) / 3;
  auto [q, k, v] = split_packed(qkv, num_heads);
  at::Tensor out = at::empty({total, D}, qkv.options());
  at::Tensor lse = run_varlen_fwd(q, k, v, out.view({total, num_heads, D / num_heads}), bounds, scale);
  return {out, lse};
}

at::Tensor varlen_packed_attention_bwd(const at::Tensor& grad_out, const at::Tensor& qkv_in, const at::Tensor& out,
                                       const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                       int64_t num_heads, double scale) {
  FASTVIT_BELOW_AUTOGRAD;
  check_packed_qkv("fastvit::varlen_packed_attention", qkv_in, 2, num_heads, scale);
  const char* op = "fastvit::varlen_packed_attention_bwd";
  FASTVIT_CHECK_INPUT(grad_out, qkv_in);
  FASTVIT_CHECK_INPUT(out, qkv_in);
  const int64_t total = qkv_in.size(0), D = qkv_in.size(1) / 3, d = D / num_heads;
  FASTVIT_CHECK_SHAPE(grad_out, total, D);
  FASTVIT_CHECK_SHAPE(out, total, D);
  const auto bounds = sequence_bounds(op, cu_seqlens, total, max_seqlen);
  const at::Tensor qkv = qkv_in.contiguous();
  auto [q, k, v] = split_packed(qkv, num_heads);
  at::Tensor dqkv = at::empty_like(qkv);
  auto [dq, dk, dv] = split_packed(dqkv, num_heads);
  run_varlen_bwd(op, q, k, v, out.contiguous().view({total, num_heads, d}),
                 grad_out.contiguous().view({total, num_heads, d}), lse, dq, dk, dv, bounds, scale);
  return dqkv;
}

}  // namespace fastvit
