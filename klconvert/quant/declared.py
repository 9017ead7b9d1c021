"""The weight schemes a checkpoint's compressed-tensors quantization_config declares (its config groups' `weights`),
read from untrusted JSON. A packed weight is held to them by what it stores -- bits, scales a row, zero points --
not by matching the groups' targets to its name: those are regular expressions from the download, and running them
over every module would let one pattern that backtracks hang any command that opens the folder."""
from __future__ import annotations

from klconvert.errors import KLError
from klconvert.quant.scheme import QuantScheme


def declared_schemes(quantization_config: dict, where: str) -> dict[str, QuantScheme]:
    """{config group name: the QuantScheme its weights are stored with}, for the groups that quantize weights (an
    activation-only group, `weights` null, declares none); KLError naming the first field that is malformed or a
    scheme klconvert does not read (int weights by group or channel), or when no group declares weights."""
    groups = quantization_config.get("config_groups")
    if not isinstance(groups, dict):
        raise _bad(where, "config_groups", "is missing or not an object")
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise _bad(where, f"config_groups.{name:.40}", "is not an object (targets, weights, ...)")
    declared = {name: _scheme(group.get("weights"), where, f"config_groups.{name:.40}.weights")
                for name, group in groups.items() if group.get("weights") is not None}
    if not declared:
        raise _bad(where, "config_groups", "declares no weight scheme")
    return declared


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
