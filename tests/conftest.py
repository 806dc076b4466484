"""Decides once, before triton is imported, whether kernels compile (CUDA) or run under
Triton's CPU interpreter. Tests take `device` and `dtypes` from here."""
import os
import zlib

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
# The interpreter computes bf16 loads, stores and dots wrongly, so bf16 runs only compiled.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])


def pytest_configure(config):
    # transformers 5.24 renamed the past_key_values argument to cache; the tests, the README
    # and the package pass the name the installed version takes (sinklora.hf.CACHE_ARG).
    config.addinivalue_line("filterwarnings", "error:.*past_key_values.*:FutureWarning")
    config.addinivalue_line(
        "markers", "gpu_smoke: the minimal set that compiles every kernel specialization the "
                   "benchmarks use (bench/first_light.py runs it first on a GPU)")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random data per test, but reproducible from the test id when one fails.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
