"""vLLM's compressed-tensors matching rules, transcribed, applied to our default outputs and every shipped recipe: no
module vLLM fuses is split, and every stored tensor lands in a vLLM module built with the scheme it was stored in."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from klconvert.checkpoint.name_map import expected_tensors
from klconvert.checkpoint.quantized import QuantizedSource
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError
from klconvert.quant import QuantScheme, load_recipe, parse_recipe, policy_from_options
from klconvert.quant.group_rules import CHANNEL
from klconvert.quant.fused import VLLM_FUSED_MODULES, refuse_split_fused
from klconvert.quantize import quantize
from klconvert.presets import preset_config

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
DEFAULTS = {"int4-sym": dict(bits=4), "int4-asym": dict(bits=4, symmetric=False), "int8": dict(bits=8)}
KEPT = "int4-kda-input-kept"  # the default flipped: KEEP_WHOLE = ("in_proj_qkvgfab",)


def kept_policy():
    return replace(policy_from_options(bits=4), keep_fused=("in_proj_qkvgfab",))

# ---- transcribed from vLLM 0.33.0 ------------------------------------------------------------------------------
# vllm/models/kimi_k3/nvidia/model.py, KimiLinearModel.packed_modules_mapping (KimiLinearForCausalLM's model; the
# q_a_proj entries only apply with a q_lora_rank, which Kimi Linear does not have).
PACKED_MODULES_MAPPING = {
    "gate_up_proj": ["gate_proj", "up_proj"],
    "in_proj_qkvgfab": ["q_proj", "k_proj", "v_proj", "b_proj", "f_a_proj"],
    "conv1d": ["q_conv1d", "k_conv1d", "v_conv1d"],
    "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"],
    "fused_qkv_a_g_proj": ["q_a_proj", "kv_a_proj_with_mqa", "g_proj"],
}
# vllm/models/kimi_k3/nvidia/model.py, KimiLinearModel.load_weights: stacked_params_mapping (no full-rank gate, no
# q_lora_rank), tried in order; a mapped name that is no parameter of the layer is skipped.
STACKED_PARAMS_MAPPING = [
    (".in_proj_qkvgfab", ".q_proj"), (".in_proj_qkvgfab", ".k_proj"), (".in_proj_qkvgfab", ".v_proj"),
    (".in_proj_qkvgfab", ".b_proj"), (".in_proj_qkvgfab", ".f_a_proj"),
    (".conv1d", ".q_conv1d"), (".conv1d", ".k_conv1d"), (".conv1d", ".v_conv1d"),
    (".gate_up_proj", ".gate_proj"), (".gate_up_proj", ".up_proj"),
]
EXPERT_CHECKPOINT_NAMES = ("w1", "w2", "w3")  # fused_moe_make_expert_params_mapping(ckpt_gate_proj_name="w1", ...)
MOE_SCHEME_LOOKUP = ("gate_proj", "up_proj", "down_proj")  # RoutedExperts' default ckpt names, which KimiMoE keeps


def is_equal_or_regex_match(value: str, target: str, check_contains: bool = False) -> bool:
    """vllm/model_executor/layers/quantization/utils/config_utils.py: is_equal_or_regex_match (no fnmatch)."""
    if target.startswith("re:"):
        return re.match(target[3:], value) is not None
    if check_contains:
        return target.lower() in value.lower()
    return target == value


def find_matching_patterns(layer_name: str, patterns, fused_mapping) -> list[set[str]]:
    """config_utils.py: find_matching_patterns."""
    matches = [p for p in patterns if is_equal_or_regex_match(layer_name, p)]
    if matches:
        return [set(matches)]
    proj_name = layer_name.split(".")[-1]
    if proj_name not in fused_mapping:
        return [set()]
    shard_names = [layer_name.replace(proj_name, shard) for shard in fused_mapping[proj_name]]
    return [{p for p in patterns if is_equal_or_regex_match(shard, p)} for shard in shard_names]


def should_ignore_layer(layer_name: str, ignore, fused_mapping) -> bool:
    """compressed_tensors/utils.py: should_ignore_layer."""
    shards_ignored = [len(m) > 0 for m in find_matching_patterns(layer_name, ignore, fused_mapping)]
    if any(shards_ignored) and not all(shards_ignored):
        raise ValueError(f"Found different quantization schemes for the shards of {layer_name}. vLLM requires all "
                         "to use the same scheme.")
    return all(shards_ignored)


def _find_first_match(value: str, targets, check_contains: bool = False) -> str | None:
    return next((t for t in targets if is_equal_or_regex_match(value, t, check_contains)), None)


def _match_fused_layer(layer_name: str, targets, fused_mapping) -> str | None:
    """compressed_tensors/utils.py: _match_fused_layer (every shard must match some target)."""
    fused = next((key for key in fused_mapping if layer_name.endswith(key)), None)
    if fused is None:
        return None
    matches = [_find_first_match(layer_name.replace(fused, unfused), targets) for unfused in fused_mapping[fused]]
    return matches[0] if all(matches) else None


def find_matched_target(layer_name: str, class_name: str, targets, fused_mapping) -> str | None:
    """compressed_tensors/utils.py: find_matched_target: the layer name, then its fused shards, then the class name
    (by substring)."""
    return (_find_first_match(layer_name, targets) or _match_fused_layer(layer_name, targets, fused_mapping)
            or _find_first_match(class_name, targets, True))


class CompressedTensorsConfig:
    """compressed_tensors.py: CompressedTensorsConfig's target_scheme_map (a later group's target overwrites an
    earlier one's), get_scheme_dict, and the "RoutedExperts" alias of "Linear" (_add_fused_moe_to_target_scheme_map)."""

    def __init__(self, quantization_config: dict):
        self.ignore = quantization_config.get("ignore", [])
        self.target_scheme_map = {t: g["weights"] for g in quantization_config["config_groups"].values()
                                  for t in g["targets"]}
        if "Linear" in self.target_scheme_map and "RoutedExperts" not in self.target_scheme_map:
            self.target_scheme_map["RoutedExperts"] = self.target_scheme_map["Linear"]

    def get_scheme_dict(self, layer_name: str, class_name: str) -> dict | None:
        if should_ignore_layer(layer_name, self.ignore, PACKED_MODULES_MAPPING):
            return None
        target = find_matched_target(layer_name, class_name, self.target_scheme_map, PACKED_MODULES_MAPPING)
        return self.target_scheme_map[target] if target is not None else None

    def moe_scheme(self, experts_prefix: str) -> dict | None:
        """compressed_tensors_moe.py: get_moe_method looks the scheme up at experts.0.{gate,up,down}_proj."""
        found = [self.get_scheme_dict(f"{experts_prefix}.0.{p}", "RoutedExperts") for p in MOE_SCHEME_LOOKUP]
        if any(f != found[-1] for f in found):
            raise ValueError("All MoE projections need to have same quantization scheme but found multiple")
        return found[-1]


def vllm_modules(c: KimiLinearConfig) -> dict[str, str | None]:
    """The quantizable modules KimiLinearForCausalLM builds, by prefix -> class name; None for a layer built without
    the quant config (always unquantized): kimi_gdn_linear_attn.py (KDA), nvidia/mla.py (MLA, no q_lora_rank),
    nvidia/model.py (KimiMLP, KimiMoE with GateLinear and FusedMoE, ParallelLMHead)."""
    out: dict[str, str | None] = {"lm_head": "ParallelLMHead"}
    for i in range(c.num_hidden_layers):
        a, f = f"model.layers.{i}.self_attn", f"model.layers.{i}"
        if c.is_kda(i):
            out |= {f"{a}.in_proj_qkvgfab": "MergedColumnParallelLinear", f"{a}.f_b_proj": "ColumnParallelLinear",
                    f"{a}.g_a_proj": "ReplicatedLinear", f"{a}.g_b_proj": "ColumnParallelLinear",
                    f"{a}.o_proj": "RowParallelLinear", f"{a}.conv1d": None}
        else:
            out |= {f"{a}.q_proj": "ColumnParallelLinear", f"{a}.kv_a_proj_with_mqa": "ReplicatedLinear",
                    f"{a}.kv_b_proj": "ColumnParallelLinear", f"{a}.o_proj": "RowParallelLinear"}
        if c.is_moe(i):
            m = f"{f}.block_sparse_moe"
            out |= {f"{m}.gate": None, f"{m}.experts": "RoutedExperts",
                    f"{m}.shared_experts.gate_up_proj": "MergedColumnParallelLinear",
                    f"{m}.shared_experts.down_proj": "RowParallelLinear"}
        else:
            out |= {f"{f}.mlp.gate_up_proj": "MergedColumnParallelLinear", f"{f}.mlp.down_proj": "RowParallelLinear"}
    return out


def destination(module: str, modules: dict) -> str | None:
    """load_weights: the vLLM module a checkpoint module's tensors load into (stacked, then expert, then direct)."""
    for fused, member in STACKED_PARAMS_MAPPING:
        if member in module and module.replace(member, fused) in modules:
            return module.replace(member, fused)
    expert = re.fullmatch(r"(.*\.experts)\.\d+\.(\w+)", module)
    if expert and expert[2] in EXPERT_CHECKPOINT_NAMES:
        return expert[1]
    return module if module in modules else None
# ---- end of the transcription ------------------------------------------------------------------------------------


def vllm_scheme(ct: CompressedTensorsConfig, prefix: str, class_name: str | None) -> dict | None:
    if class_name is None:
        return None
    if class_name == "RoutedExperts":
        return ct.moe_scheme(prefix)
    if class_name == "ParallelLMHead":
        try:
            return ct.get_scheme_dict(prefix, class_name)
        except ValueError:
            return None
    return ct.get_scheme_dict(prefix, class_name)


def same_scheme(args: dict | None, stored: QuantScheme | None) -> bool:
    if args is None or stored is None:
        return args is None and stored is None
    group = None if stored.group_size == CHANNEL else stored.group_size
    return (args["num_bits"], args["symmetric"], args.get("group_size"), args.get("type", "int")) == \
        (stored.bits, stored.symmetric, group, "int")


def check_like_vllm(quantization_config: dict, config: KimiLinearConfig, stored: dict[str, QuantScheme | None]):
    """Raise AssertionError (or vLLM's ValueError) unless vLLM builds every module with the scheme its checkpoint
    tensors are stored in. `stored`: each linear module's name -> its stored scheme (None: kept as released)."""
    ct = CompressedTensorsConfig(quantization_config)
    modules = vllm_modules(config)
    built = {prefix: vllm_scheme(ct, prefix, cls) for prefix, cls in modules.items()}
    for module, scheme in stored.items():
        dest = destination(module, modules)
        assert dest is not None, f"{module} has no destination in vLLM's KimiLinearForCausalLM"
        assert same_scheme(built[dest], scheme), f"{module} stored as {scheme}, vLLM builds {dest} with {built[dest]}"


def stored_linear_modules(names_and_shapes, scheme_of) -> dict[str, QuantScheme | None]:
    return {n.removesuffix(".weight"): scheme_of(n, s) for n, s in names_and_shapes
            if n.endswith(".weight") and len(s) in (2, 3) and "norm" not in n and "embed_tokens" not in n}


@pytest.fixture(scope="module")
def outputs(tiny_released, tmp_path_factory):
    """Our default outputs and every recipe's output of the tiny model, written by `quantize` (folder by label)."""
    root = tmp_path_factory.mktemp("vllm")
    made = {label: quantize(tiny_released, root / label, device="cpu", progress=False, **opts).path
            for label, opts in DEFAULTS.items()}
    made |= {p.stem: quantize(tiny_released, root / p.stem, recipe=p, device="cpu", progress=False).path
             for p in RECIPES}
    names = [(n, s.shape) for n, s in open_checkpoint(tiny_released).expected.items()]
    (root / "kept.yaml").write_text(kept_policy().check_against(names).to_recipe_yaml())
    made[KEPT] = quantize(tiny_released, root / KEPT, recipe=root / "kept.yaml", device="cpu", progress=False).path
    return made


def test_the_transcribed_fused_modules_are_ours():
    ours = {f.name: [m.split("\\.")[-1] for m in f.members] for f in VLLM_FUSED_MODULES}
    for name in ("in_proj_qkvgfab", "gate_up_proj", "conv1d"):
        assert sorted(ours[name]) == sorted(PACKED_MODULES_MAPPING[name]), name
    assert sorted(ours["experts"]) == sorted(EXPERT_CHECKPOINT_NAMES)


@pytest.mark.parametrize("label", [*DEFAULTS, *(p.stem for p in RECIPES), KEPT])
def test_vllm_builds_every_module_as_the_folder_stores_it(outputs, label):
    ckpt = open_checkpoint(outputs[label])
    assert set(ckpt.sources) == set(ckpt.expected)  # written under the released names, nothing else
    stored = stored_linear_modules(((n, s.shape) for n, s in ckpt.expected.items()),
                                   lambda n, s: ckpt.sources[n].scheme
                                   if isinstance(ckpt.sources[n], QuantizedSource) else None)
    config = json.loads((outputs[label] / "config.json").read_text())
    check_like_vllm(config["quantization_config"], ckpt.config, stored)


@pytest.mark.parametrize("label", [*DEFAULTS, *(p.stem for p in RECIPES), KEPT])
def test_vllm_rules_hold_at_the_released_shapes(label):
    config = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b"))
    names = [(n, s.shape) for n, s in expected_tensors(config).items()]
    recipe = next((p for p in RECIPES if p.stem == label), None)
    policy = (load_recipe(recipe).policy if recipe else kept_policy() if label == KEPT
              else policy_from_options(**DEFAULTS[label])).check_against(names)
    if label == KEPT:  # KDA q/k/v/b/f_a kept, MLA q_proj (same name) quantized
        assert policy.scheme_for("model.layers.0.self_attn.q_proj.weight", (4096, 2304)) is None
        assert policy.scheme_for("model.layers.0.self_attn.f_a_proj.weight", (128, 2304)) is None
        assert policy.scheme_for("model.layers.3.self_attn.q_proj.weight", (6144, 2304)) is not None
    check_like_vllm(policy.quantization_config(), config, stored_linear_modules(names, policy.scheme_for))


SPLIT_RECIPE = r"""quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: ["re:.*\\.(block_sparse_moe|mlp)\\.gate$", "re:.*\\.(f_a|f_b|g_a|g_b|b)_proj$", "re:.*conv1d$"]
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}
"""


def test_a_split_fused_module_is_refused_as_vllm_refuses_it(tiny_released, tmp_path):
    recipe = tmp_path / "split.yaml"
    recipe.write_text(SPLIT_RECIPE)
    with pytest.raises(KLError, match=r"model\.layers\.0\.self_attn\.in_proj_qkvgfab: vLLM fuses q_proj, k_proj, "
                                      r"v_proj, b_proj, f_a_proj into one module.*--allow-split-fused"):
        quantize(tiny_released, tmp_path / "out", recipe=recipe, device="cpu", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    out = quantize(tiny_released, tmp_path / "out", recipe=recipe, device="cpu", progress=False,
                   allow_split_fused=True).path  # the user says the folder never goes to vLLM
    ckpt = open_checkpoint(out)
    stored = stored_linear_modules(((n, s.shape) for n, s in ckpt.expected.items()),
                                   lambda n, s: ckpt.sources[n].scheme
                                   if isinstance(ckpt.sources[n], QuantizedSource) else None)
    with pytest.raises(ValueError, match="Found different quantization schemes for the shards of "
                                         r"model\.layers\.0\.self_attn\.in_proj_qkvgfab"):
        check_like_vllm(json.loads((out / "config.json").read_text())["quantization_config"], ckpt.config, stored)


def test_experts_named_only_by_w1_w2_w3_are_refused():
    """vLLM looks the routed experts' scheme up at experts.0.gate_proj, so a target naming only w1/w2/w3 would leave
    them to "Linear" (here: nothing) while the checkpoint holds them packed."""
    # not re:.*_(proj|mqa)$: llm-compressor names the routed experts gate_proj, up_proj, down_proj (name_map)
    everything_kept = '"re:.*\\\\.(self_attn|shared_experts|mlp)\\\\.\\\\w+_(proj|mqa)$", "lm_head"'
    recipe = parse_recipe(SPLIT_RECIPE.replace('"re:.*\\\\.(f_a|f_b|g_a|g_b|b)_proj$"', everything_kept)
                          .replace('["Linear"]', r'["re:.*\\.experts\\.\\d+\\.w[123]$"]'), "experts.yaml")
    config = KimiLinearConfig.from_dict(preset_config("tiny"))
    names = [(n, s.shape) for n, s in expected_tensors(config).items()]
    policy = recipe.policy.check_against(names)
    with pytest.raises(KLError, match=r"model\.layers\.1\.block_sparse_moe\.experts: vLLM looks this fused module's "
                                      r"scheme up under model\.layers\.1\.block_sparse_moe\.experts\.0\.gate_proj"):
        refuse_split_fused(policy, names)
    with pytest.raises(AssertionError, match=r"experts\.0\.w1 stored as"):
        check_like_vllm(policy.quantization_config(), config, stored_linear_modules(names, policy.scheme_for))


def test_the_cli_refuses_a_split_in_one_line_and_takes_the_flag(tiny_released, tmp_path, capsys):
    from testkit import assert_one_line_error, run_cli

    recipe = tmp_path / "split.yaml"
    recipe.write_text(SPLIT_RECIPE)
    code, _, err = run_cli(capsys, "quantize", tiny_released, tmp_path / "out", "--recipe", recipe, "--device", "cpu")
    assert_one_line_error(code, err, "in_proj_qkvgfab", "--allow-split-fused")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    code, out, err = run_cli(capsys, "quantize", tiny_released, tmp_path / "out", "--recipe", recipe, "--device", "cpu",
                             "--allow-split-fused")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "out")


OLD_32GB_GROUPS = r"""quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: ["re:.*\\.(block_sparse_moe|mlp)\\.gate$", "re:.*\\.(f_b|g_a|g_b)_proj$", "re:.*conv1d$"]
      config_groups:
        experts:
          targets: ["Linear"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}
        dense_paths:
          targets: ["re:.*\\.shared_experts\\.(gate|up|down)_proj$"]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: group, group_size: 128}
        lm_head:
          targets: ["lm_head"]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: group, group_size: 128}
"""


SPELLED_RIGHT = [(r"shared_experts\\.", r"shared_\\w+\\."), ('["lm_head"]', '["re:^lm_head$"]')]


@pytest.mark.parametrize("wrong,group", [(0, "dense_paths"), (1, "lm_head")],
                         ids=["experts-in-a-regex", "plain-lm_head"])
def test_groups_transformers_would_read_the_experts_with_are_refused(wrong, group):
    """transformers 5.17-5.24 read the routed experts with the first group whose re: target mentions "experts",
    else the first group with a plain target (the "Linear" group is written last)."""
    config = KimiLinearConfig.from_dict(preset_config("tiny"))
    names = [(n, s.shape) for n, s in expected_tensors(config).items()]
    text = OLD_32GB_GROUPS
    for i, (old, new) in enumerate(SPELLED_RIGHT):
        if i != wrong:
            text = text.replace(old, new)
    with pytest.raises(KLError, match=f"transformers reads the routed experts with the scheme of group {group}"):
        parse_recipe(text, "r.yaml").policy.check_against(names)
    for old, new in SPELLED_RIGHT:
        text = text.replace(old, new)
    parse_recipe(text, "r.yaml").policy.check_against(names)


def test_pull_and_quantize_refuses_a_split_before_downloading(tmp_path, monkeypatch):
    import klconvert.quantize as quantize_module

    def no_pull(*args, **kwargs):
        raise AssertionError("pulled before refusing")

    monkeypatch.setattr(quantize_module, "pull", no_pull)
    recipe = tmp_path / "split.yaml"
    recipe.write_text(SPLIT_RECIPE)
    with pytest.raises(KLError, match=r"model\.layers\.0\.self_attn\.in_proj_qkvgfab: vLLM fuses"):
        quantize_module.pull_and_quantize("moonshotai/Kimi-Linear-48B-A3B-Instruct", tmp_path / "out", recipe=recipe)
