"""The quality table of the README: klconvert eval of each quantization of the bundled model against its bf16
weights on the held-out test split (never trained on), plus the two policy studies.

Rows: int8, int4 g128 sym (the default), int4 g128 asym, int4 g32, nf4, int4 g128 sym and asym with the MSE observer
(llm-compressor's range search instead of min-max), each shipped recipe (recipes/*.yaml);
then study 1 -- the default int4 g128 policy (b_proj and f_a_proj stored like q/k/v, as vLLM's fused KDA input
projection needs) but with b_proj and f_a_proj in bf16 (the old, split policy), or g_a_proj, f_b_proj, g_b_proj
quantized too, or the whole fused KDA input group or the shared experts kept in bf16; study 2 -- lm_head at 4
bits, 8 bits (the default) and kept in bf16. Columns: perplexity (and its change), KL(bf16 || quantized) mean and
p99, top-1 agreement, mean router-set overlap, share of (token, layer) routing decisions whose whole expert set is
unchanged, the worst MoE layer, and the bits per weight over all the checkpoint's weights (embedding included).

The bf16 reference runs once; each variant is quantized into a temporary folder and run on the same tokens, on
CPU in fp32 (so the numbers measure the weights, not the compute dtype).

    python tools/quality_table.py [--model tiny] [--tokens 20480] [--only int4] > table.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import bf16_checkpoint, positive_int, run_tool  # noqa: E402
import bundled_corpus  # noqa: E402

from typing import TYPE_CHECKING  # noqa: E402

from klconvert.checkpoint.folder_files import CONFIG_FILE  # noqa: E402
from klconvert.checkpoint.safetensors_header import read_header  # noqa: E402
from klconvert.models import resolve_model  # noqa: E402
from klconvert.config import KimiLinearConfig  # noqa: E402
from klconvert.errors import KLError  # noqa: E402
from klconvert.quant.defaults import (DEFAULT, KEEP, LM_HEAD, LM_HEAD_BITS, SMALL_KDA_PROJECTIONS,  # noqa: E402
                                      kda_projections)
from klconvert.script_summary import script_summary  # noqa: E402
from klconvert.tokenizer import Tokenizer  # noqa: E402
from klconvert.units import counted  # noqa: E402

if TYPE_CHECKING:   # the checkpoint reader, the quantizer and the evaluator import torch (~2 s of CPU): each is
    # imported in the functions that use it, so that --help and a refusal of the arguments import no torch
    from klconvert.evaluate import EvalResult

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ALWAYS_KEPT = [k for k in KEEP if k != kda_projections(SMALL_KDA_PROJECTIONS)]   # the router, the short convs


def recipe(kept_small: tuple[str, ...] = SMALL_KDA_PROJECTIONS, keep: tuple[str, ...] = (),
           lm_head_bits: int | None = LM_HEAD_BITS, symmetric: bool = DEFAULT.symmetric,
           observer: str = DEFAULT.observer) -> str:
    """The default policy as a recipe, with the small KDA projections `kept_small` (f_a, b, f_b, g_a, g_b) in
    bf16, the modules matching the `keep` regexes kept in bf16 too, lm_head at `lm_head_bits` (None: bf16), and the
    other linears' scales from `observer` (lm_head's stay min-max)."""
    ignore = ALWAYS_KEPT + ([kda_projections(kept_small)] if kept_small else [])
    ignore += [f"re:{k}" for k in keep] + ([LM_HEAD] if lm_head_bits is None else [])
    weights = (f"{{num_bits: {DEFAULT.bits}, type: int, symmetric: {str(symmetric).lower()}, strategy: group, "
               f"group_size: {DEFAULT.group_size}, observer: {observer}}}")
    lines = ["quant_stage:", "  quant_modifiers:", "    QuantizationModifier:", "      ignore:"]
    lines += [f"        - {json_str(p)}" for p in ignore]
    lines += ["      config_groups:", "        group_0:", '          targets: ["Linear"]',
              f"          weights: {weights}"]
    if lm_head_bits is not None:
        lines += ["        group_1:", f"          targets: [{json_str(LM_HEAD)}]",
                  f"          weights: {{num_bits: {lm_head_bits}, type: int, symmetric: true, strategy: group, "
                  f"group_size: {DEFAULT.group_size}}}"]
    return "\n".join(lines) + "\n"


def json_str(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    return json.dumps(text)


SHARED = r".*\.shared_experts\.(gate|up|down)_proj$"


def kda_input_group(c: KimiLinearConfig) -> str:
    """vLLM's fused in_proj_qkvgfab (q, k, v, b, f_a) of the KDA layers only (an MLA layer has a q_proj too)."""
    return rf"model\.layers\.({'|'.join(map(str, c.kda_layers))})\.self_attn\.(q|k|v|b|f_a)_proj$"


def variants(c: KimiLinearConfig) -> list[tuple[str, str, dict]]:
    """(section, label, quantize keywords) of every row, in table order."""
    rows = [
        ("schemes", "int8 g128", {"bits": 8}),
        ("schemes", "int4 g128 sym (default)", {"bits": 4}),
        ("schemes", "int4 g128 asym", {"bits": 4, "symmetric": False}),
        ("schemes", "int4 g32", {"bits": 4, "group_size": 32}),
        ("schemes", "nf4 (bitsandbytes, blocks of 64)", {"scheme": "nf4"}),
        ("schemes", "int4 g128 sym, MSE observer", {"recipe_text": recipe(observer="mse")}),
        ("schemes", "int4 g128 asym, MSE observer", {"recipe_text": recipe(symmetric=False, observer="mse")}),
    ]
    rows += [("recipes", f"recipes/{p.name}", {"recipe": p}) for p in sorted(RECIPES.glob("*.yaml"))]
    kept = SMALL_KDA_PROJECTIONS
    study = [("b_proj, f_a_proj in bf16 (split: vLLM refuses it)", kept + ("b", "f_a"), (), True),
             ("+ g_a_proj int4", ("f_b", "g_b"), (), False), ("+ f_b_proj int4", ("g_a", "g_b"), (), False),
             ("+ g_b_proj int4", ("f_b", "g_a"), (), False), ("+ all three int4", (), (), False),
             ("KDA input group (q, k, v, b, f_a) in bf16", kept, (kda_input_group(c),), False),
             ("shared experts in bf16", kept, (SHARED,), False)]
    rows += [("study 1: int4 g128, default policy (b_proj, f_a_proj int4) but", label,
              {"recipe_text": recipe(small, keep), "allow_split_fused": split}) for label, small, keep, split in study]
    rows += [("study 2: int4 g128, lm_head at", label, {"recipe_text": recipe(lm_head_bits=b)})
             for label, b in (("4 bits", 4), (f"{LM_HEAD_BITS} bits (default)", LM_HEAD_BITS), ("bf16", None))]
    return rows


def quantize_options(options: dict, recipe_path: Path) -> dict:
    """A variant's quantize keywords, its recipe_text written to `recipe_path` and given as the recipe."""
    options = dict(options)
    if "recipe_text" in options:
        recipe_path.write_text(options.pop("recipe_text"))
        options["recipe"] = recipe_path
    return options


def planned_bits_per_weight(model: Path, options: dict) -> float:
    """The bits per weight quantize reports for these keywords (quantize_options'), from its plan of what each tensor
    is written as: no weight is quantized."""
    from klconvert.checkpoint.reader import open_checkpoint
    from klconvert.convert.outputs import plan_modules, plan_totals
    from klconvert.quantize_options import choose_policy

    checkpoint = open_checkpoint(model)
    policy = choose_policy(**{k: v for k, v in options.items() if k != "allow_split_fused"})[0]
    policy = policy.check_against([(name, spec.shape) for name, spec in checkpoint.expected.items()])
    return plan_totals(plan_modules(checkpoint, policy)).bits_per_weight


def measure(model: Path, tokens: int, only: str | None, folders: tuple[tuple[str, Path], ...] = ()) -> list:
    """[(section, label, EvalResult, bits per weight over all weights)] for each variant whose label has `only`,
    then for each (label, folder) of `folders` (quantized elsewhere, e.g. by tools/gptq_bundled.py)."""
    from klconvert.evaluate import compare, run_model
    from klconvert.quantize import quantize

    text = bundled_corpus.split()["test"]
    ids = Tokenizer.from_folder(model).encode(text)[:tokens]
    t0 = time.perf_counter()
    reference = run_model(model, ids, "cpu", "float32")
    print(f"reference: {counted(len(ids), 'held-out token')} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (section, label, options) in enumerate(variants(KimiLinearConfig.from_file(model / CONFIG_FILE))):
            if only and only not in label:
                continue
            t0 = time.perf_counter()
            out = Path(tmp) / f"v{i}"
            result = quantize(model, out, device="cpu", progress=False,
                              **quantize_options(options, Path(tmp) / f"recipe{i}.yaml"))
            got = run_model(out, ids, "cpu", "float32")
            rows.append((section, label, compare(reference, got, ids), result.totals.bits_per_weight))
            print(f"{label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    params = stored(model)[1]  # bits per weight as quantize counts them: bytes written over the source's parameters
    for label, folder in folders:
        got = run_model(folder, ids, "cpu", "float32")
        rows.append(("quantized elsewhere", label, compare(reference, got, ids), 8 * stored(folder)[0] / params))
    return rows


def stored(folder: Path) -> tuple[int, int]:
    """(bytes, elements) of every tensor in a folder's safetensors shards, from their headers."""
    tensors = [t for shard in sorted(folder.glob("*.safetensors")) for t in read_header(shard).tensors.values()]
    return sum(t.nbytes for t in tensors), sum(math.prod(t.shape) for t in tensors)


def render(rows: list, tokens: int) -> str:
    """The rows as a Markdown table, one header row per section."""
    head = ("| variant | bits/weight (all) | perplexity | KL mean | KL p99 | top-1 | router overlap | set unchanged | "
            "worst layer (overlap) |\n|---|---:|---:|---:|---:|---:|---:|---:|---|")
    out = [f"Held-out: {counted(tokens, 'token')} of the test split; reference bf16 perplexity "
           f"{rows[0][2].reference_perplexity:.3f}.", "", head]
    section = None
    for sec, label, r, bits in rows:
        if sec != section:
            out.append(f"| **{sec}** | | | | | | | | |")
            section = sec
        w = r.worst_layer
        change = 100 * (r.model_perplexity / r.reference_perplexity - 1)
        out.append(f"| {label} | {bits:.2f} | {r.model_perplexity:.3f} ({change:+.2f}%) "
                   f"| {r.kl_mean:.4f} | {r.kl_p99:.4f} | {100 * r.top1_agreement:.1f}% | "
                   f"{100 * r.routing_overlap:.1f}% | {100 * r.routing_unchanged:.1f}% | "
                   f"{'-' if w is None else f'{w.layer} ({100 * w.overlap:.1f}%)'} |")
    return "\n".join(out)


def targets_line(rows: list) -> str:
    """Whether the default int4 g128 row meets the issue's targets: KL <= 0.02, top-1 >= 95%, overlap >= 90%."""
    default: EvalResult | None = next((r for _, label, r, _ in rows if label == "int4 g128 sym (default)"), None)
    if default is None:
        return ""
    checks = [("KL mean <= 0.02", default.kl_mean <= 0.02, f"{default.kl_mean:.4f}"),
              ("top-1 >= 95%", default.top1_agreement >= 0.95, f"{100 * default.top1_agreement:.1f}%"),
              ("router overlap >= 90%", default.routing_overlap >= 0.90, f"{100 * default.routing_overlap:.1f}%")]
    return "int4 g128 default policy against the targets: " + "; ".join(
        f"{name}: {value} {'met' if ok else 'MISSED'}" for name, ok, value in checks)


def main() -> None:
    p = argparse.ArgumentParser(description=script_summary(__file__))
    p.add_argument("--model", default="tiny", help="The bf16 model folder, or tiny (the bundled model).")
    p.add_argument("--tokens", type=positive_int, default=20480, help="Held-out tokens to measure on (at least 2).")
    p.add_argument("--only", default=None, help="Only the rows whose label contains this text.")
    p.add_argument("--folder", action="append", default=[], metavar="LABEL=DIR",
                   help="Also measure a folder quantized elsewhere (tools/gptq_bundled.py), as a row named LABEL.")
    a = p.parse_args()
    for given in a.folder:
        label, _, path = given.partition("=")
        if not label or not Path(path).is_dir() or not any(Path(path).glob("*.safetensors")):
            p.error(f"--folder {given}: give LABEL=DIR, DIR a quantized folder with safetensors shards")
    if a.tokens < 2:
        p.error(f"--tokens {a.tokens}: need at least 2 tokens to score a next-token prediction")
    folders = tuple((label, Path(path)) for label, _, path in (f.partition("=") for f in a.folder))
    from klconvert.checkpoint.quantized import quant_method   # the arguments passed: the reader's torch now

    try:
        model = resolve_model(a.model)
        # what the rows need of the model and the folders, checked before the reference's run (a minute or more): a
        # quantized --model was refused by the first row's quantize, a folder of another vocabulary by its own run
        config = bf16_checkpoint(model).config
        for label, folder in folders:
            folder_config = KimiLinearConfig.from_file(folder / CONFIG_FILE, "--folder")
            if not quant_method(folder_config.raw, str(folder / CONFIG_FILE)):   # was scored as a 16-bit quantization
                raise KLError(f"--folder {label}={folder}: holds unquantized weights (its config.json has no "
                              f"quantization_config); --folder takes a folder quantized elsewhere "
                              f"(tools/gptq_bundled.py's), --model the bf16 one it is compared with")
            vocab_size = folder_config.vocab_size
            if vocab_size != config.vocab_size:
                raise KLError(f"--folder {label}={folder}: a model of {vocab_size:,} token ids, --model's has "
                              f"{config.vocab_size:,}; its rows are scored on --model's tokens: give a folder "
                              f"quantized from {a.model}")
        labels = [label for _, label, _ in variants(config)]
        if a.only and not folders and not any(a.only in label for label in labels):   # before the reference's run
            p.exit(2, f"{p.prog}: error: --only {a.only!r}: no row's label contains it; give part of one "
                      f"(e.g. 'int4 g128'), or measure a --folder\n")
        rows = measure(model, a.tokens, a.only, folders)
    except KLError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(render(rows, rows[0][2].tokens))
    line = targets_line(rows)
    if line:
        print("\n" + line)


if __name__ == "__main__":
    run_tool(main)
