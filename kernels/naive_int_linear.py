"""Plain-PyTorch fp32 twin of int_linear: dequantize the packed weight, then matmul."""
import torch

from .int_layout import PackedLinear, unpack_words


def dequantize_int_weight(packed: PackedLinear) -> torch.Tensor:
    """The fp32 weight [N, K] that a PackedLinear stands for."""
    codes = unpack_words(packed.qweight, packed.bits)  # [N_pad, K]
    zeros = packed.zeros if packed.zeros is not None else torch.full_like(packed.scales, 1 << (packed.bits - 1))
    scale = packed.scales.float().t().repeat_interleave(packed.group_size, dim=1)
    zero = zeros.float().t().repeat_interleave(packed.group_size, dim=1)
    return ((codes.float() - zero) * scale)[: packed.n]


def naive_int_linear(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    return (x.float() @ dequantize_int_weight(packed).t()).to(x.dtype)
