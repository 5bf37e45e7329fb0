// The C++ entry points behind the fastvit:: operator schemas (see ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastvit {

// LayerNorm: (out, mean, rstd); mean/rstd are fp32 (fp64 for fp64 input), shape x.shape[:-1].
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);
// (out, x + residual, mean, rstd)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps);
// (dinput, dweight, dbias); grad_sum, if given, is added to dinput (add_layer_norm's
// second output). dweight/dbias are always computed, in the input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight);

// GELU(x @ weight.T + bias)
at::Tensor linear_gelu(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, c10::string_view approximate);
// (out, pre-activation) for training
std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   c10::string_view approximate);
// (dx, dweight, dbias)
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(
    const at::Tensor& grad_out, const at::Tensor& preact, const at::Tensor& x,
    const at::Tensor& weight, c10::string_view approximate);

// (B, T, D) tokens
at::Tensor patch_embed(const at::Tensor& images, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& pos_embed,
                       const std::optional<at::Tensor>& cls_token);
// (dimages, dweight, dbias (D,), dpos (T, D), dcls (D,)); dimages is empty (0,) unless
// images_grad (images rarely need a gradient, and it costs a GEMM).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, bool has_cls,
    bool images_grad);

// (out (B, H, Nq, d), lse (B, H, Nq) fp32)
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, double scale);
// (dq, dk, dv)
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale);
// (out (B, N, D), lse (B, H, N) fp32) from qkv (B, N, 3*D) laid out (B, N, 3, H, d)
std::tuple<at::Tensor, at::Tensor> packed_attention_fwd(const at::Tensor& qkv, int64_t num_heads,
                                                        double scale);
// dqkv (B, N, 3*D)
at::Tensor packed_attention_bwd(const at::Tensor& grad_out, const at::Tensor& qkv,
                                const at::Tensor& out, const at::Tensor& lse, int64_t num_heads,
                                double scale);

// Variable-length attention (varlen_attention.cpp): q, k, v (total, H, d) hold packed
// sequences, sequence i is rows cu_seqlens[i]:cu_seqlens[i+1] (cu_seqlens int32 (n_seq + 1,)).
// (out (total, H, d), lse (H, total) fp32)
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                        int64_t max_seqlen, double scale);
// (dq, dk, dv)
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale);
// (out (total, D), lse (H, total) fp32) from qkv (total, 3*D) laid out (total, 3, H, d)
std::tuple<at::Tensor, at::Tensor> varlen_packed_attention_fwd(const at::Tensor& qkv, const at::Tensor& cu_seqlens,
                                                               int64_t max_seqlen, int64_t num_heads, double scale);
// dqkv (total, 3*D)
at::Tensor varlen_packed_attention_bwd(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                       const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                       int64_t num_heads, double scale);

// The instruction set the kernels were compiled for: "DEFAULT", "AVX2" or "AVX512".
std::string cpu_capability();

}  // namespace fastvit
