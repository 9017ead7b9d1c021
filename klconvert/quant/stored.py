"""What a quantized weight is stored as: each part's name, dtype and shape under its scheme -- one statement that
the converter plans its output from and the memory plan sizes the weights from."""
from __future__ import annotations

import math

import torch

from klconvert.quant.groupwise import CHANNEL
from klconvert.quant.scheme import NF4_BLOCKSIZE, QuantScheme

Part = tuple[str, torch.dtype, tuple[int, ...]]  # (name under the module, dtype, shape)
NF4_NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization re-quantizes absmax in blocks of 256


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


def nf4_parts(shape: tuple[int, ...]) -> tuple[Part, ...]:
    """The tensors compress_nf4 makes for a weight (bitsandbytes' Linear4bit serialization, double-quantized): the
    4-bit values two to a byte, a uint8 absmax per block of 64, an fp32 absmax per 256 of those, and the two code
    books -- all but the JSON quant state, whose length depends on the values (see convert.outputs)."""
    n = math.prod(shape)
    blocks = -(-n // NF4_BLOCKSIZE)
    return (("weight", torch.uint8, (n // 2, 1)),
            ("weight.absmax", torch.uint8, (blocks,)),
            ("weight.quant_map", torch.float32, (16,)),
            ("weight.nested_absmax", torch.float32, (-(-blocks // NF4_NESTED_BLOCKSIZE),)),
            ("weight.nested_quant_map", torch.float32, (256,)))


def stored_parts(shape: tuple[int, ...], dtype: torch.dtype, scheme: QuantScheme) -> tuple[Part, ...]:
    """The parts of a weight of `shape` (source dtype `dtype`) stored with `scheme`."""
    return nf4_parts(shape) if scheme.kind == "nf4" else packed_parts(shape, dtype, scheme)
