"""Kernel tests: a fresh seed per test, printed on failure (Triton's CPU interpreter is set up in tests/conftest.py)."""
import os

import pytest
import torch


@pytest.fixture(autouse=True)
def seed():
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed = {s} (torch.manual_seed)")
    return s
