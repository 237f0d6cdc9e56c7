import os
from pathlib import Path


# MKL picks its FFT/GEMM code path by CPU (SSE, AVX2, AVX-512), and the float32 rounding differs between paths: on
# the tiny golden codecs the log-mel of quiet high bins moves by up to 1e-3 between an AVX2 and an AVX-512 machine
# (the recorded goldens themselves sit 6e-4 from a float64 evaluation there). The original pipeline calls the same
# `torch.stft`, so on one machine both agree; to compare against goldens recorded elsewhere, the tests pin MKL's
# cross-CPU reproducible path. It must be set before MKL's first call, hence before anything imports torch.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import pytest  # noqa: E402
import torch  # noqa: E402


FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
AUDIO = FIXTURES / "audio"


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The goldens were recorded with 2 threads; fp32 noise between thread counts is ~3e-6.
    torch.set_num_threads(2)
    yield
