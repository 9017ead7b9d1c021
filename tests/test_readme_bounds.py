"""The bounds the README states are the code's: each phrase is built from the constant it names, so changing one
fails here until the README says the new figure (the behaviour tests shrink these constants to small values, so
they do not pin the real ones)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())   # a phrase may wrap across lines


def stated(phrase: str) -> None:
    assert phrase in README, f"README.md does not say {phrase!r}"


def test_the_hub_bounds():
    from klconvert.hub import MAX_LISTED_FILES, MAX_PULLED_FILES
    from klconvert.hub_guard import MAX_OTHER_ANSWERS, MAX_OTHER_BYTES

    stated(f"at most {MAX_LISTED_FILES:,} files listed, {MAX_PULLED_FILES:,} pulled")
    stated(f"bounded at {MAX_OTHER_ANSWERS:,} and {MAX_OTHER_BYTES >> 20} MiB")


def test_the_recipe_pattern_bounds():
    from klconvert.quant.policy import MAX_PATTERN_EXPANSION, REGEX_BUDGET_S

    stated(f"spell out at most {MAX_PATTERN_EXPANSION:,} items")
    stated(f"within {REGEX_BUDGET_S:g} s of CPU time")


def test_the_onnx_bounds():
    pytest.importorskip("onnxruntime")
    from klconvert.onnx.export import PROTOBUF_LIMIT
    from klconvert.onnx.session import SCORE_BYTES

    stated(f"scores stay under {SCORE_BYTES >> 20} MiB a layer")
    stated(f"weights over {PROTOBUF_LIMIT >> 30} GB go to `model.onnx.data`")


def test_the_bench_new_tokens_bounds():
    from klconvert.cli import cli

    option = next(p for p in cli.commands["bench"].params if p.name == "new_tokens")
    stated(f"`--new-tokens N` (default {option.default}, at least {option.type.min})")
