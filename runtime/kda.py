"""The KDA (Kimi Delta Attention) recurrence in plain PyTorch: the one-token step here, the chunked prefill form
(kda_chunked) in kernels/naive_kda.py beside the Triton kernel it is the twin of.

Both take q, k already l2-normalised (q also scaled), g the per-channel log decay (<= 0), beta in (0, 1),
and an fp32 state S [B, H, K, V] holding sum_s k_s u_s^T. Per token:
    S = exp(g)[:, None] * S;  u = beta * (v - S^T k);  S = S + k u^T;  o = S^T q
"""
from __future__ import annotations

import torch

from klconvert.kernels.naive_kda import CHUNK, kda_chunked, kda_gate, l2norm

__all__ = ["CHUNK", "kda_chunked", "kda_gate", "kda_step", "l2norm"]


def kda_step(q, k, v, g, beta, state):
    """One token. q, k, g [B, H, K]; v [B, H, V]; beta [B, H]; state [B, H, K, V] fp32, updated in place.

    Returns o [B, H, V] fp32.
    """
    s = state.mul_(g.exp().unsqueeze(-1))                                      # decay
    u = beta.unsqueeze(-1) * (v.float() - torch.einsum("bhkv,bhk->bhv", s, k))  # delta
    s.add_(k.unsqueeze(-1) * u.unsqueeze(-2))
    return torch.einsum("bhkv,bhk->bhv", s, q)
