// The Linear GEMMs (see gemm.h): oneDNN's inner product where it runs, ATen's otherwise.
//
// Measured on a 2-core AMD EPYC (AVX-512, avx512_bf16), ViT-S/16 and ViT-B/16 shapes, batch 1
// and 8, interleaved, median of per-round ratios, one thread timed by its CPU time (the
// machine was oversubscribed, so wall times at 2 threads mostly measured waiting for a core):
// fp32 forward 1.02-1.3x F.linear (ViT-S: qkv 1.0-1.24x, fc2 1.02-1.1x; ViT-B 1.02-1.2x),
// bf16 forward 1.0-1.14x (F.linear already runs oneDNN's matmul in bf16). At 2 threads (wall,
// interleaved, same machine busy) fp32 forward measured 1.2-2.2x. Backward: see matmul.
// Prepacked weights (mkldnn::_reorder_linear_weight, once per weight) add 4-10% on top of
// the dense forward in fp32 and 4-5% in bf16 (ViT-S shapes, batch 8, 2 threads): done for
// inference (linear_inference). Whole fp32 forwards, interleaved in one process, median of 12
// per-round ratios: ViT-S/16 batch 8 1.09x, batch 1 1.08x, ViT-B/16 batch 8 1.06x the dense
// GEMMs; the cost is a second copy of every Linear weight while the model is in use. With the
// cached autocast casts and the GELU epilogue they took ViT-S/16 bf16 autocast inference
// (batch 8, 2 threads, `fastvit bench`) from 0.91-0.95x torch.compile's img/s to 0.97-1.0x.
#include "gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/Context.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace fastvit::gemm {
namespace {

using ScalarList = c10::List<std::optional<c10::Scalar>>;
using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, ScalarList, std::optional<c10::string_view>);

// mkldnn::_linear_pointwise, or nullptr when this torch has no such operator.
const c10::TypedOperatorHandle<LinearPointwise>* pointwise_op() {
  static const auto handle = [] {
    auto found = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return found.has_value() ? std::optional(found->typed<LinearPointwise>()) : std::nullopt;
  }();
  return handle.has_value() ? &*handle : nullptr;
}

// oneDNN's own answer to "does this CPU run dtype fast" (what ATen asks before it routes a
// bf16 / fp16 matmul to oneDNN); true for fp32, false for anything else.
bool onednn_device_check(at::ScalarType dtype) {
  if (dtype == at::kFloat) return true;
  const char* name = dtype == at::kBFloat16 ? "mkldnn::_is_mkldnn_bf16_supported"
                     : dtype == at::kHalf   ? "mkldnn::_is_mkldnn_fp16_supported"
                                            : nullptr;
  if (name == nullptr) return false;
  auto found = c10::Dispatcher::singleton().findSchema({name, ""});
  return found.has_value() && found->typed<bool()>().call();
}

at::Tensor call_pointwise(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          Activation act) {
  const char* attr = act == Activation::kNone ? "none" : "gelu";
  std::optional<c10::string_view> algorithm;
  if (act != Activation::kNone) algorithm = act == Activation::kGeluTanh ? "tanh" : "none";
  return pointwise_op()->call(x2d, weight, bias, attr, ScalarList(), algorithm);
}

// A small product through the op, compared with ATen's: the op may exist and the device check
// pass, yet oneDNN lack a kernel for the dtype (it then throws) in some build.
bool probe(at::ScalarType dtype) {
  try {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto opts = at::TensorOptions().dtype(dtype);
    const at::Tensor x = at::arange(2 * 16, opts.dtype(at::kFloat)).reshape({2, 16}).div_(32).to(dtype);
    const at::Tensor w = at::ones({8, 16}, opts);
    const at::Tensor y = call_pointwise(x, w, std::nullopt, Activation::kNone);
    return y.sizes() == at::IntArrayRef({2, 8}) && y.scalar_type() == dtype &&
           at::allclose(y.to(at::kFloat), at::mm(x.to(at::kFloat), w.to(at::kFloat).t()), 1e-2, 1e-2);
  } catch (const std::exception&) {
    return false;
  }
}

bool detect(at::ScalarType dtype) {
  const char* env = std::getenv("FASTVIT_CPP_GEMM");
  if (env != nullptr && std::strcmp(env, "aten") == 0) return false;
  return at::hasMKLDNN() && pointwise_op() != nullptr && onednn_device_check(dtype) && probe(dtype);
}

bool usable(const at::Tensor& x2d, const at::Tensor& weight) {
  // oneDNN rejects an empty inner dimension; empty outputs need no GEMM at all.
  return x2d.size(0) > 0 && weight.size(0) > 0 && x2d.size(1) > 0 && onednn_gemm(x2d.scalar_type());
}

// mkldnn::_reorder_linear_weight, or nullptr when this torch has no such operator.
using ReorderWeight = at::Tensor(const at::Tensor&, std::optional<int64_t>);
const c10::TypedOperatorHandle<ReorderWeight>* reorder_op() {
  static const auto handle = [] {
    auto found = c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
    return found.has_value() ? std::optional(found->typed<ReorderWeight>()) : std::nullopt;
  }();
  return handle.has_value() ? &*handle : nullptr;
}

// A weight's packed copy and what identifies the weight it was made from. The weak
// references keep the TensorImpl and StorageImpl objects (not their data) allocated, so no
// other tensor or storage can take their addresses while the entry exists.
struct PackedWeight {
  c10::weak_intrusive_ptr<c10::TensorImpl> tensor;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  int64_t version;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  at::Tensor packed;

  bool matches(const at::Tensor& w) const {
    return !tensor.expired() && !storage.expired() &&
           storage._unsafe_get_target() == w.storage().unsafeGetStorageImpl() && data == w.data_ptr() &&
           version == w._version() && dtype == w.scalar_type() && sizes == w.sizes().vec() &&
           strides == w.strides().vec();
  }
};

// The packed weight for w, made on first use; an undefined tensor when w cannot be packed
// (an inference tensor has no version counter to notice a change by).
at::Tensor packed_weight(const at::Tensor& w, int64_t batch) {
  if (w.is_inference() || reorder_op() == nullptr) return at::Tensor();
  static std::mutex mutex;
  static std::unordered_map<const c10::TensorImpl*, PackedWeight> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  // Drop the entries of freed weights first, on every call (a few dozen weak-pointer checks):
  // the packed copies of a deleted model go at the next inference call of any model.
  for (auto e = cache.begin(); e != cache.end();) {
    e = e->second.tensor.expired() ? cache.erase(e) : std::next(e);
  }
  auto it = cache.find(w.unsafeGetTensorImpl());
  if (it != cache.end() && it->second.matches(w)) return it->second.packed;
  at::Tensor packed;
  try {
    packed = reorder_op()->call(w.contiguous(), batch);
  } catch (const std::exception&) {
    return at::Tensor();
  }
  PackedWeight entry{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()),
                     w.storage().getWeakStorageImpl(),
                     w.data_ptr(),
                     w._version(),
                     w.sizes().vec(),
                     w.strides().vec(),
                     w.scalar_type(),
                     packed};
  cache.insert_or_assign(w.unsafeGetTensorImpl(), std::move(entry));
  return packed;
}

}  // namespace

bool onednn_gemm(at::ScalarType dtype) {
  // 0: unknown, 1: no, 2: yes; one slot per dtype. A race only repeats the detection.
  static std::atomic<int> state[static_cast<int>(at::ScalarType::NumOptions)];
  auto& s = state[static_cast<int>(dtype)];
  int v = s.load(std::memory_order_relaxed);
  if (v == 0) {
    v = detect(dtype) ? 2 : 1;
    s.store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

at::Tensor linear(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  Activation act) {
  if (usable(x2d, weight)) return call_pointwise(x2d, weight, bias, act);
  at::Tensor out = bias.has_value() ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t());
  if (act != Activation::kNone) out = at::gelu_(out, act == Activation::kGeluTanh ? "tanh" : "none");
  return out;
}

at::Tensor linear_inference(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            Activation act) {
  const auto dtype = x2d.scalar_type();
  if ((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) && usable(x2d, weight)) {
    const at::Tensor packed = packed_weight(weight, x2d.size(0));
    if (packed.defined()) return call_pointwise(x2d, packed, bias, act);
  }
  return linear(x2d, weight, bias, act);
}

void linear_accumulate_(const at::Tensor& out2d, const at::Tensor& x2d, const at::Tensor& weight) {
  if (usable(x2d, weight)) {
    out2d.add_(call_pointwise(x2d, weight, std::nullopt, Activation::kNone));
  } else {
    out2d.addmm_(x2d, weight.t());
  }
}

at::Tensor matmul(const at::Tensor& a, const at::Tensor& b) {
  // a @ b is a Linear with weight b^T (a transposed view, which oneDNN reads as it is).
  // fp32, ViT-S/16 batch 8, 2 threads, quiet machine, best of 3x7, ms summed over the four
  // Linear shapes (at::mm = MKL's sgemm):
  //   dX = dY W     oneDNN 25.7 vs at::mm 28.9: oneDNN.
  //   dW = dY^T X   oneDNN 31.8 vs at::mm 29.1: oneDNN first copies the transposed dY^T into
  //                 a contiguous tensor (~40 ms of a ~1.5 s training step), which MKL reads in
  //                 place; an a that is not contiguous goes to at::mm.
  // bf16: at::mm already runs oneDNN's matmul on CPUs with bf16 support, and the inner
  // product measured 0.62-1.02x of it (dW the worst): bf16 stays on at::mm.
  const at::Tensor weight = b.t();
  if (a.scalar_type() == at::kFloat && a.is_contiguous() && usable(a, weight)) {
    return call_pointwise(a, weight, std::nullopt, Activation::kNone);
  }
  return at::mm(a, b);
}

}  // namespace fastvit::gemm
