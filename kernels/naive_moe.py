"""Plain-PyTorch fp32 twin of fused_moe: a loop over the experts, each on the tokens routed to it."""
import torch

from .int_layout import PackedExperts
from .naive_int_linear import dequantize_int_weight


def naive_fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    experts: PackedExperts) -> torch.Tensor:
    y = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    ids, weights = topk_ids, topk_weights.float()
    if experts.has_shared:  # one more slot, weight 1, for every token
        ids = torch.cat([ids, ids.new_full((ids.shape[0], 1), experts.num_experts)], 1)
        weights = torch.cat([weights, weights.new_ones(ids.shape[0], 1)], 1)
    for e in ids.unique().tolist():
        tokens, slots = (ids == e).nonzero(as_tuple=True)
        gate, up, down = (dequantize_int_weight(p) for p in experts.expert(e))
        xe = x[tokens].float()
        h = torch.nn.functional.silu(xe @ gate.t()) * (xe @ up.t())
        y.index_add_(0, tokens, weights[tokens, slots, None] * (h @ down.t()))
    return y.to(x.dtype)
