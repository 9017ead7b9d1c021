"""Number formats and the quantization policy: group-wise int (compressed-tensors pack-quantized), NF4, recipes.

The policy, its schemes and recipes import no torch (~2 s of CPU), so that a command checks its flags and a recipe
before it imports it; the number formats' arithmetic, which does, is imported from here when first named."""
import importlib

from klconvert.quant.defaults import policy_from_options
from klconvert.quant.policy import Entry, Group, Policy
from klconvert.quant.recipe import Recipe, load_recipe, parse_recipe
from klconvert.quant.scheme import QuantScheme, compressed_tensors_config

# {name: the module of this package that defines it with torch}
_WITH_TORCH = {
    "dequantize_groupwise": "groupwise", "quantize_groupwise": "groupwise",
    "bnb_quantization_config": "nf4", "compress_nf4": "nf4", "decompress_nf4": "nf4",
    "compress_weight": "pack_quantized", "decompress_weight": "pack_quantized", "pack_to_int32": "pack_quantized",
    "unpack_from_int32": "pack_quantized",
}

__all__ = [
    "Entry", "Group", "Policy", "QuantScheme", "Recipe",
    "bnb_quantization_config", "compress_nf4", "compress_weight", "compressed_tensors_config",
    "decompress_nf4", "decompress_weight", "dequantize_groupwise", "load_recipe", "pack_to_int32",
    "parse_recipe", "policy_from_options", "quantize_groupwise", "unpack_from_int32",
]


def __getattr__(name: str):
    """One of _WITH_TORCH's names, imported (and torch with it) where it is first named."""
    if name not in _WITH_TORCH:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WITH_TORCH[name]}"), name)


def __dir__() -> list[str]:
    """The package's names with _WITH_TORCH's, which __getattr__ gives only once named: without torch's import."""
    return sorted({*globals(), *_WITH_TORCH})
