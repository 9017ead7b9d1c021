"""tools/autoround_bundled.py hands llm-compressor klconvert's own scheme layout: the recipe a quantize wrote, with
AutoRound in place of round-to-nearest, lm_head kept out of it, nothing else changed (the tool itself runs in
llm-compressor's environment)."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import autoround_bundled  # noqa: E402

from klconvert.models import resolve_model  # noqa: E402
from klconvert.quant.defaults import LM_HEAD  # noqa: E402
from klconvert.quantize import quantize  # noqa: E402


def test_autoround_recipe_keeps_klconvert_groups_and_ignore_list_and_leaves_lm_head_out(tmp_path):
    out = quantize(resolve_model("tiny"), tmp_path / "q4", bits=4, device="cpu", progress=False).path
    written = yaml.safe_load((out / "recipe.yaml").read_text())["quant_stage"]["quant_modifiers"]
    written = written["QuantizationModifier"]
    recipe = yaml.safe_load(autoround_bundled.autoround_recipe(out / "recipe.yaml", iters=50, batch_size=2))
    assert "runtime" not in recipe
    modifiers = recipe["quant_stage"]["quant_modifiers"]
    assert list(modifiers) == ["AutoRoundModifier"]
    autoround = modifiers["AutoRoundModifier"]
    assert (autoround["iters"], autoround["batch_size"], autoround["enable_torch_compile"]) == (50, 2, False)
    assert autoround["ignore"] == written["ignore"] + ["lm_head"]
    lm_head_groups = [n for n, g in written["config_groups"].items() if g["targets"] == [LM_HEAD]]
    assert len(lm_head_groups) == 1 and set(autoround["config_groups"]) == set(written["config_groups"]) - set(
        lm_head_groups)
    for name, group in autoround["config_groups"].items():
        expected = {k: v for k, v in written["config_groups"][name]["weights"].items() if k != "observer"}
        assert group["targets"] == written["config_groups"][name]["targets"] and group["weights"] == expected
