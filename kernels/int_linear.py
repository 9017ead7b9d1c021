"""Weight-only int4/int8 linear (W4A16, W8A16): repack compressed-tensors weights once, then a split-K GEMV for decode and a dequantizing GEMM for prefill."""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ROWS = 16  # output rows per packed block; one (block, k-tile) pair is ROWS * P contiguous int32 words
KT = 128  # input features per k-tile; P = KT * bits / 32 words per row (16 for int4, 32 for int8)
GEMV_MAX_M = 16  # rows of x up to which int_linear streams the weights once (decode)


@dataclass
class PackedLinear:
    """W[n, k] = (code[n, k] - zero[k // group, n]) * scale[k // group, n]; y = x @ W.T.

    qweight is int32 [N_pad / ROWS, K / KT, ROWS, P]: word p of row r of tile t holds the unsigned code
    of input k = t * KT + j * P + p at bits [bits * j, bits * (j + 1)), j < 32 / bits ("bit planes").
    N_pad = N rounded up to ROWS; padded rows have scale 0.
    """

    qweight: torch.Tensor  # int32 [N_pad / ROWS, K / KT, ROWS, P]
    scales: torch.Tensor  # [K / group, N_pad], the checkpoint's scale dtype
    zeros: torch.Tensor | None  # [K / group, N_pad] unsigned zero points (scale dtype); None: symmetric, 2**(bits-1)
    locks: torch.Tensor  # int32 [N_pad / ROWS], zero between calls: split-K arrival counters
    n: int
    k: int
    bits: int
    group_size: int


def unpack_int32_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' int32 packing (value i of a row at bits [i*bits, (i+1)*bits), offset 2**(bits-1)) -> unsigned codes [..., count]."""
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)[..., :count]


def _pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    # codes [N_pad, K] -> [N_pad/ROWS, K/KT, ROWS, P] int32 with k = t*KT + j*P + p in bit plane j
    n, k = codes.shape
    planes = 32 // bits
    c = codes.to(torch.int64).reshape(n // ROWS, ROWS, k // KT, planes, KT // planes)
    c = c.permute(0, 2, 1, 4, 3)  # [N/ROWS, K/KT, ROWS, P, planes]
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
    n_pad = triton.cdiv(n, ROWS) * ROWS
    codes = torch.nn.functional.pad(unpack_int32_codes(weight_packed, bits, k), (0, 0, 0, n_pad - n))
    scales = torch.nn.functional.pad(weight_scale, (0, 0, 0, n_pad - n)).t().contiguous()
    zeros = None
    if weight_zero_point is not None:
        if weight_zero_point.dtype == torch.int32:  # packed along the output dim, as compressed-tensors writes it
            zp = unpack_int32_codes(weight_zero_point.t(), bits, n).t()
        else:  # unpacked signed zero points [N, K/group]
            zp = weight_zero_point.to(torch.int32) + (1 << (bits - 1))
        zeros = torch.nn.functional.pad(zp, (0, 0, 0, n_pad - n)).t().to(scales.dtype).contiguous()
    locks = torch.zeros(n_pad // ROWS, dtype=torch.int32, device=weight_packed.device)
    return PackedLinear(_pack_planes(codes, bits), scales, zeros, locks, n, k, bits, group_size)


def concat_packed_linears(parts: list[PackedLinear]) -> PackedLinear:
    """Stack linears that read the same input into one (rows in the given order): y = x @ [W_0; W_1; ...].T.
    Each part's rows must fill whole ROWS blocks, so no padding lands between them."""
    first = parts[0]
    for p in parts:
        if (p.k, p.bits, p.group_size, p.zeros is None) != (first.k, first.bits, first.group_size, first.zeros is None) \
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
    """Code of bit plane j as the exact float 1 + code / 2**BITS: the code is moved into the top mantissa bits of 1.0."""
    if 23 - BITS - BITS * j >= 0:
        t = w << (23 - BITS - BITS * j)
    else:
        t = w >> (BITS * j + BITS - 23)
    return ((t & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _centred(w, j: tl.constexpr, BITS: tl.constexpr):
    """Code of bit plane j minus 2**(BITS-1), as an exact float."""
    return _unpack(w, j, BITS) * (1 << BITS) - ((1 << BITS) + (1 << (BITS - 1)))


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
def _dequant_fma(w, x_ptrs, x_mask, s, zz, BITS: tl.constexpr, P: tl.constexpr):
    """One k-tile on the CUDA cores: s * sum_k x_k (code_k - zero), still split over the P words: [BM, BN, P]."""
    xs = tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32)  # [BM, P], plane 0
    dot = xs[:, None, :] * _unpack(w, 0, BITS)[None, :, :]
    for j in tl.static_range(1, 32 // BITS):
        xj = tl.load(x_ptrs + j * P, mask=x_mask, other=0.0).to(tl.float32)
        xs += xj
        dot += xj[:, None, :] * _unpack(w, j, BITS)[None, :, :]
    # sum x (1 + c / 2**B) = xs + sum x c / 2**B, so sum x (c - z) = 2**B dot - (2**B + z) xs
    return s[None, :, None] * (dot * (1 << BITS) - zz[None, :, None] * xs[:, None, :])


@triton.jit
def _dequant_fma_row(w, x_ptrs, s, zz, BITS: tl.constexpr, P: tl.constexpr):
    """_dequant_fma for a single row of x (x_ptrs [P]): [BN, P]."""
    xs = tl.load(x_ptrs).to(tl.float32)
    dot = xs[None, :] * _unpack(w, 0, BITS)
    for j in tl.static_range(1, 32 // BITS):
        xj = tl.load(x_ptrs + j * P).to(tl.float32)
        xs += xj
        dot += xj[None, :] * _unpack(w, j, BITS)
    return s[:, None] * (dot * (1 << BITS) - zz[:, None] * xs[None, :])


@triton.jit
def _dequant_mma(w, x_ptrs, x_mask, BITS: tl.constexpr, P: tl.constexpr):
    """One k-tile on the tensor cores: (sum_k x_k (code_k - 2**(BITS-1)) [BM, BN], sum_k x_k [BM]); x is 16-bit.
    The centred codes are small integers, exact in bf16 and fp16."""
    x0 = tl.load(x_ptrs, mask=x_mask, other=0.0)
    part = tl.dot(x0, tl.trans(_centred(w, 0, BITS).to(x0.dtype)))
    xs = tl.sum(x0.to(tl.float32), axis=1)
    for j in tl.static_range(1, 32 // BITS):
        xj = tl.load(x_ptrs + j * P, mask=x_mask, other=0.0)
        part = tl.dot(xj, tl.trans(_centred(w, j, BITS).to(xj.dtype)), part)
        xs += tl.sum(xj.to(tl.float32), axis=1)
    return part, xs


@triton.jit
def _mma_tile(w, x_ptrs, x_mask, s_ptrs, z_ptrs, mask_n, g, n_pad, BITS: tl.constexpr, P: tl.constexpr,
              ASYM: tl.constexpr):
    """One k-tile on the tensor cores, scaled: sum_k x_k (code_k - zero) * scale, [BM, BN]."""
    part, xs = _dequant_mma(w, x_ptrs, x_mask, BITS, P)
    sc, zz = _tile_params(s_ptrs, z_ptrs, mask_n, g, n_pad, BITS, ASYM)
    return sc[None, :] * (part - (zz - ((1 << BITS) + (1 << (BITS - 1))))[None, :] * xs[:, None])


@triton.jit
def _arrive(lock, n_split):
    """Split-K without a second launch: once a program has parked its partials, True for the last of the
    n_split programs of its output tile to get here; that one sums the partials and re-arms the lock (to 0)."""
    tl.debug_barrier()  # every thread's partial is out before the release below
    return tl.atomic_add(lock, 1) == n_split - 1


@triton.jit
def _sum_partials(ws_ptrs, mask, n_split, split_stride):
    """The n_split parked partials of a tile, added in a fixed order (deterministic), read past L1."""
    total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    for i in range(1, n_split):
        total += tl.load(ws_ptrs + i * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def int_gemv_fwd_kernel(x, w, s, z, y, ws, locks, M, N, n_pad, n_tiles, tiles_per_group, tiles_per_split,
                        stride_xm, stride_ym, BITS: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr,
                        ASYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    mask_m = offs_m < M
    mask_n = offs_n < n_pad
    # row n lives in block n // ROWS; blocks are n_tiles * ROWS * P words apart, tiles ROWS * P
    w_ptrs = w + ((offs_n // ROWS).to(tl.int64) * n_tiles * ROWS * P + (offs_n % ROWS) * P)[:, None] + offs_p[None, :]
    x_ptrs = x + offs_m[:, None] * stride_xm + offs_p[None, :]
    if BM == 1:  # one row of x: 2-D tiles throughout
        acc = tl.zeros([BN, P], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN, P], dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    # the loop loads one tile ahead by hand (Triton pipelines only loads that feed tl.dot)
    wt = tl.load(w_ptrs + t0 * ROWS * P, mask=mask_n[:, None], other=0)
    sc, zz = _tile_params(s + offs_n, z + offs_n, mask_n, t0 // tiles_per_group, n_pad, BITS, ASYM)
    for t in range(t0, t1):
        ahead = offs_n < tl.where(t + 1 < t1, n_pad, 0)  # no rows on the last tile
        w_next = tl.load(w_ptrs + (t + 1) * ROWS * P, mask=ahead[:, None], other=0)
        sc_next, zz_next = _tile_params(s + offs_n, z + offs_n, ahead, (t + 1) // tiles_per_group, n_pad, BITS, ASYM)
        if BM == 1:
            acc += _dequant_fma_row(wt, x + offs_p + t * (32 // BITS) * P, sc, zz, BITS, P)
        else:
            acc += _dequant_fma(wt, x_ptrs + t * (32 // BITS) * P, mask_m[:, None], sc, zz, BITS, P)
        wt, sc, zz = w_next, sc_next, zz_next
    if BM == 1:
        out = tl.sum(acc, axis=1)[None, :]  # [1, BN]
    else:
        out = tl.sum(acc, axis=2)  # [BM, BN]
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    y_ptrs = y + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, out.to(y.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptrs + pid_k * M * N, out, mask=mask)
        if _arrive(locks + pid_n, SPLIT_K):
            tl.store(y_ptrs, _sum_partials(ws_ptrs, mask, SPLIT_K, M * N).to(y.dtype.element_ty), mask=mask)
            tl.atomic_xchg(locks + pid_n, 0)


@triton.jit
def int_gemm_fwd_kernel(x, w, s, z, y, M, N, n_pad, n_tiles, tiles_per_group, stride_xm, stride_ym,
                        BITS: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr, ASYM: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M  # groups of GROUP_M row tiles share weight tiles in L2
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_n)) // rows_in_group
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_p = tl.arange(0, P)
    mask_m = offs_m < M
    mask_n = offs_n < n_pad
    w_ptrs = w + ((offs_n // ROWS).to(tl.int64) * n_tiles * ROWS * P + (offs_n % ROWS) * P)[:, None] + offs_p[None, :]
    x_ptrs = x + offs_m[:, None].to(tl.int64) * stride_xm + offs_p[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for t in range(n_tiles):
        wt = tl.load(w_ptrs + t * ROWS * P, mask=mask_n[:, None], other=0)
        acc += _mma_tile(wt, x_ptrs + t * (32 // BITS) * P, mask_m[:, None], s + offs_n, z + offs_n, mask_n,
                         t // tiles_per_group, n_pad, BITS, P, ASYM)
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    tl.store(y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y.dtype.element_ty), mask=mask)


def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def int_gemv_fwd(x, packed: PackedLinear, y, *, block_n=None, split_k=None, num_warps=4, num_stages=3):
    """Decode path: x [M <= 16, K] (stride 1 along K), y [M, N]. Every weight byte is read once; split-K
    over the k-tiles (reduced inside the launch) when there are too few row blocks to fill the GPU."""
    M = x.shape[0]
    bm = triton.next_power_of_2(M)
    bn = block_n or max(ROWS, 256 // (bm * packed.bits))  # a [BM, BN, P] accumulator of about 8 registers a thread
    n_blocks, n_tiles = triton.cdiv(packed.n, bn), packed.k // KT
    if split_k is None:
        split_k = triton.cdiv(4 * num_sms(x.device), n_blocks)
    per_split = triton.cdiv(n_tiles, max(1, min(split_k, n_tiles)))
    split = triton.cdiv(n_tiles, per_split)
    ws = torch.empty((split, M, packed.n), device=x.device, dtype=torch.float32) if split > 1 else y
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    int_gemv_fwd_kernel[(n_blocks, split)](
        x, packed.qweight, packed.scales, zeros, y, ws, packed.locks, M, packed.n, packed.scales.shape[1],
        n_tiles, packed.group_size // KT, per_split, x.stride(0), y.stride(0), BITS=packed.bits,
        P=KT * packed.bits // 32, ROWS=ROWS, ASYM=packed.zeros is not None, BM=bm, BN=bn, SPLIT_K=split,
        num_warps=num_warps, num_stages=num_stages)
    return y


def int_gemm_fwd(x, packed: PackedLinear, y, *, block_m=64, block_n=64, num_warps=4, num_stages=3):
    """Prefill path: x [M, K], y [M, N]; weights dequantized in registers into bf16 (fp16 for fp16 x) tensor-core tiles."""
    M = x.shape[0]
    x = x if x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(packed.n, block_n),)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    int_gemm_fwd_kernel[grid](
        x, packed.qweight, packed.scales, zeros, y, M, packed.n, packed.scales.shape[1], packed.k // KT,
        packed.group_size // KT, x.stride(0), y.stride(0), BITS=packed.bits, P=KT * packed.bits // 32, ROWS=ROWS,
        ASYM=packed.zeros is not None, BM=block_m, BN=block_n, GROUP_M=8, num_warps=num_warps, num_stages=num_stages)
    return y


def int_linear(x: torch.Tensor, packed: PackedLinear, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T for x [..., K] (bf16, fp16 or fp32); y [..., N] in x.dtype. GEMV for up to 16 rows, else GEMM."""
    if x.shape[-1] != packed.k:
        raise ValueError(f"int_linear: x has {x.shape[-1]} features, the weight expects {packed.k}")
    x2 = x.reshape(-1, packed.k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y = out if out is not None else x.new_empty(*x.shape[:-1], packed.n)
    y2 = y.view(-1, packed.n)
    if x2.shape[0] == 0:
        return y
    if x2.shape[0] <= GEMV_MAX_M:
        int_gemv_fwd(x2, packed, y2)
    else:
        int_gemm_fwd(x2, packed, y2)
    return y
