"""The facts of the released model (moonshotai/Kimi-Linear-48B-A3B-Instruct) that more than one room uses: its
config.json, its layer pattern, its tokenizer's reserved specials and the tensors it stores in fp32."""
from __future__ import annotations

RELEASED_BPE_RANKS = 163584  # the released vocabulary's BPE ranks, ids 0 .. 163583
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


# The first special ids, in the released order; "<|reserved_token_{id}|>" fills the rest, then UNK and PAD.
NAMED_SPECIAL_TOKENS = ("[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                        "<|end_header_id|>", "[EOT_ID]", "<|im_system|>", "<|im_middle|>")
UNK_TOKEN, PAD_TOKEN = "[UNK]", "[PAD]"  # the second-to-last and the last special id
# The special token each of config.json's token ids names: the release's eos_token_id is <|im_end|>, where a turn
# ends, not its tokenizer's eos_token [EOS].
CONFIG_TOKENS = {"bos_token_id": "[BOS]", "eos_token_id": "<|im_end|>", "pad_token_id": PAD_TOKEN}


def special_token_names(num_ranks: int, num_specials: int) -> dict[int, str]:
    """{id: content} of the added tokens, ids num_ranks .. num_ranks + num_specials - 1."""
    names = {num_ranks + i: name for i, name in enumerate(NAMED_SPECIAL_TOKENS)}
    for token_id in range(num_ranks + len(NAMED_SPECIAL_TOKENS), num_ranks + num_specials - 2):
        names[token_id] = f"<|reserved_token_{token_id}|>"
    names[num_ranks + num_specials - 2] = UNK_TOKEN
    names[num_ranks + num_specials - 1] = PAD_TOKEN
    return names


def config_token_ids(num_ranks: int) -> dict[str, int]:
    """config.json's bos_token_id, eos_token_id and pad_token_id for `num_ranks` BPE ranks and the reserved specials
    after them: the ids of CONFIG_TOKENS' tokens."""
    ids = {name: token_id for token_id, name in special_token_names(num_ranks, NUM_SPECIAL_TOKENS).items()}
    return {key: ids[name] for key, name in CONFIG_TOKENS.items()}


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
    **config_token_ids(RELEASED_BPE_RANKS),
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
    "vocab_size": RELEASED_BPE_RANKS + NUM_SPECIAL_TOKENS,
}
