"""The fields of a compressed-tensors quantization_config as compressed-tensors' own validator takes them
(QuantizationConfig.model_validate, which transformers and vLLM run when they load a folder), stated once as a table
of the models klconvert reads -- without importing compressed-tensors, which klconvert does not depend on -- and the
refusal of a key or value that validator refuses, so that klconvert runs no folder they cannot load (a status
transformers loads packed weights wrong under is the reader's to refuse: it knows which weights are packed)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from klconvert.errors import KLError, shown
from klconvert.quant.scheme import COMPRESSED_TENSORS_VERSION


@dataclass(frozen=True)
class Takes:
    """The JSON values compressed-tensors' validator takes for a field, and how an error says them."""

    said: str
    test: Callable[[object], bool]


def _lax_number(value) -> bool:
    """pydantic's lax float (compressed-tensors' models are not strict): a number, true or false, or text that reads
    as a number. Python's float reads other scripts' digits too ("\u0663"), which pydantic refuses, and an integer
    past a float's range is refused by both."""
    if type(value) not in (bool, int, float, str) or isinstance(value, str) and not value.isascii():
        return False
    try:
        float(value)
    except (ValueError, OverflowError):
        return False
    return True


# compressed-tensors' QuantizationStatus: the only texts quantization_status may be (no other case). The validator
# takes each, but transformers loads packed weights under COMPRESSED_STATUS only: checkpoint/quantized refuses a folder
# of packed weights under another, past this table
QUANTIZATION_STATUSES = ("initialized", "calibration", "frozen", "compressed", "decompressed")
STRING = Takes("a string", lambda value: isinstance(value, str))
STRING_OR_NULL = Takes("a string or null", lambda value: value is None or isinstance(value, str))
OBJECT = Takes("an object", lambda value: isinstance(value, dict))
LIST_OR_NULL = Takes("a list or null", lambda value: value is None or isinstance(value, list))
NUMBER_OR_NULL = Takes("a number or null", lambda value: value is None or _lax_number(value))
STATUS = Takes(f"one of {', '.join(QUANTIZATION_STATUSES)}", lambda value: value in QUANTIZATION_STATUSES)
# block_structure's one value here: compressed-tensors refuses a block structure unless the strategy is block, which
# klconvert does not read
NULL = Takes("null", lambda value: value is None)
READ = None   # the value is checked where klconvert reads it, stricter than compressed-tensors, with its own error


@dataclass(frozen=True)
class Model:
    """One of compressed-tensors' pydantic models: its fields (a Takes, or READ), and whether it refuses a key it does
    not define (extra="forbid") or ignores it (extra="ignore")."""

    name: str
    fields: dict[str, Takes | None]
    forbids_others: bool


# compressed-tensors 0.20.1's quantization_config (quant_config.py): its writer puts `version`, `sparsity_config` and
# `transform_config` beside these, which it ignores
QUANTIZATION_CONFIG = Model("QuantizationConfig", {
    "config_groups": READ, "quant_method": READ, "kv_cache_scheme": READ, "format": STRING,
    "quantization_status": STATUS, "global_compression_ratio": NUMBER_OR_NULL, "ignore": LIST_OR_NULL,
    "moe_sparsity_config": READ,
}, forbids_others=False)
# a config group (quant_scheme.py)
QUANTIZATION_SCHEME = Model("QuantizationScheme", {
    "targets": READ, "weights": READ, "input_activations": READ, "output_activations": READ, "format": READ,
}, forbids_others=True)
# a group's `weights` (quant_args.py)
QUANTIZATION_ARGS = Model("QuantizationArgs", {
    "num_bits": READ, "type": READ, "symmetric": READ, "group_size": READ, "strategy": READ,
    "block_structure": NULL, "dynamic": READ, "actorder": READ, "scale_dtype": STRING_OR_NULL,
    "zp_dtype": STRING_OR_NULL, "observer": STRING_OR_NULL, "observer_kwargs": OBJECT,
}, forbids_others=True)


def check_fields(model: Model, value: dict, where: str, field: str = "") -> None:
    """KLError naming the first key of `value` (a `model` at quantization_config.`field`; "" the whole config) that
    compressed-tensors' validator refuses: one `model` does not define where it forbids others, or a value it does
    not take."""
    for key, item in value.items():
        path = f"quantization_config.{field}{'.' if field else ''}{key:.40}"
        if key not in model.fields:
            if model.forbids_others:
                raise KLError(f"{where}: {path} is a key compressed-tensors {COMPRESSED_TENSORS_VERSION}'s "
                              f"{model.name} does not define (it has {', '.join(model.fields)}), so transformers and "
                              "vLLM refuse the config -- correct or remove it, or quantize the model again with "
                              "`klconvert quantize`")
            continue
        takes = model.fields[key]
        if takes is not READ and not takes.test(item):
            raise KLError(f"{where}: {path} is {shown(item)}, not {takes.said} as compressed-tensors "
                          f"{COMPRESSED_TENSORS_VERSION}'s {model.name} "
                          "requires, so transformers and vLLM refuse the config -- correct it, or quantize the model "
                          "again with `klconvert quantize`")
