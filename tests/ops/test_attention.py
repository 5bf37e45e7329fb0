"""Flash attention (attention, packed_attention) on every backend: parity, layouts,
log-sum-exp, registration, dispatch, bad input.

The parity tests run each backend that can run here (triton under the Triton interpreter on
CPU, conftest sets TRITON_INTERPRET=1, and on CUDA when there is one; cpp on CPU; torch)
through the public API, judged by ``fastvit_kernels.testing.check_op`` (the parity rule:
fp32 against the reference in fp64, fp16/bf16 against the reference in fp32 with the
reference's own low-precision error as the yardstick); outputs and all three input gradients.

Layouts: ``separate`` q, k, v tensors; ``views``: q, k, v as strided views of one packed
(B, N, 3, H, d) tensor, given to ``attention``; ``packed``: ``packed_attention`` on the
(B, N, 3*D) tensor itself. For both packed layouts the tensors differentiated are the three
(B, N, D) thirds of qkv, packed inside the op under test, so autograd splits the packed
gradient into dq, dk, dv.

The interpreter is slow, so the N=197 cases are a covering subset (every dtype, head dim
and layout once), not the full cross product; CUDA runs a wider sweep.
"""

import pytest
import torch
from op_backends import BACKENDS, needs_cpp, single_threaded_blas  # noqa: F401  (autouse)
from op_backends import backend_device as _device

import fastvit_kernels as fk
from fastvit_kernels import reference
from fastvit_kernels.reference import split_qkv
from fastvit_kernels.testing import FP32_RTOL, assert_parity, check_backend, check_op, on_backend, rand, upcast
from fastvit_kernels.triton import attention as tattn
from fastvit_kernels.triton._common import H100_SHARED_MEM

ON_CUDA = torch.cuda.is_available()
LAYOUTS = ("separate", "views", "packed")


# ------------------------------------------------------------------------------ helpers
def _leaves(layout, batch, heads, n_q, n_k, head_dim, dtype, device, q_std=1.0):
    """Fresh random inputs, by name."""
    if layout == "separate":
        return {"q": rand(batch, heads, n_q, head_dim, dtype=dtype, device=device, std=q_std),
                "k": rand(batch, heads, n_k, head_dim, dtype=dtype, device=device, mean=0.2),
                "v": rand(batch, heads, n_k, head_dim, dtype=dtype, device=device, mean=-0.3, std=1.5)}
    assert n_q == n_k, "packed layouts have one token count"
    qkv = torch.randn(batch, n_q, 3, heads, head_dim, device=device)
    qkv[:, :, 0] *= q_std
    qkv[:, :, 2] += 0.5
    return {"qkv": qkv.flatten(2).to(dtype)}


def _parts(layout, leaves):
    """The tensors differentiated: q, k, v, or for packed layouts the (B, N, D) thirds of qkv."""
    if layout == "separate":
        return [leaves["q"], leaves["k"], leaves["v"]]
    return list(leaves["qkv"].unflatten(-1, (3, -1)).unbind(2))


def _op(layout, heads, scale, backend=None):
    """The op under test as a function of ``_parts`` (the reference's when no backend)."""
    attention = on_backend("attention", backend) if backend else reference.attention
    packed_attention = on_backend("packed_attention", backend) if backend else reference.packed_attention
    if layout == "separate":
        return lambda q, k, v: attention(q, k, v, scale)

    def pack(q, k, v):  # (B, N, 3, H*d) -> (B, N, 3*D): the qkv Linear's layout, contiguous
        return torch.stack([q, k, v], 2).flatten(2)

    if layout == "views":
        return lambda q, k, v: attention(*split_qkv(pack(q, k, v), heads), scale)
    return lambda q, k, v: packed_attention(pack(q, k, v), heads, scale)


def _check_parity(layout, batch, heads, n_q, n_k, head_dim, dtype, device, scale=None, q_std=1.0,
                  leaves=None, backend="triton"):
    if leaves is None:
        leaves = _leaves(layout, batch, heads, n_q, n_k, head_dim, dtype, device, q_std)
    out_shape = (batch, heads, n_q, head_dim) if layout != "packed" else (batch, n_q, heads * head_dim)
    grad_out = rand(*out_shape, dtype=dtype, device=device, std=0.5)
    fast, ref = _op(layout, heads, scale, backend), _op(layout, heads, scale)
    parts = _parts(layout, leaves)
    # One key: softmax is constant, dq = dk = 0 exactly and the parity rule (relative to
    # max |ref| = 0) is undefined; those two are checked by _check_cancelled instead.
    one_key = n_k == 1
    inputs = [p.detach().requires_grad_(not one_key or i == 2) for i, p in enumerate(parts)]
    results = check_op(f"{layout} attention[{backend}]", fast, ref, inputs, [grad_out])
    assert results["out0"].dtype == dtype
    if one_key:
        inputs = [p.detach().requires_grad_() for p in parts]
        dq, dk, _ = torch.autograd.grad(fast(*inputs), inputs, grad_out)
        for name, grad in (("dq", dq), ("dk", dk)):
            _check_cancelled(name, grad, leaves, layout, heads, grad_out, scale, head_dim)


def _check_cancelled(name, grad, leaves, layout, heads, grad_out, scale, head_dim):
    if layout == "separate":
        q, k, v = leaves["q"], leaves["k"], leaves["v"]
    else:
        q, k, v = split_qkv(leaves["qkv"], heads)
    if layout == "packed":
        grad_out = grad_out.unflatten(-1, (heads, -1)).transpose(1, 2)
    scale = reference.default_scale(head_dim) if scale is None else scale
    terms = (grad_out.double().abs() * v.double().abs()).sum(-1).max().item()  # sum |dO_d v_d|
    other = (k if name == "dq" else q).double().abs().max().item()
    bound = FP32_RTOL * scale * terms * other
    assert torch.isfinite(grad).all(), f"{name}: non-finite values"
    err = grad.double().abs().max().item()
    assert err <= bound, f"{name}: {err:.3e} should be zero up to rounding (bound {bound:.3e})"


# ------------------------------------------------------------------------------- parity
SMALL = [(dtype, n, d, layout)
         for dtype in (torch.float32, torch.float16) for n in (1, 17) for d in (32, 64, 80)
         for layout in LAYOUTS]
# N=197 under the interpreter: each dtype, head dim and layout at least once.
N197 = [(torch.float32, 197, 64, "separate"), (torch.float32, 197, 80, "packed"),
        (torch.float16, 197, 32, "views"), (torch.float16, 197, 80, "separate"),
        (torch.float16, 197, 64, "packed")]


def _id(case):
    dtype, n, d, layout = case
    return f"{str(dtype)[6:]}-N{n}-d{d}-{layout}"


@pytest.mark.parametrize("case", SMALL + N197, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity(backend, case, device):
    dtype, n, head_dim, layout = case
    # B*H > 1 always; the batch stride is exercised at small N, where it is cheap.
    batch, heads = (2, 2) if n < 100 else ((1, 2) if layout == "separate" else (2, 1))
    scale = 0.3 if layout == "views" else None
    _check_parity(layout, batch, heads, n, n, head_dim, dtype, _device(backend, device), scale=scale,
                  backend=backend)


@pytest.mark.parametrize("head_dim", [96, 128, 8])
def test_parity_other_head_dims(head_dim, device):
    """96 and 128 (ViT-g style, pow2) tiles, and a tiny head padded up to a 16-wide tile."""
    _check_parity("views", 1, 3, 33, 33, head_dim, torch.float16, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("n_q,n_k", [(1, 17), (40, 17), (17, 70), (5, 1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_different_query_and_key_counts(backend, n_q, n_k, dtype, device):
    _check_parity("separate", 2, 1, n_q, n_k, 64, dtype, _device(backend, device), backend=backend)


@pytest.mark.parametrize("layout", ["separate", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_fp16(backend, layout, device):
    """Scores ~ +-100 (q scaled up): exp would overflow fp16 (max 65504 ~ e^11) if the
    scores or the softmax were kept in fp16; they are fp32 in the kernels."""
    n = 50
    device = _device(backend, device)
    leaves = _leaves(layout, 1, 2, n, n, 64, torch.float16, device, q_std=25.0)
    q = leaves["q"] if layout == "separate" else split_qkv(leaves["qkv"], 2)[0]
    k = leaves["k"] if layout == "separate" else split_qkv(leaves["qkv"], 2)[1]
    logits = (q.float() @ k.float().transpose(-1, -2)) * 64 ** -0.5
    assert logits.abs().max() > 60, "the inputs should produce large logits"
    _check_parity(layout, 1, 2, n, n, 64, torch.float16, device, leaves=leaves, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("n", [50, 197, 257, 577, 1025])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_cuda_sweep(layout, head_dim, n, dtype, device, monkeypatch):
    # One config per tuning key (tuning every key would take many minutes of compiling);
    # the candidates themselves are covered by test_every_autotune_candidate_cuda.
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")
    _check_parity(layout, 2, 3, n, n, head_dim, dtype, device)


_TUNED = {"fwd": (tattn._attn_fwd_tuned, tattn._FWD), "dkdv": (tattn._attn_bwd_dkdv_tuned, tattn._DKDV),
          "dq": (tattn._attn_bwd_dq_tuned, tattn._DQ)}


def _config(bm, bn, warps, stages):
    return tattn.triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


@pytest.mark.cuda
@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("head_dim", [64, 96])
def test_every_autotune_candidate_cuda(index, head_dim, device, monkeypatch):
    """Each autotune candidate of each kernel is correct at a head dim of its list (the
    tuner may pick any): d=64 for the BLOCK_D <= 64 lists, d=96 for the 128 ones."""
    for tuned, lists in _TUNED.values():
        cands = lists[tattn._head_dim_class(head_dim)]
        want = cands[index % len(cands)]
        chosen = [c for c in tuned.configs
                  if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == want]
        assert len(chosen) == 1, f"candidate {want} should be one of the autotuner's configs"
        monkeypatch.setattr(tuned, "configs", chosen)
    _check_parity("packed", 2, 3, 197, 197, head_dim, torch.bfloat16, device)
    _check_parity("separate", 1, 2, 577, 577, head_dim, torch.float16, device)


@pytest.mark.cuda
def test_parity_cuda_bf16_large_logits(device):
    _check_parity("packed", 2, 4, 197, 197, 64, torch.bfloat16, device, q_std=25.0)


@pytest.mark.cuda
def test_many_heads_grid(device):
    """B*H beyond 65535 (the CUDA limit of grid axes 1 and 2) with a one-axis grid."""
    _check_parity("separate", 4400, 16, 3, 3, 32, torch.float16, device)


# ------------------------------------------------------------------- the cpp backend's cases
def _leaf(*shape, dtype=torch.float32, **kw):
    return rand(*shape, dtype=dtype, requires_grad=True, **kw)


def _check_cpp(op, inputs, *args, dtype=torch.float32):
    """``op`` on the cpp backend (CPU) vs the reference, upstream gradients drawn by check_op."""
    check_backend("cpp", op, [*inputs, *args], dtype=dtype)


ALL = [torch.float32, torch.bfloat16, torch.float16]


@needs_cpp
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("shape", [(2, 3, 197, 32), (1, 2, 50, 80), (0, 2, 197, 64)])
def test_attention_cpp(shape, dtype):
    q, k, v = (_leaf(*shape, dtype=dtype) for _ in range(3))
    _check_cpp("attention", [q, k, v], None, dtype=dtype)


@needs_cpp
def test_attention_cpp_strided_views_cross_and_scale():
    qkv = rand(2, 197, 3, 3, 32, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # strided (B, H, N, d) views, as the model makes them
    _check_cpp("attention", [q, k, v], 0.3)
    _check_cpp("attention", [_leaf(1, 2, 20, 64), _leaf(1, 2, 197, 64), _leaf(1, 2, 197, 64)], None)


@needs_cpp
@pytest.mark.parametrize("n_keys", [1100, 1101])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_cpp_many_keys_uses_online_softmax(dtype, n_keys):
    # more keys than one key block (1024): the running max/sum rescaling path; 1101 leaves an
    # odd last block, which bf16's paired (VNNI) layout pads with a zero key
    q = _leaf(1, 1, 16, 32, dtype=dtype, std=2.0)
    k, v = _leaf(1, 1, n_keys, 32, dtype=dtype, std=2.0), _leaf(1, 1, n_keys, 32, dtype=dtype)
    _check_cpp("attention", [q, k, v], None, dtype=dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_cpp_reduced_cross_views_odd_head_dim(dtype):
    # bf16 / fp16 run native tile products where the CPU has them: cross attention (Nq != Nk,
    # odd Nk), q, k, v as strided views of a packed tensor, and an odd head dim (which the
    # paired layout cannot take: the fp32 tile path runs it)
    _check_cpp("attention", [_leaf(1, 2, 20, 64, dtype=dtype), _leaf(1, 2, 197, 64, dtype=dtype),
                             _leaf(1, 2, 197, 64, dtype=dtype)], None, dtype=dtype)
    qkv = rand(2, 197, 3, 3, 32, dtype=dtype, requires_grad=True)
    _check_cpp("attention", list(qkv.permute(2, 0, 3, 1, 4)), 0.3, dtype=dtype)
    _check_cpp("attention", [_leaf(1, 2, 33, 33, dtype=dtype) for _ in range(3)], None, dtype=dtype)


@needs_cpp
@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_cpp_expanded_rows(dtype, which):
    """q or k expand()ed along the tokens (row stride 0: every row the same memory). The tile
    GEMMs need non-overlapping rows; such inputs are copied first, not read as garbage. With
    every key the same the softmax is uniform and dq, dk are exactly 0 (no relative bound
    applies), so there only v's gradient is compared."""
    from fastvit_kernels.testing import check_op

    def run(attention):
        if which == "q":
            return lambda q1, k, v: attention(q1.expand(1, 2, 9, 64), k, v)
        return lambda q, k1, v: attention(q, k1.expand(1, 2, 9, 64), v)

    grad_qk = which == "q"
    q = _leaf(1, 2, 1 if which == "q" else 9, 64, dtype=dtype).requires_grad_(grad_qk)
    k = _leaf(1, 2, 1 if which == "k" else 9, 64, dtype=dtype).requires_grad_(grad_qk)
    check_op(f"attention[cpp] expanded {which}", run(on_backend("attention", "cpp")), run(reference.attention),
             [q, k, _leaf(1, 2, 9, 64, dtype=dtype)])


_BOTH_TILE_PATHS = """
import torch
import fastvit_kernels._cpp  # noqa: F401  (registers the torch.ops.fastvit C++ ops)
from fastvit_kernels.testing import rand
torch.manual_seed(0)
qkv = rand(2, 197, 3 * 64, dtype=torch.bfloat16)
out, _ = torch.ops.fastvit.packed_attention_fwd(qkv, 2, 0.125)
torch.save(out, {path!r})
"""


@needs_cpp
def test_attention_cpp_bf16_native_and_fp32_tile_paths(tmp_path):
    """The bf16 forward on both tile paths, each in its own process (the choice is made once
    per process): native bf16 products where the CPU has AVX512-BF16 / AMX, and the fp32 tile
    path that FASTVIT_CPP_GEMM=aten forces (what CPUs without them run). Both within the
    parity rule; on a CPU with native bf16 they must differ (proof that the native path ran)."""
    import os
    import subprocess
    import sys

    outs = {}
    for name, env in (("native", {}), ("fp32", {"FASTVIT_CPP_GEMM": "aten"})):
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-c", _BOTH_TILE_PATHS.format(path=str(path))], check=True,
                       env={**os.environ, **env})
        outs[name] = torch.load(path)
    torch.manual_seed(0)
    qkv = rand(2, 197, 3 * 64, dtype=torch.bfloat16)
    ref_hi = reference.packed_attention(qkv.float(), 2, 0.125)
    ref_lowp = reference.packed_attention(qkv, 2, 0.125)
    for name, out in outs.items():
        assert_parity(f"{name} tile path", out, ref_hi, ref_lowp)
    if _native_bf16_expected():
        assert not torch.equal(outs["native"], outs["fp32"]), "the native bf16 path did not run"


def _native_bf16_expected() -> bool:
    """What csrc/blas.h decides: an AVX-512 build of the extension on a CPU with AVX512-BF16 or
    AMX-BF16 (the CPU's flags, from /proc/cpuinfo: Linux only; elsewhere nothing is expected)."""
    import fastvit_kernels._cpp  # noqa: F401  (registers torch.ops.fastvit)

    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return False
    return torch.ops.fastvit.cpu_capability() == "AVX512" and bool(flags & {"avx512_bf16", "amx_bf16"})


@needs_cpp
@pytest.mark.parametrize("n_keys", [5, 0])
def test_attention_cpp_head_dim_zero_fills_lse(n_keys):
    # d == 0: every score is an empty dot product (0), so the softmax is uniform over the
    # keys and lse = log(N_k) (-inf without keys); the output is empty.
    q, k, v = rand(2, 3, 4, 0), rand(2, 3, n_keys, 0), rand(2, 3, n_keys, 0)
    lse_ref = torch.logsumexp(torch.zeros(2, 3, 4, n_keys), dim=-1)
    for _ in range(3):  # fresh allocations, so garbage in an unfilled lse would show
        out, lse = torch.ops.fastvit.attention_fwd(q, k, v, 1.0)
        assert out.shape == (2, 3, 4, 0)
        assert torch.equal(lse, lse_ref), lse
    _, lse = torch.ops.fastvit.packed_attention_fwd(rand(2, 4, 0), 3, 1.0)
    assert torch.equal(lse, torch.full((2, 3, 4), torch.log(torch.tensor(4.0)).item())), lse


@needs_cpp
@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("batch", [2, 1, 0])
def test_packed_attention_cpp(batch, dtype):
    _check_cpp("packed_attention", [_leaf(batch, 197, 3 * 3 * 40, dtype=dtype)], 3, dtype=dtype)


@needs_cpp
def test_packed_attention_cpp_noncontiguous_and_scale():
    base = rand(1, 197, 2 * 3 * 2 * 64, requires_grad=True)
    _check_cpp("packed_attention", [base[..., ::2]], 2, 0.2)  # the last dimension strided


# -------------------------------------------------------------------- layouts and extras
def test_strided_views_are_read_in_place(device):
    """The launcher works on views of a packed qkv (no copy) and writes a strided output."""
    batch, tokens, heads, head_dim = 2, 20, 2, 32
    qkv = rand(batch, tokens, 3 * heads * head_dim, device=device)
    q, k, v = split_qkv(qkv, heads)
    assert q.data_ptr() == qkv.data_ptr() and not q.is_contiguous()
    out = torch.empty(batch, tokens, heads * head_dim, device=device)
    lse = tattn.attention_forward(q, k, v, tattn._heads(out, heads), 0.25)
    ref = reference.attention(*upcast(q, k, v), 0.25).transpose(1, 2).reshape(batch, tokens, -1)
    assert_parity("out", out, ref)
    assert lse.shape == (batch, heads, tokens) and lse.dtype == torch.float32


def test_strided_last_dim_is_copied(device):
    """q with a strided last dimension (a transposed view) is copied once, still correct."""
    base = rand(2, 2, 32, 19, device=device)  # (B, H, d, N)
    q = base.transpose(-1, -2)
    assert q.stride(-1) != 1
    k, v = rand(2, 2, 19, 32, device=device), rand(2, 2, 19, 32, device=device)
    inputs = [base.requires_grad_(), k.requires_grad_(), v.requires_grad_()]
    fast = on_backend("attention", "triton")
    check_op("attention of a transposed q", lambda base, k, v: fast(base.transpose(-1, -2), k, v),
             lambda base, k, v: reference.attention(base.transpose(-1, -2), k, v), inputs)


def test_gradient_layouts(device):
    """Gradients come back in the inputs' layout: packed dqkv (B, N, 3*D) contiguous, and
    dq with the strides of a dense permuted q."""
    batch, tokens, heads, head_dim = 2, 9, 2, 32
    qkv = rand(batch, tokens, 3 * heads * head_dim, device=device, requires_grad=True)
    out = tattn.packed_attention(qkv, heads)
    assert out.shape == (batch, tokens, heads * head_dim) and out.is_contiguous()
    (dqkv,) = torch.autograd.grad(out, [qkv], torch.randn_like(out))
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()

    q = rand(batch, tokens, heads, head_dim, device=device).transpose(1, 2)  # dense, permuted
    k, v = (rand(batch, heads, tokens, head_dim, device=device) for _ in range(2))
    out, lse = torch.ops.fastvit_triton.attention(q, k, v, 0.2)
    dq, dk, _ = torch.ops.fastvit_triton.attention_backward(
        torch.randn_like(out), None, q, k, v, out, lse, 0.2)
    assert dq.stride() == q.stride() and dk.stride() == k.stride()


def test_log_sum_exp_and_its_gradient(device):
    """The op's second output is the fp32 natural-log LSE of the scaled scores, and
    gradients through it are exact too (they fold into delta)."""
    q, k, v = (rand(2, 2, 17, 32, device=device, requires_grad=True) for _ in range(3))
    scale = 0.4
    g_out, g_lse = rand(2, 2, 17, 32, device=device), rand(2, 2, 17, device=device)

    def fast(q, k, v):
        return torch.ops.fastvit_triton.attention(q, k, v, scale)

    def ref(q, k, v):
        scores = (q @ k.transpose(-1, -2)) * scale
        return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)

    results = []
    for fn, inputs in ((fast, (q, k, v)), (ref, upcast(q, k, v))):
        out, lse = fn(*inputs)
        grads = torch.autograd.grad([out, lse], inputs, [g_out.to(out.dtype), g_lse.to(lse.dtype)])
        results.append((out, lse, *grads))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert_parity(name, a, b)
    assert results[0][1].dtype == torch.float32


def test_lse_gradient_only_when_used(device, monkeypatch):
    """Missing output gradients are not materialized: the usual backward (out only) gets
    no lse gradient, and a loss on the lse alone gets no output gradient, still exact."""
    seen = []
    backward = tattn.attention_backward

    def spy(grad_out, grad_lse, *args):
        seen.append(grad_lse is None)
        return backward(grad_out, grad_lse, *args)

    monkeypatch.setattr(tattn, "attention_backward", spy)
    q, k, v = (rand(1, 2, 13, 32, device=device, requires_grad=True) for _ in range(3))
    qkv = rand(1, 13, 3 * 64, device=device, requires_grad=True)
    torch.autograd.grad(tattn.attention(q, k, v), [q, k, v], rand(1, 2, 13, 32, device=device))
    torch.autograd.grad(tattn.packed_attention(qkv, 2), [qkv], rand(1, 13, 64, device=device))
    assert seen == [True, True]

    g_lse = rand(1, 2, 13, device=device)
    fast = torch.autograd.grad(torch.ops.fastvit_triton.attention(q, k, v, 0.3)[1], [q, k, v], g_lse)
    fast_packed = torch.autograd.grad(torch.ops.fastvit_triton.packed_attention(qkv, 2, 0.3)[1], [qkv], g_lse)
    assert seen == [True, True, False, False]
    hi = upcast(q, k, v)
    ref = torch.autograd.grad(torch.logsumexp((hi[0] @ hi[1].transpose(-1, -2)) * 0.3, -1), hi[:2],
                              g_lse.double())
    qkv_hi = upcast(qkv)[0]
    qh, kh, _ = split_qkv(qkv_hi, 2)
    (ref_packed,) = torch.autograd.grad(torch.logsumexp((qh @ kh.transpose(-1, -2)) * 0.3, -1), [qkv_hi],
                                        g_lse.double())
    assert torch.equal(fast[2], torch.zeros_like(v))  # v does not reach the lse
    for name, a, b in (("dq", fast[0], ref[0]), ("dk", fast[1], ref[1]),
                       ("dqkv", fast_packed[0], ref_packed)):
        assert_parity(name, a, b)


def test_empty_queries(device):
    q = rand(1, 2, 0, 32, device=device, requires_grad=True)
    k = rand(1, 2, 5, 32, device=device, requires_grad=True)
    v = rand(1, 2, 5, 32, device=device, requires_grad=True)
    out = tattn.attention(q, k, v)
    assert out.shape == (1, 2, 0, 32)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], torch.ones_like(out))
    assert dq.shape == q.shape
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


# --------------------------------------------------------------- registration, dispatch
def test_opcheck_attention(device):
    q = rand(2, 2, 17, 32, device=device, requires_grad=True)
    k = rand(2, 2, 9, 32, device=device, requires_grad=True)
    v = rand(2, 2, 9, 32, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvit_triton.attention.default, (q, k, v, 0.3))


def test_opcheck_packed_attention(device):
    qkv = rand(2, 17, 3 * 2 * 32, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvit_triton.packed_attention.default, (qkv, 2, 0.3))


def test_opcheck_backward_ops(device):
    q, k, v = (rand(1, 2, 9, 32, device=device) for _ in range(3))
    out, lse = torch.ops.fastvit_triton.attention(q, k, v, 0.3)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.fastvit_triton.attention_backward.default,
                          (g_out, g_lse, q, k, v, out, lse, 0.3))
    qkv = rand(1, 9, 3 * 64, device=device)
    out, lse = torch.ops.fastvit_triton.packed_attention(qkv, 2, 0.3)
    torch.library.opcheck(torch.ops.fastvit_triton.packed_attention_backward.default,
                          (torch.randn_like(out), None, qkv, out, lse, 2, 0.3))


def test_torch_compile_fullgraph(device):
    """The public wrapper (validation, layout checks) and the custom ops trace without
    graph breaks, forward and backward. CPU: aot_eager (inductor cannot lower an
    interpreted kernel); CUDA: inductor, at a real ViT-S shape in bf16."""
    if device.type == "cuda":
        qkv = rand(2, 197, 3 * 384, dtype=torch.bfloat16, device=device, requires_grad=True)
        heads, backend = 6, "inductor"
    else:
        qkv = rand(2, 17, 3 * 64, device=device, requires_grad=True)
        heads, backend = 2, "aot_eager"

    def step(qkv):
        return tattn.packed_attention(qkv, heads).float().square().sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(qkv)
    (grad,) = torch.autograd.grad(loss, [qkv])
    loss_eager = step(qkv)
    (grad_eager,) = torch.autograd.grad(loss_eager, [qkv])
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(grad, grad_eager)


def test_dispatch_through_backend_triton(device):
    qkv = rand(2, 11, 3 * 64, device=device)
    with fk.backend("triton"):
        assert fk.resolved_backend("packed_attention", device, qkv, 2) == "triton"
        out = fk.packed_attention(qkv, 2)
        q, k, v = split_qkv(qkv, 2)
        assert fk.resolved_backend("attention", device, q, k, v) == "triton"
        out_views = fk.attention(q, k, v)
    torch.testing.assert_close(out, tattn.packed_attention(qkv, 2), rtol=0, atol=0)
    torch.testing.assert_close(out_views.transpose(1, 2).reshape(2, 11, 64), out, rtol=0, atol=0)
    assert_parity("out", out, reference.packed_attention(*upcast(qkv), 2))


def test_supports_reasons(device):
    q = torch.zeros(1, 2, 8, 256, device=device)
    assert "head dim 256" in tattn.SUPPORTS["attention"](q, q, q)
    assert "head dim" in tattn.SUPPORTS["packed_attention"](torch.zeros(1, 8, 3 * 2 * 160, device=device), 2)
    f64 = q[..., :32].double()
    assert "float64" in tattn.SUPPORTS["attention"](f64, f64, f64)
    empty_k = torch.zeros(1, 2, 0, 32, device=device)
    assert "N_k = 0" in tattn.SUPPORTS["attention"](q[..., :32], empty_k, empty_k)
    assert tattn.SUPPORTS["attention"](q[..., :80], q[..., :80], q[..., :80]) is None
    with fk.backend("triton"), pytest.raises(fk.BackendUnavailableError, match="head dim 256"):
        fk.attention(q, q, q)
    if device.type == "cpu":  # the interpreter cannot run bf16 tl.dot: refuse, don't be wrong
        b = q[..., :32].bfloat16()
        assert "interpreter" in tattn.SUPPORTS["attention"](b, b, b)


def test_autotune_filter_follows_device_shared_memory(monkeypatch):
    """Configs are kept by the device's shared-memory limit (the H100 figure off CUDA)."""
    conf = _config(128, 64, 8, 3)
    args = {"N_Q": 1024, "N_K": 1024, "BLOCK_D": 128, "Q": torch.empty(1, dtype=torch.float16)}
    # forward: one 128-row q tile + 3 stages of 64-row k and v tiles, d = 128, fp16: 128 KiB
    assert tattn.smem_estimate(conf, args, "BLOCK_M", 1) == 128 * 1024
    assert tattn._keep(conf, args, "BLOCK_M", 1)
    monkeypatch.setattr(tattn, "max_shared_mem", lambda device: 128 * 1024)
    assert not tattn._keep(conf, args, "BLOCK_M", 1)
    monkeypatch.setattr(tattn, "max_shared_mem", lambda device: 136 * 1024)
    assert tattn._keep(conf, args, "BLOCK_M", 1)


_OWNED = {"fwd": ("BLOCK_M", 1), "dkdv": ("BLOCK_N", 2), "dq": ("BLOCK_M", 2)}


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_candidate_lists_fit_hopper(kernel):
    """Every candidate fits an H100's shared memory (227 KiB less the margin) by the
    estimate at its list's widest head dim in fp16/bf16, and the last one, which fp32
    gets, in fp32 too; the lists hold no duplicates and go down to small tiles."""
    budget = H100_SHARED_MEM - tattn._SMEM_MARGIN
    for cls, cands in _TUNED[kernel][1].items():
        assert len(set(cands)) == len(cands), f"{kernel} d<={cls}: duplicate candidates {cands}"
        for dtype in (torch.float16, torch.float32):
            for cand in cands if dtype == torch.float16 else cands[-1:]:
                args = {"BLOCK_D": cls, "Q": torch.empty(1, dtype=dtype)}
                smem = tattn.smem_estimate(_config(*cand), args, *_OWNED[kernel])
                assert smem <= budget, f"{kernel} d<={cls} {dtype} {cand}: {smem} B > {budget} B"


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_prune_keeps_the_head_dim_list_in_order(kernel, monkeypatch):
    """The prune offers a launch its head dim's list, best guess first, less the configs
    that do not fit; fp32 gets only the last of them; FASTVIT_AUTOTUNE=0 the first."""
    lists = _TUNED[kernel][1]
    by_class = {cls: [_config(*c) for c in cands] for cls, cands in lists.items()}
    offered = [c for cands in by_class.values() for c in cands]
    prune = tattn._prune(by_class, *_OWNED[kernel])
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "1")

    def run(block_d, dtype, n=1025):
        args = {"N_Q": n, "N_K": n, "BLOCK_D": block_d, "Q": torch.empty(1, dtype=dtype),
                "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}
        return prune(offered, args)

    for block_d, cls in ((16, 64), (32, 64), (64, 64), (128, 128)):
        assert run(block_d, torch.bfloat16) == by_class[cls]
        assert run(block_d, torch.float32) == by_class[cls][-1:]
    # Short sequences drop owned tiles longer than max(64, next_pow2(N)).
    owned = _OWNED[kernel][0]
    assert all(c.kwargs[owned] <= 64 for c in run(64, torch.float16, n=40))
    # A small device keeps only what fits (here nothing: the last candidate as fallback).
    monkeypatch.setattr(tattn, "max_shared_mem", lambda device: 8 * 1024)
    assert run(128, torch.float16) == by_class[128][-1:]
    monkeypatch.setattr(tattn, "max_shared_mem", lambda device: H100_SHARED_MEM)
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")
    assert run(128, torch.float16) == by_class[128][:1]


def test_bad_input_raises(device):
    """Bad input is rejected by the public API before it reaches the kernels (the triton
    module itself trusts functional.py's validation); kernel limits name the reason."""
    q = rand(1, 2, 8, 32, device=device)
    A, P = on_backend("attention", "triton"), on_backend("packed_attention", "triton")
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        A(q, q[:, :1], q[:, :, :2])
    with pytest.raises(ValueError, match="4 dimensions"):
        A(q[0], q, q)
    with pytest.raises(TypeError, match="torch.Tensor"):
        A(q.tolist(), q, q)
    with pytest.raises(TypeError, match="floating-point"):
        A(q.int(), q.int(), q.int())
    with pytest.raises(fk.BackendUnavailableError, match="float32, float16 or bfloat16"):
        A(q.double(), q.double(), q.double())
    with pytest.raises(TypeError, match="dtype"):
        A(q, q.half(), q)
    with pytest.raises(fk.BackendUnavailableError, match="head dim 256"):
        A(*(rand(1, 2, 8, 256, device=device) for _ in range(3)))
    with pytest.raises(ValueError, match="scale"):
        A(q, q, q, scale=-1.0)
    with pytest.raises(ValueError, match="num_heads=5"):
        P(rand(1, 8, 3 * 64, device=device), 5)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        P(rand(1, 8, 3 * 64, device=device), 0)
    with pytest.raises(ValueError, match="3 dimensions"):
        P(q, 2)
