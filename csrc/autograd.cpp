// Autograd for the fastvit:: operators: one torch::autograd::Function per differentiable
// operator, registered to the Autograd dispatch key.
//
// Why C++: registered from Python (torch.library.register_autograd), the same formulas
// put a Python autograd.Function around every call: tens of microseconds, more than a
// small op's whole run and a good share of a ViT-sized one. Here the forward drops below
// autograd and calls the operator again through the dispatcher, so fake tensors and
// tracing (torch.compile, opcheck) still see the operator itself; backward calls the
// *_bwd operators the same way.
//
// Conventions shared by every Function below:
// * statistics, log-sum-exp and the GELU pre-activation are outputs only for backward's
//   sake: marked non-differentiable;
// * multi-output Functions do not materialize gradients: an output that got no gradient
//   arrives undefined, and a zero tensor is made only where a kernel needs a real one;
// * a gradient is returned only for an input that autograd asks for (absent optional
//   tensors and non-tensor arguments get an undefined tensor).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "ops.h"

namespace fastvit {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The dispatcher's handle of operator `name`, typed with the signature of its CPU kernel
// (ops.h); looked up once.
template <auto* Kernel>
const auto& op(const char* name) {
  using Signature = std::remove_pointer_t<decltype(Kernel)>;
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  return handle;
}

// Whether autograd counts an optional argument as a tensor input (it skips absent ones).
bool present(const OptionalTensor& t) { return t.has_value() && t->defined(); }

OptionalTensor as_optional(const Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

Tensor or_zeros(const Tensor& grad, const Tensor& like) { return grad.defined() ? grad : at::zeros_like(like); }

// Backward's result, one entry per forward argument. Autograd numbers "needs input grad"
// over the tensor inputs that were present only, so the entries are added in argument
// order and this keeps the two numberings apart.
class Grads {
 public:
  explicit Grads(AutogradContext* ctx) : ctx_(ctx) {}

  // The gradient of a tensor argument, kept only if autograd wants it.
  Grads& tensor(Tensor grad) {
    out_.push_back(ctx_->needs_input_grad(edge_++) ? std::move(grad) : Tensor());
    return *this;
  }
  Grads& optional(bool was_present, Tensor grad) { return was_present ? tensor(std::move(grad)) : none(); }
  // A non-tensor argument.
  Grads& none() {
    out_.emplace_back();
    return *this;
  }
  variable_list done() { return std::move(out_); }

 private:
  AutogradContext* ctx_;
  size_t edge_ = 0;
  variable_list out_;
};

// LayerNorm ---------------------------------------------------------------------------
// Both norms save (LayerNorm's input, weight, mean, rstd) and share one backward; for
// add_layer_norm the input is the sum x + residual, whose gradient reaches both.
void save_norm(AutogradContext* ctx, const Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
               const Tensor& mean, const Tensor& rstd) {
  ctx->save_for_backward({input, weight.value_or(Tensor()), mean, rstd});
  ctx->saved_data["has_bias"] = present(bias);
  ctx->mark_non_differentiable({mean, rstd});
  ctx->set_materialize_grads(false);
}

// `summands` is how many forward arguments were added up into LayerNorm's input (1 or 2);
// grad_sum is the gradient of add_layer_norm's sum output, if any.
variable_list norm_backward(AutogradContext* ctx, const Tensor& grad_out, const OptionalTensor& grad_sum,
                            int summands) {
  const variable_list saved = ctx->get_saved_variables();
  const Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
  auto [dx, dweight, dbias] = op<&layer_norm_bwd>("fastvit::layer_norm_bwd")
                                  .call(or_zeros(grad_out, input), grad_sum, input, mean, rstd, as_optional(weight));
  Grads grads(ctx);
  for (int i = 0; i < summands; ++i) grads.tensor(dx);
  return grads.optional(weight.defined(), dweight)
      .optional(ctx->saved_data["has_bias"].toBool(), dbias)
      .none()
      .done();
}

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptionalTensor& weight,
                               const OptionalTensor& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = op<&layer_norm_fwd>("fastvit::layer_norm_fwd").call(x, weight, bias, eps);
    save_norm(ctx, x, weight, bias, mean, rstd);
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return norm_backward(ctx, grads[0], std::nullopt, 1);
  }
};

// Outputs (normed, x + residual, mean, rstd).
struct AddLayerNormFunction : torch::autograd::Function<AddLayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual,
                               const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, summed, mean, rstd] =
        op<&add_layer_norm_fwd>("fastvit::add_layer_norm_fwd").call(x, residual, weight, bias, eps);
    save_norm(ctx, summed, weight, bias, mean, rstd);
    return {out, summed, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return norm_backward(ctx, grads[0], as_optional(grads[1]), 2);
  }
};

// Linear + GELU -------------------------------------------------------------------------
// The training op: outputs (GELU(pre), pre), pre saved for backward.
struct LinearGeluFunction : torch::autograd::Function<LinearGeluFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const OptionalTensor& bias, c10::string_view approximate) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, pre] = op<&linear_gelu_fwd>("fastvit::linear_gelu_fwd").call(x, weight, bias, approximate);
    ctx->save_for_backward({x, weight, pre});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["approximate"] = std::string(approximate);
    ctx->mark_non_differentiable({pre});
    ctx->set_materialize_grads(false);
    return {out, pre};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &pre = saved[2];
    auto [dx, dweight, dbias] = op<&linear_gelu_bwd>("fastvit::linear_gelu_bwd")
                                    .call(or_zeros(grads[0], pre), pre, x, weight,
                                          ctx->saved_data["approximate"].toStringRef());
    return Grads(ctx)
        .tensor(dx)
        .tensor(dweight)
        .optional(ctx->saved_data["has_bias"].toBool(), dbias)
        .none()
        .done();
  }
};

// The inference op keeps no pre-activation; differentiated anyway, backward recomputes it.
struct LinearGeluInferenceFunction : torch::autograd::Function<LinearGeluInferenceFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const OptionalTensor& bias, c10::string_view approximate) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op<&linear_gelu>("fastvit::linear_gelu").call(x, weight, bias, approximate);
    ctx->save_for_backward({x, weight, bias.value_or(Tensor())});
    ctx->saved_data["approximate"] = std::string(approximate);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const Tensor pre = at::linear(x, weight, as_optional(bias));
    auto [dx, dweight, dbias] = op<&linear_gelu_bwd>("fastvit::linear_gelu_bwd")
                                    .call(grads[0], pre, x, weight, ctx->saved_data["approximate"].toStringRef());
    return Grads(ctx).tensor(dx).tensor(dweight).optional(bias.defined(), dbias).none().done();
  }
};

// Patch embedding -----------------------------------------------------------------------
// The kernel returns dpos as (T, D) and dcls as (D,): reshaped to the inputs' shapes
// (sizes kept symbolic, for torch.compile with dynamic shapes). The image gradient costs
// a GEMM, so it is computed only when the images need one.
struct PatchEmbedFunction : torch::autograd::Function<PatchEmbedFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& images, const Tensor& weight,
                               const OptionalTensor& bias, const Tensor& pos_embed,
                               const OptionalTensor& cls_token) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op<&patch_embed>("fastvit::patch_embed").call(images, weight, bias, pos_embed, cls_token);
    ctx->save_for_backward({images, weight});
    ctx->saved_data["has_bias"] = present(bias);
    ctx->saved_data["pos_shape"] = pos_embed.sym_sizes();
    ctx->saved_data["has_cls"] = present(cls_token);
    if (present(cls_token)) ctx->saved_data["cls_shape"] = cls_token->sym_sizes();
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &images = saved[0], &weight = saved[1];
    const bool has_cls = ctx->saved_data["has_cls"].toBool();
    const bool images_grad = ctx->needs_input_grad(0);
    auto [dimages, dweight, dbias, dpos, dcls] =
        op<&patch_embed_bwd>("fastvit::patch_embed_bwd").call(grads[0], images, weight, has_cls, images_grad);
    return Grads(ctx)
        .tensor(dimages)
        .tensor(dweight)
        .optional(ctx->saved_data["has_bias"].toBool(), dbias)
        .tensor(dpos.reshape_symint(ctx->saved_data["pos_shape"].toSymIntVector()))
        .optional(has_cls, has_cls ? dcls.reshape_symint(ctx->saved_data["cls_shape"].toSymIntVector()) : Tensor())
        .done();
  }
};

// Attention -----------------------------------------------------------------------------
struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op<&attention_fwd>("fastvit::attention_fwd").call(q, k, v, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    auto [dq, dk, dv] = op<&attention_bwd>("fastvit::attention_bwd")
                            .call(or_zeros(grads[0], out), q, k, v, out, lse, ctx->saved_data["scale"].toDouble());
    return Grads(ctx).tensor(dq).tensor(dk).tensor(dv).none().done();
  }
};

struct PackedAttentionFunction : torch::autograd::Function<PackedAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& qkv, int64_t num_heads, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op<&packed_attention_fwd>("fastvit::packed_attention_fwd").call(qkv, num_heads, scale);
    ctx->save_for_backward({qkv, out, lse});
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &qkv = saved[0], &out = saved[1], &lse = saved[2];
    Tensor dqkv = op<&packed_attention_bwd>("fastvit::packed_attention_bwd")
                      .call(or_zeros(grads[0], out), qkv, out, lse, ctx->saved_data["num_heads"].toInt(),
                            ctx->saved_data["scale"].toDouble());
    return Grads(ctx).tensor(dqkv).none().none().done();
  }
};

// The Autograd-key kernels: the operators' signatures around Function::apply.
std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_autograd(const Tensor& x, const OptionalTensor& weight,
                                                           const OptionalTensor& bias, double eps) {
  variable_list outs = LayerNormFunction::apply(x, weight, bias, eps);
  return {outs[0], outs[1], outs[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd_autograd(const Tensor& x, const Tensor& residual,
                                                                       const OptionalTensor& weight,
                                                                       const OptionalTensor& bias, double eps) {
  variable_list outs = AddLayerNormFunction::apply(x, residual, weight, bias, eps);
  return {outs[0], outs[1], outs[2], outs[3]};
}

std::tuple<Tensor, Tensor> linear_gelu_fwd_autograd(const Tensor& x, const Tensor& weight,
                                                    const OptionalTensor& bias, c10::string_view approximate) {
  variable_list outs = LinearGeluFunction::apply(x, weight, bias, approximate);
  return {outs[0], outs[1]};
}

Tensor linear_gelu_autograd(const Tensor& x, const Tensor& weight, const OptionalTensor& bias,
                            c10::string_view approximate) {
  return LinearGeluInferenceFunction::apply(x, weight, bias, approximate)[0];
}

Tensor patch_embed_autograd(const Tensor& images, const Tensor& weight, const OptionalTensor& bias,
                            const Tensor& pos_embed, const OptionalTensor& cls_token) {
  return PatchEmbedFunction::apply(images, weight, bias, pos_embed, cls_token)[0];
}

std::tuple<Tensor, Tensor> attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  double scale) {
  variable_list outs = AttentionFunction::apply(q, k, v, scale);
  return {outs[0], outs[1]};
}

std::tuple<Tensor, Tensor> packed_attention_fwd_autograd(const Tensor& qkv, int64_t num_heads, double scale) {
  variable_list outs = PackedAttentionFunction::apply(qkv, num_heads, scale);
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace fastvit

// The *_bwd operators have no formula of their own: double backward is not supported.
TORCH_LIBRARY_IMPL(fastvit, Autograd, m) {
  m.impl("layer_norm_fwd", &fastvit::layer_norm_fwd_autograd);
  m.impl("add_layer_norm_fwd", &fastvit::add_layer_norm_fwd_autograd);
  m.impl("linear_gelu_fwd", &fastvit::linear_gelu_fwd_autograd);
  m.impl("linear_gelu", &fastvit::linear_gelu_autograd);
  m.impl("patch_embed", &fastvit::patch_embed_autograd);
  m.impl("attention_fwd", &fastvit::attention_fwd_autograd);
  m.impl("packed_attention_fwd", &fastvit::packed_attention_fwd_autograd);
}

// Variable-length attention ---------------------------------------------------------
// As attention's Functions; cu_seqlens (int32) and max_seqlen get no gradient.
namespace fastvit {
namespace {

struct VarlenAttentionFunction : torch::autograd::Function<VarlenAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& cu_seqlens, int64_t max_seqlen, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op<&varlen_attention_fwd>("fastvit::varlen_attention_fwd")
                          .call(q, k, v, cu_seqlens, max_seqlen, scale);
    ctx->save_for_backward({q, k, v, out, lse, cu_seqlens});
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4], &cu = saved[5];
    auto [dq, dk, dv] = op<&varlen_attention_bwd>("fastvit::varlen_attention_bwd")
                            .call(or_zeros(grads[0], out), q, k, v, out, lse, cu,
                                  ctx->saved_data["max_seqlen"].toInt(), ctx->saved_data["scale"].toDouble());
    return Grads(ctx).tensor(dq).tensor(dk).tensor(dv).tensor(Tensor()).none().none().done();
  }
};

struct VarlenPackedAttentionFunction : torch::autograd::Function<VarlenPackedAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& qkv, const Tensor& cu_seqlens,
                               int64_t max_seqlen, int64_t num_heads, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = op<&varlen_packed_attention_fwd>("fastvit::varlen_packed_attention_fwd")
                          .call(qkv, cu_seqlens, max_seqlen, num_heads, scale);
    ctx->save_for_backward({qkv, out, lse, cu_seqlens});
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->saved_data["num_heads"] = num_heads;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &qkv = saved[0], &out = saved[1], &lse = saved[2], &cu = saved[3];
    Tensor dqkv = op<&varlen_packed_attention_bwd>("fastvit::varlen_packed_attention_bwd")
                      .call(or_zeros(grads[0], out), qkv, out, lse, cu, ctx->saved_data["max_seqlen"].toInt(),
                            ctx->saved_data["num_heads"].toInt(), ctx->saved_data["scale"].toDouble());
    return Grads(ctx).tensor(dqkv).tensor(Tensor()).none().none().none().done();
  }
};

std::tuple<Tensor, Tensor> varlen_attention_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const Tensor& cu_seqlens, int64_t max_seqlen,
                                                         double scale) {
  variable_list outs = VarlenAttentionFunction::apply(q, k, v, cu_seqlens, max_seqlen, scale);
  return {outs[0], outs[1]};
}

std::tuple<Tensor, Tensor> varlen_packed_attention_fwd_autograd(const Tensor& qkv, const Tensor& cu_seqlens,
                                                                int64_t max_seqlen, int64_t num_heads,
                                                                double scale) {
  variable_list outs = VarlenPackedAttentionFunction::apply(qkv, cu_seqlens, max_seqlen, num_heads, scale);
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace fastvit

TORCH_LIBRARY_IMPL(fastvit, Autograd, m) {
  m.impl("varlen_attention_fwd", &fastvit::varlen_attention_fwd_autograd);
  m.impl("varlen_packed_attention_fwd", &fastvit::varlen_packed_attention_fwd_autograd);
}
