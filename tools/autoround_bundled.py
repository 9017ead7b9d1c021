"""AutoRound of the bundled model through llm-compressor: the rounding of each weight and the clipping of each group
learned block by block (signed gradient descent on the block's output error over calibration activations), in the
scheme layout of a recipe klconvert wrote -- the same groups, bits and ignore list, with llm-compressor's
AutoRoundModifier (Intel's auto-round underneath) where klconvert's own quantizer rounds to nearest.

It runs in llm-compressor's environment, as tools/gptq_bundled.py does, with auto-round beside it:

    klconvert quantize tiny q4 --bits 4
    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor==0.14.0 auto-round==0.15.1 tiktoken
    PYTHONPATH=. /tmp/llmc/bin/python tools/autoround_bundled.py q4/recipe.yaml q4-autoround [--iters 200]

AutoRound tunes the linears inside the decoder layers; lm_head, outside them, stays in bf16 here (auto-round 0.15.1
under llm-compressor 0.14.0 wrote NaN scales into two groups of this model's int8 lm_head in a trial, a folder
klconvert refuses to load).
The quality table's study 2 measures the difference: lm_head in bf16 against int8, KL 0.0575 against 0.0576.
Measure the folder with `python tools/quality_table.py --folder "int4 AutoRound=q4-autoround"`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import positive_int, run_tool  # noqa: E402

import yaml  # noqa: E402

from gptq_bundled import QUANTIZER, calibration_parser, klconvert_recipe, run_calibration  # noqa: E402

from klconvert.script_summary import script_summary  # noqa: E402


def autoround_recipe(recipe_path: Path, iters: int, batch_size: int) -> str:
    """klconvert's recipe with its QuantizationModifier swapped for an AutoRoundModifier of the same groups and
    ignore list, lm_head added to the list (and its group dropped); AutoRound learns the ranges, so the groups'
    observers go."""
    from klconvert.quant.defaults import LM_HEAD   # the quantizer's package imports torch: not for --help

    recipe = klconvert_recipe(recipe_path)
    modifiers = recipe["quant_stage"]["quant_modifiers"]
    autoround = modifiers.pop(QUANTIZER)
    groups = autoround["config_groups"]
    for name in [n for n, g in groups.items() if g.get("targets") == [LM_HEAD]]:
        del groups[name]
    for group in groups.values():
        group["weights"].pop("observer", None)
    autoround["ignore"] = [*autoround.get("ignore", []), "lm_head"]  # the module, by its name (as run)
    autoround |= {"iters": iters, "batch_size": batch_size, "enable_torch_compile": False}
    modifiers["AutoRoundModifier"] = autoround
    recipe.pop("runtime", None)  # klconvert's runtime section; llm-compressor has no use for it
    return yaml.safe_dump(recipe, sort_keys=False)


def main() -> None:
    p = calibration_parser(script_summary(__file__), samples=32)
    p.add_argument("--iters", type=positive_int, default=200, help="Signed-gradient steps per decoder layer.")
    p.add_argument("--batch-size", type=positive_int, default=4, help="Windows per step.")
    a = run_calibration(p, lambda a: autoround_recipe(a.recipe, a.iters, a.batch_size))
    print(f"AutoRound ({a.iters} steps, {a.samples} x {a.seq_len} training tokens) -> {a.out}")


if __name__ == "__main__":
    run_tool(main)
