from pathlib import Path

import pytest
import torch


FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
AUDIO = FIXTURES / "audio"


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The goldens were recorded with 2 threads; fp32 noise between thread counts is ~3e-6.
    torch.set_num_threads(2)
    yield
