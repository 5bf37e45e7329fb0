"""The public functional API on the torch backend: dispatch, validation, autocast policy."""

import pytest
import torch
import torch.nn.functional as F

import fastvit_kernels as fk
from fastvit_kernels import reference


def test_torch_backend_always_available():
    info = fk.available_backends()
    assert set(info) == {"triton", "cpp", "torch"}
    assert info["torch"].available and "layer_norm" in info["torch"].ops
    for name, i in info.items():
        assert i.available or i.reason, f"{name} unavailable without a reason"


def test_backend_context_and_env(monkeypatch):
    monkeypatch.delenv("FASTVIT_BACKEND", raising=False)
    assert fk.requested_backend() == "auto"
    with fk.backend("torch"):
        assert fk.requested_backend() == "torch"
        assert fk.resolved_backend("layer_norm", "cpu") == "torch"
    monkeypatch.setenv("FASTVIT_BACKEND", "torch")
    assert fk.requested_backend() == "torch"
    monkeypatch.setenv("FASTVIT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        fk.requested_backend()
    with pytest.raises(ValueError, match="unknown backend"):
        with fk.backend("cuda"):
            pass


def test_explicit_unavailable_backend_raises(monkeypatch):
    from fastvit_kernels import _dispatch

    monkeypatch.setitem(_dispatch._loaded, "cpp", _dispatch._Loaded(reason="ImportError: no compiler"))
    assert not fk.available_backends()["cpp"].available
    x = torch.randn(3, 8)
    with fk.backend("cpp"), pytest.raises(fk.BackendUnavailableError, match="'cpp' is unavailable.*no compiler"):
        fk.layer_norm(x, None, None)
    # auto falls back quietly to a backend that can run the call
    with fk.backend("auto"):
        assert fk.resolved_backend("layer_norm", "cpu") == "torch"
        torch.testing.assert_close(fk.layer_norm(x, None, None), F.layer_norm(x, (8,), eps=1e-6))


def test_dispatch_decisions_follow_backend_changes_and_supports(monkeypatch):
    """resolve() remembers its decision per (choice, op, device), but a backend swapped in
    or out later still counts, and a backend's SUPPORTS predicate still sees every call."""
    from fastvit_kernels import _dispatch

    calls = []

    def fake_layer_norm(x, weight, bias, eps):
        calls.append(tuple(x.shape))
        return reference.layer_norm(x, weight, bias, eps)

    def even_batches_only(x, weight, bias, eps):
        return "odd batch" if x.shape[0] % 2 else None

    even, odd = torch.randn(2, 8), torch.randn(3, 8)
    real = "cpp" if fk.available_backends()["cpp"].available else "torch"
    with fk.backend("auto"):
        assert fk.resolved_backend("layer_norm", "cpu") == real  # decided, and remembered
        monkeypatch.setitem(_dispatch._loaded, "cpp",
                            _dispatch._Loaded({"layer_norm": fake_layer_norm}, {"layer_norm": even_batches_only}))
        for _ in range(2):  # the second round from the remembered decision
            assert fk.resolved_backend("layer_norm", "cpu", even, None, None, 1e-6) == "cpp"
            assert fk.resolved_backend("layer_norm", "cpu", odd, None, None, 1e-6) == "torch"
            fk.layer_norm(even, None, None)
            fk.layer_norm(odd, None, None)
    assert calls == [(2, 8), (2, 8)]
    with fk.backend("cpp"):
        for _ in range(2):
            fk.layer_norm(even, None, None)
            with pytest.raises(fk.BackendUnavailableError, match="'cpp' cannot run this 'layer_norm' call: odd batch"):
                fk.layer_norm(odd, None, None)
    assert calls == [(2, 8)] * 4
    monkeypatch.undo()
    with fk.backend("auto"):
        assert fk.resolved_backend("layer_norm", "cpu") == real


def _cpu_backends():
    return [n for n, i in fk.available_backends().items() if i.available and "cpu" in i.devices]


@pytest.mark.parametrize("name", ["torch", "cpp", "triton"])
def test_strided_and_expanded_parameters(name):
    """Parameters given as strided or stride-0 views give the same result as contiguous ones."""
    if name not in _cpu_backends():
        pytest.skip(f"{name} cannot run on CPU here: {fk.available_backends()[name]}")
    x = torch.randn(4, 48) * 3 + 1
    weight = torch.randn(96)[::2]                # stride 2
    bias = torch.randn(1).expand(48)             # stride 0
    w2 = torch.randn(32, 96)[:, ::2]             # (32, 48) with a strided last dim
    b2 = torch.randn(64)[::2]
    with fk.backend(name):
        torch.testing.assert_close(fk.layer_norm(x, weight, bias),
                                   F.layer_norm(x, (48,), weight.contiguous(), bias.contiguous(), 1e-6))
        torch.testing.assert_close(fk.linear_gelu(x, w2, b2),
                                   F.gelu(F.linear(x, w2.contiguous(), b2.contiguous())), rtol=1e-4, atol=1e-5)
        images = torch.randn(2, 3, 16, 16)
        weight4 = torch.randn(16, 3, 8, 8)
        cls = torch.randn(1, 1, 32)[..., ::2]     # (1, 1, 16) strided
        pos = torch.randn(1, 5, 32)[..., ::2]     # (1, 5, 16) strided
        pbias = torch.randn(1).expand(16)
        expected = reference.patch_embed(images, weight4, pbias.contiguous(), pos.contiguous(), cls.contiguous())
        torch.testing.assert_close(fk.patch_embed(images, weight4, pbias, pos, cls), expected,
                                   rtol=1e-4, atol=1e-5)


def test_explicit_backend_on_wrong_device_raises():
    info = fk.available_backends()["cpp"]
    if not info.available:
        pytest.skip(f"cpp backend unavailable: {info.reason}")
    x = torch.randn(3, 8, device="meta")
    with fk.backend("cpp"), pytest.raises(fk.BackendUnavailableError, match="runs on cpu"):
        fk.layer_norm(x, None, None)


def test_ops_match_composition_on_torch_backend():
    x = torch.randn(2, 5, 16)
    w, b = torch.randn(16), torch.randn(16)
    with fk.backend("torch"):
        torch.testing.assert_close(fk.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (16,), w, b, 1e-5))
        normed, summed = fk.add_layer_norm(x, x * 2, w, b)
        torch.testing.assert_close(summed, x * 3)
        torch.testing.assert_close(normed, F.layer_norm(x * 3, (16,), w, b, 1e-6))
        w2 = torch.randn(24, 16)
        torch.testing.assert_close(fk.linear_gelu(x, w2, None, "tanh"),
                                   F.gelu(x @ w2.T, approximate="tanh"))
        qkv = torch.randn(2, 7, 3 * 16)
        q, k, v = qkv.reshape(2, 7, 3, 4, 4).permute(2, 0, 3, 1, 4)
        expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 7, 16)
        torch.testing.assert_close(fk.packed_attention(qkv, 4), expected)
        images = torch.randn(2, 3, 16, 16)
        weight, bias = torch.randn(8, 3, 4, 4), torch.randn(8)
        cls, pos = torch.randn(1, 1, 8), torch.randn(1, 17, 8)
        conv = F.conv2d(images, weight, bias, stride=4).flatten(2).transpose(1, 2)
        expected = torch.cat([cls.expand(2, -1, -1), conv], 1) + pos
        torch.testing.assert_close(fk.patch_embed(images, weight, bias, pos, cls), expected)


def test_ops_are_differentiable_on_torch_backend():
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    with fk.backend("torch"):
        fk.linear_gelu(x, w, None).sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("call, match", [
    (lambda: fk.layer_norm(torch.arange(6).reshape(2, 3), None, None), "floating-point"),
    (lambda: fk.layer_norm(torch.randn(2, 3), torch.randn(4), None), r"weight must have shape \(3,\), got \(4,\)"),
    (lambda: fk.layer_norm(torch.randn(2, 3), None, None, eps=0), "eps must be a positive"),
    (lambda: fk.layer_norm(torch.randn(2, 3), torch.randn(3, dtype=torch.float64), None), "dtype"),
    (lambda: fk.add_layer_norm(torch.randn(2, 3), torch.randn(3, 2), None, None), "residual must have the shape"),
    (lambda: fk.linear_gelu(torch.randn(2, 3), torch.randn(4, 5), None), "in_features 5"),
    (lambda: fk.linear_gelu(torch.randn(2, 3), torch.randn(4, 3), None, "erf"), "approximate"),
    (lambda: fk.attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)), "same shape"),
    (lambda: fk.attention(torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)), "4 dimensions"),
    (lambda: fk.packed_attention(torch.randn(1, 3, 20), 3), "3 \\* num_heads"),
    (lambda: fk.attention(*[torch.randn(1, 2, 3, 8)] * 3, scale=float("inf")), "positive finite"),
    (lambda: fk.patch_embed(torch.randn(1, 3, 32, 32), torch.randn(8, 3, 16, 16), None, torch.randn(1, 5, 8),
                            torch.randn(8)),
     r"cls_token must have shape \(1, 1, 8\), got \(8,\)"),
    (lambda: fk.patch_embed(torch.randn(1, 3, 30, 32), torch.randn(8, 3, 16, 16), None, torch.randn(1, 5, 8)),
     "not divisible by the patch size 16"),
    (lambda: fk.patch_embed(torch.randn(1, 1, 32, 32), torch.randn(8, 3, 16, 16), None, torch.randn(1, 5, 8)),
     "1 channels"),
    (lambda: fk.patch_embed(torch.randn(1, 3, 32, 32), torch.randn(8, 3, 16, 16), None, torch.randn(1, 3, 8),
                            torch.randn(1, 1, 8)),
     r"pos_embed must have shape \(1, 5, 8\) or \(1, 4, 8\) .*got \(1, 3, 8\)"),
    (lambda: fk.patch_embed(torch.randn(1, 3, 32, 32), torch.randn(8, 3, 16, 16), None, torch.randn(1, 4, 8),
                            None, torch.randn(1, 2, 4)),
     r"reg_tokens must have shape \(1, R, 8\) with R >= 1, got \(1, 2, 4\)"),
    (lambda: fk.patch_embed(torch.randn(1, 3, 32, 32), torch.randn(8, 3, 16, 16), None, torch.randn(1, 5, 8)),
     r"pos_embed must have shape \(1, 4, 8\) for a 32x32 image with patch 16, got \(1, 5, 8\)"),
    (lambda: fk.add_layer_norm(torch.randn(2, 3), torch.randn(2, 3), None, None, 1e-6, torch.randn(2)),
     r"gamma must have shape \(3,\), got \(2,\)"),
    (lambda: fk.linear_gelu(torch.randn(2, 3), torch.randn(4, 3), None, "quick_gelu"),
     r"approximate must be one of \('none', 'tanh', 'quick'\), got 'quick_gelu'"),
])
def test_bad_input_messages(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_autocast_policy_cpu():
    x = torch.randn(4, 16)
    w = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fk.linear_gelu(x, w, None).dtype == torch.bfloat16
        # Norms keep the activations' dtype; fp32 parameters are cast to it.
        ln = torch.nn.LayerNorm(16)
        assert fk.layer_norm(x.bfloat16(), ln.weight, ln.bias).dtype == torch.bfloat16
        normed, summed = fk.add_layer_norm(x.bfloat16(), x.bfloat16(), ln.weight, None)
        assert normed.dtype == torch.bfloat16 and summed.dtype == torch.bfloat16
        normed, summed = fk.add_layer_norm(x, x.bfloat16(), None, None)  # promoted as x + r
        assert normed.dtype == torch.float32 and summed.dtype == torch.float32
        q = torch.randn(1, 2, 5, 8)
        assert fk.attention(q, q, q).dtype == torch.bfloat16


def _bf16_linear(x, layer):
    """What the autocast ``linear`` must return: the product of fresh bf16 casts."""
    return F.linear(x.bfloat16(), layer.weight.detach().bfloat16(), layer.bias.detach().bfloat16())


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_autocast_parameter_casts_are_cached_and_never_stale(mode):
    """Inference under autocast casts each parameter once; the copy is dropped when the
    parameter changes: in-place updates, load_state_dict, .to() / .half().float() (which swap
    ``param.data`` without a version bump), and assigning ``.data``."""
    from fastvit_kernels import functional

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad

    def run():
        with context(), fk.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
            out = fk.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(out, _bf16_linear(x, layer), rtol=0, atol=0)
        return functional._cast_cache[layer.weight][2]

    first = run()
    assert run() is first  # reused while unchanged
    with torch.no_grad():
        layer.weight.add_(1.0)  # in place (an optimizer step)
    second = run()
    assert second is not first
    layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
    run()
    layer.half().float()  # new storage, same Parameter object, same version counter
    run()
    layer.to(torch.float64).to(torch.float32)
    run()
    layer.weight.data = torch.randn(8, 16)
    run()
    with torch.no_grad():
        layer.bias.zero_()  # the bias is cached too
    run()


def test_autocast_parameter_cast_cache_only_without_grad():
    """With grad enabled (training) nothing is cached; inference tensors are never cached."""
    from fastvit_kernels import functional

    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with fk.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fk.linear(x, layer.weight, layer.bias)
        out.sum().backward()
    assert layer.weight not in functional._cast_cache and layer.weight.grad is not None
    with torch.inference_mode():
        w, b = torch.randn(8, 16), torch.randn(8)
    with torch.inference_mode(), fk.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        fk.linear(x, w, b)
        assert w not in functional._cast_cache
        w.add_(1.0)  # no version counter to see this by: read fresh every call
        torch.testing.assert_close(fk.linear(x, w, b), F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()),
                                   rtol=0, atol=0)


def test_reference_ops_registry_complete():
    assert set(reference.OPS) == {"patch_embed", "layer_norm", "add_layer_norm", "linear_gelu",
                                  "attention", "packed_attention", "varlen_attention", "varlen_packed_attention",
                                  "linear"}


def test_compile_fullgraph_traces_dispatch():
    def f(x, w):
        return fk.linear_gelu(fk.layer_norm(x, None, None), w, None)

    x, w = torch.randn(3, 8), torch.randn(16, 8)
    with fk.backend("torch"):
        compiled = torch.compile(f, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x, w), f(x, w))
