"""The Triton implementations bind swaps into the declared model: each has the call signature of the module it
replaces in runtime/model.py (a packed int linear for `Linear` or a whole `ParallelLinear` group, the fused KDA
decode step and chunked prefill, the fused MoE experts, the Triton latent attention and cache-row write, the
prefill attention's merge). Only imported when Triton is chosen."""
from __future__ import annotations

import torch
from torch import nn

from klconvert.config import KimiLinearConfig
from klconvert.kernels.attention_merge import merge_attention_
from klconvert.kernels.fused_moe import (DECODE_MAX_TOKENS, MAX_SLOTS, PackedExperts, dense_mlp_experts, fused_moe,
                                         takes_x_sums)
from klconvert.kernels.int_linear import (KT, MMA_BLOCK_M, PackedLinear, dense_locks, int_linear, int_mma_fwd,
                                         linear_kernel, sum_parked)
from klconvert.kernels.kda_chunk import kda_chunk, kda_prefill_conv
from klconvert.kernels.kda_decode import kda_layer_step
from klconvert.kernels.mla_cache import mla_write_rows
from klconvert.kernels.mla_decode import mla_decode
from klconvert.kernels.moe_route import moe_add_norm_router, moe_route, moe_router, moe_router_locks
from klconvert.kernels.rms_norm import add_rms_norm
from klconvert.runtime import model as M


class PackedIntLinear(nn.Module):
    """y = x W^T with W held packed (int4/int8 groups); one kernel for a whole ParallelLinear group, whose rows
    are stacked in the group's order.
    park (bind sets it on an MoE block's o_proj, whose sum the fused router's launch can finish): a decode step's
    input [B, K], B <= PARK_MAX_TOKENS, on the tensor-core kernel then gets that launch's split-K partials, fp32
    [splits, B, N], unsummed (int_mma_fwd(park=True)) -- the launch skips its arrival and last-split sum;
    FusedNormMoE hands them on. Each of the router launch's programs reads its token's partials whole, so the
    bound: on an H200 (27 layers, 4K, `klconvert bench --preset kimi-linear-48b --batch 1,16 --spread-routing`,
    BENCHMARKS.md twenty-second decode round) one token 1.701 / 1.705 -> 1.685 / 1.683 ms a step, 16 tokens 5.671 /
    5.673 -> 5.726 / 5.726 (1,024 router programs each reading 74 KB of partials); 2 to 15 not measured."""

    PARK_MAX_TOKENS = 1

    def __init__(self, packed: PackedLinear):
        super().__init__()
        self.packed = packed
        self.park = False
        self.out_dtype: torch.dtype | None = None  # y's dtype; None: x's (bind sets fp32 on the lm_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.park and x.dim() == 2 and x.shape[0] <= self.PARK_MAX_TOKENS and not M.hooked(self)
                and linear_kernel(x.shape[0], self.packed, x.dtype) == "mma"):
            return int_mma_fwd(x if x.stride(-1) == 1 else x.contiguous(), self.packed,
                               x.new_empty(x.shape[0], self.packed.n), park=True)
        out = None if self.out_dtype is None else x.new_empty(*x.shape[:-1], self.packed.n, dtype=self.out_dtype)
        return int_linear(x, self.packed, out=out)


class PackedDenseLinear(nn.Module):
    """A StackedLinear of one packed part, then one dense part (under the default policy KDA's q, k, v, f_a, b |
    g_a; a recipe that keeps MLA's kv_a gives q | kv_a): inputs the tensor-core kernel takes in one row block
    (decode) run both in one launch, the dense rows as more programs of int_mma_fwd (no second kernel, stream or
    cat); larger ones the two kernels and a cat."""

    def __init__(self, group: nn.Module):
        super().__init__()
        self.order, self.sizes = group.order, group.sizes
        self.packed = group.parts[0].packed
        self.dense = nn.Parameter(group.parts[1].weight.contiguous(), requires_grad=False)
        self.locks = dense_locks(self.packed, self.dense.shape[0])

    @staticmethod
    def takes(group: nn.Module) -> bool:
        """Whether `group` is one packed part, then one dense part, whose decode runs on the tensor cores."""
        parts = group.parts
        return (len(parts) == 2 and isinstance(parts[0], PackedIntLinear) and not hasattr(parts[1], "packed")
                and linear_kernel(1, parts[0].packed, torch.bfloat16) == "mma")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > MMA_BLOCK_M or linear_kernel(x2.shape[0], self.packed, x.dtype) != "mma":
            return torch.cat([int_linear(x, self.packed), torch.nn.functional.linear(x, self.dense)], dim=-1)
        y = x.new_empty(*x.shape[:-1], self.packed.n + self.dense.shape[0])
        int_mma_fwd(x2 if x2.stride(-1) == 1 else x2.contiguous(), self.packed, y.view(x2.shape[0], -1),
                    dense=self.dense, locks=self.locks)
        return y


class ConcurrentStackedLinear(nn.Module):
    """A StackedLinear on CUDA that PackedDenseLinear does not take (more parts, or a packed part the tensor-core
    kernel does not run at decode, such as int8 at one row) whose parts run side by side: the first on the caller's
    stream, the rest on a second stream joined before the outputs meet -- parallel branches of the decode step's
    CUDA graph, so a small dense GEMV does not wait for the packed one. The same kernels on the same inputs as
    StackedLinear, so the same outputs."""

    def __init__(self, group: nn.Module, device: torch.device):
        super().__init__()
        self.parts, self.order, self.sizes = group.parts, group.order, group.sizes
        self.side = torch.cuda.Stream(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = torch.cuda.current_stream(x.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            rest = [p(x) for p in self.parts[1:]]
        first = self.parts[0](x)
        main.wait_stream(self.side)
        return torch.cat([first] + rest, dim=-1)


class FusedRMSNorm(nn.Module):
    """RMSNorm, and its residual add, in one launch."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_rms_norm(x, None, self.weight, self.eps)[1]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps)


class FusedRouter(nn.Module):
    """Router: for up to FUSED_ROUTER_TOKENS tokens the fp32 router GEMV and the top-k in one launch; above, the
    GEMV through cuBLAS, then sigmoid + bias + top-k + renormalize in one launch (ungrouped)."""

    FUSED_ROUTER_TOKENS = 16

    def __init__(self, router: nn.Module):
        super().__init__()
        c = router.c
        self.weight, self.bias = router.weight, router.e_score_correction_bias
        self.locks = moe_router_locks(self.FUSED_ROUTER_TOKENS, router.weight.device)
        self.k, self.scaling, self.renorm, self.biased = (c.num_experts_per_token, c.routed_scaling_factor,
                                                          c.moe_renormalize, router.biased)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] <= self.FUSED_ROUTER_TOKENS:
            return moe_router(x, self.weight, self.bias, self.k, self.scaling, self.locks, renormalize=self.renorm,
                              biased_weights=self.biased)
        logits = torch.nn.functional.linear(x.float(), self.weight)
        return moe_route(logits, self.bias, self.k, self.scaling, renormalize=self.renorm,
                         biased_weights=self.biased)

    def add_norm_route(self, norm: nn.Module, x: torch.Tensor, branch: torch.Tensor,
                       h_sums: torch.Tensor | None = None):
        """The block's residual add and `norm` folded into the one-launch router (up to FUSED_ROUTER_TOKENS tokens):
        (x + branch, norm(x + branch), expert ids, weights); h_sums: filled with the norm's k-tile sums."""
        return moe_add_norm_router(x, branch, norm.weight, norm.eps, self.weight, self.bias, self.k, self.scaling,
                                   self.locks, renormalize=self.renorm, biased_weights=self.biased, h_sums=h_sums)


class FusedNormMoE(M.MoE):
    """MoE whose decode folds the block's residual add and pre-norm into the router's launch (FusedRouter.
    add_norm_route): one launch fewer per MoE layer. On an H200 (graph time, one token) 4.6 us against 5.5 for the
    norm's launch and the router's. That launch also writes h's k-tile sums for fused experts that take them
    (FusedExperts.sums_buffer: their gate+up launch's RAW unpack). The reference decode where the router is hooked
    (klconvert bench and eval read its choices) or replaced by one without add_norm_route, or the tokens are more
    than the one-launch router takes.
    `adopt` turns an MoE whose router is a FusedRouter into one (the same modules)."""

    @classmethod
    def adopt(cls, moe: M.MoE) -> None:
        if type(moe) is M.MoE and type(moe.gate) is FusedRouter:
            moe.__class__ = cls

    def decode(self, norm: nn.Module, x: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """branch: the mixer's output, or its o_proj's parked partials [splits, B, D] (PackedIntLinear.park), which
        the router's launch adds up."""
        g = self.gate  # a FusedRouter, or what wraps one keeping its add_norm_route (klconvert bench's routing)
        if not hasattr(g, "add_norm_route") or M.hooked(g) or x.shape[0] > g.FUSED_ROUTER_TOKENS:
            return super().decode(norm, x, sum_parked(branch, x.dtype) if branch.dim() > x.dim() else branch)
        experts = self.experts
        sums = experts.sums_buffer(x) if isinstance(experts, FusedExperts) else None  # for the experts' RAW unpack
        x, h, ids, weights = g.add_norm_route(norm, x, branch, sums)
        if sums is None:
            return x, experts(h, ids, weights, self.shared_experts)
        return x, experts(h, ids, weights, self.shared_experts, x_sums=sums)


class FusedKDAStep(nn.Module):
    """KDAStep in one launch (conv + SiLU + l2norm + the gates' up-projections f_b, g_b + delta rule + gated norm),
    weights prepared once. Takes a mixer whose f_b_proj and g_b_proj are dense (bind checks), and the layer's
    prefill module, whose prepared conv taps and gate parameters it shares."""

    def __init__(self, mixer: nn.Module, chunk: TritonKDAChunk):
        super().__init__()
        self.conv, self.A_log, self.dt_bias = chunk.conv, chunk.A_log, chunk.dt_bias
        self.o_norm, self.eps = mixer.o_norm.weight.float(), mixer.eps
        self.f_b, self.g_b = mixer.f_b_proj.weight.contiguous(), mixer.g_b_proj.weight.contiguous()

    def forward(self, m, qkv, f_a, beta_raw, g_a, tail, S) -> torch.Tensor:
        return kda_layer_step(qkv, tail, self.conv, f_a, beta_raw, g_a, S, f_b_weight=self.f_b, g_b_weight=self.g_b,
                              A_log=self.A_log, dt_bias=self.dt_bias, o_norm_weight=self.o_norm, eps=self.eps)


class TritonKDAChunk(nn.Module):
    """KDAChunk through kernels.kda_chunk: the short conv in one launch, then the chunked delta rule (l2norm, gate
    and beta fused in), weights prepared once."""

    conv_dtype: torch.dtype | None = torch.float32  # q, k, v as the delta rule reads them (None: qkv's dtype)

    def __init__(self, mixer: nn.Module):
        super().__init__()
        taps = mixer.conv_weight                                                 # [3HK, 1, W], a new tensor
        self.conv = taps.view(len(taps), -1)                                     # [3HK, W]
        # the mixer's three convs become views of it: the device holds their weights once, not twice (h273)
        for conv, rows in zip((mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d), taps.chunk(3)):
            conv.weight = nn.Parameter(rows, requires_grad=False)
        self.A_log, self.dt_bias = mixer.A_log.float().flatten(), mixer.dt_bias.float()
        self.H, self.K = mixer.H, mixer.K

    def forward(self, m, qkv, g_raw, beta_raw, tail, S) -> torch.Tensor:
        B, T, _ = qkv.shape
        H, K = self.H, self.K
        if tail is None:
            tail = qkv.new_zeros(B, qkv.shape[-1], self.conv.shape[-1] - 1)
        y = kda_prefill_conv(qkv, tail, self.conv, out_dtype=self.conv_dtype or qkv.dtype)
        q, k, v = y.view(B, T, 3, H, K).unbind(2)
        S = S if S is not None else torch.zeros(B, H, K, K, dtype=torch.float32, device=q.device)
        return self.delta(q, k, v, g_raw.view(B, T, H, K), beta_raw, S, exact=qkv.dtype == torch.float32)

    def delta(self, q, k, v, g_raw, beta_raw, S, exact: bool) -> torch.Tensor:
        """The delta rule from S (updated in place): o [B, T, H, V] fp32. exact (an fp32 model): the products in
        full fp32 ("ieee"), not TF32."""
        return kda_chunk(q, k, v, g_raw, beta_raw, S, A_log=self.A_log, dt_bias=self.dt_bias,
                         precision="ieee" if exact else "tf32")


class FlaKDAChunk(TritonKDAChunk):
    """KDAChunk with fla-core's chunk_kda for the delta rule (`pip install 'klconvert[fast]'`): the same
    conventions -- l2norm (eps inside the sqrt), q times K^-0.5, the gate -exp(A_log) softplus(g + dt_bias),
    sigmoid(beta) -- and the state [B, H, K, V] fp32 in and out. q, k, v go in the activation dtype (bf16 on a
    GPU), as fla's documentation and our H200 check run it; an fp32 model takes the Triton kernel in full fp32."""

    conv_dtype = None

    def delta(self, q, k, v, g_raw, beta_raw, S, exact: bool) -> torch.Tensor:
        if exact:  # fla's kernels multiply in TF32 at best; an fp32 model gets the exact Triton products
            return super().delta(q.float(), k.float(), v.float(), g_raw, beta_raw, S, exact)
        from fla.ops.kda import chunk_kda

        o, final = chunk_kda(q, k, v, g_raw, beta_raw, initial_state=S.float(), output_final_state=True,
                             use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                             A_log=self.A_log, dt_bias=self.dt_bias)
        S.copy_(final)
        return o.float()


def kda_chunk_module(mixer: nn.Module) -> nn.Module:
    """The prefill module bind swaps into a KDA layer: fla-core's chunk_kda where it is installed and the layer is
    on CUDA, else the Triton kernel."""
    if mixer.dt_bias.device.type == "cuda":
        try:
            import fla.ops.kda  # noqa: F401
        except ImportError:
            pass
        else:
            return FlaKDAChunk(mixer)
    return TritonKDAChunk(mixer)


class FusedExperts(nn.Module):
    """The routed experts (and the shared one, when it is stacked in) through kernels.fused_moe. `after`: a weight
    of a later launch (bind: the next layer's input projection) that the decode launches prefetch into L2."""

    def __init__(self, packed: PackedExperts):
        super().__init__()
        self.packed = packed
        self.after: torch.Tensor | None = None

    def forward(self, x, ids, weights, shared: nn.Module, x_sums: torch.Tensor | None = None) -> torch.Tensor:
        y = fused_moe(x, ids, weights, self.packed, after=self.after, x_sums=x_sums)
        return y if self.packed.has_shared else y + shared(x)

    def sums_buffer(self, x: torch.Tensor) -> torch.Tensor | None:
        """An fp32 [tokens, K / KT] buffer for x's k-tile sums where the decode launch uses them
        (fused_moe.takes_x_sums: its gate+up launch then skips a subtraction); else None."""
        if not takes_x_sums(self.packed, x):
            return None
        return torch.empty(x.shape[0], x.shape[-1] // KT, device=x.device, dtype=torch.float32)


class FusedDenseMLP(M.FeedForward):
    """A packed dense SwiGLU MLP (layer 0's) held as the fused MoE's stack of its row chunks (the last as the shared
    expert), every chunk taken at weight 1: up to DECODE_MAX_TOKENS tokens the fused MoE's two launches (gate+up
    with the SiLU product, down with the sum) run it where the PyTorch form takes five (three projections, the SiLU,
    the product); prefill sums the chunks' projections. On an H200 (the 48B's 9216 x 2304 in 9 chunks of 1024,
    int4 g128, graph us, weights rotated; BENCHMARKS.md twenty-third decode round): one token 34.7-36.0 -> 23.1 us,
    16 tokens 40.0 -> 37.3. `after`: as FusedExperts'."""

    def __init__(self, mlp: M.DenseMLP, chunk: int):
        super().__init__()
        self.packed = dense_mlp_experts(mlp.gate_proj.packed, mlp.up_proj.packed, mlp.down_proj.packed, chunk)
        routed, device = self.packed.num_experts, self.packed.gate.qweight.device
        self.ids = torch.arange(routed, device=device).expand(DECODE_MAX_TOKENS, routed).contiguous()
        self.weights = torch.ones(DECODE_MAX_TOKENS, routed, dtype=torch.float32, device=device)
        self.after: torch.Tensor | None = None

    @staticmethod
    def chunk(mlp: nn.Module, c: KimiLinearConfig) -> int | None:
        """The chunk a DenseMLP restacks in, or None where it stays as it is: all three projections packed alike in
        int4 (the case measured: the fused MoE's int8 launch at one token, 36.7 us for the 48B's 9 x 3 x 1024 x 2304
        codes, may not beat three int8 projections), in chunks of the MoE's expert width (the launches measured on
        those shapes) that fill whole groups, no more chunks than an MoE layer's slots (its decode workspace bounds
        this one's)."""
        parts = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if type(mlp) is not M.DenseMLP or not all(isinstance(p, PackedIntLinear) for p in parts):
            return None
        chunk, (g, u, d) = c.moe_intermediate_size, (p.packed for p in parts)
        count = c.intermediate_size // chunk
        alike = len({(p.bits, p.group_size, p.zeros is None) for p in (g, u, d)}) == 1 and g.bits == 4
        fits = (c.intermediate_size % chunk == 0 and chunk % g.group_size == 0   # whole groups, so whole k-tiles
                and 2 <= count <= min(MAX_SLOTS, c.num_experts_per_token + c.num_shared_experts))
        return chunk if alike and fits else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        T = x2.shape[0]
        if T <= DECODE_MAX_TOKENS:
            return fused_moe(x2, self.ids[:T], self.weights[:T], self.packed, after=self.after).view(x.shape)
        y = torch.zeros(x2.shape, device=x.device, dtype=torch.float32)
        part = torch.empty_like(y)
        for e in range(self.packed.num_experts + 1):
            gate, up, down = self.packed.expert(e)
            y += int_linear(torch.nn.functional.silu(int_linear(x2, gate)) * int_linear(x2, up), down, out=part)
        return y.to(x.dtype).view(x.shape)


class SharedInStack(nn.Module):
    """Stands in for a shared expert that FusedExperts carries in its stack; never called."""

    def forward(self, x):
        raise RuntimeError("the shared expert runs inside FusedExperts")


class TritonPrefillAttention(M.PrefillAttention):
    """PrefillAttention whose per-block merge runs in one in-place pass (kernels.attention_merge) instead of
    PyTorch's several over the fp32 running output."""

    @staticmethod
    def merge(o, lse, o_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
        if o is None:
            return o_b.float(), lse_b
        merge_attention_(o, lse, o_b, lse_b)
        return o, lse


class TritonLatentAttention(nn.Module):
    """LatentAttention through kernels.mla_decode (split over the sequence; bf16 or e4m3 cache). Splits of at
    least MIN_SPLIT_TOKENS: a 4K context then spreads over ~64 programs instead of 16 (a decode step at short
    context is latency-bound); long contexts are capped by the kernel's one wave over the SMs either way. The
    kernel adds the 1 to the positions (no launch of its own for it)."""

    MIN_SPLIT_TOKENS = 64

    def forward(self, q_lat, q_rope, cache, positions, scale, cache_scale=None) -> torch.Tensor:
        return mla_decode(q_lat, q_rope, cache, positions, scale, cache_scale, min_split_tokens=self.MIN_SPLIT_TOKENS,
                          out_dtype=q_lat.dtype, length_offset=1)


class TritonLatentRowWrite(nn.Module):
    """LatentRowWrite through kernels.mla_cache: the latent's norm, the row and its e4m3 scale in one launch."""

    def forward(self, m, kv: torch.Tensor, state, positions: torch.Tensor) -> None:
        mla_write_rows(kv, m.kv_a_layernorm.weight, m.kv_a_layernorm.eps, positions, state.mla_cache[m.slot],
                       state.mla_scale_of(m.slot))
