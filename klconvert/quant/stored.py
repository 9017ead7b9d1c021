"""What a quantized weight is stored as: each part's name, dtype and shape under its scheme -- one statement that
the converter plans its output from and the memory plan sizes the weights from."""
from __future__ import annotations

import math

import torch

from klconvert.quant.group_rules import CHANNEL
from klconvert.quant.scheme import NF4_BLOCKSIZE, QuantScheme

Part = tuple[str, torch.dtype, tuple[int, ...]]  # (name under the module, dtype, shape)
NF4_NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization re-quantizes absmax in blocks of 256

# The parts' names, which the writer plans, the readers look for and the folder checks require. pack-quantized: what
# PackedQuantizationCompressor writes under "<module>.<part>", a zero point only for an asymmetric scheme.
PACKED_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
PACKED_REQUIRED = tuple(p for p in PACKED_PARTS if p != "weight_zero_point")
# NF4: what Linear4bit._save_to_state_dict writes, "<module>.weight" (the data) and QuantState.as_dict(packed=True)
# under it -- the nested pair only when double-quantized, and the non-tensor fields as JSON in one uint8 tensor
NF4_DATA = "weight"
NF4_STATE = "weight.quant_state.bitsandbytes__nf4"
NF4_NESTED_PARTS = ("weight.nested_absmax", "weight.nested_quant_map")
NF4_PARTS = (NF4_DATA, "weight.absmax", "weight.quant_map", *NF4_NESTED_PARTS, NF4_STATE)
NF4_REQUIRED = tuple(p for p in NF4_PARTS if p not in NF4_NESTED_PARTS)


def packed_parts(shape: tuple[int, ...], dtype: torch.dtype, scheme: QuantScheme) -> tuple[Part, ...]:
    """The tensors compress_weight makes for a [out, in] weight (compressed-tensors pack-quantized): weight_packed
    int32 [out, ceil(in*bits/32)], weight_scale `dtype` [out, groups], weight_zero_point int32
    [ceil(out*bits/32), groups] when asymmetric (packed along the output dim), weight_shape int64 [2]."""
    rows, cols = shape
    per_word = 32 // scheme.bits
    groups = 1 if scheme.group_size == CHANNEL else cols // scheme.group_size
    parts = [("weight_packed", torch.int32, (rows, -(-cols // per_word))), ("weight_scale", dtype, (rows, groups))]
    if not scheme.symmetric:
        parts.append(("weight_zero_point", torch.int32, (-(-rows // per_word), groups)))
    parts.append(("weight_shape", torch.int64, (2,)))
    return tuple(parts)


def nf4_parts(shape: tuple[int, ...], blocksize: int = NF4_BLOCKSIZE,
              nested_blocksize: int | None = NF4_NESTED_BLOCKSIZE) -> tuple[Part, ...]:
    """The tensors bitsandbytes' Linear4bit serialization holds for a weight: the 4-bit values two to a byte, an
    absmax per block of `blocksize`, and a code book; double-quantized (nested_blocksize not None) that absmax is
    uint8, with an fp32 absmax per nested_blocksize of those and a code book of its own, else it is fp32. All but the
    JSON quant state, whose length depends on the values (see convert.outputs). The defaults are what compress_nf4
    makes; a folder's quant state may say other block sizes, which its reader holds its parts to."""
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    nested = nested_blocksize is not None
    parts = [(NF4_DATA, torch.uint8, (n // 2, 1)),
             ("weight.absmax", torch.uint8 if nested else torch.float32, (blocks,)),
             ("weight.quant_map", torch.float32, (16,))]
    if nested:
        nested_absmax, nested_quant_map = NF4_NESTED_PARTS
        parts += [(nested_absmax, torch.float32, (-(-blocks // nested_blocksize),)),
                  (nested_quant_map, torch.float32, (256,))]
    return tuple(parts)


def stored_parts(shape: tuple[int, ...], dtype: torch.dtype, scheme: QuantScheme) -> tuple[Part, ...]:
    """The parts of a weight of `shape` (source dtype `dtype`) stored with `scheme`."""
    return nf4_parts(shape) if scheme.kind == "nf4" else packed_parts(shape, dtype, scheme)
