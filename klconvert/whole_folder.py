"""A new folder written whole or not at all: how synth, export-onnx and the tools/ scripts write their output (quantize
keeps its own resumable OUT.partial, convert.output_folder).

The files go into a fresh hidden folder beside OUT (.OUT.partial-PID-XXXXXXXX), made holding OUT's lock (one writer
per output: a second is refused naming the first), and renamed to OUT once the body ends -- an existing OUT, which
only `force` lets go and only when `replaceable` says it may, is moved aside and deleted only then. A failed or
interrupted run leaves nothing at OUT and nothing beside it (the folders made for OUT go too while empty); what a
killed one left, the next run on OUT removes (output_folder.remove_dead_runs_temporaries)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from klconvert.convert.output_folder import (TEMPORARY_MARKER, OutputLock, mark_temporary, move_aside,
                                             refuse_no_new_name, runs_temporary, temporary_prefix, unmark_temporary)
from klconvert.disk_space import failed_write
from klconvert.errors import KLError


@dataclass(frozen=True)
class Replaceable:
    """What --force may replace at OUT: `what`, as the refusal names it, and the test a folder must pass."""

    what: str
    holds_only_that: Callable[[Path], bool]


def refuse_taken(out: Path, force: bool = False, replaceable: Replaceable | None = None) -> None:
    """KLError unless OUT may be written: missing, an empty folder, or -- with `force` -- a folder `replaceable`
    accepts; never a link (a dangling one too), a file, or the current folder or one above it."""
    refuse_no_new_name(out)
    if out.is_symlink():
        raise KLError(f"{out}: is a symbolic link{'' if out.exists() else ' to nothing'}; give the path of a new "
                      "folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise KLError(f"{out}: exists and is not a folder; give the path of a new folder")
    if _empty_but_for_temporaries(out):
        return
    if replaceable is None:
        raise KLError(f"{out}: already exists; choose another output folder (or move it away)")
    if not force:
        raise KLError(f"{out}: already exists and is not empty; choose another output folder, or pass --force to "
                      f"replace {replaceable.what}")
    if not replaceable.holds_only_that(out):
        raise KLError(f"{out}: --force replaces only {replaceable.what}, a folder holding nothing else, and this "
                      "holds other files; choose another output folder or move it away")


def _empty_but_for_temporaries(folder: Path) -> bool:
    """Whether `folder` holds nothing but the hidden folders runs writing it in place make (a killed one's the lock's
    holder removes; a live one's holder refuses the lock)."""
    return all(runs_temporary(entry, folder) is not None for entry in folder.iterdir())


@contextmanager
def whole_folder(out: Path, force: bool = False, replaceable: Replaceable | None = None,
                 last: str = "config.json") -> Iterator[Path]:
    """The folder to write OUT's files into, renamed to OUT when the body ends (see the module's text) -- or, where
    OUT is an empty folder already (a mount point, say, which no rename replaces; its mode and group the user's),
    made inside it and its files moved up into it, `last` (the file that says the folder is whole) after the rest.
    OUT is checked now and again at the end; an OSError of the body or of the rename is one KLError line."""
    refuse_taken(out, force, replaceable)
    with OutputLock(out):
        refuse_taken(out, force, replaceable)   # again: a writer that held the lock before us may have made OUT
        was_there = out.exists()
        in_place = was_there and not any(out.iterdir())   # the lock removed what dead runs left in it
        new: Path | None = None
        try:
            new = Path(tempfile.mkdtemp(prefix=temporary_prefix(out, "partial"), dir=out if in_place else out.parent))
            mark_temporary(new)   # until it is in place: a run killed before leaves it for the next to remove
            yield new
            give_usual_modes(new)
            if out.exists() and not was_there:   # someone else's, empty or not: never renamed over
                raise KLError(f"{out}: appeared while writing it; move it away and rerun")
            if in_place:
                if not out.is_dir() or out.is_symlink() or {p.name for p in out.iterdir()} != {new.name}:
                    raise KLError(f"{out}: changed while writing into it; move it away and rerun")
                _move_into(new, out, last)
            else:
                refuse_taken(out, force, replaceable)   # what is at OUT now may not be what was checked at first
                _put_in_place(new, out)
        except BaseException as e:
            if new is not None:
                shutil.rmtree(new, ignore_errors=True)
            if isinstance(e, OSError):
                raise KLError(_write_error(e, new, out)) from None
            raise


def _move_into(new: Path, out: Path, last: str) -> None:
    """Move `new`'s entries up into `out` (its parent), `last` after the rest, then remove `new`; on a failure the
    entries moved so far are removed again, so OUT is left empty."""
    moved: list[Path] = []
    try:
        for name in sorted(set(os.listdir(new)) - {TEMPORARY_MARKER}, key=lambda name: (name == last, name)):
            moved.append(out / name)   # before the rename: an interrupt between the two must not miss it
            os.rename(new / name, out / name)
        unmark_temporary(new)
        new.rmdir()
    except BaseException:
        for path in moved:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        raise


def _put_in_place(new: Path, out: Path) -> None:
    """Rename `new` to `out` (over an empty folder there too); a folder of files there is moved aside first, put
    back if the rename fails, and deleted once `new` is in place."""
    aside = move_aside(out) if out.is_dir() and any(out.iterdir()) else None
    try:
        os.rename(new, out)
    except BaseException:
        if aside is not None:
            _put_back(aside, out)
        raise
    unmark_temporary(out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)   # what stays (a file one cannot delete) a later run removes


def _put_back(aside: Path, out: Path) -> None:
    """The earlier OUT back from `aside`; where OUT is taken meanwhile, under a name no later run removes (a hidden
    temporary name is a dead run's to the next), said in the error."""
    unmark_temporary(aside)
    try:
        os.rename(aside, out)
    except OSError:
        kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.earlier-", dir=out.parent))
        os.rename(aside, kept)
        raise KLError(f"{out}: taken while replacing it; the earlier {out.name} is kept as {kept} -- move it back "
                      "yourself") from None


def _write_error(e: OSError, new: Path | None, out: Path) -> str:
    """The line for an OSError while writing OUT: the file named as it would be in OUT."""
    where = Path(os.path.abspath(e.filename)) if e.filename else out
    if new is not None and where.is_relative_to(os.path.abspath(new)):
        where = out / where.relative_to(os.path.abspath(new))
    return f"{failed_write(e, where)} and rerun (nothing was written to {out})"


def usual_mode(folder: bool) -> int:
    """The mode a new folder or file gets from the umask (0755 and 0644 under umask 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def give_usual_modes(top: Path) -> None:
    """Give `top` and every folder and file in it the umask's usual mode: mkdtemp makes a private folder, and some
    writers private files (safetensors' save_file 0600)."""
    folder_mode, file_mode = usual_mode(True), usual_mode(False)
    top.chmod(folder_mode)
    for root, folders, files in os.walk(top):
        for name in folders + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):   # a link's own mode means nothing; its target is not ours to change
                os.chmod(path, folder_mode if name in folders else file_mode)
