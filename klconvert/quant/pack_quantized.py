"""The compressed-tensors `pack-quantized` format: int32 bit packing and a module's on-disk tensors."""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import torch

from klconvert.damage_remedy import damaged_folder_remedy
from klconvert.errors import KLError, ValuesRefused, either
from klconvert.quant.group_rules import SUPPORTED_BITS
from klconvert.quant.groupwise import dequantize_groupwise, qrange, quantize_groupwise
from klconvert.quant.scheme import QuantScheme
from klconvert.quant.stored import PACKED_PARTS, PACKED_REQUIRED

# A dequantized weight must be finite in the narrowest dtype a runtime holds weights in (bf16; fp32's range is a hair
# wider) and in its scale's dtype, which dequantizing computes in.
NARROWEST_RUNTIME_DTYPE = torch.bfloat16
# What ends a quantizer's refusal of such a weight: the source's own values, which no rerun changes
SOURCE_OUT_OF_RANGE = ("the source's weights are too large for any model's; check the source (a fine-tune that "
                       "diverged?) or re-download it")


def largest_dequantized(dtype: torch.dtype) -> float:
    """The largest magnitude a weight dequantized in `dtype` may reach: finite there and in NARROWEST_RUNTIME_DTYPE."""
    return min(torch.finfo(dtype).max, torch.finfo(NARROWEST_RUNTIME_DTYPE).max)


def pack_to_int32(q: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """Pack int8 values in [-2**(bits-1), 2**(bits-1)) into int32 words along `packed_dim` (0 or 1).

    Bit-exact with compressed_tensors' pack_to_int32: each value is offset to unsigned
    (v + 2**(bits-1)); element j of a word sits at bits [j*bits, (j+1)*bits); the packed dim is
    zero-padded to a whole word. [rows, cols] -> [rows, ceil(cols*bits/32)] for packed_dim=1.
    """
    if q.dtype != torch.int8 or q.ndim != 2:
        raise ValueError(f"pack_to_int32 takes a 2-D int8 tensor, got {q.ndim}-D {q.dtype}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"pack_to_int32 packs {either(SUPPORTED_BITS)}-bit values, got {bits}")
    v = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)         # unsigned, (rows, cols)
    if packed_dim == 0:
        v = v.T
    v = torch.nn.functional.pad(v, (0, -v.shape[1] % (32 // bits)))
    if bits == 4:
        v = v[:, 0::2] | (v[:, 1::2] << 4)                               # byte k = elements 2k (low), 2k+1
    v = v.contiguous()                                                   # (rows, 4 * words) bytes
    if sys.byteorder == "big":  # a word's first byte must be its least significant one
        v = v.unflatten(1, (-1, 4)).flip(-1).flatten(1).contiguous()
    words = v.flatten().view(torch.int32).view(v.shape[0], -1)           # (rows, words)
    return (words.T if packed_dim == 0 else words).contiguous()


def unpack_from_int32(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size,
                      packed_dim: int = 1) -> torch.Tensor:
    """Inverse of pack_to_int32: int32 words -> int8 values of the original 2-D `shape`."""
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"unpack_from_int32 takes a 2-D int32 tensor, got {packed.ndim}-D {packed.dtype}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unpack_from_int32 unpacks {either(SUPPORTED_BITS)}-bit values, got {bits}")
    words = (packed.T if packed_dim == 0 else packed).contiguous()
    v = words.flatten().view(torch.uint8).view(words.shape[0], -1)       # (rows, 4 * words)
    if sys.byteorder == "big":
        v = v.unflatten(1, (-1, 4)).flip(-1).flatten(1)
    if bits == 4:
        v = torch.stack((v & 0xF, v >> 4), dim=-1).flatten(1)            # (rows, 8 * words)
    v = (v[:, : int(shape[packed_dim])].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    return (v.T if packed_dim == 0 else v).contiguous()


def weight_shape_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """A packed module's weight_shape: its weight's [out, in] as int64, on the host (read there into Python), whatever
    an app's default device."""
    return torch.tensor(tuple(shape), dtype=torch.int64, device="cpu")


def compress_weight(name_prefix: str, w: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """Quantize and pack module `name_prefix`'s weight w [out, in] as PackedQuantizationCompressor does.

    Returns {prefix.weight_packed: int32 [out, in*bits/32], prefix.weight_scale: w.dtype [out, G],
    prefix.weight_shape: int64 [2], and for asymmetric schemes prefix.weight_zero_point:
    int32 [ceil(out*bits/32), G] (int8 zero points packed along the output dim)}.
    """
    if scheme.kind != "int":
        raise ValueError(f"compress_weight writes integer schemes, got kind {scheme.kind!r}")
    if name_prefix.endswith(".weight"):
        raise ValueError(f"compress_weight takes the module name, not the tensor name {name_prefix!r}")
    q, scale, zero_point = quantize_groupwise(w, scheme.bits, scheme.group_size, scheme.symmetric,
                                              name=f"{name_prefix}.weight", observer=scheme.observer)
    out = {
        f"{name_prefix}.weight_packed": pack_to_int32(q, scheme.bits),
        f"{name_prefix}.weight_scale": scale.contiguous(),
        f"{name_prefix}.weight_shape": weight_shape_tensor(w.shape),
    }
    if zero_point is not None:
        out[f"{name_prefix}.weight_zero_point"] = pack_to_int32(zero_point, scheme.bits, packed_dim=0)
    check_scales(out, scheme, f"{name_prefix}.weight", lambda: SOURCE_OUT_OF_RANGE)
    return out


def local_names(tensors: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Key tensors by which of `names` their name is or ends with (after a '.'); others are left out."""
    found = {}
    for key, t in tensors.items():
        for local in sorted(names, key=len, reverse=True):
            if key == local or key.endswith("." + local):
                found[local] = t
                break
    return found


def decompress_weight(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme,
                      dtype: torch.dtype | None = None,
                      remedy: Callable[[], str] = damaged_folder_remedy) -> torch.Tensor:
    """Rebuild one module's weight from its pack-quantized tensors (full or local names), as dequantized.

    The result is computed in the scale's dtype, then cast to `dtype` when given. `remedy`, asked only for a line,
    says what to do about tensors missing (damaged_folder_remedy: a reader's by its folder's origin).
    """
    found = local_names(tensors, PACKED_PARTS)
    needed = PACKED_REQUIRED + (() if scheme.symmetric else ("weight_zero_point",))
    missing = [n for n in needed if n not in found]
    if missing:
        raise KLError(f"pack-quantized tensors {sorted(tensors)[:4]} lack {missing}; the checkpoint is "
                      f"incomplete or its quantization_config does not describe it -- {remedy()}")
    shape = tuple(int(v) for v in found["weight_shape"].tolist())
    q = unpack_from_int32(found["weight_packed"], scheme.bits, shape)
    zero_point = None
    if not scheme.symmetric:
        scale = found["weight_scale"]
        zero_point = unpack_from_int32(found["weight_zero_point"], scheme.bits, (shape[0], scale.shape[-1]),
                                       packed_dim=0)
    return dequantize_groupwise(q, found["weight_scale"], zero_point, dtype)


def check_scales(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, where: str,
                 remedy: Callable[[], str]) -> None:
    """ValuesRefused naming `where` when a scale times the code farthest from its group's zero point passes the largest
    finite value of the scale's dtype or of NARROWEST_RUNTIME_DTYPE: that weight would dequantize to infinity. (Zero
    and negative scales are sound; NaN and infinite ones are refused on reading.) One reduction a weight, in the
    scales' own precision or fp32 -- a product past fp32's range is inf, refused all the same. `remedy`, asked only
    for a line, ends it: reading a folder, it was damaged (what to do by its origin: damaged_folder_remedy); writing
    one, the source's weights are out of range."""
    found = local_names(tensors, PACKED_PARTS)
    scale = found["weight_scale"]
    qmin, qmax = qrange(scheme.bits)
    if scheme.symmetric:
        reach = torch.tensor(float(-qmin), device=scale.device)
    else:
        zero = unpack_from_int32(found["weight_zero_point"], scheme.bits, tuple(scale.shape), packed_dim=0)
        reach = torch.maximum(zero - qmin, qmax - zero).float()
    limit = largest_dequantized(scale.dtype)
    largest = float(scale.abs().amax()) * float(reach) if scheme.symmetric else \
        float((scale.float().abs() * reach).amax())
    if largest <= limit:
        return
    reached = (scale.double().abs() * reach.double()).reshape(-1)   # where, for the message
    at = int(reached.argmax())
    raise ValuesRefused(f"{where}: its scale {float(scale.reshape(-1)[at]):.4g} (at flat index {at:,}) dequantizes a "
                        f"weight to {float(reached[at]):.4g}, past the largest finite value {limit:.4g}; {remedy()}")
