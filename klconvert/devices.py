"""The devices klconvert runs and quantizes on, named once: cpu, cuda (the GPU torch makes current, the first it sees)
or cuda:N (the N-th it sees). The CLI's --device reads its name with device_name as it parses; every device the
library is given (quantize's, eval's; load's, through the runtime; --device's, when the command runs) is held to the
GPUs torch sees by checked_device, which reads the name the same way.

Importing this module does not load torch, nor does device_name (the CLI names the devices in --help, and refuses a
name that is none, without it); checking a device against the GPUs does.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from klconvert.errors import KLError, argument

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = ("cpu", "cuda", "cuda:N")   # as --help and the messages name them
# a name as torch spells it (no sign, no leading zero; cpu:0 is cpu), read here and not by torch.device, which keeps N
# in a byte: it read cuda:255 as cuda (the current GPU) and cuda:128 as cuda:-128
_NAME = re.compile(r"(cpu)(?::0)?|(cuda)(?::(0|[1-9][0-9]*))?", re.ASCII)
# how a name that is none of them is refused, after the name (by the API as device=..., by --device's parser)
NOT_A_DEVICE = f"is not supported; use {', '.join(DEVICE_NAMES[:-1])} or {DEVICE_NAMES[-1]} (the N-th GPU torch sees)"


def device_name(device: object) -> tuple[str, int | None]:
    """`device`, a name, as its type (cpu or cuda) and its GPU's index (None: the current one), or a KLError naming
    device= and --device. Reads no torch."""
    match = _NAME.fullmatch(device) if isinstance(device, str) else None
    if match is None:
        raise KLError(f"{argument('device', '--device', device)} {NOT_A_DEVICE}")
    cpu, cuda, index = match.groups()
    return cpu or cuda, None if index is None else int(index)


def checked_device(device: str | torch.device | None) -> torch.device:
    """`device` -- a name (device_name) or a torch.device -- as the torch.device to use, or a KLError naming device=
    and --device: a GPU only where torch sees one, and cuda:N only for a GPU it sees (N below its count; a larger N
    was torch's "invalid device ordinal" mid-run). None: cuda when torch sees a GPU, else cpu."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device) if isinstance(device, torch.device) else device
    kind, index = device_name(name)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KLError(f"{argument('device', '--device', name)}: no CUDA device is visible to torch; use cpu")
        if index is not None and index >= count:
            seen = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise KLError(f"{argument('device', '--device', name)}: torch sees {count} CUDA "
                          f"device{'s' if count > 1 else ''} ({seen}); pick one of those (CUDA_VISIBLE_DEVICES decides "
                          "which GPUs it sees)")
    return torch.device(kind, index)
