"""Patch embedding (conv as GEMM, fused with the class token and position embedding) on
every backend, and the Triton im2col GEMM under it (gemm.py, patch_embed.py).

The parity tests run each backend that can run here (triton under the Triton interpreter on
CPU, conftest sets TRITON_INTERPRET=1, and on CUDA when there is one; cpp on CPU; torch)
through the public API, judged by ``fastvit_kernels.testing.check_op``. Under the
interpreter the shapes are the smallest that still cover the cases: K = 588, patch sizes
8/14/16/32, C = 1 and 3, channels-last images, class token or none. Then each backend's
own cases.
"""

import os

import pytest
import torch
from op_backends import BACKENDS, assert_compiled_matches_eager, needs_cpp
from op_backends import backend_device as _device

import fastvit_kernels as fk
from fastvit_kernels.testing import check_backend, rand

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastvit_kernels.triton import patch_embed as tpe  # noqa: E402

DTYPES = [torch.float32, torch.float16]


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


# ---------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_k588(backend, dtype, device):
    """Patch 14, C = 3: K = 588; 2 images of 2x3 patches; D = 40."""
    inputs = _patch_inputs(2, 3, 28, 42, 14, 40, dtype, _device(backend, device))
    check_backend(backend, "patch_embed", inputs, dtype=dtype)


PREFIX_CASES = {  # name: (class token, register tokens, prefix tokens have a position)
    "cls_reg4_no_embed_class": (True, 4, False),   # DINOv2 with registers
    "cls_no_embed_class": (True, 0, False),        # DeiT-III
    "cls_dist_embedded": (True, 1, True),          # DeiT distilled: class + distillation token
    "reg_only_embedded": (False, 2, True),
}


@pytest.mark.parametrize("case", list(PREFIX_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_prefix_tokens(backend, dtype, case, device):
    """Class and register tokens, with or without their own position embedding."""
    cls, regs, embedded = PREFIX_CASES[case]
    dev = _device(backend, device)
    images, weight, bias, _, cls_token = _patch_inputs(2, 3, 32, 48, 16, 24, dtype, dev, cls=cls)
    rows = 2 * 3 + (cls + regs if embedded else 0)
    pos = rand(1, rows, 24, dtype=dtype, device=dev, std=0.5, requires_grad=True)
    reg = rand(1, regs, 24, dtype=dtype, device=dev, requires_grad=True) if regs else None
    out = check_backend(backend, "patch_embed", [images, weight, bias, pos, cls_token, reg], dtype=dtype)
    assert out["out0"].shape == (2, cls + regs + 6, 24)


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
@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_layouts(backend, patch, chans, cls, channels_last, dtype, device):
    inputs = _patch_inputs(2, chans, patch, 2 * patch, patch, 24, dtype, _device(backend, device), cls=cls,
                           pos_2d=not cls, channels_last=channels_last)
    check_backend(backend, "patch_embed", inputs, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_frozen_images_and_no_bias(backend, device):
    """No bias, images without grad: the image-gradient GEMM is skipped."""
    images, weight, _, pos, cls = _patch_inputs(1, 3, 16, 16, 8, 16, torch.float32, _device(backend, device),
                                                image_grad=False)
    check_backend(backend, "patch_embed", [images, weight, None, pos, cls], dtype=torch.float32)


# ---------------------------------------------------------------- the triton backend's cases
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


@pytest.mark.parametrize("embedded", [True, False], ids=["embedded", "no_embed_class"])
def test_patch_embed_prefix_opcheck(embedded, device):
    """The op with class + register tokens, their positions given or not, and the
    gradient ops on an output gradient with 5 prefix rows."""
    images, weight, bias, _, cls = _patch_inputs(2, 3, 8, 16, 8, 16, torch.float32, device)
    reg = rand(1, 4, 16, device=device, requires_grad=True)
    pos = rand(1, 2 + (5 if embedded else 0), 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvit_triton.patch_embed.default, (images, weight, bias, pos, cls, reg))
    reg_only_pos = pos[:, 1:].detach().requires_grad_() if embedded else pos  # no class token: one row less
    torch.library.opcheck(torch.ops.fastvit_triton.patch_embed.default,
                          (images, weight, None, reg_only_pos, None, reg))
    grad = rand(2, 7, 16, device=device)
    torch.library.opcheck(torch.ops.fastvit_triton.patch_embed_weight_grad.default,
                          (grad, images.detach(), weight.detach()))
    torch.library.opcheck(torch.ops.fastvit_triton.patch_embed_images_grad.default,
                          (grad, weight.detach(), images.detach()))


@pytest.mark.parametrize("embedded", [True, False], ids=["embedded", "no_embed_class"])
def test_prefix_rows_of_more_images_than_row_blocks(embedded, device):
    """The (image, prefix row) pairs are dealt out to the row blocks in turn: with 2
    patches per image, 70 images' 4 prefix rows share 3 row blocks (64 rows each under
    the interpreter; on a GPU at least as few), so each program loops over many."""
    images, weight, bias, _, cls = _patch_inputs(70, 3, 8, 16, 8, 16, torch.float32, device, image_grad=False)
    reg = rand(1, 3, 16, device=device, requires_grad=True)
    pos = rand(1, 2 + (4 if embedded else 0), 16, device=device, std=0.5, requires_grad=True)
    out = check_backend("triton", "patch_embed", [images, weight, bias, pos, cls, reg])
    assert out["out0"].shape == (70, 6, 16)


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


def test_dispatch_and_supports(device):
    inputs = _patch_inputs(1, 3, 8, 8, 8, 16, torch.float32, device)
    with fk.backend("triton"):
        assert fk.resolved_backend("patch_embed", device, *inputs) == "triton"
    assert tpe.SUPPORTS["patch_embed"](*inputs) is None


@pytest.mark.cuda
def test_patch_embed_bf16_cuda(device):
    inputs = _patch_inputs(4, 3, 224, 224, 16, 768, torch.bfloat16, device, channels_last=True)
    check_backend("triton", "patch_embed", inputs, dtype=torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("embedded", [True, False], ids=["embedded", "no_embed_class"])
def test_patch_embed_registers_bf16_cuda(embedded, device):
    """DINOv2 with registers at ViT-B/14 size: class + 4 register tokens, positions for
    the patches only (no_embed_class) or for every token."""
    images, weight, bias, _, cls = _patch_inputs(4, 3, 224, 224, 14, 768, torch.bfloat16, device)
    reg = rand(1, 4, 768, dtype=torch.bfloat16, device=device, requires_grad=True)
    pos = rand(1, 256 + (5 if embedded else 0), 768, dtype=torch.bfloat16, device=device, std=0.5,
               requires_grad=True)
    check_backend("triton", "patch_embed", [images, weight, bias, pos, cls, reg], dtype=torch.bfloat16)


@pytest.mark.cuda
def test_patch_embed_split_k_backward_cuda(device):
    """Long reductions (B*197 rows) take the split-K path for the weight gradients."""
    inputs = _patch_inputs(64, 3, 224, 224, 16, 384, torch.float16, device)
    check_backend("triton", "patch_embed", inputs, dtype=torch.float16)


def test_compile_fullgraph(device):
    """patch_embed (forward and backward) traces without graph breaks and computes what
    eager does. CPU: aot_eager (inductor cannot lower an interpreted kernel); CUDA:
    inductor, fp16, at ViT-like sizes."""
    if device.type == "cuda":
        dtype, backend = torch.float16, "inductor"
        pe = _patch_inputs(2, 3, 32, 32, 16, 64, dtype, device, channels_last=True)
    else:
        dtype, backend = torch.float32, "aot_eager"
        pe = _patch_inputs(2, 3, 16, 16, 8, 24, dtype, device, channels_last=True)

    out = assert_compiled_matches_eager("patch_embed", fk.patch_embed, pe, backend)
    assert out.dtype == dtype


# ------------------------------------------------------------------- the cpp backend's cases
def _leaf(*shape, dtype=torch.float32, **kw):
    return rand(*shape, dtype=dtype, requires_grad=True, **kw)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,cls", [(2, True), (1, False), (0, True)])
def test_patch_embed_cpp(batch, cls, dtype):
    images = _leaf(batch, 3, 32, 48, dtype=dtype)
    weight, bias = _leaf(40, 3, 8, 8, dtype=dtype, std=0.1), _leaf(40, dtype=dtype)
    tokens = 4 * 6 + cls
    pos = _leaf(1, tokens, 40, dtype=dtype)
    cls_token = _leaf(1, 1, 40, dtype=dtype) if cls else None
    check_backend("cpp", "patch_embed", [images, weight, bias, pos, cls_token], dtype=dtype)


@needs_cpp
def test_patch_embed_cpp_channels_last_and_frozen_images():
    images = rand(2, 3, 32, 32).to(memory_format=torch.channels_last).requires_grad_(True)
    check_backend("cpp", "patch_embed", [images, _leaf(24, 3, 16, 16, std=0.1), None, _leaf(4, 24), None])
    # images without grad (the usual case): no image gradient computed, the rest still right
    check_backend("cpp", "patch_embed", [rand(2, 3, 32, 32), _leaf(24, 3, 16, 16, std=0.1), _leaf(24),
                                         _leaf(1, 5, 24), _leaf(1, 1, 24)])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(PREFIX_CASES))
@pytest.mark.parametrize("batch", [2, 0])
def test_patch_embed_cpp_prefix_tokens(batch, case, dtype):
    """Class, register and distillation tokens, with and without their own positions, bf16
    and no images included; 2-D pos_embed for the position-less prefix."""
    cls, regs, embedded = PREFIX_CASES[case]
    images = _leaf(batch, 3, 32, 48, dtype=dtype)
    weight, bias = _leaf(40, 3, 8, 8, dtype=dtype, std=0.1), _leaf(40, dtype=dtype)
    pos = _leaf(4 * 6 + (cls + regs if embedded else 0), 40, dtype=dtype)
    cls_token = _leaf(1, 1, 40, dtype=dtype) if cls else None
    reg = _leaf(1, regs, 40, dtype=dtype) if regs else None
    out = check_backend("cpp", "patch_embed", [images, weight, bias, pos, cls_token, reg], dtype=dtype)
    assert out["out0"].shape == (batch, cls + regs + 24, 40)


@needs_cpp
def test_patch_embed_cpp_prefix_tokens_channels_last_frozen_and_no_bias():
    images = rand(2, 3, 32, 32).to(memory_format=torch.channels_last).requires_grad_(True)
    check_backend("cpp", "patch_embed", [images, _leaf(24, 3, 16, 16, std=0.1), None, _leaf(1, 4, 24),
                                         _leaf(1, 1, 24), _leaf(1, 4, 24)])
    # frozen images and a frozen class token: only the registers, weight and pos train
    check_backend("cpp", "patch_embed", [rand(2, 3, 32, 32), _leaf(24, 3, 16, 16, std=0.1), _leaf(24),
                                         _leaf(1, 9, 24), rand(1, 1, 24), _leaf(1, 4, 24)])
