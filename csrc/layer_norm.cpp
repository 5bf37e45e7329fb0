// LayerNorm over the last dimension, and the fused residual add + LayerNorm.
//
// One pass per row: the row (x, or x + residual) is read once into an fp32 buffer in
// L1, the statistics come from it (two-pass mean/variance on the cached row, so no
// cancellation), and the normalized row is written from it. The fused variant also
// writes the sum, so eager's separate `x + residual` pass disappears; with LayerScale
// the sum is residual + gamma * x (one fma). Backward uses the saved fp32 mean/rstd and
// accumulates dweight/dbias (and dgamma) in per-thread fp32 partials.
#include "checks.h"
#include "common.h"
#include "ops.h"

namespace fastvit {
namespace {

// residual (nullptr for a plain LayerNorm) is added to x, x scaled by gamma (LayerScale)
// when gamma is given.
template <typename T>
void layer_norm_fwd_kernel(const T* x, const T* residual, const acc_t<T>* gamma, const acc_t<T>* weight,
                           const acc_t<T>* bias, T* out, T* sum_out, acc_t<T>* mean_out,
                           acc_t<T>* rstd_out, int64_t rows, int64_t D, double eps) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<A> buf(2 * D);
    A* xa = buf.data();
    A* ya = xa + D;
    for (int64_t row = begin; row < end; ++row) {
      if (row + 1 < end) {
        prefetch_row(x + (row + 1) * D, D);
        if (residual != nullptr) prefetch_row(residual + (row + 1) * D, D);
      }
      const A* xr = row_as_acc(x + row * D, xa, D);
      if (residual != nullptr) {
        const A* rr = row_as_acc(residual + row * D, ya, D);
        // fp32: the sum goes straight to its output row and is normalized from there (in L1).
        A* sum = std::is_same_v<T, A> ? reinterpret_cast<A*>(sum_out + row * D) : xa;
        int64_t i = 0;
        if (gamma == nullptr) {
          for (; i + V::size() <= D; i += V::size()) (V::loadu(xr + i) + V::loadu(rr + i)).store(sum + i);
          for (; i < D; ++i) sum[i] = xr[i] + rr[i];
        } else {
          for (; i + V::size() <= D; i += V::size()) {
            at::vec::fmadd(V::loadu(xr + i), V::loadu(gamma + i), V::loadu(rr + i)).store(sum + i);
          }
          for (; i < D; ++i) sum[i] = std::fma(xr[i], gamma[i], rr[i]);
        }
        xr = sum;
        if constexpr (!std::is_same_v<T, A>) {
          // The sum is LayerNorm's input and is what backward recomputes x-hat from, so in
          // bf16/fp16 normalize the rounded sum (as eager does), not the fp32 one.
          store_row<T>(xa, sum_out + row * D, D);
          load_row<T>(sum_out + row * D, xa, D);
        }
      }
      const A mean = row_sum(xr, D) / A(D);
      const A rstd = A(1) / std::sqrt(row_sq_dev(xr, mean, D) / A(D) + A(eps));
      mean_out[row] = mean;
      rstd_out[row] = rstd;
      // y = (x - mean) * rstd * w + b = x * s + (b - mean * s) with s = rstd * w
      A* y = std::is_same_v<T, A> ? reinterpret_cast<A*>(out + row * D) : ya;
      const V vr(rstd), vm(mean);
      int64_t i = 0;
      for (; i + V::size() <= D; i += V::size()) {
        V v = (V::loadu(xr + i) - vm) * vr;
        if (weight != nullptr) v = v * V::loadu(weight + i);
        if (bias != nullptr) v = v + V::loadu(bias + i);
        v.store(y + i);
      }
      for (; i < D; ++i) {
        A v = (xr[i] - mean) * rstd;
        if (weight != nullptr) v *= weight[i];
        if (bias != nullptr) v += bias[i];
        y[i] = v;
      }
      if constexpr (!std::is_same_v<T, A>) store_row<T>(ya, out + row * D, D);
    }
  });
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) [+ grad_sum], g = dy * w.
// With LayerScale (gamma given; x is then the sum residual + gamma * branch): dx is the
// sum's gradient, which is the residual's; the branch gets gamma * dx (dbranch) and
// gamma gets the column sums of branch * dx (partial 2).
template <typename T>
void layer_norm_bwd_kernel(const T* dy, const T* grad_sum, const T* x, const acc_t<T>* mean,
                           const acc_t<T>* rstd, const acc_t<T>* weight, const T* branch,
                           const acc_t<T>* gamma, T* dx, T* dbranch, ThreadPartials<acc_t<T>>& partials,
                           int64_t rows, int64_t D) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const int64_t n_partials = gamma != nullptr ? 3 : 2;
  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<A> buf((gamma != nullptr ? 6 : 4) * D);
    A *xa = buf.data(), *da = xa + D, *ga = da + D, *sa = ga + D;
    A *ba = sa + D, *oba = ba + D;  // LayerScale only: the branch row, its gradient
    A* dw = partials.get(0, n_partials);
    A* db = partials.get(1, n_partials);
    A* dg = gamma != nullptr ? partials.get(2, n_partials) : nullptr;
    for (int64_t row = begin; row < end; ++row) {
      if (row + 1 < end) {
        prefetch_row(x + (row + 1) * D, D);
        prefetch_row(dy + (row + 1) * D, D);
        if (branch != nullptr) prefetch_row(branch + (row + 1) * D, D);
      }
      const A* xr = row_as_acc(x + row * D, xa, D);
      const A* dr = row_as_acc(dy + row * D, da, D);
      const V vm(mean[row]), vr(rstd[row]);
      V s_g(A(0)), s_gx(A(0));
      int64_t i = 0;
      // pass 1: xhat (kept in xa), g = dy * w (kept in ga), the two row sums, dw/db
      for (; i + V::size() <= D; i += V::size()) {
        V xh = (V::loadu(xr + i) - vm) * vr;
        V d = V::loadu(dr + i);
        V g = weight != nullptr ? d * V::loadu(weight + i) : d;
        xh.store(xa + i);
        g.store(ga + i);
        s_g += g;
        s_gx = at::vec::fmadd(g, xh, s_gx);
        at::vec::fmadd(d, xh, V::loadu(dw + i)).store(dw + i);
        (V::loadu(db + i) + d).store(db + i);
      }
      auto add = [](V& p, V& q) { return p + q; };
      A sum_g = at::vec::vec_reduce_all<A>(add, s_g);
      A sum_gx = at::vec::vec_reduce_all<A>(add, s_gx);
      for (; i < D; ++i) {
        A xh = (xr[i] - mean[row]) * rstd[row];
        A g = weight != nullptr ? dr[i] * weight[i] : dr[i];
        xa[i] = xh;
        ga[i] = g;
        sum_g += g;
        sum_gx += g * xh;
        dw[i] += dr[i] * xh;
        db[i] += dr[i];
      }
      // pass 2: dx
      const A c_g = sum_g / A(D), c_gx = sum_gx / A(D);
      const A* sr = grad_sum != nullptr ? row_as_acc(grad_sum + row * D, sa, D) : nullptr;
      A* out = std::is_same_v<T, A> ? reinterpret_cast<A*>(dx + row * D) : da;
      const V vcg(c_g), vcgx(c_gx);
      if (gamma == nullptr) {
        for (i = 0; i + V::size() <= D; i += V::size()) {
          V v = (V::loadu(ga + i) - vcg - V::loadu(xa + i) * vcgx) * vr;
          if (sr != nullptr) v = v + V::loadu(sr + i);
          v.store(out + i);
        }
        for (; i < D; ++i) {
          A v = (ga[i] - c_g - xa[i] * c_gx) * rstd[row];
          if (sr != nullptr) v += sr[i];
          out[i] = v;
        }
      } else {
        const A* br = row_as_acc(branch + row * D, ba, D);
        A* ob = std::is_same_v<T, A> ? reinterpret_cast<A*>(dbranch + row * D) : oba;
        for (i = 0; i + V::size() <= D; i += V::size()) {
          V v = (V::loadu(ga + i) - vcg - V::loadu(xa + i) * vcgx) * vr;
          if (sr != nullptr) v = v + V::loadu(sr + i);
          v.store(out + i);
          (v * V::loadu(gamma + i)).store(ob + i);
          at::vec::fmadd(V::loadu(br + i), v, V::loadu(dg + i)).store(dg + i);
        }
        for (; i < D; ++i) {
          A v = (ga[i] - c_g - xa[i] * c_gx) * rstd[row];
          if (sr != nullptr) v += sr[i];
          out[i] = v;
          ob[i] = v * gamma[i];
          dg[i] += br[i] * v;
        }
        if constexpr (!std::is_same_v<T, A>) store_row<T>(oba, dbranch + row * D, D);
      }
      if constexpr (!std::is_same_v<T, A>) store_row<T>(da, dx + row * D, D);
    }
  });
}

at::Tensor acc_param(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->contiguous().to(acc) : at::Tensor();
}

template <typename A>
const A* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward(
    const at::Tensor& x_in, const at::Tensor* residual_in, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor residual = residual_in != nullptr ? residual_in->contiguous() : at::Tensor();
  const int64_t D = x.size(-1);
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  auto stat_shape = x.sizes().vec();
  stat_shape.pop_back();
  at::Tensor out = at::empty_like(x);
  at::Tensor sum = residual.defined() ? at::empty_like(x) : at::Tensor();
  at::Tensor mean, rstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_fwd", [&] {
    using A = acc_t<scalar_t>;
    mean = at::empty(stat_shape, x.options().dtype(acc_dtype<scalar_t>()));
    rstd = at::empty(stat_shape, x.options().dtype(acc_dtype<scalar_t>()));
    const at::Tensor g = acc_param(gamma, acc_dtype<scalar_t>());
    const at::Tensor w = acc_param(weight, acc_dtype<scalar_t>());
    const at::Tensor b = acc_param(bias, acc_dtype<scalar_t>());
    layer_norm_fwd_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), residual.defined() ? residual.data_ptr<scalar_t>() : nullptr, ptr_or_null<A>(g),
        ptr_or_null<A>(w), ptr_or_null<A>(b), out.data_ptr<scalar_t>(),
        sum.defined() ? sum.data_ptr<scalar_t>() : nullptr, mean.data_ptr<A>(), rstd.data_ptr<A>(),
        rows, D, eps);
  });
  return {out, sum, mean, rstd};
}

void check_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, double eps) {
  const char* op = "fastvit::layer_norm";
  FASTVIT_CHECK_CPU(x);
  FASTVIT_CHECK_FLOATING(x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a scalar");
  FASTVIT_CHECK_OPTIONAL(weight, x, x.size(-1));
  FASTVIT_CHECK_OPTIONAL(bias, x, x.size(-1));
  TORCH_CHECK(eps > 0, op, ": eps must be positive, got ", eps);
}

// The checks of both backward operators; returns (rows, D).
std::pair<int64_t, int64_t> check_norm_bwd_args(const char* op, const at::Tensor& grad_out,
                                                const std::optional<at::Tensor>& grad_sum, const at::Tensor& input,
                                                const at::Tensor& mean, const at::Tensor& rstd,
                                                const std::optional<at::Tensor>& weight) {
  FASTVIT_CHECK_CPU(input);
  FASTVIT_CHECK_FLOATING(input);
  FASTVIT_CHECK_INPUT(grad_out, input);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": grad_out must have the input's shape ",
              input.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension");
  const int64_t D = input.size(-1);
  const int64_t rows = D == 0 ? 0 : input.numel() / D;
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows, op, ": mean and rstd must have ",
              rows, " elements (one per row), got ", mean.numel(), " and ", rstd.numel());
  const at::ScalarType acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean.scalar_type() == acc && rstd.scalar_type() == acc, op, ": mean/rstd must be ", acc, ", got ",
              mean.scalar_type(), " and ", rstd.scalar_type());
  FASTVIT_CHECK_OPTIONAL(weight, input, D);
  if (grad_sum.has_value()) {
    const at::Tensor& grad_sum_ = *grad_sum;
    FASTVIT_CHECK_INPUT(grad_sum_, input);
    TORCH_CHECK(grad_sum->sizes() == input.sizes(), op, ": grad_sum must have the input's shape ",
                input.sizes(), ", got ", grad_sum->sizes());
  }
  return {rows, D};
}

// Both backward operators: (dinput, dweight, dbias, dbranch, dgamma), the last two only
// with LayerScale (branch and gamma defined), else undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const at::Tensor& branch_in, const std::optional<at::Tensor>& gamma, int64_t rows, int64_t D) {
  const at::Tensor x = input.contiguous(), dy = grad_out.contiguous();
  const at::Tensor gs = grad_sum.has_value() ? grad_sum->contiguous() : at::Tensor();
  const bool scaled = gamma.has_value();
  const at::Tensor branch = scaled ? branch_in.contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dbranch = scaled ? at::empty_like(branch) : at::Tensor();
  at::Tensor dweight, dbias, dgamma;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm_bwd", [&] {
    using A = acc_t<scalar_t>;
    const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
    const at::Tensor w = acc_param(weight, acc_dtype<scalar_t>());
    const at::Tensor g = acc_param(gamma, acc_dtype<scalar_t>());
    const int64_t n_partials = scaled ? 3 : 2;
    ThreadPartials<A> partials(n_partials, D);
    layer_norm_bwd_kernel<scalar_t>(dy.data_ptr<scalar_t>(), gs.defined() ? gs.data_ptr<scalar_t>() : nullptr,
                                    x.data_ptr<scalar_t>(), m.data_ptr<A>(), r.data_ptr<A>(), ptr_or_null<A>(w),
                                    scaled ? branch.data_ptr<scalar_t>() : nullptr, ptr_or_null<A>(g),
                                    dx.data_ptr<scalar_t>(), scaled ? dbranch.data_ptr<scalar_t>() : nullptr,
                                    partials, rows, D);
    dweight = partials.reduce(0, n_partials, x.scalar_type());
    dbias = partials.reduce(1, n_partials, x.scalar_type());
    if (scaled) dgamma = partials.reduce(2, n_partials, x.scalar_type());
  });
  return {dx, dweight, dbias, dbranch, dgamma};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  FASTVIT_BELOW_AUTOGRAD;
  check_norm_args(x, weight, bias, eps);
  auto [out, sum, mean, rstd] = norm_forward(x, nullptr, std::nullopt, weight, bias, eps);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& gamma) {
  FASTVIT_BELOW_AUTOGRAD;
  check_norm_args(x, weight, bias, eps);
  const char* op = "fastvit::add_layer_norm";
  FASTVIT_CHECK_INPUT(residual, x);
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have x's shape ",
              x.sizes(), ", got ", residual.sizes());
  FASTVIT_CHECK_OPTIONAL(gamma, x, x.size(-1));
  return norm_forward(x, &residual, gamma, weight, bias, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight) {
  FASTVIT_BELOW_AUTOGRAD;
  auto [rows, D] = check_norm_bwd_args("fastvit::layer_norm_bwd", grad_out, grad_sum, input, mean, rstd, weight);
  auto [dx, dweight, dbias, dbranch, dgamma] =
      norm_backward(grad_out, grad_sum, input, mean, rstd, weight, at::Tensor(), std::nullopt, rows, D);
  return {dx, dweight, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_sum, const at::Tensor& summed,
    const at::Tensor& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight, const at::Tensor& x,
    const at::Tensor& gamma) {
  const char* op = "fastvit::add_layer_norm_bwd";
  FASTVIT_BELOW_AUTOGRAD;
  auto [rows, D] = check_norm_bwd_args(op, grad_out, grad_sum, summed, mean, rstd, weight);
  FASTVIT_CHECK_INPUT(x, summed);
  TORCH_CHECK(x.sizes() == summed.sizes(), op, ": x must have the shape of summed ", summed.sizes(), ", got ",
              x.sizes());
  FASTVIT_CHECK_INPUT(gamma, summed);
  FASTVIT_CHECK_SHAPE(gamma, D);
  auto [dsum, dweight, dbias, dx, dgamma] = norm_backward(grad_out, grad_sum, summed, mean, rstd, weight, x, gamma,
                                                          rows, D);
  return {dsum, dx, dweight, dbias, dgamma};
}

}  // namespace fastvit
