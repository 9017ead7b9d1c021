"""tools/awq_bundled.py: klconvert's recipe with llm-compressor's AWQ ahead of its quantizer, and AWQ mappings that
balance every module reading each smoothed activation (checked on transformers' model of the bundled config, where a
missed reader -- the KDA's f_a, b, g_a, the MoE router -- would silently see scaled inputs). The tool itself runs in
llm-compressor's environment."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import awq_bundled  # noqa: E402

from klconvert.config import KimiLinearConfig  # noqa: E402
from klconvert.models import BUNDLED_DIR, resolve_model  # noqa: E402
from klconvert.quantize import quantize  # noqa: E402
from testkit import TRANSFORMERS_ON_THE_CPU  # noqa: E402


def _config() -> KimiLinearConfig:
    return KimiLinearConfig.from_file(BUNDLED_DIR / "config.json")


@pytest.mark.parametrize("then, quantizer", [("rtn", "QuantizationModifier"), ("gptq", "GPTQModifier")])
def test_awq_recipe_puts_the_scales_ahead_of_klconvert_quantizer(tmp_path, then, quantizer):
    out = quantize(resolve_model("tiny"), tmp_path / "q4", bits=4, device="cpu", progress=False).path
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    awq = yaml.safe_load(awq_bundled.awq_recipe(out / "recipe.yaml", _config(), then))
    modifiers = awq["quant_stage"]["quant_modifiers"]
    assert list(modifiers) == ["AWQModifier", quantizer]
    assert modifiers[quantizer] == written["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert modifiers["AWQModifier"]["mappings"] == awq_bundled.kimi_linear_mappings(_config())
    assert "runtime" not in awq


@TRANSFORMERS_ON_THE_CPU
def test_awq_mappings_balance_every_reader_of_each_smoothed_activation():
    transformers = pytest.importorskip("transformers")
    raw = json.loads((BUNDLED_DIR / "config.json").read_text())
    hf_config = transformers.AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).float().eval()
    outputs, inputs = {}, {}  # module name -> its output / its first input, kept alive so no storage is reused

    def hook(name):
        def record(module, args, out):
            if args and isinstance(args[0], torch.Tensor):
                inputs.setdefault(name, args[0])
            if isinstance(out, torch.Tensor):
                outputs.setdefault(name, out)
        return record

    def same_storage(a, b):
        return a is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    for name, module in model.named_modules():
        module.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.arange(8)[None], use_cache=False)  # a cache would copy the latent before kv_b reads it
    weighted = {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.nn.Parameter)
                and getattr(m, "weight").dim() == 2}  # linears and the router; fused experts hold 3-D weights
    fused_experts = {n for n, m in model.named_modules() if type(m).__name__.endswith("Experts")}
    names = [n for n, _ in model.named_modules()]
    config = _config()
    mappings = awq_bundled.kimi_linear_mappings(config)
    # the norms (every layer's two, each MLA layer's latent one); the last mapping, each up with its down, is
    # llm-compressor's own: down reads silu(gate) * up, linear in each of up's outputs
    layer_norms = [m for m in mappings if "layers" in m["smooth_layer"]]
    mla = sum(not config.is_kda(i) for i in range(config.num_hidden_layers))
    assert len(layer_norms) == 2 * config.num_hidden_layers + mla and mla >= 2
    for mapping in layer_norms:
        smooth = [n for n in names if re.match(mapping["smooth_layer"][3:], n)]
        assert len(smooth) == 1, mapping["smooth_layer"]
        readers = {n for n in weighted | fused_experts if same_storage(inputs.get(n), outputs[smooth[0]])}
        balanced = {n for n in names for r in mapping["balance_layers"] if re.match(r[3:], n)}
        # transformers holds the experts fused; llm-compressor splits them into experts.N.{gate,up}_proj, which the
        # mapping names and which match nothing here
        assert readers - fused_experts == balanced, smooth[0]
        expert_patterns = [r for r in mapping["balance_layers"] if "experts" in r]
        assert bool(readers & fused_experts) == bool(expert_patterns), smooth[0]
