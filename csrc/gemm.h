// The GEMMs of the Linear layers, forward and backward: Y = act(X W^T + b), dX = dY W,
// dW = dY^T X. Every op with a Linear in it (linear, linear_gelu, patch_embed) calls these,
// so the choice of GEMM library is made here, once.
//
// Where torch has oneDNN and oneDNN runs the dtype on this CPU, they go through oneDNN's
// inner product (the dispatcher op mkldnn::_linear_pointwise, what inductor's mkldnn fusion
// emits); otherwise through ATen's addmm / mm (MKL's sgemm for fp32 in the x86 wheels).
// Why: on AMD CPUs MKL's sgemm takes a slower code path, while oneDNN picks its instruction
// set from the CPU itself (gemm.cpp has the figures: fp32 forward 1.02-1.3x F.linear on the
// AMD EPYC measured; bf16 about even).
//
// Detection, per dtype, once (gemm.cpp): torch built with MKLDNN, the op registered, oneDNN's
// own CPU check for bf16 / fp16 (mkldnn::_is_mkldnn_bf16_supported / _fp16_supported, as
// ATen's matmul asks), and a tiny probe call that must succeed. fp64, fp16 on CPUs without
// AVX512-FP16 / AVX-NE-CONVERT, empty products (K = 0) and torch builds without oneDNN take
// the ATen path. FASTVIT_CPP_GEMM=aten forces the ATen path (for comparisons).
//
// Results differ from ATen's by rounding only (another summation order): ~1e-6 relative in fp32.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastvit::gemm {

enum class Activation { kNone, kGelu, kGeluTanh };

// Whether linear() and matmul() run on oneDNN for this dtype here (detected once per dtype).
bool onednn_gemm(at::ScalarType dtype);

// act(x2d (M, K) @ weight (N, K)^T + bias (N,)): a new contiguous (M, N) tensor. Any strides.
at::Tensor linear(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  Activation act = Activation::kNone);

// linear() for inference ops (nothing saved for backward): a weight on oneDNN (fp32, bf16,
// fp16) is reordered once into oneDNN's blocked layout and the packed copy reused while it is
// unchanged (same tensor, storage, data pointer, version counter, sizes and strides; inference
// tensors, which keep no version counter, are never packed). Otherwise exactly linear().
at::Tensor linear_inference(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            Activation act = Activation::kNone);

// out2d (M, N) += x2d (M, K) @ weight (N, K)^T, in place (out2d may be a view).
void linear_accumulate_(const at::Tensor& out2d, const at::Tensor& x2d, const at::Tensor& weight);

// a (M, K) @ b (K, N), e.g. dX = dY W and dW = dY^T X (transposed views, no copies needed).
at::Tensor matmul(const at::Tensor& a, const at::Tensor& b);

}  // namespace fastvit::gemm
