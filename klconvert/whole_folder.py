"""A new folder written whole or not at all: how synth, export-onnx and the tools/ scripts write their output (quantize
keeps its own resumable OUT.partial, convert.output_folder).

One writer per output: a run holds OUT's lock (a second is refused naming the first), and holding it, what killed runs
left -- beside OUT or in it -- is removed (output_folder.remove_dead_runs_temporaries). Where OUT is missing, the
files go into a fresh hidden folder beside it (.OUT.partial-PID-XXXXXXXX), the lock is OUT.partial.lock beside it, and
the folder is renamed to OUT once the body ends, the record of what the run wrote (output_folder.OUTPUT_RECORD, as
quantize's) written in it first: what --force, this command's or quantize's, may replace. Where OUT is a folder
already -- empty, or one that only `force` lets go, and only where `replaceable` is given: one `replaceable` accepts
(its command's earlier output), or where it opts in, any folder its record says klconvert wrote -- it is filled in
place, since no rename replaces a mount point (the GPU machine's $OUT is one): the hidden folder is made in OUT (and
the lock too, hidden, where OUT's parent takes no file), and once the body ends OUT's earlier entries are moved aside
into another hidden folder in it, the file that says OUT is whole (`last`) first and the record last, the new ones
moved up, the record first and `last` after the rest, and the earlier deleted only then -- OUT holds `last` only while
whole, and a record listing all it holds but the runs' hidden temporaries whenever it holds anything (a kill midway
leaves a folder --force replaces). A failed or interrupted run leaves OUT as it was and nothing beside it (the folders
made for OUT go too while empty); whether OUT may be written and takes files is said before any work."""
from __future__ import annotations

import os
import re
import stat
import tempfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from klconvert.checkpoint.folder_files import CONFIG_FILE
from klconvert.convert.output_folder import (OUTPUT_RECORD, TEMPORARY_MARKER, TEMPORARY_NAME, OutputLock,
                                             already_exists, lock_goes_inside, lock_holder, lock_path, make_parent,
                                             mark_temporary, names_shown, not_written_by_klconvert,
                                             refuse_link_or_file, refuse_no_new_name, remove_created, remove_replaced,
                                             remove_temporary, runs_temporary, temporaries_start, temporary_prefix,
                                             unmark_temporary, usual_mode, write_output_record, write_test)
from klconvert.disk_space import failed_write
from klconvert.entry import Uninterrupted, note_complete
from klconvert.errors import KLError, refuse_out_of_descriptors


@dataclass(frozen=True)
class Replaceable:
    """What a command's --force may replace at OUT: a folder whose entries (but the hidden ones runs writing OUT make
    in it, and an OUTPUT_RECORD) each pass `may_hold` -- `what`, as the refusal names it (both None: no such folder)
    -- and, where `any_klconvert_output`, any folder klconvert wrote (its OUTPUT_RECORD lists every entry). That is
    opt-in: a record says klconvert wrote a folder, not which command, and --force replaces no more than its command
    promises (train_tokenizer's an earlier tokenizer, never a model folder)."""

    what: str | None
    may_hold: Callable[[Path], bool] | None
    any_klconvert_output: bool = False


def refuse_taken(out: Path, force: bool = False, replaceable: Replaceable | None = None) -> None:
    """KLError unless OUT may be written: missing, an empty folder, or -- with `force`, where `replaceable` is given
    -- a folder whose entries `replaceable` accepts, or one klconvert wrote (quantize's rule:
    output_folder.not_written_by_klconvert) where it takes any klconvert output; never a link (a dangling one too), a
    file, or a name shaped like a run's temporary (which a run beside it may delete) -- the current folder or one above
    it is taken by its absolute path (_named); and files must be makeable where the run makes them (in OUT when it
    exists, else in the folder it goes in) -- all said before any work."""
    out = _named(out)
    refuse_no_new_name(out)
    if re.fullmatch(rf"\..+\.{TEMPORARY_NAME.pattern}", out.name):
        raise KLError(f"{out}: is named as klconvert names its temporary folders, which a later run may delete; "
                      "choose another name")
    refuse_link_or_file(out)
    if not out.exists():
        remove_created(make_parent(out))   # the folders it goes in made, and tried with a file, now: gone again
        return
    try:
        others = _others(out)
    except OSError as e:
        refuse_out_of_descriptors(e, out)
        raise KLError(f"{out}: cannot list it ({e.strerror}); choose another output folder, or make it readable "
                      "(chmod u+rx)") from None
    if others:
        foreign = None if replaceable is None else _not_replaceable(out, others, replaceable)
        if replaceable is None or not force:   # --force offered only where it would replace OUT
            raise already_exists(out, sorted(entry.name for entry in others),
                                 None if foreign != [] else "it once the new one is whole")
        if foreign and replaceable.any_klconvert_output:
            besides = "" if replaceable.what is None else f", or {replaceable.what}"
            raise KLError(f"{out}: --force replaces only a folder klconvert wrote (or an empty one{besides}), and this "
                          "also holds other files, which klconvert did not write: "
                          f"{names_shown(foreign)}; move them out of it, or choose another output folder")
        if foreign:
            raise KLError(f"{out}: --force replaces only an empty folder or {replaceable.what}, and this also holds "
                          f"other files: {names_shown(foreign)}; move them out of it, or choose another output folder")
    try:
        write_test(out, out)
    except OSError as e:   # a read-only file system, no write access
        refuse_out_of_descriptors(e, out)
        raise KLError(f"{out}: cannot create files in it ({e.strerror}); choose a folder you can write to") from None


def _not_replaceable(out: Path, others: list[Path], replaceable: Replaceable) -> list[str]:
    """Those of OUT's `others` (_others) that --force may not replace: where `replaceable` takes any klconvert output
    and OUT has a record, those it does not list (as quantize's --force takes it); else those `replaceable` turns down,
    but the record of a run of its own command."""
    if replaceable.any_klconvert_output:
        unlisted = not_written_by_klconvert(out, [entry.name for entry in others])
        if unlisted is not None:
            return unlisted
    return sorted(entry.name for entry in others
                  if not (entry.name == OUTPUT_RECORD and entry.is_file() and not entry.is_symlink())
                  and not (replaceable.may_hold is not None and replaceable.may_hold(entry)))


def _named(out: Path) -> Path:
    """OUT as a path that ends in its name: the current folder (".") or one above it ("..") as its absolute path. An
    existing OUT is filled in place, never renamed onto, so an empty current folder is written as any empty folder is
    (refuse_no_new_name refuses "." for quantize, which renames its folder onto OUT)."""
    return Path(os.path.abspath(out)) if out.name in ("", "..") else out


def fill_under_way(out: Path) -> str | None:
    """How a run filling OUT in place stands -- "under way (pid N)", or "under way (or was stopped)" where no live
    process holds its lock -- when OUT holds that run's lock or temporaries (the files it lacks were moved aside by
    that run, not lost by the user); None when it holds neither, or cannot be listed."""
    try:
        under_way = (os.path.lexists(lock_path(out, inside=True))
                     or any(runs_temporary(entry, out) is not None for entry in out.iterdir()))
    except OSError:   # not listable: what is missing is said as before
        return None
    return _run_state(out) if under_way else None


def writing_under_way(out: Path) -> tuple[Path, str] | None:
    """Where OUT is missing: the folder a run writing OUT whole fills beside it (.OUT.partial-PID-XXXXXXXX, this
    user's and marked: runs_temporary) and how that run stands, as fill_under_way says it; None when there is none
    (or the folder OUT goes in cannot be listed)."""
    start = temporaries_start(out, "partial")
    try:
        with os.scandir(out.parent) as entries:   # names first: the folder may hold a million others
            for entry in entries:
                if not entry.name.startswith(start):
                    continue
                pid = runs_temporary(Path(entry.path), out)
                if pid is not None and entry.name.startswith(temporary_prefix(out, "partial", pid)):
                    return Path(entry.path), _run_state(out)
    except OSError:   # not listable: what is missing is said as before
        pass
    return None


def _run_state(out: Path) -> str:
    """"under way (pid N)" while a process holds OUT's lock, else "under way (or was stopped)"."""
    pid = lock_holder(out)
    return f"under way (pid {pid})" if pid is not None else "under way (or was stopped)"


def _others(out: Path) -> list[Path]:
    """OUT's entries but those runs writing it make in it: the lock, the hidden temporaries (a killed run's the lock's
    holder removes; a live one's holder refuses the lock), and the temporary mark of a run killed as it renamed its
    folder to OUT (the next run filling OUT removes it)."""
    return [entry for entry in out.iterdir()
            if entry.name not in (lock_path(out, inside=True).name, TEMPORARY_MARKER)
            and runs_temporary(entry, out) is None]


def _identities(out: Path) -> dict[str, tuple[int, int]]:
    """OUT's other entries (_others), each by name with its inode and modification time: what may not change while
    a run fills OUT in place."""
    return {entry.name: (st.st_ino, st.st_mtime_ns) for entry in _others(out) for st in (entry.lstat(),)}


@contextmanager
def whole_folder(out: Path, force: bool = False, replaceable: Replaceable | None = None,
                 last: str = CONFIG_FILE) -> Iterator[Path]:
    """The folder to write OUT's files into, renamed to OUT when the body ends -- or, where OUT is a folder already
    (its mode and group the user's), made in it and its files moved up into it in place of OUT's earlier ones,
    `last` (the file that says the folder is whole) after the rest (see the module's text). OUT is checked now and
    again at the end; an OSError of the body or of the moves is one KLError line."""
    out = _named(out)
    refuse_taken(out, force, replaceable)
    in_place = out.exists()
    with OutputLock(out, inside=lock_goes_inside(out)) as lock:
        refuse_taken(out, force, replaceable)   # again: a writer that held the lock before us may have changed OUT
        if out.exists() and not in_place:
            raise KLError(f"{out}: appeared as this run started; rerun to write into it")
        lock.going_ahead()
        earlier = _identities(out) if in_place else {}
        new: Path | None = None
        try:
            with Uninterrupted():   # one inside mkdtemp left its folder beside OUT (or in it), unnamed and unremoved
                new = Path(tempfile.mkdtemp(prefix=temporary_prefix(out, "partial"),
                                            dir=out if in_place else out.parent))
            new.chmod(stat.S_IRWXU)   # mkdtemp's 0700 is masked too: under umask 0777 no run could write or remove it
            mark_temporary(new)   # until it is in place: a run killed before leaves it for the next to remove
            yield new
            write_output_record(new, sorted(set(os.listdir(new)) - {TEMPORARY_MARKER, OUTPUT_RECORD}))
            give_usual_modes(new)
            if not in_place:
                if os.path.lexists(out):   # someone else's, empty or not: never renamed over
                    raise KLError(f"{out}: appeared while writing it; move it away and rerun")
                with Uninterrupted():   # a kill between the two leaves the mark in OUT: a run filling OUT removes it
                    os.rename(new, out)
                    unmark_temporary(out)
                    out.chmod(usual_mode(True))   # last: one without the owner's write keeps the mark otherwise
                    note_complete(out)   # an interrupt held back meanwhile says so: a rerun is refused, OUT being there
            elif not out.is_dir() or out.is_symlink() or _identities(out) != earlier:
                raise KLError(f"{out}: changed while writing into it; move it away and rerun")
            else:
                _replace_in_place(new, out, list(earlier), last)
                unmark_temporary(out)   # a mark a killed run left in OUT (_others)
        except BaseException as e:
            if new is not None:
                remove_temporary(new)
            if isinstance(e, OSError):
                raise KLError(_write_error(e, new, out)) from None
            raise


def _replace_in_place(new: Path, out: Path, earlier: list[str], last: str) -> None:
    """Put `new`'s entries into OUT, its parent, in place of OUT's `earlier` ones (none where it was empty): these
    moved aside into a hidden folder in OUT, `last` first and OUTPUT_RECORD last, then `new`'s moved up, the record
    first and `last` after the rest, then the aside folder deleted -- OUT holds `last` only while whole, and the
    record of what it holds while it holds anything. On a failure (an interrupt too) the earlier entries go back,
    in the order new ones go up."""
    aside = None
    try:
        with Uninterrupted():   # one inside mkdtemp left its folder in OUT, unnamed here and unremoved
            aside = Path(tempfile.mkdtemp(prefix=temporary_prefix(out, "replaced"), dir=out))
            aside.chmod(stat.S_IRWXU)   # as `new`: mkdtemp's mode is masked
            mark_temporary(aside)   # before any move: a run killed after leaves it for the next to remove
        _move(sorted(earlier, key=lambda name: (name != last, name == OUTPUT_RECORD, name)), out, aside)
        with Uninterrupted():   # an interrupt once the last is in says OUT is whole, as the rename's
            try:
                _move(_moved_in(set(os.listdir(new)) - {TEMPORARY_MARKER}, last), new, out)
            except BaseException:   # a failed move (an interrupt is held back: it comes once OUT is whole)
                _move(_moved_in(earlier, last), aside, out)
                raise
            note_complete(out)   # whole: an interrupt as the entries went in, or the earlier ones go, says so
            unmark_temporary(new)
            new.rmdir()
            # inside the block: one held as the entries went in is said as the deletion starts, and a second stops
            # it (raised as the block ended, it came before, and only a third stopped the deletion: h252's F1)
            aside, replaced = None, aside
            remove_replaced(replaced, out)
    finally:
        if aside is not None:   # one as the earlier entries go comes once they are gone, not leaving them in OUT
            remove_replaced(aside, out)


def _moved_in(names: set[str] | list[str], last: str) -> list[str]:
    """`names` in the order they go into OUT: OUTPUT_RECORD first, `last` last."""
    return sorted(names, key=lambda name: (name != OUTPUT_RECORD, name == last, name))


def _move(names: list[str], source: Path, target: Path) -> None:
    """Rename each of `names`, in this order, from `source` into `target`; on a failure (an interrupt too) those
    moved so far go back, the other way round, so `source` is left as it was."""
    moved: list[str] = []
    try:
        for name in names:
            moved.append(name)   # before the rename: an interrupt between the two must not miss it
            os.rename(source / name, target / name)
    except BaseException:
        for name in reversed(moved):
            if os.path.lexists(target / name):   # the last one's rename may not have happened, or one vanished
                with suppress(OSError):   # one that cannot go back keeps none of the others from it
                    os.rename(target / name, source / name)
        raise


def _write_error(e: OSError, new: Path | None, out: Path) -> str:
    """The line for an OSError while writing OUT: the file named as it would be in OUT."""
    where = Path(os.path.abspath(e.filename)) if e.filename else out
    if new is not None and where.is_relative_to(os.path.abspath(new)):
        where = out / where.relative_to(os.path.abspath(new))
    return f"{failed_write(e, where)} and rerun (nothing was written to {out})"


def give_usual_modes(top: Path) -> None:
    """Give every folder and file in `top` the umask's usual mode: some writers make private files (safetensors'
    save_file 0600). `top` itself, which the run still writes in, keeps its own (whole_folder gives it one last)."""
    folder_mode, file_mode = usual_mode(True), usual_mode(False)
    for root, folders, files in os.walk(top):
        for name in folders + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):   # a link's own mode means nothing; its target is not ours to change
                os.chmod(path, folder_mode if name in folders else file_mode)
