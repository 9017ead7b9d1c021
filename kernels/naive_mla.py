"""Plain-PyTorch fp32 twin of mla_decode: per sequence, its first `length` cache rows, dequantized, attended."""
import torch


def naive_mla_decode(q_lat, q_rope, cache, lengths, scale, cache_scale=None, *, out=None):
    B, H, R = q_lat.shape
    o = torch.zeros(B, H, R, device=q_lat.device, dtype=torch.float32)
    for b, n in enumerate(lengths.clamp(0, cache.shape[1]).tolist()):
        if n == 0:
            continue
        rows = cache[b, :n].float()  # [n, R + Dr]
        if cache_scale is not None:
            rows = rows * cache_scale[b, :n].float()[:, None]
        c_lat, k_rope = rows[:, :R], rows[:, R:]
        scores = (q_lat[b].float() @ c_lat.T + q_rope[b].float() @ k_rope.T) * scale  # [H, n]
        o[b] = scores.softmax(dim=-1) @ c_lat
    return o if out is None else out.copy_(o)
