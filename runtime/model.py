"""Kimi Linear in plain PyTorch: KDA and NoPE-MLA mixers, sigmoid-routed MoE -- the reference every fast path matches.

Shapes: B batch, T tokens, D hidden, H heads, K/V head dims. Prefill runs whole segments (KDA in its
chunked form, MLA over the expanded latent cache); decode runs one token (KDA step, MLA absorbed into
the latent cache). Both read and write the state buffers the memory plan allocated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from klconvert.config import KimiLinearConfig
from klconvert.runtime.kda import kda_chunked, kda_gate, kda_step, l2norm
from klconvert.runtime.memory_plan import StateBuffers
from klconvert.runtime.weights import WeightLoader

MLA_LATENT_NORM_EPS = 1e-6  # the original remote code and transformers; vLLM uses 1e-5


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def swiglu(x, gate, up, down):
    return down(F.silu(gate(x)) * up(x))


class KDAMixer(nn.Module):
    """Kimi Delta Attention: short conv + SiLU on q, k, v; per-channel gated delta rule; gated output norm."""

    def __init__(self, c: KimiLinearConfig, prefix: str, w: WeightLoader, slot: int):
        super().__init__()
        self.H, self.K, self.eps, self.slot = c.kda_num_heads, c.kda_head_dim, c.rms_norm_eps, slot
        t = lambda n: w.tensor(f"{prefix}.{n}")  # noqa: E731
        lin = lambda n: w.linear(f"{prefix}.{n}.weight")  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = lin("q_proj"), lin("k_proj"), lin("v_proj")
        self.conv = torch.cat([t("q_conv1d.weight"), t("k_conv1d.weight"), t("v_conv1d.weight")])  # [3HK, 1, W]
        self.A_log, self.dt_bias = t("A_log").float().flatten(), t("dt_bias").float()
        self.f_a, self.f_b, self.b_proj = lin("f_a_proj"), lin("f_b_proj"), lin("b_proj")
        self.g_a, self.g_b = lin("g_a_proj"), lin("g_b_proj")
        self.o_norm, self.o_proj = t("o_norm.weight").float(), lin("o_proj")
        self.fused_decode = w.kda_layer_step  # the one-launch Triton step, or None for the PyTorch path

    def short_conv(self, x: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv + SiLU over [tail, x]; x [B, T, C], tail [B, C, W-1] updated in place."""
        xt = torch.cat([tail.to(x.dtype), x.transpose(1, 2)], dim=-1)       # [B, C, W-1+T]
        tail.copy_(xt[..., -tail.shape[-1]:])
        y = F.conv1d(xt.float(), self.conv.float(), groups=xt.shape[1])     # [B, C, T]
        return F.silu(y).transpose(1, 2)

    def forward(self, x: torch.Tensor, state: StateBuffers, decode: bool) -> torch.Tensor:
        B, T, _ = x.shape
        H, K = self.H, self.K
        qkv_raw = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)   # [B, T, 3HK]
        g_raw, beta_raw = self.f_b(self.f_a(x)), self.b_proj(x)             # [B, T, HK], [B, T, H]
        gate_raw = self.g_b(self.g_a(x))                                     # [B, T, HK]
        tail, S = state.conv_state[self.slot, :B], state.kda_state[self.slot, :B]  # S [B, H, K, V] fp32
        if decode and self.fused_decode is not None:
            o = self.fused_decode(qkv_raw[:, 0], tail, self.conv, g_raw[:, 0], beta_raw[:, 0], gate_raw[:, 0], S,
                                  A_log=self.A_log, dt_bias=self.dt_bias, o_norm_weight=self.o_norm, eps=self.eps)
            return self.o_proj(o.unsqueeze(1))
        q, k, v = self.short_conv(qkv_raw, tail).view(B, T, 3, H, K).unbind(2)  # [B, T, H, K] each
        q, k = l2norm(q) * K ** -0.5, l2norm(k)
        g = kda_gate(g_raw.view(B, T, H, K), self.A_log, self.dt_bias)
        beta = torch.sigmoid(beta_raw.float())                               # [B, T, H]
        if decode:
            o = kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S).unsqueeze(1)
        else:
            o = kda_chunked(q, k, v, g, beta, S)                             # [B, T, H, V]
        gate = gate_raw.view(B, T, H, K).float()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.o_norm * torch.sigmoid(gate)
        return self.o_proj(o.to(x.dtype).reshape(B, T, H * K))


class MLAMixer(nn.Module):
    """Multi-head latent attention with no rotary embedding; caches the 576-value latent per token."""

    def __init__(self, c: KimiLinearConfig, prefix: str, w: WeightLoader, slot: int):
        super().__init__()
        self.H, self.slot = c.num_attention_heads, slot
        self.dn, self.dr, self.dv, self.r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        self.scale = c.qk_head_dim ** -0.5
        self.q_proj = w.linear(f"{prefix}.q_proj.weight")
        self.kv_a = w.linear(f"{prefix}.kv_a_proj_with_mqa.weight")
        self.kv_norm = w.tensor(f"{prefix}.kv_a_layernorm.weight").float()
        self.kv_b = w.tensor(f"{prefix}.kv_b_proj.weight")   # [H*(dn+dv), r], dense: decode folds it into q and o
        # decode folds kv_b into the query (w_uk) and the output (w_uv); fp32 copies made once, not per step
        w_uk, w_uv = self.kv_b.view(self.H, self.dn + self.dv, self.r).split([self.dn, self.dv], dim=1)
        self.w_uk, self.w_uv = w_uk.float(), w_uv.float()                # [H, dn, r], [H, dv, r]
        self.o_proj = w.linear(f"{prefix}.o_proj.weight")

    def forward(self, x: torch.Tensor, state: StateBuffers, start: int, decode: bool) -> torch.Tensor:
        B, T, _ = x.shape
        H, dn, dr, r = self.H, self.dn, self.dr, self.r
        q = self.q_proj(x).view(B, T, H, dn + dr)
        latent, k_shared = self.kv_a(x).split([r, dr], dim=-1)
        cache = state.mla_cache[self.slot, :B]                               # [B, ctx, r + dr]
        cache[:, start:start + T, :r] = rms_norm(latent, self.kv_norm, MLA_LATENT_NORM_EPS).to(cache.dtype)
        cache[:, start:start + T, r:] = k_shared.to(cache.dtype)
        c_lat, c_key = cache[:, :start + T].to(x.dtype).split([r, dr], dim=-1)  # [B, L, r], [B, L, dr]
        if decode:
            o = self._absorbed(q[:, 0], c_lat, c_key).unsqueeze(1)           # [B, 1, H, dv]
        else:
            o = self._expanded(q, c_lat, c_key, start)
        return self.o_proj(o.reshape(B, T, H * self.dv))

    def _expanded(self, q, c_lat, c_key, start):
        """Prefill: expand the cached latents into per-head keys and values, causal attention."""
        B, T, H, _ = q.shape
        L = c_lat.shape[1]
        kv = F.linear(c_lat, self.kv_b).view(B, L, H, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, c_key.unsqueeze(2).expand(B, L, H, self.dr)], dim=-1)
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=start)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=self.scale)
        return o.transpose(1, 2)                                             # [B, T, H, dv]

    def _absorbed(self, q, c_lat, c_key):
        """Decode: fold kv_b_proj into the query and the output, attend over the latent cache (MQA)."""
        q_nope, q_shared = q.split([self.dn, self.dr], dim=-1)              # [B, H, dn], [B, H, dr]
        q_lat = torch.einsum("bhd,hdr->bhr", q_nope.float(), self.w_uk)
        scores = (torch.einsum("bhr,blr->bhl", q_lat, c_lat.float())
                  + torch.einsum("bhd,bld->bhl", q_shared.float(), c_key.float())) * self.scale
        o_lat = torch.einsum("bhl,blr->bhr", scores.softmax(dim=-1), c_lat.float())
        return torch.einsum("bhr,hdr->bhd", o_lat, self.w_uv).to(q.dtype)


class MoE(nn.Module):
    """Sigmoid router with correction bias; top-k SwiGLU experts plus the shared expert."""

    def __init__(self, c: KimiLinearConfig, prefix: str, w: WeightLoader, biased_weights: bool):
        super().__init__()
        self.c, self.biased = c, biased_weights
        self.router = w.tensor(f"{prefix}.gate.weight").float()
        self.bias = w.tensor(f"{prefix}.gate.e_score_correction_bias").float()
        self.packed = w.packed_experts(prefix, c.num_experts)  # the fused kernel's expert stack, or None
        if self.packed is None:
            E, I, D = c.num_experts, c.moe_intermediate_size, c.hidden_size
            for e in range(E):
                w1, w3, w2 = (w.tensor(f"{prefix}.experts.{e}.{n}.weight") for n in ("w1", "w3", "w2"))
                if e == 0:
                    self.w13, self.w2 = w1.new_empty(E, 2 * I, D), w2.new_empty(E, D, I)  # gate and up stacked
                self.w13[e, :I], self.w13[e, I:], self.w2[e] = w1, w3, w2
        self.shared = None if self.packed is not None and self.packed.has_shared else \
            [w.linear(f"{prefix}.shared_experts.{n}_proj.weight") for n in ("gate", "up", "down")]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, k], weights [N, k] fp32)."""
        c = self.c
        scores = torch.sigmoid(F.linear(x.float(), self.router))             # [N, E]
        choice = scores + self.bias
        if c.num_expert_group > 1:  # keep the topk_group groups with the best top-2 sums
            grouped = choice.view(x.shape[0], c.num_expert_group, -1)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(c.topk_group, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(c.num_experts_per_token, dim=-1).indices
        weights = (choice if self.biased else scores).gather(1, ids)
        if c.moe_renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * c.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                         # [N, D]
        ids, weights = self.route(x)
        if self.packed is not None:
            from klconvert.kernels.fused_moe import fused_moe

            y = fused_moe(x, ids, weights, self.packed)
            return (y if self.shared is None else y + swiglu(x, *self.shared)).view(shape)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        I = self.c.moe_intermediate_size
        for e in ids.unique().tolist():
            token, slot = (ids == e).nonzero(as_tuple=True)
            gate_up = F.linear(x[token], self.w13[e])
            y = F.linear(F.silu(gate_up[:, :I]) * gate_up[:, I:], self.w2[e])
            out[token] += y.float() * weights[token, slot, None]  # a token picks an expert once
        out += swiglu(x, *self.shared).float()
        return out.to(x.dtype).view(shape)


class DenseMLP(nn.Module):
    def __init__(self, prefix: str, w: WeightLoader):
        super().__init__()
        self.w = [w.linear(f"{prefix}.{n}_proj.weight") for n in ("gate", "up", "down")]

    def forward(self, x):
        return swiglu(x, *self.w)


class Block(nn.Module):
    """Pre-norm block: h = x + mixer(norm(x)); y = h + ffn(norm(h))."""

    def __init__(self, c: KimiLinearConfig, layer: int, w: WeightLoader, slot: int, biased_weights: bool):
        super().__init__()
        p = f"model.layers.{layer}"
        self.eps, self.is_kda = c.rms_norm_eps, c.is_kda(layer)
        self.norm1 = w.tensor(f"{p}.input_layernorm.weight").float()
        self.norm2 = w.tensor(f"{p}.post_attention_layernorm.weight").float()
        self.mixer = (KDAMixer if self.is_kda else MLAMixer)(c, f"{p}.self_attn", w, slot)
        self.ffn = (MoE(c, f"{p}.block_sparse_moe", w, biased_weights) if c.is_moe(layer)
                    else DenseMLP(f"{p}.mlp", w))

    def forward(self, x, state: StateBuffers, start: int, decode: bool):
        h = rms_norm(x, self.norm1, self.eps)
        h = self.mixer(h, state, decode) if self.is_kda else self.mixer(h, state, start, decode)
        x = x + h
        return x + self.ffn(rms_norm(x, self.norm2, self.eps))


class KimiLinear(nn.Module):
    """The whole model. `forward` runs T new tokens at positions start..start+T-1 against `state`."""

    def __init__(self, c: KimiLinearConfig, w: WeightLoader, biased_router_weights: bool = False):
        super().__init__()
        self.config = c
        self.embed = w.tensor("model.embed_tokens.weight")
        kda_slot = {layer: i for i, layer in enumerate(c.kda_layers)}
        mla_slot = {layer: i for i, layer in enumerate(c.full_attn_layers)}
        self.blocks = nn.ModuleList(
            Block(c, layer, w, kda_slot.get(layer, mla_slot.get(layer)), biased_router_weights)
            for layer in range(c.num_hidden_layers))
        self.norm = w.tensor("model.norm.weight").float()
        self.lm_head = w.linear("lm_head.weight")

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, state: StateBuffers, start: int, decode: bool = False,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] fp32 (or [B, 1, vocab] with last_only)."""
        x = F.embedding(input_ids, self.embed)
        for block in self.blocks:
            x = block(x, state, start, decode)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(rms_norm(x, self.norm, self.config.rms_norm_eps)).float()
