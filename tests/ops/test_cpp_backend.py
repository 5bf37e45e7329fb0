"""The cpp backend as a whole (csrc/, loaded by fastvit_kernels/_cpp.py): it builds, its C++
input checks, its autograd (csrc/autograd.cpp) with absent and frozen inputs, opcheck on
every ``fastvit::`` op, torch.compile(fullgraph=True) of a function using all of them, and
the fallback when the extension cannot be built. Each op's parity cases on this backend are
in tests/ops/test_<op>.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvit_kernels as fk
from fastvit_kernels import reference
from fastvit_kernels.testing import check_backend, rand

CPP = fk.available_backends()["cpp"]
HAVE_TOOLCHAIN = shutil.which(os.environ.get("CXX", "c++")) is not None and shutil.which("ninja") is not None
needs_cpp = pytest.mark.skipif(not CPP.available, reason=f"cpp backend unavailable: {CPP.reason}")


def test_cpp_backend_builds_where_a_compiler_exists():
    if not HAVE_TOOLCHAIN:
        pytest.skip("no C++ compiler or ninja here: the cpp backend is expected to be unavailable")
    assert CPP.available, f"cpp backend failed to load although a toolchain exists: {CPP.reason}"
    assert set(CPP.ops) == set(reference.OPS)
    from fastvit_kernels import _cpp

    assert torch.ops.fastvit.cpu_capability() == _cpp.CAPABILITY == _cpp.target_capability()


# ------------------------------------------------------------------------------ helpers
def check(op: str, inputs, *args, dtype=torch.float32):
    """op on the cpp backend vs the reference by the parity rule (testing.check_op): outputs
    and the gradients of the inputs needing grad. inputs: tensors (or None) already in
    ``dtype``; args: the op's non-tensor arguments."""
    check_backend("cpp", op, [*inputs, *args], dtype=dtype)


def _leaf(*shape, dtype=torch.float32, **kw):
    return rand(*shape, dtype=dtype, requires_grad=True, **kw)


# ------------------------------------------------------------------ input checks in C++
@needs_cpp
def test_cpp_ops_reject_bad_input_with_clear_messages():
    ops = torch.ops.fastvit
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[8\], got \[7\]"):
        ops.layer_norm_fwd(x, torch.randn(7), None, 1e-6)
    with pytest.raises(RuntimeError, match="has dtype Double but x has Float"):
        ops.layer_norm_fwd(x, torch.randn(8, dtype=torch.float64), None, 1e-6)
    with pytest.raises(RuntimeError, match="x's last dimension must be 9"):
        ops.linear_gelu(x, torch.randn(4, 9), None, "none")
    with pytest.raises(RuntimeError, match="approximate must be 'none', 'tanh' or 'quick', got 'fast'"):
        ops.linear_gelu(x, torch.randn(4, 8), None, "fast")
    with pytest.raises(RuntimeError, match=r"gamma must have shape \[8\], got \[7\]"):
        ops.add_layer_norm_fwd(x, x, None, None, 1e-6, torch.randn(7))
    with pytest.raises(RuntimeError, match="not divisible by the patch size 5"):
        ops.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 5, 5), None, torch.randn(1, 1, 4), None)
    images, patch_w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"prefix must have shape \(1, n, 4\) with n >= 1, got \[1, 2, 3\]"):
        ops.patch_embed(images, patch_w, None, torch.randn(1, 4, 4), torch.randn(1, 2, 3))
    with pytest.raises(RuntimeError, match=r"pos_embed must have 6 or 4 rows of 4 .*got shape \[1, 5, 4\]"):
        ops.patch_embed(images, patch_w, None, torch.randn(1, 5, 4), torch.randn(1, 2, 4))
    with pytest.raises(RuntimeError, match="must be 3 \\* num_heads \\* head_dim with num_heads=4"):
        ops.packed_attention_fwd(torch.randn(1, 5, 18), 4, 1.0)
    with pytest.raises(RuntimeError, match="must be floating point"):
        ops.attention_fwd(*(torch.ones(1, 1, 2, 4, dtype=torch.int32),) * 3, 1.0)


# -------------------------------------------------------- autograd (csrc/autograd.cpp)
@needs_cpp
def test_gradients_with_absent_and_frozen_inputs():
    # Autograd numbers only the tensor inputs that are present (an absent weight or bias
    # is no input to it) when it says which inputs need a gradient: an input missing in
    # front of a present one, or a frozen one, must not shift gradients onto other inputs.
    check("layer_norm", [_leaf(2, 9, 40), None, _leaf(40)], 1e-6)
    check("layer_norm", [rand(2, 9, 40), None, _leaf(40)], 1e-6)
    check("add_layer_norm", [_leaf(2, 9, 40), rand(2, 9, 40), None, _leaf(40)], 1e-6)
    check("linear_gelu", [_leaf(2, 9, 40), rand(24, 40, std=0.1), _leaf(24)], "tanh")
    check("patch_embed", [rand(2, 3, 32, 32), _leaf(24, 3, 16, 16, std=0.1), None, _leaf(5, 24), _leaf(1, 1, 24)])
    # LayerScale after absent weight and bias; register tokens after an absent class token
    check("add_layer_norm", [rand(2, 9, 40), _leaf(2, 9, 40), None, None, 1e-6, _leaf(40)])
    check("add_layer_norm", [_leaf(2, 9, 40), rand(2, 9, 40), None, _leaf(40), 1e-6, rand(40)])
    check("patch_embed", [rand(2, 3, 32, 32), rand(24, 3, 16, 16, std=0.1), None, _leaf(4, 24), None, _leaf(1, 2, 24)])
    check("packed_attention", [_leaf(1, 9, 3 * 2 * 8)], 2)


@needs_cpp
def test_autograd_formulas_are_the_cpp_ones():
    # Registered in C++ (a Python autograd.Function around every call cost tens of
    # microseconds), so the graph holds C++ nodes.
    x, w = _leaf(2, 9, 40), _leaf(40)
    with fk.backend("cpp"):
        outs = [fk.layer_norm(x, w, None), *fk.add_layer_norm(x, x, w, None), fk.linear_gelu(x, _leaf(8, 40), None),
                *fk.add_layer_norm(x, x, w, None, 1e-6, w), fk.linear_gelu(x, _leaf(8, 40), None, "quick"),
                fk.patch_embed(_leaf(1, 3, 8, 8), _leaf(4, 3, 4, 4), None, _leaf(4, 4), _leaf(1, 1, 4), _leaf(1, 2, 4)),
                fk.patch_embed(_leaf(1, 3, 8, 8), _leaf(4, 3, 4, 4), None, _leaf(4, 4)),
                fk.attention(*[_leaf(1, 2, 5, 8)] * 3), fk.packed_attention(_leaf(1, 5, 24), 2),
                torch.ops.fastvit.linear_gelu(x, _leaf(8, 40), None, "none")]
    for out in outs:
        assert type(out.grad_fn).__name__ == "CppFunction", out.grad_fn


# ------------------------------------------------------------- opcheck and torch.compile
def _opcheck_cases():
    def g(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    x = g(2, 7, 24)
    mean = torch.randn(2, 7)
    rstd = torch.rand(2, 7) + 0.5
    qkv = g(2, 9, 3 * 2 * 8)
    q = g(1, 2, 9, 8)
    return {
        "layer_norm_fwd": [(x, g(24), g(24), 1e-6), (x, None, None, 1e-5)],
        "add_layer_norm_fwd": [(x, g(2, 7, 24), g(24), None, 1e-6), (x, g(2, 7, 24), g(24), g(24), 1e-6, g(24)),
                               (x, g(2, 7, 24), None, None, 1e-6, g(24))],
        "layer_norm_bwd": [(torch.randn(2, 7, 24), torch.randn(2, 7, 24), torch.randn(2, 7, 24), mean, rstd,
                            torch.randn(24)), (torch.randn(2, 7, 24), None, torch.randn(2, 7, 24), mean, rstd, None)],
        "add_layer_norm_bwd": [(torch.randn(2, 7, 24), torch.randn(2, 7, 24), torch.randn(2, 7, 24), mean, rstd,
                                torch.randn(24), torch.randn(2, 7, 24), torch.randn(24)),
                               (torch.randn(2, 7, 24), None, torch.randn(2, 7, 24), mean, rstd, None,
                                torch.randn(2, 7, 24), torch.randn(24))],
        "linear_gelu": [(g(3, 24), g(16, 24), g(16), "none"), (g(3, 24), g(16, 24), None, "quick")],
        "linear_gelu_fwd": [(g(2, 3, 24), g(16, 24), None, "tanh"), (g(3, 24), g(16, 24), g(16), "none"),
                            (g(3, 24), g(16, 24), g(16), "quick")],
        "linear_gelu_bwd": [(torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 24), torch.randn(16, 24), "none"),
                            (torch.randn(3, 16), torch.randn(3, 16), torch.randn(3, 24), torch.randn(16, 24), "quick")],
        "patch_embed": [(g(2, 3, 8, 8), g(6, 3, 4, 4), g(6), g(1, 5, 6), g(1, 1, 6)),
                        (torch.randn(1, 3, 8, 8), g(6, 3, 4, 4), None, g(4, 6), None),
                        (g(2, 3, 8, 8), g(6, 3, 4, 4), g(6), g(1, 9, 6), g(1, 5, 6)),  # prefix with positions
                        (g(2, 3, 8, 8), g(6, 3, 4, 4), g(6), g(1, 4, 6), g(1, 5, 6))],  # prefix without
        "patch_embed_bwd": [(torch.randn(2, 5, 6), torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4), 1, True, True),
                            (torch.randn(2, 4, 6), torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4), 0, True, False),
                            (torch.randn(2, 9, 6), torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4), 5, False, True),
                            (torch.randn(2, 9, 6), torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4), 5, True, False)],
        "attention_fwd": [(q, g(1, 2, 11, 8), g(1, 2, 11, 8), 0.35)],
        "attention_bwd": [(torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 11, 8),
                           torch.randn(1, 2, 11, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9), 0.35)],
        "packed_attention_fwd": [(qkv, 2, 0.35)],
        "packed_attention_bwd": [(torch.randn(2, 9, 16), torch.randn(2, 9, 48), torch.randn(2, 9, 16),
                                  torch.randn(2, 2, 9), 2, 0.35)],
    }


@needs_cpp
@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_opcheck(name):
    op = getattr(torch.ops.fastvit, name)
    for args in _opcheck_cases()[name]:
        torch.library.opcheck(op, args)


@needs_cpp
def test_torch_compile_fullgraph_all_ops():
    dim, heads = 32, 2

    def vit_piece(images, pw, pb, pos, cls, nw, nb, qkv_w, fc_w, fc_b):
        x = fk.patch_embed(images, pw, pb, pos, cls)
        h = fk.layer_norm(x, nw, nb)
        qkv = h @ qkv_w.T
        a = fk.packed_attention(qkv, heads)
        q, k, v = qkv.view(*qkv.shape[:2], 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = a + fk.attention(q, k, v).transpose(1, 2).reshape(a.shape)
        h, x = fk.add_layer_norm(a, x, nw, nb)
        return x + fk.linear_gelu(h, fc_w, fc_b) @ fc_w

    args = [rand(2, 3, 16, 16), rand(dim, 3, 8, 8, std=0.1), rand(dim), rand(1, 5, dim), rand(1, 1, dim),
            rand(dim, mean=1.0), rand(dim), rand(3 * dim, dim, std=0.1), rand(48, dim, std=0.1), rand(48)]
    args = [a.requires_grad_(True) for a in args]
    with fk.backend("cpp"):
        compiled = torch.compile(vit_piece, fullgraph=True, backend="aot_eager")
        out = compiled(*args)
        out.sum().backward()
        grads = [a.grad.clone() for a in args]
        for a in args:
            a.grad = None
        eager = vit_piece(*args)
        eager.sum().backward()
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, (a.grad for a in args)):
        torch.testing.assert_close(got, want)


@needs_cpp
def test_torch_compile_fullgraph_vit_family_arguments():
    """The issue-18 arguments traced too: class + register tokens without positions
    (DINOv2 with registers), LayerScale in the residual add, QuickGELU."""
    dim = 32

    def block(images, pw, pb, pos, cls, reg, nw, nb, gamma, fc_w, fc_b):
        x = fk.patch_embed(images, pw, pb, pos, cls, reg)
        h = fk.layer_norm(x, nw, nb)
        h, x = fk.add_layer_norm(fk.linear_gelu(h, fc_w, fc_b, "quick") @ fc_w, x, nw, nb, 1e-6, gamma)
        return x + h

    args = [rand(2, 3, 16, 16), rand(dim, 3, 8, 8, std=0.1), rand(dim), rand(1, 4, dim), rand(1, 1, dim),
            rand(1, 4, dim), rand(dim, mean=1.0), rand(dim), rand(dim, mean=0.3), rand(48, dim, std=0.1), rand(48)]
    args = [a.requires_grad_(True) for a in args]
    with fk.backend("cpp"):
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
        grads = torch.autograd.grad(out.sum(), args)
        eager = block(*args)
        eager_grads = torch.autograd.grad(eager.sum(), args)
    assert out.shape == (2, 1 + 4 + 4, dim)
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- fallback
def test_without_compiler_auto_falls_back_and_explicit_cpp_raises(tmp_path):
    script = textwrap.dedent("""
        import torch, fastvit_kernels as fk
        x = torch.randn(3, 8)
        out = fk.layer_norm(x, None, None)           # auto: quietly the torch backend
        assert fk.resolved_backend("layer_norm", "cpu") == "torch"
        try:
            with fk.backend("cpp"):
                fk.layer_norm(x, None, None)
        except fk.BackendUnavailableError as exc:
            print("RAISED", exc)
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), FASTVIT_CPP_PREBUILT="0",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), FASTVIT_BACKEND="auto")
    env.pop("FASTVIT_CPP_LIBRARY", None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "RAISED backend 'cpp' is unavailable" in proc.stdout and "no C++ compiler" in proc.stdout, proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "C++ extension unavailable" in line]
    assert len(warnings) == 1, proc.stderr
