"""What the process can still allocate on the host -- the host's available memory and the process's own limits
(ulimit -v / -d, its memory cgroups) -- and the CPU allocator's refusal of a large allocation (or a library's import
failing with std::bad_alloc) as HostMemoryExhausted, a one-line KLError that is a MemoryError too."""
from __future__ import annotations

import _thread
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Iterator

from klconvert.errors import KLError, first_line
from klconvert.runtime.host_malloc import held_free
from klconvert.units import size_text

try:
    import resource
except ImportError:  # not a POSIX system: no process limits to read
    resource = None

# What bounds the memory the process can still allocate on the host, in the words an error quotes, and what to do.
HOST_BOUND = ("on the host (MemAvailable)", "free some memory")
ADDRESS_SPACE_BOUND = ("under the process's address-space limit (ulimit -v)", "raise ulimit -v")
DATA_BOUND = ("under the process's data-segment limit (ulimit -d)", "raise ulimit -d")
# The process's limits on what it has mapped: each the soft limit's name, the /proc/self/status field of what it maps,
# and its bound. A block the allocator holds free stays mapped, counted by them as used.
MAPPED_LIMITS = (("RLIMIT_AS", "VmSize", ADDRESS_SPACE_BOUND), ("RLIMIT_DATA", "VmData", DATA_BOUND))
CGROUP_REMEDY = "raise the container's (cgroup's) memory limit"
NO_CGROUP_LIMIT = 1 << 62   # cgroup v1 writes "no limit" as 2**63 - 1 rounded down to a page
READ_BOUND, READ_PIECE = 1 << 20, 1 << 14   # characters of a /proc or /sys file read at most, and at a time
OUT_OF_HOST_MEMORY = "out of host memory (or the process's memory limit)"   # how a refusal of memory opens
# A context named as fitting what the host (or a GPU) has left fits this share of it: the next run (or a resize)
# measures it anew, a little differently each time (what else the process, and the host or the card, hold then)
NAMED_FIT_SHARE = 0.99


@dataclass(frozen=True)
class HostMemory:
    """The bytes the process can still allocate on the host -- the least of the host's available memory and what
    each of the process's limits leaves -- with the one that bounds it (`bound`, as an error names it), how to get
    more (`remedy`), the host's memory in all (`total`, MemTotal; None: not known), past which no remedy gets any,
    and how much of `available` is the allocator's free blocks (`free_blocks`, held_free: room under a limit)."""

    available: int
    bound: str = HOST_BOUND[0]
    remedy: str = HOST_BOUND[1]
    total: int | None = None
    free_blocks: int = 0

    def __str__(self) -> str:
        return f"{size_text(self.available)} available {self.bound}"

    def for_weights(self, weights: int) -> HostMemory:
        """What a model of `weights` bytes can count on: the allocator's free blocks as room for its weights alone.
        They are what a freed model left (eval's reference, whose weights have the next model's shapes on the CPU),
        served again whole to tensors of those sizes; a larger block -- a [tokens, vocab] fp32 buffer of logits or
        log-probabilities -- finds them split by the weights already: under ulimit -d 371-379 MB (the bundled
        model's int4 copy after it, 1,024 tokens) 5 runs of 9 were refused a 17 MB block with 56 MB of free blocks
        counted as room, where 75-92 MB of them were free once the reference was, 66 MB of it its weights."""
        unused = max(0, self.free_blocks - weights)
        return replace(self, available=self.available - unused, free_blocks=self.free_blocks - unused)

    def left_mapped(self, blocks: int) -> int:
        """What a freed model's `blocks` bytes besides its weights (its plan's state, cache and workspace) keep of
        this room once it is freed: all of them under a limit on what the process maps (ulimit -v / -d), where the
        allocator holds them as free blocks, mapped, that for_weights counts as room for the next model's weights
        alone; none on the host or under a cgroup, whose figures see their pages free once they are handed back
        (give_back_free_pages: eval's reference, the bundled model at 64-963 tokens, left 8 MB more resident with
        its log-probabilities, which it keeps)."""
        return blocks if self.bound in (bound for _, _, (bound, _) in MAPPED_LIMITS) else 0

    def remedy_for(self, needed: int) -> str | None:
        """`remedy` where the host's memory in all would hold `needed` bytes (or is not known): memory freed, or a
        limit raised, gives no more than that; None where it would not -- the host cannot hold them."""
        return self.remedy if self.total is None or needed <= self.total else None


def host_memory(root: Path = Path("/"), unmapped: int = 0) -> HostMemory | None:
    """What the process can still allocate on the host (None where nothing is known: not Linux): the least of
    Linux's MemAvailable, the soft RLIMIT_AS less the address space mapped (VmSize), the soft RLIMIT_DATA less the
    data mapped (VmData) -- each limit's room with the bytes the allocator holds free within what is mapped
    (held_free, its free_blocks), which it serves again without mapping more to blocks that fit them
    (HostMemory.for_weights) -- and each memory cgroup the process is in, with its
    ancestors, its limit less its usage (the page cache it could reclaim not counted as used). A few small reads; one
    that fails, or a limit that is not set, only leaves that bound out; MemTotal is the `total` of the one that
    bounds. `unmapped`: bytes the process is still to map outside the allocator (torch's worker threads' stacks,
    runtime/intra_op_threads.py), counted as mapped: the free blocks are no room for them. `root`: where /proc and
    /sys are (tests give a folder of fakes)."""
    found: list[HostMemory] = []
    meminfo = _fields(root / "proc/meminfo")
    if (available := _kib(meminfo.get("MemAvailable"))) is not None:
        found.append(HostMemory(available, *HOST_BOUND))
    free = held_free()
    for room, bound in _mapped_rooms(root):
        found.append(HostMemory(max(0, room - unmapped) + free, *bound, free_blocks=free))
    found += _cgroup_rooms(root)
    least = min(found, key=lambda h: h.available, default=None)
    return None if least is None else replace(least, total=_kib(meminfo.get("MemTotal")))


def mapped_room(root: Path = Path("/")) -> int | None:
    """What the process's limits on what it maps (ulimit -v, -d) leave it to map, the allocator's free blocks not
    counted (a thread's stack is mapped for it); None where no such limit is set (or read)."""
    return min((room for room, _ in _mapped_rooms(root)), default=None)


def _mapped_rooms(root: Path) -> Iterator[tuple[int, tuple[str, str]]]:
    """Each of MAPPED_LIMITS that is set and read: what it leaves the process to map, and its bound."""
    status = _fields(root / "proc/self/status")
    for name, used, bound in MAPPED_LIMITS:
        limit, mapped = _soft_limit(name), _kib(status.get(used))
        if limit is not None and mapped is not None:
            yield max(0, limit - mapped), bound


def _read(path: Path) -> str | None:
    """The text of a /proc or /sys file, up to READ_BOUND (they are small; a bound keeps an odd one cheap), read
    READ_PIECE at a time: this runs while an out-of-memory error is worded, where a 1 MiB buffer was refused. None
    where it cannot be read (out of memory too)."""
    try:
        with open(path, encoding="utf-8") as f:
            pieces: list[str] = []
            while sum(map(len, pieces)) < READ_BOUND and (piece := f.read(READ_PIECE)):
                pieces.append(piece)
            return "".join(pieces)
    except (OSError, UnicodeDecodeError, MemoryError):
        return None


def _fields(path: Path) -> dict[str, str]:
    """`name: value` lines (/proc/meminfo, /proc/self/status) or `name value` lines (a cgroup's memory.stat)."""
    out = {}
    for line in (_read(path) or "").splitlines():
        name, _, value = line.replace(":", " ", 1).partition(" ")
        out[name] = value.strip()
    return out


def _kib(value: str | None) -> int | None:
    """Bytes of a `123 kB` field, or None where it is missing or not that."""
    number, _, unit = (value or "").partition(" ")
    return _int(number) * 1024 if _int(number) is not None and unit.strip() == "kB" else None


def _int(value: str | None) -> int | None:
    """A whole number of ASCII digits (`max`, a sign or str.isdigit's other digits, like "²", are none)."""
    value = (value or "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _soft_limit(name: str) -> int | None:
    """The soft limit in bytes, or None where it is unlimited or cannot be read."""
    if resource is None or not hasattr(resource, name):
        return None
    try:
        soft = resource.getrlimit(getattr(resource, name))[0]
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft < 0 else soft


def _cgroup_rooms(root: Path) -> list[HostMemory]:
    """For each memory cgroup hierarchy the process is in (v2, and v1's memory controller), what its cgroup and each
    ancestor with a limit leave: the limit less the usage, the reclaimable page cache (inactive file) not counted."""
    paths = {}   # filesystem type -> the process's cgroup in that hierarchy
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            paths["cgroup2"] = path
        elif "memory" in controllers.split(","):
            paths["cgroup"] = path
    out = []
    for fstype, mount_root, mount_point in _cgroup_mounts(root):
        if fstype not in paths:
            continue
        try:
            inside = PurePosixPath(paths[fstype]).relative_to(mount_root)
        except ValueError:     # the process's cgroup is not under this mount (another namespace's view)
            continue
        if ".." in inside.parts:
            continue
        top = PurePosixPath(mount_point)
        group = top / inside
        while True:
            room = _cgroup_room(root / group.relative_to("/"), fstype)
            if room is not None:
                limit_file = group / ("memory.max" if fstype == "cgroup2" else "memory.limit_in_bytes")
                out.append(HostMemory(room, f"under its cgroup's memory limit ({limit_file})", CGROUP_REMEDY))
            if group == top:
                break
            group = group.parent
    return out


def _cgroup_mounts(root: Path) -> Iterator[tuple[str, str, str]]:
    """(filesystem type, the mount's root within its hierarchy, mount point) of each cgroup2 mount and each cgroup
    v1 mount with the memory controller, from /proc/self/mountinfo."""
    for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
        mount, sep, fs = line.partition(" - ")
        mount, fs = mount.split(), fs.split()
        if not sep or len(mount) < 5 or len(fs) < 3:
            continue
        if fs[0] == "cgroup2" or (fs[0] == "cgroup" and "memory" in fs[2].split(",")):
            if mount[3].startswith("/") and mount[4].startswith("/"):
                yield fs[0], _unescape(mount[3]), _unescape(mount[4])


def _unescape(field: str) -> str:
    """A mountinfo path as it is: the kernel writes a space, tab, newline or backslash in it as an octal escape."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _cgroup_room(folder: Path, fstype: str) -> int | None:
    """Bytes a cgroup's limit leaves (v2: memory.max less memory.current; v1: memory.limit_in_bytes less
    memory.usage_in_bytes), its inactive file cache counted as free; None where it has no limit or it is not read."""
    if fstype == "cgroup2":
        limit, usage = _int(_read(folder / "memory.max")), _int(_read(folder / "memory.current"))
        cache = _int(_fields(folder / "memory.stat").get("inactive_file")) or 0
    else:
        limit, usage = _int(_read(folder / "memory.limit_in_bytes")), _int(_read(folder / "memory.usage_in_bytes"))
        stat = _fields(folder / "memory.stat")
        cache = _int(stat.get("total_inactive_file", stat.get("inactive_file"))) or 0
    if limit is None or usage is None or limit >= NO_CGROUP_LIMIT:
        return None
    return max(0, limit - max(0, usage - cache))


# torch's CPU allocator reports a failed allocation as a RuntimeError (not a MemoryError), in these words; so does
# oneDNN (a CPU matmul in bf16), whose primitive -- its JIT-compiled code and buffers, made at an op's first call of
# a shape -- could not be allocated (its descriptor, where a shape is unsupported, fails in other words, "could not
# create a primitive descriptor ..."); and C++'s std::bad_alloc, which torch raises as a RuntimeError of those words.
_ALLOCATOR_REFUSED = re.compile(r"DefaultCPUAllocator: (can't allocate memory|not enough memory)"
                                r"|^(could not create a primitive|std::bad_alloc)$")


class HostMemoryExhausted(KLError, MemoryError):
    """The host's memory (or the process's limit) ran out for what the runtime asked: a KLError, which the command
    line and the Python API give as one line (out of host memory, or the process's memory limit), and a
    MemoryError."""


def exhausted(doing: str, error: BaseException, less: str = "") -> HostMemoryExhausted:
    """The HostMemoryExhausted for `error`, an allocator's refusal while `doing` ("allocating the weights"), naming
    it, what bounds the memory left (the allocator's free blocks not counted: under ulimit -d a refused 47.7 MB block
    read "0.11 GB available", most of it free blocks) with how to get more, and `less`: what asks for less ("give a
    shorter prompt")."""
    host = host_memory()
    if host is not None:   # its free blocks, room for weights alone, served none of the block refused
        host = host.for_weights(0)
    remedies = ([f"{host}: {host.remedy}"] if host is not None else []) + ([less] if less else [])
    return HostMemoryExhausted(f"{OUT_OF_HOST_MEMORY} {doing}: {first_line(error)}"
                               + (f"; {', or '.join(remedies)}" if remedies else ""))


# What the dynamic loader says, as an ImportError, when it cannot map a library's shared object for want of memory
# (under ulimit -v: "libtorch_cpu.so: failed to map segment from shared object")
LOADER_OUT_OF_MEMORY = ("failed to map segment from shared object", "cannot allocate memory")


def import_exhausted(error: BaseException) -> HostMemoryExhausted | None:
    """A library's import that ran out of memory -- C++'s std::bad_alloc, which torch's import raises as a
    RuntimeError of those words alone, or the loader's LOADER_OUT_OF_MEMORY, an ImportError (both under ulimit -v) --
    as HostMemoryExhausted naming the library: the top package of the innermost module whose top-level code
    (`<module>`) the error came through. None for any other error, and for one raised outside an import."""
    bad_alloc = isinstance(error, RuntimeError) and str(error).strip() == "std::bad_alloc"
    unmapped = isinstance(error, ImportError) and any(words in str(error).lower() for words in LOADER_OUT_OF_MEMORY)
    if not (bad_alloc or unmapped):
        return None
    modules, tb = [], error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "<module>":
            modules.append(str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    return exhausted(f"importing {modules[-1].partition('.')[0]}", error) if modules else None


def thread_refused() -> HostMemoryExhausted | None:
    """HostMemoryExhausted where the process cannot start a thread now -- its stack (ulimit -s) is past what its
    limits leave -- said as a library's, as it loaded: OpenBLAS (numpy's BLAS) raises SIGINT where it cannot start
    one of its threads ('pthread_create failed'), as numpy's import loads it (under ulimit -s 256 MiB and ulimit -d
    400 MB, inside torch's import). None where one starts: it is left to end with the process, which the caller is
    ending."""
    try:
        _thread.start_new_thread(int, ())
    except (RuntimeError, MemoryError) as e:   # "can't start new thread"
        return exhausted("starting a thread as a library loaded (OpenBLAS, numpy's, raises SIGINT where it cannot: "
                         "the interrupt was its)", e,
                         "set OPENBLAS_NUM_THREADS=1 (its threads), or lower ulimit -s (each thread's stack)")
    return None


@contextmanager
def host_allocation(what: str, less: str = "") -> Iterator[None]:
    """Around a large host allocation: the CPU allocator's refusal (a RuntimeError) becomes HostMemoryExhausted,
    naming `what` was being allocated, what bounds the memory left and `less`, what asks for less; any other error
    passes as it is."""
    try:
        yield
    except RuntimeError as e:
        if not _ALLOCATOR_REFUSED.search(str(e)):
            raise
        raise exhausted(f"allocating {what}", e, less) from e
