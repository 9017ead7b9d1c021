"""What an integer scheme may be -- its bits, its group sizes, its range observers -- and the lines refusing others.
Torch-free, unlike the arithmetic in groupwise.py: a command checks its flags and a recipe before it imports torch
(~2 s of CPU)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from klconvert.errors import KLError, either, shown

SUPPORTED_BITS = (4, 8)  # an int scheme's bits (kernels/ check their own: they import nothing from the package)
CHANNEL = -1  # group_size meaning "one group per output row" (compressed-tensors strategy "channel")
GROUP_SIZE_STEP = 8  # every group size but CHANNEL is a positive multiple of it
# the group sizes every refusal of one suggests: powers of two that MatMulNBits (ONNX) takes as blocks, too
USUAL_GROUP_SIZES = (32, 64, 128)
OBSERVERS = ("minmax", "mse")


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


def unsupported_observer(observer, flag: str | None = None) -> str:
    """The line refusing `observer`, not one of OBSERVERS: as a recipe and the library name it, or as the command
    line's `flag` (--observer) does."""
    return f"{flag or 'observer'} {shown(observer)} is not supported; use {either(OBSERVERS, flag)}"
