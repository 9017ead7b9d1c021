"""The twin of rms_norm.add_rms_norm in plain PyTorch, and the one PyTorch statement of RMSNorm (rms_norm), which
the other naive twins and the runtime's model build on."""
import torch


def rms_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim (keepdim), in x's dtype: the caller passes x in fp32."""
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, x * rsqrt(mean(x^2) + eps) * weight, returned in x's dtype (an fp32 x:
    no cast, so a gated norm can apply its gate before rounding)."""
    xf = x.float()
    return (xf * rms_rstd(xf, eps) * weight.float()).to(x.dtype)


def naive_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x if residual is None else x + residual
    # where summed's dtype is not x's it is fp32 or fp64: one rounding
    return summed, rms_norm(summed, weight, eps).to(x.dtype)
