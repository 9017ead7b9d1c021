"""The weight schemes a checkpoint's compressed-tensors quantization_config declares (its config groups' `weights`),
read from untrusted JSON, the group that holds each packed weight (its targets and the ignore list matched to the
weight's name as compressed-tensors matches them), and the refusal of what else it declares that klconvert would not
run as declared. The targets are regular expressions from the download: they are run as a recipe's are (quant/policy's
Entry): compiled only when Python's re compiles them and their repeats stay bounded, matched within one budget of CPU
time for them all, so that a pattern that backtracks is one error line, not a hang."""
from __future__ import annotations

from dataclasses import dataclass

from klconvert.errors import KLError, shown
from klconvert.quant.ct_fields import QUANTIZATION_ARGS, QUANTIZATION_CONFIG, QUANTIZATION_SCHEME, check_fields
from klconvert.quant.group_rules import CHANNEL
from klconvert.quant.policy import LINEAR, MAX_POLICY_ENTRIES, Entry, RegexBudget, selected_by_two_groups
from klconvert.quant.scheme import PACKED_FORMAT, QuantScheme

DENSE_FORMAT = "dense"  # compressed-tensors' format of weights stored as they are (plain floats, every zero kept)
# compressed-tensors' formats klconvert reads: its own packed int weights, and weights stored as plain floats
READ_FORMATS = (PACKED_FORMAT, DENSE_FORMAT)
MIXED_FORMAT = "mixed-precision"  # a top-level format only: each config group names its own (_format_unnamed)
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
# compressed-tensors' ActivationOrdering (GPTQ's) a weight stored in plain groups comes from: none, or WEIGHT ("static"
# its alias), which orders the calibration only. GROUP ("dynamic" its alias; `true` meant it) stores beside the weight
# a group index per input column (G_IDX) that dequantizing needs and klconvert does not read.
READ_ACT_ORDERS = ("weight", "static")
GROUP_ACT_ORDERS = ("group", "dynamic")
G_IDX = "weight_g_idx"
SOURCE = "quantization_config"  # whose patterns the targets and ignore list are, in an error


@dataclass(frozen=True)
class DeclaredGroup:
    """A config group: the scheme its weights are stored with (None: it quantizes no weights), its targets, and the
    format its weights are stored in (its own, else the top-level one; None where neither names one)."""

    name: str
    scheme: QuantScheme | None
    targets: tuple[Entry, ...]
    format: str | None
    format_field: str  # where that format is said: "format" or "config_groups.<name>.format"


@dataclass(frozen=True)
class Held:
    """What quantization_config says of one module: the group holding it and the target that selected it; or, with
    group None, the ignore entry that lists it (entry) or nothing that selects it (entry None)."""

    group: DeclaredGroup | None
    entry: Entry | None


@dataclass(frozen=True)
class Declared:
    """A compressed-tensors quantization_config as klconvert reads it: its config groups and ignore list."""

    groups: dict[str, DeclaredGroup]
    ignore: tuple[Entry, ...]
    # every target in the order compressed-tensors tries them on a module (exact names, re: patterns, each sorted,
    # then "Linear"), each with the group it stands for: the last group that lists it (compressed-tensors and vLLM
    # both map a target to a group, a later group's replacing an earlier's)
    order: tuple[tuple[Entry, DeclaredGroup], ...]

    def held(self, module: str, linear: bool, packed: bool = True) -> Held:
        """The group that holds `module` (a linear layer's name when `linear`; "Linear" selects only those), as
        compressed-tensors' apply_quantization_config finds it: an ignore entry wins; else the first target that
        selects it. KLError when name targets of groups declaring other weights (scheme or format) both select it:
        vLLM takes the first listed, so the runtimes would read it differently; what to do depends on whether the
        module is stored `packed` or as floats. Groups declaring the same weights read it alike, whichever wins."""
        ignored = next((e for e in self.ignore if e.matches(module, linear)), None)
        if ignored is not None:
            return Held(None, ignored)
        hits = [(entry, group) for entry, group in self.order if entry.matches(module, linear)]
        if not hits:
            return Held(None, None)
        entry, group = hits[0]
        for other_entry, other in hits[1:]:
            if other_entry.pattern != LINEAR and (other.scheme, other.format) != (group.scheme, group.format):
                raise selected_by_two_groups(module, (group.name, entry), (other.name, other_entry),
                                             ("keep it in one group's targets (the group whose scheme its packed "
                                              "tensors are stored with)" if packed else
                                              f"it is stored as floats: add {shown(module)} to {SOURCE}.ignore")
                                             + ", or quantize the model again with `klconvert quantize`")
        return Held(group, entry)

    def describe(self) -> str:
        return ", ".join(f"{name} {group.scheme.describe()}" for name, group in self.groups.items()
                         if group.scheme is not None)


def declared_groups(quantization_config: dict, where: str) -> Declared:
    """The config groups (each with the QuantScheme its weights are stored with; a group whose `weights` is null
    declares none) and the ignore list; KLError naming the first field that is malformed or says what klconvert does
    not read (a format of READ_FORMATS' others, a group of weights naming no format under a mixed-precision top
    level or none, quantized activations or KV cache, transforms applied at run time,
    weights stored sparse, experts pruned or merged, weights other than int by group or channel, weights quantized
    dynamically, GPTQ's act order by group), a target or ignore entry that is no pattern compressed-tensors compiles,
    or when no group declares weights. First, a key or value compressed-tensors' validator refuses (check_fields): where
    klconvert took the default for a key it does not know, transformers and vLLM cannot load the folder."""
    check_fields(QUANTIZATION_CONFIG, quantization_config, where)
    kv_cache = quantization_config.get(KV_CACHE)
    if kv_cache is not None:   # the runtime caches K and V in the model's dtype: another model than the one calibrated
        said = (f"num_bits {shown(kv_cache.get('num_bits'))}, type {shown(kv_cache.get('type'))}"
                if isinstance(kv_cache, dict) else f"{shown(kv_cache)}")
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
        raise _bad(where, "format", f"is {shown(top_format)}, a format klconvert does not read")
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise _bad(where, f"config_groups.{name:.40}", "is not an object (targets, weights, ...)")
        check_fields(QUANTIZATION_SCHEME, group, where, f"config_groups.{name:.40}")
        if group.get("format") not in (None, *READ_FORMATS):
            raise _bad(where, f"config_groups.{name:.40}.format",
                       f"is {shown(group['format'])}, a format klconvert does not read")
        if top_format in (None, MIXED_FORMAT) and group.get("format") is None and group.get("weights") is not None:
            raise _format_unnamed(where, name, top_format)
        quantized = next((key for key in ACTIVATIONS if group.get(key) is not None), None)
        if quantized:   # the runtime would run them unquantized: another model than the one calibrated
            raise _bad(where, f"config_groups.{name:.40}.{quantized}",
                       "quantizes activations, which klconvert does not")
    declared = {name: _scheme(group.get("weights"), where, f"config_groups.{name:.40}.weights")
                for name, group in groups.items() if group.get("weights") is not None}
    if not declared:
        raise _bad(where, "config_groups", "declares no weight scheme")
    lists = [group.get("targets") for group in groups.values()] + [quantization_config.get("ignore")]
    entries = sum(len(items) for items in lists if isinstance(items, list))
    if entries > MAX_POLICY_ENTRIES:   # each is tried on every packed weight's name
        raise KLError(f"{where}: quantization_config.config_groups and ignore hold {entries:,} target and ignore "
                      f"entries, past the {MAX_POLICY_ENTRIES:,} a quantizer writes; download the checkpoint again, or "
                      "quantize the release with `klconvert quantize`")
    budget = RegexBudget()   # the config's patterns share one matching budget, as a recipe's do
    read: dict[str, DeclaredGroup] = {}
    for name, group in groups.items():
        own = group.get("format")
        fmt, fmt_field = (own, f"config_groups.{name:.40}.format") if own is not None else \
            (None if top_format == MIXED_FORMAT else top_format, "format")
        read[name] = DeclaredGroup(name, declared.get(name), _entries(group.get("targets"), where,
                                                                      f"config_groups.{name:.40}.targets", budget),
                                   fmt, fmt_field)
    ignore = _entries(quantization_config.get("ignore") or [], where, "ignore", budget)
    latest = {entry.pattern: (entry, group) for group in read.values() for entry in group.targets}
    order = sorted(latest.values(), key=lambda hit: (hit[0].pattern == LINEAR, hit[0].pattern.startswith("re:"),
                                                     hit[0].pattern))
    return Declared(read, ignore, tuple(order))


def _entries(items, where: str, field: str, budget: RegexBudget) -> tuple[Entry, ...]:
    """A targets or ignore list: module names, re: patterns or "Linear", each an Entry (a pattern checked as a
    recipe's is)."""
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise _bad(where, field, "is not a list of module names, re: patterns or 'Linear'")
    return tuple(Entry(item, f"{where}: quantization_config.{field}[{i}]", budget, source=SOURCE)
                 for i, item in enumerate(items))


def group_act_order(where: str) -> KLError:
    """The refusal of GPTQ's act order by group, `where` naming what says it (the config, or a tensor)."""
    return KLError(f"{where}: GPTQ activation ordering by group, whose weights are read through a group index per "
                   f"input column (*.{G_IDX}) that klconvert does not read -- without it each column dequantizes with "
                   "another group's scale; quantize without act order by group (actorder null or 'weight', which "
                   "stores the weights in plain groups), or give the bf16 release to `klconvert quantize`")


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
                              f"a {shown(scheme.get('type'))} transform online (location {shown(args['location'])}, at "
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
        raise KLError(f"{where}: quantization_config.{SPARSITY} stores weights sparse (format {shown(stored)}), which "
                      "klconvert does not read; quantize again without sparse storage (`klconvert quantize` stores "
                      "weights dense)")


def _scheme(weights, where: str, field: str) -> QuantScheme:
    """A config group's `weights` (compressed-tensors' QuantizationArgs) as the QuantScheme it stores."""
    if not isinstance(weights, dict):
        raise _bad(where, field, "is not an object saying how the weights are stored")
    check_fields(QUANTIZATION_ARGS, weights, where, field)
    actorder = weights.get("actorder")
    named = actorder.lower() if isinstance(actorder, str) else actorder
    if named is True or named in GROUP_ACT_ORDERS:
        raise group_act_order(f"{where}: quantization_config.{field}.actorder is {shown(actorder)}")
    if named not in (None, False, *READ_ACT_ORDERS):
        raise _bad(where, f"{field}.actorder", f"is {shown(actorder)}, not an activation ordering compressed-tensors "
                   "defines (null, weight or static; group or dynamic)")
    dynamic = weights.get("dynamic", False)
    if dynamic is not False:   # compressed-tensors then keeps no stored scales, and vLLM runs no such weights
        raise _bad(where, f"{field}.dynamic", f"is {shown(dynamic)}: weights whose scales are computed at run time, "
                   "not read from the checkpoint, which klconvert does not do")
    bits, kind, symmetric = weights.get("num_bits"), weights.get("type", "int"), weights.get("symmetric", True)
    strategy, group_size = weights.get("strategy"), weights.get("group_size")
    # group_size -1: compressed-tensors' own spelling of channel (QuantizationArgs), as the config states it
    channel = strategy == "channel" or (strategy is None and group_size == -1)
    grouped = strategy in ("group", None) and type(group_size) is int and group_size > 0
    declares = (f"declares num_bits {shown(bits)}, type {shown(kind)}, symmetric {shown(symmetric)}, strategy "
                f"{shown(strategy)}, group_size {shown(group_size)}")
    if not (type(bits) is int and kind == "int" and type(symmetric) is bool
            and (group_size in (None, -1) if channel else grouped)):
        raise _bad(where, field, declares)
    try:  # the bits and group sizes a scheme may have are QuantScheme's to say
        return QuantScheme(bits, CHANNEL if channel else group_size, symmetric)
    except KLError:
        raise _bad(where, field, declares) from None


def _format_unnamed(where: str, group: str, top_format: str | None) -> KLError:
    """The refusal of a group that declares weights but names no format, under a mixed-precision top level or none.
    vLLM's CompressedTensorsConfig.get_scheme_dict gives such a group the top-level format (or None), and
    _get_scheme_from_parts (for experts, CompressedTensorsMoEMethod.get_moe_method) has no scheme of int weights
    stored as mixed-precision or as no format: the folder would run here and not load in vLLM. compressed-tensors
    alone infers the group's format (pack-quantized for int weights, compress_module's infer_module_format), so
    transformers would load it."""
    why = (f"under the top-level format {MIXED_FORMAT!r}, which says each group names its own: vLLM reads its "
           f"weights as {MIXED_FORMAT!r}, for which it has no scheme" if top_format == MIXED_FORMAT else
           "nor does the top level: vLLM has no scheme for weights of no format")
    return KLError(f"{where}: quantization_config.config_groups.{group:.40} names no format, {why} -- add "
                   f"\"format\": \"{PACKED_FORMAT}\" to that group if its weights are stored packed, or quantize the "
                   "model again with `klconvert quantize`")


def _bad(where: str, field: str, what: str) -> KLError:
    return KLError(f"{where}: quantization_config.{field} {what}; klconvert reads pack-quantized int4 or int8 weights "
                   "by group (a multiple of 8) or channel -- quantize the model again with `klconvert quantize`")
