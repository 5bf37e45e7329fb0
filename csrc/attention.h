// attention.cpp's flash-attention paths on (B, H, N, d) views, shared with the
// variable-length op (varlen_attention.cpp), which runs them on each sequence's rows.
#pragma once

#include <ATen/ATen.h>

namespace fastvit {

// t, or a contiguous copy when the tile kernels cannot read it in place: they need a unit
// stride on d and token rows (dimension row_dim) that do not overlap (a row stride of at least
// d, e.g. not an expand()ed tensor's 0). Any batch and head strides are fine.
inline at::Tensor tile_ready(const at::Tensor& t, int64_t row_dim) {
  const bool rows_ok = t.size(row_dim) <= 1 || t.stride(row_dim) >= t.size(-1);
  return t.stride(-1) == 1 && rows_ok ? t : t.contiguous();
}

// The checks of a packed qkv tensor ((B, N, 3*D) for packed_attention, dims 3; (total, 3*D) for
// the varlen form, dims 2) and of the scale; errors name `op`.
void check_packed_qkv(const char* op, const at::Tensor& qkv, int64_t dims, int64_t num_heads, double scale);

// Fills `out` (a (B, H, Nq, d) view, unit stride on d) with attention(q, k, v) and returns
// the log-sum-exp (B, H, Nq) in the accumulation dtype (fp32; fp64 for fp64).
at::Tensor attention_fwd_views(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& out, double scale);

// Writes the gradients into dq, dk, dv ((B, H, N, d) views, unit stride on d; every entry is
// written); lse contiguous (B, H, Nq). Nq, Nk and d must be positive.
void attention_bwd_views(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& o, const at::Tensor& go, const at::Tensor& lse, const at::Tensor& dq,
                         const at::Tensor& dk, const at::Tensor& dv, double scale);

}  // namespace fastvit
