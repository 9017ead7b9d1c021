"""The facts of the released model (moonshotai/Kimi-Linear-48B-A3B-Instruct) that more than one room uses: its
config.json, its layer pattern, its tokenizer's reserved specials and the tensors it stores in fp32."""
from __future__ import annotations

NUM_SPECIAL_TOKENS = 256  # reserved specials after the BPE ranks, as released
RELEASED_SHARD_BYTES = 5 * 10**9  # the release's (and transformers') "5GB" shards: the default shard size
FP32_TENSORS = ("A_log", "dt_bias", "e_score_correction_bias")  # name suffixes the released files store in fp32

# What the release keeps in high precision, as regexes on module names (a tensor's name less `.weight`): no
# recipe may quantize these (quant/policy.py), and the default policy's ignore list names the linear ones among
# them (quant/defaults.py). The router pattern takes the released (`block_sparse_moe`) and transformers (`mlp`)
# spellings.
ROUTER = r".*\.(block_sparse_moe|mlp)\.gate"
SHORT_CONVS = r".*conv1d"
EMBEDDING = r"(.*\.)?embed_tokens"
HIGH_PRECISION = (
    (ROUTER, "the MoE router"),
    (r".*\.e_score_correction_bias", "the router's correction bias"),
    (r".*(^|\.)A_log", "the KDA decay A_log"),
    (r".*(^|\.)dt_bias", "the KDA dt_bias"),
    (SHORT_CONVS, "a short-convolution weight"),
    (r".*norm", "a norm weight"),
    (EMBEDDING, "the token embedding"),
)


def _full_attn_layers(num_layers: int) -> list[int]:
    """1-indexed MLA layers: every fourth, and the last (released: 4, 8, ..., 24, 27)."""
    return sorted({i for i in range(4, num_layers + 1, 4)} | {num_layers})


def layer_lists(num_layers: int) -> dict:
    """linear_attn_config's 1-indexed kda_layers and full_attn_layers for `num_layers` layers, in that pattern."""
    full = _full_attn_layers(num_layers)
    return {"kda_layers": [i for i in range(1, num_layers + 1) if i not in full], "full_attn_layers": full}


# The released config.json of moonshotai/Kimi-Linear-48B-A3B-Instruct (auto_map kept for fidelity;
# klconvert never executes it).
RELEASED_CONFIG = {
    "architectures": ["KimiLinearForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_kimi.KimiLinearConfig",
                 "AutoModel": "modeling_kimi.KimiLinearModel",
                 "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM"},
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "pad_token_id": 163839,
    "first_k_dense_replace": 1,
    "head_dim": 72,
    "hidden_act": "silu",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "kv_lora_rank": 512,
    "linear_attn_config": {**layer_lists(27), "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4},
    "mla_use_nope": True,
    "model_max_length": 1048576,
    "model_type": "kimi_linear",
    "moe_intermediate_size": 1024,
    "moe_layer_freq": 1,
    "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid",
    "num_attention_heads": 32,
    "num_expert_group": 1,
    "num_experts": 256,
    "num_experts_per_token": 8,
    "num_hidden_layers": 27,
    "num_key_value_heads": 32,
    "num_nextn_predict_layers": 0,
    "num_shared_experts": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "routed_scaling_factor": 2.446,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.56.1",
    "use_cache": True,
    "use_grouped_topk": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}
