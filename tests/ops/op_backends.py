"""What the per-op test files share: the backends a parity test runs on, and on which device."""

import pytest
import torch

# A condition string, evaluated in the test module (which imports fastvit_kernels as fk) only
# for the cpp tests that run: collecting, or running the triton tests with -k "not cpp",
# never loads, or builds, the C++ extension.
needs_cpp = pytest.mark.skipif("not fk.available_backends()['cpp'].available",
                               reason="cpp backend unavailable (fk.available_backends()['cpp'].reason says why)")
BACKENDS = ["triton", pytest.param("cpp", marks=needs_cpp), "torch"]


@pytest.fixture(autouse=True, scope="module")
def single_threaded_blas():
    """Autouse in the attention test modules that import it: the interpreter runs fp32 tl.dot
    as many small numpy matmuls, and a multi-threaded OpenBLAS spends ~3x their time
    synchronizing threads on a 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def backend_device(backend: str, device: torch.device) -> torch.device:
    """The cpp backend runs on CPU tensors only, whatever device the other backends test on."""
    return torch.device("cpu") if backend == "cpp" else device


def assert_compiled_matches_eager(name: str, fn, inputs, backend: str) -> torch.Tensor:
    """``fn`` traced with ``torch.compile(fullgraph=True, backend=backend)`` computes what it
    computes eagerly on the triton backend: the output and every input's gradient. Returns
    the compiled output."""
    import fastvit_kernels as fk

    with fk.backend("triton"):
        expected = fn(*inputs)
        out = torch.compile(fn, fullgraph=True, backend=backend)(*inputs)
    grad_out = torch.randn_like(expected)
    ref_grads = torch.autograd.grad(expected, inputs, grad_out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    assert len(grads) == len(inputs)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, msg=lambda m: f"{name}: {m}")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g, r, msg=lambda m, i=i: f"{name} grad {i}: {m}")
    return out


def linear_inputs(shape, out_features: int, dtype, device, bias: bool = True) -> list:
    """[x, weight, bias] of a Linear (bias None without), requiring grad: x of ``shape``, a weight
    scaled by in_features ** -0.5 so outputs stay O(1), the bias at std 0.5."""
    from fastvit_kernels.testing import rand

    k = shape[-1]
    x = rand(*shape, dtype=dtype, device=device, requires_grad=True)
    w = rand(out_features, k, dtype=dtype, device=device, std=max(k, 1) ** -0.5, requires_grad=True)
    b = rand(out_features, dtype=dtype, device=device, std=0.5, requires_grad=True) if bias else None
    return [x, w, b]
