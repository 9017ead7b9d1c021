"""Sigmoid top-k routing: scores = sigmoid(logits); the k largest of scores + bias; weights the chosen scores (or
the biased ones), renormalized, times a scaling factor. `moe_route` takes the router's logits; `moe_router` (decode:
a few tokens) also computes them, the fp32 router GEMV split over expert blocks and the top-k done by the last
program of each token to arrive, all in one launch."""
import torch
import triton
import triton.language as tl

from .int_linear import KT, _sum_partials
from .naive_moe_route import ROUTE_EPS
from .pdl import prefetch_runs, use_pdl, wait_for_inputs

_ROUTE_EPS = tl.constexpr(ROUTE_EPS)
# moe_router's default launch (measured there), which moe_add_norm_router's defaults and launch share
ROUTER_BLOCK_E, ROUTER_BLOCK_D, ROUTER_NUM_WARPS = 4, 512, 4


@triton.jit
def _top_k(logits_ptrs, bias, ids, wts, row, E, scaling, K: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
           RENORM: tl.constexpr, BIASED: tl.constexpr, BYPASS_L1: tl.constexpr):
    """The k largest of the E experts' biased scores of one token (ties: the lowest id), largest first, by a partial
    bitonic sort (tl.topk) of one int64 key per expert: the biased score's bits made order-preserving as a signed
    int in the high word, BE - 1 - id in the low. Stores ids [K] and weights [K] (the chosen experts' logits read
    again). On an H200 the router launch takes 4.1 us at one token this way, 9.7 us ranking each expert against
    all the others (`python bench/kernels.py --only route`)."""
    offs = tl.arange(0, BE)
    mask = offs < E
    if BYPASS_L1:  # written by other programs of this launch
        raw = tl.load(logits_ptrs + offs, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        raw = tl.load(logits_ptrs + offs, mask=mask, other=0.0)
    choice = tl.where(mask, tl.sigmoid(raw.to(tl.float32)) + tl.load(bias + offs, mask=mask, other=0.0).to(tl.float32),
                      float("-inf"))
    bits = choice.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (BE - 1 - offs).to(tl.int64)
    top = tl.topk(key, BK)  # [BK], descending
    offs_k = tl.arange(0, BK)
    keep = offs_k < K
    picked = BE - 1 - (top & 0xFFFFFFFF)
    if BYPASS_L1:
        raw_k = tl.load(logits_ptrs + picked, mask=keep, other=0.0, cache_modifier=".cg")
    else:
        raw_k = tl.load(logits_ptrs + picked, mask=keep, other=0.0)
    weight = tl.sigmoid(raw_k.to(tl.float32))
    if BIASED:
        weight += tl.load(bias + picked, mask=keep, other=0.0).to(tl.float32)
    weight = tl.where(keep, weight, 0.0)
    if RENORM:
        weight = weight / (tl.sum(weight, axis=0) + _ROUTE_EPS)
    tl.store(ids + row * K + offs_k, picked, mask=keep)
    tl.store(wts + row * K + offs_k, weight * scaling, mask=keep)


@triton.jit
def _residual(ptrs, mask, PARTS: tl.constexpr, part_stride, DT: tl.constexpr):
    """The residual's values at ptrs in fp32: loaded as they are (PARTS 0), or the sum of PARTS fp32 partials
    part_stride apart, added in order and rounded to DT (what the projection that parked them would have
    written: int_linear.sum_parked)."""
    if PARTS == 0:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return _sum_partials(ptrs, mask, PARTS, part_stride).to(DT).to(tl.float32)


@triton.jit
def moe_router_fwd_kernel(x, w, bias, logits, locks, ids, wts, E, scaling, stride_x, r, gamma, x_out, h_out, eps,
                          stride_r, h_sums, D: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
                          BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, RENORM: tl.constexpr, BIASED: tl.constexpr,
                          NORM: tl.constexpr, SLICE: tl.constexpr, SUMS: tl.constexpr, PDL: tl.constexpr,
                          TILE: tl.constexpr, PARTS: tl.constexpr = 0, part_stride=0):
    """One (expert block, token) per program: logits[token, block] = x[token] . w[block] in fp32 (the loop over D
    unrolled, so every load is in flight at once); the last program of the token to arrive routes it and re-arms
    the token's lock (to 0).
    NORM: x is the residual stream before its add and RMSNorm (the MoE layer's pre-norm): s = x + r rounded to x's
    dtype, h = s * rstd * gamma. The dot runs on s * gamma and is scaled by rstd after it (the same products, the
    norm's reduction beside the weight loads instead of before them); each program also writes its SLICE of the
    token's s (x_out) and h (h_out, in x's dtype, what the experts read); SUMS: and the sums of h as rounded over
    each TILE inputs of its slice (h_sums [N, D / TILE] fp32: the fused MoE's RAW unpack takes them, TILE its
    k-tile). PARTS > 0: r is a projection's parked split-K partials, PARTS of them part_stride apart (_residual).
    """
    pid_e = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    if PDL:  # the first token's programs prefetch the router's rows
        if row == 0:
            prefetch_runs(w + pid_e * BLOCK_E * D, 0, 1, tl.minimum(BLOCK_E, E - pid_e * BLOCK_E) * D)
    wait_for_inputs(PDL)
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    ss = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in tl.static_range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xv = tl.load(x + row * stride_x + offs_d, mask=mask_d, other=0.0)
        if NORM:
            sv = xv.to(tl.float32) + _residual(r + row * stride_r + offs_d, mask_d, PARTS, part_stride, xv.dtype)
            sv = sv.to(xv.dtype).to(tl.float32)  # the residual stream is kept in its dtype
            ss += sv * sv
            xv = sv * tl.load(gamma + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        else:
            xv = xv.to(tl.float32)
        wv = tl.load(w + offs_e[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask_e[:, None] & mask_d[None, :],
                     other=0.0)
        acc += wv * xv[None, :]
    dot = tl.sum(acc, axis=1)
    if NORM:
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / D + eps)
        dot = dot * rstd
        offs_s = pid_e * SLICE + tl.arange(0, SLICE)
        mask_s = offs_s < D
        xs = tl.load(x + row * stride_x + offs_s, mask=mask_s, other=0.0)
        sv = xs.to(tl.float32) + _residual(r + row * stride_r + offs_s, mask_s, PARTS, part_stride, xs.dtype)
        sv = sv.to(xs.dtype)
        tl.store(x_out + row * D + offs_s, sv, mask=mask_s)
        hv = (sv.to(tl.float32) * rstd * tl.load(gamma + offs_s, mask=mask_s, other=0.0).to(tl.float32)).to(xs.dtype)
        tl.store(h_out + row * D + offs_s, hv, mask=mask_s)
        if SUMS:  # SLICE a multiple of TILE
            offs_g = pid_e * (SLICE // TILE) + tl.arange(0, SLICE // TILE)
            tile_sums = tl.sum(tl.reshape(hv.to(tl.float32), [SLICE // TILE, TILE]), axis=1)
            tl.store(h_sums + row * (D // TILE) + offs_g, tile_sums, mask=offs_g < D // TILE)
    tl.store(logits + row * E + offs_e, dot, mask=mask_e)
    tl.debug_barrier()  # every thread's logits (and slices) are out before the release below
    if tl.atomic_add(locks + row, 1) == tl.num_programs(0) - 1:
        _top_k(logits + row * E, bias, ids, wts, row, E, scaling, K, BK, BE, RENORM, BIASED, True)
        tl.atomic_xchg(locks + row, 0)


@triton.jit
def moe_route_fwd_kernel(logits, bias, ids, wts, E, scaling, stride_l, K: tl.constexpr, BK: tl.constexpr,
                         BE: tl.constexpr, RENORM: tl.constexpr, BIASED: tl.constexpr):
    """One token per program."""
    row = tl.program_id(0).to(tl.int64)
    _top_k(logits + row * stride_l, bias, ids, wts, row, E, scaling, K, BK, BE, RENORM, BIASED, False)


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


def moe_router_locks(max_tokens: int, device) -> torch.Tensor:
    """The per-token arrival counters moe_router needs: zeros, re-armed by the kernel after each call."""
    return torch.zeros(max_tokens, dtype=torch.int32, device=device)


def moe_router(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, scaling: float,
               locks: torch.Tensor, *, renormalize: bool = True, biased_weights: bool = False,
               block_e: int = ROUTER_BLOCK_E, block_d: int = ROUTER_BLOCK_D,
               num_warps: int = ROUTER_NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] (any float dtype), router weight [E, D] fp32, bias [E] -> moe_route(x @ weight.T, ...), in one
    launch; locks: moe_router_locks(>= N). For decode-sized N (the logits workspace is [N, E] fp32). The launch
    defaults are the fastest of `python bench/kernels.py --only route` on an H200 (2026-11-30; 256 experts x 2304,
    graph time): 4.1 us at 1 token and 8.6 at 16, against 5.4 / 10.3 for (8, 256, 8 warps)."""
    return _router(x, None, None, 0.0, weight, bias, k, scaling, locks, renormalize, biased_weights, block_e, block_d,
                   num_warps)[2:]


def moe_add_norm_router(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: torch.Tensor, bias: torch.Tensor, k: int, scaling: float, locks: torch.Tensor, *,
                        renormalize: bool = True, biased_weights: bool = False, block_e: int = ROUTER_BLOCK_E,
                        block_d: int = ROUTER_BLOCK_D, h_sums: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE layer's residual add and RMSNorm folded into moe_router's launch: x, residual [N, D] (one dtype),
    norm_weight [D] -> (s = x + residual, h = rmsnorm(s) * norm_weight, both in x's dtype, as
    rms_norm.add_rms_norm gives them; then the expert ids and weights of moe_router(h, ...)). The logits are
    rstd * ((s * norm_weight) . w) in fp32: h's rounding to 16 bits does not enter them. h_sums (fp32 [N, D / KT]):
    filled with the sums of h, as rounded, over each k-tile of KT inputs (the fused MoE's x_sums); D a multiple of
    KT. residual may also be a projection's parked split-K partials, fp32 [splits, N, D] (int_mma_fwd(park=True)):
    added up here, in split order and rounded to x's dtype, as the projection would have."""
    parked = residual.dim() == 3
    if (residual.shape[parked:] != x.shape or residual.dtype != (torch.float32 if parked else x.dtype)
            or norm_weight.shape != (x.shape[-1],)):
        raise ValueError(f"moe_add_norm_router: x {x.dtype} {list(x.shape)}, residual {residual.dtype} "
                         f"{list(residual.shape)} (x's shape and dtype, or fp32 [splits, *x.shape] parked), norm "
                         f"weight {list(norm_weight.shape)}")
    if h_sums is not None and (x.shape[-1] % KT or tuple(h_sums.shape) != (x.shape[0], x.shape[-1] // KT)
                               or h_sums.dtype != torch.float32 or not h_sums.is_contiguous()):
        raise ValueError(f"moe_add_norm_router: h_sums {h_sums.dtype} {list(h_sums.shape)} for x {list(x.shape)}: "
                         f"contiguous fp32 [tokens, hidden / {KT}] expected, the hidden size a multiple of {KT}")
    return _router(x, residual, norm_weight, eps, weight, bias, k, scaling, locks, renormalize, biased_weights,
                   block_e, block_d, ROUTER_NUM_WARPS, h_sums)


def _router(x, residual, norm_weight, eps, weight, bias, k, scaling, locks, renormalize, biased_weights, block_e,
            block_d, num_warps, h_sums=None):
    N, D = x.shape
    E = weight.shape[0]
    if weight.shape[1] != D or weight.dtype != torch.float32 or not weight.is_contiguous() or locks.numel() < N:
        raise ValueError(f"moe_router: x {list(x.shape)}, weight {weight.dtype} {list(weight.shape)} (contiguous "
                         f"fp32 [E, {D}] expected), {locks.numel()} locks for {N} tokens")
    ids = torch.empty(N, k, dtype=torch.int64, device=x.device)
    wts = torch.empty(N, k, dtype=torch.float32, device=x.device)
    logits = torch.empty(N, E, dtype=torch.float32, device=x.device)
    norm = residual is not None
    x = x if x.stride(-1) == 1 else x.contiguous()
    summed = torch.empty(N, D, dtype=x.dtype, device=x.device) if norm else None
    h = torch.empty_like(summed) if norm else None
    if N:
        r = residual if not norm or residual.stride(-1) == 1 else residual.contiguous()
        parts = r.shape[0] if norm and r.dim() == 3 else 0
        pdl = use_pdl(x.device)
        programs = triton.cdiv(E, block_e)
        sums = h_sums is not None
        moe_router_fwd_kernel[(programs, N)](
            x, weight, bias, logits, locks, ids, wts, E, scaling, x.stride(0), r if norm else x,
            norm_weight if norm else x, summed if norm else x, h if norm else x, eps, r.stride(-2) if norm else 0,
            h_sums if sums else logits, D=D, K=k, BK=triton.next_power_of_2(k), BE=triton.next_power_of_2(E),
            BLOCK_E=block_e, BLOCK_D=block_d, RENORM=renormalize, BIASED=biased_weights, NORM=norm,
            SLICE=KT * triton.next_power_of_2(triton.cdiv(D, programs * KT)) if sums else
            max(16, triton.next_power_of_2(triton.cdiv(D, programs))), SUMS=sums, PDL=pdl, TILE=KT,
            PARTS=parts, part_stride=r.stride(0) if parts else 0, launch_pdl=pdl, num_warps=num_warps)
    return summed, h, ids, wts
