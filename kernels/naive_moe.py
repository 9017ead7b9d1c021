"""Plain-PyTorch fp32 twin of fused_moe: a loop over tokens and their experts."""
import torch

from .fused_moe import PackedExperts
from .naive_int_linear import dequantize_int_weight


def naive_fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: PackedExperts, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    weights = {}  # expert -> dequantized (gate, up, down), built on first use
    for m in range(x.shape[0]):
        chosen = list(zip(topk_ids[m].tolist(), topk_weights[m].float().tolist()))
        if experts.has_shared:
            chosen.append((experts.num_experts, 1.0))
        for e, w in chosen:
            if e not in weights:
                weights[e] = tuple(dequantize_int_weight(p) for p in experts.expert(e))
            gate, up, down = weights[e]
            xm = x[m].float()
            y[m] += w * (down @ (torch.nn.functional.silu(gate @ xm) * (up @ xm)))
    y = y.to(x.dtype)
    return y if out is None else out.copy_(y)
