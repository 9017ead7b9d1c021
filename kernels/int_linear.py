"""Weight-only int4/int8 linear (W4A16, W8A16): repack compressed-tensors weights once, then, by the row count
(CROSSOVER): a CUDA-core GEMV, a tensor-core GEMV (one 16-row block, split-K), a tiled tensor-core GEMM that
dequantizes the weight tile in registers, or (prefill) the weight dequantized to 16 bits in a bounded workspace and
cuBLAS."""
import torch
import triton
import triton.language as tl

from .int_layout import KT, ROWS, PackedLinear, padded_rows
from .pdl import prefetch_fits, prefetch_runs, use_pdl, wait_for_inputs
from .sm_count import sm_count

MMA_M = 16  # the tensor-core kernels pad x to blocks of at least this many rows (the smallest tl.dot M)
MMA_BLOCK_M = 64  # int_mma_fwd's largest row block: up to this many rows are one block (split-K, a dense tail)
LARGE_WEIGHT = 1 << 26  # weights from which a linear is "large" (the lm_head; it fills the GPU without split-K)
# Kernel per row count M of x, by (bits, "large" or "small" weight), bounds (fma, mma, gemm): M <= fma -> CUDA-core
# GEMV (int_gemv_fwd), M <= mma -> tensor-core kernel (int_mma_fwd: split-K while x is one row block, else plain
# tiles), M <= gemm -> tiled GEMM dequantizing in registers (int_gemm_fwd), past all three -> dequantize + cuBLAS
# (int_dequant_mm). Measured on an H200 (2026-11-29): the decode bounds by `python bench/kernels.py --only int4`,
# the prefill ones by `--only int_prefill` (q,k,v 12288x2304 + o_proj 2304x4096 summed, 32-4096 rows): int4 int_mma_fwd
# to 64 rows, int8 to 128 (int_gemm_fwd led int8 at 64 only), dequantize + cuBLAS past that (at 4096 rows 94% of
# torch's bf16 matmul); int_gemm_fwd wins no range (on q,k,v alone it led int4 at 32 rows; o_proj has too few column
# tiles for it). The large (lm_head) weights were not swept at prefill and keep int_mma_fwd at every row count, as
# before. (8, "small")'s fma bound, measured on an H200 (2026-11-30, the int8 o_proj 2304x4096, CUDA graphs, a
# scratch script; `--only int4` now sweeps that shape in int8 too): 1 row CUDA-core GEMV 7.31 us against
# int_mma_fwd's 8.14, 2 rows 11.08 against 8.15 (int_mma_fwd on 64 rows, 4 warps).
CROSSOVER = {(4, "large"): (0, 1 << 30, 1 << 30), (4, "small"): (0, 64, 64), (8, "large"): (0, 1 << 30, 1 << 30),
             (8, "small"): (1, 128, 128)}
FMA_MAX_M = 16  # the CUDA-core GEMV keeps a [M, BN, 2P] accumulator; fp32 x takes it up to here (exact fp32)
# int_gemm_fwd's launch (block_m, block_n, num_warps, num_stages) by row count: the first entry whose bound >= M.
GEMM_LAUNCH = ((64, (64, 64, 4, 3)), (1 << 62, (128, 128, 8, 3)))
# int_mma_fwd's (block_n, num_warps) for x of one MMA_M-row block on a small int4 weight (decode); every other case,
# int8 included (not timed so), takes (64, 4). 32 weight rows on 2 warps run on mma.sync (a wgmma needs 64 rows):
# no warpgroup fence, commit and wait per pair of slots. Measured on an H200 (2026-11-30, CUDA graphs of 32, weights
# rotated; BENCHMARKS.md, tenth decode round) against (64, 4): 1 row q,k,v 10.75 us against 11.27, o_proj 5.98
# against 5.75, expert down 3.96 / 4.07, gate+up 4.96 / 4.72; 16 rows q,k,v 13.1 / 13.2, o_proj 6.49 / 6.80; the
# 27-layer decode step at 4K 1.779 ms against 1.857.
MMA_DECODE_LAUNCH = (32, 2)
REPACK_ROWS = 4096  # rows repacked at a time (a multiple of ROWS): ~0.3 GB of temporaries at K = 2304 (the 48B's
# lm_head repacked in one piece took ~7 GB more than it packs to: the whole model's peak while binding, on an H200)
DEQUANT_WORKSPACE = 64 << 20  # bytes of 16-bit weight int_dequant_mm dequantizes at a time (q,k,v stacked: 54 MiB)


def unpack_int32_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' int32 packing (value i of a row at bits [i*bits, (i+1)*bits), offset 2**(bits-1)) ->
    unsigned codes [..., count]."""
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)[..., :count]


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N_pad, K] -> qweight [N_pad/ROWS, K/KT, ROWS, P] int32 in PackedLinear's slot order."""
    n, k = codes.shape
    half, p = 16 // bits, KT * bits // 32
    c = codes.to(torch.int64).reshape(n // ROWS, ROWS, k // KT, half, p, 2)  # k = t*KT + i*2P + 2p + b
    c = c.permute(0, 2, 1, 4, 5, 3).reshape(n // ROWS, k // KT, ROWS, p, 2 * half)  # slot s = b*half + i
    words = (c << torch.arange(0, 32, bits, device=codes.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def repack_int_weight(weight_packed, weight_scale, weight_zero_point, weight_shape, bits, group_size) -> PackedLinear:
    """Repack one compressed-tensors `pack-quantized` linear (int4 or int8, group or channel) into the kernel layout."""
    n, k = (int(d) for d in weight_shape)
    group_size = group_size or k  # channel strategy: one group spans the row
    where = f"weight [{n}, {k}], {bits}-bit, group {group_size}"
    if bits not in (4, 8):
        raise ValueError(f"{where}: only 4- and 8-bit codes are supported")
    if k % group_size or group_size % KT:
        raise ValueError(f"{where}: the group size must divide K and be a multiple of {KT} (the kernel's k-tile)")
    if tuple(weight_packed.shape) != (n, k * bits // 32) or weight_packed.dtype != torch.int32:
        raise ValueError(f"{where}: weight_packed is {weight_packed.dtype} {tuple(weight_packed.shape)}, "
                         f"expected int32 {(n, k * bits // 32)}")
    if tuple(weight_scale.shape) != (n, k // group_size):
        raise ValueError(f"{where}: weight_scale is {tuple(weight_scale.shape)}, expected {(n, k // group_size)}")
    n_pad = padded_rows(n)
    qweight = torch.empty(n_pad // ROWS, k // KT, ROWS, KT * bits // 32, dtype=torch.int32, device=weight_packed.device)
    for r0 in range(0, n_pad, REPACK_ROWS):  # a slice of rows at a time: the int64 temporaries stay small
        r1 = min(r0 + REPACK_ROWS, n_pad)
        codes = unpack_int32_codes(weight_packed[r0:r1], bits, k)
        qweight[r0 // ROWS:r1 // ROWS] = _pack_words(torch.nn.functional.pad(codes, (0, 0, 0, r1 - r0 - len(codes))),
                                                     bits)
    scales = torch.nn.functional.pad(weight_scale, (0, 0, 0, n_pad - n)).t().contiguous()
    zeros = None
    if weight_zero_point is not None:
        if weight_zero_point.dtype == torch.int32:  # packed along the output dim, as compressed-tensors writes it
            zp = unpack_int32_codes(weight_zero_point.t(), bits, n).t()
        else:  # unpacked signed zero points [N, K/group]
            zp = weight_zero_point.to(torch.int32) + (1 << (bits - 1))
        # as wide as the scales, which the kernels read beside them (int_layout.held_bytes sizes them so)
        zeros = torch.nn.functional.pad(zp, (0, 0, 0, n_pad - n)).t().to(scales.dtype).contiguous()
    locks = torch.zeros(n_pad // ROWS, dtype=torch.int32, device=weight_packed.device)
    return PackedLinear(qweight, scales, zeros, locks, n, k, bits, group_size)


def concat_packed_linears(parts: list[PackedLinear]) -> PackedLinear:
    """Stack linears that read the same input into one (rows in the given order): y = x @ [W_0; W_1; ...].T.
    Each part's rows must fill whole ROWS blocks, so no padding lands between them."""
    first = parts[0]
    for p in parts:
        layout = (p.k, p.bits, p.group_size, p.zeros is None)
        if layout != (first.k, first.bits, first.group_size, first.zeros is None) \
                or p.n % ROWS:
            raise ValueError(f"concat_packed_linears: [{p.n}, {p.k}] {p.bits}-bit group {p.group_size} does not stack "
                             f"with [{first.n}, {first.k}] {first.bits}-bit group {first.group_size} "
                             f"(rows must be a multiple of {ROWS}, and K, bits, group and symmetry equal)")
    n = sum(p.n for p in parts)
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts], dim=1)
    return PackedLinear(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts], dim=1), zeros,
                        torch.zeros(n // ROWS, dtype=torch.int32, device=first.qweight.device), n, first.k,
                        first.bits, first.group_size)


@triton.jit
def _unpack(w, j: tl.constexpr, BITS: tl.constexpr):
    """Code of slot j as the exact float 1 + code / 2**BITS: the code is moved into the top mantissa bits of 1.0."""
    if 23 - BITS - BITS * j >= 0:
        t = w << (23 - BITS - BITS * j)
    else:
        t = w >> (BITS * j + BITS - 23)
    return ((t & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _pair_f32(w, i: tl.constexpr, BITS: tl.constexpr):
    """Pair i of words w [BN, P] (slots i and i + 16/BITS: inputs i*2P + 2p + b) as floats 1 + code / 2**BITS,
    [BN, 2P]."""
    pair = tl.join(_unpack(w, i, BITS), _unpack(w, i + 16 // BITS, BITS))  # [BN, P, 2]
    return tl.reshape(pair, [w.shape[0], 2 * w.shape[1]])


@triton.jit
def _pair_centred(w, i: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """Pair i of words w [BN, P] as codes minus 2**(BITS-1) in DT (exact in bf16 and fp16), [BN, P, 2]; any GPU,
    and the CPU interpreter."""
    lo = (w >> (BITS * i)) & ((1 << BITS) - 1)
    hi = (w >> (BITS * i + 16)) & ((1 << BITS) - 1)
    return (tl.join(lo, hi) - (1 << (BITS - 1))).to(tl.float32).to(DT)  # exact either way; via fp32 for the interpreter


@triton.jit
def _int4_pair_asm(w, FP16: tl.constexpr):
    """Slots 0 and 4 of int4 words w [BN, P] (pair i: pass w >> 4 i) as codes minus 8 in bf16 (fp16 if FP16),
    [BN, P, 2]: one LOP3 puts both nibbles under the exponent of 128.0 (1024.0), one packed FMA subtracts 136
    (1032) -- with the shift 1.5 instructions a weight, against ~4 for shift, mask, convert, subtract per value.
    CUDA only (PTX)."""
    ww = tl.join(w, w)  # pack=2 hands each asm call a register pair [word, copy]; the copy is never read
    if FP16:
        out = tl.inline_asm_elementwise(
            """{
            .reg .b32 t, one, bias;
            mov.b32 one, 0x3C003C00;
            mov.b32 bias, 0xE408E408;
            lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xEA;
            fma.rn.f16x2 $0, t, one, bias;
            }""", "=r,r,r", [ww], dtype=tl.float16, is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise(
            """{
            .reg .b32 t, one, bias;
            mov.b32 one, 0x3F803F80;
            mov.b32 bias, 0xC308C308;
            lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xEA;
            fma.rn.bf16x2 $0, t, one, bias;
            }""", "=r,r,r", [ww], dtype=tl.bfloat16, is_pure=True, pack=2)
    return out


@triton.jit
def _int4_pair_raw_asm(w):
    """_int4_pair_asm's bf16 form without its subtraction: slots 0 and 4 of int4 words w [BN, P] as 128 + code in
    bf16, [BN, P, 2] -- one LOP3 a pair. The caller takes 128 + the zero point off after the dot (_mma_tile). CUDA
    only (PTX)."""
    ww = tl.join(w, w)
    return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xEA;", "=r,r,r", [ww],
                                     dtype=tl.bfloat16, is_pure=True, pack=2)


def _int8_pair_ptx(fp16: bool, i: int) -> str:
    """_int8_pair_asm's PTX for pair i (bytes i and i + 2 of the word $1) into $0."""
    if fp16:
        return f"""{{
                .reg .b32 t, magic, bias;
                mov.b32 magic, 0x64646464;
                mov.b32 bias, 0x64806480;
                prmt.b32 t, $1, magic, 0x4{2 + i}4{i};
                sub.f16x2 $0, t, bias;
                }}"""
    return f"""{{
                .reg .b32 lo, hi, magic;
                mov.b32 magic, 0x4B000000;
                prmt.b32 lo, $1, magic, 0x754{i};
                prmt.b32 hi, $1, magic, 0x754{2 + i};
                sub.f32 lo, lo, 0f4B000080;
                sub.f32 hi, hi, 0f4B000080;
                cvt.rn.bf16x2.f32 $0, hi, lo;
                }}"""


_INT8_PAIR_PTX = tl.constexpr(tuple(_int8_pair_ptx(fp16, i) for fp16 in (False, True) for i in (0, 1)))


@triton.jit
def _int8_pair_asm(w, i: tl.constexpr, FP16: tl.constexpr):
    """Bytes i and i + 2 of int8 words w [BN, P] (pair i) as codes minus 128 in bf16 (fp16 if FP16), [BN, P, 2].
    bf16, whose 8-bit significand cannot hold 2**k + code: one PRMT per value builds the fp32 2**23 + code, one FSUB
    takes 2**23 + 128 off (exact), one CVT rounds the pair to bf16x2 (exact: |code - 128| <= 128) -- 2.5
    instructions a weight, against ~5 for shift, mask, subtract and two conversions. fp16: one PRMT puts both bytes
    under the exponent of 1024.0, one packed SUB takes 1152 off. CUDA only (PTX)."""
    ww = tl.join(w, w)  # pack=2 hands each asm call a register pair [word, copy]; the copy is never read
    if FP16:
        out = tl.inline_asm_elementwise(_INT8_PAIR_PTX[2 + i], "=r,r,r", [ww], dtype=tl.float16, is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise(_INT8_PAIR_PTX[i], "=r,r,r", [ww], dtype=tl.bfloat16, is_pure=True, pack=2)
    return out


@triton.jit
def _codes(w, i: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, FAST: tl.constexpr):
    """Pair i of words w [BN, P] as codes minus 2**(BITS-1), [BN, P, 2]: in DT, or with the PTX unpack (FAST: int4
    or int8 on CUDA) in x's 16-bit dtype DT."""
    if FAST:
        if BITS == 4:
            c = _int4_pair_asm(w >> (4 * i), DT == tl.float16)
        else:
            c = _int8_pair_asm(w, i, DT == tl.float16)
    else:
        c = _pair_centred(w, i, BITS, DT)
    return c


@triton.jit
def _tile_params(s_ptrs, z_ptrs, mask_n, g, n_pad, BITS: tl.constexpr, ASYM: tl.constexpr):
    """Scale and 2**BITS + zero of k-group g for a block of rows."""
    s = tl.load(s_ptrs + g * n_pad, mask=mask_n, other=0.0).to(tl.float32)
    if ASYM:
        zz = tl.load(z_ptrs + g * n_pad, mask=mask_n, other=0.0).to(tl.float32) + (1 << BITS)
    else:
        zz = tl.zeros_like(s) + ((1 << BITS) + (1 << (BITS - 1)))
    return s, zz


@triton.jit
def _fma_tile(w, x_ptrs, x_mask, s, zz, BITS: tl.constexpr, P: tl.constexpr):
    """One k-tile on the CUDA cores: s * sum_k x_k (code_k - zero), still split over the 2P inputs of a pair:
    [BM, BN, 2P]. x_ptrs [BM, 2P] point at pair 0's inputs."""
    xs = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)
    dot = xs[:, None, :] * _pair_f32(w, 0, BITS)[None, :, :]
    for i in tl.static_range(1, 16 // BITS):
        xi = tl.load(x_ptrs + i * 2 * P, mask=x_mask, other=0.0).to(tl.float32)
        xs += xi
        dot += xi[:, None, :] * _pair_f32(w, i, BITS)[None, :, :]
    # sum x (1 + c / 2**B) = xs + sum x c / 2**B, so sum x (c - z) = 2**B dot - (2**B + z) xs
    return s[None, :, None] * (dot * (1 << BITS) - zz[None, :, None] * xs[:, None, :])


@triton.jit
def _fma_tile_row(w, x_ptrs, s, zz, BITS: tl.constexpr, P: tl.constexpr):
    """_fma_tile for a single row of x (x_ptrs [2P]): [BN, 2P]."""
    xs = tl.load(x_ptrs).to(tl.float32)
    dot = xs[None, :] * _pair_f32(w, 0, BITS)
    for i in tl.static_range(1, 16 // BITS):
        xi = tl.load(x_ptrs + i * 2 * P).to(tl.float32)
        xs += xi
        dot += xi[None, :] * _pair_f32(w, i, BITS)
    return s[:, None] * (dot * (1 << BITS) - zz[:, None] * xs[None, :])


@triton.jit
def _dot_pair(acc, xs, x_ptrs, x_mask, c, ASYM: tl.constexpr, WA: tl.constexpr):
    """acc += x_pair [BM, 2P] @ c [BN, P, 2]^T on the tensor cores ([BN, BM] += c @ x_pair^T when WA: the weights
    as the A operand); xs += the row sums of x_pair when ASYM."""
    xi = tl.load(x_ptrs, mask=x_mask, other=0.0)
    wt = tl.reshape(c, [c.shape[0], 2 * c.shape[1]])  # [BN, 2P]
    if WA:
        acc = tl.dot(wt, tl.trans(xi), acc)
    else:
        acc = tl.dot(xi, tl.trans(wt), acc)
    if ASYM:
        xs += tl.sum(xi.to(tl.float32), axis=1)
    return acc, xs


@triton.jit
def _mma_tile(w, x_ptrs, x_mask, s_ptrs, z_ptrs, mask_n, g, n_pad, BITS: tl.constexpr, P: tl.constexpr,
              ASYM: tl.constexpr, FAST: tl.constexpr, WA: tl.constexpr, x_sum=None, RAW: tl.constexpr = False):
    """One k-tile on the tensor cores: sum_k x_k (code_k - zero) * scale, [BM, BN] ([BN, BM] when WA); x 16-bit,
    x_ptrs [BM, 2P] at pair 0. The codes enter the dot centred on 2**(BITS-1); scale and zero point apply once per
    tile, after it. RAW (int4, bf16 x, the PTX unpack): they enter it as 128 + code (_int4_pair_raw_asm: no
    subtraction), and (128 + zero) * x_sum (x's sums over the tile, [BM] fp32) comes off after it -- exact either way
    but for the fp32 accumulation of the larger products."""
    if WA:
        acc = tl.zeros([w.shape[0], x_ptrs.shape[0]], dtype=tl.float32)
    else:
        acc = tl.zeros([x_ptrs.shape[0], w.shape[0]], dtype=tl.float32)
    xs = tl.zeros([x_ptrs.shape[0]], dtype=tl.float32)
    DT: tl.constexpr = x_ptrs.dtype.element_ty
    if RAW:
        for i in tl.static_range(4):
            acc, xs = _dot_pair(acc, xs, x_ptrs + i * 2 * P, x_mask, _int4_pair_raw_asm(w >> (4 * i)), False, WA)
        if ASYM:
            zr = tl.load(z_ptrs + g * n_pad, mask=mask_n, other=0.0).to(tl.float32) + 128
        else:
            zr = tl.zeros([w.shape[0]], dtype=tl.float32) + (128 + 8)
        if WA:
            acc -= zr[:, None] * x_sum[None, :]
        else:
            acc -= zr[None, :] * x_sum[:, None]
    else:
        for i in tl.static_range(16 // BITS):
            acc, xs = _dot_pair(acc, xs, x_ptrs + i * 2 * P, x_mask, _codes(w, i, BITS, DT, FAST), ASYM, WA)
    sc = tl.load(s_ptrs + g * n_pad, mask=mask_n, other=0.0).to(tl.float32)
    if ASYM and not RAW:
        zc = tl.load(z_ptrs + g * n_pad, mask=mask_n, other=0.0).to(tl.float32) - (1 << (BITS - 1))
        if WA:
            acc -= zc[:, None] * xs[None, :]
        else:
            acc -= zc[None, :] * xs[:, None]
    if WA:
        out = sc[:, None] * acc
    else:
        out = sc[None, :] * acc
    return out


@triton.jit
def _arrive(lock, count, total):
    """Split-K without a second launch: once a program has parked its partials (`count` of the `total` expected
    on this lock), True for the last program to get here; that one sums the partials and re-arms the lock (to 0)."""
    tl.debug_barrier()  # every thread's partial is out before the release below
    return tl.atomic_add(lock, count) == total - count


@triton.jit
def _sum_partials(ws_ptrs, mask, N_SPLIT: tl.constexpr, split_stride):
    """The N_SPLIT parked partials of a tile, added in a fixed order (deterministic), read past L1; the loop is
    unrolled so the loads go out together instead of one L2 round trip per partial."""
    total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for i in tl.static_range(1, N_SPLIT):
        total += tl.load(ws_ptrs + i * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _store_or_reduce(out, y_ptrs, ws_ptrs, mask, locks, pid_n, pid_k, split_stride, SPLIT_K: tl.constexpr,
                     PARK: tl.constexpr = False):
    """Store out [BM, BN], or park it as split pid_k and let the last split to arrive store the sum (PARK: leave
    the sum to a later launch)."""
    if SPLIT_K == 1:
        tl.store(y_ptrs, out.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptrs + pid_k * split_stride, out, mask=mask)
        if not PARK:
            if _arrive(locks + pid_n, 1, SPLIT_K):
                total = _sum_partials(ws_ptrs, mask, SPLIT_K, split_stride)
                tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
                tl.atomic_xchg(locks + pid_n, 0)


@triton.jit
def _prefetch_program(w, s, z, pid_n, n_pad, n_tiles, tiles_per_group, t0, t1, BN: tl.constexpr, ROWS: tl.constexpr,
                      P: tl.constexpr, ASYM: tl.constexpr):
    """L2 prefetch (PDL, before the wait) of what the program of rows [pid_n * BN, + BN) over k-tiles [t0, t1) reads:
    its row blocks' words, its groups' scales and zero points."""
    first = pid_n * BN
    rows = tl.minimum(BN, n_pad - first)
    prefetch_runs(w + (first // ROWS).to(tl.int64) * n_tiles * ROWS * P + t0 * ROWS * P, n_tiles * ROWS * P,
                  rows // ROWS, (t1 - t0) * ROWS * P)
    g0 = t0 // tiles_per_group
    groups = (t1 - 1) // tiles_per_group - g0 + 1
    prefetch_runs(s + g0 * n_pad + first, n_pad, groups, rows)
    if ASYM:
        prefetch_runs(z + g0 * n_pad + first, n_pad, groups, rows)


@triton.jit
def int_gemv_fwd_kernel(x, w, s, z, y, ws, locks, M, N, n_pad, n_tiles, tiles_per_group, tiles_per_split,
                        stride_xm, stride_ym, BITS: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr,
                        ASYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr,
                        PDL: tl.constexpr, PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    offs_q = tl.arange(0, 2 * P)  # the inputs of one slot pair
    mask_m = offs_m < M
    mask_n = offs_n < n_pad
    # row n lives in block n // ROWS; blocks are n_tiles * ROWS * P words apart, tiles ROWS * P
    w_ptrs = w + ((offs_n // ROWS).to(tl.int64) * n_tiles * ROWS * P + (offs_n % ROWS) * P)[:, None] + offs_p[None, :]
    x_ptrs = x + offs_m[:, None] * stride_xm + offs_q[None, :]
    if BM == 1:  # one row of x: 2-D tiles throughout
        acc = tl.zeros([BN, 2 * P], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN, 2 * P], dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    if PREFETCH:
        _prefetch_program(w, s, z, pid_n, n_pad, n_tiles, tiles_per_group, t0, t1, BN, ROWS, P, ASYM)
    wait_for_inputs(PDL)
    # the loop loads one tile ahead by hand (Triton pipelines only loads that feed tl.dot)
    wt = tl.load(w_ptrs + t0 * ROWS * P, mask=mask_n[:, None], other=0)
    sc, zz = _tile_params(s + offs_n, z + offs_n, mask_n, t0 // tiles_per_group, n_pad, BITS, ASYM)
    for t in range(t0, t1):
        ahead = offs_n < tl.where(t + 1 < t1, n_pad, 0)  # no rows on the last tile
        w_next = tl.load(w_ptrs + (t + 1) * ROWS * P, mask=ahead[:, None], other=0)
        sc_next, zz_next = _tile_params(s + offs_n, z + offs_n, ahead, (t + 1) // tiles_per_group, n_pad, BITS, ASYM)
        if BM == 1:
            acc += _fma_tile_row(wt, x + offs_q + t * (32 // BITS) * P, sc, zz, BITS, P)
        else:
            acc += _fma_tile(wt, x_ptrs + t * (32 // BITS) * P, mask_m[:, None], sc, zz, BITS, P)
        wt, sc, zz = w_next, sc_next, zz_next
    if BM == 1:
        out = tl.sum(acc, axis=1)[None, :]  # [1, BN]
    else:
        out = tl.sum(acc, axis=2)  # [BM, BN]
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    _store_or_reduce(out, y + offs_m[:, None] * stride_ym + offs_n[None, :], ws + offs_m[:, None] * N + offs_n[None, :],
                     mask, locks, pid_n, pid_k, M * N, SPLIT_K)


@triton.jit
def _swizzle(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid: groups of GROUP_M row tiles share weight tiles in L2."""
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % rows_in_group, (pid % (GROUP_M * num_n)) // rows_in_group


@triton.jit
def int_mma_fwd_kernel(x, w, s, z, y, ws, locks, wd, M, N, n_dense, n_blocks, n_pad, n_tiles, tiles_per_group,
                       tiles_per_split, stride_xm, stride_ym, BITS: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr,
                       ASYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
                       SPLIT_K: tl.constexpr, FAST: tl.constexpr, WA: tl.constexpr, PDL: tl.constexpr,
                       PREFETCH: tl.constexpr, DENSE: tl.constexpr, PARK: tl.constexpr = False):
    """Tensor-core tiles [BM, BN] (computed as [BN, BM] with the weights as the A operand when WA); SPLIT_K > 1
    (one row block only) splits the k-tiles over grid dim 1. DENSE (one row block only): the programs past the
    packed weight's n_blocks column tiles multiply x by the 16-bit weight wd [n_dense, K] into y's columns N ..
    N + n_dense (a projection group's unquantized members, in the same launch). PREFETCH (with PDL): each program
    pulls its weights into L2 before the wait. PARK (SPLIT_K > 1): each split's partial stays in ws, summed by the
    next launch instead of by the last split to arrive."""
    pid_k = tl.program_id(1)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    KTILE: tl.constexpr = (32 // BITS) * P  # inputs per k-tile
    K = n_tiles * KTILE
    cols = N + n_dense  # y's columns, and the split-K workspace's
    if DENSE:
        dense = tl.program_id(0) >= n_blocks
    else:
        dense = False
    pid_d = tl.program_id(0) - n_blocks
    pid_m, pid_n = _swizzle(tl.program_id(0), M, N, BM, BN, GROUP_M)
    if PREFETCH:
        if dense:
            prefetch_runs(wd + (pid_d * BN).to(tl.int64) * K + t0 * KTILE, K, tl.minimum(BN, n_dense - pid_d * BN),
                          (t1 - t0) * KTILE)
        else:
            _prefetch_program(w, s, z, pid_n, n_pad, n_tiles, tiles_per_group, t0, t1, BN, ROWS, P, ASYM)
    wait_for_inputs(PDL)
    if WA:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    if dense:  # rows pid_d * BN .. of wd, into columns N + row
        offs_r = pid_d * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, KTILE)
        mask_c = offs_r < n_dense
        col = N + offs_r
        wd_ptrs = wd + offs_r[:, None].to(tl.int64) * K + offs_k[None, :]
        xd_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        for t in range(t0, t1):
            xt = tl.load(xd_ptrs + t * KTILE, mask=mask_m[:, None], other=0.0)
            acc = _dot_w(acc, xt, tl.load(wd_ptrs + t * KTILE, mask=mask_c[:, None], other=0.0).to(xt.dtype), WA)
        lock = n_blocks + pid_d
    else:
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask_n = offs_n < n_pad
        mask_c = offs_n < N
        col = offs_n
        w_ptrs = w + ((offs_n // ROWS).to(tl.int64) * n_tiles * ROWS * P + (offs_n % ROWS) * P)[:, None] \
            + tl.arange(0, P)[None, :]
        x_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + tl.arange(0, 2 * P)[None, :]
        for t in range(t0, t1):
            wt = tl.load(w_ptrs + t * ROWS * P, mask=mask_n[:, None], other=0)
            acc += _mma_tile(wt, x_ptrs + t * (32 // BITS) * P, mask_m[:, None], s + offs_n, z + offs_n, mask_n,
                             t // tiles_per_group, n_pad, BITS, P, ASYM, FAST, WA)
        lock = pid_n
    if WA:
        acc = tl.trans(acc)
    _store_or_reduce(acc, y + offs_m[:, None].to(tl.int64) * stride_ym + col[None, :],
                     ws + offs_m[:, None] * cols + col[None, :], mask_m[:, None] & mask_c[None, :], locks, lock, pid_k,
                     M * cols, SPLIT_K, PARK)


@triton.jit
def _group_params(s_ptrs, z_ptrs, mask_n, g, n_pad, BITS: tl.constexpr, ASYM: tl.constexpr, DT: tl.constexpr):
    """Scale and zero point minus 2**(BITS-1) (0 when symmetric) of k-group g for a block of rows, in DT, shaped
    [BN, 1, 1] to meet a slot pair's codes; both exact in 16 bits for the zero point."""
    sc = tl.load(s_ptrs + g * n_pad, mask=mask_n, other=0.0).to(DT)
    if ASYM:
        zc = (tl.load(z_ptrs + g * n_pad, mask=mask_n, other=0.0).to(tl.float32) - (1 << (BITS - 1))).to(DT)
    else:
        zc = tl.zeros_like(sc)
    return sc[:, None, None], zc[:, None, None]


@triton.jit
def _dequant_pair(w, i: tl.constexpr, sc, zc, BITS: tl.constexpr, ASYM: tl.constexpr, FAST: tl.constexpr,
                  DT: tl.constexpr):
    """Pair i of words w [BN, P] dequantized, (code - zero) * scale rounded once to DT (x's 16-bit dtype): [BN, 2P].
    sc, zc from _group_params, in DT with the PTX unpack (the product of a small integer -- 5 bits for int4, 9 for
    int8 -- and a 16-bit scale is exact before the rounding either way), in fp32 otherwise."""
    c = _codes(w, i, BITS, DT if FAST else tl.float32, FAST)
    if ASYM:
        c = c - zc
    return tl.reshape((c * sc).to(DT), [w.shape[0], 2 * w.shape[1]])


@triton.jit
def _dot_w(acc, xi, wt, WA: tl.constexpr):
    """acc [BM, BN] += xi [BM, K] @ wt [BN, K]^T ([BN, BM] += wt @ xi^T when WA: the weights as the A operand)."""
    if WA:
        acc = tl.dot(wt, tl.trans(xi), acc)
    else:
        acc = tl.dot(xi, tl.trans(wt), acc)
    return acc


@triton.jit
def int_gemm_fwd_kernel(x, w, s, z, y, M, N, n_pad, n_tiles, tiles_per_group, stride_xm, stride_ym,
                        BITS: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr, ASYM: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, GROUP_M: tl.constexpr, FAST: tl.constexpr, WA: tl.constexpr):
    """Prefill GEMM, tiles [BM, BN] over all of K: each weight tile is dequantized in registers (scale folded in)
    right before its dots, so one accumulator runs through K."""
    pid_m, pid_n = _swizzle(tl.program_id(0), M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < n_pad
    w_ptrs = w + ((offs_n // ROWS).to(tl.int64) * n_tiles * ROWS * P + (offs_n % ROWS) * P)[:, None] \
        + tl.arange(0, P)[None, :]
    x_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + tl.arange(0, 2 * P)[None, :]
    DT: tl.constexpr = x.dtype.element_ty
    if WA:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in range(n_tiles):
        wt = tl.load(w_ptrs + t * ROWS * P, mask=mask_n[:, None], other=0)
        sc, zc = _group_params(s + offs_n, z + offs_n, mask_n, t // tiles_per_group, n_pad, BITS, ASYM,
                               DT if FAST else tl.float32)
        for i in tl.static_range(16 // BITS):
            xi = tl.load(x_ptrs + t * (32 // BITS) * P + i * 2 * P, mask=mask_m[:, None], other=0.0)
            acc = _dot_w(acc, xi, _dequant_pair(wt, i, sc, zc, BITS, ASYM, FAST, DT), WA)
    if WA:
        acc = tl.trans(acc)
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    tl.store(y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y.dtype.element_ty), mask=mask)


@triton.jit
def int_dequant_kernel(w, s, z, out, n0, n_rows, n_pad, n_tiles, tiles_per_group, stride_o, BITS: tl.constexpr,
                       P: tl.constexpr, ROWS: tl.constexpr, ASYM: tl.constexpr, BN: tl.constexpr):
    """out[r, k] = W[n0 + r, k] in out's dtype for r < n_rows: one (block of BN rows, k-tile) per program."""
    offs_r = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.program_id(1)
    offs_n = n0 + offs_r
    mask_r = offs_r < n_rows
    w_ptrs = w + ((offs_n // ROWS).to(tl.int64) * n_tiles * ROWS * P + (offs_n % ROWS) * P + t * ROWS * P)[:, None] \
        + tl.arange(0, P)[None, :]
    wt = tl.load(w_ptrs, mask=mask_r[:, None], other=0)
    sc, zc = _group_params(s + offs_n, z + offs_n, mask_r, t // tiles_per_group, n_pad, BITS, ASYM, tl.float32)
    o_ptrs = out + offs_r[:, None].to(tl.int64) * stride_o + t * (32 // BITS) * P + tl.arange(0, 2 * P)[None, :]
    DT: tl.constexpr = out.dtype.element_ty
    for i in tl.static_range(16 // BITS):
        tl.store(o_ptrs + i * 2 * P, _dequant_pair(wt, i, sc, zc, BITS, ASYM, False, DT), mask=mask_r[:, None])


def _split(n_tiles: int, n_blocks: int, split_k: int | None, device) -> tuple[int, int]:
    """(k-tiles per split, splits): by default enough splits for ~4 programs per SM."""
    if split_k is None:
        split_k = triton.cdiv(4 * sm_count(device), n_blocks)
    per_split = triton.cdiv(n_tiles, max(1, min(split_k, n_tiles)))
    return per_split, triton.cdiv(n_tiles, per_split)


def packed_bytes(packed: PackedLinear) -> int:
    """Bytes a kernel reads for the weight: codes, scales and zero points."""
    return sum(t.numel() * t.element_size() for t in packed.weight_tensors())


def _zeros_arg(packed: PackedLinear) -> torch.Tensor:
    return packed.zeros if packed.zeros is not None else packed.scales  # never read when symmetric


def int_gemv_fwd(x, packed: PackedLinear, y, *, block_n=None, split_k=None, num_warps=4):
    """CUDA-core GEMV: x [M <= FMA_MAX_M, K] (stride 1 along K, any float dtype, exact in fp32), y [M, N]. Every
    weight byte is read once; split-K over the k-tiles (reduced inside the launch) when there are too few row
    blocks to fill the GPU."""
    M = x.shape[0]
    bm = triton.next_power_of_2(M)
    bn = block_n or max(ROWS, 128 // (bm * packed.bits))  # a [BM, BN, 2P] accumulator of about 8 registers a thread
    n_blocks, n_tiles = triton.cdiv(packed.n, bn), packed.k // KT
    per_split, split = _split(n_tiles, n_blocks, split_k, x.device)
    ws = torch.empty((split, M, packed.n), device=x.device, dtype=torch.float32) if split > 1 else y
    pdl = use_pdl(x.device)
    int_gemv_fwd_kernel[(n_blocks, split)](
        x, packed.qweight, packed.scales, _zeros_arg(packed), y, ws, packed.locks, M, packed.n,
        packed.scales.shape[1], n_tiles, packed.group_size // KT, per_split, x.stride(0), y.stride(0),
        BITS=packed.bits, P=KT * packed.bits // 32, ROWS=ROWS, ASYM=packed.zeros is not None, BM=bm, BN=bn,
        SPLIT_K=split, PDL=pdl, PREFETCH=pdl and prefetch_fits(x.device, packed_bytes(packed)), launch_pdl=pdl,
        num_warps=num_warps, num_stages=3)
    return y


def fast_unpack(bits: int, device: torch.device) -> bool:
    """Whether the tensor-core kernels unpack with the PTX bit tricks (_int4_pair_asm, _int8_pair_asm): on CUDA (the
    interpreter runs PTX-free Triton)."""
    return bits in (4, 8) and device.type == "cuda"


def int_mma_fwd(x, packed: PackedLinear, y, *, block_m=None, block_n=None, split_k=None, num_warps=None, num_stages=3,
                fast=None, weights_as_a=None, dense=None, locks=None, prefetch=None, park=False):
    """Tensor-core path: x [M, K] (bf16/fp16; fp32 is rounded to bf16), y [M, N], tiles of block_m (16 to 64 by M)
    x block_n; block_n and num_warps default to MMA_DECODE_LAUNCH for M <= MMA_M on a small int4 weight, else 64
    and 4.
    With one row block, split-K over the k-tiles like the GEMV (split_k=1: none). weights_as_a (default: block_m 16):
    the weight tile is the MMA's A operand, y^T = W x^T (the unpacked weights straight from registers: on Hopper a
    wgmma when block_n is a multiple of 64 with 4 warps, mma.sync for 32 rows). dense (one row block only):
    a 16-bit weight [n_dense, K] computed in the same launch into y's last n_dense columns (y [M, N + n_dense]);
    its split-K counters come after the packed ones in `locks` (dense_locks(packed, n_dense)). prefetch (with PDL;
    default: while the weights fit in half the L2, pdl.prefetch_fits): each program pulls its weights into L2 before
    it waits for its inputs. park (one row block, no dense tail): where the launch splits k, return its fp32
    partials [splits, M, N] unsummed, for a later launch to add in split order (sum_parked gives the y this would
    have written); else y as usual."""
    M = x.shape[0]
    x = x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)
    block_m = block_m or max(MMA_M, min(MMA_BLOCK_M, triton.next_power_of_2(M)))
    if block_n is None and num_warps is None and M <= MMA_M and packed.bits == 4 and weight_class(packed) == "small":
        block_n, num_warps = MMA_DECODE_LAUNCH
    block_n, num_warps = block_n or 64, num_warps or 4
    num_m, n_blocks, n_tiles = triton.cdiv(M, block_m), triton.cdiv(packed.n, block_n), packed.k // KT
    if block_n < ROWS or (num_m > 1 and split_k not in (None, 1)):
        raise ValueError(f"int_mma_fwd: block_n {block_n} < {ROWS}, or split_k {split_k} over {num_m} row blocks")
    n_dense = 0 if dense is None else dense.shape[0]
    dense_blocks = triton.cdiv(n_dense, block_n)
    if dense is not None and (num_m > 1 or tuple(dense.shape) != (n_dense, packed.k) or not dense.is_contiguous()
                              or y.shape[1] != packed.n + n_dense or locks is None
                              or locks.numel() < n_blocks + dense_blocks):
        raise ValueError(f"int_mma_fwd: a dense tail {list(dense.shape)} takes one row block (here {num_m}), a "
                         f"contiguous [n, {packed.k}] weight, y of {packed.n} + n columns (here {y.shape[1]}) and "
                         f"dense_locks (here {locks is not None})")
    per_split, split = _split(n_tiles, n_blocks + dense_blocks, split_k if num_m == 1 else 1, x.device)
    if park and (num_m > 1 or dense is not None):
        raise ValueError(f"int_mma_fwd: park takes one row block (here {num_m}) and no dense tail")
    ws = torch.empty((split, M, packed.n + n_dense), device=x.device, dtype=torch.float32) if split > 1 else y
    pdl = use_pdl(x.device) and num_m == 1  # decode-sized x: every row block would prefetch the same weights again
    if prefetch is None:
        prefetch = pdl and prefetch_fits(x.device, packed_bytes(packed) + (0 if dense is None else dense.nbytes))
    int_mma_fwd_kernel[(num_m * n_blocks + dense_blocks, split)](
        x, packed.qweight, packed.scales, _zeros_arg(packed), y, ws, packed.locks if locks is None else locks,
        x if dense is None else dense, M, packed.n, n_dense, n_blocks, packed.scales.shape[1], n_tiles,
        packed.group_size // KT, per_split, x.stride(0), y.stride(0), BITS=packed.bits, P=KT * packed.bits // 32,
        ROWS=ROWS, ASYM=packed.zeros is not None, BM=block_m, BN=block_n, GROUP_M=8, SPLIT_K=split,
        FAST=fast_unpack(packed.bits, x.device) if fast is None else fast,
        WA=block_m == MMA_M if weights_as_a is None else weights_as_a, PDL=pdl, PREFETCH=pdl and prefetch,
        DENSE=dense is not None, PARK=park and split > 1, launch_pdl=pdl, num_warps=num_warps,
        num_stages=num_stages)
    return ws if park and split > 1 else y


def sum_parked(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int_mma_fwd's parked partials [splits, M, N] fp32 summed as its last split sums them (in split order, fp32)
    and rounded to `dtype`: the y it would have written, bit for bit."""
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total.to(dtype)


def dense_locks(packed: PackedLinear, n_dense: int) -> torch.Tensor:
    """Split-K counters for int_mma_fwd with a dense tail of n_dense rows, at any block_n: zeros, re-armed by the
    kernel after each call."""
    return torch.zeros(packed.scales.shape[1] // ROWS + triton.cdiv(n_dense, ROWS), dtype=torch.int32,
                       device=packed.qweight.device)


def gemm_launch(m: int) -> tuple[int, int, int, int]:
    """int_gemm_fwd's default (block_m, block_n, num_warps, num_stages) for m rows, from GEMM_LAUNCH."""
    return next(launch for bound, launch in GEMM_LAUNCH if m <= bound)


def int_gemm_fwd(x, packed: PackedLinear, y, *, block_m=None, block_n=None, num_warps=None, num_stages=None,
                 fast=None, weights_as_a=True):
    """Prefill GEMM: x [M, K] (bf16/fp16; fp32 is rounded to bf16), y [M, N]; each [block_n, KT] weight tile is
    dequantized in registers (to x's dtype) right before its dots. Defaults from GEMM_LAUNCH by M. weights_as_a:
    the weight tile is the MMA's A operand (on Hopper a wgmma reading it straight from registers)."""
    M = x.shape[0]
    x = x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)
    bm, bn, warps, stages = gemm_launch(M)
    bm, bn = block_m or bm, block_n or bn
    if bn < ROWS:
        raise ValueError(f"int_gemm_fwd: block_n {bn} < {ROWS}")
    int_gemm_fwd_kernel[(triton.cdiv(M, bm) * triton.cdiv(packed.n, bn),)](
        x, packed.qweight, packed.scales, _zeros_arg(packed), y, M, packed.n, packed.scales.shape[1],
        packed.k // KT, packed.group_size // KT, x.stride(0), y.stride(0), BITS=packed.bits,
        P=KT * packed.bits // 32, ROWS=ROWS, ASYM=packed.zeros is not None, BM=bm, BN=bn, GROUP_M=8,
        FAST=fast_unpack(packed.bits, x.device) if fast is None else fast, WA=weights_as_a,
        num_warps=num_warps or warps, num_stages=num_stages or stages)
    return y


def dequantize_rows(packed: PackedLinear, n0: int, out: torch.Tensor, *, block_n=64) -> torch.Tensor:
    """out [rows, K] (16-bit) = rows n0 .. n0 + rows of the weight, dequantized on the device."""
    rows = out.shape[0]
    int_dequant_kernel[(triton.cdiv(rows, block_n), packed.k // KT)](
        packed.qweight, packed.scales, _zeros_arg(packed), out, n0, rows, packed.scales.shape[1], packed.k // KT,
        packed.group_size // KT, out.stride(0), BITS=packed.bits, P=KT * packed.bits // 32, ROWS=ROWS,
        ASYM=packed.zeros is not None, BN=block_n)
    return out


def int_dequant_mm(x, packed: PackedLinear, y, *, workspace_bytes=DEQUANT_WORKSPACE):
    """The field's large-M path: the weight dequantized to x's 16-bit dtype (fp32 x: bf16), at most workspace_bytes
    of it at a time, and multiplied by cuBLAS (torch.mm). x [M, K], y [M, N]."""
    x16 = x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)
    chunk = max(ROWS, workspace_bytes // (2 * packed.k) // ROWS * ROWS)  # whole blocks of rows
    ws = torch.empty(min(chunk, packed.n), packed.k, device=x.device, dtype=x16.dtype)
    for n0 in range(0, packed.n, chunk):
        w16 = dequantize_rows(packed, n0, ws[:min(chunk, packed.n - n0)])
        if w16.shape[0] == packed.n and y.dtype == x16.dtype and y.is_contiguous():
            torch.mm(x16, w16.t(), out=y)
        else:
            y[:, n0:n0 + w16.shape[0]] = x16 @ w16.t()
    return y


def weight_class(packed: PackedLinear) -> str:
    return "large" if packed.n * packed.k >= LARGE_WEIGHT else "small"


def linear_kernel(m: int, packed: PackedLinear, dtype: torch.dtype) -> str:
    """"fma" (CUDA-core GEMV), "mma" (tensor cores, split-K), "gemm" (tiled, dequantizing in registers) or
    "dequant" (dequantize + cuBLAS) for m rows of x, from CROSSOVER; fp32 x takes the exact CUDA-core GEMV as far as
    it goes."""
    fma_max, mma_max, gemm_max = CROSSOVER[(packed.bits, weight_class(packed))]
    if m <= fma_max or (dtype == torch.float32 and m <= FMA_MAX_M):
        return "fma"
    return "mma" if m <= mma_max else "gemm" if m <= gemm_max else "dequant"


LINEAR_KERNELS = {"fma": int_gemv_fwd, "mma": int_mma_fwd, "gemm": int_gemm_fwd, "dequant": int_dequant_mm}


def int_linear(x: torch.Tensor, packed: PackedLinear, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for x [..., K] (bf16, fp16 or fp32); y [..., N] in x.dtype. The kernel follows CROSSOVER."""
    if x.shape[-1] != packed.k:
        raise ValueError(f"int_linear: x has {x.shape[-1]} features, the weight expects {packed.k}")
    x2 = x.reshape(-1, packed.k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y = out if out is not None else x.new_empty(*x.shape[:-1], packed.n)
    y2 = y.view(-1, packed.n)
    if x2.shape[0] == 0:
        return y
    LINEAR_KERNELS[linear_kernel(x2.shape[0], packed, x.dtype)](x2, packed, y2)
    return y
