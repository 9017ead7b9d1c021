"""Paths the Python API takes: an empty one is never the current folder, and one that is no path is named as such --
as the command line refuses both."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import klconvert
from klconvert import hub
from klconvert.errors import KLError
from klconvert.evaluate import evaluate
from klconvert.quantize import pull_and_quantize, quantize
from klconvert.synth.checkpoint import synth
from klconvert.user_paths import shown_path

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


def test_a_path_is_shown_with_its_bytes_and_control_characters_escaped():
    """user_paths.shown_path, how every refusal names a path: a byte of a name that is not UTF-8 is its escape, \\xff
    (it was Python's lone surrogate, which a UTF-8 line cannot write, or its repr '\\udcff', which names no byte), a
    control character controls_escaped's; a str no file name's bytes give (a lone high surrogate, from the API) is
    escaped as Python writes it."""
    assert shown_path(Path(os.fsdecode(b"out/caf\xe9\xff.txt"))) == r"out/caf\xe9\xff.txt"
    assert shown_path("out/caf\u00e9\n\x1b.txt") == r"out/caf" + "\u00e9" + r"\n\x1b.txt"
    assert shown_path("out/x\ud800") == r"out/x\ud800"
    assert shown_path(os.fsdecode(b"\xff" * 200)) == r"\xff" * 60 + "..." + r"\xff" * 30   # no escape cut
