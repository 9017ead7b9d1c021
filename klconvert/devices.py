"""The devices klconvert runs and quantizes on, named once: the CLI's --device choices are DEVICE_TYPES, and every
device the library is given (quantize's, eval's; load's, through the runtime) is held to them by checked_device.

Importing this module does not load torch (the CLI names the choices in --help without it); checking a device does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from klconvert.errors import KLError

if TYPE_CHECKING:
    import torch

# cpu, or cuda: the GPU torch makes current (the first it sees); from Python, cuda:N for the N-th
DEVICE_TYPES = ("cpu", "cuda")


def checked_device(device: str | torch.device | None) -> torch.device:
    """`device` as the torch.device to use, or a KLError naming --device: one of DEVICE_TYPES, a GPU only where torch
    sees one, and cuda:N only for a GPU it sees (N below its count; a larger N was torch's "invalid device ordinal"
    mid-run). None: cuda when torch sees a GPU, else cpu."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:   # a torch.device, or a name torch reads; anything else (an int torch would take as cuda:N) is not one
        chosen = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except RuntimeError:   # torch's words for a name it does not know
        chosen = None
    if chosen is None or chosen.type not in DEVICE_TYPES or (chosen.type == "cpu" and chosen.index not in (None, 0)):
        raise KLError(f"--device {device!r} is not supported; use --device cpu or --device cuda (from Python, cuda:N "
                      "also picks the N-th GPU)")
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KLError(f"--device {device}: no CUDA device is visible to torch; use --device cpu")
        if chosen.index is not None and chosen.index >= count:
            seen = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise KLError(f"--device {device}: torch sees {count} CUDA device{'s' if count > 1 else ''} ({seen}); "
                          "pick one of those (CUDA_VISIBLE_DEVICES decides which GPUs it sees)")
    return chosen
