"""Plain-PyTorch fp32 twin of mla_decode: per sequence, its first `length` cache rows, dequantized, attended; and the
e4m3 row quantization that fills an fp8 cache (PyTorch ops, shared by the runtime and the kernel tests)."""
import torch

from .naive_rms_norm import rms_norm

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_SCALE_FLOOR = 1e-12  # an all-zero row still gets a positive scale (its values stay zero)


def quantize_mla_cache_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [..., R + Dr] -> (float8_e4m3fn values [..., R + Dr], fp32 scale [...]) with row = values * scale and
    scale = amax(|row|) / 448 (floored so an all-zero row does not divide by zero). PyTorch ops only: graph-safe."""
    x = rows.float()
    scale = x.abs().amax(dim=-1).clamp_min(FP8_SCALE_FLOOR) / FP8_MAX
    values = (x / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, scale


def naive_mla_decode(q_lat, q_rope, cache, lengths, scale, cache_scale=None, *, length_offset=0):
    B, H, R = q_lat.shape
    o = torch.zeros(B, H, R, device=q_lat.device, dtype=torch.float32)
    for b, n in enumerate((lengths + length_offset).clamp(0, cache.shape[1]).tolist()):
        if n == 0:
            continue
        rows = cache[b, :n].float()  # [n, R + Dr]
        if cache_scale is not None:
            rows = rows * cache_scale[b, :n].float()[:, None]
        c_lat, k_rope = rows[:, :R], rows[:, R:]
        scores = (q_lat[b].float() @ c_lat.T + q_rope[b].float() @ k_rope.T) * scale  # [H, n]
        o[b] = scores.softmax(dim=-1) @ c_lat
    return o


def naive_mla_write_rows(kv, norm_weight, eps, positions, cache, cache_scale=None) -> None:
    """The twin of mla_cache.mla_write_rows: row b = [rmsnorm(kv[b, :R]) * w (rounded to kv's dtype), kv[b, R:]],
    written to cache[b, positions[b]] (e4m3 with its scale when cache_scale is given)."""
    R = norm_weight.shape[0]
    normed = rms_norm(kv[:, :R], norm_weight, eps)
    rows = torch.cat([normed, kv[:, R:]], dim=-1)
    b = torch.arange(kv.shape[0], device=kv.device)
    if cache_scale is None:
        cache[b, positions] = rows.to(cache.dtype)
    else:
        cache[b, positions], cache_scale[b, positions] = quantize_mla_cache_rows(rows)
