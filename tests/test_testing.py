"""The parity rule and the op comparison helper of ``fastvit_kernels.testing`` catch what they should."""

import pytest
import torch

import fastvit_kernels as fk
from fastvit_kernels import reference, testing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_op_passes_the_torch_backend(dtype):
    x = testing.rand(4, 9, 24, dtype=dtype, mean=2.0, std=3.0, requires_grad=True)
    w = testing.rand(24, dtype=dtype, mean=1.0, requires_grad=True)
    b = testing.rand(24, dtype=dtype, requires_grad=True)

    def fast(*args):
        with fk.backend("torch"):
            return fk.layer_norm(*args)

    results = testing.check_op("layer_norm", fast, reference.layer_norm, [x, w, b, 1e-6])
    assert sorted(results) == ["grad0", "grad1", "grad2", "out0"]


def test_check_op_catches_a_wrong_output_and_a_wrong_gradient():
    x = testing.rand(3, 16, requires_grad=True)
    w = testing.rand(16, mean=1.0, requires_grad=True)

    def off_by_a_bit(x, w):
        return reference.layer_norm(x, w, None) * (1 + 1e-3)

    with pytest.raises(AssertionError, match="out0"):
        testing.check_op("scaled", off_by_a_bit, lambda x, w: reference.layer_norm(x, w, None), [x, w])

    def wrong_gradient(x, w):  # right values, but w's gradient is cut
        return reference.layer_norm(x, w.detach(), None) + 0 * w

    with pytest.raises(AssertionError, match="grad1"):
        testing.check_op("cut", wrong_gradient, lambda x, w: reference.layer_norm(x, w, None), [x, w])


def test_tolerance_and_compare_follow_the_rule():
    hi = torch.randn(5, 7, dtype=torch.float64)
    assert testing.tolerance(hi, None, torch.float32) == pytest.approx(testing.FP32_RTOL * hi.abs().max().item())
    lowp = hi + 1e-2
    tol = testing.tolerance(hi, lowp, torch.float16)
    assert tol == pytest.approx(2e-2 + torch.finfo(torch.float16).eps * hi.abs().max().item())
    assert testing.compare("y", hi + 0.5 * tol, hi, tol).ok
    assert not testing.compare("y", hi + 2 * tol, hi, tol).ok
    assert not testing.compare("y", hi.clone().fill_(float("nan")), hi, tol).ok
    assert not testing.compare("y", hi[:2], hi, tol).ok


def test_check_backend_runs_the_public_op_and_checks_dtypes():
    x = testing.rand(3, 16, mean=1.0, requires_grad=True)
    results = testing.check_backend("torch", "layer_norm", [x, None, None, 1e-6], dtype=torch.float32)
    assert sorted(results) == ["grad0", "out0"]
    with pytest.raises(AssertionError, match="dtype"):
        testing.check_backend("torch", "layer_norm", [x, None, None, 1e-6], dtype=torch.float16)
    with pytest.raises(fk.BackendUnavailableError, match="cpp"):  # pinned: no quiet fallback
        testing.on_backend("layer_norm", "cpp")(torch.ones(2, 4, device="meta"), None, None)
