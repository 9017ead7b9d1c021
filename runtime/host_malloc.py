"""glibc's malloc around a CPU prefill and a CPU load: every block from 1 MiB (16 KiB) up mapped on its own and
returned when freed, so that the prefill's resident memory stays near the workspace its memory plan counts, and the
load's near the weights; glibc's ceiling again after each. And
the blocks it holds free once a model is freed: their bytes, and their pages handed back to the system."""
from __future__ import annotations

import ctypes
import functools
import os
from contextlib import contextmanager
from typing import Iterator

# glibc serves a block under its mmap threshold from its heap, and raises the threshold to the size of each mapped
# block freed (up to 32 MiB on 64-bit), so a prefill's temporaries, megabytes each, soon all come from the heap,
# where freed ones stay resident and fragment it: the bundled model's prefill added 0.97-1.25x (8,192 tokens) and
# 1.0-1.5x (2,048) the plan's workspace to the resident memory, run to run (as tests/test_cpu_prefill_memory.py
# measures). With the threshold fixed at 1 MiB (mallopt, which also ends the raising) 0.93-1.07x, at a page fault
# per 4 KB of each such block: the prefill 13-34% slower than without (BENCHMARKS.md, "CPU prefill memory"). 512 KiB
# measured the same, 4 MiB up to 1.1x, 16 MiB as glibc's own. Not for the whole process: a decode step widens bf16
# weights into fp32 blocks of about 1 MiB every token (runtime/cpu_modules.py), which mapped afresh each time ran
# the bundled model's decode at 120 tokens/s instead of 205; outside a prefill the threshold is glibc's ceiling,
# where such blocks stay on the heap for the next step, as its raised threshold kept them.
PREFILL_THRESHOLD = 1 << 20
# While the weights are read and bound on the CPU, each is made and replaced more than once (read as stored, widened,
# its projections joined, laid out column-major; runtime/bind.py, cpu_modules.py), and the replaced copies' blocks
# stayed in the heap as holes the prefill's blocks did not reuse, which ulimit -d counts as used: the bundled model's
# load grew VmData 3.5-18 MB past its 66.7 MB of weights, run to run (the heap's layout deciding), and a plan taken
# at the margin ran out mid-prefill. From 16 KiB up each is mapped on its own and unmapped when freed: 0.55 MB past
# them in every run, and a `synth --preset tiny` checkpoint's load 1.2-1.4 MB past its 41.1 MB (h280, h289; from
# 64 KiB up 0.55 and 3.2-3.9 MB, 128 KiB 2.7-4 MB for the bundled model, 1 MiB most of the holes). Adjacent mappings
# merge: the maps of a load of the 48B preset's shapes grew by under 10 at 64 KiB (h289); the load's time is within
# this 2-core machine's noise.
LOAD_THRESHOLD = 16 << 10
CEILING = 32 << 20   # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
# The heap's free top is handed back once over the trim threshold, which glibc otherwise moves with the mmap
# threshold (twice it) and no longer does once that is set: after a prefill twice CEILING, as glibc's would be, so
# that a decode step's blocks are not handed back and faulted in again every token; during one, glibc's default.
PREFILL_TRIM, TRIM = 128 << 10, 2 * CEILING
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt's parameter numbers (glibc's malloc.h)
USER_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"   # a threshold the user gave glibc, as is
TUNABLES_ENV = "GLIBC_TUNABLES"   # the variable of glibc's tunables, NAME=VALUE entries parted by colons
USER_THRESHOLD_TUNABLE = "glibc.malloc.mmap_threshold"   # in GLIBC_TUNABLES
USER_TRIM_ENV, USER_TRIM_TUNABLE = "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"   # a trim threshold's
# glibc's rules for what it takes from the environment (elf/dl-tunables.c): from 2.39 a GLIBC_TUNABLES that ends in a
# name without a value, or holds a value with an =, is ignored whole, and a number (GLIBC_TUNABLES' or a MALLOC_*_
# variable's) is ignored unless it is the whole value; before, a value was read as far as it was a number, 0 if not
# at all. From 2.40 a tunable named twice takes its last value, and glibc.rtld.enable_secure=1 ignores every other.
STRICT_TUNABLES, LAST_TUNABLE_WINS = (2, 39), (2, 40)
ENABLE_SECURE_TUNABLE = "glibc.rtld.enable_secure"


@contextmanager
def large_blocks_mapped(threshold: int = PREFILL_THRESHOLD) -> Iterator[None]:
    """Inside, glibc maps every block from `threshold` up that its heap's free space cannot serve on its own,
    and unmaps it when freed, rather than growing the heap for it (process-wide while it lasts); after, its mmap
    threshold is CEILING and its trim threshold TRIM. Nothing where the C library is
    not glibc (macOS, Windows, musl), nor where glibc took a threshold the user chose (MALLOC_MMAP_THRESHOLD_, or
    glibc.malloc.mmap_threshold in GLIBC_TUNABLES; _user_set): theirs stands. A trim threshold the user chose
    (MALLOC_TRIM_THRESHOLD_, or glibc.malloc.trim_threshold) stands too, the mmap threshold set as without it (h292:
    it was replaced for the rest of the process, and MALLOC_TRIM_THRESHOLD_=0 kept 18 MB of a load's freed heap)."""
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    settings = [(M_MMAP_THRESHOLD, threshold, CEILING)]   # each parameter, its value inside, and after
    if not _user_set(USER_TRIM_ENV, USER_TRIM_TUNABLE):
        settings.append((M_TRIM_THRESHOLD, PREFILL_TRIM, TRIM))
    for parameter, inside, _ in settings:
        mallopt(parameter, inside)
    try:
        yield
    finally:
        for parameter, _, after in settings:
            mallopt(parameter, after)


class _Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h, glibc 2.33 on): byte counts over all of malloc's arenas."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def held_free() -> int:
    """Bytes glibc's malloc holds in free blocks of its heaps (mallinfo2's fordblks), which it serves the next
    allocations from before it maps more: the process's mapped figures (VmData, VmSize) count them as used. A freed
    model's weights stay there, mostly: blocks under CEILING come from the heap outside a prefill, and a live block
    above them keeps the heap from shrinking (the bundled model: 72 MB of the 78 MB VmData its run added). 0 where the
    C library is not glibc, is older than 2.33 (no mallinfo2), or the lookup itself finds no memory."""
    if not glibc():
        return 0
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
        mallinfo2.restype = _Mallinfo2
        return mallinfo2().fordblks
    except (AttributeError, OSError, MemoryError):   # read while an out-of-memory error is worded (host_memory)
        return 0


def give_back_free_pages() -> None:
    """Hand the pages of every free block glibc's malloc holds back to the system (malloc_trim(0)), so that the
    host's MemAvailable and a cgroup's usage, which count them as used while they stay resident, see them free: after
    a model is freed, before the next loads (the bundled model's run left 72 MB of them resident). The blocks stay
    the heap's, for the allocator to serve again (held_free). Nothing where the C library is not glibc."""
    if glibc():
        ctypes.CDLL(None).malloc_trim(0)


def _mallopt():
    """glibc's mallopt, or None where large_blocks_mapped leaves malloc as it is."""
    if not glibc() or _user_set(USER_THRESHOLD_ENV, USER_THRESHOLD_TUNABLE):
        return None
    return ctypes.CDLL(None).mallopt


def _user_set(env: str, tunable: str) -> bool:
    """Whether glibc's malloc took a parameter the user gave it: its variable (`env`), or its tunable in
    GLIBC_TUNABLES, read from the environment the process started with, as the running glibc reads it
    (STRICT_TUNABLES, LAST_TUNABLE_WINS). A setting glibc ignored (glibc.malloc.mmap_threshold_x, h295; under 2.41
    MALLOC_MMAP_THRESHOLD_=1048576x, h298), or one the program made after its start, is not the user's: taken as
    theirs, it turned large_blocks_mapped off for the whole run, and neither their threshold nor klconvert's held.
    glibc reads every GLIBC_TUNABLES a process starts with, each on its own (one that sets glibc.rtld.enable_secure
    sets none of its others, and no variable), and of a variable given twice the last from 2.40, as a tunable named
    twice in one GLIBC_TUNABLES (h305: the first alone was read, os.environ's)."""
    started, version = _environment_at_start(), glibc_version()
    strict, last_wins = version >= STRICT_TUNABLES, version >= LAST_TUNABLE_WINS

    def taken(entries: list[tuple[str, str]], name: str) -> list[str]:   # what glibc takes of `name` in turn
        values = [value for entry, value in entries if entry == name]
        return values[-1:] if last_wins else values

    values, secure = [], False
    for entries in (_tunable_entries(text, strict) for text in _tunables_strings(started)):
        if last_wins and any(_whole_number(value) == 1 for value in taken(entries, ENABLE_SECURE_TUNABLE)):
            secure = True
        else:
            values += taken(entries, tunable)
    if not secure:
        values += taken([entry.partition("=")[::2] for entry in started if "=" in entry], env)
    return any(not strict or _whole_number(value) is not None for value in values)


@functools.cache
def _environment_at_start() -> list[str]:
    """The NAME=VALUE entries the process started with, in their order, whose malloc parameters glibc took then: as
    /proc/self/environ holds them (a variable the program sets or changes later, for the processes it starts, is
    not glibc's; h298, h305), a name given twice each time, bytes that are not UTF-8 as os.fsdecode reads them, each
    GLIBC_TUNABLES whole where glibc before 2.39 cut it (_uncut). os.environ where /proc cannot be read (it holds
    glibc's whole copy)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            pieces = f.read().removesuffix(b"\0").split(b"\0")
    except OSError:
        return [f"{name}={value}" for name, value in os.environ.items()]
    version = glibc_version()
    if version is not None and version < STRICT_TUNABLES:
        pieces = _uncut(pieces, _variable_offsets())
    return [os.fsdecode(piece) for piece in pieces if piece]


def _uncut(pieces: list[bytes], starts: set[int] | None) -> list[bytes]:
    """/proc/self/environ's entries, split at its NULs, with each GLIBC_TUNABLES whole again. glibc before 2.39 wrote
    a NUL in it where each value it took ended (its parse_tunables; environ got a whole copy, /proc keeps the cut
    one), so that its rest reads as entries of their own: the pieces after it that begin no variable of the
    environment (`starts`: the offsets at which they begin, _variable_offsets). A variable after it was joined in too
    (h309), and one whose value held a tunable's text (a tunables string kept for a child) read as glibc's. Where
    `starts` is not known, every piece up to the next GLIBC_TUNABLES is taken as its rest, as before: a variable
    among them is read as a tunable no glibc has (a name without a dot), which that glibc's rules pass over."""
    joined: list[bytes] = []
    offset, in_tunables = 0, False
    for piece in pieces:
        if in_tunables and not piece.startswith(b"GLIBC_TUNABLES=") and (starts is None or offset not in starts):
            joined[-1] += b":" + piece   # the separator the NUL took the place of
        else:
            joined.append(piece)
            in_tunables = piece.startswith(b"GLIBC_TUNABLES=")
        offset += len(piece) + 1
    return joined


ENV_START_FIELD = 47   # /proc/self/stat's env_start (field 50 of proc(5)), counted from the field after the name's ")"


def _variable_offsets() -> set[int] | None:
    """The offsets in /proc/self/environ at which a variable of the environment begins: where each entry of the C
    library's environ points into the kernel's copy (/proc/self/stat's env_start to env_end; one the program has set
    since points elsewhere). None where that cannot be read."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        env_start, env_end = int(fields[ENV_START_FIELD]), int(fields[ENV_START_FIELD + 1])
        entry = ctypes.c_void_p.in_dll(ctypes.CDLL(None), "environ").value
    except (OSError, ValueError, IndexError):
        return None
    if entry is None or not env_start < env_end:
        return None
    starts = set()
    while (address := ctypes.c_void_p.from_address(entry).value) is not None:
        if env_start <= address < env_end:
            starts.add(address - env_start)
        entry += ctypes.sizeof(ctypes.c_void_p)
    return starts


def _tunables_strings(started: list[str]) -> list[str]:
    """Each GLIBC_TUNABLES value of the start's entries, in order."""
    return [value for name, has_value, value in (entry.partition("=") for entry in started)
            if has_value and name == TUNABLES_ENV]


def _tunable_entries(text: str, strict: bool) -> list[tuple[str, str]]:
    """GLIBC_TUNABLES' name=value entries, as glibc parses them (parse_tunables, from 2.39 parse_tunables_string):
    parted by colons, the name all of what comes before the first =, text without one skipped up to the next colon.
    A name without a value at the end ends the reading, where `strict` (STRICT_TUNABLES) ignores the whole string,
    as it does a value holding an =, which before was part of the value."""
    entries, start = [], 0
    while True:
        name_end = _first_of(text, "=:", start)
        if name_end == len(text):
            return [] if strict else entries
        if text[name_end] == ":":
            start = name_end + 1
            continue
        value_end = _first_of(text, "=:" if strict else ":", name_end + 1)
        if value_end < len(text) and text[value_end] == "=":
            return []
        entries.append((text[start:name_end], text[name_end + 1:value_end]))
        if value_end == len(text):
            return entries
        start = value_end + 1


def _first_of(text: str, characters: str, start: int) -> int:
    """The index of the first of `characters` in text from `start`, or len(text)."""
    return next((i for i in range(start, len(text)) if text[i] in characters), len(text))


def _whole_number(text: str) -> int | None:
    """text as glibc's _dl_strtoul reads a tunable's number, where it is wholly one (from 2.39 glibc ignores a value
    that is not): blanks and a sign first, then decimal, 0x hex or 0 octal digits within 64 bits, or none (0)."""
    rest = text.lstrip(" \t")
    negative = rest.startswith("-")
    rest = rest[1:] if rest[:1] in ("-", "+") else rest
    if not rest or not "0" <= rest[0] <= "9":
        return 0 if not rest else None
    base, rest = (16, rest[2:]) if rest[:2] in ("0x", "0X") else (8, rest) if rest[0] == "0" else (10, rest)
    digits = "0123456789abcdefABCDEF"[:base + (6 if base == 16 else 0)]
    value = 0
    for digit in rest:
        if digit not in digits:
            return None
        value = value * base + int(digit, 16)
        if value >= 1 << 64:
            return None
    return -value % (1 << 64) if negative else value


def glibc_version() -> tuple[int, ...] | None:
    """The version of the process's C library where it is glibc, (2, 36); None where it is not."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):   # no confstr (Windows), or no such name (macOS, musl)
        return None
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None


def glibc() -> bool:
    """Whether the process's C library is glibc."""
    return glibc_version() is not None
