// attention.cpp's flash-attention paths on (B, H, N, d) views, shared with the
// variable-length op (varlen_attention.cpp), which runs them on each sequence's rows.
#pragma once

#include <ATen/ATen.h>

namespace fastvit {

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
