"""Number formats and the quantization policy: group-wise int (compressed-tensors pack-quantized), NF4, recipes."""
from klconvert.quant.defaults import policy_from_options
from klconvert.quant.groupwise import dequantize_groupwise, quantize_groupwise
from klconvert.quant.nf4 import bnb_quantization_config, compress_nf4, decompress_nf4
from klconvert.quant.pack_quantized import compress_weight, decompress_weight, pack_to_int32, unpack_from_int32
from klconvert.quant.policy import Entry, Group, Policy
from klconvert.quant.recipe import Recipe, load_recipe, parse_recipe
from klconvert.quant.scheme import QuantScheme, compressed_tensors_config

__all__ = [
    "Entry", "Group", "Policy", "QuantScheme", "Recipe",
    "bnb_quantization_config", "compress_nf4", "compress_weight", "compressed_tensors_config",
    "decompress_nf4", "decompress_weight", "dequantize_groupwise", "load_recipe", "pack_to_int32",
    "parse_recipe", "policy_from_options", "quantize_groupwise", "unpack_from_int32",
]
