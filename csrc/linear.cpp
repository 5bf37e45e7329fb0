// Linear: x @ weight.T + bias, the GEMM of gemm.h with the bias in its epilogue.
//
// Backward: dx = dy @ weight and dweight = dy^T @ x through gemm::matmul (oneDNN or MKL,
// whichever measured faster for the operand layout), dbias the column sums of dy; each
// computed only when asked for.
#include "checks.h"
#include "common.h"
#include "gemm.h"
#include "ops.h"

#include <c10/core/GradMode.h>

namespace fastvit {
namespace {

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  FASTVIT_CHECK_CPU(x);
  FASTVIT_CHECK_FLOATING(x);
  FASTVIT_CHECK_INPUT(weight, x);
  FASTVIT_CHECK_DIM(weight, 2);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x's last dimension must be ", weight.size(1),
              " (weight ", weight.sizes(), "), got x of shape ", x.sizes());
}

// x as (rows, in_features), rows counted from the leading sizes (reshape cannot infer them
// when in_features is 0); a view when the strides allow it.
at::Tensor as_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  return x.reshape({rows, x.size(-1)});
}

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  auto shape = x.sizes().vec();
  shape.back() = last;
  return shape;
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "fastvit::linear";
  FASTVIT_BELOW_AUTOGRAD;
  check_linear(op, x, weight);
  FASTVIT_CHECK_OPTIONAL(bias, x, weight.size(0));
  // Without grad mode (inference) the weight may be prepacked; training keeps the dense GEMM.
  const at::Tensor out = c10::GradMode::is_enabled() ? gemm::linear(as_rows(x), weight, bias)
                                                     : gemm::linear_inference(as_rows(x), weight, bias);
  return out.view(with_last(x, weight.size(0)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, bool x_grad, bool weight_grad,
                                                          bool bias_grad) {
  const char* op = "fastvit::linear_bwd";
  FASTVIT_BELOW_AUTOGRAD;
  check_linear(op, x, weight);
  FASTVIT_CHECK_INPUT(grad_out, x);
  const auto shape = with_last(x, weight.size(0));
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(shape), op, ": grad_out must have shape ", at::IntArrayRef(shape),
              ", got ", grad_out.sizes());
  const at::Tensor g = as_rows(grad_out);
  // A gradient not asked for is an empty tensor of its own (an operator's outputs may not alias).
  auto none = [&] { return at::empty({0}, x.options()); };
  const at::Tensor dx = x_grad ? gemm::matmul(g, weight).view(x.sizes()) : none();
  const at::Tensor dweight = weight_grad ? gemm::matmul(g.t(), as_rows(x)) : none();
  const at::Tensor dbias = bias_grad ? g.sum(0) : none();
  return {dx, dweight, dbias};
}

}  // namespace fastvit
