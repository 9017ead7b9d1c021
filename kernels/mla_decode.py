"""MLA decode, absorbed form: every head's latent query over the cached latent rows (MQA), split over the sequence."""
import functools
import math

import torch
import triton
import triton.language as tl

from .mla_limits import E4M3_CAPABILITY, e4m3_capable, latent_dims_taken
from .naive_mla import FP8_MAX
from .pdl import use_pdl, wait_for_inputs
from .sm_count import sm_count

LOG2E = math.log2(math.e)  # the kernel's softmax runs in base 2
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Default launch shapes per cache dtype, best first, each with the shared memory it needs at R=512 (read off the
# compiled kernel on an H200); the first that fits the GPU's per-block limit is used (H100/H200: the first). bf16:
# chosen from ptxas' report for sm_90 (no spills, every cache load asynchronous); fp8: the fastest of
# `bench/kernels.py --only mla`'s sweep at 1M on an H200 (609 us against 935 us for block_n 32 with bf16 dots; no
# spills at 255 registers). The bf16 sweep's best (block_n 128, 2 stages: 422 us) is within 5% of the default's 440.
LAUNCHES = {torch.bfloat16: [(188416, dict(block_n=64, num_warps=8, num_stages=3)),
                             (114688, dict(block_n=64, num_warps=8, num_stages=2)),
                             (75776, dict(block_n=32, num_warps=8, num_stages=2))],
            torch.float8_e4m3fn: [(110848, dict(block_n=64, num_warps=8, num_stages=2)),
                                  (108800, dict(block_n=32, num_warps=8, num_stages=3)),
                                  (73856, dict(block_n=32, num_warps=8, num_stages=2))]}


@triton.jit
def _split_chunk(length, n_splits, MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split for this length: an even share, at least MIN_SPLIT, a whole number of BLOCK_N tiles.
    Splits past the length do nothing, so a short context in a long cache uses few splits."""
    return tl.cdiv(tl.maximum(tl.cdiv(length, n_splits), MIN_SPLIT), BLOCK_N) * BLOCK_N


@triton.jit
def _clamped_length(lengths, i_b, L_max, OFFSET: tl.constexpr):
    return tl.minimum(tl.maximum(tl.load(lengths + i_b) + OFFSET, 0), L_max)


@triton.jit
def mla_decode_fwd_kernel(q_lat, q_rope, cache, cache_scale, lengths, part_o, part_lse, qk_scale, H, L_max,
                          stride_qb, stride_qh, stride_rb, stride_rh, stride_cb, stride_cl, stride_sb,
                          R: tl.constexpr, DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                          MIN_SPLIT: tl.constexpr, FP8: tl.constexpr, TOKENS_M: tl.constexpr,
                          P_SCALE: tl.constexpr, DOT_DT: tl.constexpr, OFFSET: tl.constexpr, PDL: tl.constexpr):
    """One (head block, split, sequence) per program. Each cache tile [BLOCK_N, R + Dr] is read from HBM once and
    serves the whole head block: heads are the M dim of both dots (scores = q c^T, o += p c). Online softmax in base
    2 (qk_scale carries log2 e); writes the split's normalized o [BLOCK_H, R] and its log2-sum-exp2."""
    wait_for_inputs(PDL)
    i_h = tl.program_id(0)
    i_s = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    n_splits = tl.num_programs(1)
    length = _clamped_length(lengths, i_b, L_max, OFFSET)
    chunk = _split_chunk(length, n_splits, MIN_SPLIT, BLOCK_N)
    start = i_s * chunk
    if start < length:
        end = tl.minimum(start + chunk, length)
        offs_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        offs_r = tl.arange(0, R)
        offs_d = tl.arange(0, DR)
        # queries rounded once to the dots' 16-bit type, for the tensor cores; padded heads are zero rows
        q = tl.load(q_lat + i_b * stride_qb + offs_h[:, None] * stride_qh + offs_r[None, :], mask=mask_h[:, None],
                    other=0.0).to(DOT_DT)  # [BLOCK_H, R]
        qr = tl.load(q_rope + i_b * stride_rb + offs_h[:, None] * stride_rh + offs_d[None, :], mask=mask_h[:, None],
                     other=0.0).to(DOT_DT)  # [BLOCK_H, DR]
        if TOKENS_M:  # [R, BLOCK_H], [DR, BLOCK_H]
            q = tl.trans(q)
            qr = tl.trans(qr)
        acc = tl.zeros([BLOCK_H, R], dtype=tl.float32)
        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_H], dtype=tl.float32)
        p_c = cache + i_b * stride_cb
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end  # rows past the split or the length are never read
            c = tl.load(p_c + offs_n[:, None] * stride_cl + offs_r[None, :], mask=mask_n[:, None], other=0.0)
            kr = tl.load(p_c + offs_n[:, None] * stride_cl + R + offs_d[None, :], mask=mask_n[:, None], other=0.0)
            if FP8:  # the scores read the tile again (an L2 hit): one shared-memory layout per copy keeps both
                # copies asynchronous (measured: 1.25x faster at 1M than one fp8 tile converted once for both dots)
                ck = tl.load(p_c + offs_n[:, None] * stride_cl + offs_r[None, :], mask=mask_n[:, None], other=0.0,
                             eviction_policy="evict_first").to(DOT_DT)
                c = c.to(DOT_DT)
            else:
                ck = c
            # fp8 e4m3 -> fp16 is exact; the per-token scale is applied to the scores and probabilities below
            if TOKENS_M:  # scores^T = c q^T: tokens are the M dim (Hopper's wgmma when BLOCK_N >= 64)
                s = tl.trans(tl.dot(kr.to(DOT_DT), qr, tl.dot(ck, q)))
            else:
                s = tl.dot(q, tl.trans(ck))
                s = tl.dot(qr, tl.trans(kr.to(DOT_DT)), s)  # [BLOCK_H, BLOCK_N] fp32
            if FP8:
                sc = tl.load(cache_scale + i_b * stride_sb + offs_n, mask=mask_n, other=0.0)
                s = s * (sc * qk_scale)[None, :]
            else:
                s = s * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if FP8:  # sum_l p_l (scale_l c8_l) = (p * scale) c8, carried times P_SCALE (scale * 448 = the row's
                p = p * (sc * P_SCALE)[None, :]  # amax) so small weights stay normal in fp16
            acc = tl.dot(p.to(DOT_DT), c, acc * alpha[:, None])
            m = m_new
        row = (i_b * n_splits + i_s) * H + offs_h  # workspace rows [B, S, H]
        tl.store(part_o + row[:, None] * R + offs_r[None, :], acc / (l * P_SCALE)[:, None], mask=mask_h[:, None])
        tl.store(part_lse + row, m + tl.log2(l), mask=mask_h)


@triton.jit
def mla_decode_merge_kernel(part_o, part_lse, lengths, o, H, L_max, n_splits, stride_ob, stride_oh,
                            R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                            MIN_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, OFFSET: tl.constexpr,
                            PDL: tl.constexpr):
    """One (R block, head, sequence) per program: o = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max) over the
    splits that ran for this length (the others' workspace is never read), in one pass of BLOCK_S splits at a
    time with the running max rescaled (so a 4K context's 64 splits are one round trip, not a pass for the max and
    another for the sum, BLOCK_S at a time). Length 0 gives zeros."""
    wait_for_inputs(PDL)
    i_r = tl.program_id(0)
    i_h = tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)
    length = _clamped_length(lengths, i_b, L_max, OFFSET)
    n_active = tl.cdiv(length, _split_chunk(length, n_splits, MIN_SPLIT, BLOCK_N))
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = (i_b * n_splits + offs_s) * H + i_h  # workspace rows of splits 0..BLOCK_S-1
    m = float("-inf")
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    den = 0.0
    for s0 in range(0, n_active, BLOCK_S):
        mask_s = s0 + offs_s < n_active
        lse = tl.load(part_lse + rows + s0 * H, mask=mask_s, other=float("-inf"))
        po = tl.load(part_o + (rows + s0 * H)[:, None] * R + offs_r[None, :], mask=mask_s[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, axis=0))  # finite: every active split saw at least one token
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # 0 on the masked splits
        acc = acc * alpha + tl.sum(w[:, None] * po, axis=0)
        den = den * alpha + tl.sum(w, axis=0)
        m = m_new
    # zeros for length 0 only: den >= 1 once a split ran (the largest lse weighs 1), and NaN where a split's lse or
    # output is (a NaN cached row), which must reach the output as the twin's -- `den > 0` is false for NaN
    out = tl.where(n_active > 0, acc / den, 0.0)
    tl.store(o + i_b * stride_ob + i_h * stride_oh + offs_r, out.to(o.dtype.element_ty), mask=offs_r < R)


def merge_blocks(n_splits: int, R: int) -> tuple[int, int]:
    """The merge's (BLOCK_S, BLOCK_R): up to 64 splits per round trip, about 4K partial values a program."""
    block_s = min(64, triton.next_power_of_2(n_splits))
    return block_s, min(R, 128, max(16, 4096 // block_s))


@functools.lru_cache(maxsize=None)
def _default_launch(dtype: torch.dtype, device: torch.device) -> dict:
    """The first of LAUNCHES[dtype] whose shared memory fits one block on this GPU (off CUDA: the first)."""
    if device.type != "cuda":
        return LAUNCHES[dtype][0][1]
    props = torch.cuda.get_device_properties(device)
    if dtype == torch.float8_e4m3fn and not e4m3_capable(device):
        raise ValueError(f"mla_decode: a float8_e4m3fn cache needs compute capability >= "
                         f"{'.'.join(map(str, E4M3_CAPABILITY))}, {props.name} has {props.major}.{props.minor}; use "
                         "a bfloat16 cache")
    limit = getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_multiprocessor - 1024)
    return next((launch for need, launch in LAUNCHES[dtype] if need <= limit), LAUNCHES[dtype][-1][1])


def mla_decode_splits(batch: int, heads: int, max_len: int, device, *, block_h: int = 32,
                      min_split_tokens: int = 256, waves: int = 1) -> int:
    """Splits of the sequence per (sequence, head block): as many programs as `waves` per SM take when the cache is
    long -- never more: 16 sequences on 132 SMs run 8 splits (128 programs), not 9 (144, 12 SMs running two), the
    27-layer 4K step at batch 16 5.711 -> 5.662 ms on an H200, batch 8 3.80 -> 3.75 (2026-12-01; batch 7 unchanged,
    batch 5 2.998 -> 3.005) -- and never more than max_len / min_split_tokens (a short cache is not over-split).
    Shapes only, no sync.
    One wave: at 1M tokens on an H200 (`bench/kernels.py --only mla`, 2026-11-30) 407 us against 473 for two
    waves with a bf16 cache, 616 against 654 with fp8 -- each split's prologue and its partial output (which the
    merge reads back) paid once per SM, not twice."""
    programs = batch * triton.cdiv(heads, block_h)
    return max(1, min(waves * sm_count(torch.device(device)) // programs,
                      triton.cdiv(max_len, min_split_tokens)))


def _workspace(B, S, H, R, device):
    """Per-split partial outputs [B, S, H, R] and log2-sum-exp2 [B, S, H], fp32; only active splits are written."""
    return (torch.empty(B, S, H, R, device=device, dtype=torch.float32),
            torch.empty(B, S, H, device=device, dtype=torch.float32))


def _check(q_lat, q_rope, cache, lengths, cache_scale, out):
    if q_lat.dim() != 3 or q_rope.dim() != 3 or cache.dim() != 3:
        raise ValueError(f"mla_decode: q_lat [B, H, R], q_rope [B, H, Dr], cache [B, L, R + Dr] expected, got "
                         f"{list(q_lat.shape)}, {list(q_rope.shape)}, {list(cache.shape)}")
    B, H, R = q_lat.shape
    Dr = q_rope.shape[-1]
    where = f"mla_decode (B={B}, H={H}, R={R}, Dr={Dr})"
    if tuple(q_rope.shape[:2]) != (B, H) or tuple(cache.shape[::2]) != (B, R + Dr):
        raise ValueError(f"{where}: q_rope must be [{B}, {H}, Dr] and cache [{B}, L, {R + Dr}], got "
                         f"{list(q_rope.shape)} and {list(cache.shape)}")
    if not latent_dims_taken(R, Dr):
        raise ValueError(f"{where}: R and Dr must each be a power of two >= 16 (the tensor-core tile)")
    for name, t in (("q_lat", q_lat), ("q_rope", q_rope)):
        if t.dtype not in (torch.bfloat16, torch.float32) or t.stride(-1) != 1:
            raise ValueError(f"{where}: {name} must be bf16 or fp32 with a contiguous last dim, got {t.dtype} "
                             f"strides {t.stride()}")
    if cache.dtype not in LAUNCHES or cache.stride(-1) != 1:
        raise ValueError(f"{where}: cache must be bf16 or float8_e4m3fn with a contiguous last dim, got "
                         f"{cache.dtype} strides {cache.stride()}")
    if cache.shape[1] * cache.stride(1) >= 2**31:
        raise ValueError(f"{where}: one sequence's cache spans >= 2**31 elements; token offsets are 32-bit")
    if lengths.dtype not in (torch.int32, torch.int64) or tuple(lengths.shape) != (B,) or not lengths.is_contiguous():
        raise ValueError(f"{where}: lengths must be a contiguous int32 or int64 [{B}] tensor, got {lengths.dtype} "
                         f"{list(lengths.shape)}")
    fp8 = cache.dtype == torch.float8_e4m3fn
    if fp8 != (cache_scale is not None):
        raise ValueError(f"{where}: cache_scale goes with (and only with) a float8_e4m3fn cache")
    if fp8 and (cache_scale.dtype != torch.float32 or tuple(cache_scale.shape) != tuple(cache.shape[:2])
                or cache_scale.stride(-1) != 1):
        raise ValueError(f"{where}: cache_scale must be fp32 {list(cache.shape[:2])} with a contiguous last dim, "
                         f"got {cache_scale.dtype} {list(cache_scale.shape)}")
    if out is not None and (tuple(out.shape) != (B, H, R) or out.dtype not in OUT_DTYPES or out.stride(-1) != 1):
        raise ValueError(f"{where}: out must be fp32, bf16 or fp16 [{B}, {H}, {R}] with a contiguous last dim")


def mla_decode(q_lat, q_rope, cache, lengths, scale, cache_scale=None, *, out=None, out_dtype=torch.float32,
               block_h=32, block_n=None, num_warps=None, num_stages=None, min_split_tokens=256, num_splits=None,
               qk_tokens_as_m=False, length_offset=0):
    """Absorbed MLA attention for one query token per sequence.

    q_lat [B, H, R]: the query folded into the latent (q_nope @ W_uk); q_rope [B, H, Dr]: the query's shared-key
    part; both bf16 or fp32 (rounded to bf16 for the tensor cores). cache [B, L_max, R + Dr]: per token the normed
    latent then the shared key, bf16, or float8_e4m3fn with cache_scale [B, L_max] fp32 (row = values * scale, see
    quantize_mla_cache_rows). lengths int32 or int64 [B]: the first lengths[b] + length_offset tokens are attended
    (length_offset, an int: a decode step passes its positions and 1, so no launch adds the 1); later rows are never
    read (they may hold anything); lengths are clamped to [0, L_max] and a length of 0 gives zeros.
    scores = (q_lat . c_lat + q_rope . k_rope) * scale, softmax over the valid tokens, o = p @ c_lat.
    Returns o_lat [B, H, R] in out_dtype (fp32, bf16 or fp16; the merge rounds its fp32 sum once), or into `out`
    (its dtype) if given.

    Two launches, fixed shapes (no host sync; CUDA-graph safe): the splits (grid head blocks x S splits x B, each
    writing its partial o and log-sum-exp to a workspace allocated per call: fp32 [B, S, H, R] and [B, S, H]; inside
    a CUDA graph the graph's pool keeps it), then the merge.
    Tuning: block_h heads per program (32: the model's H, so each cache tile is read once), block_n tokens per tile,
    num_warps / num_stages (defaults per cache dtype and GPU: LAUNCHES), min_split_tokens, num_splits (default
    mla_decode_splits: one wave of programs over the GPU's SMs at long context), qk_tokens_as_m (scores as c q^T:
    wgmma on Hopper for the score product; spill-free at block_n 128 / 8 warps / 2 stages with a bf16 cache).
    An fp8 cache runs its dots in fp16 (e4m3 -> fp16 is one conversion per pair on sm_89+, exact; measured 1.3x
    faster at 1M than bf16 dots), the queries rounded to fp16, so |q| must stay below 65504.
    """
    _check(q_lat, q_rope, cache, lengths, cache_scale, out)
    if type(length_offset) is not int:
        raise ValueError(f"mla_decode: length_offset must be an int, got {type(length_offset).__name__}")
    if out is None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"mla_decode: out_dtype must be one of {OUT_DTYPES}, not {out_dtype}")
    B, H, R = q_lat.shape
    Dr = q_rope.shape[-1]
    L_max = cache.shape[1]
    launch = _default_launch(cache.dtype, cache.device)
    block_n = block_n or launch["block_n"]
    block_h = max(16, triton.next_power_of_2(min(block_h, H)))  # a tl.dot needs M >= 16
    n_blocks_h = triton.cdiv(H, block_h)
    S = num_splits or mla_decode_splits(B, H, L_max, cache.device, block_h=block_h,
                                        min_split_tokens=min_split_tokens)
    part_o, part_lse = _workspace(B, S, H, R, cache.device)
    fp8 = cache_scale is not None
    pdl = use_pdl(cache.device)
    mla_decode_fwd_kernel[(n_blocks_h, S, B)](
        q_lat, q_rope, cache, cache_scale if fp8 else cache, lengths, part_o, part_lse, scale * LOG2E,
        H, L_max, q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), cache.stride(0),
        cache.stride(1), cache_scale.stride(0) if fp8 else 0, R=R, DR=Dr, BLOCK_H=block_h, BLOCK_N=block_n,
        MIN_SPLIT=min_split_tokens, FP8=fp8, TOKENS_M=qk_tokens_as_m, P_SCALE=FP8_MAX if fp8 else 1.0,
        DOT_DT=tl.float16 if fp8 else tl.bfloat16, OFFSET=length_offset, PDL=pdl, launch_pdl=pdl,
        num_warps=num_warps or launch["num_warps"], num_stages=num_stages or launch["num_stages"])
    o = out if out is not None else torch.empty(B, H, R, device=cache.device, dtype=out_dtype)
    block_s, block_r = merge_blocks(S, R)
    mla_decode_merge_kernel[(triton.cdiv(R, block_r), H, B)](
        part_o, part_lse, lengths, o, H, L_max, S, o.stride(0), o.stride(1), R=R, BLOCK_R=block_r, BLOCK_S=block_s,
        MIN_SPLIT=min_split_tokens, BLOCK_N=block_n, OFFSET=length_offset, PDL=pdl, launch_pdl=pdl, num_warps=4)
    return o
