"""Shared fixtures: tiny random checkpoints in the exact released (and transformers) format, made per session."""
from __future__ import annotations

import pytest

from klconvert.synth.checkpoint import synth


@pytest.fixture(scope="session")
def tiny_released(tmp_path_factory):
    return synth("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=1, progress=False).path


@pytest.fixture(scope="session")
def tiny_transformers(tmp_path_factory):
    return synth("tiny", tmp_path_factory.mktemp("ckpt") / "tiny-tf", seed=1, layout="transformers",
                 progress=False).path


@pytest.fixture
def tiny_copy(tiny_released, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    import shutil

    return shutil.copytree(tiny_released, tmp_path / "tiny")
