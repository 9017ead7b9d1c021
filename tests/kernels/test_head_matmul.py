"""head_matmul against its twin: the two layouts MLA decode uses (a head's matrix, and a transposed view of one),
ragged sizes, 1 to 16 rows, bf16 and fp32, refused shapes."""
import pytest
import torch
from helpers import DEVICE, GPU, assert_close

from klconvert.kernels.head_matmul import head_matmul
from klconvert.kernels.naive_head_matmul import naive_head_matmul


def weights(H, K, N, transposed, dtype):
    """[H, K, N] with N contiguous, or the transpose view of an [H, N, K] tensor (K contiguous), as W_uv^T is."""
    if transposed:
        return torch.randn(H, N, K, device=DEVICE).to(dtype).transpose(1, 2)
    return torch.randn(H, K, N, device=DEVICE).to(dtype)


@pytest.mark.parametrize("B, H, K, N", [(1, 3, 40, 72), (5, 2, 128, 96), (16, 4, 33, 17)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_matmul_equals_its_twin(B, H, K, N, transposed, dtype):
    x = torch.randn(B, H + 1, K, device=DEVICE).to(dtype)[:, 1:]           # a strided view, as a split gives it
    w = weights(H, K, N, transposed, dtype)
    y = head_matmul(x, w)
    assert y.dtype == dtype and y.shape == (B, H, N)
    assert_close(y, naive_head_matmul(x, w), 1e-6 if dtype == torch.float32 else 8e-3, "y")


def test_head_matmul_writes_the_asked_dtype():
    x, w = torch.randn(2, 3, 64, device=DEVICE).bfloat16(), weights(3, 64, 32, False, torch.bfloat16)
    assert_close(head_matmul(x, w, torch.float32), naive_head_matmul(x, w), 1e-6, "fp32 out")


@GPU
@pytest.mark.parametrize("B", [1, 16])
def test_head_matmul_at_mla_shapes(B):
    """H 32, dn 128 into r 512 (the query), r 512 back to dv 128 through the transposed view (the output)."""
    kv_b = torch.randn(32, 256, 512, device=DEVICE).bfloat16() / 16
    w_uk, w_uv = kv_b.split([128, 128], dim=1)
    q = torch.randn(B, 32, 128, device=DEVICE).bfloat16()
    q_lat = head_matmul(q, w_uk)
    assert_close(q_lat, naive_head_matmul(q, w_uk), 8e-3, "q_lat")
    o = head_matmul(q_lat, w_uv.transpose(1, 2))
    assert_close(o, naive_head_matmul(q_lat, w_uv.transpose(1, 2)), 8e-3, "o")


def test_head_matmul_refuses_what_it_cannot_multiply():
    x, w = torch.randn(2, 3, 8, device=DEVICE), torch.randn(3, 8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="expected"):
        head_matmul(x, w[:2])
    with pytest.raises(ValueError, match="contiguous"):
        head_matmul(x.transpose(1, 2).contiguous().transpose(1, 2), w)
    with pytest.raises(ValueError, match="at most 16"):
        head_matmul(torch.randn(17, 3, 8, device=DEVICE), w)
