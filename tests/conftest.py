"""Test setup: pick the device, and run Triton kernels under the interpreter without CUDA.

TRITON_INTERPRET must be set before any Triton kernel is defined, i.e. before
fastvit_kernels.triton is imported, which is why it is set here, first.
"""

import os
import zlib

# The interpreter's tl.dot is many tiny numpy matmuls: one BLAS thread is far faster.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and DEVICE.type != "cuda":
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, but reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def one_thread():
    """Tiny models: one thread (on a busy machine every op otherwise waits for a second core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
