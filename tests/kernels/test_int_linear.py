"""int_linear (W4A16/W8A16: CUDA-core GEMV, tensor-core GEMV with split-K, tensor-core GEMMs, dequantize + matmul)
against its fp32 twin, on weights packed by compressed-tensors; the repacked word order; the kernel choice table."""
import pytest
import torch
from helpers import DEVICE, GPU, assert_close, ct_compress, ct_decompress, poisoned

from klconvert.kernels.naive_int_linear import naive_int_linear
from klconvert.kernels import int_linear as int_linear_module
from klconvert.kernels.int_linear import (CROSSOVER, FMA_MAX_M, GEMM_LAUNCH, KT, LARGE_WEIGHT, MMA_BLOCK_M,
                                          dense_locks, dequantize_rows, gemm_launch, int_dequant_mm, int_gemm_fwd,
                                          int_gemv_fwd, int_linear, int_mma_fwd, linear_kernel, repack_int_weight,
                                          sum_parked)
from klconvert.kernels.int_layout import unpack_words
from klconvert.kernels.naive_int_linear import dequantize_int_weight

# bound on RMS error relative to the fp32 twin, by output dtype (bf16/fp16 outputs are rounded once)
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
# (bits, symmetric, group, N, K): N not a multiple of the 16-row block; a group spanning 2 k-tiles
CASES = [(4, True, 128, 40, 384), (4, False, 256, 24, 512), (8, True, 256, 40, 512), (8, False, 128, 8, 384)]


def packed_linear(bits, symmetric, group, n, k, device=DEVICE):
    weight = (torch.randn(n, k, device=device) * 0.05).to(torch.bfloat16)
    ct = ct_compress(weight, bits, group, symmetric)
    return ct, repack_int_weight(ct["weight_packed"], ct["weight_scale"], ct.get("weight_zero_point"),
                                 ct["weight_shape"], bits, group)


@pytest.mark.parametrize("bits, symmetric, group, n, k", CASES)
def test_repack_is_the_checkpoint_weight(bits, symmetric, group, n, k):
    ct, packed = packed_linear(bits, symmetric, group, n, k)
    want = ct_decompress(ct, bits, group, symmetric)  # compressed-tensors' own dequantization (bf16)
    assert torch.equal(dequantize_int_weight(packed).to(want.dtype), want)


@pytest.mark.parametrize("bits, symmetric", [(4, False), (8, True)])
def test_repack_in_slices_of_rows_is_the_same(monkeypatch, bits, symmetric):
    """The repack goes REPACK_ROWS rows at a time (bounded temporaries): slices of 16 rows, the last one padded,
    give the same words as one piece."""
    ct, whole = packed_linear(bits, symmetric, 128, 40, 384)
    monkeypatch.setattr(int_linear_module, "REPACK_ROWS", 16)
    sliced = repack_int_weight(ct["weight_packed"], ct["weight_scale"], ct.get("weight_zero_point"),
                               ct["weight_shape"], bits, 128)
    assert torch.equal(sliced.qweight, whole.qweight) and torch.equal(sliced.scales, whole.scales)


def test_word_order_pairs_neighbours():
    """What the PTX unpack rests on: slots i and i + 16/bits of word p of a k-tile hold inputs i*2P + 2p and
    i*2P + 2p + 1, and unpack_words inverts the repack exactly."""
    for bits in (4, 8):
        n, k = 32, 2 * KT
        codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.int32)
        words = (codes.view(n, k * bits // 32, 32 // bits) << torch.arange(0, 32, bits, dtype=torch.int32)).sum(-1)
        p = repack_int_weight(words.to(torch.int32), torch.ones(n, k // KT), None, (n, k), bits, KT)
        assert torch.equal(unpack_words(p.qweight, bits), codes)
        half, P = 16 // bits, KT * bits // 32
        w = p.qweight[1, 1, 3]  # rows 16..31, k-tile 1, row 3 of the block: row 19
        for i in range(half):
            for b, slot in ((0, i), (1, i + half)):
                got = (w >> (bits * slot)) & ((1 << bits) - 1)
                assert torch.equal(got, codes[19, KT + i * 2 * P + b + 2 * torch.arange(P)])


def test_crossover_table():
    """Every (bits, weight class) has an entry; fp32 x stays on the exact GEMV; the choice follows the table."""
    for (bits, cls), (fma_max, mma_max, gemm_max) in CROSSOVER.items():
        assert bits in (4, 8) and cls in ("large", "small") and 0 <= fma_max <= FMA_MAX_M <= gemm_max
        assert fma_max <= mma_max <= gemm_max
    assert [bound for bound, _ in GEMM_LAUNCH] == sorted(bound for bound, _ in GEMM_LAUNCH)
    assert gemm_launch(1 << 40) == GEMM_LAUNCH[-1][1]
    _, small = packed_linear(4, True, 128, 40, 384)
    assert small.n * small.k < LARGE_WEIGHT
    fma_max, mma_max, gemm_max = CROSSOVER[(4, "small")]
    for m in (*range(1, 40), gemm_max, gemm_max + 1):
        want = "fma" if m <= fma_max else "mma" if m <= mma_max else "gemm" if m <= gemm_max else "dequant"
        assert linear_kernel(m, small, torch.bfloat16) == want
        assert linear_kernel(m, small, torch.float32) == ("fma" if m <= max(fma_max, FMA_MAX_M) else want)


def test_dispatch_follows_the_recorded_crossover(monkeypatch):
    """With bounds (1, 4, 8), int_linear runs each of the four kernels for its rows, and each agrees with the twin."""
    _, packed = packed_linear(4, False, 128, 24, 256)
    monkeypatch.setitem(CROSSOVER, (4, "small"), (1, 4, 8))
    ran = []
    for kind, fn in list(int_linear_module.LINEAR_KERNELS.items()):
        monkeypatch.setitem(int_linear_module.LINEAR_KERNELS, kind,
                            lambda *a, kind=kind, fn=fn, **kw: ran.append(kind) or fn(*a, **kw))
    for m in (1, 3, 7, 9):
        x = torch.randn(m, 256, device=DEVICE, dtype=torch.bfloat16)
        assert_close(int_linear(x, packed, out=poisoned(m, 24, dtype=x.dtype)), naive_int_linear(x, packed),
                     BOUND[x.dtype], f"int_linear M={m}")
    assert ran == ["fma", "mma", "gemm", "dequant"]


@pytest.mark.parametrize("bits, symmetric, group, n, k", CASES)
def test_dequantize_rows_is_the_twin_rounded(bits, symmetric, group, n, k):
    """The device dequantization rounds the twin's exact fp32 weight once: bit-equal after the twin's rounding."""
    _, packed = packed_linear(bits, symmetric, group, n, k)
    want = dequantize_int_weight(packed)
    for dtype in (torch.bfloat16, torch.float16):
        n0 = n // 2  # from the middle of a block to the last, padded one
        got = dequantize_rows(packed, n0, torch.full((n - n0, k), float("nan"), device=DEVICE, dtype=dtype),
                              block_n=16)
        assert torch.equal(got, want[n0:].to(dtype))


# (kernel, launch options): every decode and prefill variant, whatever CROSSOVER picks
VARIANTS = {"fma": (int_gemv_fwd, {}), "fma split 2": (int_gemv_fwd, dict(block_n=16, split_k=2)),
            "mma W-as-A split": (int_mma_fwd, dict(weights_as_a=True)),
            "mma x-as-A split 3": (int_mma_fwd, dict(weights_as_a=False, block_n=16, split_k=3)),
            "gemm 2 row blocks of 16": (int_mma_fwd, dict(block_m=16, block_n=16, split_k=1)),
            "gemm 32x32 x-as-A": (int_mma_fwd, dict(block_m=32, block_n=32, split_k=1)),
            "prefill gemm 16x16 x-as-A": (int_gemm_fwd, dict(block_m=16, block_n=16, weights_as_a=False)),
            "prefill gemm 32x32 W-as-A": (int_gemm_fwd, dict(block_m=32, block_n=32)),
            "dequant + mm, 16-row chunks": (int_dequant_mm, dict(workspace_bytes=1))}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bits, symmetric, group, n, k", CASES)
def test_each_kernel(variant, bits, symmetric, group, n, k):
    fn, launch = VARIANTS[variant]
    _, packed = packed_linear(bits, symmetric, group, n, k)
    m = 19 if "gemm" in variant or "dequant" in variant else 5  # ragged rows: partial row blocks everywhere
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(2):  # a second call reuses the split-K locks
        y = fn(x, packed, poisoned(m, n, dtype=x.dtype), **launch)
        assert_close(y, naive_int_linear(x, packed), BOUND[x.dtype], variant)
    assert int(packed.locks.abs().sum()) == 0


@pytest.mark.parametrize("m", [1, 7, 20])  # decode, decode, GEMM
@pytest.mark.parametrize("bits, symmetric, group, n, k", CASES)
def test_int_linear(bits, symmetric, group, n, k, m):
    _, packed = packed_linear(bits, symmetric, group, n, k)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    y = int_linear(x, packed, out=poisoned(m, n, dtype=x.dtype))
    assert_close(y, naive_int_linear(x, packed), BOUND[x.dtype], "int_linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int_linear_dtypes_and_leading_dims(dtype):
    _, packed = packed_linear(4, False, 128, 24, 256)
    x = torch.randn(2, 3, 256, device=DEVICE, dtype=dtype)
    y = int_linear(x, packed)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    assert_close(y, naive_int_linear(x, packed), BOUND[dtype], "int_linear")


@pytest.mark.parametrize("split_k", [2, 3])
def test_gemv_split_k(split_k):
    """5 k-tiles split unevenly; the in-launch reduction must leave every lock re-armed (zero)."""
    _, packed = packed_linear(4, True, 128, 40, 640)
    x = torch.randn(3, 640, device=DEVICE, dtype=torch.float32)
    for _ in range(2):  # a second call reuses the locks
        y = int_gemv_fwd(x, packed, poisoned(3, 40, dtype=x.dtype), block_n=16, split_k=split_k)
        assert_close(y, naive_int_linear(x, packed), BOUND[x.dtype], f"split-K {split_k}")
    assert int(packed.locks.abs().sum()) == 0


def test_default_split_k_off_cuda_is_an_h200s():
    """Off CUDA (the interpreter) the default split-K is the one an H200's 132 SMs get (~4 programs an SM), as
    mla_decode's split of the sequence is: int_linear assumed 4 SMs there, mla_decode 132."""
    cpu = torch.device("cpu")
    assert int_linear_module._split(1024, 1, None, cpu) == int_linear_module._split(1024, 1, 4 * 132, cpu)


@pytest.mark.parametrize("launch", [dict(), dict(block_n=16, split_k=3, weights_as_a=False), dict(split_k=1)])
@pytest.mark.parametrize("bits, symmetric, group, n, k", CASES[:2])
def test_mma_with_a_dense_tail(bits, symmetric, group, n, k, launch):
    """int_mma_fwd with a dense 16-bit weight of 40 rows (not a whole block) in the same launch: y = [x W^T | x
    Wd^T] against the twin and a plain matmul, ragged rows, twice (the split-K counters re-arm)."""
    _, packed = packed_linear(bits, symmetric, group, n, k)
    dense = (torch.randn(40, k, device=DEVICE) * 0.05).to(torch.bfloat16)
    locks = dense_locks(packed, 40)
    for m in (1, 5):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        want = torch.cat([naive_int_linear(x, packed).float(), x.float() @ dense.float().t()], dim=-1)
        for _ in range(2):
            y = int_mma_fwd(x, packed, poisoned(m, n + 40, dtype=x.dtype), dense=dense, locks=locks, **launch)
            assert_close(y, want, BOUND[x.dtype], f"dense tail M={m} {launch}")
    assert int(locks.abs().sum()) == 0
    with pytest.raises(ValueError, match="one row block"):
        x = torch.randn(MMA_BLOCK_M + 1, k, device=DEVICE, dtype=torch.bfloat16)
        int_mma_fwd(x, packed, poisoned(MMA_BLOCK_M + 1, n + 40, dtype=x.dtype), dense=dense, locks=locks)
    with pytest.raises(ValueError, match=f"y of {n} \\+ n columns \\(here {n}\\)"):
        int_mma_fwd(x[:1], packed, poisoned(1, n, dtype=x.dtype), dense=dense, locks=locks)


@pytest.mark.parametrize("bits, symmetric, group, n, k, split_k",
                         [case + (split,) for case in CASES[:2] for split in (1, 3)]
                         + [pytest.param(4, True, 128, 2304, 4096, None, marks=GPU)])   # the 48B's o_proj, its split
def test_mma_parks_its_split_partials(bits, symmetric, group, n, k, split_k):
    """park=True: a launch that splits k returns its fp32 partials [splits, M, N] unsummed (3 asked of 3 or 4
    k-tiles: 3 or 2 splits), whose sum in split order (sum_parked) is what the same launch writes unparked, bit for
    bit, and leaves its counters untouched; unsplit it writes y as ever."""
    _, packed = packed_linear(bits, symmetric, group, n, k)
    for m in (1, 5):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        y = int_mma_fwd(x, packed, poisoned(m, n, dtype=x.dtype), split_k=split_k)
        parked = int_mma_fwd(x, packed, poisoned(m, n, dtype=x.dtype), split_k=split_k, park=True)
        if split_k == 1:
            assert torch.equal(parked, y)
        else:
            assert parked.shape[1:] == (m, n) and parked.shape[0] > 1 and parked.dtype == torch.float32
            assert torch.equal(sum_parked(parked, x.dtype), y)
    assert int(packed.locks.abs().sum()) == 0
    with pytest.raises(ValueError, match="park takes one row block"):
        x = torch.randn(MMA_BLOCK_M + 1, k, device=DEVICE, dtype=torch.bfloat16)
        int_mma_fwd(x, packed, poisoned(MMA_BLOCK_M + 1, n, dtype=x.dtype), park=True)


def test_rejects_bad_group():
    with pytest.raises(ValueError, match="multiple of 128"):
        repack_int_weight(torch.zeros(16, 8, dtype=torch.int32), torch.ones(16, 1), None, (16, 64), 4, 64)


@GPU
@pytest.mark.parametrize("bits, n, k, m", [(4, 163840, 2304, 1), (8, 163840, 2304, 1), (4, 2304, 4096, 1),
                                           (4, 12288, 2304, 16), (8, 4096, 2304, 5), (4, 2304, 4096, 300),
                                           (4, 12288, 2304, 2048), (8, 2304, 4096, 4096)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_linear_real_shapes(bits, n, k, m, symmetric):
    _, packed = packed_linear(bits, symmetric, 128, n, k)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    y = int_linear(x, packed, out=poisoned(m, n, dtype=x.dtype))
    assert_close(y, naive_int_linear(x, packed), BOUND[x.dtype], "int_linear")


@GPU
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("launch", [dict(weights_as_a=True), dict(weights_as_a=False), dict(block_n=128),
                                    dict(block_n=64, num_warps=4), dict(block_m=64, split_k=1)])
@pytest.mark.parametrize("n, k, m", [(12288, 2304, 1), (2304, 4096, 16), (4096, 2304, 77)])
def test_ptx_unpack(bits, dtype, symmetric, launch, n, k, m):
    """The PTX unpacks (int4: LOP3 + packed FMA; int8: PRMT + SUB) against the twin, and against the PTX-free unpack
    of the same kernel; then the prefill GEMM, which dequantizes through the same unpack."""
    _, packed = packed_linear(bits, symmetric, 128, n, k)
    x = torch.randn(m, k, device=DEVICE, dtype=dtype)
    y = int_mma_fwd(x, packed, poisoned(m, n, dtype=dtype), fast=True, **launch)
    assert_close(y, naive_int_linear(x, packed), BOUND[dtype], f"int{bits} PTX unpack")
    # the same centred codes enter the same dots: the two unpacks agree up to the odd output rounding
    assert_close(y, int_mma_fwd(x, packed, poisoned(m, n, dtype=dtype), fast=False, **launch), 1e-3, "PTX vs Triton")
    if launch.get("weights_as_a", True):
        assert_close(int_gemm_fwd(x, packed, poisoned(m, n, dtype=dtype), fast=True, weights_as_a=True),
                     int_gemm_fwd(x, packed, poisoned(m, n, dtype=dtype), fast=False, weights_as_a=True), 1e-3,
                     "GEMM, PTX vs Triton")


@GPU
# KDA's [q k v f_a b | g_a]; MLA's [q | kv_a] where a recipe keeps kv_a
@pytest.mark.parametrize("n, n_dense", [(12448, 128), (6144, 576)])
@pytest.mark.parametrize("m", [1, 16])
def test_mma_with_a_dense_tail_real_shapes(n, n_dense, m):
    _, packed = packed_linear(4, True, 128, n, 2304)
    dense = (torch.randn(n_dense, 2304, device=DEVICE) * 0.02).to(torch.bfloat16)
    x = torch.randn(m, 2304, device=DEVICE, dtype=torch.bfloat16)
    want = torch.cat([naive_int_linear(x, packed).float(), x.float() @ dense.float().t()], dim=-1)
    y = int_mma_fwd(x, packed, poisoned(m, n + n_dense, dtype=x.dtype), dense=dense, locks=dense_locks(packed, n_dense))
    assert_close(y, want, BOUND[x.dtype], "dense tail")
