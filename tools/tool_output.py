"""What the scripts here share at their edges: numeric arguments held to their range by argparse (one usage line,
exit 2, where a 0 or a negative ended in a traceback or a silently wrong run), and an output folder written whole or
not at all -- made under a fresh hidden name beside OUT and renamed when complete, an existing OUT refused before
any work (an empty folder is taken: the GPU machine's $OUT is one)."""
from __future__ import annotations

import argparse
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from klconvert.errors import KLError


def positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _finite(text: str, zero_too: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 <= value if zero_too else 0 < value) or value == float("inf") or value != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_float(text: str) -> float:
    return _finite(text, False, "a positive finite number")


def nonnegative_float(text: str) -> float:
    return _finite(text, True, "a finite number >= 0")


def refuse_existing(out: Path) -> None:
    """KLError when `out` exists (a link too), unless it is an empty folder: the tools never write into, or over,
    files already there."""
    if out.is_symlink() or (out.exists() and not (out.is_dir() and not any(out.iterdir()))):
        raise KLError(f"{out}: already exists; choose another output folder (or move it away)")


@contextmanager
def whole_folder(out: Path) -> Iterator[Path]:
    """The folder to write `out`'s files into: a fresh hidden one beside `out` (never a name someone else holds),
    renamed to `out` when the body ends, deleted if it fails or is interrupted (an interrupted write once left a
    folder of new and old shards that loaded)."""
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield partial
        refuse_existing(out)   # filled meanwhile: keep it, drop ours
        partial.rename(out)    # over an empty folder too
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
