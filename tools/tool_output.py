"""What the scripts here share at their edges: numeric arguments held to their range by argparse (one usage line,
exit 2, where a 0 or a negative ended in a traceback or a silently wrong run), and an output folder written whole or
not at all -- made as OUT.partial beside OUT and renamed when complete, an existing OUT refused before any work."""
from __future__ import annotations

import argparse
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from klconvert.errors import KLError


def positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite number")
    return value


def refuse_existing(out: Path) -> None:
    """KLError when `out` exists (a link too): the tools never write into, or over, a folder already there."""
    if out.exists() or out.is_symlink():
        raise KLError(f"{out}: already exists; choose another output folder (or move it away)")


@contextmanager
def whole_folder(out: Path) -> Iterator[Path]:
    """The folder to write `out`'s files into: OUT.partial, renamed to `out` when the body ends, deleted if it fails
    or is interrupted (an interrupted write once left a folder of new and old shards that loaded)."""
    refuse_existing(out)
    partial = out.with_name(out.name + ".partial")
    if partial.is_symlink() or (partial.exists() and not partial.is_dir()):
        raise KLError(f"{partial}: in the way of the folder this run writes; move it away")
    if partial.is_dir():
        shutil.rmtree(partial)   # a run that died: its own leftovers
    partial.mkdir(parents=True)
    try:
        yield partial
        refuse_existing(out)   # appeared meanwhile: keep it, drop ours
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
