"""Recipes (parsing, each error with its line) and policy decisions on the real Kimi Linear tensor list."""
import os
import textwrap

import pytest
from compressed_tensors.quantization import QuantizationConfig

from klconvert.errors import KLError
from klconvert.quant import QuantScheme, load_recipe, parse_recipe, policy_from_options
from klconvert.quant.group_rules import CHANNEL

MLA_LAYERS = {3, 7, 11, 15, 19, 23, 26}


def kimi_tensors():
    """Every tensor of Kimi-Linear-48B-A3B (reference/model.md): 20,493 (name, shape) pairs."""
    t = [("model.embed_tokens.weight", (163840, 2304)), ("model.norm.weight", (2304,)),
         ("lm_head.weight", (163840, 2304))]
    for i in range(27):
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", (2304,)), (p + "post_attention_layernorm.weight", (2304,))]
        a = p + "self_attn."
        if i in MLA_LAYERS:
            t += [(a + "q_proj.weight", (6144, 2304)), (a + "kv_a_proj_with_mqa.weight", (576, 2304)),
                  (a + "kv_a_layernorm.weight", (512,)), (a + "kv_b_proj.weight", (8192, 512)),
                  (a + "o_proj.weight", (2304, 4096))]
        else:
            t += [(a + f"{x}_proj.weight", (4096, 2304)) for x in "qkv"]
            t += [(a + f"{x}_conv1d.weight", (4096, 1, 4)) for x in "qkv"]
            t += [(a + "A_log", (1, 1, 32, 1)), (a + "dt_bias", (4096,)), (a + "f_a_proj.weight", (128, 2304)),
                  (a + "f_b_proj.weight", (4096, 128)), (a + "b_proj.weight", (32, 2304)),
                  (a + "g_a_proj.weight", (128, 2304)), (a + "g_b_proj.weight", (4096, 128)),
                  (a + "o_norm.weight", (128,)), (a + "o_proj.weight", (2304, 4096))]
        if i == 0:
            t += [(p + "mlp.gate_proj.weight", (9216, 2304)), (p + "mlp.up_proj.weight", (9216, 2304)),
                  (p + "mlp.down_proj.weight", (2304, 9216))]
        else:
            m = p + "block_sparse_moe."
            t += [(m + "gate.weight", (256, 2304)), (m + "gate.e_score_correction_bias", (256,))]
            for e in range(256):
                t += [(m + f"experts.{e}.w1.weight", (1024, 2304)), (m + f"experts.{e}.w2.weight", (2304, 1024)),
                      (m + f"experts.{e}.w3.weight", (1024, 2304))]
            t += [(m + "shared_experts.gate_proj.weight", (1024, 2304)), (m + "shared_experts.up_proj.weight",
                  (1024, 2304)), (m + "shared_experts.down_proj.weight", (2304, 1024))]
    return t


KIMI = kimi_tensors()
INT4 = QuantScheme(4, 128, True)
INT8 = QuantScheme(8, 128, True)


def test_default_policy_on_kimi_linear():
    assert len(KIMI) == 20493
    policy = policy_from_options(bits=4, group_size=128, symmetric=True)
    assert policy.check_against(KIMI) == policy  # nothing unused, nothing refused
    decided = {name: policy.scheme_for(name, shape) for name, shape in KIMI}
    expected = {
        "model.layers.1.block_sparse_moe.experts.0.w1.weight": INT4,
        "model.layers.26.block_sparse_moe.experts.255.w2.weight": INT4,
        "model.layers.5.block_sparse_moe.experts.17.w3.weight": INT4,
        "model.layers.1.block_sparse_moe.shared_experts.down_proj.weight": INT4,
        "model.layers.0.mlp.gate_proj.weight": INT4,
        "model.layers.0.mlp.down_proj.weight": INT4,
        "model.layers.0.self_attn.q_proj.weight": INT4,
        "model.layers.0.self_attn.v_proj.weight": INT4,
        "model.layers.0.self_attn.o_proj.weight": INT4,
        "model.layers.3.self_attn.q_proj.weight": INT4,
        "model.layers.3.self_attn.kv_a_proj_with_mqa.weight": INT4,
        "model.layers.3.self_attn.kv_b_proj.weight": INT4,
        "lm_head.weight": INT8,
        "model.layers.1.block_sparse_moe.gate.weight": None,
        "model.layers.1.block_sparse_moe.gate.e_score_correction_bias": None,
        "model.layers.0.self_attn.A_log": None,
        "model.layers.0.self_attn.dt_bias": None,
        "model.layers.0.self_attn.q_conv1d.weight": None,
        "model.layers.0.self_attn.f_a_proj.weight": INT4,  # vLLM fuses it with q/k/v (in_proj_qkvgfab)
        "model.layers.0.self_attn.f_b_proj.weight": None,
        "model.layers.0.self_attn.g_a_proj.weight": None,
        "model.layers.0.self_attn.g_b_proj.weight": None,
        "model.layers.0.self_attn.b_proj.weight": INT4,  # likewise
        "model.layers.0.self_attn.o_norm.weight": None,
        "model.layers.3.self_attn.kv_a_layernorm.weight": None,
        "model.layers.2.input_layernorm.weight": None,
        "model.embed_tokens.weight": None,
        "model.norm.weight": None,
    }
    for name, scheme in expected.items():
        assert decided[name] == scheme, name
    counts = {s: sum(1 for v in decided.values() if v == s) for s in (INT4, INT8, None)}
    # 26*256*3 experts + 26*3 shared + 3 dense + 20*6 KDA + 7*4 MLA at int4; lm_head at int8
    assert counts == {INT4: 19968 + 78 + 3 + 120 + 28, INT8: 1, None: 20493 - 20197 - 1}
    params = dict(KIMI)
    quantized = sum(params[n][0] * params[n][1] for n, s in decided.items() if s is not None)
    # of 49,122,681,728: the rest is embedding, router, gates, norms; b_proj and f_a_proj add 20*(32+128)*2304
    assert quantized == 48_694_411_264 + 7_372_800


def test_quantization_config_validates_in_compressed_tensors():
    cfg = policy_from_options(bits=4, group_size=64, symmetric=False).quantization_config()
    qc = QuantizationConfig.model_validate(cfg)
    assert qc.format == "pack-quantized" and qc.quantization_status == "compressed"
    by_target = {tuple(g.targets): g.weights for g in qc.config_groups.values()}
    assert by_target[("Linear",)].num_bits == 4 and not by_target[("Linear",)].symmetric
    assert by_target[("Linear",)].strategy == "group" and by_target[("Linear",)].group_size == 64
    assert by_target[("re:^lm_head$",)].num_bits == 8 and by_target[("re:^lm_head$",)].symmetric
    assert list(cfg["config_groups"])[0] == "group_1"  # the lm_head group before the "Linear" one
    assert r"re:.*\.(block_sparse_moe|mlp)\.gate$" in qc.ignore
    channel = policy_from_options(bits=8, group_size=CHANNEL, lm_head_bits=None).quantization_config()
    qc = QuantizationConfig.model_validate(channel)
    assert [g.weights.strategy for g in qc.config_groups.values()] == ["channel"]
    assert "lm_head" in qc.ignore


RECIPE = textwrap.dedent(r"""
    quant_stage:
      quant_modifiers:
        QuantizationModifier:
          ignore: ["lm_head", "re:.*block_sparse_moe\\.gate$", "re:.*\\.(f_a|f_b|g_a|g_b|b)_proj$"]
          config_groups:
            group_0:
              targets: ["re:.*experts.*", "re:.*self_attn\\.(q|k|v|o)_proj$"]
              weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}
            group_1:
              targets: ["re:.*kv_(a_proj_with_mqa|b_proj)$", "re:.*mlp\\.(gate|up|down)_proj$"]
              weights: {num_bits: 8, type: int, symmetric: false, strategy: channel}
    runtime:
      max_context: 131072
      kda_state_dtype: fp32
    """)


def test_recipe_parses_and_decides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    recipe = load_recipe(path)
    assert recipe.runtime == {"max_context": 131072, "kda_state_dtype": "fp32"}
    policy = recipe.policy.check_against(KIMI)
    assert policy == recipe.policy
    assert policy.scheme_for("model.layers.1.block_sparse_moe.experts.3.w2.weight", (2304, 1024)) == INT4
    assert policy.scheme_for("model.layers.1.block_sparse_moe.shared_experts.up_proj.weight", (1024, 2304)) == INT4
    assert policy.scheme_for("model.layers.3.self_attn.kv_b_proj.weight", (8192, 512)) == QuantScheme(8, CHANNEL, False)
    assert policy.scheme_for("model.layers.0.mlp.up_proj.weight", (9216, 2304)) == QuantScheme(8, CHANNEL, False)
    assert policy.scheme_for("lm_head.weight", (163840, 2304)) is None
    assert policy.scheme_for("model.layers.1.block_sparse_moe.gate.weight", (256, 2304)) is None


def test_recipe_takes_the_mse_observer(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("group_size: 128}", "group_size: 128, observer: mse}"))
    policy = load_recipe(path).policy
    expert = policy.scheme_for("model.layers.1.block_sparse_moe.experts.3.w2.weight", (2304, 1024))
    assert expert == QuantScheme(4, 128, True, observer="mse")
    assert policy.scheme_for("model.layers.0.mlp.up_proj.weight", (9216, 2304)).observer == "minmax"
    path.write_text(RECIPE.replace("group_size: 128}", "group_size: 128, observer: histogram}"))
    with pytest.raises(KLError, match="observer 'histogram' is not supported"):
        load_recipe(path)


@pytest.mark.parametrize("policy", [policy_from_options(), policy_from_options(8, 32, False, lm_head_bits=None),
                                    policy_from_options(scheme="nf4")])
def test_recipe_yaml_round_trips(tmp_path, policy):
    path = tmp_path / "recipe.yaml"
    path.write_text(policy.to_recipe_yaml(runtime={"max_context": 4096, "gpu_memory": "70GiB"}))
    back = load_recipe(path)
    assert back.policy.groups == policy.groups and back.policy.ignore == policy.ignore
    assert back.policy.strict and back.runtime == {"max_context": 4096, "gpu_memory": "70GiB"}


def error_for(text, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(KLError) as e:
        load_recipe(path).policy.check_against(KIMI)
    return str(e.value).replace(str(path), "bad.yaml")


HEAD = textwrap.dedent("""\
    quant_stage:
      quant_modifiers:
        QuantizationModifier:
          ignore: ["re:.*block_sparse_moe\\\\.gate$"]
          config_groups:
    """)  # 5 lines; the groups follow from line 6


def groups(text):
    """Config groups, written flush left, placed under config_groups."""
    return textwrap.indent(textwrap.dedent(text), " " * 8)


def checked(text, tmp_path):
    """The recipe `text`, checked against the Kimi Linear tensor list."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    return recipe, recipe.policy.check_against(KIMI)


def test_entries_match_names_as_compressed_tensors_does(tmp_path):
    """compressed-tensors (utils/match.py match_name) and vLLM match a name entry to that module alone, not to those
    whose names it begins (model.layers.1.self_attn.o_proj is not model.layers.10's; a parent's name, naming no
    weight, is refused: test_an_ignore_entry_naming_no_module_is_refused), and a re: pattern from the name's start
    (re.match: re:.*experts selects every expert): klconvert storing a weight otherwise than they read it would run a
    folder they cannot, or the reverse."""
    ignore = HEAD.replace('"]', '", "re:.*\\\\.(f_a|f_b|g_a|g_b|b)_proj$", "model.layers.1.self_attn.o_proj"]')
    recipe, policy = checked(ignore + groups("""\
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, group_size: 128}
        group_1:
          targets: ["re:.*experts"]
          weights: {num_bits: 8, group_size: 128}
    """), tmp_path)
    assert policy == recipe.policy
    assert policy.scheme_for("model.layers.1.block_sparse_moe.experts.0.w1.weight", (1024, 2304)) == INT8
    assert policy.scheme_for("model.layers.1.block_sparse_moe.shared_experts.up_proj.weight", (1024, 2304)) == INT8
    assert policy.scheme_for("model.layers.1.self_attn.o_proj.weight", (2304, 4096)) is None
    assert policy.scheme_for("model.layers.10.self_attn.o_proj.weight", (2304, 4096)) == INT4


def test_a_target_selecting_only_what_another_of_its_group_selects_is_used(tmp_path):
    """A target that selects only weights another target of its group selects too is used, as in compressed-tensors:
    a recipe naming expert 0's w2 beside every expert is not refused as one whose target selects nothing, and both stay
    in the recipe and quantization_config written beside the folder."""
    recipe, policy = checked(HEAD.replace('"]', '", "re:.*\\\\.(f_a|f_b|g_a|g_b|b)_proj$"]') + groups("""\
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, group_size: 128}
        group_1:
          targets: ["re:.*experts\\\\.", "re:.*experts\\\\.0\\\\.w2$"]
          weights: {num_bits: 8, group_size: 128}
    """), tmp_path)
    assert policy == recipe.policy
    assert [e.pattern for e in policy.groups[1].targets] == ["re:.*experts\\.", "re:.*experts\\.0\\.w2$"]


def test_a_group_whose_targets_select_nothing_is_dropped(tmp_path):
    """The default policy drops the targets that select nothing (a model's tensor list without lm_head leaves the
    lm_head group none), and a group left with no targets with them: one written with none would be a recipe.yaml
    that does not load back."""
    policy = policy_from_options(bits=4, group_size=128).check_against(
        [(name, shape) for name, shape in KIMI if name != "lm_head.weight"])
    assert [g.name for g in policy.groups] == ["group_0"]
    assert list(policy.quantization_config()["config_groups"]) == ["group_0"]
    path = tmp_path / "recipe.yaml"
    path.write_text(policy.to_recipe_yaml())
    assert load_recipe(path).policy.groups == policy.groups


def test_unknown_key_names_its_line(tmp_path):
    msg = error_for(HEAD + groups("""\
        group_0:
          targets: ["re:.*experts.*"]
          weights: {num_bits: 4, group_size: 128}
          wieghts: {num_bits: 8}
    """), tmp_path)
    assert msg.startswith("bad.yaml:9: unknown key 'wieghts' in config group 'group_0'"), msg


def test_unknown_runtime_key_and_bad_types(tmp_path):
    ok_group = groups("""\
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, group_size: 128}
    """)
    msg = error_for(HEAD + ok_group + "runtime:\n  max_context: 1024\n  max_ctx: 5\n", tmp_path)
    assert msg.startswith("bad.yaml:11: unknown key 'max_ctx' in runtime"), msg
    msg = error_for(HEAD + ok_group + "runtime:\n  batch: 0\n", tmp_path)
    assert msg.startswith("bad.yaml:10: runtime.batch should be positive"), msg
    msg = error_for(HEAD + groups("""\
        group_0:
          targets: ["re:.*experts.*"]
          weights: {num_bits: four, group_size: 128}
    """), tmp_path)
    assert msg.startswith("bad.yaml:8: group_0.weights.num_bits should be int, got 'four'"), msg
    msg = error_for(HEAD + groups("""\
        group_0:
          targets: "re:.*experts.*"
          weights: {num_bits: 4, group_size: 128}
    """), tmp_path)
    assert msg.startswith("bad.yaml:7: group_0.targets should be a list"), msg
    msg = error_for(HEAD + groups("""\
        group_0:
          targets: ["re:.*experts.*"]
          weights: {num_bits: 4, group_size: 100}
    """), tmp_path)
    assert msg.startswith("bad.yaml:8:") and "multiple of 8" in msg, msg


def test_bad_regex_names_its_line(tmp_path):
    msg = error_for(HEAD + groups("""\
        group_0:
          targets:
            - "re:.*experts.*"
            - "re:.*self_attn\\\\.(q|k_proj$"
          weights: {num_bits: 4, group_size: 128}
    """), tmp_path)
    assert msg.startswith("bad.yaml:9: 're:.*self_attn\\\\.(q|k_proj$' is not a valid regular expression"), msg


def test_an_empty_pattern_is_refused_on_its_own_line(tmp_path):
    """`re:` alone matches every name: in ignore it left every target selecting nothing, blamed on the target."""
    msg = error_for(HEAD.replace('"]', '",\n             "re:"]') + groups("""\
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, group_size: 128}
    """), tmp_path)
    assert msg == "bad.yaml:5: 're:' has nothing after 're:', so it would select every tensor; write the " \
                  "pattern after 're:'", msg


def test_a_yaml_merge_key_is_refused_naming_it(tmp_path):
    msg = error_for(HEAD + groups("""\
        group_0: &base
          targets: ["Linear"]
          weights: {num_bits: 4, group_size: 128}
        group_1:
          <<: *base
    """), tmp_path)
    assert msg == "bad.yaml:10: config group 'group_1' uses a YAML merge key (<<), which a recipe does not take; " \
                  "write its keys out", msg


def test_target_matching_nothing_is_an_error(tmp_path):
    msg = error_for(HEAD.replace('"]', '", "re:.*\\\\.(f_a|f_b|g_a|g_b|b)_proj$"]') + groups("""\
        group_0:
          targets:
            - "Linear"
            - "re:.*mamba\\\\.in_proj$"
          weights: {num_bits: 4, group_size: 128}
    """), tmp_path)
    assert msg.startswith("bad.yaml:9: target 're:.*mamba\\\\.in_proj$' of group_0 selects no tensor"), msg


def test_quantizing_the_router_is_an_error(tmp_path):
    msg = error_for(HEAD.replace("block_sparse_moe\\\\.gate$", "\\\\.(f_a|f_b|g_a|g_b|b)_proj$") + groups("""\
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, group_size: 128}
    """), tmp_path)
    assert msg.startswith("bad.yaml:7: target 'Linear' of group_0 would quantize "
                          "model.layers.1.block_sparse_moe.gate.weight (the MoE router)"), msg
    msg = error_for(HEAD.replace('"]', '", "re:.*\\\\.(f_a|f_b|g_a|g_b|b)_proj$"]') + groups("""\
        group_0:
          targets: ["Linear", "re:.*A_log$"]
          weights: {num_bits: 4, group_size: 128}
    """), tmp_path)
    assert "would quantize model.layers.0.self_attn.A_log (the KDA decay A_log)" in msg, msg


def test_untargeted_linear_and_ambiguous_groups_are_errors(tmp_path):
    msg = error_for(HEAD + groups("""\
        group_0:
          targets: ["re:.*experts.*"]
          weights: {num_bits: 4, group_size: 128}
    """), tmp_path)
    assert "is a linear weight that no target selects and no ignore entry lists" in msg, msg
    msg = error_for(HEAD + groups("""\
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, group_size: 128}
        group_1:
          targets: ["re:.*experts\\\\.0\\\\..*"]
          weights: {num_bits: 8, group_size: 128}
        group_2:
          targets: ["re:.*\\\\.w2$"]
          weights: {num_bits: 8, group_size: 128}
    """), tmp_path)
    assert "experts.0.w2.weight is selected by" in msg and "runtimes disagree" in msg, msg


# 900-odd characters (under the 1,000 a pattern may have) of optional x's before a module name's end
LONG = "re:.*" + "(?:x?)" * 150


@pytest.mark.parametrize("end, needle", [
    ("\\\\.w2$", "model.layers.1.block_sparse_moe.experts.0.w2.weight is selected by 're:.*(?:x?)(?:x?)"),
    ("\\\\.mamba$", "bad.yaml:10: target 're:.*(?:x?)(?:x?)"),
], ids=["ambiguous", "selects-nothing"])
def test_a_long_pattern_is_quoted_cut(tmp_path, end, needle):
    """A pattern is quoted cut to 80 characters, as where it does not compile: 1,000 characters were quoted whole."""
    msg = error_for(HEAD + groups(f"""\
        group_0:
          targets: ["Linear"]
          weights: {{num_bits: 4, group_size: 128}}
        group_1:
          targets: ["{LONG}{end}"]
          weights: {{num_bits: 8, group_size: 128}}
        group_2:
          targets: ["re:.*experts\\\\.0\\\\..*"]
          weights: {{num_bits: 8, group_size: 128}}
    """), tmp_path)
    assert msg.startswith(needle) and "... of group_1" in msg and len(msg) < 500, msg


def test_yaml_syntax_and_structure_errors(tmp_path):
    assert error_for("quant_stage:\n  a: [1, 2\n", tmp_path).startswith("bad.yaml:3: not valid YAML")
    assert error_for("", tmp_path) == "bad.yaml: the recipe is empty; it needs a '<name>_stage:' section"
    msg = error_for(textwrap.dedent("""\
        quant_stage:
          quant_modifiers:
            QuantizationModifier:
              scheme: W4A16
              targets: [Linear]
        """), tmp_path)
    assert msg.startswith("bad.yaml:4: unknown key 'scheme' in QuantizationModifier"), msg
    with pytest.raises(KLError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")   # refused, not waited on
    with pytest.raises(KLError, match=r"fifo\.yaml: cannot read the recipe \(.*not a regular file"):
        load_recipe(tmp_path / "fifo.yaml")
    with pytest.raises(KLError, match="group_1 is nf4 but others are integer"):
        parse_recipe(HEAD + groups("""\
            group_0:
              targets: ["Linear"]
              weights: {num_bits: 4, group_size: 128}
            group_1:
              targets: ["lm_head"]
              weights: {num_bits: 4, type: nf4}
        """))


def test_the_default_scheme_is_int4_by_group_of_128_symmetric():
    """The CLI's defaults and the README's `--bits 4` (helper-124: `symmetric: bool = False` left every test passing,
    and a plain quantize then wrote asymmetric int4)."""
    assert QuantScheme() == QuantScheme(4, 128, True, "int", "minmax")
    weights = policy_from_options().quantization_config()["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 128, True)


def test_schemes_describe_themselves_as_the_model_card_names_them():
    assert [QuantScheme(**kw).describe() for kw in (
        {}, dict(bits=8, group_size=CHANNEL), dict(symmetric=False, observer="mse"), dict(group_size=64, kind="nf4"),
    )] == ["int4 g128 sym", "int8 per-channel sym", "int4 g128 asym mse", "nf4"]


def test_the_package_names_what_it_imports_where_first_named():
    """klconvert.quant imports its number formats' arithmetic (torch's) where a name of it is first used (a module
    __getattr__): dir() listed none of those names until then, so that completion and help() did not show them, nor
    a check of the names the package holds; and a name it does not have is still an AttributeError."""
    import subprocess
    import sys

    code = ("import sys, klconvert.quant as q\n"
            "print(sorted(set(q.__all__) - set(dir(q))), 'torch' in sys.modules)")
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert said == "[] False\n"   # every name listed, and listing them imports no torch
    import klconvert.quant

    assert all(hasattr(klconvert.quant, name) for name in klconvert.quant.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'quantize_nf3'"):
        klconvert.quant.quantize_nf3
