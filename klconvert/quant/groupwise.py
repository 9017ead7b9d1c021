"""Group-wise integer quantization of a 2-D weight, with compressed-tensors' exact numerics."""
from __future__ import annotations

import torch

from klconvert.errors import KLError, ValuesRefused
from klconvert.quant.group_rules import OBSERVERS, check_groupwise, unsupported_observer

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The arithmetic below copies compressed-tensors 0.20 step by step, in the same dtypes, so that its
# decompressor reproduces our dequantized weights bit for bit:
# - min/max per group in the weight's dtype (llm-compressor's min-max observer), widened to include 0;
# - calculate_qparams: symmetric scale = absmax / (range / 2), with range = qmax - qmin = 2**bits - 1,
#   so int4 uses absmax / 7.5 over the signed range [-8, 7] (+absmax rounds to 8 and clamps to 7);
#   asymmetric scale = (max - min) / range, zero point = qmin - min / scale, clamped, rounded to int8;
#   a zero scale becomes the scale dtype's eps;
# - quantize (the torch path, as on CPU): x / scale (+ zero point), clamp to [qmin, qmax], round half
#   to even, int8;  dequantize: (q - zero point) * scale, all in the scale's dtype.
# On CUDA, compressed-tensors quantizes with a Triton kernel that divides in fp32 instead of the
# weight's dtype; its decompressor (what vLLM and transformers run) is the same on every device.


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer range compressed-tensors quantizes to: [-2**(bits-1), 2**(bits-1) - 1]."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# llm-compressor's MSE observer (observers/mse.py) and its defaults: shrink the min-max range by p = 1,
# 1 - 1/MSE_GRID, ..., MSE_MAX_SHRINK * MSE_GRID steps in all (down to 0.81, as its loop runs), keep per group
# the p whose round trip has the least sum |w - deq(q(w))| ** MSE_NORM, stop once MSE_PATIENCE steps in a row
# improve no group.
MSE_GRID, MSE_MAX_SHRINK, MSE_NORM, MSE_PATIENCE = 100, 0.20, 2.4, 5


def _qparams(lo, hi, symmetric: bool, q_min, q_max, dtype):
    """calculate_qparams: (scale, zero point as int8 or None) of groups with bounds lo <= 0 <= hi."""
    bit_range = q_max - q_min
    if symmetric:
        scale = torch.max(lo.abs(), hi.abs()) / (bit_range.to(dtype) / 2)
        zero_point = None
    else:
        scale = (hi - lo) / bit_range.to(dtype)
        zp = torch.clamp(q_min - lo / scale, q_min, q_max)
        # an all-zero group gives 0/0; compressed-tensors casts that NaN to int8 (0 on x86): pin it to 0
        zp = torch.nan_to_num(zp, nan=0.0)
        zero_point = torch.round(zp).to(torch.int8)
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype, device=lo.device)
    return torch.where(scale == 0, eps, scale), zero_point


def _codes(groups, scale, zero_point, q_min, q_max):
    """q = round(clamp(w / scale (+ zero point))), int8, per group: (out, G, gs)."""
    x = groups / scale.unsqueeze(-1)
    if zero_point is not None:
        x += zero_point.to(groups.dtype).unsqueeze(-1)
    return torch.round(torch.clamp(x, q_min, q_max)).to(torch.int8)


def _mse_bounds(groups, lo, hi, symmetric: bool, q_min, q_max):
    """The MSE observer's shrunk (lo, hi) per group."""
    best_lo, best_hi = lo, hi
    best_err = torch.full(lo.shape, float("inf"), device=lo.device)
    stale = 0
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        s_lo, s_hi = lo * p, hi * p
        scale, zp = _qparams(s_lo, s_hi, symmetric, q_min, q_max, groups.dtype)
        q = _codes(groups, scale, zp, q_min, q_max).to(scale.dtype)
        deq = (q - (zp.to(scale.dtype).unsqueeze(-1) if zp is not None else 0)) * scale.unsqueeze(-1)
        err = (deq - groups).abs().float().pow(MSE_NORM).sum(-1)
        better = err < best_err
        if bool(better.any()):
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, s_lo, best_lo), torch.where(better, s_hi, best_hi)
            stale = 0
        else:
            stale += 1
            if stale >= MSE_PATIENCE:
                break
    return best_lo, best_hi


@torch.no_grad()
def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                       name: str = "weight", observer: str = "minmax") -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor | None]:
    """Quantize w [out, in] in groups of `group_size` input columns (CHANNEL (-1) or None: per output channel).

    observer "minmax": each group's range is its min and max (compressed-tensors' and llm-compressor's default);
    "mse": that range shrunk to where the round trip's error is least (llm-compressor's MSE observer).
    Returns (q int8 [out, in] in [qmin, qmax], scale [out, in/group] in w's dtype,
    zero_point int8 [out, in/group] or None when symmetric).
    """
    gs = check_groupwise(name, tuple(w.shape), bits, group_size)
    if w.dtype not in _SCALE_DTYPES:
        raise KLError(f"{name}: dtype {w.dtype} is not a floating-point weight; only float weights can be quantized")
    if observer not in OBSERVERS:
        raise KLError(f"{name}: {unsupported_observer(observer)}")
    qmin, qmax = qrange(bits)
    # 0-dim fp32 bounds, as compressed-tensors' calculate_range builds them (they do not widen bf16 math)
    q_min, q_max = torch.tensor(float(qmin), device=w.device), torch.tensor(float(qmax), device=w.device)

    groups = w.unflatten(-1, (w.shape[-1] // gs, gs))                       # (out, G, gs)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)                       # (out, G)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):  # NaN and Inf reach min or max
        raise ValuesRefused(f"{name}: the weight holds NaN or Inf values; the checkpoint is damaged -- re-download it")
    lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    if observer == "mse":
        lo, hi = _mse_bounds(groups, lo, hi, symmetric, q_min, q_max)
    scale, zero_point = _qparams(lo, hi, symmetric, q_min, q_max, w.dtype)
    return _codes(groups, scale, zero_point, q_min, q_max).flatten(-2), scale, zero_point


@torch.no_grad()
def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """(q - zero_point) * scale per group, computed in scale's dtype; the group size is in / scale.shape[1]."""
    n_groups = scale.shape[-1]
    x = q.unflatten(-1, (n_groups, q.shape[-1] // n_groups)).to(scale.dtype)  # (out, G, gs)
    if zero_point is not None:
        x = x - zero_point.to(scale.dtype).unsqueeze(-1)
    w = (x * scale.unsqueeze(-1)).flatten(-2)                                 # (out, in)
    return w if dtype is None else w.to(dtype)
