// GELU(x @ weight.T + bias): ATen's GEMM (MKL/oneDNN) for the product with the bias
// folded in (addmm's beta term), then GELU in place in one vectorized parallel pass.
// GELU is the exact erf one, its tanh approximation, or QuickGELU (common.h). The inference
// op in bf16 / fp16 runs exact / tanh GELU as oneDNN's GEMM epilogue instead (fused_epilogue).
//
// Backward: grad * GELU'(pre) and the bias gradient's column sums in one pass, then two
// GEMMs for dx and dweight.
#include "checks.h"
#include "common.h"
#include "gemm.h"
#include "ops.h"

#include <c10/core/GradMode.h>

namespace fastvit {
namespace {

Gelu parse_approximate(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh" || approximate == "quick",
              "fastvit::linear_gelu: approximate must be 'none', 'tanh' or 'quick', got '", approximate, "'");
  return approximate == "tanh" ? Gelu::kTanh : approximate == "quick" ? Gelu::kQuick : Gelu::kErf;
}

// One row of the pre-activation: adds the bias when given (writing the biased row back to
// pre, which backward needs, unless pre is out), then out = GELU(pre). A bias only comes
// with fp32/fp64 rows (see linear_gelu_impl), which are read and written in place.
template <Gelu G, typename T>
void gelu_row(T* pre, const acc_t<T>* bias, T* out, int64_t n, acc_t<T>* buf) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  if constexpr (!std::is_same_v<T, A>) TORCH_INTERNAL_ASSERT(bias == nullptr, "gelu_row: bias on a reduced type");
  const A* src = row_as_acc(pre, buf, n);
  A* biased = reinterpret_cast<A*>(pre);  // only written when T is A (bias != nullptr)
  A* dst = std::is_same_v<T, A> ? reinterpret_cast<A*>(out) : buf;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V v = V::loadu(src + i);
    if (bias != nullptr) {
      v = v + V::loadu(bias + i);
      if (pre != out) v.store(biased + i);
    }
    gelu_vec<G>(v).store(dst + i);
  }
  for (; i < n; ++i) {
    A v = src[i];
    if (bias != nullptr) {
      v += bias[i];
      if (pre != out) biased[i] = v;
    }
    dst[i] = gelu_scalar<G>(v);
  }
  if constexpr (!std::is_same_v<T, A>) store_row<T>(buf, out, n);
}

// pre = x2d @ weight.T + bias, then out = GELU(pre) in one parallel vectorized pass over
// rows (in place unless pre is kept for backward).
//
// fp32/fp64: a plain GEMM (beta 0), with the bias added by the GELU pass while each row is
// in cache; addmm would first copy the broadcast bias into the whole output and make the
// GEMM read it back. bf16/fp16 keep the bias inside the GEMM, so the pre-activation is
// rounded once, as eager rounds it.
//
// Measured alternatives, both slower here: GEMMs on row blocks with GELU applied to each
// block while in cache (every small GEMM re-packs the whole weight: 1.7x slower than
// this), and oneDNN's fused GELU epilogue (mkldnn::_linear_pointwise: 36 ms vs 26 ms for
// MKL's GEMM + this pass at ViT-S/16 fc1, batch 8, one thread).
// inference: nothing is saved for backward, so the GEMM may use a prepacked weight
// (gemm::linear_inference).
void linear_gelu_impl(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::Tensor& pre, at::Tensor& out, Gelu gelu, bool inference) {
  const bool reduced = x2d.scalar_type() == at::kBFloat16 || x2d.scalar_type() == at::kHalf;
  const bool bias_in_pass = bias.has_value() && !reduced;
  const std::optional<at::Tensor> gemm_bias = bias_in_pass ? std::nullopt : bias;
  // rebinds pre (and out, when they are one tensor)
  pre = inference ? gemm::linear_inference(x2d, weight, gemm_bias) : gemm::linear(x2d, weight, gemm_bias);
  const int64_t rows = pre.size(0), n = pre.size(1);
  if (rows == 0 || n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x2d.scalar_type(), "gelu", [&] {
    using A = acc_t<scalar_t>;
    const at::Tensor b = bias_in_pass ? bias->contiguous() : at::Tensor();
    const A* bp = bias_in_pass ? b.data_ptr<A>() : nullptr;
    scalar_t* p = pre.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    dispatch_gelu(gelu, [&](auto flavour) {
      constexpr Gelu G = decltype(flavour)::value;
      at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
        std::vector<A> buf(std::is_same_v<scalar_t, A> ? 0 : n);
        for (int64_t r = begin; r < end; ++r) gelu_row<G>(p + r * n, bp, o + r * n, n, buf.data());
      });
    });
  });
}

// Whether the inference op (no pre-activation kept) runs GELU as oneDNN's GEMM epilogue: for
// bf16 / fp16 on oneDNN, exact or tanh GELU (QuickGELU has no oneDNN epilogue). The epilogue
// applies GELU to the fp32 accumulator, so the pre-activation is not rounded to bf16 first
// (one rounding fewer than eager). Measured at ViT-S/16 fc1 bf16, batch 8, interleaved in one
// process: 1.03-1.06x GEMM + pass at 2 threads, 1.05x at one. fp32 stays on GEMM + pass:
// there the epilogue measured slower (see linear_gelu_impl; and with prepacked weights, whole
// fp32 ViT-S/16 and ViT-B/16 forwards at 2 threads: GEMM + pass 1.06-1.09x the dense GEMM,
// the epilogue 1.06x).
bool fused_epilogue(const at::Tensor& x2d, Gelu gelu) {
  const auto dtype = x2d.scalar_type();
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && gelu != Gelu::kQuick && x2d.size(0) > 0 &&
         x2d.size(1) > 0 && gemm::onednn_gemm(dtype);
}

void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "fastvit::linear_gelu";
  FASTVIT_CHECK_CPU(x);
  FASTVIT_CHECK_FLOATING(x);
  FASTVIT_CHECK_INPUT(weight, x);
  FASTVIT_CHECK_DIM(weight, 2);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x's last dimension must be ",
              weight.size(1), " (weight ", weight.sizes(), "), got x of shape ", x.sizes());
  FASTVIT_CHECK_OPTIONAL(bias, x, weight.size(0));
}

// Rows of x viewed as a matrix, counted from the leading sizes: reshape({-1, 0}) cannot
// infer them when the last dimension is 0.
int64_t leading_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  return rows;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n_out) {
  auto shape = x.sizes().vec();
  shape.back() = n_out;
  return shape;
}

}  // namespace

at::Tensor linear_gelu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       c10::string_view approximate) {
  FASTVIT_BELOW_AUTOGRAD;
  check_linear_args(x, weight, bias);
  const Gelu gelu = parse_approximate(approximate);
  const at::Tensor x2d = x.reshape({leading_rows(x), x.size(-1)});
  at::Tensor out;
  if (fused_epilogue(x2d, gelu)) {
    const auto act = gelu == Gelu::kTanh ? gemm::Activation::kGeluTanh : gemm::Activation::kGelu;
    out = c10::GradMode::is_enabled() ? gemm::linear(x2d, weight, bias, act)
                                      : gemm::linear_inference(x2d, weight, bias, act);
  } else {
    out = at::empty({x2d.size(0), weight.size(0)}, x.options());
    linear_gelu_impl(x2d, weight, bias, out, out, gelu, !c10::GradMode::is_enabled());
  }
  return out.view(out_shape(x, weight.size(0)));
}

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   c10::string_view approximate) {
  FASTVIT_BELOW_AUTOGRAD;
  check_linear_args(x, weight, bias);
  const Gelu gelu = parse_approximate(approximate);
  const at::Tensor x2d = x.reshape({leading_rows(x), x.size(-1)});
  at::Tensor pre = at::empty({x2d.size(0), weight.size(0)}, x.options());
  at::Tensor out = at::empty_like(pre);
  linear_gelu_impl(x2d, weight, bias, pre, out, gelu, /*inference=*/false);
  const auto shape = out_shape(x, weight.size(0));
  return {out.view(shape), pre.view(shape)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(
    const at::Tensor& grad_out, const at::Tensor& preact, const at::Tensor& x, const at::Tensor& weight,
    c10::string_view approximate) {
  const char* op = "fastvit::linear_gelu_bwd";
  FASTVIT_BELOW_AUTOGRAD;
  FASTVIT_CHECK_CPU(x);
  FASTVIT_CHECK_FLOATING(x);
  FASTVIT_CHECK_INPUT(weight, x);
  FASTVIT_CHECK_INPUT(grad_out, x);
  FASTVIT_CHECK_INPUT(preact, x);
  FASTVIT_CHECK_DIM(weight, 2);
  const Gelu gelu = parse_approximate(approximate);
  const auto shape = out_shape(x, weight.size(0));
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(shape) && preact.sizes() == at::IntArrayRef(shape),
              op, ": grad_out and preact must have shape ", at::IntArrayRef(shape),
              ", got ", grad_out.sizes(), " and ", preact.sizes());
  const int64_t N = weight.size(0);
  const at::Tensor x2d = x.reshape({leading_rows(x), x.size(-1)});
  const at::Tensor g = grad_out.reshape({leading_rows(x), N}).contiguous();
  const at::Tensor p = preact.reshape({leading_rows(x), N}).contiguous();
  const int64_t M = g.size(0);
  at::Tensor gp = at::empty_like(g);  // grad of the pre-activation
  at::Tensor dbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_gelu_bwd", [&] {
    using A = acc_t<scalar_t>;
    using V = Vectorized<A>;
    ThreadPartials<A> partials(1, N);
    const scalar_t* gptr = g.data_ptr<scalar_t>();
    const scalar_t* pptr = p.data_ptr<scalar_t>();
    scalar_t* optr = gp.data_ptr<scalar_t>();
    dispatch_gelu(gelu, [&](auto flavour) {
      constexpr Gelu G = decltype(flavour)::value;
      at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
        std::vector<A> buf(3 * N);
        A *ga = buf.data(), *pa = ga + N, *oa = pa + N;
        A* db = partials.get();
        for (int64_t row = begin; row < end; ++row) {
          const A* gr = row_as_acc(gptr + row * N, ga, N);
          const A* pr = row_as_acc(pptr + row * N, pa, N);
          A* o = std::is_same_v<scalar_t, A> ? reinterpret_cast<A*>(optr + row * N) : oa;
          int64_t i = 0;
          for (; i + V::size() <= N; i += V::size()) {
            V v = V::loadu(gr + i) * gelu_grad_vec<G>(V::loadu(pr + i));
            v.store(o + i);
            (V::loadu(db + i) + v).store(db + i);
          }
          for (; i < N; ++i) {
            o[i] = gr[i] * gelu_grad_scalar<G>(pr[i]);
            db[i] += o[i];
          }
          if constexpr (!std::is_same_v<scalar_t, A>) store_row<scalar_t>(oa, optr + row * N, N);
        }
      });
    });
    dbias = partials.reduce(0, 1, x.scalar_type());
  });
  at::Tensor dx = gemm::matmul(gp, weight).view(x.sizes());
  at::Tensor dweight = gemm::matmul(gp.t(), x2d);
  return {dx, dweight, dbias};
}

}  // namespace fastvit
