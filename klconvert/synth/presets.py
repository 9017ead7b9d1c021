"""Model presets: the released Kimi Linear 48B config.json, and a tiny model of the same structure."""
from __future__ import annotations

import copy

from klconvert.errors import KLError

NUM_SPECIAL_TOKENS = 256  # reserved specials after the BPE ranks, as released


def _full_attn_layers(num_layers: int) -> list[int]:
    """1-indexed MLA layers: every fourth, and the last (released: 4, 8, ..., 24, 27)."""
    return sorted({i for i in range(4, num_layers + 1, 4)} | {num_layers})


def _layer_lists(num_layers: int) -> dict:
    full = _full_attn_layers(num_layers)
    return {"kda_layers": [i for i in range(1, num_layers + 1) if i not in full], "full_attn_layers": full}


# The released config.json of moonshotai/Kimi-Linear-48B-A3B-Instruct (auto_map kept for fidelity;
# klconvert never executes it).
KIMI_LINEAR_48B = {
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
    "linear_attn_config": {**_layer_lists(27), "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4},
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

# Same structure, a few MB: 8 layers (KDA x3, MLA, KDA x3, MLA), dense layer 0, MoE with a shared expert. Every
# linear layer's input is a multiple of 128, so the Triton int kernels (128-wide k-tiles) take it at group 128.
TINY = {
    **copy.deepcopy(KIMI_LINEAR_48B),
    "bos_token_id": 1024,
    "eos_token_id": 1026,
    "pad_token_id": 1279,
    "head_dim": 32,
    "hidden_size": 128,
    "intermediate_size": 256,
    "kv_lora_rank": 128,
    "linear_attn_config": {**_layer_lists(8), "head_dim": 32, "num_heads": 4, "short_conv_kernel_size": 4},
    "model_max_length": 1048576,
    "moe_intermediate_size": 128,
    "num_attention_heads": 4,
    "num_experts": 16,
    "num_experts_per_token": 4,
    "num_hidden_layers": 8,
    "num_key_value_heads": 4,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "vocab_size": 1024 + NUM_SPECIAL_TOKENS,
}

PRESETS = {"tiny": TINY, "kimi-linear-48b": KIMI_LINEAR_48B}


def preset_config(name: str, layers: int | None = None) -> dict:
    """The config.json dict of a preset, optionally cut to `layers` layers keeping the 3:1 KDA:MLA pattern."""
    if name not in PRESETS:
        raise KLError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = copy.deepcopy(PRESETS[name])
    if layers is not None:
        if layers < 1:
            raise KLError(f"--layers {layers}: need at least 1 layer")
        if layers > config["num_hidden_layers"]:
            raise KLError(f"--layers {layers}: preset {name} has only {config['num_hidden_layers']} layers")
        config["num_hidden_layers"] = layers
        config["linear_attn_config"].update(_layer_lists(layers))
    return config
