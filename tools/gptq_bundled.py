"""GPTQ of the bundled model through llm-compressor (the field's calibration library), in the scheme layout of a
recipe klconvert wrote: the same groups, bits and ignore list, with llm-compressor's GPTQModifier (error feedback
over a Hessian of calibration activations) where klconvert's own quantizer rounds to nearest.

llm-compressor pins transformers <= 5.17, so it runs in an environment of its own, not klconvert's; this script
needs only llm-compressor, tiktoken and this repository on the path:

    klconvert quantize tiny q4 --bits 4                      # its recipe.yaml: klconvert's default int4 policy
    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor==0.14.0 tiktoken
    PYTHONPATH=. /tmp/llmc/bin/python tools/gptq_bundled.py q4/recipe.yaml q4-gptq [--samples 64]

Calibration: --samples windows of --seq-len tokens spread evenly over the training split (tools/bundled_corpus.py;
the test split stays unseen). The output folder is compressed-tensors as llm-compressor saves it (transformers'
module names), which klconvert reads like its own; measure it with `klconvert eval --model q4-gptq --reference tiny`
or as a row of the quality table: `python tools/quality_table.py --folder "int4 GPTQ=q4-gptq"`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import bf16_checkpoint, positive_int, refuse_missing, run_tool  # noqa: E402

import yaml  # noqa: E402

import bundled_corpus  # noqa: E402

from klconvert.convert.output_folder import refuse_out_over_source  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.tokenizer import TOKENIZER_FILES, Tokenizer  # noqa: E402
from klconvert.units import counted  # noqa: E402
from klconvert.whole_folder import refuse_taken, whole_folder  # noqa: E402

QUANTIZER = "QuantizationModifier"  # the modifier of a recipe klconvert wrote, which each tool here swaps or follows
# what calibrate imports, none of which klconvert's own environment need hold, and how to get them (the docstring's)
CALIBRATION_MODULES = ("llmcompressor", "datasets", "transformers")
LLM_COMPRESSOR_ENV = ("run this tool in an environment of llm-compressor's own: python -m venv /tmp/llmc && "
                      "/tmp/llmc/bin/pip install llmcompressor==0.14.0 tiktoken, then run it with /tmp/llmc/bin/python "
                      "and PYTHONPATH=. in this repository")


def klconvert_recipe(recipe_path: Path) -> dict:
    """The recipe.yaml a `klconvert quantize` wrote, read; KLError where it is missing, not a file, not YAML, or
    holds no quant_stage.quant_modifiers.QuantizationModifier (each was a traceback)."""
    try:
        recipe = yaml.safe_load(recipe_path.read_text())
    except OSError as e:
        raise KLError(f"{recipe_path}: cannot read it ({e.strerror}); give the recipe.yaml of a folder `klconvert "
                      "quantize` wrote") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise KLError(f"{recipe_path}: not YAML ({str(e).splitlines()[0]}); give the recipe.yaml of a folder "
                      "`klconvert quantize` wrote") from None
    stage = recipe.get("quant_stage") if isinstance(recipe, dict) else None
    modifiers = stage.get("quant_modifiers") if isinstance(stage, dict) else None
    if not isinstance(modifiers, dict) or not isinstance(modifiers.get(QUANTIZER), dict):
        raise KLError(f"{recipe_path}: holds no quant_stage.quant_modifiers.{QUANTIZER}; give the recipe.yaml of a "
                      "folder `klconvert quantize` wrote")
    return recipe


def gptq_recipe(recipe_path: Path) -> str:
    """klconvert's recipe with its QuantizationModifier swapped for a GPTQModifier of the same groups and ignore
    list."""
    recipe = klconvert_recipe(recipe_path)
    modifiers = recipe["quant_stage"]["quant_modifiers"]
    modifiers["GPTQModifier"] = modifiers.pop(QUANTIZER)
    recipe.pop("runtime", None)  # klconvert's runtime section; llm-compressor has no use for it
    return yaml.safe_dump(recipe, sort_keys=False)


def calibration_windows(model: Path, samples: int, seq_len: int) -> list[list[int]]:
    """`samples` windows of `seq_len` token ids, evenly spaced over the training split."""
    ids = Tokenizer.from_folder(model).encode(bundled_corpus.split()["train"])
    if len(ids) < samples * seq_len:
        raise KLError(f"--samples {samples} x --seq-len {seq_len}: the training split has "
                      f"{counted(len(ids), 'token')}, fewer; lower either")
    stride = (len(ids) - seq_len) // max(1, samples - 1)
    return [ids[i * stride:i * stride + seq_len] for i in range(samples)]


def calibration_parser(description: str, samples: int) -> argparse.ArgumentParser:
    """The arguments every llm-compressor tool here takes: the recipe, the output, the model, the calibration."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("recipe", type=Path, help="recipe.yaml of a folder klconvert quantized (the scheme layout).")
    p.add_argument("out", type=Path, help="Output folder (compressed-tensors), a new one.")
    p.add_argument("--model", type=Path, default=BUNDLED_DIR, help="The bf16 model folder (default: the bundled one).")
    p.add_argument("--samples", type=positive_int, default=samples, help="Calibration windows.")
    p.add_argument("--seq-len", type=positive_int, default=512, help="Tokens per window.")
    return p


def calibrate(model_dir: Path, out: Path, recipe: str, windows: list[list[int]]) -> None:
    """llm-compressor's oneshot of `recipe` on the bf16 model in model_dir over `windows`, saved with the tokenizer
    files klconvert reads to out, a new folder written whole or not at all."""
    import torch   # here, not above: --help and a refusal of the arguments import no torch (~2 s of CPU)
    from datasets import Dataset
    from llmcompressor import oneshot  # llm-compressor's environment only (see above)
    from transformers import AutoModelForCausalLM

    seq_len = len(windows[0])
    torch.manual_seed(0)
    with whole_folder(out) as folder:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        dataset = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq_len] * len(windows)})
        oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seq_len,
                num_calibration_samples=len(windows), output_dir=str(folder))
        for name in TOKENIZER_FILES:  # transformers saves no tiktoken tokenizer; klconvert reads these
            shutil.copy(model_dir / name, folder / name)


def run_calibration(p: argparse.ArgumentParser, recipe: Callable[[argparse.Namespace], str],
                    before_calibration: Callable[[], None] = lambda: None) -> argparse.Namespace:
    """Parse p's arguments (calibration_parser's and a tool's own) and calibrate with the recipe `recipe` makes of
    them. What a user can get wrong -- the model (a bf16 folder with its tokenizer), the recipe, --samples x
    --seq-len, OUT, and the libraries it imports -- is checked before llm-compressor is imported and the model
    loaded, as tool_output.py says: one line and exit 2, where each was a traceback (the recipe, the model,
    llm-compressor or datasets missing), a calibration on nothing (--samples -3) or a refusal after the whole
    calibration (an existing OUT, a missing tokenizer file)."""
    a = p.parse_args()
    try:
        refuse_out_over_source(a.model, a.out, "quantized model")
        bf16_checkpoint(a.model)
        for name in TOKENIZER_FILES:   # copied into OUT after the calibration
            if not (a.model / name).is_file():
                raise KLError(f"{a.model}: holds no {name}, which klconvert reads with the quantized folder; give a "
                              "model folder with its tokenizer files")
        text = recipe(a)
        windows = calibration_windows(a.model, a.samples, a.seq_len)
        refuse_taken(a.out)
        refuse_missing(CALIBRATION_MODULES, LLM_COMPRESSOR_ENV)
        before_calibration()
        calibrate(a.model, a.out, text, windows)
    except KLError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    return a


def main() -> None:
    a = run_calibration(calibration_parser(script_summary(__file__), samples=64), lambda a: gptq_recipe(a.recipe))
    print(f"GPTQ ({a.samples} x {a.seq_len} training tokens) -> {a.out}")


if __name__ == "__main__":
    run_tool(main)
