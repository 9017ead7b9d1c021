"""Kimi Linear in plain PyTorch, declared from the config alone: the math every fast path matches.

The module tree mirrors the released checkpoint's names (`model.layers.{i}.self_attn.q_proj.weight`...), so
`runtime/bind.py` fills it by name; the few exceptions (the routed experts stacked per layer, the KDA input
projections grouped under `in_proj`) are spelled out in `canonical_names`. Nothing here imports a kernel: bind
swaps in faster modules with the same call signature (packed int linears, the fused KDA step, fused experts,
the Triton latent attention).

Shapes: B batch, T tokens, D hidden, H heads, K/V head dims, L the planned context. Three ways through:
- prefill (`forward(ids, state, start)`): T new tokens of every sequence at positions start.., against `state`;
- decode (`decode(ids [B], state, positions [B])`): one token per sequence, each at its own position; shapes
  never change, so the step can be captured in a CUDA graph;
- training (`forward(ids)` with no state): a fresh causal pass, differentiable, nothing cached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.backends.cuda import SDPAParams
from torch.nn.modules import module as _module_hooks

from klconvert.config import KimiLinearConfig
from klconvert.kernels.naive_attention_merge import naive_merge_attention
from klconvert.kernels.naive_kda import kda_q_scale, kda_short_conv
from klconvert.kernels.naive_moe_route import ROUTE_EPS, top_k_ids
from klconvert.kernels.naive_rms_norm import rms_norm
from klconvert.runtime.kda import kda_chunked, kda_gate, kda_step, l2norm
from klconvert.runtime.state import StateBuffers, cache_rows

MLA_LATENT_NORM_EPS = 1e-6  # the original remote code and transformers; vLLM uses 1e-5
MLA_KEY_BLOCK = 32768  # cached rows a prefill expands into per-head keys and values at once (bounds its workspace)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T, W [out, in]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = _param(n_out, n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = _param(dim), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, norm(x + residual)): the residual stream's add, where a kernel can fold it in; residual
        None (the first block's): nothing to add."""
        x = x if residual is None else x + residual
        return x, self(x)


class Weight(nn.Module):
    """A weight the mixer reads as a tensor, never packed: the KDA short convs [C, 1, W] (applied together) and
    MLA's kv_b_proj [H*(dn+dv), r] (decode folds it into the query and the output)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = _param(*shape)


class ParallelLinear(nn.Module):
    """Several linears that read the same input, as one output [..., sum(out)] whose columns follow `order`;
    bind restacks the group (one packed kernel per scheme, one dense matmul for the rest) and sets `order`."""

    def __init__(self, n_in: int, outs: dict[str, int]):
        super().__init__()
        self.order, self.sizes = list(outs), dict(outs)
        for name, n_out in outs.items():
            self.add_module(name, Linear(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.order], dim=-1)


class StackedLinear(nn.Module):
    """A ParallelLinear group as bind restacks it: one module per part (a packed kernel per format, one dense
    matmul for the rest), outputs side by side in `order`."""

    def __init__(self, parts: list[nn.Module], order: list[str], sizes: dict[str, int]):
        super().__init__()
        self.parts, self.order, self.sizes = nn.ModuleList(parts), order, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([p(x) for p in self.parts], dim=-1)


def take(group: nn.Module, y: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The columns of `names` (in that order) from a ParallelLinear-like group's output: a view when they sit
    side by side in the group's order, else a copy."""
    starts, at = {}, 0
    for name in group.order:
        starts[name], at = at, at + group.sizes[name]
    first, width = starts[names[0]], sum(group.sizes[n] for n in names)
    if all(starts[n] == first + sum(group.sizes[m] for m in names[:i]) for i, n in enumerate(names)):
        return y[..., first:first + width]
    return torch.cat([y[..., starts[n]:starts[n] + group.sizes[n]] for n in names], dim=-1)


def swiglu(x, gate, up, down):
    return down(F.silu(gate(x)) * up(x))


# ---- KDA ------------------------------------------------------------------------------------------------
class KDAStep(nn.Module):
    """One decode token of a KDA layer after its input projections: the gates' up-projections (f_b, g_b), conv +
    SiLU, l2norm, gate, delta rule, gated output norm. Holds no weights of its own; bind replaces it with the fused
    one-launch kernel on CUDA (when f_b and g_b are dense)."""

    def forward(self, m: "KDAMixer", qkv, f_a, beta_raw, g_a, tail, S) -> torch.Tensor:
        """qkv [B, 3HK], the gates' low-rank inputs f_a, g_a [B, K], beta_raw [B, H]; tail [B, 3HK, W-1],
        S [B, H, K, V] in place. Returns the normed, gated output [B, HK] in qkv's dtype."""
        g_raw, gate_raw = m.f_b_proj(f_a), m.g_b_proj(g_a)
        o = m.recurrent(qkv.unsqueeze(1), g_raw.unsqueeze(1), beta_raw.unsqueeze(1), tail, S)   # [B, 1, H, V]
        return m.gated_norm(o, gate_raw.unsqueeze(1)).squeeze(1)


class KDAChunk(nn.Module):
    """T tokens of a KDA layer after its input projections, up to the output norm: conv + SiLU, l2norm, gate, the
    delta rule in the chunked form. Holds no weights; bind replaces it on CUDA with a chunked kernel (fla-core's
    chunk_kda when it is installed, else the Triton one)."""

    def forward(self, m: "KDAMixer", qkv, g_raw, beta_raw, tail, S) -> torch.Tensor:
        """qkv [B, T, 3HK], g_raw [B, T, HK], beta_raw [B, T, H]; tail [B, 3HK, W-1] and S [B, H, K, V] updated
        in place (both None: from zeros, nothing kept). Returns o [B, T, H, V] fp32."""
        return m.recurrent(qkv, g_raw, beta_raw, tail, S)


class KDAMixer(nn.Module):
    """Kimi Delta Attention: short conv + SiLU on q, k, v; per-channel gated delta rule; gated output norm."""

    def __init__(self, c: KimiLinearConfig, slot: int):
        super().__init__()
        D, H, K, W = c.hidden_size, c.kda_num_heads, c.kda_head_dim, c.conv_kernel_size
        self.H, self.K, self.eps, self.slot = H, K, c.rms_norm_eps, slot
        self.in_proj = ParallelLinear(D, {"q_proj": H * K, "k_proj": H * K, "v_proj": H * K, "f_a_proj": K,
                                          "g_a_proj": K, "b_proj": H})
        self.q_conv1d, self.k_conv1d, self.v_conv1d = Weight(H * K, 1, W), Weight(H * K, 1, W), Weight(H * K, 1, W)
        self.A_log, self.dt_bias = _param(1, 1, H, 1), _param(H * K)
        self.f_b_proj, self.g_b_proj = Linear(K, H * K), Linear(K, H * K)
        self.o_norm, self.o_proj = RMSNorm(K, c.rms_norm_eps), Linear(H * K, D)
        self.step, self.chunk = KDAStep(), KDAChunk()

    @property
    def conv_weight(self) -> torch.Tensor:
        return torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])    # [3HK, 1, W]

    def project(self, x: torch.Tensor):
        """x [..., D] -> qkv [..., 3HK], the forget gate's low-rank f_a [..., K], beta_raw [..., H], the output
        gate's low-rank g_a [..., K] (f_b_proj and g_b_proj take them up to HK)."""
        y = self.in_proj(x)
        qkv = take(self.in_proj, y, ["q_proj", "k_proj", "v_proj"])
        f_a, beta_raw, g_a = (take(self.in_proj, y, [n]) for n in ("f_a_proj", "b_proj", "g_a_proj"))
        return qkv, f_a, beta_raw, g_a

    def recurrent(self, qkv, g_raw, beta_raw, tail, S) -> torch.Tensor:
        """The conv and the delta rule over T tokens -> o [B, T, H, V] fp32. S None: a fresh state, not kept."""
        B, T, _ = qkv.shape
        H, K = self.H, self.K
        q, k, v = kda_short_conv(qkv, tail, self.conv_weight).view(B, T, 3, H, K).unbind(2)  # [B, T, H, K] each
        q, k = l2norm(q) * kda_q_scale(K), l2norm(k)
        g = kda_gate(g_raw.view(B, T, H, K), self.A_log, self.dt_bias)
        beta = torch.sigmoid(beta_raw.float())                               # [B, T, H]
        if T == 1 and S is not None:
            return kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S).unsqueeze(1)
        fresh = S if S is not None else q.new_zeros(B, H, K, v.shape[-1])
        o, final = kda_chunked(q, k, v, g, beta, fresh)
        if S is not None:
            S.copy_(final)
        return o

    def gated_norm(self, o: torch.Tensor, gate_raw: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, V] fp32 -> rmsnorm per head * o_norm * sigmoid(gate), [B, T, HK] in gate_raw's dtype."""
        B, T, H, V = o.shape
        gate = gate_raw.view(B, T, H, V).float()
        o = rms_norm(o, self.o_norm.weight, self.eps)    # fp32 in, fp32 out: the gate applies before rounding
        return (o * torch.sigmoid(gate)).to(gate_raw.dtype).reshape(B, T, H * V)

    def forward(self, x: torch.Tensor, state: StateBuffers | None, start=0) -> torch.Tensor:
        qkv, f_a, beta_raw, g_a = self.project(x)
        tail, S = (None, None) if state is None else (state.conv_state[self.slot], state.kda_state[self.slot])
        o = self.chunk(self, qkv, self.f_b_proj(f_a), beta_raw, tail, S)
        return self.o_proj(self.gated_norm(o, self.g_b_proj(g_a)))

    def decode(self, x: torch.Tensor, state: StateBuffers, positions: torch.Tensor) -> torch.Tensor:
        """x [B, D], one token per sequence -> [B, D]."""
        qkv, f_a, beta_raw, g_a = self.project(x)
        o = self.step(self, qkv, f_a, beta_raw, g_a, state.conv_state[self.slot], state.kda_state[self.slot])
        return self.o_proj(o)


# ---- MLA ------------------------------------------------------------------------------------------------
class LatentAttention(nn.Module):
    """Decode attention over the planned latent cache in the absorbed form (MQA over the 512-d latent plus the
    64-d shared key), each sequence up to and including its position (the row the step just wrote). Holds no
    weights; bind swaps in the Triton kernel."""

    def forward(self, q_lat, q_rope, cache, positions, scale, cache_scale=None) -> torch.Tensor:
        """q_lat [B, H, R], q_rope [B, H, Dr], cache [B, L, R+Dr], positions [B]: rows 0..positions[b] of sequence
        b are attended -> o_lat [B, H, R] in q_lat's dtype."""
        R = q_lat.shape[-1]
        c = cache_rows(cache, cache_scale, q_lat.dtype)
        scores = torch.einsum("bhc,blc->bhl", torch.cat([q_lat, q_rope], dim=-1), c).float() * scale
        valid = torch.arange(cache.shape[1], device=cache.device) <= positions[:, None]       # [B, L]
        p = scores.masked_fill(~valid[:, None], float("-inf")).softmax(dim=-1)
        return torch.einsum("bhl,blr->bhr", p.to(c.dtype), c[..., :R])


class LatentRowWrite(nn.Module):
    """A decode step's cache rows (MLAMixer.latent_rows) written at each sequence's position. Holds no weights;
    bind swaps in the Triton kernel."""

    def forward(self, m: "MLAMixer", kv: torch.Tensor, state: StateBuffers, positions: torch.Tensor) -> None:
        state.write_mla_at(m.slot, positions, m.latent_rows(kv))


def attention_with_lse(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA through the field's fused kernels, also returning each query's log-sum-exp of scores, so that partials
    over disjoint key blocks can be merged. q [B, H, T, Dk], k [B, H, L, Dk], v [B, H, L, Dv] -> (o [B, H, T, Dv]
    in q's dtype, lse [B, H, T] fp32). causal: query i sees keys 0..i (T == L here).

    CUDA: cuDNN's flash kernel where PyTorch's own dispatch checks say it takes the inputs (16-bit, Dv != Dk
    allowed); on an H200 at the MLA shapes (Dk 192, Dv 128) it ran a 128K-token prompt's attention in 0.63 s against
    0.96 s for FlashAttention-2 with v padded to 192 and 1.49 s for the memory-efficient kernel
    (bench/results/h200-2026-11-29-mla-prefill.json). Otherwise (fp32, an older GPU or cuDNN) the memory-efficient
    kernel, whose lse is padded to a multiple of 32 queries. CPU: the flash kernel, which needs Dv == Dk, so v is
    zero-padded to Dk and the padding sliced off the output."""
    T, Dv = q.shape[2], v.shape[-1]
    if q.is_cuda and torch.backends.cuda.can_use_cudnn_attention(SDPAParams(q, k, v, None, 0.0, causal, False)):
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        return out[0], out[1].reshape(q.shape[:3])
    if q.is_cuda:
        o, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                        scale=scale)[:2]
        return o, lse[..., :T]
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, F.pad(v, (0, q.shape[-1] - Dv)), 0.0,
                                                                        causal, scale=scale)
    return o[..., :Dv], lse


def merge_partials(o, lse, o_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over key set A (o [B, H, T, Dv] fp32, lse [B, H, T]; None: nothing yet) and over a
    disjoint set B -> the same over A and B, fp32."""
    return (o_b.float(), lse_b) if o is None else naive_merge_attention(o, lse, o_b, lse_b)


def _rows(scale: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if scale is None else scale[:, a:b]


class PrefillAttention(nn.Module):
    """Prefill attention of a segment's queries over the cached latents, `key_block` rows at a time: each block's
    latents expanded into per-head keys and values (kv_b_proj), attended with SDPA's fused kernels (which return
    the log-sum-exp), the blocks merged by log-sum-exp; the segment's own rows last, causally. The workspace is
    bounded by the block and the segment, never the context. Holds no weights.

    Expanded rather than absorbed (MQA over the 576-value cached rows with kv_b folded into the queries): per
    query-key pair the absorbed form does 576 + 512 multiply-adds per head against 192 + 128 expanded, 3.4x the
    attention work, while the block expansion costs one [block, 512] x [512, 8192] GEMM per block and segment. On
    an H200 (one layer, 128K prompt, segments of 2048, same SDPA kernel) the absorbed form took 4.73 s against 1.49
    s expanded; the whole-context form this replaced took 2.68 s and 4.3 GiB of workspace against 0.47 GiB
    (bench/mla_prefill.py)."""

    def __init__(self, key_block: int = MLA_KEY_BLOCK):
        super().__init__()
        self.key_block = key_block

    def forward(self, m: "MLAMixer", q, cache, cache_scale, start: int) -> torch.Tensor:
        """q [B, T, H, dn+dr] at positions start..start+T-1; cache [B, >= start+T, r+dr] with those rows written
        (e4m3 with cache_scale [B, >= start+T], or not) -> o [B, T, H, dv] in q's dtype."""
        T = q.shape[1]
        qh = q.transpose(1, 2)                                                # [B, H, T, dn+dr]
        if start == 0:  # one block, nothing to merge: plain SDPA (differentiable, for training)
            k, v = self.expand(m, cache_rows(cache[:, :T], _rows(cache_scale, 0, T), q.dtype))
            if q.is_cuda:
                return F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=m.scale).transpose(1, 2)
            # the CPU's flash kernel needs Dv == Dk (else SDPA falls back to its math form, T x T scores per head:
            # 9 GB for a 14,400-token prompt of the bundled model), so v is zero-padded and the padding sliced off
            o = F.scaled_dot_product_attention(qh, k, F.pad(v, (0, k.shape[-1] - m.dv)), is_causal=True, scale=m.scale)
            return o[..., :m.dv].transpose(1, 2)
        o = lse = None
        blocks = [(a, min(a + self.key_block, start), False) for a in range(0, start, self.key_block)]
        for a, b, causal in blocks + [(start, start + T, True)]:  # the prefix, whole; then the segment, causally
            k, v = self.expand(m, cache_rows(cache[:, a:b], _rows(cache_scale, a, b), q.dtype))
            o, lse = self.merge(o, lse, *attention_with_lse(qh, k, v, causal, m.scale))
        return o.transpose(1, 2).to(q.dtype)

    merge = staticmethod(merge_partials)  # bind's Triton form merges in place, in one pass

    @staticmethod
    def expand(m: "MLAMixer", rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached rows [B, n, r+dr] -> per-head keys [B, H, n, dn+dr] (the shared key on every head), values
        [B, H, n, dv]."""
        B, n, _ = rows.shape
        c_lat, c_key = rows.split([m.r, m.dr], dim=-1)
        kv = F.linear(c_lat, m.kv_b_proj.weight).view(B, n, m.H, m.dn + m.dv)
        k_nope, v = kv.split([m.dn, m.dv], dim=-1)
        k = torch.cat([k_nope, c_key.unsqueeze(2).expand(B, n, m.H, m.dr)], dim=-1)
        return k.transpose(1, 2), v.transpose(1, 2)


class MLAMixer(nn.Module):
    """Multi-head latent attention with no rotary embedding; caches the 576-value latent per token."""

    def __init__(self, c: KimiLinearConfig, slot: int):
        super().__init__()
        D, H = c.hidden_size, c.num_attention_heads
        self.H, self.slot = H, slot
        self.dn, self.dr, self.dv, self.r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        self.scale = c.qk_head_dim ** -0.5
        self.in_proj = ParallelLinear(D, {"q_proj": H * c.qk_head_dim, "kv_a_proj_with_mqa": c.mla_cache_width})
        self.kv_a_layernorm = RMSNorm(self.r, MLA_LATENT_NORM_EPS)
        self.kv_b_proj = Weight(H * (self.dn + self.dv), self.r)
        self.o_proj = Linear(H * self.dv, D)
        self.prefill_attention = PrefillAttention()
        self.write_rows = LatentRowWrite()
        self.attend = LatentAttention()

    def project(self, x: torch.Tensor):
        """x [..., D] -> q [..., H, dn+dr], kv [..., r+dr] (the latent before its norm, the shared key)."""
        y = self.in_proj(x)
        q, kv = take(self.in_proj, y, ["q_proj"]), take(self.in_proj, y, ["kv_a_proj_with_mqa"])
        return q.unflatten(-1, (self.H, self.dn + self.dr)), kv

    def latent_rows(self, kv: torch.Tensor) -> torch.Tensor:
        """kv [..., r+dr] -> the cache rows [..., r+dr]: the latent RMS-normed, then the shared key."""
        latent, k_shared = kv.split([self.r, self.dr], dim=-1)
        return torch.cat([self.kv_a_layernorm(latent), k_shared], dim=-1)

    def forward(self, x: torch.Tensor, state: StateBuffers | None, start: int = 0) -> torch.Tensor:
        """x [B, T, D] at positions start..start+T-1 -> [B, T, D]; the rows go into `state`'s cache first (None: a
        fresh sequence, attended from the rows themselves)."""
        B, T, _ = x.shape
        q, kv = self.project(x)
        rows = self.latent_rows(kv)
        if state is None:
            o = self.prefill_attention(self, q, rows, None, 0)
        else:
            state.write_mla(self.slot, slice(start, start + T), rows)
            o = self.prefill_attention(self, q, state.mla_cache[self.slot], state.mla_scale_of(self.slot), start)
        return self.o_proj(o.reshape(B, T, self.H * self.dv))

    def decode(self, x: torch.Tensor, state: StateBuffers, positions: torch.Tensor) -> torch.Tensor:
        """x [B, D], one token per sequence at `positions` [B] -> [B, D]. Absorbed: kv_b folds into q and o."""
        B = x.shape[0]
        q, kv = self.project(x)                                              # [B, H, dn+dr], [B, r+dr]
        self.write_rows(self, kv, state, positions)
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)
        w_uk, w_uv = self.kv_b_proj.weight.view(self.H, self.dn + self.dv, self.r).split([self.dn, self.dv], dim=1)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)      # [B, H, r]
        o_lat = self.attend(q_lat, q_rope, state.mla_cache[self.slot], positions, self.scale,
                            state.mla_scale_of(self.slot))
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)   # [B, H, dv]
        return self.o_proj(o.reshape(B, self.H * self.dv))


# ---- feed-forward ----------------------------------------------------------------------------------------
class Router(nn.Module):
    """Sigmoid scores; the top k by score + correction bias (ties: the lowest id, as moe_route's); weights the chosen
    unbiased scores, renormalized, times routed_scaling_factor (biased=True: the biased scores, as the original
    remote code does)."""

    def __init__(self, c: KimiLinearConfig, biased: bool):
        super().__init__()
        self.c, self.biased = c, biased
        self.weight, self.e_score_correction_bias = _param(c.num_experts, c.hidden_size), _param(c.num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, k], weights [N, k] fp32)."""
        return self.route(F.linear(x.float(), self.weight))                 # router in fp32

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's fp32 logits [N, E] -> (expert ids [N, k], weights [N, k] fp32)."""
        c = self.c
        scores = torch.sigmoid(logits)                                       # [N, E]
        choice = scores + self.e_score_correction_bias.float()
        if c.num_expert_group > 1:  # keep the topk_group groups with the best top-2 sums
            grouped = choice.view(logits.shape[0], c.num_expert_group, -1)
            best = top_k_ids(grouped.topk(2, dim=-1).values.sum(-1), c.topk_group)
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        ids = top_k_ids(choice, c.num_experts_per_token)
        weights = (choice if self.biased else scores).gather(1, ids)
        if c.moe_renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + ROUTE_EPS)
        return ids, weights * c.routed_scaling_factor


class FeedForward(nn.Module):
    """A block's feed-forward (MoE or dense MLP). `decode` takes it from the block's residual add and pre-norm: one
    seam, so that a kernel can fold the norm into the feed-forward's first launch (kernel_modules.FusedNormMoE)."""

    def decode(self, norm: RMSNorm, x: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + branch, self(norm(x + branch)))."""
        x, h = norm.add_norm(x, branch)
        return x, self(h)


def hooked(module: nn.Module) -> bool:
    """Whether `module` is called for its own sake -- a forward hook on it or on every module (klconvert bench and
    eval read the router's choices so) -- so a fused form that skips its forward must not run."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks)


class SharedExperts(nn.Module):
    def __init__(self, n_in: int, inner: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = Linear(n_in, inner), Linear(n_in, inner), Linear(inner, n_in)

    def forward(self, x):
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class Experts(nn.Module):
    """The routed experts stacked: w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]. The shared expert is
    passed in, so a fused kernel that carries it in its stack can skip the separate call."""

    def __init__(self, c: KimiLinearConfig):
        super().__init__()
        E, I, D = c.num_experts, c.moe_intermediate_size, c.hidden_size
        self.w13, self.w2 = _param(E, 2 * I, D), _param(E, D, I)

    def on_device(self, tokens: int) -> bool:
        """Whether forward over this many tokens runs without asking the host (so a CUDA graph can hold it): this
        loop asks which experts were chosen."""
        return False

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared: nn.Module) -> torch.Tensor:
        """x [N, D], ids/weights [N, k] -> sum_k weight * expert(x) + shared(x), [N, D]. The sum accumulates in place:
        a new one per expert stayed resident in a CPU prefill (runtime/host_malloc.py says why)."""
        I = self.w2.shape[-1]
        out = shared(x).float()
        for e in ids.unique().tolist():
            token, slot = (ids == e).nonzero(as_tuple=True)
            gate_up = F.linear(x[token], self.w13[e])
            y = F.linear(F.silu(gate_up[:, :I]) * gate_up[:, I:], self.w2[e])
            out.index_add_(0, token, y.float() * weights[token, slot, None])  # a token picks an expert once
        return out.to(x.dtype)


class MoE(FeedForward):
    def __init__(self, c: KimiLinearConfig, biased_weights: bool):
        super().__init__()
        self.gate = Router(c, biased_weights)
        self.experts = Experts(c)
        self.shared_experts = SharedExperts(c.hidden_size, c.moe_intermediate_size * c.num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])                                    # [N, D]
        ids, weights = self.gate(flat)
        return self.experts(flat, ids, weights, self.shared_experts).view(x.shape)


class DenseMLP(FeedForward):
    def __init__(self, c: KimiLinearConfig):
        super().__init__()
        D, I = c.hidden_size, c.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = Linear(D, I), Linear(D, I), Linear(I, D)

    def forward(self, x):
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class Block(nn.Module):
    """Pre-norm block: h = x + mixer(norm(x)); y = h + ffn(norm(h))."""

    def __init__(self, c: KimiLinearConfig, layer: int, slot: int, biased_weights: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = (KDAMixer if c.is_kda(layer) else MLAMixer)(c, slot)
        if c.is_moe(layer):
            self.block_sparse_moe = MoE(c, biased_weights)
        else:
            self.mlp = DenseMLP(c)

    @property
    def ffn(self) -> nn.Module:
        return self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp

    def forward(self, x, state: StateBuffers | None, start: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), state, start)
        return x + self.ffn(self.post_attention_layernorm(x))

    def decode(self, x, residual, state: StateBuffers, positions):
        """x [B, D] the residual stream, `residual` the last branch output not yet added (None before the first
        block) -> the same pair."""
        x, h = self.input_layernorm.add_norm(x, residual)
        return self.ffn.decode(self.post_attention_layernorm, x, self.self_attn.decode(h, state, positions))


class Decoder(nn.Module):
    """`model.*` of the checkpoint: the embedding, the blocks, the final norm."""

    def __init__(self, c: KimiLinearConfig, biased_router_weights: bool):
        super().__init__()
        # its weight given, not initialised: nn.Embedding's normal_ init, even on meta, imports torch._dynamo (~1 s)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, _weight=_param(c.vocab_size, c.hidden_size),
                                         _freeze=True)
        slot = {layer: i for i, layer in enumerate(c.kda_layers)} | \
            {layer: i for i, layer in enumerate(c.full_attn_layers)}
        self.layers = nn.ModuleList(Block(c, layer, slot[layer], biased_router_weights)
                                    for layer in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class KimiLinear(nn.Module):
    """The whole model, declared on `meta`; `runtime.bind.bind` gives it weights."""

    def __init__(self, c: KimiLinearConfig, biased_router_weights: bool = False):
        super().__init__()
        self.config = c
        self.model = Decoder(c, biased_router_weights)
        self.lm_head = Linear(c.hidden_size, c.vocab_size)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def forward(self, input_ids: torch.Tensor, state: StateBuffers | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] at positions start..start+T-1 -> logits [B, T, vocab] fp32 ([B, 1, vocab] with
        last_only). state None: a fresh sequence, nothing cached (training)."""
        x = self.hidden_states(input_ids, state, start)
        return self.logits(x[:, -1:] if last_only else x)

    def hidden_states(self, input_ids: torch.Tensor, state: StateBuffers | None = None, start: int = 0
                      ) -> torch.Tensor:
        """`forward` up to the final norm: input_ids [B, T] -> the last block's output [B, T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            x = block(x, state, start)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """hidden_states' rows [..., hidden] -> their logits [..., vocab] fp32 (each row's alone: a caller may take
        them a few positions at a time)."""
        return self.lm_head(self.model.norm(x)).float()

    def decode(self, input_ids: torch.Tensor, state: StateBuffers, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [B], one new token per sequence at positions [B] (device tensors) -> logits [B, vocab] fp32.
        No host work and no shape that depends on a position: the step a CUDA graph captures."""
        x, branch = self.model.embed_tokens(input_ids), None
        for block in self.model.layers:
            x, branch = block.decode(x, branch, state, positions)
        return self.lm_head(self.model.norm.add_norm(x, branch)[1]).float()


def canonical_names(c: KimiLinearConfig, param_name: str) -> list[tuple[str, tuple]]:
    """The checkpoint tensors that make up one parameter of `KimiLinear`, each with the index it fills:
    the KDA/MLA input projections live under `in_proj`, the routed experts are stacked."""
    name = param_name.replace(".in_proj.", ".")
    head, _, tail = name.rpartition(".experts.")
    if not head:
        return [(name, ())]
    I = c.moe_intermediate_size
    if tail == "w13":
        gate_up = (("w1", slice(0, I)), ("w3", slice(I, 2 * I)))
        return [(f"{head}.experts.{e}.{w}.weight", (e, rows)) for e in range(c.num_experts) for w, rows in gate_up]
    return [(f"{head}.experts.{e}.w2.weight", (e,)) for e in range(c.num_experts)]
