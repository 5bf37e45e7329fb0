"""What the per-op test files share: the backends a parity test runs on, and on which device."""

import pytest
import torch

# A condition string, evaluated in the test module (which imports fastvit_kernels as fk) only
# for the cpp tests that run: collecting, or running the triton tests with -k "not cpp",
# never loads, or builds, the C++ extension.
needs_cpp = pytest.mark.skipif("not fk.available_backends()['cpp'].available",
                               reason="cpp backend unavailable (fk.available_backends()['cpp'].reason says why)")
BACKENDS = ["triton", pytest.param("cpp", marks=needs_cpp), "torch"]


def backend_device(backend: str, device: torch.device) -> torch.device:
    """The cpp backend runs on CPU tensors only, whatever device the other backends test on."""
    return torch.device("cpu") if backend == "cpp" else device
