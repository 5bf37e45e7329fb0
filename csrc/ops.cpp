// Operator schemas (TORCH_LIBRARY) and their CPU kernels (TORCH_LIBRARY_IMPL).
// The autograd formulas are in autograd.cpp (the Autograd key). The fake (meta)
// kernels are registered from Python, in fastvit_kernels/_cpp.py, which
// set_python_module names so that torch finds them even when this library is loaded
// on its own.
#include <torch/library.h>

#include "ops.h"

namespace fastvit {

std::string cpu_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace fastvit

TORCH_LIBRARY(fastvit, m) {
  m.set_python_module("fastvit_kernels._cpp");
  // No tensor arguments to dispatch on: a catch-all kernel, registered with the schema.
  m.def("cpu_capability() -> str", &fastvit::cpu_capability);
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor grad_out, Tensor? grad_sum, Tensor input, Tensor mean, Tensor rstd,"
        " Tensor? weight) -> (Tensor, Tensor, Tensor)");
  m.def("linear_gelu(Tensor x, Tensor weight, Tensor? bias, str approximate) -> Tensor");
  m.def("linear_gelu_fwd(Tensor x, Tensor weight, Tensor? bias, str approximate) -> (Tensor, Tensor)");
  m.def("linear_gelu_bwd(Tensor grad_out, Tensor preact, Tensor x, Tensor weight, str approximate)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("patch_embed(Tensor images, Tensor weight, Tensor? bias, Tensor pos_embed, Tensor? cls_token) -> Tensor");
  m.def("patch_embed_bwd(Tensor grad_out, Tensor images, Tensor weight, bool has_cls,"
        " bool images_grad)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("packed_attention_fwd(Tensor qkv, int num_heads, float scale) -> (Tensor, Tensor)");
  m.def("packed_attention_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvit, CPU, m) {
  m.impl("layer_norm_fwd", &fastvit::layer_norm_fwd);
  m.impl("add_layer_norm_fwd", &fastvit::add_layer_norm_fwd);
  m.impl("layer_norm_bwd", &fastvit::layer_norm_bwd);
  m.impl("linear_gelu", &fastvit::linear_gelu);
  m.impl("linear_gelu_fwd", &fastvit::linear_gelu_fwd);
  m.impl("linear_gelu_bwd", &fastvit::linear_gelu_bwd);
  m.impl("patch_embed", &fastvit::patch_embed);
  m.impl("patch_embed_bwd", &fastvit::patch_embed_bwd);
  m.impl("attention_fwd", &fastvit::attention_fwd);
  m.impl("attention_bwd", &fastvit::attention_bwd);
  m.impl("packed_attention_fwd", &fastvit::packed_attention_fwd);
  m.impl("packed_attention_bwd", &fastvit::packed_attention_bwd);
}

// Variable-length attention (varlen_attention.cpp), a fragment of its own.
TORCH_LIBRARY_FRAGMENT(fastvit, m) {
  m.def("varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale)"
        " -> (Tensor, Tensor)");
  m.def("varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor cu_seqlens, int max_seqlen, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("varlen_packed_attention_fwd(Tensor qkv, Tensor cu_seqlens, int max_seqlen, int num_heads, float scale)"
        " -> (Tensor, Tensor)");
  m.def("varlen_packed_attention_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor cu_seqlens,"
        " int max_seqlen, int num_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvit, CPU, m) {
  m.impl("varlen_attention_fwd", &fastvit::varlen_attention_fwd);
  m.impl("varlen_attention_bwd", &fastvit::varlen_attention_bwd);
  m.impl("varlen_packed_attention_fwd", &fastvit::varlen_packed_attention_fwd);
  m.impl("varlen_packed_attention_bwd", &fastvit::varlen_packed_attention_bwd);
}
