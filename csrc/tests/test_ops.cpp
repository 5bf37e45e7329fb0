// C++ unit tests for the fastvit kernels, run by ctest (one case per argument).
// Each op, forward and backward, in fp32 against the ATen composition it replaces run in
// fp64 (with autograd for the gradients): relative error <= 1e-5 of the result's scale.
#include <torch/torch.h>

#include <cstdio>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "gemm.h"
#include "ops.h"

namespace {

int failures = 0;

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double rtol = 1e-5) {
  if (got.sizes() != want.sizes()) {
    std::printf("FAIL %s: shape %s != %s\n", what.c_str(), c10::str(got.sizes()).c_str(),
                c10::str(want.sizes()).c_str());
    ++failures;
    return;
  }
  const double scale = want.numel() ? want.abs().max().item<double>() : 0.0;
  const double err = got.numel() ? (got.to(at::kDouble) - want).abs().max().item<double>() : 0.0;
  const bool finite = got.numel() == 0 || at::isfinite(got).all().item<bool>();
  const bool ok = finite && err <= rtol * scale;
  std::printf("%s %s: max abs err %.3e, scale %.3e\n", ok ? "ok  " : "FAIL", what.c_str(), err, scale);
  failures += ok ? 0 : 1;
}

at::Tensor randn(std::vector<int64_t> shape, double mean = 0.0, double std = 1.0) {
  return at::randn(shape, at::kFloat) * std + mean;
}

at::Tensor dbl(const at::Tensor& t) { return t.to(at::kDouble).detach().requires_grad_(true); }

std::vector<at::Tensor> grads(const at::Tensor& out, const at::Tensor& grad_out, std::vector<at::Tensor> inputs) {
  return torch::autograd::grad({out}, inputs, {grad_out.to(at::kDouble)});
}

void test_layer_norm() {
  auto x = randn({2, 197, 200}, 0.5, 2.0), w = randn({200}, 1.0), b = randn({200}), g = randn({2, 197, 200});
  auto [out, mean, rstd] = fastvit::layer_norm_fwd(x, w, b, 1e-6);
  auto xd = dbl(x), wd = dbl(w), bd = dbl(b);
  auto ref = at::layer_norm(xd, {200}, wd, bd, 1e-6);
  expect_close("layer_norm out", out, ref);
  auto [dx, dw, db] = fastvit::layer_norm_bwd(g, std::nullopt, x, mean, rstd, w);
  auto r = grads(ref, g, {xd, wd, bd});
  expect_close("layer_norm dx", dx, r[0]);
  expect_close("layer_norm dweight", dw, r[1]);
  expect_close("layer_norm dbias", db, r[2]);
}

void test_add_layer_norm() {
  auto x = randn({3, 50, 200}), res = randn({3, 50, 200}, 0.3), w = randn({200}, 1.0), b = randn({200});
  auto g = randn({3, 50, 200}), gs = randn({3, 50, 200});
  auto [out, sum, mean, rstd] = fastvit::add_layer_norm_fwd(x, res, w, b, 1e-6);
  auto xd = dbl(x), rd = dbl(res), wd = dbl(w), bd = dbl(b);
  auto sd = xd + rd;
  auto ref = at::layer_norm(sd, {200}, wd, bd, 1e-6);
  expect_close("add_layer_norm out", out, ref);
  expect_close("add_layer_norm sum", sum, sd);
  auto [dx, dw, db] = fastvit::layer_norm_bwd(g, gs, sum, mean, rstd, w);
  auto loss = (ref * g.to(at::kDouble)).sum() + (sd * gs.to(at::kDouble)).sum();
  auto r = torch::autograd::grad({loss}, {xd, rd, wd, bd});
  expect_close("add_layer_norm dx", dx, r[0]);
  expect_close("add_layer_norm dresidual", dx, r[1]);
  expect_close("add_layer_norm dweight", dw, r[2]);
  expect_close("add_layer_norm dbias", db, r[3]);

  // LayerScale: summed = residual + gamma * x
  auto gamma = randn({200}, 0.2, 0.6);
  auto [out_s, sum_s, mean_s, rstd_s] = fastvit::add_layer_norm_fwd(x, res, w, b, 1e-6, gamma);
  auto gd = dbl(gamma);
  auto sd_s = rd + gd * xd;
  auto ref_s = at::layer_norm(sd_s, {200}, wd, bd, 1e-6);
  expect_close("add_layer_norm[gamma] out", out_s, ref_s);
  expect_close("add_layer_norm[gamma] sum", sum_s, sd_s);
  auto [dsum_s, dx_s, dw_s, db_s, dg_s] = fastvit::add_layer_norm_bwd(g, gs, sum_s, mean_s, rstd_s, w, x, gamma);
  auto loss_s = (ref_s * g.to(at::kDouble)).sum() + (sd_s * gs.to(at::kDouble)).sum();
  auto r_s = torch::autograd::grad({loss_s}, {xd, rd, wd, bd, gd});
  expect_close("add_layer_norm[gamma] dx", dx_s, r_s[0]);
  expect_close("add_layer_norm[gamma] dresidual", dsum_s, r_s[1]);
  expect_close("add_layer_norm[gamma] dweight", dw_s, r_s[2]);
  expect_close("add_layer_norm[gamma] dbias", db_s, r_s[3]);
  expect_close("add_layer_norm[gamma] dgamma", dg_s, r_s[4]);
}

at::Tensor gelu_ref(const at::Tensor& h, const std::string& approx) {
  return approx == "quick" ? h * at::sigmoid(1.702 * h) : at::gelu(h, approx);
}

void test_linear_gelu() {
  for (const char* approx : {"none", "tanh", "quick"}) {
    for (int64_t batch : {1, 4}) {
      const std::string tag = std::string("linear_gelu[") + approx + ", batch " + std::to_string(batch) + "] ";
      auto x = randn({batch, 197, 200}), w = randn({300, 200}, 0.0, 0.1), b = randn({300});
      auto g = randn({batch, 197, 300});
      auto out = fastvit::linear_gelu(x, w, b, approx);
      auto [out2, pre] = fastvit::linear_gelu_fwd(x, w, b, approx);
      auto xd = dbl(x), wd = dbl(w), bd = dbl(b);
      auto ref = gelu_ref(at::linear(xd, wd, bd), approx);
      expect_close(tag + "out", out, ref);
      expect_close(tag + "out (training)", out2, ref);
      auto [dx, dw, db] = fastvit::linear_gelu_bwd(g, pre, x, w, approx);
      auto r = grads(ref, g, {xd, wd, bd});
      expect_close(tag + "dx", dx, r[0]);
      expect_close(tag + "dweight", dw, r[1]);
      expect_close(tag + "dbias", db, r[2]);
    }
  }
  // in_features 0: the product is empty, the output GELU(bias) broadcast over the rows
  auto x0 = randn({2, 5, 0}), w0 = randn({7, 0}), b0 = randn({7});
  auto want0 = at::gelu(dbl(b0), "none").expand({2, 5, 7});
  expect_close("linear_gelu[in_features 0] out", fastvit::linear_gelu(x0, w0, b0, "none"), want0);
  auto [out0, pre0] = fastvit::linear_gelu_fwd(x0, w0, b0, "none");
  expect_close("linear_gelu[in_features 0] out (training)", out0, want0);
  auto [dx0, dw0, db0] = fastvit::linear_gelu_bwd(randn({2, 5, 7}), pre0, x0, w0, "none");
  if (dx0.sizes() != x0.sizes() || dw0.sizes() != w0.sizes()) {
    std::printf("FAIL linear_gelu[in_features 0] gradient shapes\n");
    ++failures;
  }
}

void test_patch_embed() {
  auto images = randn({2, 3, 32, 48}), w = randn({40, 3, 8, 8}, 0.0, 0.1), b = randn({40});
  auto pos = randn({1, 25, 40}), cls = randn({1, 1, 40}), g = randn({2, 25, 40});
  auto out = fastvit::patch_embed(images, w, b, pos, cls);
  auto id = dbl(images), wd = dbl(w), bd = dbl(b), pd = dbl(pos), cd = dbl(cls);
  auto conv = at::conv2d(id, wd, bd, {8, 8}).flatten(2).transpose(1, 2);
  auto ref = at::cat({cd.expand({2, 1, 40}), conv}, 1) + pd;
  expect_close("patch_embed out", out, ref);
  auto [dimages, dw, db, dpos, dcls] = fastvit::patch_embed_bwd(g, images, w, 1, true, true);
  auto r = grads(ref, g, {id, wd, bd, pd, cd});
  expect_close("patch_embed dimages", dimages, r[0]);
  expect_close("patch_embed dweight", dw, r[1]);
  expect_close("patch_embed dbias", db, r[2]);
  expect_close("patch_embed dpos", dpos.view({1, 25, 40}), r[3]);
  expect_close("patch_embed dcls", dcls.view({1, 1, 40}), r[4]);

  // Class + 4 register tokens as one prefix, with (pos has 29 rows) and without (24 rows,
  // no_embed_class) a position for them.
  for (bool pos_prefix : {true, false}) {
    const std::string tag = std::string("patch_embed[5 prefix tokens, ") + (pos_prefix ? "with" : "without") +
                            " position] ";
    auto prefix = randn({1, 5, 40}), pos5 = randn({1, pos_prefix ? 29 : 24, 40}), g5 = randn({2, 29, 40});
    auto out5 = fastvit::patch_embed(images, w, b, pos5, prefix);
    auto xd5 = dbl(prefix), pd5 = dbl(pos5);
    auto conv = at::conv2d(id, wd, bd, {8, 8}).flatten(2).transpose(1, 2);  // a fresh graph
    auto ref5 = pos_prefix ? at::cat({xd5.expand({2, 5, 40}), conv}, 1) + pd5
                           : at::cat({xd5.expand({2, 5, 40}), conv + pd5}, 1);
    expect_close(tag + "out", out5, ref5);
    auto [di5, dw5, db5, dpos5, dprefix5] = fastvit::patch_embed_bwd(g5, images, w, 5, pos_prefix, true);
    auto r5 = grads(ref5, g5, {id, wd, bd, pd5, xd5});
    expect_close(tag + "dimages", di5, r5[0]);
    expect_close(tag + "dweight", dw5, r5[1]);
    expect_close(tag + "dbias", db5, r5[2]);
    expect_close(tag + "dpos", dpos5.view(pos5.sizes()), r5[3]);
    expect_close(tag + "dprefix", dprefix5.view({1, 5, 40}), r5[4]);
  }
}

void test_attention() {
  for (int64_t nk : {197, 1100}) {  // 1100 keys: more than one key block (online softmax)
    const std::string tag = "attention[Nk " + std::to_string(nk) + "] ";
    auto q = randn({2, 3, 197, 32}), k = randn({2, 3, nk, 32}), v = randn({2, 3, nk, 32});
    auto g = randn({2, 3, 197, 32});
    const double scale = 0.25;
    auto [out, lse] = fastvit::attention_fwd(q, k, v, scale);
    auto qd = dbl(q), kd = dbl(k), vd = dbl(v);
    auto ref = at::matmul(at::softmax(at::matmul(qd, kd.transpose(-1, -2)) * scale, -1), vd);
    expect_close(tag + "out", out, ref);
    auto [dq, dk, dv] = fastvit::attention_bwd(g, q, k, v, out, lse, scale);
    auto r = grads(ref, g, {qd, kd, vd});
    expect_close(tag + "dq", dq, r[0]);
    expect_close(tag + "dk", dk, r[1]);
    expect_close(tag + "dv", dv, r[2]);
  }
  // head_dim 0: all scores are empty dot products (0), so lse = log(Nk) (-inf without keys)
  auto [out5, lse5] = fastvit::attention_fwd(randn({2, 3, 4, 0}), randn({2, 3, 5, 0}), randn({2, 3, 5, 0}), 1.0);
  expect_close("attention[d 0, Nk 5] lse", lse5, at::full({2, 3, 4}, std::log(5.0), at::kDouble));
  auto [out0, lse0] = fastvit::attention_fwd(randn({2, 3, 4, 0}), randn({2, 3, 0, 0}), randn({2, 3, 0, 0}), 1.0);
  const bool neg_inf = lse0.sizes() == at::IntArrayRef({2, 3, 4}) && at::isneginf(lse0).all().item<bool>();
  std::printf("%s attention[d 0, Nk 0] lse is -inf\n", neg_inf ? "ok  " : "FAIL");
  failures += neg_inf ? 0 : 1;
}

void test_packed_attention() {
  const int64_t B = 2, N = 197, H = 3, d = 40;
  auto qkv = randn({B, N, 3 * H * d}), g = randn({B, N, H * d});
  const double scale = 1.0 / std::sqrt(double(d));
  auto [out, lse] = fastvit::packed_attention_fwd(qkv, H, scale);
  auto qd = dbl(qkv);
  auto parts = qd.view({B, N, 3, H, d}).permute({2, 0, 3, 1, 4});
  auto attn = at::softmax(at::matmul(parts[0], parts[1].transpose(-1, -2)) * scale, -1);
  auto ref = at::matmul(attn, parts[2]).transpose(1, 2).reshape({B, N, H * d});
  expect_close("packed_attention out", out, ref);
  auto dqkv = fastvit::packed_attention_bwd(g, qkv, out, lse, H, scale);
  expect_close("packed_attention dqkv", dqkv, grads(ref, g, {qd})[0]);
}

void test_dispatcher() {
  for (const char* name : {"layer_norm_fwd", "add_layer_norm_fwd", "layer_norm_bwd", "add_layer_norm_bwd",
                           "linear_gelu", "linear_gelu_fwd", "linear_gelu_bwd", "patch_embed", "patch_embed_bwd",
                           "attention_fwd", "attention_bwd", "packed_attention_fwd", "packed_attention_bwd"}) {
    auto op = c10::Dispatcher::singleton().findSchema({std::string("fastvit::") + name, ""});
    const bool ok = op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU);
    std::printf("%s fastvit::%s registered with a CPU kernel\n", ok ? "ok  " : "FAIL", name);
    failures += ok ? 0 : 1;
  }
  for (const char* name : {"layer_norm_fwd", "add_layer_norm_fwd", "linear_gelu", "linear_gelu_fwd", "patch_embed",
                           "attention_fwd", "packed_attention_fwd"}) {
    auto op = c10::Dispatcher::singleton().findSchema({std::string("fastvit::") + name, ""});
    const bool ok = op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::Autograd);
    std::printf("%s fastvit::%s registered with an Autograd kernel\n", ok ? "ok  " : "FAIL", name);
    failures += ok ? 0 : 1;
  }
  // A call through the dispatcher reaches the kernel.
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("fastvit::layer_norm_fwd", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                      const std::optional<at::Tensor>&, double)>();
  auto x = randn({4, 24});
  expect_close("dispatched layer_norm", std::get<0>(op.call(x, std::nullopt, std::nullopt, 1e-6)),
               at::layer_norm(x.to(at::kDouble), {24}, {}, {}, 1e-6));
}

// The Autograd kernels (autograd.cpp) through the dispatcher, with absent optional
// inputs in front of present ones: autograd numbers only the present tensor inputs, so
// these catch a gradient handed to the wrong input.
void test_autograd() {
  auto& dispatcher = c10::Dispatcher::singleton();
  auto layer_norm = dispatcher.findSchemaOrThrow("fastvit::layer_norm_fwd", "")
                        .typed<decltype(fastvit::layer_norm_fwd)>();
  auto x = randn({4, 7, 24}).requires_grad_(true), b = randn({24}).requires_grad_(true), g = randn({4, 7, 24});
  auto normed = std::get<0>(layer_norm.call(x, std::nullopt, b, 1e-6));
  auto got = torch::autograd::grad({normed}, {x, b}, {g});
  auto xd = dbl(x), bd = dbl(b);
  auto ref = at::layer_norm(xd, {24}, {}, bd, 1e-6);
  auto want = grads(ref, g, {xd, bd});
  expect_close("autograd layer_norm (no weight) dx", got[0], want[0]);
  expect_close("autograd layer_norm (no weight) dbias", got[1], want[1]);

  auto patch_embed = dispatcher.findSchemaOrThrow("fastvit::patch_embed", "").typed<decltype(fastvit::patch_embed)>();
  auto images = randn({2, 3, 16, 16});  // frozen: no image gradient
  auto w = randn({8, 3, 8, 8}, 0.0, 0.1).requires_grad_(true);
  auto pos = randn({1, 5, 8}).requires_grad_(true), cls = randn({1, 1, 8}).requires_grad_(true);
  auto gt = randn({2, 5, 8});
  auto tokens = patch_embed.call(images, w, std::nullopt, pos, cls);
  got = torch::autograd::grad({tokens}, {w, pos, cls}, {gt});
  auto wd = dbl(w), pd = dbl(pos), cd = dbl(cls);
  auto conv = at::conv2d(images.to(at::kDouble), wd, {}, {8, 8}).flatten(2).transpose(1, 2);
  want = grads(at::cat({cd.expand({2, 1, 8}), conv}, 1) + pd, gt, {wd, pd, cd});
  expect_close("autograd patch_embed (no bias) dweight", got[0], want[0]);
  expect_close("autograd patch_embed (no bias) dpos", got[1], want[1]);
  expect_close("autograd patch_embed (no bias) dcls", got[2], want[2]);
}

void expect_error(const std::string& what, const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const bool ok = std::string(e.what()).find(needle) != std::string::npos;
    std::printf("%s %s raises '%s'\n", ok ? "ok  " : "FAIL", what.c_str(), needle.c_str());
    if (!ok) std::printf("     got: %s\n", e.what());
    failures += ok ? 0 : 1;
    return;
  }
  std::printf("FAIL %s did not raise\n", what.c_str());
  ++failures;
}

void test_checks() {
  auto x = randn({2, 5, 8});
  expect_error("layer_norm with a wrong weight", [&] { fastvit::layer_norm_fwd(x, randn({7}), std::nullopt, 1e-6); },
               "weight must have shape [8], got [7]");
  expect_error("linear_gelu with a wrong in_features", [&] { fastvit::linear_gelu(x, randn({4, 9}), std::nullopt, "none"); },
               "x's last dimension must be 9");
  expect_error("attention with mixed dtypes",
               [&] { fastvit::attention_fwd(randn({1, 1, 3, 4}), randn({1, 1, 3, 4}).to(at::kDouble), randn({1, 1, 3, 4}), 1.0); },
               "k has dtype Double but q has Float");
  expect_error("packed_attention with a bad width", [&] { fastvit::packed_attention_fwd(randn({1, 5, 18}), 4, 1.0); },
               "must be 3 * num_heads * head_dim with num_heads=4");
}

// gemm.h: the Linear GEMMs (oneDNN or ATen, whichever runs here), the GELU epilogues, the
// in-place accumulation, and matmul with plain and transposed operands.
void test_gemm() {
  namespace gemm = fastvit::gemm;
  std::printf("gemm: oneDNN for fp32 %d, bf16 %d, fp16 %d\n", gemm::onednn_gemm(at::kFloat),
              gemm::onednn_gemm(at::kBFloat16), gemm::onednn_gemm(at::kHalf));
  auto x = randn({394, 200}), w = randn({300, 200}, 0.0, 0.1), b = randn({300}), g = randn({394, 300});
  auto xd = dbl(x).detach(), wd = dbl(w).detach(), bd = dbl(b).detach(), gd = dbl(g).detach();
  expect_close("gemm linear", gemm::linear(x, w, b), at::linear(xd, wd, bd));
  expect_close("gemm linear gelu", gemm::linear(x, w, b, gemm::Activation::kGelu), at::gelu(at::linear(xd, wd, bd)));
  expect_close("gemm linear gelu tanh", gemm::linear(x, w, std::nullopt, gemm::Activation::kGeluTanh),
               at::gelu(at::linear(xd, wd), "tanh"));
  auto xt = randn({200, 394}).t();  // transposed rows
  expect_close("gemm linear (transposed x)", gemm::linear(xt, w, b), at::linear(dbl(xt).detach(), wd, bd));
  auto acc = randn({394, 300});
  auto acc_ref = dbl(acc).detach() + at::linear(xd, wd);
  gemm::linear_accumulate_(acc, x, w);
  expect_close("gemm linear_accumulate_", acc, acc_ref);
  expect_close("gemm matmul (dX)", gemm::matmul(g, w), at::mm(gd, wd));
  expect_close("gemm matmul (dW)", gemm::matmul(g.t(), x), at::mm(gd.t(), xd));
  auto b4 = randn({4});  // an empty product: the bias, broadcast
  expect_close("gemm linear (in_features 0)", gemm::linear(randn({3, 0}), randn({4, 0}), b4),
               dbl(b4).detach().expand({3, 4}));
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> cases = {
      {"layer_norm", test_layer_norm},   {"add_layer_norm", test_add_layer_norm},
      {"linear_gelu", test_linear_gelu}, {"patch_embed", test_patch_embed},
      {"attention", test_attention},     {"packed_attention", test_packed_attention},
      {"dispatcher", test_dispatcher},   {"checks", test_checks},
      {"autograd", test_autograd},
      {"gemm", test_gemm},
  };
  at::manual_seed(0);
  std::printf("kernels compiled for %s\n", fastvit::cpu_capability().c_str());
  for (const auto& [name, fn] : cases) {
    if (argc > 1 && name != argv[1]) continue;
    fn();
  }
  if (argc > 1 && !cases.count(argv[1])) {
    std::printf("unknown case '%s'\n", argv[1]);
    return 2;
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
