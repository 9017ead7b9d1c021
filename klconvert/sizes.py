"""Sizes given as text -- --gpu-memory, --max-shard-size, a recipe's gpu_memory -- read as bytes, or refused in one
line saying what was wrong. Torch-free: a command refuses a size before it imports torch (~2 s of CPU)."""
from __future__ import annotations

import re

from klconvert.errors import KLError, shown
from klconvert.units import binary_size_text

# The units a size takes, as the refusal of another lists them (any case); K, M, G and T are binary
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30,
          "TiB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_UNIT_BYTES = {"": 1, **{unit.lower(): n for unit, n in _UNITS.items()}}
# ASCII digits, letters and spaces only: str's \d and \s take other scripts' ('８０GiB'), which float() reads
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE | re.ASCII)
SIZE_BOUND = 2**64   # a size is fewer bytes than this (what a 64-bit count holds)
PAST_SIZE_BOUND = "is 2**64 bytes (16 EiB) or more, past the largest size it takes"   # SIZE_BOUND, as lines say
GPU_MEMORY_EXAMPLES = "80GiB, 24GB or 141G"   # what --gpu-memory's --help and refusals offer
SHARD_SIZE_EXAMPLES = "5GB or 500MB"   # what --max-shard-size's --help and refusals offer
# fewer bytes than this given with no unit (`--gpu-memory 80`) are no GPU's memory: a unit left off, refused; a GPU's
# memory of fewer in any form ('0GB', '1B'), on the command line or in a recipe, is refused too
LEAST_BARE_BYTES = 2**20


def parse_size(text: str, flag: str = "--gpu-memory", least_bare_bytes: int = LEAST_BARE_BYTES,
               examples: str = GPU_MEMORY_EXAMPLES) -> int:
    """'80GiB', '24GB', '141G' (binary), '85899345920' (no unit: bytes) -> bytes; `flag` names the option in the
    error, `examples` the sizes it suggests. A number with no unit under `least_bare_bytes` (but 0) is refused as a
    unit left off: a GPU's memory (the default); a shard's size passes 0, since any number of bytes is one."""
    m = _SIZE.match(text)
    if m is None:
        raise KLError(f"{flag} {text[:40]!r}: give a size like {examples}")
    if m.group(2).lower() not in _UNIT_BYTES:
        raise KLError(f"{flag} {text[:40]!r}: {m.group(2)[:10]!r} is not a unit it takes ({', '.join(_UNITS)}, or "
                      f"none for bytes); give a size like {examples}")
    size = float(m.group(1)) * _UNIT_BYTES[m.group(2).lower()]
    if not size < SIZE_BOUND:  # inf from a 400-digit number included
        raise KLError(f"{flag} {text[:40]!r} {PAST_SIZE_BOUND}; give a size like {examples}")
    if not m.group(2) and 0 < size < least_bare_bytes:
        raise KLError(f"{flag} {m.group(1)}: a size with no unit is bytes, and {binary_size_text(int(size))} is no "
                      f"GPU's memory; did you mean {m.group(1)}GB or {m.group(1)}GiB? give the unit")
    return int(size)


def gpu_memory_bytes(text: str) -> int:
    """`--gpu-memory`'s size (parse_size), refused under LEAST_BARE_BYTES in any form ('0', '0GB', '1B')."""
    size = parse_size(text)
    if size < LEAST_BARE_BYTES:
        raise KLError(f"--gpu-memory {shown(text)} is {binary_size_text(size)}, no GPU's memory; give it, e.g. "
                      f"{GPU_MEMORY_EXAMPLES}")
    return size
