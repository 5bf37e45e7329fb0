"""LayerNorm and residual-add + LayerNorm on every backend: parity (forward and backward),
layouts, registration, dispatch, bad input.

The parity tests run each backend that can run here (triton under the Triton interpreter on
CPU, conftest sets TRITON_INTERPRET=1; cpp on CPU; torch) through the public API, judged by
``fastvit_kernels.testing.check_op`` (the parity rule: fp32 against the reference in fp64,
fp16/bf16 against the reference in fp32 with the reference's own low-precision error as the
yardstick). Then each backend's own cases: triton's launch variants and registration, cpp's
shapes and its rounded sum.
"""

import pytest
import torch
from op_backends import BACKENDS, needs_cpp
from op_backends import backend_device as _device

import fastvit_kernels as fk
from fastvit_kernels import reference
from fastvit_kernels.testing import assert_parity, check_backend, rand, upcast
from fastvit_kernels.triton import layer_norm as tln

EPS = 1e-6


def _inputs(shape, dtype, device, *, weight=True, bias=True, layout="contiguous"):
    """x, residual (non-zero mean, non-unit scale), weight, bias, and the upstream grads
    dnormed, dsummed, all fresh. ``layout="transposed"`` makes x, residual and the
    grads (T, B, D) -> (B, T, D) views; ``"strided_last"`` makes their last dim strided."""
    width = shape[-1]

    def act(mean, std):
        if layout == "transposed":
            return rand(shape[1], shape[0], *shape[2:], dtype=dtype, device=device,
                        mean=mean, std=std).transpose(0, 1)
        if layout == "strided_last":
            return rand(*shape[::-1], dtype=dtype, device=device, mean=mean, std=std).permute(
                *reversed(range(len(shape))))
        return rand(*shape, dtype=dtype, device=device, mean=mean, std=std)

    x = act(3.0, 2.5).requires_grad_()
    residual = act(-1.0, 0.7).requires_grad_()
    w = rand(width, dtype=dtype, device=device, mean=1.0, std=0.5, requires_grad=True) if weight else None
    b = rand(width, dtype=dtype, device=device, mean=0.3, std=0.4, requires_grad=True) if bias else None
    dnormed, dsummed = act(0.2, 1.5), act(-0.4, 0.8)
    return x, residual, w, b, dnormed, dsummed


def _check_parity(op, args, dtype, backend="triton", eps=EPS):
    """``op`` on ``backend`` vs the reference by the parity rule, on every output and the
    gradient of every input given (args: x, residual, weight, bias, dnormed, dsummed)."""
    x, residual, w, b, dnormed, dsummed = args
    if op == "layer_norm":
        inputs, grads_out = [x, w, b, eps], [dnormed]
    else:
        inputs, grads_out = [x, residual, w, b, eps], [dnormed, dsummed]
    return check_backend(backend, op, inputs, grads_out, dtype=dtype)


SHAPES = {
    "vit_b": (2, 197, 768),
    "one_row": (1, 1, 192),
    "odd_width": (3, 50, 200),
    "no_rows": (0, 768),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity(backend, op, shape, dtype, device):
    _check_parity(op, _inputs(shape, dtype, _device(backend, device)), dtype, backend)


@pytest.mark.parametrize("layout", ["transposed", "strided_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_non_contiguous(backend, op, dtype, layout, device):
    args = _inputs((3, 50, 200), dtype, _device(backend, device), layout=layout)
    assert not args[0].is_contiguous() and not args[4].is_contiguous()
    _check_parity(op, args, dtype, backend)


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_bf16(backend, op, device):
    # bf16 loads/stores upcast with .to(tl.float32) work under the interpreter too
    # (only bf16 tl.dot does not, and LayerNorm has none).
    _check_parity(op, _inputs((3, 50, 200), torch.bfloat16, _device(backend, device)), torch.bfloat16, backend)


@pytest.mark.parametrize("affine", ["weight_only", "bias_only", "none"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_without_affine(backend, op, affine, device):
    args = _inputs((3, 50, 200), torch.float32, _device(backend, device),
                   weight=affine == "weight_only", bias=affine == "bias_only")
    out = _check_parity(op, args, torch.float32, backend)
    # gradients come back for x (and residual) and for the one affine parameter given, if any
    grads = [name for name in out if name.startswith("grad")]
    assert len(grads) == (1 if op == "layer_norm" else 2) + (affine != "none"), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 197, 200), (1, 1, 192), (0, 64)], ids=["rows", "one_row", "no_rows"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_layer_scale(backend, shape, dtype, device):
    """add_layer_norm with LayerScale: residual + gamma * x, gamma's gradient included."""
    x, residual, w, b, dnormed, dsummed = _inputs(shape, dtype, _device(backend, device))
    # far from 1 (DINOv2 trains it from 1e-5 to values of both signs), so a dropped gamma fails
    gamma = rand(shape[-1], dtype=dtype, device=x.device, mean=0.2, std=0.6, requires_grad=True)
    out = check_backend(backend, "add_layer_norm", [x, residual, w, b, EPS, gamma], [dnormed, dsummed],
                        dtype=dtype)
    assert len([name for name in out if name.startswith("grad")]) == 5  # x, residual, w, b, gamma


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_layer_scale_non_contiguous_without_affine(backend, device):
    x, residual, _, _, dnormed, dsummed = _inputs((3, 50, 200), torch.float32, _device(backend, device),
                                                 layout="transposed")
    gamma = rand(200, device=x.device, mean=-0.5, requires_grad=True)
    check_backend(backend, "add_layer_norm", [x, residual, None, None, EPS, gamma], [dnormed, dsummed])


# ------------------------------------------------------------------- the cpp backend's cases
def _leaf(*shape, dtype=torch.float32, **kw):
    return rand(*shape, dtype=dtype, requires_grad=True, **kw)


def _noncontig(*shape, dtype=torch.float32, **kw):
    """A view of the given shape whose last dimension is strided."""
    base = rand(*shape[:-1], shape[-1] * 2, dtype=dtype, requires_grad=True, **kw)
    return base[..., ::2]


def _check_cpp(op, inputs, eps, dtype=torch.float32):
    """``op`` on the cpp backend (CPU) vs the reference, upstream gradients drawn by check_op."""
    check_backend("cpp", op, [*inputs, eps], dtype=dtype)


ALL = [torch.float32, torch.bfloat16, torch.float16]


@needs_cpp
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(2, 197, 200), (1, 7, 384), (0, 197, 200)])
def test_layer_norm_cpp(shape, dtype):
    dim = shape[-1]
    x = _leaf(*shape, dtype=dtype, mean=0.5, std=2.0)
    w, b = _leaf(dim, dtype=dtype, mean=1.0), _leaf(dim, dtype=dtype)
    _check_cpp("layer_norm", [x, w, b], 1e-5, dtype=dtype)


@needs_cpp
def test_layer_norm_cpp_noncontiguous_and_no_affine():
    _check_cpp("layer_norm", [_noncontig(3, 197, 200), None, None], 1e-6)
    _check_cpp("layer_norm", [_noncontig(1, 50, 200), _leaf(200), None], 1e-6)


@needs_cpp
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(2, 197, 200), (0, 5, 200)])
def test_add_layer_norm_cpp(shape, dtype):
    dim = shape[-1]
    x, r = _leaf(*shape, dtype=dtype, std=2.0), _leaf(*shape, dtype=dtype, mean=0.3)
    w, b = _leaf(dim, dtype=dtype, mean=1.0), _leaf(dim, dtype=dtype)
    _check_cpp("add_layer_norm", [x, r, w, b], 1e-6, dtype=dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_layer_norm_cpp_normalizes_the_rounded_sum(dtype):
    # In bf16/fp16 the returned sum is rounded to the dtype; the normalized output must be
    # LayerNorm of that rounded sum (what eager computes), not of the unrounded fp32 sum.
    shape, dim = (2, 197, 200), 200
    # a large mean over a small spread: rounding the sum moves it by a good part of its std
    x, r = rand(*shape, dtype=dtype, mean=100.0), rand(*shape, dtype=dtype, std=0.3)
    w, b = rand(dim, dtype=dtype, mean=1.0), rand(dim, dtype=dtype)
    with fk.backend("cpp"):
        normed, summed = fk.add_layer_norm(x, r, w, b, 1e-6)
    assert torch.equal(summed, x + r), "the sum must be x + residual rounded to the dtype"
    ref_hi = reference.layer_norm(*upcast(summed, w, b), 1e-6)
    ref_low = reference.layer_norm(summed, w, b, 1e-6)
    assert_parity("add_layer_norm normed vs layer_norm(summed)", normed, ref_hi, ref_low)


@needs_cpp
def test_add_layer_norm_cpp_gradient_through_the_sum_only():
    # The normalized output gets no gradient (None, not materialized): d(sum)/dx = identity.
    x, r, w, b = _leaf(2, 9, 40), _leaf(2, 9, 40), _leaf(40, mean=1.0), _leaf(40)
    grad = rand(2, 9, 40)
    with fk.backend("cpp"):
        _, summed = fk.add_layer_norm(x, r, w, b)
        dx, dr = torch.autograd.grad(summed, (x, r), grad)
    assert torch.equal(dx, grad) and torch.equal(dr, grad)


@needs_cpp
def test_add_layer_norm_cpp_noncontiguous_no_bias():
    _check_cpp("add_layer_norm", [_noncontig(1, 197, 200), _leaf(1, 197, 200), _leaf(200), None], 1e-6)


@needs_cpp
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(2, 197, 200), (3, 7, 13), (0, 5, 200)], ids=["rows", "tail", "no_rows"])
def test_add_layer_norm_cpp_layer_scale(shape, dtype):
    """residual + gamma * x: the fma'd sum, and gamma's gradient from per-thread partials
    (D = 13 leaves a scalar tail after the vector loop)."""
    dim = shape[-1]
    x, r = _leaf(*shape, dtype=dtype, std=2.0), _leaf(*shape, dtype=dtype, mean=0.3)
    w, b = _leaf(dim, dtype=dtype, mean=1.0), _leaf(dim, dtype=dtype)
    gamma = _leaf(dim, dtype=dtype, mean=0.2, std=0.6)
    check_backend("cpp", "add_layer_norm", [x, r, w, b, 1e-6, gamma], dtype=dtype)


@needs_cpp
def test_add_layer_norm_cpp_layer_scale_noncontiguous_frozen_and_no_affine():
    gamma = _leaf(200, mean=-0.5)
    check_backend("cpp", "add_layer_norm", [_noncontig(2, 50, 200), _leaf(2, 50, 200), None, None, 1e-6, gamma])
    # frozen gamma (DINOv2 fine-tuned with LayerScale fixed), frozen residual
    check_backend("cpp", "add_layer_norm", [_leaf(2, 50, 200), rand(2, 50, 200), _leaf(200), None, 1e-6,
                                            rand(200, mean=0.1)])
    # only gamma trains
    check_backend("cpp", "add_layer_norm", [rand(2, 50, 200), rand(2, 50, 200), rand(200), rand(200), 1e-6,
                                            _leaf(200, mean=0.1)])


@needs_cpp
def test_add_layer_norm_cpp_layer_scale_gradient_through_the_sum_only():
    # The normalized output gets no gradient: d(sum)/dx = gamma, d(sum)/dresidual = identity.
    x, r, w, gamma = _leaf(2, 9, 40), _leaf(2, 9, 40), _leaf(40, mean=1.0), _leaf(40, mean=0.3)
    grad = rand(2, 9, 40)
    with fk.backend("cpp"):
        _, summed = fk.add_layer_norm(x, r, w, None, 1e-6, gamma)
        dx, dr, dgamma = torch.autograd.grad(summed, (x, r, gamma), grad)
    assert torch.equal(dr, grad) and torch.equal(dx, grad * gamma.detach())
    assert_parity("dgamma", dgamma, (x.detach().double() * grad.double()).sum((0, 1)))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_layer_norm_cpp_layer_scale_normalizes_the_rounded_sum(dtype):
    # As without gamma: the normalized output is LayerNorm of the returned (rounded) sum.
    shape, dim = (2, 197, 200), 200
    x, r = rand(*shape, dtype=dtype, std=0.3), rand(*shape, dtype=dtype, mean=100.0)
    w, b, gamma = rand(dim, dtype=dtype, mean=1.0), rand(dim, dtype=dtype), rand(dim, dtype=dtype, mean=0.5)
    with fk.backend("cpp"):
        normed, summed = fk.add_layer_norm(x, r, w, b, 1e-6, gamma)
    hi = upcast(x, r, w, b, gamma)
    ref_sum = reference.add_layer_norm(*hi[:4], 1e-6, hi[4])[1]
    assert_parity("summed", summed, ref_sum, reference.add_layer_norm(x, r, w, b, 1e-6, gamma)[1])
    ref_hi = reference.layer_norm(*upcast(summed, w, b), 1e-6)
    assert_parity("add_layer_norm normed vs layer_norm(summed)", normed, ref_hi,
                  reference.layer_norm(summed, w, b, 1e-6))


# ------------------------------------------------------------------ the triton backend's cases
def test_layouts_and_launch_settings(device):
    """Row layouts (sliced, broadcast with zero stride, leading dims needing three strides)
    and the launch variants a GPU uses (one row per tile, more tiles than programs so
    they loop inside a program, few backward groups), on the launchers directly,
    against the fp64 reference."""
    width = 48
    base = rand(4, 6, 5, width, device=device, mean=2.0, std=3.0)
    cases = {  # name: (x, whether _rows must copy it)
        "sliced": (base[:, ::2, 1], False),                       # rows with a gap
        "broadcast": (rand(1, 5, width, device=device, mean=1.0).expand(3, 5, width), False),  # stride 0
        "two_strides": (base.transpose(0, 1)[:, :, 0], False),    # (6, 4) rows, strides 240, 1440
        "three_strides": (base.permute(2, 0, 1, 3)[:, ::2], True),  # strides 48, 2880, 240
        "one_dim": (rand(width, device=device, mean=-2.0, std=0.1), False),
    }
    w = rand(width, device=device, mean=1.0, std=0.5)
    b = rand(width, device=device, std=0.5)
    for name, (x, copied) in cases.items():
        rows = tln._rows(x)
        assert (rows[0].data_ptr() != x.data_ptr()) == copied, f"{name}: copied is {not copied}"
        if name == "two_strides":  # in place through both row strides
            assert rows[1:] == (4, 240, 1440), rows[1:]
        # the residual's last dimension is strided: the one layout that is copied
        residual = rand(*reversed(x.shape), device=device).permute(*reversed(range(x.dim())))
        dy = rand(*x.shape, device=device)
        for tile, programs, groups in ((None, None, None), (1, 3, 2)):
            kw = {"rows_per_tile": tile}
            y, s, mean, rstd = tln.layer_norm_forward(
                x, residual, w, b, EPS, max_programs=programs or tln.MAX_PROGRAMS, **kw)
            xd, rd, wd, bd = upcast(x, residual, w, b)
            ref_y, ref_s = reference.add_layer_norm(xd, rd, wd, bd, EPS)
            assert_parity(f"{name}.y", y, ref_y)
            assert_parity(f"{name}.summed", s, ref_s)
            assert_parity(f"{name}.mean", mean, ref_s.reshape(-1, width).mean(-1))
            dx, dw, db = tln.layer_norm_backward(dy, None, s, w, mean, rstd, True,
                                                 groups=groups, **kw)
            sd = ref_s.detach().requires_grad_()
            wd.requires_grad_()
            bd.requires_grad_()
            ref = torch.autograd.grad(reference.layer_norm(sd, wd, bd, EPS), (sd, wd, bd), dy.double())
            for gname, g, r in zip(("dx", "dw", "db"), (dx, dw, db), ref):
                assert_parity(f"{name}.{gname} (tile={tile}, groups={groups})", g, r)


def test_same_gradient_reaches_x_and_residual(device):
    x, residual, w, b, dnormed, dsummed = _inputs((2, 9, 64), torch.float32, device)
    with fk.backend("triton"):
        normed, summed = fk.add_layer_norm(x, residual, w, b, EPS)
    (normed * dnormed + summed * dsummed).sum().backward()
    torch.testing.assert_close(x.grad, residual.grad, rtol=0, atol=0)
    assert x.grad.data_ptr() != residual.grad.data_ptr()  # not aliased: safe to accumulate


def _opcheck_args(device, affine):
    x = rand(3, 7, 40, device=device, mean=1.5, std=2.0, requires_grad=True)
    residual = rand(3, 7, 40, device=device, requires_grad=True)
    w = rand(40, device=device, mean=1.0, requires_grad=True) if affine else None
    b = rand(40, device=device, requires_grad=True) if affine else None
    return x, residual, w, b


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_opcheck(affine, device):
    x, residual, w, b = _opcheck_args(device, affine)
    torch.library.opcheck(torch.ops.fastvit_triton.layer_norm.default, (x, w, b, EPS))
    torch.library.opcheck(torch.ops.fastvit_triton.add_layer_norm.default, (x, residual, w, b, EPS))
    # The backward op on its own (the forward checks above trace it only through fakes).
    y, mean, rstd = torch.ops.fastvit_triton.layer_norm(x.detach(), w, b, EPS)
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastvit_triton.layer_norm_backward.default,
                          (dy, torch.randn_like(y), x.detach(), None if w is None else w.detach(),
                           mean, rstd, affine))


def test_layer_scale_launch_settings(device):
    """LayerScale on the launchers directly, with the launch variants a GPU uses (one row
    per tile, more tiles than programs, few backward groups) and x as a two-stride view:
    the sum, and the gradients of residual, x, weight, bias and gamma, against fp64."""
    width = 40
    x = rand(6, 5, width, device=device, mean=1.0, std=2.0).transpose(0, 1)  # (5, 6, D), two strides
    residual = rand(5, 6, width, device=device, mean=-2.0)
    w, b = rand(width, device=device, mean=1.0, std=0.5), rand(width, device=device)
    gamma = rand(width, device=device, mean=0.1, std=0.7)
    dnormed, dsummed = rand(5, 6, width, device=device), rand(5, 6, width, device=device, std=0.5)
    xd, rd, wd, bd, gd = (t.requires_grad_() for t in upcast(x, residual, w, b, gamma))
    ref_y, ref_s = reference.add_layer_norm(xd, rd, wd, bd, EPS, gd)
    ref = torch.autograd.grad((ref_y, ref_s), (rd, xd, wd, bd, gd), (dnormed.double(), dsummed.double()))
    for tile, programs, groups in ((None, None, None), (1, 7, 3)):
        y, s, mean, rstd = tln.layer_norm_forward(x, residual, w, b, EPS, gamma=gamma, rows_per_tile=tile,
                                                  max_programs=programs or tln.MAX_PROGRAMS)
        assert_parity(f"y (tile={tile})", y, ref_y)
        assert_parity(f"summed (tile={tile})", s, ref_s)
        grads = tln.add_layer_norm_scaled_backward(dnormed, dsummed, s, x, gamma, w, mean, rstd, True,
                                                   rows_per_tile=tile, groups=groups)
        for name, g, r in zip(("dresidual", "dx", "dw", "db", "dgamma"), grads, ref):
            assert_parity(f"{name} (tile={tile}, groups={groups})", g, r)


def test_layer_scale_gradient_of_the_sum_alone(device):
    """Through the sum only: d residual = dS, d x = gamma * dS, d gamma = sum of x * dS."""
    x, residual, w, b, _, dsummed = _inputs((2, 9, 64), torch.float32, device)
    gamma = rand(64, device=device, mean=-0.3, requires_grad=True)
    with fk.backend("triton"):
        _, summed = fk.add_layer_norm(x, residual, w, b, EPS, gamma)
    dx, dr, dg = torch.autograd.grad(summed, (x, residual, gamma), dsummed)
    torch.testing.assert_close(dr, dsummed, rtol=0, atol=0)
    torch.testing.assert_close(dx, gamma.detach() * dsummed, rtol=0, atol=0)
    assert_parity("dgamma", dg, (x.detach().double() * dsummed.double()).sum((0, 1)))


def test_opcheck_layer_scale(device):
    x, residual, w, b = _opcheck_args(device, True)
    gamma = rand(40, device=device, mean=0.5, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvit_triton.add_layer_norm.default, (x, residual, w, b, EPS, gamma))
    torch.library.opcheck(torch.ops.fastvit_triton.add_layer_norm.default, (x, residual, None, None, EPS, gamma))
    _, summed, mean, rstd = torch.ops.fastvit_triton.add_layer_norm(x.detach(), residual.detach(), w.detach(),
                                                                     b.detach(), EPS, gamma.detach())
    for weight, has_bias in ((w.detach(), True), (None, False)):
        torch.library.opcheck(torch.ops.fastvit_triton.add_layer_norm_scaled_backward.default,
                              (torch.randn_like(summed), torch.randn_like(summed), summed, x.detach(),
                               gamma.detach(), weight, mean, rstd, has_bias))


def test_compile_fullgraph(device):
    """torch.compile traces the public ops (on the triton backend) and their backward
    without graph breaks, and the graph calls our ops."""
    x, residual, w, b = _opcheck_args(device, True)

    def block(x, residual, w, b):
        normed, summed = fk.add_layer_norm(x, residual, w, b, EPS)
        return fk.layer_norm(normed * 2.0, w, b, EPS) + summed

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    with fk.backend("triton"):
        expected = block(x, residual, w, b)
        ref_grads = torch.autograd.grad(expected.sum(), (x, residual, w, b))
        torch.compile(block, fullgraph=True, backend=record)(x, residual, w, b)
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(x, residual, w, b)
        grads = torch.autograd.grad(out.sum(), (x, residual, w, b))
    assert len(graphs) == 1 and "fastvit_triton.add_layer_norm" in graphs[0] \
        and "fastvit_triton.layer_norm" in graphs[0], graphs
    torch.testing.assert_close(out, expected)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_dispatch(device, monkeypatch):
    monkeypatch.delenv("FASTVIT_BACKEND", raising=False)
    x, residual, w, b = _opcheck_args(device, True)
    with fk.backend("triton"):
        for op in ("layer_norm", "add_layer_norm"):
            assert fk.resolved_backend(op, device) == "triton"
        normed = fk.layer_norm(x, w, b, EPS)
        pair = fk.add_layer_norm(x, residual, w, b, EPS)
    # The autograd node names the op that ran: ours, not the reference's.
    assert "fastvit_triton_layer_norm" in type(normed.grad_fn).__name__
    assert all("fastvit_triton_add_layer_norm" in type(t.grad_fn).__name__ for t in pair)
    # auto picks triton for CUDA tensors. (On CPU it tries cpp first; resolving it here
    # would charge this test with building the C++ extension, so it is left out.)
    if device.type == "cuda":
        with fk.backend("auto"):
            for op, args in (("layer_norm", (x, w, b, EPS)), ("add_layer_norm", (x, residual, w, b, EPS))):
                assert fk.resolved_backend(op, device, *args) == "triton"


def test_unsupported_calls_fall_back_or_raise(device):
    x64 = torch.randn(4, 32, dtype=torch.float64, device=device)
    wide = torch.empty(2, tln.MAX_WIDTH + 1, device="meta")
    with fk.backend("triton"):
        with pytest.raises(fk.BackendUnavailableError, match="float64"):
            fk.layer_norm(x64, None, None)
        with pytest.raises(fk.BackendUnavailableError, match="width"):
            fk.resolved_backend("add_layer_norm", device, wide, wide, None, None, EPS)
    if device.type == "cuda":  # auto (triton first on CUDA) falls back quietly, correctly
        with fk.backend("auto"):
            assert fk.resolved_backend("layer_norm", device, x64, None, None, EPS) != "triton"
            torch.testing.assert_close(fk.layer_norm(x64, None, None),
                                       reference.layer_norm(x64, None, None))


def test_bad_input_is_rejected(device):
    x = rand(2, 5, 16, device=device)
    with fk.backend("triton"):
        with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
            fk.layer_norm(x, torch.ones(15, device=device), None)
        with pytest.raises(TypeError, match="floating-point"):
            fk.layer_norm(x.to(torch.int32), None, None)
        with pytest.raises(ValueError, match="residual must have the shape"):
            fk.add_layer_norm(x, x[:, :4], None, None)
        with pytest.raises(ValueError, match="device"):
            fk.layer_norm(x, torch.ones(16, device="meta"), None)
        with pytest.raises(TypeError, match="dtype"):
            fk.layer_norm(x, torch.ones(16, dtype=torch.float16, device=device), None)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32_x", "bf16_x"])
def test_autocast_keeps_activation_dtype(x_dtype, device):
    """Under autocast (bf16) both backends keep the activations' dtype, and agree."""
    x, residual, w, b, dnormed, dsummed = _inputs((2, 9, 64), torch.float32, device)
    x, residual = x.detach().to(x_dtype), residual.detach().to(x_dtype)
    results = {}
    for name in ("triton", "torch"):
        with fk.backend(name), torch.autocast(device.type, dtype=torch.bfloat16):
            results[name] = (fk.layer_norm(x, w, b, EPS), *fk.add_layer_norm(x, residual, w, b, EPS))
    for fast, ref in zip(results["triton"], results["torch"]):
        assert fast.dtype == ref.dtype == x_dtype
    hi = upcast(x, residual, w.to(x_dtype), b.to(x_dtype))
    ref_hi = (reference.layer_norm(hi[0], *hi[2:], EPS), *reference.add_layer_norm(*hi, EPS))
    for i, (fast, ref, r_hi) in enumerate(zip(results["triton"], results["torch"], ref_hi)):
        assert_parity(f"autocast output {i}", fast, r_hi, ref)


@pytest.mark.cuda
def test_large_tensor_int64_offsets_and_many_rows(device):
    """More than 2**31 elements and more rows than MAX_PROGRAMS (GPU only: 4 GiB in bf16)."""
    width = 1024
    rows = 2**31 // width + 3
    x = torch.empty(rows, width, dtype=torch.bfloat16, device=device).normal_(2.0, 3.0)
    w = rand(width, dtype=torch.bfloat16, device=device, mean=1.0)
    y = tln.layer_norm(x, w, None, EPS)
    for part in (slice(0, 64), slice(rows - 64, rows)):
        hi = upcast(x[part], w)
        assert_parity("large.y", y[part], reference.layer_norm(hi[0], hi[1], None, EPS),
                      reference.layer_norm(x[part], w, None, EPS))


@pytest.mark.cuda
def test_layer_scale_bf16_cuda(device):
    """LayerScale at ViT-B/14 (DINOv2) size in bf16 on the GPU's launch settings."""
    x, residual, w, b, dnormed, dsummed = _inputs((8, 257, 768), torch.bfloat16, device)
    gamma = rand(768, dtype=torch.bfloat16, device=device, mean=0.1, std=0.5, requires_grad=True)
    check_backend("triton", "add_layer_norm", [x, residual, w, b, EPS, gamma], [dnormed, dsummed],
                  dtype=torch.bfloat16)
