"""A decode step's MLA cache rows in one launch: each sequence's latent RMS-normed and its shared key, written at its
own position, as bf16 or as e4m3 with the row's scale. Its PyTorch form is four to six launches (the norm, the
concatenation, the index, the scatter, the row's quantization)."""
import torch
import triton
import triton.language as tl

from .naive_mla import FP8_MAX, FP8_SCALE_FLOOR
from .pdl import use_pdl, wait_for_inputs


@triton.jit
def _max_keeping_nan(a, b):
    """tl.max's own maximum drops a NaN: a non-finite row must get a non-finite scale, as the twin's amax gives it."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def mla_write_rows_kernel(kv, w, positions, cache, cache_scale, eps, stride_kv, stride_cb, stride_ct, stride_sb,
                          R: tl.constexpr, DR: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr,
                          SCALE_FLOOR: tl.constexpr, PDL: tl.constexpr):
    """One sequence per program: the whole row in registers."""
    wait_for_inputs(PDL)
    b = tl.program_id(0).to(tl.int64)
    offs_r, offs_k = tl.arange(0, R), tl.arange(0, DR)
    x = tl.load(kv + b * stride_kv + offs_r).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / R + eps)
    latent = (x * rstd * tl.load(w + offs_r).to(tl.float32)).to(kv.dtype.element_ty)  # rounded as the norm rounds
    key = tl.load(kv + b * stride_kv + R + offs_k)
    t = tl.load(positions + b).to(tl.int64)
    row = cache + b * stride_cb + t * stride_ct
    if FP8:
        lf, kf = latent.to(tl.float32), key.to(tl.float32)
        # NaN stays NaN through the amax, the floor and the clamp (which would make it a finite -448), and an inf
        # gives an inf scale (its value inf / inf = NaN): a non-finite row reads back non-finite, as the twin's
        amax = _max_keeping_nan(tl.reduce(tl.abs(lf), 0, _max_keeping_nan), tl.reduce(tl.abs(kf), 0, _max_keeping_nan))
        scale = tl.div_rn(_max_keeping_nan(amax, SCALE_FLOOR), FP8_MAX)
        lq = tl.clamp(tl.div_rn(lf, scale), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        kq = tl.clamp(tl.div_rn(kf, scale), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        tl.store(row + offs_r, lq.to(cache.dtype.element_ty))
        tl.store(row + R + offs_k, kq.to(cache.dtype.element_ty))
        tl.store(cache_scale + b * stride_sb + t, scale)
    else:
        tl.store(row + offs_r, latent.to(cache.dtype.element_ty))
        tl.store(row + R + offs_k, key.to(cache.dtype.element_ty))


def mla_write_rows(kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                   cache: torch.Tensor, cache_scale: torch.Tensor | None = None) -> None:
    """kv [B, R + Dr]: each sequence's latent (first R) and shared key, as kv_a_proj_with_mqa gives them; norm_weight
    [R]; positions [B] int32/int64 (device; no host sync, CUDA-graph safe); cache [B, L, R + Dr] bf16 (or any float
    dtype), or float8_e4m3fn with cache_scale [B, L] fp32 (row = values * scale, scale = amax / 448 as
    naive_mla.quantize_mla_cache_rows). Writes cache[b, positions[b]] = [rmsnorm(latent) * w, key]; positions must
    lie inside the cache (the caller's plan guarantees it: this kernel does not check device values)."""
    B, W = kv.shape
    R = norm_weight.shape[0]
    Dr = W - R
    where = f"mla_write_rows (B={B}, R={R}, Dr={Dr})"
    for name, n in (("R", R), ("Dr", Dr)):
        if n < 1 or n & (n - 1):
            raise ValueError(f"{where}: {name} must be a power of two")
    if cache.dim() != 3 or cache.shape[0] != B or cache.shape[2] != W or cache.stride(-1) != 1 or kv.stride(-1) != 1:
        raise ValueError(f"{where}: cache [{B}, L, {W}] and kv with contiguous last dims expected, got cache "
                         f"{list(cache.shape)}")
    if tuple(positions.shape) != (B,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: positions must be int32 or int64 [{B}]")
    fp8 = cache.dtype == torch.float8_e4m3fn
    if fp8 != (cache_scale is not None) or (fp8 and tuple(cache_scale.shape) != tuple(cache.shape[:2])):
        raise ValueError(f"{where}: cache_scale [B, L] goes with (and only with) a float8_e4m3fn cache")
    if B == 0:
        return
    pdl = use_pdl(cache.device)
    mla_write_rows_kernel[(B,)](kv, norm_weight, positions, cache, cache_scale if fp8 else cache, eps, kv.stride(0),
                                cache.stride(0), cache.stride(1), cache_scale.stride(0) if fp8 else 0, R=R, DR=Dr,
                                FP8=fp8, FP8_MAX=FP8_MAX, SCALE_FLOOR=FP8_SCALE_FLOOR, PDL=pdl, launch_pdl=pdl,
                                num_warps=4)
