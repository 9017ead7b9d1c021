"""The disk's free space, and how a write that failed is said -- torch-free, for the hub and the writers alike."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from klconvert.units import size_text


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def failed_write(e: OSError, where: Path) -> str:
    """How a write that failed is said, and what to do, for the caller to end (" and rerun"): a full disk (or
    quota) with the space left there, else the system's reason."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full writing {where} ({size_text(free_disk_bytes(where))} free); free some space"
    return f"cannot write {where} ({e.strerror or e}); fix that"
