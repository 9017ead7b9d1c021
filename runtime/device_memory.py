"""What the process can still have on a CUDA device -- not the card's total, which the CUDA context, other processes
and this one's own allocations already share -- and the caching allocator's refusal (torch.OutOfMemoryError) as
DeviceMemoryExhausted, a one-line KLError naming what ran out, the memory plan's figure and what asks for less;
ContextDoesNotFit, a plan past the room that a smaller context fits; BatchDoesNotFit, a plan no context fits at its
batch; PromptsDoNotFit, one whose largest fitting context is short of what its prompts take; WeightsDoNotFit, one
no context fits at a batch of one, the weights taking (nearly) all the room (on a device or the host); and
DepthCheckDoesNotFit, bench's depth check whose dequantized reference does not fit. Each is said with the levers of
the command that ran (COMMAND_LEVERS), the API's argument names where none did.

torch is imported where it is used: the command line words a refusal with this module, and starts without torch."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator

from klconvert.errors import KLError, first_line
from klconvert.units import counted, size_text

if TYPE_CHECKING:
    import torch

    from klconvert.quant import QuantScheme

OUT_OF_DEVICE_MEMORY = "out of GPU memory"   # how a refusal of device memory opens
# what asks for less of the device after a caller's own levers: a model of fewer bits, where the one that ran out has
# weights it could store in fewer (an engine knows its schemes), and, last, the GPU's other work
FEWER_BITS = "use a model of fewer bits (klconvert quantize --bits 4)"
FREE_THE_GPU = "stop what else holds the GPU"
FEWER_LAYERS = "time fewer --layers of a --preset"   # bench's, where it times a --preset of more than one layer


@dataclass(frozen=True)
class DeviceLevers:
    """What asks for less of the device in one klconvert command: `levers`, its own flags, `fewer_bits`, how it
    takes a model of fewer bits (None: it takes none -- quantize makes the bits, and holds a module at a time),
    `smaller_batch`, how it asks for fewer sequences (None: it plans none), `smaller_context`, the flag a refusal
    names with the largest context that fits (None: the API's argument stays -- bench words its own, as its rows
    plan more than the context asked), `smaller_weights`, its ways to fewer weights other than fewer bits, and
    `new_tokens`, the flag that sets the tokens made past the prompts (None: it plans none past what it is given)."""

    levers: tuple[str, ...]
    fewer_bits: str | None = FEWER_BITS
    smaller_batch: str | None = None
    smaller_context: str | None = None
    smaller_weights: tuple[str, ...] = ()
    new_tokens: str | None = None


# each command's own flags, as its out-of-GPU-memory line names them (the Python API's line names its arguments)
COMMAND_LEVERS = {
    "run": DeviceLevers(("lower --max-context", "give fewer prompts"),   # run has no --batch: its prompts are one
                        smaller_batch="give fewer prompts (--prompt-file)", smaller_context="--max-context",
                        new_tokens="--max-new-tokens"),
    "eval": DeviceLevers(("lower --max-tokens",), smaller_batch="lower --max-tokens", smaller_context="--max-tokens"),
    # a --model's layers are its config.json's, and a --preset of one layer has no fewer: PRESET_BENCH_LEVERS adds them
    "bench": DeviceLevers(("lower --context, --prefill or --batch",),
                          "time fewer bits (--bits 4 with --preset; a --model folder of klconvert quantize --bits 4)",
                          "lower --batch"),
    "quantize": DeviceLevers(("quantize on the CPU (--device cpu)",), None),
}
COMMAND_LEVERS["pull-and-quantize"] = COMMAND_LEVERS["quantize"]   # its quantize is quantize's
# bench timing a --preset of more than one layer: fewer of them hold fewer weights
PRESET_BENCH_LEVERS = replace(COMMAND_LEVERS["bench"], levers=(*COMMAND_LEVERS["bench"].levers, FEWER_LAYERS),
                              smaller_weights=(FEWER_LAYERS,))


def fewer_bits_hold_less(stored_schemes: dict[str, QuantScheme]) -> bool:
    """Whether a model of fewer bits would hold less than one whose quantized weights are stored as `stored_schemes`
    (by tensor name; none: every weight at 16 bits): not where every one is at 4 bits or fewer but lm_head, which
    every policy keeps at 8 (an out-of-memory line then says no --bits 4)."""
    return not stored_schemes or any(scheme.bits > 4 for name, scheme in stored_schemes.items()
                                     if not name.startswith("lm_head"))


def less_on_device(levers: tuple[str, ...], fewer_bits: str | None) -> str:
    """What asks for less of the device: `levers`, then `fewer_bits` where it applies, then freeing the GPU."""
    asks = [*levers, *([fewer_bits] if fewer_bits is not None else [])]
    return f"{', '.join(asks)}, or {FREE_THE_GPU}" if asks else FREE_THE_GPU


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


def free_the_gpu(device: torch.device, needed: int) -> str | None:
    """FREE_THE_GPU where `device`'s card, had this process it whole, would hold `needed` bytes: what else holds it
    is then what stands in the way; None where even the whole card is too small."""
    import torch

    _, card = torch.cuda.mem_get_info(device)
    return FREE_THE_GPU if needed <= card else None


class DeviceMemoryExhausted(KLError):
    """The device's memory ran out for what the runtime asked, though its memory plan was checked to fit: the plan
    is an estimate, and what else holds the device can grow after the check. `said`: what ran out, and where;
    `fewer_bits`: whether a model of fewer bits would hold less (None: not known, and not said)."""

    def __init__(self, said: str, less: str, fewer_bits: bool | None):
        super().__init__(f"{said}; {less}")
        self.said, self.fewer_bits = said, fewer_bits

    def for_command(self, ways: DeviceLevers | None) -> DeviceMemoryExhausted:
        """This refusal naming a command's own levers, `ways` (its COMMAND_LEVERS), not the API's arguments; as it is
        for none."""
        if ways is None:
            return self
        less = less_on_device(ways.levers, ways.fewer_bits if self.fewer_bits else None)
        return DeviceMemoryExhausted(self.said, less, self.fewer_bits)

    def ran_by(self, engine: str, less: tuple[str, ...], fewer_bits: bool) -> DeviceMemoryExhausted:
        """This refusal as `engine`'s, one of several models a command runs ("--reference tiny" of eval's two),
        asking for less by `less`, then by a model of fewer bits only where `fewer_bits` and the engine's own
        schemes allow it (not for eval's reference: a quantized one measures nothing)."""
        fewer = bool(self.fewer_bits) and fewer_bits
        return DeviceMemoryExhausted(f"{engine}: {self.said}", less_on_device(less, FEWER_BITS if fewer else None),
                                     fewer)


class ContextDoesNotFit(KLError):
    """A memory plan past the room its device (or the host) has, which a smaller context fits: at most `fit` tokens
    (`or_less`: fewer hold what is asked too), said with `smaller`, what sets the context (the Python API's argument;
    for_command: a command's flag), then `remedy`: the host's limit's, or on a GPU FREE_THE_GPU, where all of the
    host's memory or the whole card would hold the context asked."""

    def __init__(self, said: str, fit: int, or_less: bool, smaller: str, remedy: str | None):
        super().__init__(f"{said}; lower {smaller} to {fit}{' or less' if or_less else ''}"
                         + ("" if remedy is None else f", or {remedy}"))
        self.said, self.fit, self.or_less, self.remedy = said, fit, or_less, remedy

    def for_command(self, ways: DeviceLevers | None) -> ContextDoesNotFit:
        """This refusal naming a command's own flag for the context (`ways`, its COMMAND_LEVERS); as it is for a
        command with none."""
        if ways is None or ways.smaller_context is None:
            return self
        return self.ran_by("", ways.smaller_context)

    def ran_by(self, engine: str, smaller: str) -> ContextDoesNotFit:
        """This refusal as `engine`'s, one of several models a command runs (none: as it is), its context set by
        `smaller`."""
        return ContextDoesNotFit(f"{engine}: {self.said}" if engine else self.said, self.fit, self.or_less, smaller,
                                 self.remedy)


class BatchDoesNotFit(KLError):
    """A memory plan that no context fits at the batch asked (the device's or the host's room counted), said with
    `smaller`, how the caller asks for fewer sequences (the Python API's batch argument; for_command: a command's
    flags), then `remedy`: the host's limit's, or on a GPU FREE_THE_GPU, where all of the host's memory or the whole
    card would hold the batch."""

    def __init__(self, said: str, batch: int, smaller: str, remedy: str | None):
        super().__init__(f"{said}; no context fits a batch of {batch}: {smaller}"
                         + ("" if remedy is None else f", or {remedy}"))
        self.said, self.batch, self.remedy = said, batch, remedy

    def for_command(self, ways: DeviceLevers | None) -> BatchDoesNotFit:
        """This refusal naming a command's own way to a smaller batch (`ways`, its COMMAND_LEVERS); as it is for a
        command with none."""
        if ways is None or ways.smaller_batch is None:
            return self
        return BatchDoesNotFit(self.said, self.batch, ways.smaller_batch, self.remedy)


class PromptsDoNotFit(KLError):
    """A memory plan past the room its device (or the host) has, whose largest fitting context, `fit` tokens, is
    short of the `needed` the prompts take (the longest plus the new tokens): a smaller context would be refused in
    turn. Said with `fewer_prompts`, how the caller gives fewer (at a batch of more than one), and `new_tokens`, what
    sets the new tokens (the Python API's arguments; for_command: a command's flags), then `remedy`: the host's
    limit's, or on a GPU FREE_THE_GPU where the whole card would hold the prompts."""

    def __init__(self, said: str, needed: int, fit: int, batch: int, fewer_prompts: str, new_tokens: str,
                 remedy: str | None):
        shorter = f"{fewer_prompts} or shorter ones" if batch > 1 else "shorten the prompt"
        super().__init__(f"{said}; no context holding the prompts fits: they need {counted(needed, 'token')} "
                         f"(the longest prompt plus the new tokens), at most {fit:,} fit; {shorter}, or lower "
                         f"{new_tokens}"
                         + ("" if remedy is None else f", or {remedy}"))
        self.said, self.needed, self.fit, self.batch, self.remedy = said, needed, fit, batch, remedy

    def for_command(self, ways: DeviceLevers | None) -> PromptsDoNotFit:
        """This refusal naming a command's own flags for fewer prompts and new tokens (`ways`, its COMMAND_LEVERS);
        as it is for a command that plans no new tokens (eval, bench: their prompts are what they are given)."""
        if ways is None or ways.new_tokens is None or ways.smaller_batch is None:
            return self
        return PromptsDoNotFit(self.said, self.needed, self.fit, self.batch, ways.smaller_batch, ways.new_tokens,
                               self.remedy)


class WeightsDoNotFit(KLError):
    """A memory plan no context fits at a batch of one, which no smaller batch or context helps: the weights, `weights`
    bytes, are past the room its device (or the host) has (`alone`), or leave too little of it for the smallest
    context. Said with what holds fewer weights: `less`, the caller's own ways, then `fewer`, a model of fewer bits,
    only where `fewer_bits` (fewer_bits_hold_less: none where every weight is at 4 bits already), then `remedy`:
    the host's limit's, or on a GPU FREE_THE_GPU where the whole card would hold the plan; with none of these, that
    the device cannot hold the model."""

    def __init__(self, said: str, weights: int, alone: bool, fewer_bits: bool, remedy: str | None,
                 less: tuple[str, ...] = (), fewer: str | None = FEWER_BITS):
        asks = [*less, *([fewer] if fewer_bits and fewer is not None else []),
                *([remedy] if remedy is not None else [])]
        room = (f"the weights alone need {size_text(weights)}" if alone else
                f"even the smallest context does not fit beside the weights ({size_text(weights)})")
        super().__init__(f"{said}; {room}: {', or '.join(asks) if asks else 'this device cannot hold this model'}")
        self.said, self.weights, self.alone, self.fewer_bits, self.remedy = said, weights, alone, fewer_bits, remedy

    def for_command(self, ways: DeviceLevers | None) -> WeightsDoNotFit:
        """This refusal naming a command's own ways to fewer weights (`ways`, its COMMAND_LEVERS); as it is for
        none."""
        if ways is None:
            return self
        return WeightsDoNotFit(self.said, self.weights, self.alone, self.fewer_bits, self.remedy,
                               ways.smaller_weights, ways.fewer_bits)

    def ran_by(self, engine: str, fewer_bits: bool) -> WeightsDoNotFit:
        """This refusal as `engine`'s, one of several models a command runs, offering a model of fewer bits only
        where `fewer_bits` too (not for eval's reference: a quantized one measures nothing)."""
        return WeightsDoNotFit(f"{engine}: {self.said}", self.weights, self.alone, self.fewer_bits and fewer_bits,
                               self.remedy)


class DepthCheckDoesNotFit(KLError):
    """bench's depth check past the GPU's room: the PyTorch path it compares against holds every weight dequantized.
    `said`: that, and where, with how to skip the check; then `less`, the caller's ways to fewer weights (none
    from the Python API, whose config sets them; for_command: bench's smaller_weights -- fewer bits are no way, the
    reference being dequantized whatever the bits), then `remedy`: FREE_THE_GPU where the whole card would hold the
    reference (free_the_gpu)."""

    def __init__(self, said: str, remedy: str | None, less: tuple[str, ...] = ()):
        asks = [*less, *([remedy] if remedy is not None else [])]
        super().__init__("".join([said, *(f", or {ask}" for ask in asks)]))
        self.said, self.remedy = said, remedy

    def for_command(self, ways: DeviceLevers | None) -> DepthCheckDoesNotFit:
        """This refusal naming a command's own ways to fewer weights (`ways`, its COMMAND_LEVERS); as it is for
        none."""
        return self if ways is None else DepthCheckDoesNotFit(self.said, self.remedy, ways.smaller_weights)


def device_exhausted(error: BaseException, less: tuple[str, ...], doing: str = "", planned: int | None = None,
                     fewer_bits: bool | None = None) -> DeviceMemoryExhausted | None:
    """The DeviceMemoryExhausted for `error` when it is torch's refusal of device memory, naming what was being done
    (`doing`), the plan's figure (`planned` bytes, where one was made) and what asks for less: `less`, the caller's
    levers, then FEWER_BITS where `fewer_bits`; None for any other error."""
    torch = sys.modules.get("torch")   # not imported: nothing of torch's raised `error`
    if torch is None or not isinstance(error, torch.OutOfMemoryError):
        return None
    plan = "" if planned is None else f", where the memory plan counts {size_text(planned)}"
    refusal = first_line(error).partition(_REFUSAL_GOES_ON)[0]
    return DeviceMemoryExhausted(f"{OUT_OF_DEVICE_MEMORY}{f' {doing}' if doing else ''}{plan} ({refusal})",
                                 less_on_device(less, FEWER_BITS if fewer_bits else None), fewer_bits)


@contextmanager
def device_allocation(doing: str, planned: int, less: tuple[str, ...], fewer_bits: bool) -> Iterator[None]:
    """Around work on a device: torch's refusal of device memory becomes device_exhausted's one line; any other
    error passes as it is."""
    try:
        yield
    except RuntimeError as e:   # torch.OutOfMemoryError is one
        exhausted = device_exhausted(e, less, doing, planned, fewer_bits)
        if exhausted is None:
            raise
        raise exhausted from None
