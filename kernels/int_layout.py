"""The repacked int weight's layout, which the memory plan, the bind and the naive twins read without Triton: a
weight is packed in blocks of ROWS output rows by KT input features (one block, k-tile pair is ROWS * KT * bits / 32
contiguous int32 words), so the int kernels take a weight only where KT divides its rows and its groups; a linear's
packed tensors (PackedLinear), experts stacked (PackedExperts), and the codes read back (unpack_words)."""
from dataclasses import dataclass

import torch

ROWS = 16  # output rows per packed block; one (block, k-tile) pair is ROWS * P contiguous int32 words
KT = 128  # input features per k-tile; P = KT * bits / 32 words per row (16 for int4, 32 for int8)


def padded_rows(n: int) -> int:
    """N_pad: n output rows rounded up to whole blocks of ROWS, as the repack holds them."""
    return -(-n // ROWS) * ROWS


def held_bytes(n: int, k: int, bits: int, group_size: int, asymmetric: bool, scale_dtype: torch.dtype) -> int:
    """Bytes of the tensors the repack holds for an [n, k] weight (PackedLinear.weight_tensors): the codes, scales in
    `scale_dtype` and, asymmetric, zero points as wide, all over the padded rows. What the memory plan sizes a
    packed weight by, before any is read."""
    n_pad = padded_rows(n)
    return n_pad * k * bits // 8 + (k // group_size) * n_pad * scale_dtype.itemsize * (2 if asymmetric else 1)


@dataclass
class PackedLinear:
    """W[n, k] = (code[n, k] - zero[k // group, n]) * scale[k // group, n]; y = x @ W.T.

    qweight is int32 [N_pad / ROWS, K / KT, ROWS, P]. Slot s (bits [bits * s, bits * (s + 1))) of word p of row r
    of tile t holds the unsigned code of input k = t * KT + (s % H) * 2P + 2p + s // H, H = 16 / bits: slots i and
    i + H hold the neighbouring inputs 2p and 2p + 1 of pair i, 16 bits apart, so one mask of the word (0x000F000F
    for int4) lifts both into a 32-bit pair of 16-bit floats (Marlin's trick). N_pad = N rounded up to ROWS;
    padded rows have scale 0.
    """

    qweight: torch.Tensor  # int32 [N_pad / ROWS, K / KT, ROWS, P]
    scales: torch.Tensor  # [K / group, N_pad], the checkpoint's scale dtype
    zeros: torch.Tensor | None  # [K / group, N_pad] unsigned zero points (scale dtype); None: symmetric, 2**(bits-1)
    locks: torch.Tensor  # int32 [N_pad / ROWS], zero between calls: split-K arrival counters
    n: int
    k: int
    bits: int
    group_size: int

    def weight_tensors(self) -> list[torch.Tensor]:
        """What the kernels read of the weight: its codes, scales and zero points (the locks are their counters)."""
        return [t for t in (self.qweight, self.scales, self.zeros) if t is not None]


@dataclass
class PackedExperts:
    """Experts stacked along a leading dim of each PackedLinear tensor (qweight [E', ...], scales [E', ...]);
    E' = num_experts routed experts, plus the shared expert at index num_experts when has_shared."""

    gate: PackedLinear  # [E', I, D]; its locks are [DECODE_MAX_TOKENS * MAX_SLOTS, I_pad / ROWS]
    up: PackedLinear  # [E', I, D]
    down: PackedLinear  # [E', D, I]; its locks are [D_pad / ROWS]
    num_experts: int
    has_shared: bool

    def expert(self, e: int) -> tuple[PackedLinear, PackedLinear, PackedLinear]:
        """(gate, up, down) of expert e as plain PackedLinears (views)."""
        def one(p):
            zeros = p.zeros[e] if p.zeros is not None else None
            locks = torch.zeros(p.scales.shape[-1] // ROWS, dtype=torch.int32, device=p.locks.device)
            return PackedLinear(p.qweight[e], p.scales[e], zeros, locks, p.n, p.k, p.bits, p.group_size)
        return one(self.gate), one(self.up), one(self.down)


def unpack_words(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of the repack's word order: qweight [N_pad/ROWS, K/KT, ROWS, P] -> unsigned codes [N_pad, K]."""
    shifts = torch.arange(0, 32, bits, device=qweight.device, dtype=torch.int32)
    c = (qweight[..., None] >> shifts) & ((1 << bits) - 1)  # [N/ROWS, K/KT, ROWS, P, slots]
    nb, nt, rows, p, slots = c.shape
    c = c.view(nb, nt, rows, p, 2, slots // 2).permute(0, 2, 1, 5, 3, 4)  # [N/ROWS, ROWS, K/KT, half, P, 2]
    return c.reshape(nb * rows, nt * KT)
