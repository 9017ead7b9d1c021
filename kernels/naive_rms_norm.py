"""The twin of rms_norm.add_rms_norm in plain PyTorch."""
import torch


def naive_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                       out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x if residual is None else x + residual
    v = summed.float()
    y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    if out is not None:
        out.copy_(y)
        y = out
    return summed, y
