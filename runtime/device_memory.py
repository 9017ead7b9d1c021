"""What the process can still have on a CUDA device -- not the card's total, which the CUDA context, other processes
and this one's own allocations already share -- and the caching allocator's refusal (torch.OutOfMemoryError) as
DeviceMemoryExhausted, a one-line KLError naming what ran out, the memory plan's figure and what asks for less.

torch is imported where it is used: the command line words a refusal with this module, and starts without torch."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from klconvert.errors import KLError, first_line
from klconvert.units import size_text

if TYPE_CHECKING:
    import torch

OUT_OF_DEVICE_MEMORY = "out of GPU memory"   # how a refusal of device memory opens
# what asks for less of the device, where a refusal has nothing nearer to name
LESS_ON_DEVICE = "give fewer prompts, or use a model of fewer bits (klconvert quantize --bits 4)"
# where torch's refusal goes on past what was asked and what is free, to what this process holds and allocator advice
_REFUSAL_GOES_ON = " Including non-PyTorch memory"


def device_room(device: torch.device, held: int) -> int:
    """Bytes this process can have on `device`: what the driver has free, what torch's caching allocator keeps
    reserved but unused (free to this process only), and `held`, the caller's own bytes there that what it plans
    replaces."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached + held


class DeviceMemoryExhausted(KLError):
    """The device's memory ran out for what the runtime asked, though its memory plan was checked to fit: the plan
    is an estimate, and what else holds the device can grow after the check."""


def device_exhausted(error: BaseException, less: str, doing: str = "",
                     planned: int | None = None) -> DeviceMemoryExhausted | None:
    """The DeviceMemoryExhausted for `error` when it is torch's refusal of device memory, naming what was being done
    (`doing`), the plan's figure (`planned` bytes, where one was made) and `less`, what asks for less; None for any
    other error."""
    torch = sys.modules.get("torch")   # not imported: nothing of torch's raised `error`
    if torch is None or not isinstance(error, torch.OutOfMemoryError):
        return None
    plan = "" if planned is None else f", where the memory plan counts {size_text(planned)}"
    refusal = first_line(error).partition(_REFUSAL_GOES_ON)[0]
    return DeviceMemoryExhausted(f"{OUT_OF_DEVICE_MEMORY}{f' {doing}' if doing else ''}{plan} ({refusal}); {less}")


@contextmanager
def device_allocation(doing: str, planned: int, less: str) -> Iterator[None]:
    """Around work on a device: torch's refusal of device memory becomes device_exhausted's one line; any other
    error passes as it is."""
    try:
        yield
    except RuntimeError as e:   # torch.OutOfMemoryError is one
        exhausted = device_exhausted(e, less, doing, planned)
        if exhausted is None:
            raise
        raise exhausted from None
