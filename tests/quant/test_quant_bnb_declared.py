"""A bitsandbytes quantization_config's skip list read as transformers reads it (quant/bnb_declared.py)."""
import re

import pytest
from transformers.quantizers.quantizers_utils import should_convert_module

from klconvert.errors import KLError
from klconvert.quant.bnb_declared import bnb_declared
from klconvert.quant import policy as policy_module

MODULES = ["lm_head", "model.layers.1.block_sparse_moe.gate", "model.layers.1.mlp.gate", "model.layers.1.mlp.gate_proj",
           "model.layers.0.self_attn.forget_gate.f_b_proj", "model.layers.1.self_attn.q_proj",
           "model.layers.11.self_attn.q_proj", "model.layers.1.block_sparse_moe.experts.0.w1",
           "model.layers.10.block_sparse_moe.experts.12.w3"]
ENTRIES = ["lm_head", r".*\.(block_sparse_moe|mlp)\.gate$", r".*\.(f_b|g_a|g_b)_proj$", "model.layers.1", "layer.1",
           "q_proj", "self_attn.q_pro", r"model\.layers\.1\.self_attn\.q_pro", ".*experts", ".*expert", "experts.0",
           "gate", "mlp.gate", "", "a)|(.*", "layers.1.self_attn.q_proj"]


# transformers 5.25 matches an entry up to a module boundary, which klconvert follows; 5.17 (the GPU image's) stops at
# none ("model.layers.1" skips "model.layers.11"), so the comparison holds only against the former
BOUNDARY_MATCHING = should_convert_module("model.layers.11.q_proj", ["model.layers.1"])


@pytest.mark.skipif(not BOUNDARY_MATCHING, reason="this transformers matches skip entries without a module boundary "
                                                  "(before 5.25); klconvert reads them as 5.25 does")
@pytest.mark.parametrize("entry", ENTRIES)
def test_an_entry_skips_what_transformers_skips(entry):
    """should_convert_module: a regex from the name's start to a module boundary, or a suffix; an entry that closes
    transformers' own group ("a)|(.*") reads as it reads it."""
    declared = bnb_declared({"llm_int8_skip_modules": [entry]}, "config.json")
    for module in MODULES:
        assert (declared.skipped_by(module) is not None) == (not should_convert_module(module, [entry])), module


def test_no_list_skips_lm_head_alone():
    for config in ({}, {"llm_int8_skip_modules": None}):
        declared = bnb_declared(config, "config.json")
        assert declared.defaulted and [m for m in MODULES if declared.skipped_by(m)] == ["lm_head"]


@pytest.mark.parametrize("entries, said", [
    ("lm_head", "config.json: quantization_config.llm_int8_skip_modules is 'lm_head', not a list of module names or "
                "patterns (or null): transformers refuses the config"),
    (["lm_head", 3], "is ['lm_head', 3], not a list of module names or patterns"),
    (["(q_proj"], "config.json: quantization_config.llm_int8_skip_modules[0] '(q_proj' as transformers matches it: "
                  "'re:(?:(q_proj)(?:(?<=\\\\.)|(?=\\\\.|$))' is not a valid regular expression"),
    (["x"] * 1001, "holds 1,001 entries, past the 1,000 a quantizer writes"),
])
def test_a_skip_list_transformers_cannot_read_is_refused(entries, said):
    with pytest.raises(KLError, match=re.escape(said)):
        bnb_declared({"llm_int8_skip_modules": entries}, "config.json")


def test_a_backtracking_entry_is_refused_in_bounded_time(monkeypatch):
    """Seven .* before four backreferences (test_policy_regex_bounds' BACKTRACKING): the entries share a recipe's
    budget of matching time."""
    monkeypatch.setattr(policy_module, "REGEX_BUDGET_S", 0.2)
    declared = bnb_declared({"llm_int8_skip_modules": [r"(.*)(.*)(.*)(.*)(.*)(.*)(.*)\7\6\5\4[Q-Z]"]}, "config.json")
    with pytest.raises(KLError, match=r"^config\.json: quantization_config\.llm_int8_skip_modules\[0\] .* took the "
                                      r"quantization_config's patterns past 0\.2 s"):
        for _ in range(1000):
            declared.skipped_by("model.layers.10.block_sparse_moe.experts.100.w1")
