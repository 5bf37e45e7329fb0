"""Linear (``x @ weight.T + bias``, no activation) on every backend.

Parity through the public API on each backend that runs here (triton under the Triton
interpreter on CPU, fp32/fp16; cpp in fp32, bf16 and fp16; torch), judged by
``fastvit_kernels.testing.check_backend``; then the awkward cases (no bias, strided input,
batch 0, no in_features, gradients for some inputs only), opcheck and bad input.
"""

import os

import pytest
import torch
from op_backends import BACKENDS, assert_compiled_matches_eager, linear_inputs, needs_cpp
from op_backends import backend_device as _device

import fastvit_kernels as fk
from fastvit_kernels import reference
from fastvit_kernels.testing import assert_parity, check_backend, rand, upcast

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = [torch.float32, torch.float16]


# ---------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_vit_rows(backend, dtype, device):
    """M = 2*197 token rows, K = 588, N = 200: tails in every dimension."""
    inputs = linear_inputs((2, 197, 588), 200, dtype, _device(backend, device))
    check_backend(backend, "linear", inputs, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_no_bias(backend, device):
    check_backend(backend, "linear", linear_inputs((3, 7, 40), 24, torch.float32, _device(backend, device), bias=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_strided_input(backend, device):
    """Every other feature of a wider tensor, and a transposed 2-D view."""
    dev = _device(backend, device)
    base = rand(2, 9, 80, device=dev)
    x = base[..., ::2].requires_grad_()
    check_backend(backend, "linear", [x, *linear_inputs((40,), 24, torch.float32, dev)[1:]])
    xt = rand(40, 9, device=dev).t().requires_grad_()  # (9, 40), strides (1, 9)
    check_backend(backend, "linear", [xt, *linear_inputs((40,), 24, torch.float32, dev)[1:]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_batch_zero(backend, device):
    inputs = linear_inputs((0, 197, 40), 24, torch.float32, _device(backend, device))
    results = check_backend(backend, "linear", inputs)
    assert results["out0"].shape == (0, 197, 24)
    assert torch.equal(results["grad2"], torch.zeros_like(results["grad2"]))  # no rows: no bias gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_zero_in_features(backend, device):
    """An empty product: the output is the bias, broadcast."""
    x, w, b = linear_inputs((2, 5, 0), 7, torch.float32, _device(backend, device))
    results = check_backend(backend, "linear", [x, w, b])
    assert torch.equal(results["out0"], b.detach().expand(2, 5, 7))


@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "weight+bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_some_gradients(backend, wanted, device):
    """Only the inputs that require grad get one (a frozen weight, a linear probe's head)."""
    x, w, b = (t.detach() for t in linear_inputs((2, 9, 40), 24, torch.float32, _device(backend, device)))
    names = {"x": x, "weight": w, "bias": b}
    for name in wanted.split("+"):
        names[name].requires_grad_()
    check_backend(backend, "linear", [x, w, b])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_linear_cpp_dtypes(batch, dtype):
    """bf16 / fp16 run on oneDNN where this CPU has the instructions, on ATen otherwise."""
    check_backend("cpp", "linear", linear_inputs((batch, 197, 384), 1152, dtype, "cpu"), dtype=dtype)


def test_linear_inference_saves_nothing(device):
    for backend in ("triton", "cpp", "torch"):
        if not fk.available_backends()[backend].available:
            continue
        x, w, b = (t.detach() for t in linear_inputs((4, 16), 24, torch.float32, _device(backend, device)))
        with torch.no_grad(), fk.backend(backend):
            out = fk.linear(x, w, b)
        assert out.grad_fn is None
        assert_parity(f"linear[{backend}] (no_grad)", out, reference.linear(*upcast(x, w, b)))


def test_linear_autocast_is_a_matrix_product():
    """Under CPU autocast the inputs are cast to bf16 and the result is bf16, as F.linear's."""
    x, w, b = (t.detach() for t in linear_inputs((3, 40), 24, torch.float32, "cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16), fk.backend("torch"):
        out = fk.linear(x, w, b)
        eager = torch.nn.functional.linear(x, w, b)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert_parity("linear (autocast)", out, reference.linear(*upcast(x, w, b)),
                  reference.linear(*(t.bfloat16() for t in (x, w, b))))


# ------------------------------------------------------------------------------ opcheck
def test_linear_triton_opcheck(device):
    x, w, b = linear_inputs((2, 3, 16), 24, torch.float32, device)
    torch.library.opcheck(torch.ops.fastvit_triton.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.fastvit_triton.linear.default, (x, w, None))
    xt = rand(16, 2, 3, device=device).permute(1, 2, 0)  # (2, 3, 16), not contiguous
    grad = rand(2, 3, 24, device=device)
    for flags in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(torch.ops.fastvit_triton.linear_backward.default, (grad, xt, w.detach(), *flags))


@needs_cpp
def test_linear_cpp_opcheck():
    x, w, b = linear_inputs((2, 3, 16), 24, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastvit.linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.fastvit.linear.default, (x, w, None))
    xt = rand(16, 2, 3).permute(1, 2, 0)
    grad = rand(2, 3, 24)
    for flags in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(torch.ops.fastvit.linear_bwd.default, (grad, xt, w.detach(), *flags))


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_bad_input(backend, device):
    dev = _device(backend, device)
    with fk.backend(backend):
        with pytest.raises(ValueError, match=r"in_features 9 .* got x of shape \(4, 8\)"):
            fk.linear(rand(4, 8, device=dev), rand(16, 9, device=dev), None)
        with pytest.raises(ValueError, match=r"bias must have shape \(16,\), got \(15,\)"):
            fk.linear(rand(4, 8, device=dev), rand(16, 8, device=dev), rand(15, device=dev))
        with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has torch.float32"):
            fk.linear(rand(4, 8, device=dev), rand(16, 8, device=dev).half(), None)
        with pytest.raises(ValueError, match="weight must have 2 dimensions, got shape"):
            fk.linear(rand(4, 8, device=dev), rand(16, 8, 1, device=dev), None)


@needs_cpp
def test_linear_cpp_op_checks_its_arguments():
    """torch.ops.fastvit.* called directly (no Python checks) fails loudly, naming the values."""
    with pytest.raises(RuntimeError, match=r"fastvit::linear: x's last dimension must be 9"):
        torch.ops.fastvit.linear(rand(4, 8), rand(16, 9), None)
    with pytest.raises(RuntimeError, match=r"fastvit::linear: bias must have shape \[16\], got \[15\]"):
        torch.ops.fastvit.linear(rand(4, 8), rand(16, 8), rand(15))
    with pytest.raises(RuntimeError, match=r"fastvit::linear_bwd: grad_out must have shape \[4, 16\]"):
        torch.ops.fastvit.linear_bwd(rand(4, 15), rand(4, 8), rand(16, 8), True, True, True)


def test_linear_triton_dispatch(device):
    x, w, b = (t.detach() for t in linear_inputs((4, 16), 24, torch.float32, device))
    with fk.backend("triton"):
        assert fk.resolved_backend("linear", device, x, w, b) == "triton"
    if device.type == "cpu":  # the interpreter multiplies bf16 bit patterns in tl.dot
        with fk.backend("triton"), pytest.raises(fk.BackendUnavailableError, match="bfloat16"):
            fk.linear(x.bfloat16(), w.bfloat16(), None)


@pytest.mark.cuda
def test_linear_bf16_cuda(device):
    check_backend("triton", "linear", linear_inputs((4, 197, 768), 2304, torch.bfloat16, device), dtype=torch.bfloat16)


# ------------------------------------------------------------------------------- compile
def test_linear_compile_fullgraph(device):
    """Forward and backward trace without graph breaks (CPU: aot_eager, the interpreter
    cannot be lowered by inductor; CUDA: inductor, fp16)."""
    dtype, backend = (torch.float16, "inductor") if device.type == "cuda" else (torch.float32, "aot_eager")
    inputs = linear_inputs((2, 5, 24), 40, dtype, device)
    out = assert_compiled_matches_eager("linear", fk.linear, inputs, backend)
    assert out.dtype == dtype
