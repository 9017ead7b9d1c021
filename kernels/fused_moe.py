"""Fused MoE over int4/int8 experts: for up to 16 tokens two launches (gate+up with SiLU, down with the weighted sum)
that read each routed expert once for all its tokens, on the tensor or the CUDA cores (MOE_CROSSOVER); past that
(prefill) a grouped GEMM per projection over pairs sorted by expert, dequantizing weight tiles in registers."""
import torch
import triton
import triton.language as tl

from .int_layout import PackedExperts
from .int_linear import (KT, MMA_M, ROWS, PackedLinear, _arrive, _dequant_pair, _dot_w, _fma_tile, _group_params,
                         _mma_tile, _prefetch_program, _sum_partials, _tile_params, fast_unpack, packed_bytes,
                         repack_int_weight)
from .pdl import prefetch_fits, prefetch_share, use_pdl, wait_for_inputs

DECODE_MAX_TOKENS = 16  # up to this many tokens the decode kernels (no sort, no host sync) can run
MAX_SLOTS = 16  # routed experts per token, plus the shared one, that the decode path's locks cover
# Kernel per token count, by bits: T <= first -> decode kernels on the CUDA cores, T <= second -> decode kernels on
# the tensor cores (int4: Marlin-style unpack), past both -> the grouped GEMM over pairs sorted on the device.
# int4 measured on an H200 (2026-11-29, `python bench/kernels.py --only int4`, BENCHMARKS.md); int8 on the same card
# (2026-11-30, a scratch script timing as that sweep does, which now covers int8 too): 1 token on the CUDA cores 58.3
# us against 36.7 on the tensor cores, 2 tokens 127.4 against 53.8. The second bound stays 16: a decode batch that
# large still runs without a host sync.
MOE_CROSSOVER = {4: (0, 16), 8: (0, 16)}
# moe_grouped_fwd's launch (block_m, block_n, num_warps, num_stages, weights_as_a) by token count: the first entry
# whose bound >= M. Measured on an H200 (2026-11-29, `bench/kernels.py --only int_prefill`, 8 of 256 experts +
# shared, int4 g128): small blocks while an expert gets few pairs (M * 9 / 257 on average), the weights as the wgmma's
# A operand from 2048 tokens, where it was 1.3-1.4x faster.
MOE_PREFILL_LAUNCH = ((64, (16, 64, 4, 3, False)), (256, (32, 128, 4, 3, True)), (512, (16, 64, 4, 3, False)),
                      (1 << 62, (64, 128, 8, 3, True)))
# Decode launch shapes (block_n, split_k of (gate+up, down), num_warps, raw) by kernel and token count: the first
# entry whose bound >= the tokens; raw: whether the gate+up launch takes the RAW unpack when x's k-tile sums come with
# x (takes_x_sums). CUDA cores: one shape (1 token). Tensor cores: the table `python bench/kernels.py --only int4`
# printed on an H200 (2026-11-30, BENCHMARKS.md's eighteenth decode round; 8 shapes at 1, 2, 3, 4, 6, 8 and 16
# tokens, each with and without RAW, random routing, CUDA graphs). A k split pays while the serving programs are
# few: 1 token (3, 2) with RAW 21.6 us (23.4 without; unsplit 36.5), 2 tokens (2, 1) without RAW 35.2 (37.9 with);
# from 3 tokens unsplit with RAW leads: 3 tokens 41.7 against (2, 1)'s 44.8, 4 tokens 46.7 against 128-row tiles on
# 8 warps' 50.1, 8 tokens 80.5 against (2, 1)'s 85.3, 16 tokens 132.9 -- but at 6 tokens RAW reads 1.1 us slower
# (65.9 against 64.8). Tokens 5 and 7 were not swept: they take the next bound's entry. Int8 experts take the same
# table (swept in int4 only; RAW is int4's).
MOE_DECODE_LAUNCH = {"fma": ((DECODE_MAX_TOKENS, (16, (3, 2), 2, False)),),
                     "mma": ((1, (64, (3, 2), 4, True)), (2, (64, (2, 1), 4, False)), (4, (64, (1, 1), 4, True)),
                             (6, (64, (1, 1), 4, False)), (DECODE_MAX_TOKENS, (64, (1, 1), 4, True)))}


def _stack(tensors: list[dict], bits: int, group_size: int, what: str) -> PackedLinear:
    """The experts' repacked linears along a leading dim, filled one expert at a time (no list of repacked copies
    beside the stack)."""
    stack = None
    for e, t in enumerate(tensors):
        p = repack_int_weight(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), t["weight_shape"],
                              bits, group_size)
        if stack is None:
            zeros = None if p.zeros is None else p.zeros.new_empty(len(tensors), *p.zeros.shape)
            stack = PackedLinear(p.qweight.new_empty(len(tensors), *p.qweight.shape),
                                 p.scales.new_empty(len(tensors), *p.scales.shape), zeros, p.locks, p.n, p.k, bits,
                                 p.group_size)
        elif (p.n, p.k, p.zeros is None) != (stack.n, stack.k, stack.zeros is None):
            raise ValueError(f"{what} of expert {e} is [{p.n}, {p.k}] (asymmetric: {p.zeros is not None}), "
                             f"expert 0 is [{stack.n}, {stack.k}] (asymmetric: {stack.zeros is not None}): "
                             "stacked experts must share shape and scheme")
        stack.qweight[e], stack.scales[e] = p.qweight, p.scales
        if p.zeros is not None:
            stack.zeros[e] = p.zeros
    return stack


def repack_moe_experts(experts, *, shared: dict | None = None, bits: int, group_size: int) -> PackedExperts:
    """experts: a list of per-expert dicts {"gate", "up", "down"} of compressed-tensors tensors
    {weight_packed, weight_scale, weight_zero_point (asymmetric only), weight_shape}, or one such dict whose
    tensors carry a leading expert dim. shared: the shared expert, same form as one list entry."""
    if isinstance(experts, dict):  # stacked: split along the expert dim; weight_shape's [n, k] read on the host
        count = experts["gate"]["weight_packed"].shape[0]
        experts = [{proj: {name: (torch.as_tensor(t, device="cpu").reshape(-1)[-2:] if name == "weight_shape"
                                  else t[e]) for name, t in tensors.items()} for proj, tensors in experts.items()}
                   for e in range(count)]
    every = list(experts) + ([shared] if shared is not None else [])
    gate, up, down = (_stack([ex[p] for ex in every], bits, group_size, p) for p in ("gate", "up", "down"))
    return _experts(gate, up, down, len(experts), shared is not None)


def _experts(gate: PackedLinear, up: PackedLinear, down: PackedLinear, num_experts: int,
             has_shared: bool) -> PackedExperts:
    """PackedExperts of three stacks whose shapes agree, with the gate's per-pair split-K locks."""
    if (gate.n, gate.k) != (up.n, up.k) or (down.n, down.k) != (gate.k, gate.n):
        raise ValueError(f"expert shapes disagree: gate [{gate.n}, {gate.k}], up [{up.n}, {up.k}], "
                         f"down [{down.n}, {down.k}]; expected down = [hidden, intermediate]")
    gate.locks = torch.zeros(DECODE_MAX_TOKENS * MAX_SLOTS, gate.scales.shape[-1] // ROWS, dtype=torch.int32,
                             device=gate.qweight.device)
    return PackedExperts(gate, up, down, num_experts, has_shared)


def dense_mlp_experts(gate: PackedLinear, up: PackedLinear, down: PackedLinear, chunk: int) -> PackedExperts:
    """A dense SwiGLU MLP's packed linears (gate and up [I, D], down [D, I], one format) restacked as I / chunk
    experts of `chunk` intermediate rows each, the last as the shared one. The MLP is the sum over its chunks c of
    down_c(silu(gate_c x) * up_c x), so fused_moe with every other chunk routed at weight 1 runs it. The same codes,
    scales and zero points, moved (gate's codes not even that: its row blocks already lie chunk after chunk)."""
    I, D = gate.n, gate.k
    formats = {(p.bits, p.group_size, p.zeros is None) for p in (gate, up, down)}
    if ((up.n, up.k, down.n, down.k) != (I, D, D, I) or len(formats) != 1 or I % chunk or chunk % gate.group_size
            or chunk % KT or not 2 <= I // chunk <= MAX_SLOTS):
        raise ValueError(f"dense_mlp_experts: gate [{gate.n}, {gate.k}], up [{up.n}, {up.k}], down [{down.n}, "
                         f"{down.k}] in {len(formats)} format(s), chunks of {chunk} rows: expected one format, "
                         f"down = [D, I], and 2 to {MAX_SLOTS} chunks, each whole groups of {gate.group_size} and "
                         f"k-tiles of {KT}")
    E = I // chunk

    def rows(p: PackedLinear) -> PackedLinear:  # [I, D] -> E x [chunk, D]: row blocks, and scale columns
        per_chunk = lambda t: t.view(t.shape[0], E, chunk).transpose(0, 1).contiguous()
        return PackedLinear(p.qweight.view(E, chunk // ROWS, *p.qweight.shape[1:]), per_chunk(p.scales),
                            None if p.zeros is None else per_chunk(p.zeros),
                            torch.zeros(chunk // ROWS, dtype=torch.int32, device=p.locks.device), chunk, D, p.bits,
                            p.group_size)

    q = down.qweight  # [D_pad / ROWS, I / KT, ROWS, P] -> E x [D_pad / ROWS, chunk / KT, ROWS, P]: k-tiles
    per_chunk = lambda t: t.view(E, chunk // down.group_size, t.shape[-1])  # groups of k, already chunk after chunk
    by_k = PackedLinear(q.view(q.shape[0], E, chunk // KT, *q.shape[2:]).transpose(0, 1).contiguous(),
                        per_chunk(down.scales), None if down.zeros is None else per_chunk(down.zeros), down.locks, D,
                        chunk, down.bits, down.group_size)
    return _experts(rows(gate), rows(up), by_k, E - 1, True)


@triton.jit
def _pair_expert(routed, valid, shared_id, u, offs_t, offs_s, SLOTS: tl.constexpr, TOPK: tl.constexpr,
                 BM: tl.constexpr, BS: tl.constexpr):
    """From the routed ids [BM, BS] (slots past TOPK: the shared expert): (the expert e of pair u; the [BM, BS]
    pairs routed to e; whether pair u is the first of them, the one that serves e)."""
    table = tl.where(valid, tl.where(offs_s[None, :] < TOPK, routed, shared_id), -1)
    pairs = offs_t[:, None] * SLOTS + offs_s[None, :]  # (slots past SLOTS alias the next token's: masked by valid)
    e = tl.sum(tl.where((pairs == u) & valid, table, 0))
    hit = table == e  # top-k ids of a token are distinct: at most one slot per token
    return e, hit, tl.min(tl.where(hit, pairs, BM * BS)) == u


@triton.jit(do_not_specialize=["shared_id"])  # a stack of one routed expert (a dense MLP's two chunks) passes 1
def moe_decode_fwd_kernel(x, ids, wts, wa, wb, sa, sb, za, zb, y, ws, locks, T, n_out, n_pad, n_tiles,
                          tiles_per_group, tiles_per_split, stride_xm, stride_ym, stride_we, stride_se, shared_id,
                          locks_per_row, after, after_bytes, x_sum, AFTER: tl.constexpr, TOPK: tl.constexpr,
                          SLOTS: tl.constexpr, SPLIT_K: tl.constexpr, BITS: tl.constexpr, P: tl.constexpr,
                          ROWS: tl.constexpr, ASYM: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
                          GATED: tl.constexpr, MMA: tl.constexpr, FAST: tl.constexpr, WA: tl.constexpr,
                          PDL: tl.constexpr, PREFETCH: tl.constexpr, RAW: tl.constexpr):
    """One (row block, token-slot pair u, k split) per program. The program of the first pair routed to an expert
    serves every token routed to it, as the rows of one tile (BM >= tokens); the other pairs' programs return at
    once: each weight is read once per launch, without sorting (and without a host sync).
    GATED: h[pair] = silu(x[token] Wg^T) * (x[token] Wu^T), the k splits reduced in-launch (a lock per pair).
    Else: y[token] = sum over slots and k splits of weight * h[pair] Wd^T (one lock per row block, counting pairs).
    PDL, gate+up: the routed experts are known only after the wait; the shared one (every token's, so first taken
    by pair TOPK) is prefetched before it. PDL, down: the ids are read before the wait -- the router wrote them two
    launches back, and the gate+up launch between let this one go only after its own wait, so the router had
    finished; read past L1 (.cg) -- and each serving program prefetches its tile of its expert's weights.
    PREFETCH (with PDL; false when what the launch would prefetch exceeds half the L2): the prefetches, and the down
    launch's early ids; without it both launches read the ids after the wait. AFTER (down, with PREFETCH): the
    programs also prefetch, in shares, the first after_bytes bytes at `after` (a later launch's weights).
    RAW (gate+up, int4 and bf16 x on the tensor cores with the PTX unpack): the codes enter the dots as 128 + code,
    and x_sum [T, n_tiles] (each token's sum of x over each k-tile) takes 128 + zero off after them (_mma_tile)."""
    pid_n = tl.program_id(0)
    u = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    offs_t = tl.arange(0, BM)
    offs_s = tl.arange(0, BS)
    valid = (offs_t[:, None] < T) & (offs_s[None, :] < SLOTS)
    ids_ptrs = ids + offs_t[:, None] * TOPK + offs_s[None, :]
    ids_mask = valid & (offs_s[None, :] < TOPK)
    if PREFETCH and not GATED:
        e, hit, serving = _pair_expert(tl.load(ids_ptrs, mask=ids_mask, other=0, cache_modifier=".cg"), valid,
                                       shared_id, u, offs_t, offs_s, SLOTS, TOPK, BM, BS)
        if serving:
            _prefetch_program(wa + e.to(tl.int64) * stride_we, sa + e.to(tl.int64) * stride_se,
                              za + e.to(tl.int64) * stride_se, pid_n, n_pad, n_tiles, tiles_per_group, t0, t1, BN,
                              ROWS, P, ASYM)
        if AFTER:
            prefetch_share(after, after_bytes, tl.program_id(1) * tl.num_programs(0) + pid_n,
                           tl.num_programs(0) * tl.num_programs(1))
        wait_for_inputs(PDL)
    else:
        if PREFETCH and GATED and SLOTS > TOPK:
            if u == TOPK:
                shared = shared_id.to(tl.int64)
                _prefetch_program(wa + shared * stride_we, sa + shared * stride_se, za + shared * stride_se, pid_n,
                                  n_pad, n_tiles, tiles_per_group, t0, t1, BN, ROWS, P, ASYM)
                _prefetch_program(wb + shared * stride_we, sb + shared * stride_se, zb + shared * stride_se, pid_n,
                                  n_pad, n_tiles, tiles_per_group, t0, t1, BN, ROWS, P, ASYM)
        wait_for_inputs(PDL)
        e, hit, serving = _pair_expert(tl.load(ids_ptrs, mask=ids_mask, other=0), valid, shared_id, u, offs_t,
                                       offs_s, SLOTS, TOPK, BM, BS)
    if serving:
        tok = tl.max(hit.to(tl.int32), axis=1) > 0  # [BM] tokens routed to e
        slot = tl.sum(tl.where(hit, offs_s[None, :], 0), axis=1)  # [BM] and the slot that holds it
        pair = offs_t * SLOTS + slot
        e = e.to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_p = tl.arange(0, P)
        offs_q = tl.arange(0, 2 * P)
        mask_n = offs_n < n_pad
        w_off = e * stride_we + ((offs_n // ROWS).to(tl.int64) * n_tiles * ROWS * P + (offs_n % ROWS) * P)[:, None] \
            + offs_p[None, :]
        s_off = e * stride_se + offs_n
        if GATED:
            x_ptrs = x + offs_t[:, None].to(tl.int64) * stride_xm + offs_q[None, :]  # [BM, 2P]
        else:
            x_ptrs = x + pair[:, None].to(tl.int64) * stride_xm + offs_q[None, :]
        x_mask = tok[:, None]
        if MMA:  # [BN, BM] accumulators when WA (weights as the A operand), [BM, BN] otherwise
            if WA:
                a = tl.zeros([BN, BM], dtype=tl.float32)
            else:
                a = tl.zeros([BM, BN], dtype=tl.float32)
            b = tl.zeros_like(a)
            for t in range(t0, t1):
                g = t // tiles_per_group
                xt = x_ptrs + t * (32 // BITS) * P
                xsum_t = tl.load(x_sum + offs_t * n_tiles + t, mask=tok, other=0.0) if RAW else None
                a += _mma_tile(tl.load(wa + w_off + t * ROWS * P, mask=mask_n[:, None], other=0), xt, x_mask,
                               sa + s_off, za + s_off, mask_n, g, n_pad, BITS, P, ASYM, FAST, WA, xsum_t, RAW)
                if GATED:
                    b += _mma_tile(tl.load(wb + w_off + t * ROWS * P, mask=mask_n[:, None], other=0), xt, x_mask,
                                   sb + s_off, zb + s_off, mask_n, g, n_pad, BITS, P, ASYM, FAST, WA, xsum_t, RAW)
            if WA:
                a = tl.trans(a)
                b = tl.trans(b)
        else:  # CUDA cores, one tile ahead by hand as in int_gemv_fwd_kernel; stream b (up) only when GATED
            acc_a = tl.zeros([BM, BN, 2 * P], dtype=tl.float32)
            acc_b = tl.zeros([BM, BN, 2 * P], dtype=tl.float32)
            wa_t = tl.load(wa + w_off + t0 * ROWS * P, mask=mask_n[:, None], other=0)
            sa_t, za_t = _tile_params(sa + s_off, za + s_off, mask_n, t0 // tiles_per_group, n_pad, BITS, ASYM)
            wb_t, sb_t, zb_t = wa_t, sa_t, za_t
            if GATED:
                wb_t = tl.load(wb + w_off + t0 * ROWS * P, mask=mask_n[:, None], other=0)
                sb_t, zb_t = _tile_params(sb + s_off, zb + s_off, mask_n, t0 // tiles_per_group, n_pad, BITS, ASYM)
            for t in range(t0, t1):
                ahead = offs_n < tl.where(t + 1 < t1, n_pad, 0)  # no rows on the last tile
                g = (t + 1) // tiles_per_group
                xt = x_ptrs + t * (32 // BITS) * P
                wa_n = tl.load(wa + w_off + (t + 1) * ROWS * P, mask=ahead[:, None], other=0)
                sa_n, za_n = _tile_params(sa + s_off, za + s_off, ahead, g, n_pad, BITS, ASYM)
                acc_a += _fma_tile(wa_t, xt, x_mask, sa_t, za_t, BITS, P)
                wa_t, sa_t, za_t = wa_n, sa_n, za_n
                if GATED:
                    wb_n = tl.load(wb + w_off + (t + 1) * ROWS * P, mask=ahead[:, None], other=0)
                    sb_n, zb_n = _tile_params(sb + s_off, zb + s_off, ahead, g, n_pad, BITS, ASYM)
                    acc_b += _fma_tile(wb_t, xt, x_mask, sb_t, zb_t, BITS, P)
                    wb_t, sb_t, zb_t = wb_n, sb_n, zb_n
            a = tl.sum(acc_a, axis=2)  # [BM, BN]
            b = tl.sum(acc_b, axis=2)
        mask_o = (offs_n < n_out)[None, :]
        if GATED:
            mask = tok[:, None] & mask_o
            h_ptrs = y + pair[:, None] * stride_ym + offs_n[None, :]
            if SPLIT_K == 1:
                tl.store(h_ptrs, (a * tl.sigmoid(a) * b).to(y.dtype.element_ty), mask=mask)
            else:  # ws: [2, SPLIT_K, T * SLOTS, n_out]; the splits of one expert's program share a lock
                stride = T * SLOTS * n_out
                ws_a = ws + pair[:, None] * n_out + offs_n[None, :]
                tl.store(ws_a + split * stride, a, mask=mask)
                tl.store(ws_a + (SPLIT_K + split) * stride, b, mask=mask)
                lock = locks + u * locks_per_row + pid_n
                if _arrive(lock, 1, SPLIT_K):
                    a = _sum_partials(ws_a, mask, SPLIT_K, stride)
                    b = _sum_partials(ws_a + SPLIT_K * stride, mask, SPLIT_K, stride)
                    tl.store(h_ptrs, (a * tl.sigmoid(a) * b).to(y.dtype.element_ty), mask=mask)
                    tl.atomic_xchg(lock, 0)
        else:  # ws: [SLOTS * SPLIT_K, T, n_out]: every (slot, split) of a token parks one weighted partial
            wt = tl.load(wts + offs_t * TOPK + tl.minimum(slot, TOPK - 1), mask=tok, other=0.0).to(tl.float32)
            wt = tl.where(slot < TOPK, wt, 1.0)
            stride = T * n_out
            ws_t = ws + offs_t[:, None] * n_out + offs_n[None, :]
            tl.store(ws_t + (slot[:, None] * SPLIT_K + split) * stride, a * wt[:, None], mask=tok[:, None] & mask_o)
            lock = locks + pid_n
            # the program that brings the last of the T * SLOTS * SPLIT_K partials sums every token's
            if _arrive(lock, tl.sum(tok.to(tl.int32)), T * SLOTS * SPLIT_K):
                mask = (offs_t < T)[:, None] & mask_o
                total = _sum_partials(ws_t, mask, SLOTS * SPLIT_K, stride)
                tl.store(y + offs_t[:, None] * stride_ym + offs_n[None, :], total.to(y.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock, 0)


@triton.jit
def moe_gemm_fwd_kernel(x, pair_ids, block_expert, wts, wa, wb, sa, sb, za, zb, y, n_blocks, n_out, n_pad, n_tiles,
                        tiles_per_group, stride_xm, stride_ym, stride_we, stride_se, x_div, BITS: tl.constexpr,
                        P: tl.constexpr, ROWS: tl.constexpr, ASYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        GATED: tl.constexpr, FAST: tl.constexpr, WA: tl.constexpr):
    """One (block of BM pairs of one expert, column tile) per program, the blocks of a column tile consecutive (an
    expert's blocks meet its weight tile in L2); x row of a pair = pair // x_div. Each weight tile is dequantized
    in registers right before its dots (int_gemm_fwd_kernel's loop). GATED: y[pair] = silu(x Wg^T) * (x Wu^T),
    both from the same x tiles. Else: y[pair] = weight[pair] * x Wd^T."""
    pid_b = tl.program_id(0) % n_blocks
    pid_n = tl.program_id(0) // n_blocks
    e = tl.load(block_expert + pid_b).to(tl.int64)
    if e >= 0:
        pairs = tl.load(pair_ids + pid_b * BM + tl.arange(0, BM))
        mask_m = pairs >= 0
        rows = tl.where(mask_m, pairs // x_div, 0).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < n_pad
        w_off = e * stride_we + ((offs_n // ROWS).to(tl.int64) * n_tiles * ROWS * P + (offs_n % ROWS) * P)[:, None] \
            + tl.arange(0, P)[None, :]
        s_off = e * stride_se + offs_n
        x_ptrs = x + rows[:, None] * stride_xm + tl.arange(0, 2 * P)[None, :]
        DT: tl.constexpr = x.dtype.element_ty
        CT: tl.constexpr = DT if FAST else tl.float32  # _group_params' dtype
        if WA:
            acc_a = tl.zeros([BN, BM], dtype=tl.float32)
        else:
            acc_a = tl.zeros([BM, BN], dtype=tl.float32)
        acc_b = tl.zeros_like(acc_a)
        for t in range(n_tiles):
            g = t // tiles_per_group
            w_a = tl.load(wa + w_off + t * ROWS * P, mask=mask_n[:, None], other=0)
            sc_a, zc_a = _group_params(sa + s_off, za + s_off, mask_n, g, n_pad, BITS, ASYM, CT)
            w_b, sc_b, zc_b = w_a, sc_a, zc_a
            if GATED:
                w_b = tl.load(wb + w_off + t * ROWS * P, mask=mask_n[:, None], other=0)
                sc_b, zc_b = _group_params(sb + s_off, zb + s_off, mask_n, g, n_pad, BITS, ASYM, CT)
            for i in tl.static_range(16 // BITS):
                xi = tl.load(x_ptrs + t * (32 // BITS) * P + i * 2 * P, mask=mask_m[:, None], other=0.0)
                acc_a = _dot_w(acc_a, xi, _dequant_pair(w_a, i, sc_a, zc_a, BITS, ASYM, FAST, DT), WA)
                if GATED:
                    acc_b = _dot_w(acc_b, xi, _dequant_pair(w_b, i, sc_b, zc_b, BITS, ASYM, FAST, DT), WA)
        if WA:
            acc_a = tl.trans(acc_a)
            acc_b = tl.trans(acc_b)
        if GATED:
            out = acc_a * tl.sigmoid(acc_a) * acc_b
        else:
            out = acc_a * tl.load(wts + pairs, mask=mask_m, other=0.0)[:, None]
        mask = mask_m[:, None] & (offs_n < n_out)[None, :]
        tl.store(y + pairs[:, None].to(tl.int64) * stride_ym + offs_n[None, :], out.to(y.dtype.element_ty), mask=mask)


def _args(p: PackedLinear):
    return p.qweight, p.scales, (p.zeros if p.zeros is not None else p.scales)


def moe_decode_fwd(x, topk_ids, topk_weights, experts: PackedExperts, y, *, mma=None, block_n=None, split_k=None,
                   num_warps=None, num_stages=3, fast=None, weights_as_a=True, after=None, x_sums=None, raw=None):
    """Two launches: gate+up+SiLU into h [T * slots, I], then down with the weighted sum over slots; each routed
    expert's weights are read once for all the tokens routed to it. mma: tensor cores (x and h in 16 bits; the
    default for 16-bit x from MOE_CROSSOVER) or CUDA cores (exact fp32 h). split_k: k splits of (gate+up, down),
    each reduced inside its launch; block_n, split_k and num_warps default by token count (MOE_DECODE_LAUNCH).
    weights_as_a: the weight tile is the MMA's A operand (on Hopper a register-A wgmma; 64 rows of block_n a
    warpgroup: 64 with 4 warps, 128 with 8). With PDL each launch prefetches (gate+up: the shared expert; down: every
    pair's expert) while that fits in half the L2 (pdl.prefetch_fits): at 16 tokens the down launch's ~100 experts
    do not. after: a weight a later launch reads (the next layer's input projection), which the down launch's
    programs also prefetch while the two together fit in half the L2 (one token at the 48B's shapes: 11 + 14 MB).
    x_sums: each token's sum of x (bf16, as given) over each k-tile of KT inputs, fp32 [T, K / KT] (what the fused
    router writes beside h): for int4 on the tensor cores with the PTX unpack the gate+up launch then unpacks a pair
    of codes in one LOP3 and takes the offset off through these sums (RAW), where its launch says so (default) or
    `raw`."""
    T, topk = topk_ids.shape
    slots = topk + experts.has_shared
    if slots > MAX_SLOTS or T > DECODE_MAX_TOKENS:
        raise ValueError(f"moe_decode_fwd: {T} tokens x {slots} experts; the decode path takes at most "
                         f"{DECODE_MAX_TOKENS} x {MAX_SLOTS}")
    g, u, d = experts.gate, experts.up, experts.down
    if mma is None:
        mma = moe_kernel(T, g.bits, x.dtype) == "mma"
    launch = decode_launch("mma" if mma else "fma", T)
    split_k = split_k or launch[1]
    block_n, num_warps = block_n or launch[0], num_warps or launch[2]
    fast = mma and (fast_unpack(g.bits, x.device) if fast is None else fast)
    raw = x_sums is not None and _raw_unpack(launch[3] if raw is None else raw, fast, g.bits, x.dtype)
    if raw and (tuple(x_sums.shape) != (T, g.k // KT) or x_sums.dtype != torch.float32 or not x_sums.is_contiguous()):
        raise ValueError(f"moe_decode_fwd: x_sums {x_sums.dtype} {list(x_sums.shape)}, expected contiguous fp32 "
                         f"{[T, g.k // KT]}")
    if mma and x.dtype not in (torch.bfloat16, torch.float16):
        x = x.to(torch.bfloat16)
    (wg, sg, zg), (wu, su, zu), (wd, sd, zd) = _args(g), _args(u), _args(d)
    pdl = use_pdl(x.device)
    common = dict(TOPK=topk, SLOTS=slots, BITS=g.bits, P=KT * g.bits // 32, ROWS=ROWS, ASYM=g.zeros is not None,
                  BM=max(MMA_M, triton.next_power_of_2(T)) if mma else triton.next_power_of_2(T),
                  BS=triton.next_power_of_2(slots), BN=block_n, MMA=mma,
                  FAST=fast, WA=mma and weights_as_a,
                  PDL=pdl, launch_pdl=pdl, num_warps=num_warps, num_stages=num_stages)
    h = torch.empty(T * slots, g.n, device=x.device, dtype=x.dtype if mma else torch.float32)
    per_expert = lambda p: packed_bytes(p) // p.qweight.shape[0]
    down_bytes = min(T * slots, d.qweight.shape[0]) * per_expert(d)
    prefetch = [pdl and prefetch_fits(x.device, n) for n in (2 * per_expert(g) * experts.has_shared, down_bytes)]
    ahead = after is not None and prefetch[1] and prefetch_fits(x.device, down_bytes + after.nbytes)
    tiles = g.k // KT
    per_split = triton.cdiv(tiles, min(split_k[0], tiles))
    split = triton.cdiv(tiles, per_split)
    ws = torch.empty(2 * split * T * slots * g.n if split > 1 else 1, device=x.device, dtype=torch.float32)
    moe_decode_fwd_kernel[(triton.cdiv(g.n, block_n), T * slots * split)](
        x, topk_ids, topk_weights, wg, wu, sg, su, zg, zu, h, ws, g.locks, T, g.n, sg.shape[-1], tiles,
        g.group_size // KT, per_split, x.stride(0), h.stride(0), wg.stride(0), sg.stride(0), experts.num_experts,
        g.locks.shape[1], x, 0, x_sums if raw else x, AFTER=False, SPLIT_K=split, GATED=True,
        PREFETCH=prefetch[0], RAW=raw, **common)
    tiles = d.k // KT
    per_split = triton.cdiv(tiles, min(split_k[1], tiles))
    split = triton.cdiv(tiles, per_split)
    ws = torch.empty(slots * split * T * d.n, device=x.device, dtype=torch.float32)
    moe_decode_fwd_kernel[(triton.cdiv(d.n, block_n), T * slots * split)](
        h, topk_ids, topk_weights, wd, wd, sd, sd, zd, zd, y, ws, d.locks, T, d.n, sd.shape[-1], tiles,
        d.group_size // KT, per_split, h.stride(0), y.stride(0), wd.stride(0), sd.stride(0), experts.num_experts,
        0, after if ahead else x, after.nbytes if ahead else 0, x, AFTER=ahead, SPLIT_K=split, GATED=False,
        PREFETCH=prefetch[1], RAW=False, **common)
    return y


def _raw_unpack(asked: bool, fast: bool, bits: int, dtype: torch.dtype) -> bool:
    """Whether the gate+up launch takes the RAW unpack: asked (or its launch's default), and int4 with the PTX unpack
    on bf16 x, the one form built."""
    return bool(asked and fast and bits == 4 and dtype == torch.bfloat16)


def takes_x_sums(experts: PackedExperts, x: torch.Tensor) -> bool:
    """Whether fused_moe on x [T, K] (its defaults) runs the RAW unpack, so x's k-tile sums are worth writing (the
    fused router writes them beside h when the experts ask: FusedExperts.sums_buffer)."""
    T, bits = x.shape[0], experts.gate.bits
    return moe_kernel(T, bits, x.dtype) == "mma" and _raw_unpack(decode_launch("mma", T)[3],
                                                                 fast_unpack(bits, x.device), bits, x.dtype)


def decode_launch(kind: str, tokens: int) -> tuple[int, tuple[int, int], int, bool]:
    """moe_decode_fwd's default (block_n, split_k, num_warps, raw) on "fma" or "mma" for this many tokens."""
    return next(launch for bound, launch in MOE_DECODE_LAUNCH[kind] if tokens <= bound)


def moe_kernel(tokens: int, bits: int, dtype: torch.dtype) -> str:
    """"fma" or "mma" (the decode kernels on CUDA or tensor cores) or "grouped" for this many tokens, from
    MOE_CROSSOVER; fp32 x takes the exact CUDA-core decode kernels as far as they go."""
    fma_max, mma_max = MOE_CROSSOVER[bits]
    if tokens <= fma_max or (dtype == torch.float32 and tokens <= DECODE_MAX_TOKENS):
        return "fma"
    return "mma" if tokens <= min(mma_max, DECODE_MAX_TOKENS) else "grouped"


def align_pairs(ids: torch.Tensor, num_ids: int, block_m: int):
    """Sort (token, slot) pairs [M, slots] by expert, each expert's run padded to a multiple of block_m:
    (pair index per row, -1 for padding) and (expert per block, -1 past the end). No host sync: the block count is
    the bound cdiv(pairs, block_m) + num_ids (each expert adds at most one partial block)."""
    flat = ids.reshape(-1)
    n = flat.numel()
    counts = torch.zeros(num_ids, device=ids.device, dtype=torch.int64).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    rank = torch.arange(n, device=ids.device) - (counts.cumsum(0) - counts)[sorted_ids]
    n_blocks = triton.cdiv(n, block_m) + num_ids
    pair_ids = torch.full((n_blocks * block_m,), -1, device=ids.device, dtype=torch.int32)
    pair_ids[(ends - padded)[sorted_ids] + rank] = order.to(torch.int32)
    starts = torch.arange(n_blocks, device=ids.device) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True)
    return pair_ids, torch.where(block_expert < num_ids, block_expert, -1).to(torch.int32)


def prefill_launch(tokens: int) -> tuple[int, int, int, int, bool]:
    """moe_grouped_fwd's default (block_m, block_n, num_warps, num_stages, weights_as_a) for this many tokens."""
    return next(launch for bound, launch in MOE_PREFILL_LAUNCH if tokens <= bound)


def moe_grouped_fwd(x, topk_ids, topk_weights, experts: PackedExperts, y, *, block_m=None, block_n=None,
                    num_warps=None, num_stages=None, fast=None, weights_as_a=None):
    """Prefill: (token, slot) pairs sorted by expert on the device (no host sync), one grouped GEMM launch for
    gate+up+SiLU and one for down with the routing weight, then the sum over slots (the shared expert is one more
    slot, weight 1). x and the intermediates in 16 bits. Launch defaults from MOE_PREFILL_LAUNCH by token count.
    weights_as_a: the weight tile is the MMA's A operand (on Hopper a wgmma reading it from registers)."""
    M, topk = topk_ids.shape
    g, u, d = experts.gate, experts.up, experts.down
    ids, wts = topk_ids.to(torch.int64), topk_weights.to(torch.float32)
    if experts.has_shared:
        ids = torch.cat([ids, ids.new_full((M, 1), experts.num_experts)], 1)
        wts = torch.cat([wts, wts.new_ones(M, 1)], 1)
    slots = ids.shape[1]
    bm, bn, warps, stages, wa = prefill_launch(M)
    block_m, block_n = block_m or bm, block_n or bn
    pair_ids, block_expert = align_pairs(ids, g.qweight.shape[0], block_m)
    x16 = x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)
    h = torch.empty(M * slots, g.n, device=x.device, dtype=x16.dtype)
    out = torch.empty(M * slots, d.n, device=x.device, dtype=x16.dtype)
    n_blocks = block_expert.shape[0]
    common = dict(BITS=g.bits, P=KT * g.bits // 32, ROWS=ROWS, ASYM=g.zeros is not None, BM=block_m, BN=block_n,
                  FAST=fast_unpack(g.bits, x.device) if fast is None else fast,
                  WA=wa if weights_as_a is None else weights_as_a, num_warps=num_warps or warps,
                  num_stages=num_stages or stages)
    (wg, sg, zg), (wu, su, zu), (wd, sd, zd) = _args(g), _args(u), _args(d)
    moe_gemm_fwd_kernel[(n_blocks * triton.cdiv(g.n, block_n),)](
        x16, pair_ids, block_expert, wts, wg, wu, sg, su, zg, zu, h, n_blocks, g.n, sg.shape[-1], g.k // KT,
        g.group_size // KT, x16.stride(0), h.stride(0), wg.stride(0), sg.stride(0), slots, GATED=True, **common)
    moe_gemm_fwd_kernel[(n_blocks * triton.cdiv(d.n, block_n),)](
        h, pair_ids, block_expert, wts, wd, wd, sd, sd, zd, zd, out, n_blocks, d.n, sd.shape[-1], d.k // KT,
        d.group_size // KT, h.stride(0), out.stride(0), wd.stride(0), sd.stride(0), 1, GATED=False, **common)
    return y.copy_(out.view(M, slots, d.n).sum(1, dtype=torch.float32))


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: PackedExperts, *,
              out: torch.Tensor | None = None, after: torch.Tensor | None = None,
              x_sums: torch.Tensor | None = None) -> torch.Tensor:
    """sum_slot w * down(silu(gate x) * up x) over the top-k experts [M, topk], plus the shared expert (weight 1)
    if packed; x [M, D] (bf16, fp16 or fp32), topk_weights fp32; returns [M, D] in x.dtype. after: a weight a later
    launch reads, prefetched into L2 by the decode path; x_sums: x's k-tile sums for its RAW unpack
    (moe_decode_fwd)."""
    M, D = x.shape
    if D != experts.gate.k or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != M:
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, topk_ids {tuple(topk_ids.shape)}, topk_weights "
                         f"{tuple(topk_weights.shape)} for experts of hidden size {experts.gate.k}")
    y = out if out is not None else torch.empty_like(x)
    if M == 0:
        return y
    x = x if x.stride(-1) == 1 else x.contiguous()
    kind = moe_kernel(M, experts.gate.bits, x.dtype)
    if kind == "grouped":
        return moe_grouped_fwd(x, topk_ids, topk_weights, experts, y)
    return moe_decode_fwd(x, topk_ids.contiguous(), topk_weights.to(torch.float32).contiguous(), experts, y,
                          mma=kind == "mma", after=after, x_sums=x_sums)
