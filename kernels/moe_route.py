"""Sigmoid top-k routing in one launch: scores = sigmoid(logits); the k largest of scores + bias; weights the
chosen scores (or the biased ones), renormalized, times a scaling factor."""
import torch
import triton
import triton.language as tl


@triton.jit
def moe_route_fwd_kernel(logits, bias, ids, wts, E, scaling, stride_l, K: tl.constexpr, BK: tl.constexpr,
                         BE: tl.constexpr, RENORM: tl.constexpr, BIASED: tl.constexpr):
    """One token per program; k passes of max over the experts (ties: the lowest id)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BE)
    mask = offs < E
    s = tl.sigmoid(tl.load(logits + row * stride_l + offs, mask=mask, other=0.0).to(tl.float32))
    choice = tl.where(mask, s + tl.load(bias + offs, mask=mask, other=0.0).to(tl.float32), float("-inf"))
    value = choice if BIASED else s
    offs_k = tl.arange(0, BK)
    picked = tl.zeros([BK], dtype=tl.int32)
    weight = tl.zeros([BK], dtype=tl.float32)
    for i in tl.static_range(K):
        best = tl.max(choice, axis=0)
        idx = tl.min(tl.where(choice == best, offs, BE), axis=0)
        hit = offs == idx
        picked = tl.where(offs_k == i, idx, picked)
        weight = tl.where(offs_k == i, tl.sum(tl.where(hit, value, 0.0), axis=0), weight)
        choice = tl.where(hit, float("-inf"), choice)
    if RENORM:
        weight = weight / (tl.sum(weight, axis=0) + 1e-20)
    tl.store(ids + row * K + offs_k, picked.to(tl.int64), mask=offs_k < K)
    tl.store(wts + row * K + offs_k, weight * scaling, mask=offs_k < K)


def moe_route(logits: torch.Tensor, bias: torch.Tensor, k: int, scaling: float, *, renormalize: bool = True,
              biased_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] (router outputs, fp32), bias [E] -> (expert ids [N, k] int64, weights [N, k] fp32)."""
    N, E = logits.shape
    ids = torch.empty(N, k, dtype=torch.int64, device=logits.device)
    wts = torch.empty(N, k, dtype=torch.float32, device=logits.device)
    if N:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        moe_route_fwd_kernel[(N,)](logits, bias, ids, wts, E, scaling, logits.stride(0), K=k,
                                   BK=triton.next_power_of_2(k), BE=triton.next_power_of_2(E), RENORM=renormalize,
                                   BIASED=biased_weights, num_warps=4)
    return ids, wts
