"""The disk's free space, and how a write that failed is said -- torch-free, for the hub and the writers alike."""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from klconvert.errors import is_permission_error, out_of_descriptors
from klconvert.units import binary_size_text, size_text, size_texts

try:
    import resource
except ImportError:  # not a POSIX system: no process limits to read
    resource = None


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def quota_exceeded(doing: str) -> str:
    """How a write refused for the user's disk quota (EDQUOT) is said, `doing` naming the write, for the caller to end
    (" and rerun"): with no free space, which statvfs gives for the disk as a whole, blind to the quota -- a pull's
    line read "disk full ... 72.99 GB free there"."""
    return f"disk quota exceeded {doing}; remove files that count against your quota there, or have it raised"


@contextmanager
def writing(path: Path, size: int | None = None) -> Iterator[None]:
    """Around the writing of the file `path` (`size` bytes in all, where known): an OSError that names no file -- a
    write's, a flush's: a full disk -- is raised naming `path`, and carrying `size`, for failed_write to say; a full
    disk's carries the space free as it filled, before the run's cleanup frees what it wrote."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename, e.bytes_to_write = os.fspath(path), size
        if e.errno in DISK_FULL:
            e.free_bytes = free_disk_bytes(Path(os.path.abspath(e.filename)).parent)
        raise


def failed_write(e: OSError, where: Path) -> str:
    """How a write that failed is said, and what to do, for the caller to end (" and rerun"): a full disk with the size
    of the file it was writing and the space left there as it filled (where `writing` saw it, else now); a quota
    exceeded, that alone (quota_exceeded); out of file
    descriptors, what bounds them; a file too large, with the process's file-size limit (ulimit -f) where one is set,
    else the file system's; an I/O error, the disk to check; a read-only file system, another disk; no permission,
    the folder to make writable; a folder on the way removed, that one; else the system's reason."""
    shortage = out_of_descriptors(e)
    if shortage is not None:
        return f"cannot write {where}: {shortage}"
    if e.errno == errno.EDQUOT:
        return quota_exceeded(f"writing {where}")
    if e.errno in DISK_FULL:
        size, free = getattr(e, "bytes_to_write", None), getattr(e, "free_bytes", None)
        if free is None:   # not written under `writing`: measured now
            free = free_disk_bytes(where)
        if size is None:
            return f"disk full writing {where} ({size_text(free)} free); free some space"
        size_said, free_said = size_texts(size, free)
        return f"disk full writing {where} ({size_said} to write, {free_said} free); free some space"
    if e.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else None
        if limit is not None and limit != resource.RLIM_INFINITY:
            return (f"cannot write {where} ({e.strerror}): the process may write files of {binary_size_text(limit)} at "
                    "most (ulimit -f); raise that limit")
        return (f"cannot write {where} ({e.strerror}): its file system takes no file that large; write to another "
                "disk")
    if e.errno == errno.EIO:   # the device failed the write: no option of klconvert's, nor a rerun alone, helps
        return (f"cannot write {where} ({e.strerror}): its disk or file system failed the write -- check it (the "
                "kernel's log, dmesg), or write to another disk")
    if e.errno == errno.EROFS:   # mounted read-only, or remounted so after an error: no folder on it takes a file
        return (f"cannot write {where} ({e.strerror}): its file system takes no writes -- choose an output folder on "
                "another disk")
    if is_permission_error(e):   # a folder refusing a new file, or the folder a file goes in
        folder = where if where.is_dir() else where.parent
        return (f"cannot write {where} ({e.strerror}): make {folder} writable for you (chmod u+w, or ask its owner), "
                "or choose another output folder")
    if e.errno == errno.ENOENT:
        # every folder on the way was made before the write (parent_made): the first missing now was removed since,
        # and a rerun makes it again
        gone = next((folder for folder in reversed(where.parents) if not folder.exists()), None)
        if gone is not None:
            return (f"cannot write {where} ({e.strerror}): {gone} is gone, removed while this ran; leave it alone "
                    "while klconvert writes there")
    return f"cannot write {where} ({e.strerror or e}); fix that"
