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

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundled_corpus  # noqa: E402

from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.tokenizer import TOKENIZER_FILES, Tokenizer  # noqa: E402

def gptq_recipe(recipe_path: Path) -> str:
    """klconvert's recipe with its QuantizationModifier swapped for a GPTQModifier of the same groups and ignore
    list."""
    recipe = yaml.safe_load(recipe_path.read_text())
    modifiers = recipe["quant_stage"]["quant_modifiers"]
    modifiers["GPTQModifier"] = modifiers.pop("QuantizationModifier")
    recipe.pop("runtime", None)  # klconvert's runtime section; llm-compressor has no use for it
    return yaml.safe_dump(recipe, sort_keys=False)


def calibration_windows(model: Path, samples: int, seq_len: int):
    """`samples` windows of `seq_len` tokens, evenly spaced over the training split, as a datasets.Dataset."""
    from datasets import Dataset

    ids = Tokenizer.from_folder(model).encode(bundled_corpus.split()["train"])
    if len(ids) < samples * seq_len:
        raise SystemExit(f"the training split has {len(ids):,} tokens, fewer than {samples} x {seq_len}")
    stride = (len(ids) - seq_len) // max(1, samples - 1)
    windows = [ids[i * stride:i * stride + seq_len] for i in range(samples)]
    return Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq_len] * samples})


def calibration_parser(description: str, samples: int) -> argparse.ArgumentParser:
    """The arguments every llm-compressor tool here takes: the recipe, the output, the model, the calibration."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("recipe", type=Path, help="recipe.yaml of a folder klconvert quantized (the scheme layout).")
    p.add_argument("out", type=Path, help="Output folder (compressed-tensors).")
    p.add_argument("--model", type=Path, default=BUNDLED_DIR, help="The bf16 model folder (default: the bundled one).")
    p.add_argument("--samples", type=int, default=samples, help="Calibration windows.")
    p.add_argument("--seq-len", type=int, default=512, help="Tokens per window.")
    return p


def calibrate(model_dir: Path, out: Path, recipe: str, samples: int, seq_len: int) -> None:
    """llm-compressor's oneshot of `recipe` on the bf16 model in model_dir over calibration windows of its training
    split, saved to out with the tokenizer files klconvert reads."""
    from llmcompressor import oneshot  # llm-compressor's environment only (see above)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    oneshot(model=model, dataset=calibration_windows(model_dir, samples, seq_len), recipe=recipe,
            max_seq_length=seq_len, num_calibration_samples=samples, output_dir=str(out))
    for name in TOKENIZER_FILES:  # transformers saves no tiktoken tokenizer; klconvert reads these
        shutil.copy(model_dir / name, out / name)


def main() -> None:
    a = calibration_parser(script_summary(__file__), samples=64).parse_args()
    calibrate(a.model, a.out, gptq_recipe(a.recipe), a.samples, a.seq_len)
    print(f"GPTQ ({a.samples} x {a.seq_len} training tokens) -> {a.out}")


if __name__ == "__main__":
    main()
