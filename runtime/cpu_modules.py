"""The PyTorch implementations bind swaps into the declared model for inference on the CPU (`kernels="torch"`).

A decode step of a small model on a CPU is bound by the host: each PyTorch op costs a few microseconds whatever its
size, so these modules compute what their runtime/model.py counterparts compute in fewer ops -- constants prepared
once, linears that read the same input stacked into one matmul, no einsum (its setup costs twice a bmm), no
temporaries allocated per token where a buffer does -- and take the reference's path wherever they do not apply
(prefill, a batch, another dtype). The same ops in the same order as the reference: the results are the reference's
bit for bit in fp32 (tests/test_cpu_modules.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from klconvert.runtime import model as M


class CPURMSNorm(nn.Module):
    """RMSNorm through F.rms_norm (one op where the reference spends six) in fp32; the reference otherwise."""

    def __init__(self, norm: M.RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        self.shape = (norm.weight.shape[0],)
        self.w32 = norm.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.w32, self.eps)
        return M.rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + residual
        return x, self(x)


def _dense(*modules: nn.Module) -> bool:
    return all(type(m) is M.Linear for m in modules)


class CPUKDAMixer(M.KDAMixer):
    """A KDA layer whose decode (one token per sequence) takes about a third of the reference's ops: the input
    projections split by one op (the declared order puts f_a and g_a side by side), the gates' up-projections f_b
    and g_b as one bmm, the short conv as a dot per channel, q and k normed together, -exp(A_log) prepared once,
    the delta rule's products as bmm and its rank-1 update through a kept buffer. Prefill is the reference's.
    `adopt` turns a bound KDAMixer into one in place (its parameters and names unchanged)."""

    IN_ORDER = ["q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj"]

    @classmethod
    def adopt(cls, mixer: M.KDAMixer) -> None:
        parts = getattr(mixer.in_proj, "parts", ())
        if (type(mixer) is not M.KDAMixer or list(mixer.in_proj.order) != cls.IN_ORDER or len(parts) != 1
                or not _dense(parts[0], mixer.f_b_proj, mixer.g_b_proj, mixer.o_proj)
                or mixer.f_b_proj.weight.shape != mixer.g_b_proj.weight.shape):
            return
        mixer.__class__ = cls
        H, K = mixer.H, mixer.K
        mixer.cpu_in = parts[0].weight.detach()
        mixer.cpu_split = [3 * H * K, 2 * K, H]
        mixer.cpu_conv = mixer.conv_weight.float().reshape(3 * H * K, -1).contiguous()           # [3HK, W]
        mixer.cpu_neg_A = -mixer.A_log.float().reshape(H, 1).exp()                               # as kda_gate
        mixer.cpu_dt_bias = mixer.dt_bias.detach().float().reshape(H, K)
        mixer.cpu_o_norm = mixer.o_norm.weight.detach().float()
        # [2, HK, K] viewed as [2, K, HK]: bmm reads each weight as F.linear does (the same results)
        mixer.cpu_fg_t = torch.stack([mixer.f_b_proj.weight, mixer.g_b_proj.weight]).transpose(1, 2)
        mixer.cpu_outer = None     # k u^T [B, H, K, V], allocated at the first step

    def decode(self, x: torch.Tensor, state, positions: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        H, K = self.H, self.K
        tail, S = state.conv_state[self.slot], state.kda_state[self.slot]
        qkv, fg, beta_raw = F.linear(x, self.cpu_in).split(self.cpu_split, dim=-1)
        g_raw, gate_raw = torch.bmm(fg.view(B, 2, K).transpose(0, 1), self.cpu_fg_t).unbind(0)  # [B, HK] each
        # the short conv over [tail, x] (kernels/naive_kda.kda_short_conv at T == 1), then SiLU
        xt = torch.cat([tail.to(qkv.dtype), qkv.unsqueeze(-1)], dim=-1)                        # [B, 3HK, W]
        tail.copy_(xt[..., 1:])
        y = F.silu((xt.float() * self.cpu_conv).sum(-1)).view(B, 3, H, K)
        qk = y[:, :2]                                                                          # l2norm, q and k
        qk = qk * torch.rsqrt((qk * qk).sum(-1, keepdim=True) + 1e-6)
        q, k, v = qk[:, 0] * K ** -0.5, qk[:, 1], y[:, 2]                                      # [B, H, K]
        decay = (self.cpu_neg_A * F.softplus(g_raw.float().view(B, H, K) + self.cpu_dt_bias, threshold=20.0)).exp()
        beta = torch.sigmoid(beta_raw.float())                                                 # [B, H]
        # the delta rule (runtime/kda.kda_step)
        S.mul_(decay.unsqueeze(-1))
        u = beta.unsqueeze(-1) * (v - torch.matmul(k.unsqueeze(-2), S).squeeze(-2))           # [B, H, V]
        outer = self.cpu_outer
        if outer is None or outer.shape != S.shape or outer.is_inference() != torch.is_inference_mode_enabled():
            self.cpu_outer = outer = torch.empty_like(S)
        S.add_(torch.mul(k.unsqueeze(-1), u.unsqueeze(-2), out=outer))
        o = torch.matmul(q.unsqueeze(-2), S).squeeze(-2)                                       # [B, H, V]
        # the gated output norm (KDAMixer.gated_norm), then o_proj
        o = F.rms_norm(o, (S.shape[-1],), self.cpu_o_norm, self.eps) * torch.sigmoid(gate_raw.view(B, H, -1).float())
        return F.linear(o.to(x.dtype).reshape(B, -1), self.o_proj.weight)


class CPUMLAMixer(M.MLAMixer):
    """An MLA layer whose decode splits the input projection by one op, keeps kv_b's absorbed halves (the same
    views the reference takes) and calls the linears directly. Prefill is the reference's. `adopt` as above."""

    @classmethod
    def adopt(cls, mixer: M.MLAMixer) -> None:
        parts = getattr(mixer.in_proj, "parts", ())
        if (type(mixer) is not M.MLAMixer or list(mixer.in_proj.order) != ["q_proj", "kv_a_proj_with_mqa"]
                or len(parts) != 1 or not _dense(parts[0], mixer.o_proj)):
            return
        mixer.__class__ = cls
        mixer.cpu_in = parts[0].weight.detach()
        mixer.cpu_split = [mixer.H * (mixer.dn + mixer.dr), mixer.r, mixer.dr]
        w_ukv = mixer.kv_b_proj.weight.detach().view(mixer.H, mixer.dn + mixer.dv, mixer.r)
        w_uk, w_uv = w_ukv.split([mixer.dn, mixer.dv], dim=1)
        mixer.cpu_w_uk, mixer.cpu_w_uv_t = w_uk, w_uv.transpose(1, 2)

    def decode(self, x: torch.Tensor, state, positions: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q, latent, k_shared = F.linear(x, self.cpu_in).split(self.cpu_split, dim=-1)
        rows = torch.cat([self.kv_a_layernorm(latent), k_shared], dim=-1)                    # [B, r+dr]
        state.write_mla_at(self.slot, positions, rows)
        q_nope, q_rope = q.view(B, self.H, -1).split([self.dn, self.dr], dim=-1)
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.cpu_w_uk).transpose(0, 1)             # [B, H, r]
        o_lat = self.attend(q_lat, q_rope, state.mla_cache[self.slot], positions + 1, self.scale,
                            state.mla_scale_of(self.slot))
        o = torch.bmm(o_lat.to(x.dtype).transpose(0, 1), self.cpu_w_uv_t).transpose(0, 1)   # [B, H, dv]
        return F.linear(o.reshape(B, self.H * self.dv), self.o_proj.weight)


class CPULatentAttention(nn.Module):
    """LatentAttention with its two einsums as bmm (the same products, half the setup)."""

    def forward(self, q_lat, q_rope, cache, lengths, scale, cache_scale=None) -> torch.Tensor:
        R = q_lat.shape[-1]
        c = M.cache_rows(cache, cache_scale, q_lat.dtype)                                      # [B, L, R+Dr]
        scores = torch.bmm(torch.cat([q_lat, q_rope], dim=-1), c.transpose(1, 2)).float() * scale   # [B, H, L]
        valid = torch.arange(cache.shape[1], device=cache.device) < lengths[:, None]
        p = scores.masked_fill(~valid[:, None], float("-inf")).softmax(dim=-1)
        return torch.bmm(p.to(c.dtype), c[..., :R]).float()


class CPUDenseMLP(M.DenseMLP):
    """DenseMLP with gate and up stacked into one matmul. `adopt` as above."""

    @classmethod
    def adopt(cls, mlp: M.DenseMLP) -> None:
        if type(mlp) is M.DenseMLP and _dense(mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            mlp.__class__ = cls
            mlp.cpu_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.cpu_gate_up)
        I = h.shape[-1] // 2
        return F.linear(F.silu(h[..., :I]) * h[..., I:], self.down_proj.weight)


class CPUMoE(M.MoE):
    """MoE for one token at a time: the router and the shared expert's gate and up as one matmul, then the chosen
    experts one after the other in ascending id (the reference's order of accumulation). More tokens than one, or
    weights it cannot stack (not fp32, not dense): the reference MoE.forward over the same modules, which it keeps
    under their checkpoint names."""

    def __init__(self, moe: M.MoE):
        nn.Module.__init__(self)
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        router, experts, shared = moe.gate, moe.experts, moe.shared_experts
        c = router.c
        self.E, self.k, self.biased = c.num_experts, c.num_experts_per_token, router.biased
        self.renormalize, self.scaling = c.moe_renormalize, c.routed_scaling_factor
        parts = (router.weight, shared.gate_proj.weight, shared.up_proj.weight)
        self.fast = (c.num_expert_group == 1 and type(experts) is M.Experts
                     and all(type(m) is M.Linear for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
                     and all(p.dtype == torch.float32 for p in (*parts, experts.w13, experts.w2)))
        if self.fast:
            self.I_shared = shared.gate_proj.weight.shape[0]
            self.stacked = torch.cat(parts)                       # [E + 2 I_shared, D]
            self.bias = router.e_score_correction_bias.detach().float()
            self.shared_down = shared.down_proj.weight.detach()
            self.I = experts.w2.shape[-1]
            self.w13, self.w2 = list(experts.w13.unbind(0)), list(experts.w2.unbind(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast or x.dtype != torch.float32 or x.numel() != x.shape[-1]:
            return super().forward(x)
        shape = x.shape
        x = x.reshape(1, -1)
        E, I, Is = self.E, self.I, self.I_shared
        y = F.linear(x, self.stacked)
        # Router: sigmoid scores, top k by score + bias, weights renormalized, times the scaling factor
        scores = torch.sigmoid(y[:, :E])
        choice = scores + self.bias
        ids = choice.topk(self.k, dim=-1).indices
        weights = (choice if self.biased else scores).gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        # the shared expert, then each chosen expert's output times its weight (an fp32 scalar, as a tensor's)
        out = F.linear(F.silu(y[:, E:E + Is]) * y[:, E + Is:], self.shared_down)
        for e, w in sorted(zip(ids[0].tolist(), weights[0].tolist())):
            h = F.linear(x, self.w13[e])
            out = out + F.linear(F.silu(h[:, :I]) * h[:, I:], self.w2[e]).mul_(w)
        return out.view(shape)
