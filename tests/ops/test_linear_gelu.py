"""Linear + GELU on every backend, and the Triton GEMM under it (gemm.py, linear_gelu.py).

The parity tests run each backend that can run here (triton under the Triton interpreter on
CPU, conftest sets TRITON_INTERPRET=1, and on CUDA when there is one; cpp on CPU; torch)
through the public API, judged by ``fastvit_kernels.testing.check_op``. Under the
interpreter the shapes are the smallest that still cover the cases: M = 2*197 with K = 588
and N = 200, tails in every dimension, both GELU flavours. Then each backend's own cases.
"""

import os

import pytest
import torch
from op_backends import BACKENDS, assert_compiled_matches_eager, linear_inputs, needs_cpp
from op_backends import backend_device as _device

import fastvit_kernels as fk
from fastvit_kernels import reference
from fastvit_kernels.testing import assert_parity, check_backend, check_op, rand, upcast

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastvit_kernels.triton import gemm as tg  # noqa: E402
from fastvit_kernels.triton import linear_gelu as tlg  # noqa: E402

DTYPES = [torch.float32, torch.float16]


# ---------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gelu_vit_rows(backend, dtype, device):
    """M = 2*197 token rows, K = 588 (14*14*3), N = 200: tails in every dimension."""
    approximate = "none" if dtype == torch.float32 else "tanh"
    inputs = [*linear_inputs((2, 197, 588), 200, dtype, _device(backend, device)), approximate]
    check_backend(backend, "linear_gelu", inputs, dtype=dtype)


@pytest.mark.parametrize("dtype,approximate,bias", [(torch.float32, "tanh", False),
                                                    (torch.float16, "none", True)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gelu_small(backend, dtype, approximate, bias, device):
    inputs = [*linear_inputs((3, 7, 40), 24, dtype, _device(backend, device), bias=bias), approximate]
    check_backend(backend, "linear_gelu", inputs, dtype=dtype)


@pytest.mark.parametrize("dtype,shape,bias", [(torch.float32, (2, 197, 588), True),
                                              (torch.float16, (3, 7, 40), False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_quick_gelu(backend, dtype, shape, bias, device):
    """CLIP's QuickGELU, h * sigmoid(1.702 h), as the fused activation, forward and backward."""
    inputs = [*linear_inputs(shape, 200 if shape[-1] == 588 else 24, dtype, _device(backend, device),
                              bias=bias), "quick"]
    check_backend(backend, "linear_gelu", inputs, dtype=dtype)


# ---------------------------------------------------------------- the triton backend's cases
def test_linear_gelu_strided_input_and_expanded_grad(device):
    """A transposed x view and the stride-0 gradient of .sum() go in without copies."""
    base = rand(40, 9, device=device)
    x = base.t().requires_grad_()  # (9, 40), strides (1, 9)
    w = rand(24, 40, device=device, std=40 ** -0.5, requires_grad=True)
    b = rand(24, device=device, requires_grad=True)
    with fk.backend("triton"):
        fk.linear_gelu(x, w, b).sum().backward()
    xh, wh, bh = upcast(x, w, b)
    out_hi = reference.linear_gelu(xh, wh, bh)
    out_hi.sum().backward()
    for name, fast, ref in (("x", x.grad, xh.grad), ("w", w.grad, wh.grad), ("b", b.grad, bh.grad)):
        assert_parity(f"grad {name}", fast, ref)


@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
def test_linear_gelu_recompute_backward(approximate, device):
    """The inference op under autograd recomputes z; its epilogue forms dZ = dY * GELU'(z)."""
    inputs = [*linear_inputs((2, 5, 24), 40, torch.float32, device), approximate]
    results = check_op("linear_gelu(recompute)", torch.ops.fastvit_triton.linear_gelu, reference.linear_gelu,
                       inputs)
    assert all(t.dtype == torch.float32 for t in results.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_quick_gelu_saturates_without_nan(dtype, device):
    """QuickGELU far out in both tails (a plain exp(-1.702 z) overflows below z = -52 in
    fp32): the output, the saved derivative and the recomputed one stay finite and right."""
    x, w, _ = linear_inputs((3, 16), 8, dtype, device)
    b = torch.tensor([-300.0, -80.0, -30.0, -3.0, 0.0, 4.0, 40.0, 300.0], dtype=dtype, device=device)
    b.requires_grad_()
    inputs = [x, w, b, "quick"]
    check_backend("triton", "linear_gelu", inputs, dtype=dtype)  # training op: saved derivative
    check_op("linear_gelu(recompute, quick)", torch.ops.fastvit_triton.linear_gelu, reference.linear_gelu,
             inputs)


def test_linear_gelu_inference_saves_nothing(device):
    x, w, b = linear_inputs((4, 16), 24, torch.float32, device)
    with torch.no_grad(), fk.backend("triton"):
        out = fk.linear_gelu(x, w, b)
    assert out.grad_fn is None
    assert_parity("out", out, reference.linear_gelu(*upcast(x, w, b)).detach())


def test_split_k_weight_gradient_with_row_sums(device):
    """Split-K partial products and row sums (used for weight / bias grads on a GPU)."""
    m, n, k = 24, 40, 150
    a, scale, b = rand(k, m, device=device), rand(k, m, device=device), rand(k, n, device=device)
    out = torch.empty(m, n, device=device)
    rowsum = torch.empty(m, device=device)
    tg.gemm_split_sum(tg.matrix(a).t(), tg.matrix(b), out, m, n, k, aux=tg.matrix(scale).t(),
                      prologue_scale=True, rowsum=rowsum, splits=3)
    dz = (a * scale).t().double()
    assert_parity("split-K product", out, dz @ b.double())
    assert_parity("split-K row sums", rowsum, dz.sum(1))


def test_linear_gelu_opcheck(device):
    x, w, b = linear_inputs((2, 3, 16), 24, torch.float32, device)
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu_train.default, (x, w, b, "none"))
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu.default, (x, w, None, "tanh"))
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu_train.default, (x, w, None, "quick"))
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu.default, (x, w, b, "quick"))


def test_linear_gelu_backward_opcheck(device):
    """The backward ops' fakes are hand-written: check them against the real kernels
    (a transposed x, so a fake that kept x's strides would be caught)."""
    x = rand(16, 2, 3, device=device).permute(1, 2, 0)  # (2, 3, 16), not contiguous
    w, b = rand(24, 16, device=device), rand(24, device=device)
    grad = rand(2, 3, 24, device=device)
    _, act_grad = torch.ops.fastvit_triton.linear_gelu_train(x, w, b, "none")
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu_backward.default, (grad, x, w, act_grad))
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu_backward_recompute.default,
                          (grad, x, w, b, "tanh"))
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu_backward_recompute.default,
                          (grad, x, w, None, "none"))
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu_backward_recompute.default,
                          (grad, x, w, b, "quick"))


def test_bad_input_is_rejected_before_any_kernel(device):
    with fk.backend("triton"):
        with pytest.raises(ValueError, match="in_features"):
            fk.linear_gelu(rand(4, 8, device=device), rand(16, 9, device=device), None)
        with pytest.raises(TypeError, match="dtype"):
            fk.linear_gelu(rand(4, 8, device=device), rand(16, 8, device=device).half(), None)


def test_dispatch_and_supports(device):
    x, w, b = linear_inputs((4, 16), 24, torch.float32, device)
    with fk.backend("triton"):
        assert fk.resolved_backend("linear_gelu", device, x, w, b) == "triton"
    assert tlg.SUPPORTS["linear_gelu"](x.double(), w.double(), None) is not None
    if device.type == "cpu":  # the interpreter multiplies bf16 bit patterns in tl.dot
        xb, wb = x.bfloat16(), w.bfloat16()
        with fk.backend("triton"), pytest.raises(fk.BackendUnavailableError, match="bfloat16"):
            fk.linear_gelu(xb, wb, None)


def test_configs_are_pruned_by_the_devices_shared_memory(monkeypatch):
    """The shared-memory filter reads the device's limit (the H100 figure off CUDA) and
    counts the prologue scale's tile, which doubles the A side of every stage."""
    configs = tg._gpu_configs()
    a = torch.empty(1, dtype=torch.float16)
    assert tg.max_shared_mem(a.device) == 227 * 1024
    budget = 227 * 1024 - tg._SMEM_MARGIN
    h100 = tg._prune(configs, {"a_ptr": a}, PROLOGUE_SCALE=True)
    assert h100 and all(tg.smem_estimate(c, 2, True) <= budget for c in h100)
    # 128x128x64, 4 stages: A, scale and B tiles (192 KiB) and the ones block fit 200 KiB.
    big = tg._config((128, 128, 64, 4, 8))
    assert tg.smem_estimate(big, 2, True) == (4 * (2 * 128 * 64 + 64 * 128) + 64 * 16) * 2
    monkeypatch.setattr(tg, "max_shared_mem", lambda device: 160 * 1024)
    small = tg._prune(configs, {"a_ptr": a}, PROLOGUE_SCALE=True)
    assert small and all(tg.smem_estimate(c, 2, True) <= 160 * 1024 - tg._SMEM_MARGIN for c in small)
    assert len(small) < len(h100)
    monkeypatch.setattr(tg, "max_shared_mem", lambda device: 16 * 1024)
    (fallback,) = tg._prune(configs, {"a_ptr": a})
    assert tg._tile(fallback) == (64, 64, 64, 4, 4)  # nothing fits: the smallest tile


def test_configs_are_chosen_by_dtype_and_epilogue():
    """fp32 (FMA dot) gets its shallow-K tiles, 16-bit operands the tensor-core ones;
    a fused epilogue never gets more than 64 accumulator elements per thread (more
    spills on sm_90), while a plain GEMM may use the 128x256 tile."""
    configs = tg._gpu_configs()
    half, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    plain = tg._prune(configs, {"a_ptr": half})
    assert {tg._tile(c) for c in plain} == set(tg._HALF_TILES)
    assert {tg._tile(c) for c in tg._prune(configs, {"a_ptr": fp32})} == set(tg._FP32_TILES)
    for flag in ("HAS_BIAS", "ACT", "ACT_GRAD_OUT", "EPI_GELU_GRAD", "PROLOGUE_SCALE", "HAS_POS"):
        fused = tg._prune(configs, {"a_ptr": half}, **{flag: 1})
        assert fused and len(fused) < len(plain), flag
        assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps for c in fused)
    # Patches of channels-last images (pixel stride 3): only 32 accumulator elements per thread.
    strided = tg._prune(configs, {"a_ptr": half, "s_w": 3}, P=16)
    assert [tg._tile(c) for c in strided] == [(64, 64, 64, 4, 4)]
    assert len(tg._prune(configs, {"a_ptr": half, "s_w": 1}, P=16)) > 1


@pytest.mark.cuda
@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
def test_linear_gelu_bf16_cuda(approximate, device):
    inputs = [*linear_inputs((4, 197, 768), 3072, torch.bfloat16, device), approximate]
    check_backend("triton", "linear_gelu", inputs, dtype=torch.bfloat16)


@pytest.mark.cuda
def test_linear_gelu_split_k_backward_cuda(device):
    """Long reductions (B*197 rows) take the split-K path for the weight gradients."""
    inputs = [*linear_inputs((64, 197, 384), 768, torch.float16, device), "none"]
    check_backend("triton", "linear_gelu", inputs, dtype=torch.float16)


# ------------------------------------------------------------------- the cpp backend's cases
def _leaf(*shape, dtype=torch.float32, **kw):
    return rand(*shape, dtype=dtype, requires_grad=True, **kw)


ALL = [torch.float32, torch.bfloat16, torch.float16]


@needs_cpp
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
@pytest.mark.parametrize("batch", [1, 3, 0])
def test_linear_gelu_cpp(batch, approximate, dtype):
    x = _leaf(batch, 197, 200, dtype=dtype)
    w, b = _leaf(300, 200, dtype=dtype, std=0.1), _leaf(300, dtype=dtype)
    check_backend("cpp", "linear_gelu", [x, w, b, approximate], dtype=dtype)


@needs_cpp
def test_linear_gelu_cpp_noncontiguous_no_bias_and_inference():
    base = rand(2, 197, 400, requires_grad=True)
    check_backend("cpp", "linear_gelu", [base[..., ::2], _leaf(300, 200, std=0.1), None, "none"])
    x, w = rand(2, 197, 200), rand(300, 200, std=0.1)
    with torch.no_grad(), fk.backend("cpp"):  # the op without saved pre-activation
        fast = fk.linear_gelu(x, w, None)
    assert_parity("linear_gelu (no_grad)", fast, reference.linear_gelu(*upcast(x, w), None))


@needs_cpp
def test_linear_gelu_cpp_zero_in_features():
    # x @ W.T over an empty inner dimension is 0, so the output is GELU(bias) broadcast
    x, w, b = _leaf(2, 5, 0), _leaf(7, 0), _leaf(7)
    check_backend("cpp", "linear_gelu", [x, w, b, "none"])
    with torch.no_grad(), fk.backend("cpp"):
        fast = fk.linear_gelu(x.detach(), w.detach(), b.detach())
    assert_parity("linear_gelu (in_features=0, no_grad)", fast,
                  reference.linear_gelu(*upcast(x, w, b)))


@needs_cpp
@pytest.mark.parametrize("dtype", ALL)
def test_linear_quick_gelu_cpp_saturates_without_nan(dtype):
    """QuickGELU at pre-activations far beyond exp's range (|1.702 h| > 89 overflows fp32's
    exp): the output is h or 0, the gradient 1 or 0, never NaN; inference and training ops."""
    x = torch.tensor([[1.0], [-1.0], [0.5]], dtype=dtype)
    w = torch.tensor([[300.0], [-300.0], [0.0], [1e4], [-1e4], [2.0], [1.0], [-2.0]], dtype=dtype)
    b = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=dtype)
    grad = torch.ones(3, 8, dtype=dtype)
    with torch.no_grad(), fk.backend("cpp"):
        inference = fk.linear_gelu(x, w, b, "quick")
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with fk.backend("cpp"):
        training = fk.linear_gelu(*leaves, "quick")
    grads = torch.autograd.grad(training, leaves, grad)
    hi = upcast(*leaves)
    ref = reference.linear_gelu(*hi, "quick")
    ref_grads = torch.autograd.grad(ref, hi, upcast(grad))
    lowp = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    ref_low = reference.linear_gelu(*lowp, "quick")
    ref_low_grads = torch.autograd.grad(ref_low, lowp, grad)
    for name, fast, r_hi, r_low in [("out (inference)", inference, ref, ref_low), ("out", training, ref, ref_low),
                                    *zip(("dx", "dweight", "dbias"), grads, ref_grads, ref_low_grads)]:
        assert_parity(f"quick gelu {name}", fast, r_hi.detach(), r_low.detach())


@needs_cpp
@pytest.mark.parametrize("bias,approximate", [(True, "tanh"), (False, "tanh"), (True, "quick")])
def test_linear_gelu_cpp_inference_op_differentiated_anyway(bias, approximate):
    # The inference op keeps no pre-activation; its backward recomputes it.
    x, w, b = _leaf(2, 9, 40), _leaf(24, 40, std=0.1), _leaf(24) if bias else None
    grad = rand(2, 9, 24)
    fast = torch.autograd.grad(torch.ops.fastvit.linear_gelu(x, w, b, approximate),
                               [t for t in (x, w, b) if t is not None], grad)
    hi = upcast(x, w, b)
    ref = torch.autograd.grad(reference.linear_gelu(*hi, approximate), [t for t in hi if t is not None],
                              upcast(grad))
    for name, f, r in zip(("x", "weight", "bias"), fast, ref):
        assert_parity(f"linear_gelu (inference op) grad of {name}", f, r)


# ------------------------------------------------------------------------------- compile
def test_compile_fullgraph(device):
    """linear_gelu (forward and backward) traces without graph breaks and computes what
    eager does. CPU: aot_eager (inductor cannot lower an interpreted kernel); CUDA:
    inductor, fp16, at ViT-like sizes."""
    if device.type == "cuda":
        dtype, backend = torch.float16, "inductor"
        lin = linear_inputs((2, 197, 64), 128, dtype, device)
    else:
        dtype, backend = torch.float32, "aot_eager"
        lin = linear_inputs((2, 5, 24), 40, dtype, device)

    def fn(x, w, b):
        return fk.linear_gelu(x, w, b, "tanh")

    out = assert_compiled_matches_eager("linear_gelu", fn, lin, backend)
    assert out.dtype == dtype


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_cpp_inference_op_reduced_precision(dtype, approximate, bias):
    """The inference op in bf16 / fp16 (GELU as oneDNN's GEMM epilogue where oneDNN runs the
    dtype, else GEMM + the GELU pass): the parity rule against both references."""
    x, w = rand(3, 197, 200, dtype=dtype), rand(300, 200, dtype=dtype, std=0.1)
    b = rand(300, dtype=dtype) if bias else None
    with torch.no_grad(), fk.backend("cpp"):
        fast = fk.linear_gelu(x, w, b, approximate)
    assert fast.dtype == dtype and fast.is_contiguous()
    assert_parity(f"linear_gelu {dtype} {approximate} (no_grad)", fast,
                  reference.linear_gelu(*upcast(x, w, b), approximate), reference.linear_gelu(x, w, b, approximate))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["linear", "linear_gelu"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_cpp_prepacked_weights_are_never_stale(op, mode, dtype):
    """Inference ops pack a weight once for oneDNN (where it runs); the packed copy follows
    the weight: in-place updates, a new storage under the same tensor (``.data =``), and
    in-place updates of that storage are all seen."""
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    x = rand(2, 9, 40, dtype=dtype)
    w, b = rand(24, 40, dtype=dtype, std=0.1), rand(24, dtype=dtype)
    fn = getattr(fk, op)

    def expect():  # the same op on a fresh copy of the weight: no packed copy of it yet
        with context(), fk.backend("cpp"):
            return fn(x, w.clone(), b)

    def check():
        with context(), fk.backend("cpp"):
            torch.testing.assert_close(fn(x, w, b), expect(), rtol=0, atol=0)
            torch.testing.assert_close(fn(x, w, b), expect(), rtol=0, atol=0)  # from the packed copy

    check()
    w.mul_(-2.0)
    check()
    w.data = rand(24, 40, dtype=dtype, std=0.1)
    check()
    w[3].zero_()
    check()
