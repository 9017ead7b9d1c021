"""AWQ of the bundled model through llm-compressor: its AWQModifier (activation-aware per-channel scales, folded into
the norm or projection before each group of linears) ahead of the quantizer of a recipe klconvert wrote -- the same
groups, bits and ignore list, rounded to nearest (QuantizationModifier) or with `--then gptq` by GPTQ.

llm-compressor has no AWQ mappings for Kimi Linear, and its defaults would scale an input norm without the KDA
layer's f_a, b and g_a projections or the MoE router, which read the same activations: `kimi_linear_mappings` lists,
layer by layer, every reader of each smoothed activation (the router balanced, not quantized). Like
tools/gptq_bundled.py it runs in llm-compressor's environment (same setup; calibration windows from the training
split):

    PYTHONPATH=. /tmp/llmc/bin/python tools/awq_bundled.py q4/recipe.yaml q4-awq [--then gptq] [--samples 32]
    python tools/quality_table.py --only "int4 g128 sym (default)" --folder "int4 AWQ=q4-awq"
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_output import run_tool  # noqa: E402

import yaml  # noqa: E402

from gptq_bundled import QUANTIZER, calibration_parser, klconvert_recipe, run_calibration  # noqa: E402

from klconvert.checkpoint.folder_files import CONFIG_FILE  # noqa: E402
from klconvert.config import KimiLinearConfig  # noqa: E402
from klconvert.script_summary import script_summary  # noqa: E402


def kimi_linear_mappings(config: KimiLinearConfig) -> list[dict]:
    """AWQ mappings (smooth_layer, balance_layers) over the module names llm-compressor sees (transformers' model, its
    fused experts split into experts.N.{gate,up,down}_proj), layer by layer: each input norm with every projection
    that reads it (KDA: q, k, v, f_a, b, g_a; MLA: q and kv_a, then kv_a's latent norm with kv_b), each
    post-attention norm with the MLP's gate and up (an MoE layer: the router, every expert's and the shared expert's),
    and each up with its down. KDA's o_proj reads a gated norm whose weight is per head dim, so it takes no scales of
    its own input."""
    mappings = []
    for i in range(config.num_hidden_layers):
        at = rf"re:.*layers\.{i}\."
        if config.is_kda(i):
            readers = ["q_proj", "k_proj", "v_proj", "forget_gate.f_a_proj", "b_proj", "g_a_proj"]
        else:
            readers = ["q_proj", "kv_a_proj_with_mqa"]
            mappings.append(dict(smooth_layer=at + r"self_attn\.kv_a_layernorm$",
                                 balance_layers=[at + r"self_attn\.kv_b_proj$"]))
        mappings.append(dict(smooth_layer=at + "input_layernorm$",
                             balance_layers=[at + r"self_attn\." + r.replace(".", r"\.") + "$" for r in readers]))
        if config.is_moe(i):
            mlp = [r"mlp\.gate$", r"mlp\.experts\.\d+\.gate_proj$", r"mlp\.experts\.\d+\.up_proj$",
                   r"mlp\.shared_experts\.gate_proj$", r"mlp\.shared_experts\.up_proj$"]
        else:
            mlp = [r"mlp\.gate_proj$", r"mlp\.up_proj$"]
        mappings.append(dict(smooth_layer=at + "post_attention_layernorm$", balance_layers=[at + m for m in mlp]))
    mappings.append(dict(smooth_layer="re:.*up_proj$", balance_layers=["re:.*down_proj$"]))
    return mappings


def awq_recipe(recipe_path: Path, config: KimiLinearConfig, then: str = "rtn") -> str:
    """klconvert's recipe with an AWQModifier (kimi_linear_mappings) ahead of its quantizer: its own
    QuantizationModifier (then="rtn") or a GPTQModifier of the same groups and ignore list (then="gptq")."""
    recipe = klconvert_recipe(recipe_path)
    quantizer = recipe["quant_stage"]["quant_modifiers"].pop(QUANTIZER)
    name = {"rtn": QUANTIZER, "gptq": "GPTQModifier"}[then]
    awq = {"mappings": kimi_linear_mappings(config)}
    recipe["quant_stage"]["quant_modifiers"] = {"AWQModifier": awq, name: quantizer}
    recipe.pop("runtime", None)  # klconvert's runtime section; llm-compressor has no use for it
    return yaml.safe_dump(recipe, sort_keys=False)


def keep_cached_activations_unpinned() -> None:
    """Where there is no GPU: llm-compressor's AWQ pins the cached activations for GPU copies, which a CPU run has
    none of."""
    import torch   # here, not above: --help and a refusal of the arguments import no torch (~2 s of CPU)

    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def main() -> None:
    p = calibration_parser(script_summary(__file__), samples=64)
    p.add_argument("--then", choices=("rtn", "gptq"), default="rtn", help="The quantizer after the scales.")
    a = run_calibration(p, lambda a: awq_recipe(a.recipe, KimiLinearConfig.from_file(a.model / CONFIG_FILE), a.then),
                        before_calibration=keep_cached_activations_unpinned)
    print(f"AWQ then {a.then} ({a.samples} x {a.seq_len} training tokens) -> {a.out}")


if __name__ == "__main__":
    run_tool(main)
