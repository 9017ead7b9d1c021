"""The weight schemes a checkpoint's compressed-tensors quantization_config declares (its config groups' `weights`),
read from untrusted JSON, and the refusal of what else it declares that klconvert would not run as declared. A packed
weight is held to the schemes by what it stores -- bits, scales a row, zero points -- not by matching the groups'
targets to its name: those are regular expressions from the download, and running them over every module would let
one pattern that backtracks hang any command that opens the folder."""
from __future__ import annotations

from klconvert.errors import KLError
from klconvert.quant.scheme import PACKED_FORMAT, QuantScheme

DENSE_FORMAT = "dense"  # compressed-tensors' format of weights stored as they are (plain floats, every zero kept)
# compressed-tensors' formats klconvert reads: its own packed int weights, and weights stored as plain floats
READ_FORMATS = (PACKED_FORMAT, DENSE_FORMAT)
MIXED_FORMAT = "mixed-precision"  # a top-level format only: each config group names its own
ACTIVATIONS = ("input_activations", "output_activations")  # a group's activation schemes (W8A8's inputs)
KV_CACHE = "kv_cache_scheme"  # a KV cache held quantized (llm-compressor's fp8 K/V, with scales beside the attention)
TRANSFORMS = "transform_config"  # compressed-tensors' TransformConfig: rotations (QuIP, SpinQuant) by config group
# The TransformArgs locations compressed-tensors fuses into the weight when it applies a transform (TransformLocation's
# offline ones): the stored weights already hold it. At any other (input, output, q_attn, k_cache) it is applied to
# activations at run time.
FUSED_LOCATIONS = ("weight_input", "weight_output")
SPARSITY = "sparsity_config"  # an older compressed-tensors' SparsityCompressionConfig (0.20.1 writes {} there)
# compressed-tensors 0.20's experts pruned (REAP) or merged per layer: another expert set than the config's
MOE_SPARSITY = "moe_sparsity_config"


def declared_schemes(quantization_config: dict, where: str) -> dict[str, QuantScheme]:
    """{config group name: the QuantScheme its weights are stored with}, for the groups that quantize weights (a
    group whose `weights` is null declares none); KLError naming the first field that is malformed or says what
    klconvert does not read (a format of READ_FORMATS' others, quantized activations or KV cache, transforms applied
    at run time, weights stored sparse, experts pruned or merged, weights other than int by group or channel), or
    when no group declares weights."""
    kv_cache = quantization_config.get(KV_CACHE)
    if kv_cache is not None:   # the runtime caches K and V in the model's dtype: another model than the one calibrated
        said = (f"num_bits {kv_cache.get('num_bits')!r:.20}, type {kv_cache.get('type')!r:.20}"
                if isinstance(kv_cache, dict) else f"{kv_cache!r:.40}")
        raise _bad(where, KV_CACHE, f"quantizes the KV cache ({said}), which klconvert does not")
    if quantization_config.get(MOE_SPARSITY) is not None:
        raise _bad(where, MOE_SPARSITY, "declares experts pruned or merged, which klconvert does not read (it runs "
                   "every expert config.json names)")
    _refuse_online_transforms(quantization_config.get(TRANSFORMS), where)
    _refuse_sparse_storage(quantization_config.get(SPARSITY), where)
    groups = quantization_config.get("config_groups")
    if not isinstance(groups, dict):
        raise _bad(where, "config_groups", "is missing or not an object")
    top_format = quantization_config.get("format")
    if top_format not in (None, MIXED_FORMAT, *READ_FORMATS):
        raise _bad(where, "format", f"is {top_format!r:.40}, a format klconvert does not read")
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise _bad(where, f"config_groups.{name:.40}", "is not an object (targets, weights, ...)")
        if group.get("format") not in (None, *READ_FORMATS):
            raise _bad(where, f"config_groups.{name:.40}.format",
                       f"is {group['format']!r:.40}, a format klconvert does not read")
        quantized = next((key for key in ACTIVATIONS if group.get(key) is not None), None)
        if quantized:   # the runtime would run them unquantized: another model than the one calibrated
            raise _bad(where, f"config_groups.{name:.40}.{quantized}",
                       "quantizes activations, which klconvert does not")
    declared = {name: _scheme(group.get("weights"), where, f"config_groups.{name:.40}.weights")
                for name, group in groups.items() if group.get("weights") is not None}
    if not declared:
        raise _bad(where, "config_groups", "declares no weight scheme")
    return declared


def _refuse_online_transforms(transforms, where: str) -> None:
    """KLError naming the first transform compressed-tensors applies at run time (where it is not fused into the
    weights): klconvert applies none, and would run the rotated weights without it. None, {} and transforms only ever
    fused into the weights are read: they change nothing at run time. A scheme without `apply` applies nothing, as
    compressed-tensors reads it."""
    if transforms in (None, {}):
        return
    groups = transforms.get("config_groups") if isinstance(transforms, dict) else None
    readable = isinstance(groups, dict) and all(
        isinstance(scheme, dict) and isinstance(scheme.get("apply", []), list)
        and all(isinstance(args, dict) and isinstance(args.get("location"), str) for args in scheme.get("apply", []))
        for scheme in groups.values())
    if not readable:
        raise KLError(f"{where}: quantization_config.{TRANSFORMS} is not compressed-tensors' TransformConfig "
                      "(config_groups of schemes, each applying its transform at a list of locations), so which of "
                      "its transforms run at run time cannot be told; quantize again without transforms (`klconvert "
                      "quantize` applies none)")
    for name, scheme in groups.items():
        for i, args in enumerate(scheme.get("apply", [])):
            if args["location"] not in FUSED_LOCATIONS:
                raise KLError(f"{where}: quantization_config.{TRANSFORMS}.config_groups.{name:.40}.apply[{i}] applies "
                              f"a {scheme.get('type')!r:.40} transform online (location {args['location']!r:.40}, at "
                              f"run time), which klconvert does not apply: only {' and '.join(FUSED_LOCATIONS)} "
                              "transforms are fused into the stored weights, and without this one they compute another "
                              "model than the one quantized -- quantize again without online transforms (`klconvert "
                              "quantize` applies none)")


def _refuse_sparse_storage(sparsity, where: str) -> None:
    """KLError when the weights are stored sparse (compressed-tensors' bitmask or 2:4 formats), which klconvert would
    read as the dense weights they are not. None, {} and the dense format (a pruned model's zeros stored as they are)
    are read."""
    if sparsity in (None, {}):
        return
    stored = sparsity.get("format") if isinstance(sparsity, dict) else None
    if not isinstance(stored, str):
        raise KLError(f"{where}: quantization_config.{SPARSITY} is not compressed-tensors' sparsity config (an object "
                      "naming the `format` its weights are stored in), so how they are stored cannot be told; "
                      "quantize again without sparsity (`klconvert quantize` stores weights dense)")
    if stored != DENSE_FORMAT:
        raise KLError(f"{where}: quantization_config.{SPARSITY} stores weights sparse (format {stored!r:.40}), which "
                      "klconvert does not read; quantize again without sparse storage (`klconvert quantize` stores "
                      "weights dense)")


def _scheme(weights, where: str, field: str) -> QuantScheme:
    """A config group's `weights` (compressed-tensors' QuantizationArgs) as the QuantScheme it stores."""
    if not isinstance(weights, dict):
        raise _bad(where, field, "is not an object saying how the weights are stored")
    bits, kind, symmetric = weights.get("num_bits"), weights.get("type", "int"), weights.get("symmetric", True)
    strategy, group_size = weights.get("strategy"), weights.get("group_size")
    channel = strategy == "channel" or (strategy is None and group_size == -1)
    grouped = strategy in ("group", None) and type(group_size) is int and group_size > 0
    declares = (f"declares num_bits {bits!r:.20}, type {kind!r:.20}, symmetric {symmetric!r:.20}, strategy "
                f"{strategy!r:.20}, group_size {group_size!r:.20}")
    if not (type(bits) is int and kind == "int" and type(symmetric) is bool
            and (group_size in (None, -1) if channel else grouped)):
        raise _bad(where, field, declares)
    try:  # the bits and group sizes a scheme may have are QuantScheme's to say
        return QuantScheme(bits, -1 if channel else group_size, symmetric)
    except KLError:
        raise _bad(where, field, declares) from None


def _bad(where: str, field: str, what: str) -> KLError:
    return KLError(f"{where}: quantization_config.{field} {what}; klconvert reads pack-quantized int4 or int8 weights "
                   "by group (a multiple of 8) or channel -- quantize the model again with `klconvert quantize`")
