"""Quantized checkpoints: find each packed weight's tensors (compressed-tensors or bitsandbytes nf4), check them
against the weight they stand for and the scheme config.json declares, and dequantize on read."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from klconvert.checkpoint.folder_files import CONFIG_FILE, CONFIG_MISMATCH
from klconvert.checkpoint.name_map import TensorSpec, canonical_pieces, layout_names
from klconvert.checkpoint.safetensors_header import SafetensorsHeader
from klconvert.config import KimiLinearConfig
from klconvert.damage_remedy import damaged_folder_remedy
from klconvert.errors import KLError, shown
from klconvert.quant import QuantScheme, decompress_nf4, decompress_weight
from klconvert.quant.bnb_declared import BnbDeclared, bnb_declared
from klconvert.quant.declared import DENSE_FORMAT, G_IDX, Declared, declared_groups, group_act_order
from klconvert.quant.group_rules import CHANNEL, SUPPORTED_BITS
from klconvert.quant.nf4 import BITSANDBYTES, SKIP_MODULES
from klconvert.quant.policy import converted_module, is_linear_weight, kept_in_high_precision, match_key
from klconvert.quant.scheme import (COMPRESSED_STATUS, COMPRESSED_TENSORS, COMPRESSED_TENSORS_VERSION, NF4_BLOCKSIZE,
                                   PACKED_FORMAT)
from klconvert.quant.stored import NF4_DATA, NF4_PARTS, NF4_REQUIRED, NF4_STATE, PACKED_PARTS, PACKED_REQUIRED
from klconvert.units import counted

# the NF4 parts a module's tensors are grouped by: its data's own name is the module's weight's
NF4_PARTS_BESIDE_DATA = tuple(p for p in NF4_PARTS if p != NF4_DATA)
# names that end so are tensors only a quantized folder holds (either method's; "absmax" the nested one too)
PACKED_TENSOR_SUFFIXES = (*PACKED_REQUIRED, "absmax", NF4_STATE)
METHODS = (COMPRESSED_TENSORS, BITSANDBYTES)
LLM_INT8 = "8-bit (LLM.int8)"
# bitsandbytes' forms klconvert does not read, by a tensor only that form writes beside a module's weight: LLM.int8
# (transformers' load_in_8bit: Linear8bitLt's _save_to_state_dict writes the int8 weight's fp32 row scales and a
# uint8 scalar naming its layout) and 4-bit FP4 (Params4bit's quant state, named for its quant type)
UNREAD_BNB_PARTS = {"SCB": LLM_INT8, "weight_format": LLM_INT8, "weight.quant_state.bitsandbytes__fp4": "4-bit FP4"}


@dataclass(frozen=True)
class QuantizedSource:
    """A canonical weight stored packed: its parts (local name -> (shard, tensor name)) and its scheme."""

    parts: dict[str, tuple[str, str]]
    scheme: QuantScheme
    shape: tuple[int, int]  # the dense weight's [out, in], from config.json (weight_shape's values must say it)

    @property
    def name(self) -> str:
        """The stored tensor holding the packed values (what an error names)."""
        return self.parts["weight_packed" if "weight_packed" in self.parts else "weight"][1]

    @property
    def shards(self) -> list[str]:
        """The shards holding its parts: what a line about their damage rests on."""
        return sorted({shard for shard, _ in self.parts.values()})


def quant_method(raw_config: dict, where: str) -> str | None:
    """The checkpoint's quantization method from config.json, or None for an unquantized checkpoint."""
    qc = raw_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean"}.get(type(qc), "a number")   # JSON's other values
        raise KLError(f"{where}: quantization_config is {kind} ({shown(qc)}), not an object naming its "
                      f"quant_method; klconvert reads {' and '.join(METHODS)} checkpoints -- put back the config.json "
                      "the weights came with (or write one with `klconvert quantize`)")
    method = qc.get("quant_method")
    if method is None:
        raise KLError(f"{where}: quantization_config has no quant_method; klconvert reads {' and '.join(METHODS)} "
                      "checkpoints -- put back the config.json the weights came with (or write one with `klconvert "
                      "quantize`)")
    if method not in METHODS:
        raise KLError(f"{where}: quantization_config.quant_method {shown(method)} is not supported; klconvert reads "
                      f"{' and '.join(METHODS)} checkpoints (write one with `klconvert quantize`)")
    if method == BITSANDBYTES and qc.get("load_in_8bit") is True:
        raise _unread_bnb_form(f"{where}: quantization_config.load_in_8bit is true", LLM_INT8)
    if method == BITSANDBYTES and qc.get("load_in_4bit") is True and qc.get("bnb_4bit_quant_type") == "fp4":
        raise _unread_bnb_form(f"{where}: quantization_config.bnb_4bit_quant_type is 'fp4'", "4-bit FP4")
    return method


def refuse_unread_bnb_parts(weight_map: dict[str, str], folder: Path) -> None:
    """KLError naming the first tensor of a bitsandbytes form klconvert does not read (UNREAD_BNB_PARTS) when the
    folder holds one, whatever config.json says (with no quantization_config, or an NF4 one, its weights would be
    called damaged, unpacked or cut short)."""
    part = min((name for name in weight_map if _module_of(name, tuple(UNREAD_BNB_PARTS))), default=None)
    if part is not None:
        raise _unread_bnb_form(f"{folder / weight_map[part]}: tensor {shown(part)}",
                               UNREAD_BNB_PARTS[_module_of(part, tuple(UNREAD_BNB_PARTS))[1]])


def refuse_act_order_index(weight_map: dict[str, str], folder: Path) -> None:
    """KLError naming the first group index of GPTQ's act order by group (*.weight_g_idx) when the folder holds one,
    whatever config.json says (it was called a damaged float tensor, for its int32 dtype)."""
    part = min((name for name in weight_map if name.endswith("." + G_IDX)), default=None)
    if part is not None:
        raise group_act_order(f"{folder / weight_map[part]}: tensor {shown(part)}")


def _unread_bnb_form(where: str, form: str) -> KLError:
    return KLError(f"{where}: bitsandbytes {form} checkpoints are not supported -- klconvert reads bitsandbytes' "
                   "4-bit NF4 only; give the bf16 release (or its 4-bit NF4 form, which `klconvert quantize --scheme "
                   "nf4` makes from it)")


def _module_of(name: str, parts: tuple[str, ...]) -> tuple[str, str] | None:
    for part in parts:
        if name.endswith("." + part):
            return name[: -len(part) - 1], part
    return None


def declared_schemes(method: str | None, config: KimiLinearConfig, folder: Path) -> Declared | BnbDeclared | None:
    """What the quantization_config declares, read once for the packed weights and the float ones alike: a
    compressed-tensors one's groups (declared_groups), a bitsandbytes one's modules kept out of 4-bit (bnb_declared);
    None for an unquantized folder."""
    if method is None:
        return None
    read = declared_groups if method == COMPRESSED_TENSORS else bnb_declared
    return read(config.raw["quantization_config"], f"{folder}/config.json")


def find_quantized(method: str, declared: Declared | BnbDeclared, weight_map: dict[str, str],
                   headers: dict[str, SafetensorsHeader], expected: dict[str, TensorSpec], config: KimiLinearConfig,
                   folder) -> dict[str, QuantizedSource]:
    """Group the packed tensors by module, name each module's weight through the name table (any layout, as for
    unquantized tensors), and check each group against the weight it replaces and against what quantization_config
    declares (`declared`, as declared_schemes reads it): compressed-tensors' is read with the scheme whose parts it
    stores; bitsandbytes' must be a module it declares 4-bit.

    Returns {canonical weight name: QuantizedSource}; every source tensor it names belongs to one group.
    """
    parts = PACKED_PARTS if method == COMPRESSED_TENSORS else NF4_PARTS_BESIDE_DATA
    groups: dict[str, dict[str, tuple[str, str]]] = {}
    for name, shard in weight_map.items():
        hit = _module_of(name, parts)
        if hit:
            groups.setdefault(hit[0], {})[hit[1]] = (shard, name)
    if method == BITSANDBYTES:   # a module's uint8 data alone is one whose quant state is missing: named as such
        for name, shard in weight_map.items():
            hit = _module_of(name, (NF4_DATA,))
            if hit and (hit[0] in groups or headers[shard].tensors[name].dtype == "U8"):
                groups.setdefault(hit[0], {})[NF4_DATA] = (shard, name)

    out: dict[str, QuantizedSource] = {}
    stored_as: dict[str, str] = {}
    for module, group in groups.items():
        where = f"{folder}: quantized weight {shown(module + '.weight')}"
        # what a line about the module's parts says to do, and one about them and the config.json that declares them
        shards = [Path(folder) / shard for shard in sorted({shard for shard, _ in group.values()})]
        damaged = partial(damaged_folder_remedy, folder, shards)
        mismatched = partial(damaged_folder_remedy, folder, [*shards, Path(folder) / CONFIG_FILE])
        pieces = canonical_pieces(f"{module}.weight", config)
        if pieces == [(f"{module}.weight", ())] and f"{module}.weight" not in expected:
            pieces = canonical_pieces(module, config)  # transformers' stacked experts carry no `.weight`
        if len(pieces) != 1 or pieces[0][1] != ():
            raise KLError(f"{where} is stacked from {len(pieces)} weights; klconvert reads packed weights one module "
                          "at a time (per-expert names) -- quantize the released or per-expert layout instead")
        canonical = pieces[0][0]
        spec = expected.get(canonical)
        if spec is None or len(spec.shape) != 2:
            raise KLError(f"{where} maps to no linear weight of this model "
                          f"({counted(config.num_hidden_layers, 'layer')}, {config.num_experts} experts); "
                          f"{CONFIG_MISMATCH}")
        kept = kept_in_high_precision(canonical)
        if kept is not None:   # the embedding and the router: vLLM's kimi_linear builds both without a quant method
            raise KLError(f"{where} is stored packed, but it is {kept}, which Kimi Linear keeps in high precision: "
                          "vLLM builds it unquantized and finds no float weight to load, and `klconvert quantize` "
                          "never packs it -- quantize the bf16 release with `klconvert quantize`, which keeps it")
        if canonical in stored_as:
            raise KLError(f"{where} and {shown(stored_as[canonical] + '.weight')} both provide {canonical}; the "
                          "checkpoint holds one weight under two layouts' names -- keep one")
        stored_as[canonical] = module

        def entry(part: str):
            shard, name = group[part]
            return headers[shard].tensors[name]

        if method == COMPRESSED_TENSORS and "weight_packed" not in group and f"{module}.weight" in weight_map:
            raise _stored_uncompressed(where, group)
        missing = [p for p in (PACKED_REQUIRED if method == COMPRESSED_TENSORS else NF4_REQUIRED) if p not in group]
        if missing:
            raise KLError(f"{where} lacks {', '.join(missing)}; the folder is incomplete -- {damaged()}")
        out_dim, in_dim = spec.shape
        if method == COMPRESSED_TENSORS:
            packed, scale = entry("weight_packed"), entry("weight_scale")
            bits = packed.shape[1] * 32 // in_dim if len(packed.shape) == 2 and in_dim else 0
            ok = (packed.dtype == "I32" and bits in SUPPORTED_BITS and packed.shape == (out_dim, in_dim * bits // 32)
                  and len(scale.shape) == 2 and scale.shape[0] == out_dim and scale.shape[1] > 0
                  and in_dim % scale.shape[1] == 0 and scale.dtype in ("BF16", "F16", "F32")
                  and entry("weight_shape").shape == (2,) and entry("weight_shape").dtype in ("I64", "I32"))
            if not ok:
                raise KLError(f"{where}: packed tensors {packed.dtype} {list(packed.shape)} / scale {scale.dtype} "
                              f"{list(scale.shape)} do not fit its shape {list(spec.shape)}; {damaged()}")
            # first: a zero point under a symmetric scheme is named as such, whatever form it is stored in
            scheme = _held_scheme(declared, module, is_linear_weight(f"{module}.weight", spec.shape), in_dim, where,
                                  (bits, scale.shape[1], "weight_zero_point" in group), mismatched)
            if "weight_zero_point" in group:   # packed along the rows: [ceil(out / (32 / bits)), groups] int32
                zero = entry("weight_zero_point")
                packed_zero = (-(-out_dim * bits // 32), scale.shape[1])
                if zero.shape == (out_dim, scale.shape[1]) != packed_zero:
                    raise KLError(f"{where}: weight_zero_point {zero.dtype} {list(zero.shape)} holds a zero point a "
                                  f"row, unpacked, where the {PACKED_FORMAT} format packs {32 // bits} rows into each "
                                  f"int32 (I32 {list(packed_zero)} here), as compressed-tensors "
                                  f"{COMPRESSED_TENSORS_VERSION} writes it and vLLM loads it -- save the model again "
                                  f"with compressed-tensors {COMPRESSED_TENSORS_VERSION} (llm-compressor's "
                                  "save_pretrained), or quantize the bf16 release with `klconvert quantize`")
                if zero.dtype != "I32" or zero.shape != packed_zero:
                    raise KLError(f"{where}: weight_zero_point {zero.dtype} {list(zero.shape)} does not fit its "
                                  f"scale {list(scale.shape)} at {bits} bits; {damaged()}")
        else:
            packed = entry("weight")   # [n / 2, 1] uint8, as bitsandbytes' Linear4bit saves it
            if packed.dtype != "U8" or len(packed.shape) != 2 or (2 * packed.shape[0], packed.shape[1]) != \
                    (out_dim * in_dim, 1):
                raise KLError(f"{where}: nf4 data {packed.dtype} {list(packed.shape)} does not fit its shape "
                              f"{list(spec.shape)}; {damaged()}")
            converted = converted_module(canonical)
            skip = declared.skipped_by(converted) if converted is not None else None
            if skip is not None:
                raise KLError(f"{where} is stored as NF4, but quantization_config.{SKIP_MODULES} lists it "
                              f"({shown(skip.said)}): transformers builds it as an unquantized Linear and finds no "
                              f"float weight to load -- the folder does not match its config.json; {mismatched()}")
            scheme = QuantScheme(4, NF4_BLOCKSIZE, True, "nf4")
        out[canonical] = QuantizedSource(group, scheme, (out_dim, in_dim))
    if method == COMPRESSED_TENSORS and out:
        _refuse_packed_not_compressed(config.raw["quantization_config"], next(iter(out.values())).name, folder)
    # floats under a config that says packed read as the floats, and measured as lossless under a name saying int4;
    # the other method's packed parts are left to the reader, which names them
    packing = _declared_packing(method, config.raw["quantization_config"])
    if not out and packing and not any(name.endswith(PACKED_TENSOR_SUFFIXES) for name in weight_map):
        raise KLError(f"{folder}/config.json: quantization_config declares {packing} weights, but no tensor here is "
                      f"stored packed (no *.{parts[0]}): this config.json does not belong to these weights -- put "
                      "back the one they came with, or delete its quantization_config")   # parts[0]: the packed data
    return out


def _stored_uncompressed(where: str, group: dict[str, tuple[str, str]]) -> KLError:
    """The refusal of a weight stored as floats with its quantization parameters beside it (`group`: its parts):
    compressed-tensors' uncompressed save, which llm-compressor writes with save_compressed=False (format "dense",
    status "frozen"). It was told it lacked weight_packed and weight_shape, cut short, though the folder is whole."""
    return KLError(f"{where} is stored as floats with {', '.join(sorted(group))} beside it: compressed-tensors' "
                   f"uncompressed form (llm-compressor's save_compressed=False, format {DENSE_FORMAT!r}), which "
                   f"klconvert does not read (it reads weights stored {PACKED_FORMAT}) -- save the model again "
                   "compressed (llm-compressor's save_pretrained with save_compressed=True), or quantize the "
                   "bf16 release with `klconvert quantize`")


def _refuse_packed_not_compressed(quantization_config: dict, packed: str, folder) -> None:
    """KLError unless a compressed-tensors folder holding packed weights (`packed` the first) says quantization_status
    "compressed": under any other (absent: compressed-tensors reads "initialized") transformers keeps each module's
    float weight, finds none, initialises it at random and drops the packed tensors as unexpected (h203's tfload.py:
    172 of each). vLLM 0.33 reads no status (it builds its layers from the format), so only the status is wrong."""
    status = quantization_config.get("quantization_status")
    if status == COMPRESSED_STATUS:
        return
    said = (f"quantization_status is {shown(status)}" if "quantization_status" in quantization_config else
            "has no quantization_status (compressed-tensors reads 'initialized')")
    raise KLError(f"{folder}/config.json: quantization_config {said}, but the folder holds packed weights "
                  f"({shown(packed)}): transformers builds their packed layout only under {COMPRESSED_STATUS!r}, and "
                  f"under any other status would run those weights at random values -- set quantization_status to "
                  f"{COMPRESSED_STATUS!r}")


def _declared_packing(method: str, quantization_config: dict) -> str | None:
    """How the config says its weights are stored packed, or None where it says they are not: bitsandbytes always
    packs them; compressed-tensors does in its pack-quantized format (top-level or any group's), not in "dense"."""
    if method == BITSANDBYTES:
        return BITSANDBYTES
    groups = quantization_config.get("config_groups")
    formats = [g.get("format") for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
    return PACKED_FORMAT if PACKED_FORMAT in [quantization_config.get("format"), *formats] else None


def _held_scheme(declared: Declared, module: str, linear: bool, in_dim: int, where: str,
                 stored: tuple[int, int, bool], mismatched: Callable[[], str]) -> QuantScheme:
    """The scheme of the config group that holds a packed module (compressed-tensors' matching of targets and
    ignore), checked against the parts it stores -- (bits, scales a row, zero points or not): groups of in_dim /
    scales inputs, one a row being per-channel, zero points iff asymmetric -- and the group's format; else KLError
    naming the group, and the part missing or extra (read with another scheme than it was written with it reads as
    garbage; vLLM and transformers read it with its group's, or as unquantized where no group holds it)."""
    bits, groups, zero_points = stored
    held = declared.held(module, linear)
    group, entry = held.group, held.entry
    if group is None:
        why = (f"quantization_config.ignore lists it ({shown(entry.pattern)})" if entry is not None else
               f"no config group of quantization_config targets it ({declared.describe():.200})")
        raise KLError(f"{where} is stored packed, but {why}: runtimes would read it as unquantized -- the folder does "
                      f"not match its config.json; {mismatched()}")
    if group.scheme is None:
        raise KLError(f"{where} is stored packed, but config group {group.name:.40}, whose target "
                      f"{shown(entry.pattern)} selects it, quantizes no weights (weights null): runtimes would read it "
                      f"as unquantized -- the folder does not match its config.json; {mismatched()}")
    if group.format == DENSE_FORMAT:
        raise KLError(f"{where} is stored packed ({PACKED_FORMAT}), but quantization_config.{group.format_field} is "
                      f"{DENSE_FORMAT!r} (weights stored as plain floats): vLLM and transformers would look for its "
                      "float weight and find none -- the folder does not match its config.json; put back the one "
                      f"its weights came with (format {PACKED_FORMAT!r})")
    scheme = group.scheme
    group_size = in_dim if scheme.group_size == CHANNEL else scheme.group_size
    if (bits, groups * group_size, zero_points) == (scheme.bits, in_dim, not scheme.symmetric):
        return scheme
    part = ""
    if zero_points != (not scheme.symmetric):
        part = (": it holds a weight_zero_point, which a symmetric scheme has none of" if zero_points else
                ": it lacks weight_zero_point")
    raise KLError(f"{where} is stored as int{bits} in groups of {in_dim // groups} inputs "
                  f"{'with' if zero_points else 'without'} zero points, but quantization_config declares "
                  f"{group.name:.40} {scheme.describe()} for it (its target {shown(entry.pattern)} selects it){part}; "
                  f"the folder does not match its config.json -- {mismatched()}")


def refuse_floats_held_packed(declared: Declared | BnbDeclared | None,
                              floats: list[tuple[str, tuple[int, ...], str]]) -> None:
    """KLError naming the first weight stored as floats (each of `floats`: its name, shape, and where an error names
    it) that quantization_config declares packed: a linear weight that a config group of pack-quantized weights
    selects and ignore does not list (Declared.held, as compressed-tensors matches them), or that a bitsandbytes
    config's llm_int8_skip_modules does not list by the name transformers gives its module (converted_module: a routed
    expert's is none, transformers keeping those floats whatever the list says). transformers then finds no packed parts
    for it (compressed-tensors: it initialises them at random; bitsandbytes: it builds a Linear4bit), and vLLM looks for
    compressed-tensors' too (it reads no bitsandbytes folder): another model than the one klconvert would run. A weight
    Kimi Linear keeps in high precision is not one: vLLM builds the router and the convs unquantized whatever the config
    says, and transformers' are no Linear."""
    if declared is None:
        return
    for name, shape, where in floats:
        if not is_linear_weight(name, shape) or kept_in_high_precision(name) is not None:
            continue
        module = match_key(name)
        if isinstance(declared, BnbDeclared):
            converted = converted_module(name)
            if converted is None or declared.skipped_by(converted) is not None:
                continue
            raise KLError(f"{where} is stored as floats, but quantization_config (bitsandbytes) declares it 4-bit NF4 "
                          f"({declared.unlisted()}): transformers would look for its NF4 quant state and find none -- "
                          f"add {shown(converted)} (or a pattern for every such module) to "
                          f"quantization_config.{SKIP_MODULES}, or quantize the model again with `klconvert quantize "
                          "--scheme nf4`")
        held = declared.held(module, True, packed=False)
        group = held.group
        if group is None or group.scheme is None or group.format == DENSE_FORMAT:
            continue
        # ignore is matched against the names the folder holds, as vLLM matches it; an entry naming the module in
        # memory only (as a recipe may: llm-compressor matches those) leaves vLLM alone without it
        aliased = next(((e, alias) for alias in map(match_key, layout_names(name)) for e in declared.ignore
                        if e.matches(alias, True)), None)
        unlisted = ("ignore does not list it: transformers and vLLM" if aliased is None else
                    f"ignore lists it only by another layout's name ({shown(aliased[0].pattern)} lists "
                    f"{shown(aliased[1])}), which vLLM does not match: it matches the names the folder holds, and")
        raise KLError(f"{where} is stored as floats, but config group {group.name:.40} of quantization_config, whose "
                      f"target {shown(held.entry.pattern)} selects it, declares it packed ({group.scheme.describe()}, "
                      f"{group.format}) and {unlisted} would look for its weight_packed and weight_scale and find "
                      f"none -- add {shown(module)} (or a re: pattern for every such module) to "
                      "quantization_config.ignore, or quantize the model again with `klconvert quantize`")


def dequantize(tensors: dict[str, torch.Tensor], scheme: QuantScheme, where: str = "a packed weight",
               shape: tuple[int, int] | None = None, remedy: Callable[[], str] = damaged_folder_remedy) -> torch.Tensor:
    """Rebuild a dense weight (in the dtype of its scales) from its packed parts (Checkpoint.packed's, their scales
    checked there); `where` names it in errors, `shape` (config.json's, when known) is the one an NF4 quant state
    must say, `remedy` (asked only for a line) what to do about damaged parts."""
    if scheme.kind == "nf4":
        return decompress_nf4(tensors, where, shape, remedy)
    return decompress_weight(tensors, scheme, remedy=remedy)
