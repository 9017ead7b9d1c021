"""The KDA (Kimi Delta Attention) recurrence in plain PyTorch: the one-token step and the chunked prefill form.

Both take q, k already l2-normalised (q also scaled), g the per-channel log decay (<= 0), beta in (0, 1),
and an fp32 state S [B, H, K, V] holding sum_s k_s u_s^T. Per token:
    S = exp(g)[:, None] * S;  u = beta * (v - S^T k);  S = S + k u^T;  o = S^T q
"""
from __future__ import annotations

import torch

from klconvert.kernels.naive_kda import kda_gate

__all__ = ["CHUNK", "kda_chunked", "kda_gate", "kda_step", "l2norm"]

CHUNK = 64  # tokens per chunk of the prefill form (the memory plan sizes its pairwise-decay temporary from it)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in fp32 (fla's form: eps inside the sqrt)."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def kda_step(q, k, v, g, beta, state):
    """One token. q, k, g [B, H, K]; v [B, H, V]; beta [B, H]; state [B, H, K, V] fp32, updated in place.

    Returns o [B, H, V] fp32.
    """
    s = state.mul_(g.exp().unsqueeze(-1))                                      # decay
    u = beta.unsqueeze(-1) * (v.float() - torch.einsum("bhkv,bhk->bhv", s, k))  # delta
    s.add_(k.unsqueeze(-1) * u.unsqueeze(-2))
    return torch.einsum("bhkv,bhk->bhv", s, q)


def kda_chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same recurrence over T tokens, chunk by chunk (the WY / UT-transform form).

    q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state [B, H, K, V] fp32, the state before the first
    token (not modified). Returns (o [B, T, H, V] fp32, the state after the last token). Nothing is updated in
    place, so the same code trains (autograd) and prefills.
    Within a chunk, with G the cumulative log decay and D[t, s] = exp(G_t - G_s) (t >= s, so never above 1):
        (I + A) U = beta * (V - (K * exp(G)) S0),  A[t, s] = beta_t sum_i k_t,i k_s,i D[t, s, i]  (s < t)
        O = (Q * exp(G)) S0 + (sum_i q_t,i k_s,i D[t, s, i])_{s <= t} U
        S = exp(G_last) * S0 + (K * exp(G_last - G))^T U
    """
    B, T, H, K = k.shape
    q, k, v, g, beta = (x.float().transpose(1, 2) for x in (q, k, v, g, beta))  # [B, H, T, .]
    out = []
    for start in range(0, T, chunk):
        sl = slice(start, min(start + chunk, T))
        qc, kc, vc, bc = q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl]
        G = g[:, :, sl].cumsum(dim=2)                                   # [B, H, C, K]
        C = G.shape[2]
        causal = torch.ones(C, C, dtype=torch.bool, device=G.device).tril()
        diff = (G.unsqueeze(3) - G.unsqueeze(2)).masked_fill(~causal[:, :, None], float("-inf"))
        D = diff.exp()                                                  # [B, H, C(t), C(s), K]
        A = torch.einsum("bhti,bhsi,bhtsi->bhts", kc, kc, D).tril(-1) * bc.unsqueeze(-1)
        eye = torch.eye(C, device=G.device, dtype=A.dtype)
        rhs = torch.cat([bc.unsqueeze(-1) * vc, bc.unsqueeze(-1) * (kc * G.exp())], dim=-1)
        sol = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
        u_tilde, w = sol.split([vc.shape[-1], K], dim=-1)
        u = u_tilde - w @ state                                         # [B, H, C, V]
        qk = torch.einsum("bhti,bhsi,bhtsi->bhts", qc, kc, D)           # zero above the diagonal
        out.append((qc * G.exp()) @ state + qk @ u)
        g_last = G[:, :, -1:]                                            # [B, H, 1, K]
        state = state * g_last.transpose(-1, -2).exp() + (kc * (g_last - G).exp()).transpose(-1, -2) @ u
    return torch.cat(out, dim=2).transpose(1, 2), state
