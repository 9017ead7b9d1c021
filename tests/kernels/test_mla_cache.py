"""mla_write_rows against its twin: bf16 and e4m3 caches, int32 and int64 positions, sequences at different
positions, rows around the written one untouched, a strided kv (a slice of the input projection's output)."""
import pytest
import torch
from helpers import DEVICE, GPU

from klconvert.kernels.mla_cache import mla_write_rows
from klconvert.kernels.naive_mla import naive_mla_write_rows

FP8 = torch.float8_e4m3fn


def case(B, L, R, Dr, kv_dtype, cache_dtype, pos_dtype):
    wide = torch.randn(B, 40 + R + Dr, device=DEVICE).to(kv_dtype) * 3
    kv = wide[:, 40:]                                           # a strided view, as take() gives it
    w = torch.randn(R, device=DEVICE)
    positions = torch.randperm(L, device=DEVICE)[:B].to(pos_dtype)
    cache = torch.randn(B, L, R + Dr, device=DEVICE).to(cache_dtype)
    scale = torch.rand(B, L, device=DEVICE) if cache_dtype == FP8 else None
    return kv, w, positions, cache, scale


@pytest.mark.parametrize("B, L, R, Dr", [(1, 5, 16, 8), (3, 17, 64, 16), (2, 9, 512, 64)])
@pytest.mark.parametrize("kv_dtype, cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                   (torch.bfloat16, FP8), (torch.float32, FP8)])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_mla_write_rows_equals_its_twin(B, L, R, Dr, kv_dtype, cache_dtype, pos_dtype):
    if cache_dtype == FP8 and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 needs sm_89+")
    kv, w, positions, cache, scale = case(B, L, R, Dr, kv_dtype, cache_dtype, pos_dtype)
    want_cache, want_scale = cache.clone(), None if scale is None else scale.clone()
    naive_mla_write_rows(kv, w, 1e-6, positions.long(), want_cache, want_scale)
    mla_write_rows(kv, w, 1e-6, positions, cache, scale)
    if cache_dtype == FP8:
        # a normed value an ulp of kv's dtype apart (the kernel's rsqrt is the GPU's approximate one) moves the
        # scale as much when it is the row's largest, and can land one e4m3 step away; Triton's CPU interpreter
        # also rounds a value that should round up into the next binade down a binade instead (0.124 -> 0.0625,
        # not 0.125): a few in a hundred
        got, want = cache.float(), want_cache.float()
        differ = got != want
        g, w_ = got[differ], want[differ]
        one_step = (g - w_).abs() <= torch.clamp(w_.abs() * 0.125, min=2 ** -9)   # 2^-9: e4m3's subnormal step
        assert torch.all(one_step | (g == w_ / 2) if DEVICE == "cpu" else one_step)
        assert differ.sum().item() <= B * (R + Dr) // 10
        assert torch.allclose(scale, want_scale, rtol=2 ** -7, atol=0)
    elif cache_dtype == torch.float32:
        assert torch.allclose(cache, want_cache, rtol=1e-6, atol=1e-6)
    else:
        assert (cache.float() - want_cache.float()).abs().max() <= 2 ** -7 * want_cache.float().abs().max()
    untouched = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    untouched[torch.arange(B, device=DEVICE), positions.long()] = False
    assert torch.equal(cache.float()[untouched], want_cache.float()[untouched])


@GPU
def test_mla_write_rows_at_real_shapes_in_bf16():
    """Four sequences, a 4,096-row cache, R 512 and Dr 64: within a bf16 ulp of the twin (the norm's rsqrt)."""
    kv, w, positions, cache, _ = case(4, 4096, 512, 64, torch.bfloat16, torch.bfloat16, torch.int64)
    want = cache.clone()
    naive_mla_write_rows(kv, w, 1e-6, positions, want)
    mla_write_rows(kv, w, 1e-6, positions, cache)
    assert (cache.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()


def test_mla_write_rows_refuses_what_it_cannot_write():
    kv, w, positions, cache, _ = case(2, 5, 16, 8, torch.float32, torch.float32, torch.int64)
    with pytest.raises(ValueError, match="power of two"):
        mla_write_rows(kv[:, :20], w[:12], 1e-6, positions, cache[..., :20])
    with pytest.raises(ValueError, match="positions"):
        mla_write_rows(kv, w, 1e-6, positions.float(), cache)
    with pytest.raises(ValueError, match="cache_scale"):
        mla_write_rows(kv, w, 1e-6, positions, cache, torch.ones(2, 5, device=DEVICE))


def test_a_non_finite_row_reads_back_non_finite_in_e4m3():
    """A NaN or an inf in kv (the latent or the shared key) makes its e4m3 row NaN or inf, as the twin's, where the
    kernel wrote finite values before (tl.max and tl.clamp drop a NaN: -448 in its place, the row's scale taken from
    the rest). An inf's scale is inf (inf / inf = NaN as its value): the row reads back non-finite, as the twin's.
    A finite row beside them stays finite."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 needs sm_89+")
    kv, w, positions, cache, scale = case(5, 7, 16, 16, torch.bfloat16, FP8, torch.int64)
    for b, (at, value) in enumerate([(2, "nan"), (16 + 2, "nan"), (2, "inf"), (16 + 2, "-inf")]):
        kv[b, at] = float(value)
    want_cache, want_scale = cache.clone(), scale.clone()
    naive_mla_write_rows(kv, w, 1e-6, positions, want_cache, want_scale)
    mla_write_rows(kv, w, 1e-6, positions, cache, scale)
    b = torch.arange(5, device=DEVICE)
    got, want = cache.float() * scale[..., None], want_cache.float() * want_scale[..., None]
    assert not want[b[:4], positions[:4]].isfinite().any() and want[4, positions[4]].isfinite().all()
    assert torch.equal(got.isfinite(), want.isfinite())
    assert torch.equal(scale.isnan(), want_scale.isnan()) and torch.equal(scale.isinf(), want_scale.isinf())
