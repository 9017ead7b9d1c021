"""Group-wise integer quantization of a 2-D weight, with compressed-tensors' exact numerics."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from klconvert.errors import KLError, ValuesRefused, either, shown

SUPPORTED_BITS = (4, 8)  # an int scheme's bits (kernels/ check their own: they import nothing from the package)
CHANNEL = -1  # group_size meaning "one group per output row" (compressed-tensors strategy "channel")
GROUP_SIZE_STEP = 8  # every group size but CHANNEL is a positive multiple of it
# the group sizes every refusal of one suggests: powers of two that MatMulNBits (ONNX) takes as blocks, too
USUAL_GROUP_SIZES = (32, 64, 128)
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


def _listed(sizes: Sequence[int]) -> str:
    """Group sizes as a message offers them: "32, 64 or 128"."""
    head = ", ".join(map(str, sizes[:-1]))
    return f"{head} or {sizes[-1]}" if head else str(sizes[-1])


GROUP_SIZE_ADVICE = _listed(USUAL_GROUP_SIZES)


def check_group_size(group_size: int, where: str = "", flag: str | None = None) -> None:
    """KLError, its line starting with `where`, unless group_size is CHANNEL or a positive multiple of
    GROUP_SIZE_STEP; the size said as the command line's `flag` (--group-size) sets it, where it was given there."""
    if group_size != CHANNEL and (group_size <= 0 or group_size % GROUP_SIZE_STEP):
        said, use = (f"{flag} ", f"{flag} {GROUP_SIZE_ADVICE}") if flag else ("group size ", GROUP_SIZE_ADVICE)
        raise KLError(f"{where}{said}{shown(group_size)} is not a positive multiple of {GROUP_SIZE_STEP} (or -1 for "
                      f"per-channel); use {use}")


def whole_groups_advice(in_dims: Iterable[int], said: str, weights: str) -> str:
    """What to use for a group size that leaves one of `weights` (what they are, for the message: "every weight the
    flags quantize") a partial group: the largest group size that divides every one of their `in_dims`, their greatest
    common divisor, and the usual ones that divide it too, each as `said` ("--group-size", "group_size") gives it --
    only a divisor of it leaves none of them partial."""
    common = math.gcd(*in_dims)
    if common % GROUP_SIZE_STEP:
        return (f"no multiple of {GROUP_SIZE_STEP} divides the input dim of {weights} (their greatest common divisor "
                f"is {common}); use {said} -1 for one scale per row")
    smaller = [size for size in USUAL_GROUP_SIZES if size < common and common % size == 0]
    return (f"use {said} {common}, the largest that divides the input dim of {weights}"
            + (f", or a smaller one that does: {_listed(smaller)}" if smaller else ""))


def check_groupwise(name: str, shape: tuple[int, ...], bits: int, group_size: int | None) -> int:
    """Check a tensor can take this scheme; return the effective group size (the input dim for channel)."""
    if bits not in SUPPORTED_BITS:
        raise KLError(f"{name}: {bits}-bit integer quantization is not supported; use {either(SUPPORTED_BITS)} bits")
    if len(shape) != 2:
        raise KLError(f"{name}: shape {list(shape)} is not a 2-D [out, in] weight; only linear weights can be "
                      "quantized group-wise -- leave this tensor out of the recipe's targets")
    n_in = shape[1]
    if group_size is None or group_size == CHANNEL:
        return n_in
    check_group_size(group_size, f"{name}: ")
    if n_in % group_size:
        raise KLError(f"{name}: group size {group_size} does not divide the input dim of shape {list(shape)}; "
                      f"use a group size that divides {n_in}")
    return group_size


OBSERVERS = ("minmax", "mse")
# llm-compressor's MSE observer (observers/mse.py) and its defaults: shrink the min-max range by p = 1,
# 1 - 1/MSE_GRID, ..., MSE_MAX_SHRINK * MSE_GRID steps in all (down to 0.81, as its loop runs), keep per group
# the p whose round trip has the least sum |w - deq(q(w))| ** MSE_NORM, stop once MSE_PATIENCE steps in a row
# improve no group.
MSE_GRID, MSE_MAX_SHRINK, MSE_NORM, MSE_PATIENCE = 100, 0.20, 2.4, 5


def unsupported_observer(observer, flag: str | None = None) -> str:
    """The line refusing `observer`, not one of OBSERVERS: as a recipe and the library name it, or as the command
    line's `flag` (--observer) does."""
    return f"{flag or 'observer'} {shown(observer)} is not supported; use {either(OBSERVERS, flag)}"


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
