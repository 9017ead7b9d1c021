"""The PyTorch implementations bind swaps into the declared model for fp32 inference on the CPU (`kernels="torch"`).

A decode step of a small model on a CPU is bound by the host: each PyTorch op costs microseconds whatever its size
(a Python scalar operand about twice a tensor's), so these forms compute what their runtime/model.py counterparts
compute in fewer ops -- constants prepared once (0-d tensors for the scalars), the linears that read the same input
stacked into one matmul and split by one op, no einsum (its setup costs twice a bmm), no temporary allocated per
token where a kept buffer does, no modules called for one matmul -- and take the reference's path where they do not
apply (prefill, a batch in the MoE). Each is the reference's ops in the reference's order, so the logits are the
reference's bit for bit (tests/test_cpu_modules.py); where an op is swapped for a cheaper one, the two were checked
to round alike (x*x for pow(2); sum * 1/D, a power of two, for mean).

A token's decode streams every weight it multiplies by; on a small host that is memory-bound. The forms hold the
weights of a bf16 checkpoint (upcast to fp32 at load) in bf16 and widen each at its matmul (`_held`): the same fp32
values in the same layout, so the same products, from half the bytes. The lm_head keeps its fp32 weight: widening
its 4.5 MB per token cost more than the bytes saved. Prefill reads the fp32 parameters, so the copies are held
beside them: the memory plan counts them (planned_copy_bytes before any weight is read, copy_bytes once bound).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from klconvert.checkpoint.name_map import KDA_CONV_PART, expected_tensors
from klconvert.config import KimiLinearConfig
from klconvert.kernels.naive_kda import L2NORM_EPS, SOFTPLUS_THRESHOLD, kda_q_scale
from klconvert.runtime import model as M

# The matrices the forms below hold no decode copy of: the embedding (decode reads one row), the lm_head (kept
# fp32, above) and MLA's kv_b (its absorbed halves are views of the parameter)
NOT_COPIED = ("model.embed_tokens.weight", "lm_head.weight", "kv_b_proj.weight")
MOE_MATRICES = ("router", "shared_experts", "experts")   # the categories CPUMoE copies, where it takes its fast path


def _const(value: float) -> torch.Tensor:
    """A 0-d fp32 tensor: the same value as the Python scalar in an fp32 op, at half the cost."""
    return torch.tensor(value, dtype=torch.float32, device="cpu")


def column_major(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] with the same values, laid out [in, out] in memory (w.t() contiguous, viewed back): what bind
    gives fp32 linears on the CPU, and these forms their stacks."""
    return w.t().contiguous().t()


def _held(w: torch.Tensor) -> torch.Tensor:
    """An fp32 weight as decode reads it: in bf16, same layout, where every value is a bf16 value (a checkpoint
    stored in bf16, as the bundled one is), so that `.float()` at the matmul gives back the same tensor; else as
    it is. Half the bytes a token streams, which then stay in the cache between tokens."""
    w = w.detach()
    b = w.to(torch.bfloat16)
    return b if torch.equal(b.float(), w) else w


def _dense(*modules: nn.Module) -> bool:
    return all(type(m) is M.Linear for m in modules)


class _Norm:
    """rms_norm over the last dim of an fp32 x: sum(x*x) * 1/D + eps in one addcmul where D is a power of two
    (exact, so equal to the reference's mean), F.rms_norm otherwise."""

    def __init__(self, weight: torch.Tensor, eps: float):
        D = weight.shape[-1]
        self.w, self.eps, self.shape = weight.detach().float(), eps, (D,)
        self.eps_t, self.inv_d = _const(eps), _const(1.0 / D) if D & (D - 1) == 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_d is None:
            return F.rms_norm(x, self.shape, self.w, self.eps)
        return (x * torch.rsqrt_(torch.addcmul(self.eps_t, (x * x).sum(-1, keepdim=True), self.inv_d))).mul_(self.w)


class CPURMSNorm(nn.Module):
    """RMSNorm, fp32, in four ops where the reference spends six (and its residual add)."""

    def __init__(self, norm: M.RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        self.norm = _Norm(norm.weight, norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x if residual is None else x + residual
        return x, self.norm(x)


class CPUKDAMixer(M.KDAMixer):
    """A KDA layer whose decode (one token per sequence) takes about half the reference's ops: the input
    projection split by one op (the declared order puts f_a and g_a side by side), the gates' up-projections f_b and
    g_b as one bmm, the short conv as a dot per channel, q and k normed together and kept as [B, H, 1, K] rows (no
    unsqueeze later), -exp(A_log) prepared once, the delta rule's products as bmm and its rank-1 update through a kept
    buffer. Prefill is the reference's. `adopt` turns a bound KDAMixer into one in place (parameters and names
    unchanged)."""

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
        mixer.cpu_in, mixer.cpu_out = _held(parts[0].weight), _held(mixer.o_proj.weight)
        mixer.cpu_split = [3 * H * K, 2 * K, H]
        mixer.cpu_conv = mixer.conv_weight.detach().float().reshape(3 * H * K, -1).contiguous()  # [3HK, W]
        mixer.cpu_neg_A = -mixer.A_log.detach().float().reshape(H, 1, 1).exp()                   # as kda_gate
        mixer.cpu_dt_bias = mixer.dt_bias.detach().float().reshape(H, K, 1)
        mixer.cpu_norm = _Norm(mixer.o_norm.weight, mixer.eps)
        mixer.cpu_l2_eps, mixer.cpu_scale = _const(L2NORM_EPS), _const(kda_q_scale(K))
        # [2, K, HK] laid out as the weights are (bind's _cpu_layout: [in, out]): bmm reads each as F.linear does
        mixer.cpu_fg_t = _held(torch.stack([mixer.f_b_proj.weight.t(), mixer.g_b_proj.weight.t()]))
        mixer.cpu_outer = None     # k u^T [B, H, K, V], allocated at the first step

    def decode(self, x: torch.Tensor, state, positions: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        H, K = self.H, self.K
        tail, S = state.conv_state[self.slot], state.kda_state[self.slot]
        qkv, fg, beta_raw = F.linear(x, self.cpu_in.float()).split(self.cpu_split, dim=-1)
        fg = fg.view(2, 1, K) if B == 1 else fg.view(B, 2, K).transpose(0, 1)
        g_raw, gate_raw = torch.bmm(fg, self.cpu_fg_t.float()).unbind(0)                               # [B, HK] each
        # the short conv over [tail, x] (kernels/naive_kda.kda_short_conv at T == 1), then SiLU
        xt = torch.cat([tail, qkv.unsqueeze(-1)], dim=-1)                                      # [B, 3HK, W]
        tail.copy_(xt[..., 1:])
        y = F.silu((xt * self.cpu_conv).sum(-1)).view(B, 3, H, 1, K)
        qk = y[:, :2]                                                                          # l2norm, q and k
        q, k = (qk * torch.rsqrt_((qk * qk).sum(-1, keepdim=True) + self.cpu_l2_eps)).unbind(1)  # [B, H, 1, K]
        q = q * self.cpu_scale
        gate = F.softplus(g_raw.view(B, H, K, 1) + self.cpu_dt_bias, threshold=SOFTPLUS_THRESHOLD)
        decay = (self.cpu_neg_A * gate).exp_()
        beta = torch.sigmoid(beta_raw.view(B, H, 1, 1))
        # the delta rule (runtime/kda.kda_step), u and o as [B, H, 1, V] rows
        S.mul_(decay)
        S3 = S.view(B * H, K, -1)
        u = beta * (y[:, 2] - torch.bmm(k.reshape(B * H, 1, K), S3).view(B, H, 1, -1))
        outer = self.cpu_outer
        if outer is None or outer.shape != S.shape or outer.is_inference() != torch.is_inference_mode_enabled():
            self.cpu_outer = outer = torch.empty_like(S)
        S.add_(torch.mul(k.transpose(-1, -2), u, out=outer))
        o = torch.bmm(q.reshape(B * H, 1, K), S3).view(B, H, 1, -1)
        o = self.cpu_norm(o) * torch.sigmoid(gate_raw.view(B, H, 1, -1))                     # gated output norm
        return F.linear(o.view(B, -1), self.cpu_out.float())


class CPULatentAttention(nn.Module):
    """LatentAttention with its two einsums as bmm (the same products, half the setup), the scale a 0-d tensor and
    the positions past each length masked from a kept arange."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale, self.scale_t = scale, _const(scale)
        self.arange: torch.Tensor | None = None

    def forward(self, q_lat, q_rope, cache, positions, scale, cache_scale=None) -> torch.Tensor:
        if scale != self.scale or cache_scale is not None or cache.dtype != torch.float32:
            return M.LatentAttention.forward(self, q_lat, q_rope, cache, positions, scale, cache_scale)
        return self.upto(q_lat, q_rope, cache, positions)

    def upto(self, q_lat, q_rope, cache, last) -> torch.Tensor:
        """The fp32 cache's rows 0..last[b] of each sequence b."""
        B, L, _ = cache.shape
        R = q_lat.shape[-1]
        if self.arange is None or self.arange.shape[-1] < L:
            self.arange = torch.arange(L, device=cache.device).view(1, 1, L)
        scores = torch.bmm(torch.cat([q_lat, q_rope], dim=-1), cache.transpose(1, 2)) * self.scale_t   # [B, H, L]
        p = scores.masked_fill_(self.arange[..., :L] > last.view(B, 1, 1), float("-inf")).softmax(dim=-1)
        return torch.bmm(p, cache[..., :R])


class CPUMLAMixer(M.MLAMixer):
    """An MLA layer whose decode splits the input projection by one op, keeps kv_b's absorbed halves (the same
    views the reference takes) and calls the linears and the latent norm directly. Prefill is the reference's.
    `adopt` as above."""

    @classmethod
    def adopt(cls, mixer: M.MLAMixer) -> None:
        parts = getattr(mixer.in_proj, "parts", ())
        if (type(mixer) is not M.MLAMixer or list(mixer.in_proj.order) != ["q_proj", "kv_a_proj_with_mqa"]
                or len(parts) != 1 or not _dense(parts[0], mixer.o_proj)):
            return
        mixer.__class__ = cls
        mixer.attend = CPULatentAttention(mixer.scale)
        mixer.cpu_in, mixer.cpu_out = _held(parts[0].weight), _held(mixer.o_proj.weight)
        mixer.cpu_split = [mixer.H * (mixer.dn + mixer.dr), mixer.r, mixer.dr]
        mixer.cpu_norm = _Norm(mixer.kv_a_layernorm.weight, mixer.kv_a_layernorm.eps)
        w_ukv = mixer.kv_b_proj.weight.detach().view(mixer.H, mixer.dn + mixer.dv, mixer.r)
        w_uk, w_uv = w_ukv.split([mixer.dn, mixer.dv], dim=1)
        mixer.cpu_w_uk, mixer.cpu_w_uv_t = w_uk, w_uv.transpose(1, 2)

    def decode(self, x: torch.Tensor, state, positions: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q, latent, k_shared = F.linear(x, self.cpu_in.float()).split(self.cpu_split, dim=-1)
        rows = torch.cat([self.cpu_norm(latent), k_shared], dim=-1)                          # [B, r+dr]
        state.write_mla_at(self.slot, positions, rows)
        q_nope, q_rope = q.view(B, self.H, -1).split([self.dn, self.dr], dim=-1)
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.cpu_w_uk).transpose(0, 1)             # [B, H, r]
        o_lat = self.attend(q_lat, q_rope, state.mla_cache[self.slot], positions, self.scale,
                            state.mla_scale_of(self.slot))                            # its fp32 path: upto
        o = torch.bmm(o_lat.transpose(0, 1), self.cpu_w_uv_t).transpose(0, 1)               # [B, H, dv]
        return F.linear(o.reshape(B, self.H * self.dv), self.cpu_out.float())


class CPUDenseMLP(M.DenseMLP):
    """DenseMLP with gate and up stacked into one matmul. `adopt` as above."""

    @classmethod
    def adopt(cls, mlp: M.DenseMLP) -> None:
        if type(mlp) is M.DenseMLP and _dense(mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            mlp.__class__ = cls
            mlp.cpu_gate_up = _held(column_major(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])))
            mlp.cpu_down = _held(mlp.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.cpu_gate_up.float()).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.cpu_down.float())


class CPUMoE(M.MoE):
    """MoE for one token at a time: the router and the shared expert's gate and up as one matmul, then the chosen
    experts one after the other in ascending id (the reference's order of accumulation), each output times its
    weight as a tensor (as the reference's index_add source). More tokens than one, modules it cannot stack, or a
    router replaced or hooked since: the reference MoE.forward over the same modules, which it keeps under their
    checkpoint names."""

    def __init__(self, moe: M.MoE):
        nn.Module.__init__(self)
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        router, experts, shared = moe.gate, moe.experts, moe.shared_experts
        c = router.c
        self.fast = (c.num_expert_group == 1 and type(router) is M.Router and type(experts) is M.Experts
                     and _dense(shared.gate_proj, shared.up_proj, shared.down_proj))
        if self.fast:
            self.split = [c.num_experts, shared.gate_proj.weight.shape[0], shared.up_proj.weight.shape[0]]
            self.stacked = _held(column_major(torch.cat([router.weight, shared.gate_proj.weight,
                                                           shared.up_proj.weight])))
            self.shared_down = _held(shared.down_proj.weight)
            self.w13, self.w2 = [_held(w) for w in experts.w13.unbind(0)], [_held(w) for w in experts.w2.unbind(0)]

    def router_watched(self) -> bool:
        """Whether the router is called for its own sake -- replaced, or hooked (klconvert bench and eval read its
        choices) -- so the reference path must call it."""
        return type(self.gate) is not M.Router or M.hooked(self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast or x.numel() != x.shape[-1] or self.router_watched():
            return super().forward(x)
        shape = x.shape
        x = x.view(1, -1)
        logits, gate, up = F.linear(x, self.stacked.float()).split(self.split, dim=-1)
        ids, weights = self.gate.route(logits)                         # the reference's routing from its logits
        weights = weights.unbind(1)                                     # k tensors [1]
        out = F.linear(F.silu(gate) * up, self.shared_down.float())     # the shared expert
        for e, slot in sorted((e, slot) for slot, e in enumerate(ids.tolist()[0])):
            gate, up = F.linear(x, self.w13[e].float()).chunk(2, dim=-1)
            out.add_(F.linear(F.silu(gate) * up, self.w2[e].float()).mul_(weights[slot]))
        return out.view(shape)


def planned_copy_bytes(config: KimiLinearConfig) -> int:
    """The bytes the forms will hold beside the parameters, foreseen from the config before any weight is read: a
    bf16 copy of each matrix they multiply by at decode, as `_held` keeps a checkpoint stored in bf16 (the release,
    the bundled model), and a KDA layer's three short-conv weights stacked in fp32 (CPUKDAMixer's cpu_conv). Other
    values, and the forms' constants (a few bytes a layer), are what copy_bytes measures once bound."""
    total = 0
    for spec in expected_tensors(config).values():
        if KDA_CONV_PART.match(spec.name):
            total += math.prod(spec.shape) * torch.float32.itemsize
        elif (len(spec.shape) == 2 and not spec.name.endswith(NOT_COPIED)
              and (config.num_expert_group == 1 or spec.category not in MOE_MATRICES)):
            total += math.prod(spec.shape) * torch.bfloat16.itemsize
    return total


def copy_bytes(model: nn.Module) -> int:
    """The bytes the forms in a bound `model` hold beside its parameters and buffers: each storage a module keeps
    as an attribute (alone or in a list) that is none of theirs, once."""
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    copies = {}
    for module in model.modules():
        for value in vars(module).values():
            for t in value if isinstance(value, list) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in owned:
                    copies[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(copies.values())
