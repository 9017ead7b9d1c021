"""The twin of attention_merge.merge_attention_ in plain PyTorch."""
import torch


def naive_merge_attention(o: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor,
                          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over key set A (o [..., Dv], lse [...]) and over a disjoint set B (o_b, lse_b) -> the same
    over A and B, fp32."""
    both = torch.logaddexp(lse.float(), lse_b.float())
    return (o.float() * (lse - both).exp()[..., None] + o_b.float() * (lse_b - both).exp()[..., None]), both
