"""Kernel tests: a fixed seed per test, KLCONVERT_TEST_SEED (default 0; `random` for a fresh one), printed on
failure (Triton's CPU interpreter is set up in tests/conftest.py)."""
import os

import pytest
import torch

SEED = os.environ.get("KLCONVERT_TEST_SEED", "0")


@pytest.fixture(autouse=True)
def seed():
    s = int.from_bytes(os.urandom(4), "little") if SEED == "random" else int(SEED)
    torch.manual_seed(s)
    print(f"seed = {s} (KLCONVERT_TEST_SEED={s} reruns it)")
    return s
