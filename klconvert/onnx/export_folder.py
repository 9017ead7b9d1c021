"""What an ONNX export folder holds, as export-onnx writes it and OnnxEngine reads it: its graph's file names and the
state the graph takes and returns. Imports no onnx: `run --engine onnxruntime` needs onnxruntime alone."""
from __future__ import annotations

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"      # the weights, when they are over export's PROTOBUF_LIMIT
# The graph's input naming the last positions whose logits it computes, 0 every position's (transformers'
# logits_to_keep): onnxruntime runs every node whatever outputs a run asks for, so only an input spares lm_head the rows
# a prefill that samples the next token drops. An export from before it lacks it and computes every position's.
LOGITS_TO_KEEP = "logits_to_keep"
# The cached rows the graph's MLA layers attend at once in a prefill call: genai_config.json's key for it, and the
# graph's own metadata key, which OnnxEngine holds genai_config.json's to (a hand-edited one sized every call wrongly)
ATTENTION_KEY_BLOCK = "attention_key_block"
# The name of the Loop body attending one key block: a graph that recorded no key block attends by blocks if it has it
KEY_BLOCK_GRAPH = "mla_key_block"
# The logits' shape but the vocabulary: kept_sequence is min(logits_to_keep, sequence), or sequence where it is 0
LOGITS_SHAPE = ["batch", "kept_sequence"]


def state_spec(config) -> list[dict]:
    """Per layer, the state tensors the graph takes and returns: KDA's recurrent state and conv tail, MLA's latent
    cache (row j of a sequence holds its token at position j: `present` grows to max(past_sequence,
    position + sequence) rows)."""
    H, K, W = config.kda_num_heads, config.kda_head_dim, config.conv_kernel_size
    spec = []
    for layer in range(config.num_hidden_layers):
        if config.is_kda(layer):
            spec += [{"layer": layer, "kind": "kda_state", "shape": ["batch", H, K, K]},
                     {"layer": layer, "kind": "conv_state", "shape": ["batch", 3 * H * K, W - 1]}]
        else:
            spec.append({"layer": layer, "kind": "mla_latent", "shape": ["batch", "past_sequence",
                                                                        config.mla_cache_width]})
    for s in spec:
        s.update(past=f"past.{s['layer']}.{s['kind']}", present=f"present.{s['layer']}.{s['kind']}", dtype="float32")
    return spec
