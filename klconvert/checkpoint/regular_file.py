"""Reading a file a model folder ships: regular files only (opening a FIFO blocks until someone writes to it, and a
device such as /dev/zero never ends), refused as an OSError that each reader words in its own one-line error; and
no more of it than a bound."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from klconvert.errors import KLError, shown


def kind_of(mode: int) -> str:
    """What a file that is not regular is, in a word or two."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"


def open_regular(path: str | Path) -> BinaryIO:
    """`open(path, "rb")`, refused with OSError(EINVAL) unless `path` (links followed) is a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)   # non-blocking: a FIFO's open returns at once
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file ({kind_of(mode)})", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    # outside the try: the file object owns fd once made, and an interrupt as fdopen returns drops it, closing fd;
    # closed again here, that failed (EBADF, said as the shard unreadable in place of the interrupt) or closed
    # whichever file had taken the number meanwhile
    return os.fdopen(fd, "rb")


READ_PIECE = 1 << 20   # read_bounded's reads: a read of n bytes reserves all n first, however short the file


def read_bounded(path: Path, max_bytes: int, what: str, remedy: str = "re-download the model",
                 pipes: bool = False) -> bytes:
    """The bytes of a file the model folder ships (or a tool's input: plot_loss.py's loss.json), refused past
    `max_bytes` (read no further) with `remedy`, read a piece at a time: one read of the whole bound reserved it
    (64 MiB of address space for a 78 KB index; under ulimit -v, a MemoryError). `pipes`: a pipe or device is read
    too, as far as the bound (a tool's input piped in: `plot_loss.py /dev/stdin`), not refused as no regular file."""
    pieces, size = [], 0
    with open(path, "rb") if pipes else open_regular(path) as f:
        while size <= max_bytes and (piece := f.read(min(READ_PIECE, max_bytes + 1 - size))):
            pieces.append(piece)
            size += len(piece)
    data = b"".join(pieces)
    if len(data) > max_bytes:
        raise KLError(f"{path}: over {max_bytes >> 20} MB, far larger than any model's {what}; {remedy}")
    return data


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {shown(twice)} appears twice in one object")
    return obj


def parse_json(text: str | bytes, parse_constant=None):
    """The value of JSON that came with a model -- the one parser of it. A key given twice in one object is a
    ValueError: json keeps the last, other readers (and other JSON libraries) the first, so two readers of one file
    would disagree on a config value or where a tensor's bytes lie. Bad UTF-8 and bad JSON are ValueErrors too; JSON
    nested past Python's stack, a RecursionError. `parse_constant`: json.loads', called for NaN and Infinity."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=parse_constant)


def json_values(data: bytes) -> int:
    """At least half as many as the values JSON `data` parses into, keys included: its `[`, `{` and `,` bytes, in
    strings too (each value past a container's first follows a comma; a scan in C, 0.1 s for 100 MB). Counted before
    a parse: an empty list takes ~37x its bytes parsed, a short key or string ~15x."""
    return data.count(b"[") + data.count(b"{") + data.count(b",")


def read_json(path: Path, max_bytes: int, what: str, max_values: int | None = None):
    """The JSON value of a file the model folder ships, read as read_bounded reads it and parsed by parse_json; one
    of more than `max_values` JSON values (json_values) is a ValueError, unparsed."""
    data = read_bounded(path, max_bytes, what)
    if max_values is not None and (values := json_values(data)) > max_values:
        raise ValueError(f"{values:,} '[', '{{' and ',' bytes, more JSON values than the {max_values:,} a {what} "
                         "holds")
    return parse_json(data.decode("utf-8"))


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: its device, inode, size, modification time, and the time
    its inode last changed, which a write sets and no one can set back (`touch -r` restores the modification time)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
