"""Variable-length attention (varlen_attention, varlen_packed_attention) on every backend:
parity with one SDPA per sequence, the packed form, bad input, registration.

The reference (``fastvit_kernels.reference.varlen_attention``) runs SDPA on each sequence
alone, so parity with it also says that no sequence sees another's tokens. Parity is
judged by ``fastvit_kernels.testing`` (check_backend: fp32 against fp64, fp16 against fp32
with the reference's own fp16 error as the yardstick), outputs and every input gradient.

The pack the issue asks for (sequences of 1, 17, 197 and 300 tokens) is slow under the
Triton interpreter: triton runs it with one head, each dtype and head dim once, and the
smaller mixed pack covers every dtype, head dim and layout with two heads; cpp and torch run
every combination.
"""

import pytest
import torch
from op_backends import BACKENDS, needs_cpp, single_threaded_blas  # noqa: F401  (autouse)
from op_backends import backend_device as _device

import fastvit_kernels as fk
from fastvit_kernels import reference
from fastvit_kernels.testing import assert_parity, check_backend, rand
from fastvit_kernels.triton import varlen_attention as _triton_varlen  # noqa: F401  (registers its ops)

ISSUE_PACK = (1, 17, 197, 300)
SMALL_PACK = (1, 17, 70, 5)     # 70: a sequence over one 64-row interpreter tile


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(layout, lengths, heads, head_dim, dtype, device):
    """The op's arguments (q, k, v or qkv first, requiring grad), and the output's shape."""
    total, cu = sum(lengths), _cu_seqlens(lengths, device)
    if layout == "separate":
        q = rand(total, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
        k = rand(total, heads, head_dim, dtype=dtype, device=device, mean=0.2, requires_grad=True)
        v = rand(total, heads, head_dim, dtype=dtype, device=device, mean=-0.3, std=1.5, requires_grad=True)
        return [q, k, v, cu, max(lengths)], (total, heads, head_dim)
    qkv = rand(total, 3 * heads * head_dim, dtype=dtype, device=device, requires_grad=True)
    return [qkv, cu, max(lengths), heads], (total, heads * head_dim)


def _check(backend, layout, lengths, heads, head_dim, dtype, device):
    inputs, out_shape = _inputs(layout, lengths, heads, head_dim, dtype, device)
    op = "varlen_attention" if layout == "separate" else "varlen_packed_attention"
    grad_out = rand(*out_shape, dtype=dtype, device=device, std=0.5)
    results = check_backend(backend, op, inputs, [grad_out], dtype=dtype)
    assert results["out0"].shape == out_shape


def _id(case):
    dtype, head_dim, layout = case
    return f"{str(dtype)[6:]}-d{head_dim}-{layout}"


# ------------------------------------------------------------------------------- parity
SMALL = [(dtype, d, layout) for dtype in (torch.float32, torch.float16) for d in (64, 80)
         for layout in ("separate", "packed")]


@pytest.mark.parametrize("case", SMALL, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_small_pack(backend, case, device):
    dtype, head_dim, layout = case
    _check(backend, layout, SMALL_PACK, 2, head_dim, dtype, _device(backend, device))


@pytest.mark.parametrize("case", SMALL, ids=_id)
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_parity_issue_pack(backend, case, device):
    """Sequences of 1, 17, 197 and 300 tokens in one pack, every dtype, head dim and layout."""
    dtype, head_dim, layout = case
    _check(backend, layout, ISSUE_PACK, 2, head_dim, dtype, _device(backend, device))


ISSUE_PACK_TRITON = [(torch.float32, 80, "separate"), (torch.float16, 80, "packed"),
                     (torch.float32, 64, "packed"), (torch.float16, 64, "separate")]


@pytest.mark.parametrize("case", ISSUE_PACK_TRITON, ids=_id)
def test_parity_issue_pack_triton(case, device):
    """The issue's pack on triton, each dtype and head dim once (both layouts): one head
    keeps the interpreter's run short."""
    dtype, head_dim, layout = case
    _check("triton", layout, ISSUE_PACK, 1, head_dim, dtype, device)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
@pytest.mark.parametrize("layout", ["separate", "packed"])
def test_parity_cuda_sweep(layout, head_dim, dtype, device, monkeypatch):
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")
    _check("triton", layout, (*ISSUE_PACK, 577, 50, 1025), 3, head_dim, dtype, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences_and_one_sequence(backend, device):
    """Zero-length sequences in the pack (consecutive equal offsets) are skipped; a pack of
    one sequence is plain attention."""
    device = _device(backend, device)
    _check(backend, "separate", (0, 9, 0, 3, 0), 2, 32, torch.float32, device)
    q, k, v = (rand(1, 2, 23, 32, device=device) for _ in range(3))
    cu = _cu_seqlens([23], device)
    with fk.backend(backend):
        out = fk.varlen_attention(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, 23, scale=0.3)
    torch.testing.assert_close(out.transpose(0, 1)[None], reference.attention(q, k, v, 0.3))


def test_triton_lse_is_each_sequences_log_sum_exp(device):
    """The saved (H, total) log-sum-exp, what backward relies on, per sequence."""
    lengths, heads, head_dim = (3, 1, 20), 2, 16
    q, k, v = (rand(sum(lengths), heads, head_dim, device=device) for _ in range(3))
    cu = _cu_seqlens(lengths, device)
    _, lse = torch.ops.fastvit_triton.varlen_attention(q, k, v, cu, max(lengths), 0.5)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[a:b].double(), k[a:b].double()) * 0.5
        assert_parity(f"lse of rows {a}:{b}", lse[:, a:b], scores.logsumexp(-1))


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_autocast_is_a_matrix_product(backend):
    """Like SDPA under autocast: fp32 inputs are cast to the autocast dtype."""
    inputs, _ = _inputs("packed", (4, 9), 2, 16, torch.float32, torch.device("cpu"))
    with fk.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fk.varlen_packed_attention(*inputs)
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- bad input
def test_bad_input_raises(device):
    lengths = (3, 5)
    q, k, v = (rand(8, 2, 16, device=device) for _ in range(3))
    cu = _cu_seqlens(lengths, device)
    cases = [
        ((q, k, v, cu.long(), 5), TypeError, "cu_seqlens must have dtype torch.int32, got torch.int64"),
        ((q, k, v, [0, 3, 8], 5), TypeError, "cu_seqlens must be a torch.Tensor, got list"),
        ((q, k, v, cu[None], 5), ValueError, r"shape \(n_seq \+ 1,\) with n_seq >= 1, got \(1, 3\)"),
        ((q, k, v, cu[:1], 5), ValueError, r"n_seq >= 1, got \(1,\)"),
        ((q, k, v, cu + 1, 5), ValueError, "must start at 0, got 1"),
        ((q, k, v, _cu_seqlens((3, 4), device), 5), ValueError, "must end at the token count 8, got 7"),
        ((q, k, v, torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=device), 5), ValueError,
         "non-decreasing, got 5 then 3 at index 1"),
        ((q, k, v, cu, 4), ValueError, "at least the longest sequence's length 5, got 4"),
        ((q, k, v, cu, 5.0), ValueError, "max_seqlen must be a non-negative int, got 5.0"),
        ((q, k[:7], v, cu, 5), ValueError, r"one shape \(total, H, d\), got \(8, 2, 16\), \(7, 2, 16\)"),
        ((q[None], k, v, cu, 5), ValueError, "q must have 3 dimensions"),
        ((q, k.half(), v, cu, 5), TypeError, "k has dtype torch.float16 but q has torch.float32"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            fk.varlen_attention(*args)
    with pytest.raises(ValueError, match="scale"):
        fk.varlen_attention(q, k, v, cu, 5, scale=-1.0)
    qkv = rand(8, 3 * 32, device=device)
    with pytest.raises(ValueError, match="qkv's last dimension 96 must be 3 \\* num_heads \\* head_dim"):
        fk.varlen_packed_attention(qkv, cu, 5, 5)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        fk.varlen_packed_attention(qkv, cu, 5, 0)
    with pytest.raises(ValueError, match="must end at the token count 8, got 7"):
        fk.varlen_packed_attention(qkv, _cu_seqlens((3, 4), device), 5, 2)
    with fk.backend("triton"), pytest.raises(fk.BackendUnavailableError, match="head dim 256"):
        fk.varlen_attention(*(rand(8, 1, 256, device=device) for _ in range(3)), cu, 5)


@needs_cpp
def test_cpp_checks_cu_seqlens_itself():
    """A direct torch.ops call skips functional.py: the C++ op checks cu_seqlens too."""
    q = rand(8, 2, 16)
    bad = torch.tensor([0, 5, 3, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing, got 5 then 3"):
        torch.ops.fastvit.varlen_attention_fwd(q, q, q, bad, 5, 0.25)
    with pytest.raises(RuntimeError, match="max_seqlen must be at least every sequence's length, got 4"):
        torch.ops.fastvit.varlen_attention_fwd(q, q, q, _cu_seqlens((3, 5), "cpu"), 4, 0.25)


# ------------------------------------------------------------------------- registration
def test_opcheck_triton(device):
    lengths = (1, 6, 3)
    cu = _cu_seqlens(lengths, device)
    q, k, v = (rand(10, 2, 16, device=device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.fastvit_triton.varlen_attention.default, (q, k, v, cu, 6, 0.3))
    qkv = rand(10, 3 * 32, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvit_triton.varlen_packed_attention.default, (qkv, cu, 6, 2, 0.3))
    # The backward ops have no autograd of their own (no double backward): plain tensors.
    q, k, v, qkv = (t.detach() for t in (q, k, v, qkv))
    out, lse = torch.ops.fastvit_triton.varlen_attention(q, k, v, cu, 6, 0.3)
    torch.library.opcheck(torch.ops.fastvit_triton.varlen_attention_backward.default,
                          (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, cu, 6, 0.3))
    out, lse = torch.ops.fastvit_triton.varlen_packed_attention(qkv, cu, 6, 2, 0.3)
    torch.library.opcheck(torch.ops.fastvit_triton.varlen_packed_attention_backward.default,
                          (torch.randn_like(out), None, qkv, out, lse, cu, 6, 2, 0.3))


@needs_cpp
def test_opcheck_cpp():
    cu = _cu_seqlens((1, 6, 3), "cpu")
    q, k, v = (rand(10, 2, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.fastvit.varlen_attention_fwd.default, (q, k, v, cu, 6, 0.3))
    qkv = rand(10, 3 * 32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvit.varlen_packed_attention_fwd.default, (qkv, cu, 6, 2, 0.3))
    q, k, v, qkv = (t.detach() for t in (q, k, v, qkv))
    out, lse = torch.ops.fastvit.varlen_attention_fwd(q, k, v, cu, 6, 0.3)
    torch.library.opcheck(torch.ops.fastvit.varlen_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, cu, 6, 0.3))
    out, lse = torch.ops.fastvit.varlen_packed_attention_fwd(qkv, cu, 6, 2, 0.3)
    torch.library.opcheck(torch.ops.fastvit.varlen_packed_attention_bwd.default,
                          (torch.randn_like(out), qkv, out, lse, cu, 6, 2, 0.3))


def test_torch_compile_fullgraph(device):
    """The public function (its value checks skipped while tracing) and the custom op trace
    without graph breaks, forward and backward."""
    cu = _cu_seqlens((5, 12), device)
    qkv = rand(17, 3 * 64, device=device, requires_grad=True)

    def step(qkv):
        return fk.varlen_packed_attention(qkv, cu, 12, 2).square().sum()

    with fk.backend("triton"):
        expected = torch.autograd.grad(step(qkv), qkv)[0]
        got = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(qkv), qkv)[0]
    torch.testing.assert_close(got, expected)


def test_cu_seqlens_values_are_read_once_per_tensor(monkeypatch):
    """A model's blocks pass one cu_seqlens: its values (a device sync on a GPU) are read
    once; a changed tensor (in place: new version) is read, and rejected, again."""
    from fastvit_kernels import functional

    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or real(t))
    monkeypatch.setattr(functional, "_run", lambda *args: None)  # the checks only, no backend
    for _ in range(3):
        fk.varlen_attention(q, q, q, cu, 6)
    assert sum(t is cu for t in reads) == 1
    fk.varlen_attention(q, q, q, cu, 10)  # another max_seqlen: checked again
    assert sum(t is cu for t in reads) == 2
    cu[1] = 7  # same tensor, new contents: checked again, and now too long for max_seqlen 6
    with pytest.raises(ValueError, match="max_seqlen must be at least the longest sequence's length 7"):
        fk.varlen_attention(q, q, q, cu, 6)
    with torch.inference_mode():  # an inference tensor has no version counter: read every call
        inference_cu = torch.tensor([0, 4, 10], dtype=torch.int32)
        for _ in range(2):
            fk.varlen_attention(q, q, q, inference_cu, 6)
    assert sum(t is inference_cu for t in reads) == 2


@needs_cpp
@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_bf16_and_expanded_rows(dtype, which):
    """cpp on bf16 (native tile products where the CPU has them, odd lengths included) and on
    q or k expand()ed along the tokens (row stride 0), which the tile GEMMs cannot read in
    place. With k expanded every key is the same: dq, dk are exactly 0, so only dv is compared."""
    from fastvit_kernels.testing import check_op, on_backend

    lengths = (1, 17, 70, 5)
    total, cu = sum(lengths), _cu_seqlens(lengths, "cpu")

    def run(varlen_attention):
        if which == "q":
            return lambda q1, k, v: varlen_attention(q1.expand(total, 2, 64), k, v, cu, max(lengths))
        return lambda q, k1, v: varlen_attention(q, k1.expand(total, 2, 64), v, cu, max(lengths))

    grad_qk = which == "q"
    q = rand(1 if which == "q" else total, 2, 64, dtype=dtype, requires_grad=grad_qk)
    k = rand(1 if which == "k" else total, 2, 64, dtype=dtype, requires_grad=grad_qk)
    check_op(f"varlen_attention[cpp] expanded {which}", run(on_backend("varlen_attention", "cpp")),
             run(reference.varlen_attention), [q, k, rand(total, 2, 64, dtype=dtype, requires_grad=True)])
