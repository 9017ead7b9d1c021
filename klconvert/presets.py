"""Model presets: the released Kimi Linear 48B config, and a tiny model of the same structure, cut to N layers."""
from __future__ import annotations

import copy

from klconvert.errors import KLError
from klconvert.release import NUM_SPECIAL_TOKENS, RELEASED_CONFIG, config_token_ids, layer_lists

# Same structure, a few MB: 8 layers (KDA x3, MLA, KDA x3, MLA), dense layer 0, MoE with a shared expert. Every
# linear layer's input is a multiple of 128, so the Triton int kernels (128-wide k-tiles) take it at group 128, but
# f_b_proj's and g_b_proj's, the KDA head_dim 32, which the default policy and the shipped recipes keep unquantized.
TINY_BPE_RANKS = 1024
TINY = {
    **copy.deepcopy(RELEASED_CONFIG),
    **config_token_ids(TINY_BPE_RANKS),
    "head_dim": 32,
    "hidden_size": 128,
    "intermediate_size": 256,
    "kv_lora_rank": 128,
    "linear_attn_config": {**layer_lists(8), "head_dim": 32, "num_heads": 4, "short_conv_kernel_size": 4},
    "moe_intermediate_size": 128,
    "num_attention_heads": 4,
    "num_experts": 16,
    "num_experts_per_token": 4,
    "num_hidden_layers": 8,
    "num_key_value_heads": 4,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "vocab_size": TINY_BPE_RANKS + NUM_SPECIAL_TOKENS,
}

PRESETS = {"tiny": TINY, "kimi-linear-48b": RELEASED_CONFIG}


def preset_config(name: str, layers: int | None = None) -> dict:
    """The config.json dict of a preset, optionally cut to `layers` layers keeping the 3:1 KDA:MLA pattern."""
    if name not in PRESETS:
        raise KLError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = copy.deepcopy(PRESETS[name])
    if layers is not None:
        if layers < 1:
            raise KLError(f"--layers {layers}: need at least 1 layer")
        if layers > config["num_hidden_layers"]:
            raise KLError(f"--layers {layers}: preset {name} has only {config['num_hidden_layers']} layers; give "
                          f"--layers 1 to {config['num_hidden_layers']}, or leave it out for all of them")
        config["num_hidden_layers"] = layers
        config["linear_attn_config"].update(layer_lists(layers))
    return config
