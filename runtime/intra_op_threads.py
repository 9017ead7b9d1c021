"""torch's intra-op worker threads on the CPU: the stacks they map, starting them before a memory plan measures
the host where there is room for those stacks -- libgomp ends the process when it cannot make one -- and the refusal
of a plan that only their stacks keep from fitting (StacksTakeTheRoom)."""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass

import torch

from klconvert.errors import KLError, shown
from klconvert.runtime.host_malloc import glibc
from klconvert.runtime.host_memory import mapped_room
from klconvert.units import size_text

# libgomp (torch's OpenMP on Linux) makes each worker's stack OMP_STACKSIZE, else GOMP_STACKSIZE, read once as it
# loads: strtoul's digits (a + or - before them; -n wraps to 2**64 - n), KiB or the unit of a b/k/m/g suffix, the
# C library's blanks and digits around them, which are ASCII only (isspace, isdigit: Python's own \s and \d take
# Unicode's, a no-break space or a fullwidth digit, that libgomp refuses); a value it cannot read, or one past an
# unsigned long, leaves the next; one it reads but pthreads refuses (below its least stack) leaves glibc's default
# for a thread -- ulimit -s as the process started, 2 MiB where unlimited (libgomp's env.c, parse_stacksize and
# initialize_env; glibc's pthread_early_init). A stack also maps a guard page.
STACK_SIZE_ENVS = ("OMP_STACKSIZE", "GOMP_STACKSIZE")
_STACK_SIZE = re.compile(r"\s*([+-]?\d+)\s*([bkmg]?)\s*", re.IGNORECASE | re.ASCII)
_UNSIGNED_LONG = 1 << 64
_UNIT_BITS = {"b": 0, "": 10, "k": 10, "m": 20, "g": 30}
# What starting them maps besides their stacks (a new malloc arena's first 32 KiB heap, their thread-local data in
# it), counted with them: under ulimit -d the bundled model's load on 2, 8 and 16 threads started them with 40 KiB of
# room past their stacks, and was ended with 32 KiB ("cannot allocate memory for thread-local data"); 256 KiB for all.
START_ROOM = 256 << 10
_PTHREAD_ATTR_BYTES = 256   # room for glibc's pthread_attr_t (56 bytes on x86-64, 64 on aarch64)
# No mapping is larger than the address space Linux gives a process that names no address (DEFAULT_MAP_WINDOW:
# 2**47 bytes on x86-64, 2**48 on arm64): a worker's stack past it is never made, whatever the limits, and libgomp
# ends the process ('Thread creation failed': pthread_create's EAGAIN, or EINVAL where glibc's size with its guard
# page wraps past 2**64, as OMP_STACKSIZE=-1B's does). On a 23 GiB x86-64 host stacks of 2**46 bytes and more, from
# OMP_STACKSIZE or ulimit -s, ended it (ones past the host's memory fail too, under the kernel's overcommit check)
UNMAPPABLE_STACK = 1 << 48


def start_intra_op_threads() -> int:
    """Start torch's intra-op workers, where the first parallel op (reading the weights) would start them after the
    plan measured the host: each maps a stack (ulimit -s, 8 MiB by default), which a limit on what the process maps
    (ulimit -d, -v) counts -- a 16,500-token prompt of the bundled model on 2 threads, planned 351 MiB, peaked 8 MiB
    past it and ran out under ulimit -d 588-592 MB. Only where those limits leave room for their stacks (stack_bytes)
    and START_ROOM: short of it libgomp ends the process ("Thread creation failed"), where the plan would refuse it in
    one line. Returns those bytes where it left them unmapped, for the plan to count as used (0 where it started
    them, or they ran already: mapped, they are measured). An op of twice torch's grain size (32,768 elements,
    at::internal::GRAIN_SIZE) is split across them, its tensor made before the room is measured; once started they
    stay. A stack of UNMAPPABLE_STACK bytes or more is refused in one line: no room would hold it."""
    work = torch.empty(1 << 16, dtype=torch.uint8)   # unwritten: torch.ones' fill is such an op itself
    if _workers() > 0 and (stack := _worker_stack()).size >= UNMAPPABLE_STACK:
        raise KLError(f"{stack.set_by} makes each of torch's worker threads a stack of {size_text(stack.size)}, more "
                      f"than a process can map: starting them would end it ('Thread creation failed'); "
                      f"{stack.smaller}")
    needed = stack_bytes() + START_ROOM
    if (room := mapped_room()) is not None and room < needed:
        return needed
    work.fill_(1)
    return 0


def stack_bytes() -> int:
    """Bytes the stacks of torch's intra-op workers map (_workers), each with its guard page. 0 where the C library
    is not glibc (whose default for a thread's stack is read here)."""
    stack = _worker_stack()
    return _workers() * (stack.size + stack.guard)


def _workers() -> int:
    """The workers libgomp starts for torch's parallel ops: one for each of its threads but the caller's, no more
    than OpenMP's thread limit lets a team have (OMP_THREAD_LIMIT, as libgomp itself read it: h292, under
    OMP_THREAD_LIMIT=1 no worker starts, and the stack counted for one refused a run that fit)."""
    try:
        limit = ctypes.CDLL(None).omp_get_thread_limit()
    except AttributeError:   # no OpenMP runtime among the process's global symbols: torch's count is all there is
        return torch.get_num_threads() - 1
    return min(torch.get_num_threads(), limit) - 1


@dataclass(frozen=True)
class WorkerStack:
    """One worker's stack: its bytes (`size`) and its guard page's (`guard`), what set its size (`set_by`: one of
    STACK_SIZE_ENVS, as libgomp reads them, else ulimit -s, glibc's default for a thread) and the variable that
    makes it smaller (`variable`: the one that set it, else the first of STACK_SIZE_ENVS, which libgomp reads
    before ulimit -s)."""

    size: int
    guard: int = 0
    set_by: str = "ulimit -s"
    variable: str = STACK_SIZE_ENVS[0]

    @property
    def smaller(self) -> str:
        """How to make it smaller: a few MB, as libgomp's own default (2 MiB where ulimit -s is unlimited)."""
        return f"set {self.variable} to a few MB (e.g. {self.variable}=2M)"


class StacksTakeTheRoom(KLError):
    """A memory plan past the room the host (or the process's limits) leaves, that fits without the stacks of
    torch's workers, which start_intra_op_threads left unmapped for want of it: `said`, the plan's figure against
    the room, then how the `stacks` bytes take less -- fewer threads, smaller stacks -- and `remedy`: the host's
    limit's, where all of the host's memory would hold the plan."""

    def __init__(self, said: str, stacks: int, remedy: str | None):
        super().__init__(f"{said}; {_stacks_said(stacks)}: {', or '.join(_fewer_stacks(remedy))}")
        self.said, self.stacks, self.remedy = said, stacks, remedy


def with_fewer_stacks(stacks: int, remedy: str | None) -> str:
    """A refusal's `remedy` (what gives more room; None: nothing does) after fewer threads and smaller stacks, where
    the workers' `stacks` bytes, left unmapped, were counted as used: the plan was refused with them in it (h291: the
    line said only "the weights alone need 65.85 MB: use a model of fewer bits" under GOMP_STACKSIZE=1G)."""
    return ", or ".join(_fewer_stacks(remedy, _stacks_said(stacks)))


def _stacks_said(stacks: int) -> str:
    """What the workers' stacks, `stacks` bytes, take of the room."""
    workers = _workers()
    return (f"torch's {workers:,} worker thread{'s' if workers != 1 else ''} would map {size_text(stacks)} for "
            f"{'its stack' if workers == 1 else 'their stacks'}, counted as used")


def _fewer_stacks(remedy: str | None, stacks_said: str | None = None) -> list[str]:
    """What takes the workers' stacks off the room -- fewer threads (with `stacks_said`, what they take, where the
    line has not said it), smaller stacks -- then `remedy`, if any."""
    said = "" if stacks_said is None else f"; {stacks_said}"
    return [f"run fewer threads (OMP_NUM_THREADS=1 starts none{said})", _worker_stack().smaller,
            *([remedy] if remedy is not None else [])]


def _worker_stack() -> WorkerStack:
    """A worker's stack as libgomp makes it: of 0 bytes where the C library is not glibc, or it is out of memory to
    copy its defaults."""
    if not glibc():
        return WorkerStack(0)
    libc = ctypes.CDLL(None)
    attr = ctypes.create_string_buffer(_PTHREAD_ATTR_BYTES)
    if libc.pthread_getattr_default_np(attr) != 0:   # out of memory to copy it
        return WorkerStack(0)
    size, guard = ctypes.c_size_t(), ctypes.c_size_t()
    libc.pthread_attr_getstacksize(attr, ctypes.byref(size))
    libc.pthread_attr_getguardsize(attr, ctypes.byref(guard))
    libc.pthread_attr_destroy(attr)
    if (said := _stack_size_set()) is None:
        return WorkerStack(size.value, guard.value)
    name, set_size = said
    return WorkerStack(set_size, guard.value, f"{name}={shown(os.environ[name])}", name)


def _stack_size_set() -> tuple[str, int] | None:
    """Which of STACK_SIZE_ENVS sets a worker's stack and its bytes, or None where none does (as libgomp reads
    them)."""
    for name in STACK_SIZE_ENVS:
        said = _STACK_SIZE.fullmatch(os.environ.get(name, ""))
        if said is None or abs(number := int(said[1])) >= _UNSIGNED_LONG \
                or (size := number % _UNSIGNED_LONG << _UNIT_BITS[said[2].lower()]) >= _UNSIGNED_LONG:
            continue   # unset, or not read (past strtoul's range, or past it in the unit): the next
        return (name, size) if size >= os.sysconf("SC_THREAD_STACK_MIN") else None   # read: no next, pthreads' say
    return None
