"""The twin of head_matmul.head_matmul in plain PyTorch."""
import torch


def naive_head_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, H, K], w [H, K, N] -> [B, H, N] fp32: each head's rows times that head's own matrix."""
    return torch.einsum("bhk,hkn->bhn", x.float(), w.float())
