"""compressed-tensors `pack-quantized` weights as onnxruntime's MatMulNBits and QMoE initializers, bit for bit.

Both formats store unsigned codes with the dequantization (code - zero) * scale, blocked along the input dim:
- codes: compressed-tensors packs value i of a row at bits [i*bits, (i+1)*bits) of little-endian int32 words, so
  the words' bytes already are MatMulNBits' blobs (4-bit: element 2i in the low nibble of byte i, 2i+1 in the high);
- zero: the symmetric offset 2**(bits-1) is MatMulNBits' default zero point; asymmetric zero points (signed, packed
  along the output dim) become unsigned codes packed along the blocks of each row;
- scale: fp32 (exact from bf16/fp16), since MatMulNBits takes its scales in the activations' dtype.
MatMulNBits blocks are powers of two of at least 16: a group that is not one (or a whole row, per channel) is cut
into the largest such blocks that divide it, each repeating its group's scale and zero point.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from klconvert.errors import KLError
from klconvert.quant import QuantScheme, unpack_from_int32
from klconvert.quant.group_rules import CHANNEL, GROUP_SIZE_ADVICE

MIN_BLOCK = 16  # MatMulNBits' and QMoE's smallest block_size


@dataclass
class NBitsWeight:
    """One linear's weight W [n, k] as MatMulNBits takes it."""

    codes: np.ndarray               # uint8 [n, k / block, block * bits / 8]
    scales: np.ndarray              # float32 [n, k / block]
    zero_points: np.ndarray | None  # uint8 [n, ceil(k / block * bits / 8)]; None: 2**(bits-1)
    n: int
    k: int
    bits: int
    block_size: int


def block_size_for(group: int) -> int | None:
    """The largest power of two >= MIN_BLOCK dividing `group`, or None."""
    block = group & -group
    return block if block >= MIN_BLOCK else None


def pack_along_blocks(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned per-block values [n, blocks] -> uint8 [n, ceil(blocks * bits / 8)] (4-bit: low nibble first)."""
    v = values.astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(v)
    v = np.pad(v, ((0, 0), (0, v.shape[1] % 2)))
    return np.ascontiguousarray(v[:, 0::2] | (v[:, 1::2] << 4))


def nbits_weight(parts: dict[str, torch.Tensor], scheme: QuantScheme, name: str) -> NBitsWeight:
    """A pack-quantized (int) linear's stored parts (Checkpoint.packed) -> its MatMulNBits form; `name` for
    errors."""
    n, k = (int(d) for d in parts["weight_shape"].tolist())
    bits = scheme.bits
    group = k if scheme.group_size == CHANNEL else scheme.group_size
    block = block_size_for(group)
    if block is None:
        raise KLError(f"{name}: group size {group} has no power-of-two block of at least {MIN_BLOCK} that MatMulNBits "
                      f"can take; quantize with --group-size {GROUP_SIZE_ADVICE}")
    words = parts["weight_packed"].contiguous().numpy()
    if sys.byteorder == "big":
        words = words.byteswap()
    codes = words.view(np.uint8).reshape(n, k // block, block * bits // 8)
    repeat = group // block
    scale = parts["weight_scale"].float().numpy()
    zero_points = None
    if not scheme.symmetric:
        signed = unpack_from_int32(parts["weight_zero_point"], bits, (n, scale.shape[1]), packed_dim=0)
        unsigned = signed.to(torch.int16).numpy() + (1 << (bits - 1))
        zero_points = pack_along_blocks(np.repeat(unsigned, repeat, axis=1), bits)
    return NBitsWeight(np.ascontiguousarray(codes), np.ascontiguousarray(np.repeat(scale, repeat, axis=1)),
                       zero_points, n, k, bits, block)


def stack_experts(gate: list[NBitsWeight], up: list[NBitsWeight], down: list[NBitsWeight]) -> dict[str, np.ndarray]:
    """Per-expert weights -> QMoE's inputs (swiglu_fusion=1: fc1 rows interleave gate and up, g0 u0 g1 u1 ...):
    fc1/fc2 weights [E, N, K * bits / 8], scales [E, N, K / block], zero points [E, N, ...] when asymmetric."""
    def interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])

    out = {
        "fc1_weights": np.stack([interleave(g.codes, u.codes).reshape(2 * g.n, -1) for g, u in zip(gate, up)]),
        "fc1_scales": np.stack([interleave(g.scales, u.scales) for g, u in zip(gate, up)]),
        "fc2_weights": np.stack([d.codes.reshape(d.n, -1) for d in down]),
        "fc2_scales": np.stack([d.scales for d in down]),
    }
    if gate[0].zero_points is not None:
        out["fc1_zero_points"] = np.stack([interleave(g.zero_points, u.zero_points) for g, u in zip(gate, up)])
        out["fc2_zero_points"] = np.stack([d.zero_points for d in down])
    return out
