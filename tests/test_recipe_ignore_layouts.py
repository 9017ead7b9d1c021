"""A recipe's ignore entries name modules as llm-compressor matches them, which sees a checkpoint in transformers'
module names whatever its layout on disk (transformers renames a released one as it loads it): an entry in the released,
transformers or llm-compressor names keeps that module unquantized from either source layout, and the written folder
lists it by its released name too (vLLM's, and klconvert's own reader's). An entry naming no module in any layout is
refused, where compressed-tensors (0.20.1, match_named_modules) applies it to nothing without a word."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from klconvert.checkpoint.name_map import expected_tensors, layout_names
from klconvert.checkpoint.reader import Checkpoint
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError
from klconvert.presets import preset_config
from klconvert.quant import load_recipe, parse_recipe, policy_from_options
from klconvert.quant.bnb_declared import bnb_declared
from klconvert.quant.policy import converted_module, is_linear_weight, kept_in_high_precision, match_key
from testkit import assert_one_line_error, run_cli

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
KIMI = {name: spec.shape for name, spec in expected_tensors(KimiLinearConfig.from_dict(
    preset_config("kimi-linear-48b"))).items()}


def recipe_text(*ignore: str) -> str:
    """A recipe quantizing every linear layer to int4 in groups of 32 but the router, the KDA low-rank gates, the
    convolutions and lm_head; then `ignore`, the entries from line 11 on."""
    entries = ["re:.*\\.(block_sparse_moe|mlp)\\.gate$", "re:.*\\.(f_b|g_a|g_b)_proj$", "re:.*conv1d$", "lm_head",
               *ignore]
    return textwrap.dedent("""\
        quant_stage:
          quant_modifiers:
            QuantizationModifier:
              config_groups:
                group_0:
                  targets: [Linear]
                  weights: {num_bits: 4, group_size: 32}
              ignore:
        """) + "".join(f"        - {json.dumps(entry)}\n" for entry in entries)


@pytest.mark.parametrize("layout", ["released", "transformers"])
def test_ignore_entries_in_transformers_and_llm_compressor_names_keep_their_modules_unquantized(
        layout, tiny_released, tiny_transformers, tmp_path, capsys):
    """h188: `model.layers.0.self_attn.forget_gate.f_a_proj` (transformers' name for the released self_attn.f_a_proj)
    matched nothing klconvert matched against, and the module was quantized, exit 0, where llm-compressor keeps it
    float. Layer 1's routed gate projections are named as llm-compressor linearizes them (mlp.experts.E.gate_proj)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text("model.layers.0.self_attn.forget_gate.f_a_proj",
                                  "re:model\\.layers\\.1\\.mlp\\.experts\\.\\d+\\.gate_proj$"))
    src = tiny_released if layout == "released" else tiny_transformers
    code, _, err = run_cli(capsys, "quantize", src, tmp_path / "q", "--recipe", recipe, "--allow-split-fused")
    assert code == 0, err
    stored = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.f_a_proj.weight" in stored   # kept as it is
    assert "model.layers.1.block_sparse_moe.experts.15.w1.weight" in stored
    assert "model.layers.1.block_sparse_moe.experts.15.w3.weight_packed" in stored   # its neighbour quantized
    assert "model.layers.2.block_sparse_moe.experts.0.w1.weight_packed" in stored    # and the next layer's
    ignore = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore[4:] == ["model.layers.0.self_attn.forget_gate.f_a_proj", "model.layers.0.self_attn.f_a_proj",
                          "re:model\\.layers\\.1\\.mlp\\.experts\\.\\d+\\.gate_proj$",
                          "re:model\\.layers\\.1\\.block_sparse_moe\\.experts\\.\\d+\\.w1$"]
    Checkpoint(tmp_path / "q")   # klconvert's reader finds every float-stored weight listed in ignore


def test_the_written_ignore_list_selects_by_released_names_what_the_recipe_selects_in_any_layout():
    """On the 48B's tensors: whatever modules entries in other layouts' names select, the entries check_against adds
    select exactly those by their released names, in few lines."""
    recipe = parse_recipe(recipe_text("re:.*\\.mlp\\.shared_experts\\..*", "re:.*forget_gate\\.f_a_proj$",
                                      "re:model\\.layers\\.(1|2)\\.mlp\\.experts\\.(3|7)\\.down_proj$",
                                      "re:model\\.layers\\.5\\.mlp\\.experts\\.\\d+\\..*"), "recipe.yaml")
    checked = recipe.policy.check_against(KIMI.items())
    linear = [(name, shape) for name, shape in KIMI.items() if is_linear_weight(name, shape)]
    kept = {match_key(name) for name, shape in linear if checked.scheme_for(name, shape) is None}
    written = {match_key(name) for name, _ in linear if any(e.matches(match_key(name), False) for e in checked.ignore)}
    assert written == kept
    assert {"model.layers.2.block_sparse_moe.experts.7.w2", "model.layers.5.block_sparse_moe.experts.255.w3"} < kept
    assert not {"model.layers.2.block_sparse_moe.experts.6.w2", "model.layers.6.block_sparse_moe.experts.0.w3"} & kept
    assert [e.pattern for e in checked.ignore[-2:]] == [
        "re:model\\.layers\\.5\\.mlp\\.experts\\.\\d+\\..*",
        "re:model\\.layers\\.5\\.block_sparse_moe\\.experts\\.\\d+\\.w\\d+$"]
    assert len(checked.ignore) - len(recipe.policy.ignore) == 6   # the shared experts' 3, f_a, w2, layer 5's


def test_layout_names_read_the_name_table_backwards():
    assert layout_names("model.layers.0.self_attn.f_a_proj.weight") == (
        "model.layers.0.self_attn.forget_gate.f_a_proj.weight",)
    assert layout_names("model.layers.1.block_sparse_moe.experts.3.w3.weight") == (
        "model.layers.1.mlp.experts.3.up_proj.weight",)
    assert layout_names("model.layers.0.self_attn.q_conv1d.weight") == ("model.layers.0.self_attn.conv1d.weight",)
    assert layout_names("lm_head.weight") == ()



def test_layout_names_are_the_names_transformers_and_llm_compressor_give_modules_in_memory():
    """h197: the names only a save writes (layer 0's dense MLP and llm-compressor's linearized experts under
    block_sparse_moe.) were aliases too, which no tool matches an ignore list against. Each tensor's names, released
    and aliases, are exactly those of the modules (a parameter's where its module holds others) of transformers'
    model in memory, its routed experts linearized as llm-compressor does."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    settings = {key: value for key, value in preset_config("tiny").items()
                if key not in ("architectures", "auto_map", "model_type")}
    config = KimiLinearConfig.from_dict(preset_config("tiny"))
    with torch.device("meta"):
        model = transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(**settings))
    held = [name for name, _ in (*model.named_parameters(), *model.named_buffers())]   # the router's bias a buffer
    in_memory = {match_key(name) for name in held if not name.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    in_memory |= {f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj" for layer in range(config.num_hidden_layers)
                  if config.is_moe(layer) for e in range(config.num_experts) for proj in ("gate", "up", "down")}
    named = {}
    for name in expected_tensors(config):
        keys = [match_key(name), *(match_key(alias) for alias in layout_names(name))]
        named[name] = [key for key in keys if key in in_memory]
        assert set(keys[1:]) <= in_memory, name
    assert {key for keys in named.values() for key in keys} == in_memory
    assert layout_names("model.layers.0.mlp.gate_proj.weight") == ()
    assert layout_names("model.layers.1.block_sparse_moe.experts.3.w1.weight") == (
        "model.layers.1.mlp.experts.3.gate_proj.weight",)


def test_an_entry_for_the_moe_blocks_leaves_layer_0s_dense_mlp_alone():
    """h197: `re:.*\\.block_sparse_moe\\..*` kept layer 0's dense MLP float too (transformers' save writes it as
    block_sparse_moe.gate_proj, which was an alias), and an entry naming it so was taken."""
    recipe = parse_recipe(recipe_text("re:.*\\.block_sparse_moe\\..*"), "recipe.yaml")
    checked = recipe.policy.check_against(KIMI.items())
    dense = "model.layers.0.mlp.gate_proj.weight"
    assert checked.scheme_for(dense, KIMI[dense]) is not None
    routed = "model.layers.1.block_sparse_moe.experts.7.w2.weight"
    assert checked.scheme_for(routed, KIMI[routed]) is None
    with pytest.raises(KLError, match="recipe.yaml:13: ignore entry .* names no module"):
        parse_recipe(recipe_text("re:model\\.layers\\.0\\.block_sparse_moe\\..*"), "recipe.yaml").policy.check_against(
            KIMI.items())


def test_a_shipped_recipe_with_two_dozen_ordinary_ignore_entries_plans_on_the_48b(tmp_path, capsys):
    """h197: matching each entry against every tensor's aliases too took 32gb.yaml and 24 entries like these past the
    regex budget, refused as a pattern that backtracks without end; 32 such entries passed before."""
    text = (Path(__file__).parent.parent / "recipes" / "32gb.yaml").read_text()
    conv = '        - "re:.*conv1d$"'
    assert conv in text
    entries = "".join(f'\n        - "re:.*\\\\.layers\\\\.{layer}\\\\.self_attn\\\\.o_proj$"' for layer in range(24))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace(conv, conv + entries, 1))
    code, _, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--recipe", recipe)
    assert code == 0, err


def test_an_entry_is_tried_on_an_alias_only_where_it_ends_as_the_entry_must():
    """Why the aliases cost the budget next to nothing: an entry ending in literal text is matched against the
    released name of every tensor, and against no alias that ends otherwise (most are the routed experts')."""
    recipe = parse_recipe(recipe_text("re:.*\\.layers\\.3\\.self_attn\\.o_proj$"), "recipe.yaml")
    entry, tried = recipe.policy.ignore[-1], []
    compiled = entry.compiled
    object.__setattr__(entry, "compiled", SimpleNamespace(
        match=lambda key, timeout: tried.append(key) or compiled.match(key, timeout=timeout)))
    recipe.policy.check_against(KIMI.items())
    assert sorted(tried) == sorted(match_key(name) for name in KIMI)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_an_entry_skips_only_aliases_it_does_not_match(path):
    """The literal start and end an alias is checked against first (Entry.matches_alias) rule out no alias the
    pattern matches, on tiny's aliases, for every shipped recipe's ignore entries and patterns of other forms."""
    tiny = expected_tensors(KimiLinearConfig.from_dict(preset_config("tiny")))
    aliases = [match_key(alias) for name in tiny for alias in layout_names(name)]
    others = parse_recipe(recipe_text(
        "re:^model\\.layers\\.1\\.mlp\\.experts\\.\\d+\\.(gate|up)_proj\\Z", "re:.*[qkv]_conv1d$",
        "re:(?i).*SHARED_EXPERTS\\.DOWN_PROJ$", "re:.*\\.mlp\\.shared_experts\\..*",
        "re:model\\.layers\\.(?:2|3)\\.self_attn\\.forget_gate\\.f_(a|b)_proj$",
        # nothing literal before the end, or an empty alternative there (h200: these matched no alias)
        "re:.*\\.mlp\\.shared_experts\\..*$", "re:model\\.layers\\.[01]\\.mlp\\..*$", "re:.*experts\\.\\d+$",
        "re:.*\\.mlp\\.shared_experts\\.(?:gate|up|)_proj\\Z", "re:(?:model|)\\.layers\\.1\\.mlp\\.shared_experts.*"),
        "recipe.yaml").policy.ignore
    for entry in (*load_recipe(path).policy.ignore, *others):
        assert [a for a in aliases if entry.matches_alias(a)] == [a for a in aliases if entry.matches(a, False)], entry


NEAREST_F_A = "model.layers.0.self_attn.forget_gate.f_a_proj or model.layers.6.self_attn.forget_gate.f_a_proj"


@pytest.mark.parametrize("entry,nearest", [
    ("model.layers.0.self_attn.forget.f_a_proj", NEAREST_F_A),
    ("model.layers.1", "model.layers.1.mlp.gate or model.layers.7.mlp.gate"),   # a parent: its children stay
    ("re:.*forget_gates\\..*", "model.layers.6.self_attn.forget_gate.A_log or model.layers.5.self_attn.forget_gate"
                              ".A_log"),
], ids=["typo", "parent", "re"])
@pytest.mark.parametrize("command", ["quantize", "plan"])
def test_an_ignore_entry_naming_no_module_is_refused(command, entry, nearest, tiny_released, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(entry))
    args = (("quantize", tiny_released, tmp_path / "q") if command == "quantize" else ("plan", "--model", "tiny"))
    code, _, err = run_cli(capsys, *args, "--recipe", recipe)
    line = assert_one_line_error(code, err)
    assert line == (f"klconvert: error: {recipe}:13: ignore entry {entry!r} names no module of this model in the "
                    "released, transformers or llm-compressor layout, so it would keep nothing unquantized; fix it "
                    f"(the nearest module names: {nearest}) or remove it")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipes_ignore_entries_name_modules_of_tiny_and_the_48b(path):
    policy = load_recipe(path).policy
    policy.check_against(KIMI.items())
    tiny = expected_tensors(KimiLinearConfig.from_dict(preset_config("tiny")))
    policy.check_against((name, spec.shape) for name, spec in tiny.items())


def test_only_a_recipe_is_held_to_its_ignore_entries():
    """The flags' policy names the modules any Kimi Linear may have (not strict): a model cut to one layer, whose MLP
    is dense, takes it; a recipe's entry naming the MoE router is refused there."""
    one_layer = [(name, spec.shape) for name, spec in expected_tensors(KimiLinearConfig.from_dict(
        preset_config("kimi-linear-48b", 1))).items()]
    policy_from_options(4, 128).check_against(one_layer)
    with pytest.raises(KLError, match="recipe.yaml:9: ignore entry .* names no module") as e:
        parse_recipe(recipe_text(), "recipe.yaml").policy.check_against(one_layer)
    assert "(block_sparse_moe|mlp)" in str(e.value)


def test_a_pattern_written_for_the_released_projection_names_keeps_the_routed_experts_too():
    """The README's warning: llm-compressor names the routed experts gate_proj/up_proj/down_proj, so an ignore pattern
    meant for the shared experts' and the dense MLP's projections keeps the routed experts unquantized as well."""
    recipe = parse_recipe(recipe_text("re:.*\\.(gate|up|down)_proj$"), "recipe.yaml")
    checked = recipe.policy.check_against(KIMI.items())
    assert checked.scheme_for("model.layers.1.block_sparse_moe.experts.7.w2.weight", KIMI[
        "model.layers.1.block_sparse_moe.experts.7.w2.weight"]) is None
    assert checked.scheme_for("model.layers.1.self_attn.q_proj.weight", KIMI[
        "model.layers.1.self_attn.q_proj.weight"]) is not None


@pytest.mark.parametrize("entries", [
    ("re:.*\\.block_sparse_moe\\.shared_experts\\..*", "re:.*self_attn\\.f_a_proj$", "model.layers.3.self_attn.o_proj"),
    # matched from the name's start, as compressed-tensors does, but not to a module boundary (h200)
    ("re:model\\.layers\\.1\\.self_attn\\.q", "re:.*shared_exp"),
], ids=["released-names", "no-boundary"])
def test_an_nf4_skip_list_keeps_out_of_4bit_as_transformers_reads_it_what_the_recipe_keeps(entries):
    """On the 48B's tensors: an nf4 folder writes ignore as llm_int8_skip_modules, which transformers matches against
    its in-memory names (mlp.shared_experts, self_attn.forget_gate.f_a_proj), each entry from the name's start to a
    module boundary or as its end; entries naming modules by their released names, or ending inside a name, kept
    nothing there, and transformers built Linear4bits for floats. Read as transformers reads it, the written list
    keeps out of 4-bit exactly the modules the recipe keeps (the routed experts it never converts)."""
    text = recipe_text(*entries).replace("{num_bits: 4, group_size: 32}",
                                                                   "{num_bits: 4, type: nf4, group_size: 64}")
    checked = parse_recipe(text, "recipe.yaml").policy.check_against(KIMI.items())
    declared = bnb_declared(checked.quantization_config(), "config.json")
    converted = {name: converted_module(name) for name, shape in KIMI.items()
                 if is_linear_weight(name, shape) and kept_in_high_precision(name) is None}
    kept = {module for name, module in converted.items() if module and checked.scheme_for(name, KIMI[name]) is None}
    skipped = {module for module in converted.values() if module and declared.skipped_by(module) is not None}
    assert skipped == kept
    assert {"model.layers.1.mlp.shared_experts.up_proj", "model.layers.3.self_attn.o_proj"
            if entries[-1].endswith("o_proj") else "model.layers.1.self_attn.q_proj"} < kept


def test_an_nf4_ignore_entry_transformers_cannot_compile_is_refused():
    """transformers wraps each llm_int8_skip_modules entry in a group; a global flag then stands mid-pattern, which
    Python's re refuses, and from_pretrained failed on the folder klconvert wrote, exit 0 (h200)."""
    text = recipe_text("re:(?i).*Q_PROJ").replace("{num_bits: 4, group_size: 32}",
                                                  "{num_bits: 4, type: nf4, group_size: 64}")
    with pytest.raises(KLError, match=re.escape("recipe.yaml:13: ignore entry 're:(?i).*Q_PROJ', written to an nf4 "
                                                "folder's llm_int8_skip_modules, as transformers matches it: ") +
                       ".*global flags not at the start"):
        parse_recipe(text, "recipe.yaml").policy.check_against(KIMI.items())
