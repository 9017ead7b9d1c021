"""The twins of moe_route.moe_route and moe_route.moe_router in plain PyTorch."""
import torch

from .naive_rms_norm import rms_norm, rms_rstd

ROUTE_EPS = 1e-20  # the renormalized routing weights' sum guard, as the release (the Triton router takes it too)


def top_k_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the k largest scores along the last dim, largest first, ties to the lowest id as moe_route picks
    them (torch.topk leaves the choice among ties to its implementation, and ties are real once the sigmoid
    saturates). A stable sort: comparisons only, so an untied choice is the one topk makes."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def naive_moe_route(logits: torch.Tensor, bias: torch.Tensor, k: int, scaling: float, *, renormalize: bool = True,
                    biased_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.sigmoid(logits.float())
    choice = scores + bias.float()
    ids = top_k_ids(choice, k)
    weights = (choice if biased_weights else scores).gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + ROUTE_EPS)
    return ids, weights * scaling


def naive_moe_router(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, scaling: float, *,
                     renormalize: bool = True, biased_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return naive_moe_route(x.float() @ weight.float().T, bias, k, scaling, renormalize=renormalize,
                           biased_weights=biased_weights)


def naive_moe_add_norm_router(x, residual, norm_weight, eps, weight, bias, k, scaling, *, renormalize=True,
                              biased_weights=False):
    """moe_add_norm_router's math: s = x + residual (rounded to x's dtype), h = rmsnorm(s) * norm_weight, the logits
    rstd * ((s * norm_weight) @ weight.T) in fp32, then naive_moe_route."""
    s = x + residual
    sf = s.float()
    h = rms_norm(sf, norm_weight, eps).to(x.dtype)
    logits = rms_rstd(sf, eps) * ((sf * norm_weight.float()) @ weight.float().T)
    return (s, h) + naive_moe_route(logits, bias, k, scaling, renormalize=renormalize, biased_weights=biased_weights)
