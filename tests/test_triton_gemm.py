"""Triton fused GEMMs (gemm.py, linear_gelu.py, patch_embed.py) against the reference.

Under the interpreter (no CUDA) the shapes are the smallest that still cover the cases:
M = 2*197 with K = 588 and N = 200, tails in every dimension, patch sizes 8/14/16/32,
C = 1 and 3, channels-last images, both GELU flavours, class token or none.
"""

import os

import pytest
import torch

import fastvit_kernels as fk
from fastvit_kernels import reference
from fastvit_kernels.testing import assert_parity, high_precision, rand, upcast

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastvit_kernels.triton import gemm as tg  # noqa: E402
from fastvit_kernels.triton import linear_gelu as tlg  # noqa: E402
from fastvit_kernels.triton import patch_embed as tpe  # noqa: E402

DTYPES = [torch.float32, torch.float16]


def _wrt(args):
    return [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]


def _check(name, fast_fn, ref_fn, inputs, dtype):
    """Output and every input gradient of fast_fn vs the reference ref_fn, by the parity rule."""
    out = fast_fn(*inputs)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, _wrt(inputs), grad)

    def run_ref(args, g):
        o = ref_fn(*args)
        return o, torch.autograd.grad(o, _wrt(args), g)

    hi_args = [upcast(t)[0] if isinstance(t, torch.Tensor) else t for t in inputs]
    out_hi, grads_hi = run_ref(hi_args, grad.to(high_precision(dtype)))
    out_lo, grads_lo = out_hi, grads_hi
    if dtype != torch.float32:
        lo_args = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                   for t in inputs]
        out_lo, grads_lo = run_ref(lo_args, grad)
    assert out.dtype == dtype
    assert_parity(f"{name} out", out, out_hi, out_lo)
    assert len(grads) == len(grads_hi)
    for i, (g, g_hi, g_lo) in enumerate(zip(grads, grads_hi, grads_lo)):
        assert g.dtype == dtype
        assert_parity(f"{name} grad {i}", g, g_hi, g_lo)


# ----------------------------------------------------------------------------- linear_gelu
def _linear_inputs(shape, out_features, dtype, device, bias=True):
    k = shape[-1]
    x = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    w = rand(out_features, k, dtype=dtype, device=device, std=k ** -0.5, requires_grad=True)
    b = rand(out_features, dtype=dtype, device=device, std=0.5, requires_grad=True) if bias else None
    return x, w, b


def _fk_linear_gelu(x, w, b, approximate):
    with fk.backend("triton"):
        return fk.linear_gelu(x, w, b, approximate)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gelu_vit_rows(dtype, device):
    """M = 2*197 token rows, K = 588 (14*14*3), N = 200: tails in every dimension."""
    approximate = "none" if dtype == torch.float32 else "tanh"
    inputs = [*_linear_inputs((2, 197, 588), 200, dtype, device), approximate]
    _check("linear_gelu", _fk_linear_gelu, reference.linear_gelu, inputs, dtype)


@pytest.mark.parametrize("dtype,approximate,bias", [(torch.float32, "tanh", False),
                                                    (torch.float16, "none", True)])
def test_linear_gelu_small(dtype, approximate, bias, device):
    inputs = [*_linear_inputs((3, 7, 40), 24, dtype, device, bias=bias), approximate]
    _check("linear_gelu", _fk_linear_gelu, reference.linear_gelu, inputs, dtype)


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


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_recompute_backward(approximate, device):
    """The inference op under autograd recomputes z; its epilogue forms dZ = dY * GELU'(z)."""
    inputs = [*_linear_inputs((2, 5, 24), 40, torch.float32, device), approximate]
    _check("linear_gelu(recompute)", torch.ops.fastvit_triton.linear_gelu, reference.linear_gelu,
           inputs, torch.float32)


def test_linear_gelu_inference_saves_nothing(device):
    x, w, b = _linear_inputs((4, 16), 24, torch.float32, device)
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
    x, w, b = _linear_inputs((2, 3, 16), 24, torch.float32, device)
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu_train.default, (x, w, b, "none"))
    torch.library.opcheck(torch.ops.fastvit_triton.linear_gelu.default, (x, w, None, "tanh"))


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


# ----------------------------------------------------------------------------- patch_embed
def _patch_inputs(batch, chans, height, width, patch, dim, dtype, device, cls=True, pos_2d=False,
                  channels_last=False, image_grad=True):
    images = rand(batch, chans, height, width, dtype=dtype, device=device)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    images.requires_grad_(image_grad)
    fan_in = chans * patch * patch
    weight = rand(dim, chans, patch, patch, dtype=dtype, device=device, std=fan_in ** -0.5,
                  requires_grad=True)
    bias = rand(dim, dtype=dtype, device=device, std=0.5, requires_grad=True)
    tokens = (height // patch) * (width // patch) + cls
    pos_shape = (tokens, dim) if pos_2d else (1, tokens, dim)
    pos = rand(*pos_shape, dtype=dtype, device=device, std=0.5, requires_grad=True)
    cls_token = rand(1, 1, dim, dtype=dtype, device=device, requires_grad=True) if cls else None
    return [images, weight, bias, pos, cls_token]


def _fk_patch_embed(*args):
    with fk.backend("triton"):
        return fk.patch_embed(*args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_embed_k588(dtype, device):
    """Patch 14, C = 3: K = 588; 2 images of 2x3 patches; D = 40."""
    inputs = _patch_inputs(2, 3, 28, 42, 14, 40, dtype, device)
    _check("patch_embed", _fk_patch_embed, reference.patch_embed, inputs, dtype)


def test_patch14_weight_rows_get_an_aligned_stride(device):
    """K = 588 rows are copied to a stride of 592 (a multiple of 16, so that the
    compiler can vectorise their loads); K = 768 rows are used in place."""
    w14 = rand(8, 3, 14, 14, device=device)
    rows = tpe._weight_rows(w14)
    assert rows.shape == (8, 588) and rows.stride() == (592, 1)
    assert torch.equal(rows, w14.reshape(8, 588))
    w16 = rand(8, 3, 16, 16, device=device)
    assert tpe._weight_rows(w16).data_ptr() == w16.data_ptr()


@pytest.mark.parametrize("patch,chans,cls,channels_last,dtype", [
    (8, 3, False, True, torch.float32),
    (16, 1, True, True, torch.float16),
    (32, 3, True, False, torch.float32),
])
def test_patch_embed_layouts(patch, chans, cls, channels_last, dtype, device):
    inputs = _patch_inputs(2, chans, patch, 2 * patch, patch, 24, dtype, device, cls=cls,
                           pos_2d=not cls, channels_last=channels_last)
    _check("patch_embed", _fk_patch_embed, reference.patch_embed, inputs, dtype)


def test_patch_embed_frozen_images_and_no_bias(device):
    """No bias, images without grad: the image-gradient GEMM is skipped."""
    images, weight, _, pos, cls = _patch_inputs(1, 3, 16, 16, 8, 16, torch.float32, device,
                                                image_grad=False)
    inputs = [images, weight, None, pos, cls]
    _check("patch_embed", _fk_patch_embed, reference.patch_embed, inputs, torch.float32)


def test_patch_embed_opcheck(device):
    inputs = _patch_inputs(2, 3, 8, 16, 8, 16, torch.float32, device, channels_last=True)
    torch.library.opcheck(torch.ops.fastvit_triton.patch_embed.default, tuple(inputs))


@pytest.mark.parametrize("channels_last,cls", [(True, True), (False, False)])
def test_patch_embed_backward_opcheck(channels_last, cls, device):
    """The hand-written fakes of the gradient ops (image gradient in the images' layout)."""
    images, weight, *_ = _patch_inputs(2, 3, 8, 16, 8, 16, torch.float32, device, cls=cls,
                                       channels_last=channels_last, image_grad=False)
    weight = weight.detach()
    grad = rand(2, 2 + cls, 16, device=device)
    torch.library.opcheck(torch.ops.fastvit_triton.patch_embed_weight_grad.default, (grad, images, weight))
    torch.library.opcheck(torch.ops.fastvit_triton.patch_embed_images_grad.default, (grad, weight, images))


# ------------------------------------------------------------------------- errors, dispatch
def test_bad_input_is_rejected_before_any_kernel(device):
    images, weight, bias, pos, cls = _patch_inputs(1, 3, 16, 16, 8, 16, torch.float32, device)
    with fk.backend("triton"):
        with pytest.raises(ValueError, match="not divisible by the patch size 8"):
            fk.patch_embed(rand(1, 3, 16, 12, device=device), weight, bias, pos, cls)
        with pytest.raises(ValueError, match="channels"):
            fk.patch_embed(rand(1, 1, 16, 16, device=device), weight, bias, pos, cls)
        with pytest.raises(ValueError, match="pos_embed must have shape"):
            fk.patch_embed(images, weight, bias, pos, None)
        with pytest.raises(TypeError, match="dtype"):
            fk.patch_embed(images, weight.half(), bias, pos, cls)
        with pytest.raises(ValueError, match="in_features"):
            fk.linear_gelu(rand(4, 8, device=device), rand(16, 9, device=device), None)
        with pytest.raises(TypeError, match="dtype"):
            fk.linear_gelu(rand(4, 8, device=device), rand(16, 8, device=device).half(), None)


def test_dispatch_and_supports(device):
    x, w, b = _linear_inputs((4, 16), 24, torch.float32, device)
    with fk.backend("triton"):
        assert fk.resolved_backend("linear_gelu", device, x, w, b) == "triton"
    assert tlg.SUPPORTS["linear_gelu"](x.double(), w.double(), None) is not None
    assert tpe.SUPPORTS["patch_embed"](*_patch_inputs(1, 3, 8, 8, 8, 16, torch.float32, device)) is None
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


# ------------------------------------------------------------------------------- GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_bf16_cuda(approximate, device):
    inputs = [*_linear_inputs((4, 197, 768), 3072, torch.bfloat16, device), approximate]
    _check("linear_gelu", _fk_linear_gelu, reference.linear_gelu, inputs, torch.bfloat16)


@pytest.mark.cuda
def test_patch_embed_bf16_cuda(device):
    inputs = _patch_inputs(4, 3, 224, 224, 16, 768, torch.bfloat16, device, channels_last=True)
    _check("patch_embed", _fk_patch_embed, reference.patch_embed, inputs, torch.bfloat16)


@pytest.mark.cuda
def test_split_k_backward_cuda(device):
    """Long reductions (B*197 rows) take the split-K path for the weight gradients."""
    inputs = _patch_inputs(64, 3, 224, 224, 16, 384, torch.float16, device)
    _check("patch_embed", _fk_patch_embed, reference.patch_embed, inputs, torch.float16)
    inputs = [*_linear_inputs((64, 197, 384), 768, torch.float16, device), "none"]
    _check("linear_gelu", _fk_linear_gelu, reference.linear_gelu, inputs, torch.float16)


def test_compile_fullgraph(device):
    """linear_gelu and patch_embed (forward and backward) trace without graph breaks and
    compute what eager does. CPU: aot_eager (inductor cannot lower an interpreted kernel);
    CUDA: inductor, fp16, at ViT-like sizes."""
    if device.type == "cuda":
        dtype, backend = torch.float16, "inductor"
        lin = _linear_inputs((2, 197, 64), 128, dtype, device)
        pe = _patch_inputs(2, 3, 32, 32, 16, 64, dtype, device, channels_last=True)
    else:
        dtype, backend = torch.float32, "aot_eager"
        lin = _linear_inputs((2, 5, 24), 40, dtype, device)
        pe = _patch_inputs(2, 3, 16, 16, 8, 24, dtype, device, channels_last=True)

    def fn(x, w, b, *pe_args):
        return fk.linear_gelu(x, w, b, "tanh"), fk.patch_embed(*pe_args)

    leaves = _wrt([*lin, *pe])
    with fk.backend("triton"):
        expected = fn(*lin, *pe)
        out = torch.compile(fn, fullgraph=True, backend=backend)(*lin, *pe)
    grads_out = [torch.randn_like(t) for t in expected]
    ref_grads = torch.autograd.grad(expected, leaves, grads_out)
    grads = torch.autograd.grad(out, leaves, grads_out)
    assert len(grads) == 8
    for name, a, e in zip(("linear_gelu", "patch_embed"), out, expected):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g, r, msg=lambda m, i=i: f"grad {i}: {m}")
