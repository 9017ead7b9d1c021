"""The schemes a checkpoint's compressed-tensors quantization_config declares: its config groups and ignore list read
back into a Policy, which matches each module to its group as compressed-tensors and vLLM do."""
from __future__ import annotations

from klconvert.errors import KLError
from klconvert.quant.policy import Entry, Group, Policy
from klconvert.quant.scheme import QuantScheme


def declared_policy(quantization_config: dict, where: str) -> Policy:
    """The Policy a quantization_config (untrusted JSON) declares; KLError naming the first field that is missing,
    of the wrong type, or a scheme klconvert does not read (int weights by group or channel)."""
    groups = quantization_config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _bad(where, "config_groups", "is missing or empty")
    declared = []
    for name, group in groups.items():
        field = f"config_groups.{name:.40}"
        targets = group.get("targets") if isinstance(group, dict) else None
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise _bad(where, f"{field}.targets", "is not a list of module names or patterns")
        declared.append(Group(name, tuple(Entry(t, f"{where}: quantization_config.{field}") for t in targets),
                              _scheme(group.get("weights"), where, f"{field}.weights")))
    ignore = quantization_config.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(e, str) for e in ignore):
        raise _bad(where, "ignore", "is not a list of module names or patterns")
    return Policy(tuple(declared), tuple(Entry(e, f"{where}: quantization_config.ignore") for e in ignore),
                  strict=False)


def _scheme(weights, where: str, field: str) -> QuantScheme:
    """A config group's `weights` (compressed-tensors' QuantizationArgs) as the QuantScheme it stores."""
    if not isinstance(weights, dict):
        raise _bad(where, field, "is not an object saying how the weights are stored")
    bits, kind, symmetric = weights.get("num_bits"), weights.get("type", "int"), weights.get("symmetric", True)
    strategy, group_size = weights.get("strategy"), weights.get("group_size")
    channel = strategy == "channel" or (strategy is None and group_size == -1)
    grouped = strategy in ("group", None) and type(group_size) is int and group_size > 0 and group_size % 8 == 0
    if not (type(bits) is int and bits in (4, 8) and kind == "int" and type(symmetric) is bool
            and (group_size in (None, -1) if channel else grouped)):
        raise _bad(where, field, f"declares num_bits {bits!r:.20}, type {kind!r:.20}, symmetric {symmetric!r:.20}, "
                   f"strategy {strategy!r:.20}, group_size {group_size!r:.20}")
    return QuantScheme(bits, -1 if channel else group_size, symmetric)


def _bad(where: str, field: str, what: str) -> KLError:
    return KLError(f"{where}: quantization_config.{field} {what}; klconvert reads pack-quantized int4 or int8 weights "
                   "by group (a multiple of 8) or channel -- quantize the model again with `klconvert quantize`")
