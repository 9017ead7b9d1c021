"""int_linear (W4A16/W8A16 GEMV and GEMM) against its fp32 twin, on weights packed by compressed-tensors."""
import pytest
import torch
from helpers import DEVICE, GPU, assert_close, ct_compress, ct_decompress, poisoned

from klconvert.kernels.int_linear import int_gemv_fwd, int_linear, repack_int_weight
from klconvert.kernels.naive_int_linear import dequantize_int_weight, naive_int_linear

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


@pytest.mark.parametrize("m", [1, 7, 20])  # GEMV, GEMV, GEMM
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


def test_rejects_bad_group():
    with pytest.raises(ValueError, match="multiple of 128"):
        repack_int_weight(torch.zeros(16, 8, dtype=torch.int32), torch.ones(16, 1), None, (16, 64), 4, 64)


@GPU
@pytest.mark.parametrize("bits, n, k, m", [(4, 163840, 2304, 1), (8, 163840, 2304, 1), (4, 2304, 4096, 1),
                                           (4, 12288, 2304, 16), (8, 4096, 2304, 5), (4, 2304, 4096, 300)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_linear_real_shapes(bits, n, k, m, symmetric):
    _, packed = packed_linear(bits, symmetric, 128, n, k)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    y = int_linear(x, packed, out=poisoned(m, n, dtype=x.dtype))
    assert_close(y, naive_int_linear(x, packed), BOUND[x.dtype], "int_linear")
