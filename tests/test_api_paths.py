"""Paths the Python API takes: an empty one is never the current folder, and one that is no path is named as such --
as the command line refuses both."""
from __future__ import annotations

import re

import pytest

import klconvert
from klconvert import hub
from klconvert.errors import KLError
from klconvert.evaluate import evaluate
from klconvert.quantize import pull_and_quantize, quantize
from klconvert.synth.checkpoint import synth

EMPTY = "is an empty path, which is never read as the current folder"


@pytest.mark.parametrize("call", [
    lambda out: klconvert.load("", device="cpu"),
    lambda out: klconvert.Tokenizer.from_folder(""),
    lambda out: evaluate("", "tiny", "To be, or not to be", device="cpu"),
    lambda out: quantize("", out, progress=False),
])
def test_an_empty_model_path_is_refused(tmp_path, monkeypatch, call):
    """The current folder holding a model (as a user's working folder may) is still not what "" names."""
    monkeypatch.chdir(klconvert.models.bundled_dir())
    with pytest.raises(KLError, match=rf"^the model {EMPTY}; give the path"):
        call(tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call, what", [
    (lambda: quantize("tiny", "", progress=False), "out"),
    (lambda: pull_and_quantize("tiny", "", progress=False), "out"),
    (lambda: synth("tiny", "", progress=False), "out"),
    (lambda: hub.pull("acme/kimi", local_dir="", progress=False), "local_dir"),
    (lambda: hub.pull("acme/kimi", cache_dir="", progress=False), "cache_dir"),
])
def test_an_empty_output_path_is_refused(tmp_path, monkeypatch, call, what):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KLError, match=rf"^{what} {EMPTY}"):
        call()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out, got", [(None, "a NoneType"), (3, "an int"), (b"q", "a bytes")])
def test_an_output_that_is_no_path_is_refused(tmp_path, monkeypatch, out, got):
    """quantize("tiny", None) was pathlib's TypeError; 3 read "got a int"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KLError, match=rf"^out {re.escape(repr(out))} should be a path \(a str or Path\), got "
                                      rf"{got}$"):
        quantize("tiny", out, progress=False)
    assert list(tmp_path.iterdir()) == []
