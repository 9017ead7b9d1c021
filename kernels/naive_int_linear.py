"""Plain-PyTorch fp32 twin of int_linear: dequantize the packed weight, then matmul."""
import torch

from .int_linear import PackedLinear


def dequantize_int_weight(packed: PackedLinear) -> torch.Tensor:
    """The fp32 weight [N, K] that a PackedLinear stands for."""
    shifts = torch.arange(0, 32, packed.bits, device=packed.qweight.device, dtype=torch.int32)
    codes = (packed.qweight[..., None] >> shifts) & ((1 << packed.bits) - 1)  # [N/ROWS, K/KT, ROWS, P, planes]
    codes = codes.permute(0, 2, 1, 4, 3).reshape(-1, packed.k)  # k = t*KT + j*P + p
    zeros = packed.zeros if packed.zeros is not None else torch.full_like(packed.scales, 1 << (packed.bits - 1))
    scale = packed.scales.float().t().repeat_interleave(packed.group_size, dim=1)
    zero = zeros.float().t().repeat_interleave(packed.group_size, dim=1)
    return ((codes.float() - zero) * scale)[: packed.n]


def naive_int_linear(x: torch.Tensor, packed: PackedLinear, *, out: torch.Tensor | None = None) -> torch.Tensor:
    y = (x.float() @ dequantize_int_weight(packed).t()).to(x.dtype)
    return y if out is None else out.copy_(y)
