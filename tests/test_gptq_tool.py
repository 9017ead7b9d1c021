"""tools/gptq_bundled.py hands llm-compressor klconvert's own scheme layout: the recipe a quantize wrote, with GPTQ
in place of round-to-nearest and nothing else changed (the tool itself runs in llm-compressor's environment)."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import gptq_bundled  # noqa: E402

from klconvert.models import resolve_model  # noqa: E402
from klconvert.quantize import quantize  # noqa: E402


def test_gptq_recipe_keeps_the_groups_and_ignore_list_of_klconvert_recipe(tmp_path):
    out = quantize(resolve_model("tiny"), tmp_path / "q4", bits=4, device="cpu", progress=False).path
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    gptq = yaml.safe_load(gptq_bundled.gptq_recipe(out / "recipe.yaml"))
    modifiers = gptq["quant_stage"]["quant_modifiers"]
    assert list(modifiers) == ["GPTQModifier"]
    assert modifiers["GPTQModifier"] == written["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert "runtime" not in gptq
