"""The twins of moe_route.moe_route and moe_route.moe_router in plain PyTorch."""
import torch


def naive_moe_route(logits: torch.Tensor, bias: torch.Tensor, k: int, scaling: float, *, renormalize: bool = True,
                    biased_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.sigmoid(logits.float())
    choice = scores + bias.float()
    ids = choice.topk(k, dim=-1).indices
    weights = (choice if biased_weights else scores).gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


def naive_moe_router(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, scaling: float,
                     locks: torch.Tensor | None = None, *, renormalize: bool = True,
                     biased_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_moe_route(x.float() @ weight.float().T, bias, k, scaling, renormalize=renormalize,
                           biased_weights=biased_weights)
