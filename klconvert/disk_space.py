"""The disk's free space, and how a write that failed is said -- torch-free, for the hub and the writers alike."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from klconvert.errors import out_of_descriptors
from klconvert.units import binary_size_text, size_text

try:
    import resource
except ImportError:  # not a POSIX system: no process limits to read
    resource = None


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def failed_write(e: OSError, where: Path) -> str:
    """How a write that failed is said, and what to do, for the caller to end (" and rerun"): a full disk (or
    quota) with the space left there; out of file descriptors, what bounds them; a file too large, with the
    process's file-size limit (ulimit -f) where one is set, else the file system's; else the system's reason."""
    shortage = out_of_descriptors(e)
    if shortage is not None:
        return f"cannot write {where}: {shortage}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full writing {where} ({size_text(free_disk_bytes(where))} free); free some space"
    if e.errno == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else None
        if limit is not None and limit != resource.RLIM_INFINITY:
            return (f"cannot write {where} ({e.strerror}): the process may write files of {binary_size_text(limit)} at "
                    "most (ulimit -f); raise that limit")
        return (f"cannot write {where} ({e.strerror}): its file system takes no file that large; write to another "
                "disk")
    return f"cannot write {where} ({e.strerror or e}); fix that"
