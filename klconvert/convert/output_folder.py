"""The output folder under construction: OUT.partial beside OUT, written by one run at a time (OUT.partial.lock),
resumable by finished shard, renamed when whole."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import weakref
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from klconvert.atomic_file import write_atomically
from klconvert.checkpoint.folder_files import CONFIG_FILE, GENAI_CONFIG, MAX_FILE_NAME_BYTES, RECIPE_FILE, RECIPE_HEADER
from klconvert.checkpoint.regular_file import file_identity, open_regular, read_json
from klconvert.disk_space import failed_write
from klconvert.entry import Uninterrupted, note_complete, note_left
from klconvert.errors import KLError, controls_escaped, refuse_out_of_descriptors, shown
from klconvert.hex_digests import HASH_CHUNK_BYTES, SHA256_HEX
from klconvert.shell_command import shell_command
from klconvert.user_paths import refuse_unreachable, shown_path

if TYPE_CHECKING:   # the shard writer imports torch (~2 s of CPU), which a refusal of OUT, or of a model folder that is
    # not there (models.model_folder), needs not: shard_as_planned imports it where a shard is compared
    from klconvert.checkpoint.safetensors_writer import PlannedTensor

# What the partial folder is for (source fingerprint and options), and the sha256 and file of each shard finished so far
RESUME_RECORD = ".klconvert-resume.json"
FINISHED = "finished"  # the resume record's key for {shard name: sha256}: with FINISHED_FILES, the part that grows
# {shard name: file_identity} of each finished shard as its sha256 was made or checked: a rerun ending a killed finish
# takes a shard still that file (a write sets its inode's change time) for one of that sha256, unread
FINISHED_FILES = "finished_files"
MAX_RESUME_RECORD_BYTES = 16 << 20  # a record holds ~350 bytes a shard: past this it is not one of ours
# What a finished OUT holds besides the files it lists: the names of the files the run wrote (what --force may replace)
OUTPUT_RECORD = ".klconvert-output.json"
MAX_OUTPUT_RECORD_BYTES = 1 << 20  # a record holds ~40 bytes a file: past this it is not one of ours
PATH_MAX = 4096  # Linux's bound on a path, its closing NUL included: a longer one is ENAMETOOLONG
MAX_PID = 2**31 - 1  # pid_t's largest: a larger number in a lock file is no process's id
# Hidden names a run makes beside OUT for a while, .OUT.PURPOSE-PID-XXXXXXXX (tempfile's 8 random characters): a
# folder written whole before it is renamed to OUT, an OUT moved aside while its replacement goes in, a write test
TEMPORARY_PURPOSES = ("partial", "replaced", "write-test")
TEMPORARY_NAME = re.compile(rf"({'|'.join(TEMPORARY_PURPOSES)})-([0-9]{{1,10}})-[a-z0-9_]{{8}}")
# An empty file a run puts in each folder it holds under a temporary name: only a folder with it (or an empty one, or
# an empty write-test file) is a dead run's to remove -- a folder of the user's that happens to be so named is not
TEMPORARY_MARKER = ".klconvert-temporary"


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def lock_path(out: Path, inside: bool = False) -> Path:
    """OUT's lock file: OUT.partial.lock beside it, or -- `inside`, for a run filling an existing OUT in place, whose
    parent (a mount point's) may take no file -- the same name hidden in OUT."""
    return out / f".{out.name}.partial.lock" if inside else out.with_name(out.name + ".partial.lock")


def temporary_prefix(out: Path, purpose: str, pid: int | None = None) -> str:
    """The start of a hidden name process `pid` (default: this one) makes beside `out` for `purpose` (tempfile
    adds 8 characters)."""
    return f"{temporaries_start(out, purpose)}{os.getpid() if pid is None else pid}-"


def temporaries_start(out: Path, purpose: str = "") -> str:
    """The start of every hidden name runs make beside `out` (for `purpose`, where given: up to the pid)."""
    return f".{out.name}.{purpose}-" if purpose else f".{out.name}."


def names_beside(out: Path) -> list[str]:
    """Every name a run writing `out` makes beside it, at its longest: the lock, OUT.partial and the temporaries
    (under the largest pid: what OUT's name may be does not hang on this run's pid)."""
    return [lock_path(out).name, partial_path(out).name,
            *(temporary_prefix(out, purpose, MAX_PID) + "x" * 8 for purpose in TEMPORARY_PURPOSES)]


def files_klconvert_wrote(folder: Path) -> set[str] | None:
    """The names of the files a klconvert run wrote into `folder`, as its OUTPUT_RECORD lists them; None when it holds
    no such record (not an output of klconvert's, or one whose record is gone or unreadable)."""
    try:   # a regular file, bounded: OUT may hold anything under that name
        record = read_json(folder / OUTPUT_RECORD, MAX_OUTPUT_RECORD_BYTES, OUTPUT_RECORD)
    except (OSError, ValueError, RecursionError, KLError):   # RecursionError: JSON nested past Python's stack
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return set(files)


def not_written_by_klconvert(folder: Path, entries: list[str]) -> list[str] | None:
    """Those of `entries` (the folder's) that no klconvert run wrote there: neither listed in its OUTPUT_RECORD as a
    file (a folder under a listed name is the user's) nor the record itself or a mark a run left; None when the folder
    holds no record, so nothing in it is known to be klconvert's."""
    written = files_klconvert_wrote(folder)
    if written is None:
        return None
    ours = written | {OUTPUT_RECORD, TEMPORARY_MARKER, RESUME_RECORD}   # a run killed inside finish() leaves its record
    return sorted(name for name in entries if name not in ours or (folder / name).is_dir())


def names_shown(names: list[str]) -> str:
    """The first three of `names` and how many more: how a refusal names what is in the way, each name as a line
    shows one from the disk (controls_escaped: a newline in it would end the line)."""
    return ", ".join(map(controls_escaped, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def write_output_record(folder: Path, files: list[str]) -> None:
    """List `files`, those of `folder` (the output about to be renamed into place) that the run wrote, in its
    OUTPUT_RECORD."""
    write_atomically(folder / OUTPUT_RECORD, (json.dumps({"files": sorted(files)}, indent=1) + "\n").encode())


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in HASH_CHUNK_BYTES chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_no_new_name(out: Path) -> None:
    """KLError when OUT names the current folder or one above it (what is written is made beside OUT, and renamed
    onto it), when a name made beside it would be too long for a file system, when OUT cannot be looked at (a
    folder on its way that cannot be entered: user_paths.unreachable), or when the umask would give the user no read
    or search permission on what is written (under 0777 a finished OUT was mode 000) -- said before any work."""
    refuse_unreachable(out)
    if (mask := umask()) & (stat.S_IRUSR | stat.S_IXUSR):
        raise KLError(f"{out}: the umask ({mask:04o}) would leave what is written there unreadable by you; set one "
                      "that keeps your own read and search permission, e.g. umask 022, and rerun")
    if out.name in ("", ".."):
        raise KLError(f"{out}: names the current folder or one above it, not a folder to create; give the new "
                      f"folder's name, e.g. {out / 'q4'}")
    longest = max(names_beside(out), key=lambda name: len(os.fsencode(name)))
    extra = len(os.fsencode(longest)) - len(os.fsencode(out.name))
    if len(os.fsencode(longest)) > MAX_FILE_NAME_BYTES:
        raise KLError(f"{out}: its name is too long for the files made beside it ({longest[:40]}..., "
                      f"{len(os.fsencode(longest))} bytes, over the {MAX_FILE_NAME_BYTES} a file system allows); "
                      f"choose a name of at most {MAX_FILE_NAME_BYTES - extra} bytes")
    longest_path = len(os.fsencode(os.path.abspath(out.parent / longest)))
    if longest_path >= PATH_MAX:
        raise KLError(f"{shown_path(out)}: its path is too long for the files made beside it ({longest_path:,} bytes "
                      f"as a full path, over the {PATH_MAX - 1:,} the system takes); give a shorter path")


def refuse_link_or_file(out: Path) -> None:
    """KLError when OUT is a symbolic link (a dangling one too) or something other than a folder: no output of any
    command replaces either, with --force or without."""
    if out.is_symlink():
        raise KLError(f"{out}: is a symbolic link{'' if out.exists() else ' to nothing'}; give the path of a new "
                      "folder")
    if out.exists() and not out.is_dir():
        raise KLError(f"{out}: exists and is not a folder; give the path of a new folder")


def refuse_out_over_source(source: Path, out: Path, written: str) -> None:
    """KLError when OUT, which a command writes the `written` into from the folder SOURCE, is that folder, holds it,
    or lies inside it: --force would replace the source it reads (or a folder holding it), and an OUT inside it would
    become part of the source -- said before OUT is looked at, so no refusal offers --force for it."""
    s, o = source.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise KLError(f"{out}: is the source folder or holds it; write the {written} somewhere else")
    if s in o.parents:
        raise KLError(f"{out}: is inside the source folder {source}; write the {written} somewhere else")


def write_test(folder: Path, out: Path) -> None:
    """Create and remove an empty file in `folder` under OUT's write-test name: OSError when no file can be made
    there (a read-only folder or file system)."""
    fd, probe = tempfile.mkstemp(prefix=temporary_prefix(out, "write-test"), dir=folder)
    os.close(fd)
    try:
        os.unlink(probe)
    except FileNotFoundError:   # a run taking OUT's lock meanwhile removes temporaries in OUT, this one too
        pass


def killed_while_finishing(out: Path) -> bool:
    """Whether OUT is the output of a run killed inside finish() after the rename (SIGKILL, which Uninterrupted does
    not hold back): it still holds the run's resume record, one of ours, beside its output record. Anything else
    under that name (a FIFO, garbage) leaves OUT an existing folder like any other."""
    return _stored_record(out) is not None and files_klconvert_wrote(out) is not None


def already_exists(out: Path, held: list[str], force_replaces: str | None = None) -> KLError:
    """The refusal of OUT, there already, to a run without --force: one that is not empty names what it `held`
    (sorted names: "already exists" read wrong where only a file in it is in the way, synth and export-onnx taking an
    empty folder); it offers --force only where `force_replaces` says what --force would replace -- None where --force
    would be refused too, whose refusal the offer would only lead to. How every command writing a folder says it."""
    taken = f"is not empty (it holds {names_shown(held)})" if held else "already exists"
    if force_replaces is None:
        return KLError(f"{out}: {taken}; choose another output folder (or move it away)")
    return KLError(f"{out}: {taken}; choose another output folder, or pass --force to replace {force_replaces}")


def quantize_out_exists(out: Path) -> KLError:
    """already_exists for quantize's OUT: --force offered where it would replace OUT (force_would_replace)."""
    try:
        held = _entries(out)
    except OSError:   # unreadable: refused as there, what it holds unnamed
        held = []
    return already_exists(out, held, "it once the new one is complete" if force_would_replace(out) else None)


def _entries(out: Path) -> list[str]:
    """The names of OUT's entries, sorted, but what runs left in it under a temporary name (an interrupt inside
    write_test), which the lock's holder removes (OutputLock)."""
    return sorted(name for name in os.listdir(out) if runs_temporary(out / name, out) is None)


def force_would_replace(out: Path) -> bool:
    """Whether --force lets quantize replace OUT, an existing folder (refuse_existing_out lets it by): what a refusal
    without --force may offer."""
    try:
        refuse_existing_out(out, force=True)
    except KLError:
        return False
    return True


def refuse_existing_out(out: Path, force: bool) -> None:
    """KLError when OUT exists, unless `force` and OUT is an empty folder or one that holds only what a klconvert run
    wrote there (not_written_by_klconvert), and can be listed and written (the finished folder replaces it: its earlier
    files are marked and moved aside), or -- without `force` -- OUT was left by a run killed while finishing it (the
    run finishes it where its record is the same: OutputFolder.end_killed_finish); or when OUT names the current
    folder or one above it, is a link or a file, or is a mount point (OUT.partial is made beside OUT, and renamed onto
    it, which no rename does onto a mount point)."""
    refuse_no_new_name(out)
    refuse_link_or_file(out)
    if not out.exists():
        return
    if os.path.ismount(out):
        raise KLError(f"{out}: is a mount point, which the finished folder (made beside it, then renamed onto it) "
                      f"cannot replace; give a folder inside the volume, e.g. {out / 'quantized'}")
    if not force and not killed_while_finishing(out):
        raise quantize_out_exists(out)
    if not force:
        return
    try:   # but a run's temporaries (_entries): refused, they stopped every --force
        entries = _entries(out)
    except OSError as e:
        refuse_out_of_descriptors(e, out)
        raise KLError(f"{out}: cannot list it ({e.strerror}), so --force cannot tell what it would replace; choose "
                      "another output folder, or make it readable (chmod u+rx)") from None
    others = not_written_by_klconvert(out, entries) if entries else []
    if others is None and _older_quantize_output(out):
        raise KLError(f"{out}: --force replaces only a folder whose {OUTPUT_RECORD} lists what klconvert wrote, and "
                      f"this is the output of a klconvert older than that record (its {RECIPE_FILE} is klconvert's), "
                      f"whose files --force cannot tell from yours; remove it yourself (rm -r {shown_path(out)}) and "
                      "rerun, or choose another output folder")
    if others is None and (unrecorded := _unrecorded_output(out)) is not None:
        raise KLError(f"{out}: --force replaces only a folder klconvert wrote (or an empty one), and no "
                      f"{OUTPUT_RECORD} lists what klconvert wrote in this one, {unrecorded}, so --force cannot tell "
                      f"its files from yours; remove it yourself where you can spare it (rm -r {shown_path(out)}) "
                      "and rerun, or choose another output folder")
    if others is None:
        raise KLError(f"{out}: --force replaces only a folder klconvert wrote (or an empty one), and this holds "
                      f"other files (no {OUTPUT_RECORD} lists what klconvert wrote); choose another output folder or "
                      "move it away")
    if others:
        raise KLError(f"{out}: --force replaces only a folder klconvert wrote (or an empty one), and this also holds "
                      f"other files, which klconvert did not write: {names_shown(others)}; move them out of it, or "
                      "choose another output folder")
    try:
        write_test(out, out)
    except OSError as e:
        refuse_out_of_descriptors(e, out)
        raise KLError(f"{out}: cannot create files in it ({e.strerror}), which --force needs to replace it; choose "
                      "another output folder, or make it writable (chmod u+w)") from None


def _unrecorded_output(out: Path) -> str | None:
    """What OUT, holding no OUTPUT_RECORD (one unreadable is said as that), is by the file that makes a folder whole:
    an ONNX export (export-onnx's GENAI_CONFIG) of a klconvert before synth and export-onnx wrote that record
    (whole_folder), or a checkpoint folder (CONFIG_FILE: such a synth's, or a download); None for neither."""
    if os.path.lexists(out / OUTPUT_RECORD):
        return None
    if os.path.lexists(out / GENAI_CONFIG):
        return f"an ONNX export ({GENAI_CONFIG} is here) of a klconvert older than that record"
    if os.path.lexists(out / CONFIG_FILE):
        return (f"a checkpoint folder ({CONFIG_FILE} is here): a download, or a `klconvert synth` output of a "
                "klconvert older than that record")
    return None


def _older_quantize_output(out: Path) -> bool:
    """Whether OUT is a quantize output of a klconvert before OUTPUT_RECORD (7fbe82f): it has no entry of that name
    (one unreadable is not an older version's), and its RECIPE_FILE, a regular file, begins with the line every
    version's quantize writes first."""
    if os.path.lexists(out / OUTPUT_RECORD):
        return False
    try:
        with open_regular(out / RECIPE_FILE) as f:
            return f.read(len(RECIPE_HEADER)) == RECIPE_HEADER.encode()
    except OSError:
        return False


def make_parent(out: Path) -> list[Path]:
    """Create the folder `out` goes in (and those above it) and check that files can be created in it, or say in
    one line why not; the folders it created, outermost first."""
    refuse_no_new_name(out)
    created = [folder for folder in reversed(out.absolute().parents) if not folder.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:   # a file where a folder should be, no permission, a read-only or virtual file system
        remove_created(created)   # those made before the one that failed
        reason = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror
        raise KLError(f"{out}: cannot create the folder it goes in, {out.parent} ({reason}); choose another "
                      "output path") from None
    try:   # the folder exists, but its file system may be read-only or virtual, or the user may lack write access
        fd, probe = tempfile.mkstemp(prefix=temporary_prefix(out, "write-test"), dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        remove_created(created)
        refuse_out_of_descriptors(e, out)
        raise KLError(f"{out}: cannot create files in the folder it goes in, {out.parent} ({e.strerror}); choose "
                      "a folder you can write to") from None
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the folders make_parent created (innermost first), as far as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except FileNotFoundError:   # never made: a mkdir failed before it
            continue
        except OSError:   # not empty: a partial output to resume from, or someone else's files
            break


@contextmanager
def parent_made(out: Path) -> Iterator[None]:
    """make_parent(out) for the body; if the body fails, the folders it created go again (while empty)."""
    created = make_parent(out)
    try:
        yield
    except BaseException:
        remove_created(created)
        raise


class OutputLock:
    """One writer per output: an exclusive flock on OUT.partial.lock, which holds the writer's pid.

    A second run is refused naming the holder. A lock file left by a run that died (the kernel drops its flock) is
    taken over, and said so on stderr once the run goes ahead (going_ahead, or its end: a refused run says one line);
    holding it, what dead runs left beside OUT under a temporary name is removed.
    The file is removed when the lock is released, and after a run that failed (or could not take the lock, or write
    its pid), the folders made for OUT too while empty (a refused run leaves nothing behind). `inside`: the lock is
    made in OUT, an existing folder (lock_path), and no folder is made for it.
    """

    def __init__(self, out: Path, inside: bool = False):
        self.out, self.path, self.inside = out, lock_path(out, inside), inside
        self.taken_over: str | None = None   # the note that a dead run's lock was taken over, until said

    def going_ahead(self) -> None:
        """Say that a dead run's lock was taken over, if it was (once): the run is past its refusals."""
        if self.taken_over is not None:
            print(self.taken_over, file=sys.stderr)
            self.taken_over = None

    def __enter__(self) -> OutputLock:
        self._created = [] if self.inside else make_parent(self.out)
        try:   # released by __exit__; where an interrupt lands as __exit__ is entered, by the finalizer, at the latest
            self._release = weakref.finalize(self, _release_lock, self.path, self._lock())   # as the process exits
        except BaseException:
            remove_created(self._created)
            raise
        remove_dead_runs_temporaries(self.out)
        return self

    def _lock(self) -> int:
        """The lock file's descriptor, locked and holding this process's pid."""
        while True:
            fd = _open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise KLError(f"{self.out}: another klconvert run (pid {holder if holder else 'unknown'}) is "
                              f"writing it (lock {self.path}); wait for it to finish, or stop it and rerun") from None
            try:
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # the holder removed it between our open and flock: lock the new one
                same_file = False
            if same_file:
                break
            os.close(fd)
        previous = _read_pid(fd)
        if previous is not None:
            self.taken_over = (f"klconvert: taking over {self.path}, left by process {previous} "
                               f"({'no longer running' if not _running(previous) else 'which no longer holds it'})")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:   # a full disk: an empty file could be made, not written
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise KLError(f"{failed_write(e, self.path)} and rerun") from None
        return fd

    def __exit__(self, failure, *exc) -> None:
        self._release()
        if failure is not None:
            remove_created(self._created)
        else:
            self.going_ahead()   # a holder that never said it went ahead


def _release_lock(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (so no one locks a file about to vanish), then let it go."""
    path.unlink(missing_ok=True)
    os.close(fd)


def lock_goes_inside(out: Path) -> bool:
    """Whether OUT's lock goes in OUT: only where OUT is a folder whose parent takes no file (a mount point's, say).
    Elsewhere it goes beside OUT, where quantize -- which writes OUT.partial beside OUT, so never runs where that
    parent takes no file -- and pull's --local-dir take it too: they refuse each other."""
    if not out.is_dir():
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=temporary_prefix(out, "write-test"), dir=out.parent)
    except OSError:
        return True
    os.close(fd)
    with suppress(FileNotFoundError):
        os.unlink(probe)
    return False


def _open_lock_file(path: Path) -> int:
    """The lock file, opened read-write (created when missing); KLError unless it is a regular file -- not a folder,
    FIFO or device, nor a link, whose target the pid would be written over."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        kind = {errno.EISDIR: "a folder", errno.ELOOP: "a symbolic link"}.get(e.errno)
        if kind is None:   # a full disk, no permission: nothing in the way to remove
            raise KLError(f"{failed_write(e, path)} and rerun") from None
        raise KLError(f"{path}: cannot use it as this output's lock file ({kind}); remove it, or choose another "
                      "output folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise KLError(f"{path}: cannot use it as this output's lock file (not a regular file: a FIFO, device or "
                      "socket); remove it, or choose another output folder")
    return fd


def mark_temporary(folder: Path) -> None:
    """Put TEMPORARY_MARKER in `folder`, which this run holds under a temporary name."""
    (folder / TEMPORARY_MARKER).touch()


def unmark_temporary(folder: Path) -> None:
    (folder / TEMPORARY_MARKER).unlink(missing_ok=True)


def remove_temporary(folder: Path) -> None:
    """Delete `folder`, a temporary of this run's, its mark last: a run killed meanwhile (deleting a 98 GB folder
    takes a while) leaves it marked, for the next run to remove, as does a file that cannot be deleted."""
    with suppress(OSError):
        for name in os.listdir(folder):
            if name != TEMPORARY_MARKER:
                _remove_tree(folder / name)
        _remove_tree(folder)


def remove_replaced(aside: Path, out: Path) -> None:
    """Delete `aside`, where the earlier OUT (or its entries) went as the new one came in (remove_temporary), as a
    whole: an interrupt meanwhile is held back until it is gone -- and said at once, with where a second would leave
    the rest (silence invited the second: 98 GB takes a while) -- and a second stops it, the line the command ends
    in naming that hidden folder and how it goes."""
    with Uninterrupted(notice=lambda received: f"klconvert: deleting the earlier {out} before stopping; a second "
                                               f"{received} leaves the rest of it in {aside}"):
        try:
            remove_temporary(aside)
        except BaseException:
            if os.path.lexists(aside):   # still marked (remove_temporary): a run taking OUT's lock removes it
                note_left(f"the rest of the earlier {out} is left in {aside}: the next run writing {out} removes it, "
                          f"or {shell_command('rm', '-rf', aside)}")
            raise


def _remove_tree(top: Path) -> None:
    """Delete `top`, a folder with all it holds or a file, holding one file descriptor at a time (listdir's, closed
    as it returns; shutil.rmtree holds two a level): a run out of descriptors removes its temporary too. It lies in
    a folder of mkdtemp's (the user's alone), where no one else can make a folder a link meanwhile."""
    if not top.is_dir() or top.is_symlink():
        top.unlink()
        return
    folders = [top]
    while folders:   # deepest last: a folder is removed once what it holds is
        inner = []
        for entry in (folders[-1] / name for name in os.listdir(folders[-1])):
            if entry.is_dir() and not entry.is_symlink():
                inner.append(entry)
            else:
                entry.unlink()
        if inner:
            folders += inner
        else:
            folders.pop().rmdir()


def runs_temporary(entry: Path, out: Path) -> int | None:
    """The pid of the run whose temporary `entry` (beside OUT, or in it) is -- named so (TEMPORARY_NAME), this user's,
    and a marked or empty folder or an empty write-test file, never a link -- else None."""
    prefix = temporaries_start(out)
    name = TEMPORARY_NAME.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
    if name is None or not 0 < int(name[2]) <= MAX_PID:
        return None
    try:
        st = entry.lstat()
        if st.st_uid != os.getuid():
            return None
        if stat.S_ISDIR(st.st_mode):
            ours = (entry / TEMPORARY_MARKER).is_file() or not any(entry.iterdir())
        else:
            ours = stat.S_ISREG(st.st_mode) and st.st_size == 0 and name[1] == "write-test"
    except OSError:   # gone meanwhile, or not ours to look into
        return None
    return int(name[2]) if ours else None


def remove_dead_runs_temporaries(out: Path) -> None:
    """Delete what killed runs left beside OUT (or in it) under a temporary name (runs_temporary: a folder written
    whole, an OUT moved aside, a write test): beside OUT, those whose process is no longer running (a write test is
    made before the lock); inside OUT, every one -- only a run holding OUT's lock, as the caller does, makes one there,
    so a pid that runs again (a container's 1) is another process. Called holding OUT's lock."""
    for folder, whatever_pid in ((out.parent, False), (out, True)):
        try:
            entries = list(folder.iterdir())
        except OSError:   # no such folder, or one may write to but not list: nothing found, nothing removed
            continue
        for entry in entries:
            pid = runs_temporary(entry, out)
            if pid is not None and (whatever_pid or not _running(pid)):
                try:
                    _remove(entry)
                except OSError:   # gone meanwhile, or not ours to remove: left as it is
                    continue


def lock_holder(out: Path) -> int | None:
    """The pid OUT's lock file (in OUT or beside it) holds while that process still runs and the file is locked, as a
    refused second run names it; None when there is none, it names no running process, or nobody holds its lock (a
    dead run's file, its pid since taken by another process)."""
    for path in (lock_path(out, inside=True), lock_path(out)):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:   # none there (the usual case), or a link: no lock of a run's
            continue
        try:
            pid = _read_pid(fd) if stat.S_ISREG(os.fstat(fd).st_mode) and _locked(fd) else None
        except OSError:
            pid = None
        finally:
            os.close(fd)
        if pid is not None and _running(pid):
            return pid
    return None


def _locked(fd: int) -> bool:
    """Whether a run holds the lock of the lock file open at `fd` (OutputLock's exclusive flock): a shared one taken
    there means none does (it goes as `fd` is closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    return False


def _read_pid(fd: int) -> int | None:
    """The pid the lock file holds, or None when it holds no process's id (empty, garbage, out of pid_t's range)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    pid = int(text) if text.isdigit() else 0
    return pid if 0 < pid <= MAX_PID else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def interrupted_quantize(partial: Path) -> bool:
    """Whether `partial` (OUT.partial) is a quantize's that has not finished: a folder of this user's, no link, holding
    a resume record of ours -- what OutputFolder.open takes up (or refuses only for its SRC and options)."""
    try:
        return _users_folder(partial) and _stored_record(partial) is not None
    except OSError:   # none there, or a name past NAME_MAX (ENAMETOOLONG): no quantize's
        return False


def _users_folder(path: Path) -> bool:
    """Whether `path` is a folder of this user's, not a link to one (OSError where it cannot be looked at)."""
    st = path.lstat()
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _not_a_partial_output(path: Path) -> str:
    """What `path`, found where OUT.partial goes, is instead of a folder of this user's."""
    if path.is_symlink():
        return "a link"
    return "not a folder" if not path.is_dir() else f"owned by another user (uid {path.stat().st_uid})"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_partial(path: Path) -> None:
    """OUT.partial deleted with its resume record last: an interrupt midway leaves a folder that a rerun still knows
    as klconvert's (one left without its record, shards and all, was refused by every rerun, --force too)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    with os.scandir(path) as entries:   # closed if a removal raises (an interrupt, an rmtree error)
        for entry in entries:
            if entry.name != RESUME_RECORD:
                _remove(Path(entry.path))
    (path / RESUME_RECORD).unlink(missing_ok=True)
    path.rmdir()


class OutputFolder:
    """OUT.partial: created fresh, or taken up from an interrupted run with the same record, and renamed to
    OUT when whole (replacing an existing OUT only then, and only with force). `files`: the names the run writes into
    it, nothing else -- what else is found there is refused, not carried into OUT."""

    def __init__(self, out: Path, record: dict, force: bool, files: list[str]):
        self.out, self.path, self.force, self.files = out, partial_path(out), force, sorted(files)
        self.record = json.loads(json.dumps(record))  # JSON types, to compare with the stored one
        self.finished: dict[str, str] = {}   # {shard name: sha256} of the shards written whole, this run or before
        self.finished_files: dict[str, list[int]] = {}   # {shard name: file_identity} of the same (FINISHED_FILES)
        # whether open() made the folder or took it up: from then on the run's to clean up when it fails (remove,
        # remove_unfinished); before, what is there is another run's or nothing
        self.opened = False

    def open(self) -> bool:
        """Make the folder ready; True when an interrupted run's folder was taken up. A failure, from inside it on,
        is the caller's to clean up where `opened` says the folder is this run's."""
        if self.path.exists() or self.path.is_symlink():
            if not _users_folder(self.path):
                raise KLError(f"{self.path}: exists but is {_not_a_partial_output(self.path)}, so it is not an "
                              "interrupted klconvert run of yours; move or delete it yourself, or choose another OUT")
            mode = stat.S_IMODE(self.path.stat().st_mode)
            if mode & stat.S_IRWXU != stat.S_IRWXU:   # made under such a umask by an older version (mode 000): usable
                self.path.chmod(mode | stat.S_IRWXU)
            stored = _stored_record(self.path)
            finished, finished_files = _taken_progress(stored)
            if stored == self.record:
                self.remove_unfinished()
                self.refuse_files_not_written()
                if isinstance(finished, dict):   # anything else there: no shard is known to be finished
                    self.finished = {name: digest for name, digest in finished.items()
                                     if isinstance(digest, str) and SHA256_HEX.fullmatch(digest)}
                if isinstance(finished_files, dict):   # compared only, with what has_finished finds
                    self.finished_files = finished_files
                self.opened = True
                return True
            if stored is None and not any(self.path.iterdir()):   # emptied but not removed: nothing to lose
                self.path.rmdir()
            elif stored is None:   # not a run of ours: --force must not delete what klconvert did not write
                self.path.chmod(mode)
                raise KLError(f"{self.path}: exists but holds no readable {RESUME_RECORD}, so it is not an "
                              "interrupted klconvert run; move or delete it yourself, or choose another OUT")
            elif not self.force and (version := _other_version(stored, self.record)):
                raise KLError(f"{self.path}: holds an interrupted conversion left by {version}, whose resume record "
                              "this one cannot take up; pass --force to start over (its finished shards are written "
                              "again)")
            elif not self.force:
                raise KLError(f"{self.path}: holds an interrupted conversion {_what_differs(stored, self.record)}; "
                              "pass --force to start over (or rerun with that run's SRC and options to resume it)")
            else:
                _remove_partial(self.path)
        with Uninterrupted():   # no interrupt between making the folder and saying it is this run's to remove
            self.path.mkdir(parents=True)
            self.opened = True
        self.path.chmod(stat.S_IRWXU)   # the run's own until finish(): a umask without the owner's rwx made it unusable
        self._write_record()
        return False

    def _write_record(self) -> None:
        record = ({**self.record, FINISHED: self.finished, FINISHED_FILES: self.finished_files} if self.finished
                  else self.record)
        write_atomically(self.path / RESUME_RECORD, (json.dumps(record, indent=1) + "\n").encode())

    def refuse_files_not_written(self) -> None:
        """KLError naming what the folder holds besides the run's files and records (which OUT would carry, listed as
        klconvert's), or a folder under one of their names: the user's to move, not klconvert's to delete."""
        ours = {*self.files, RESUME_RECORD, TEMPORARY_MARKER, OUTPUT_RECORD}   # OUTPUT_RECORD: a finish interrupted
        others = sorted(name for name in os.listdir(self.path) if name not in ours or (self.path / name).is_dir())
        if others:
            folders = " (a folder where the run writes a file counts too)" if set(others) & ours else ""
            raise KLError(f"{self.path}: holds files this run does not write ({names_shown(others)}){folders}; move "
                          "them out of it and rerun to resume")

    def remove(self) -> None:
        """Delete the whole folder (a run that failed before finishing any shard leaves nothing behind)."""
        _remove_partial(self.path)

    def remove_unfinished(self) -> None:
        """Delete files an interrupted write of this run's left under a temporary name: a shard's NAME.partial
        (safetensors_writer) or .NAME.PID.partial (atomic_file); anything else so named, or a folder, is not one."""
        names = {*self.files, RESUME_RECORD, OUTPUT_RECORD}
        for leftover in self.path.glob("*.partial"):
            written = leftover.name.removesuffix(".partial")
            atomic = re.fullmatch(r"\.(.+)\.[0-9]+", written)
            if (written in names or (atomic is not None and atomic[1] in names)) and (
                    leftover.is_symlink() or not leftover.is_dir()):
                leftover.unlink(missing_ok=True)

    def has_finished(self, shard: str, tensors: list[PlannedTensor]) -> bool:
        """Whether `shard` was written whole by an earlier run, with exactly the planned tensors: a regular file (not
        a link, and not a hard link a file elsewhere shares, whose later changes OUT would take) with the sha256
        recorded when it was written. Its file_identity goes in the record where it is another file now (a copy)."""
        path = self.path / shard
        try:   # the header and size first: a shard of other tensors or size is not read through
            found = os.lstat(path)   # before the read: a write during it leaves the identity stale, not the bytes
            if not (shard in self.finished and found.st_nlink == 1 and shard_as_planned(path, tensors)
                    and file_sha256(path) == self.finished[shard]):
                return False
        except OSError:   # unreadable: written again
            return False
        if self.finished_files.get(shard) != list(file_identity(found)):
            self.finished_files[shard] = list(file_identity(found))
            self._write_record()
        return True

    def record_finished(self, shard: str, sha256: str) -> None:
        """Note in the resume record that `shard` is written whole, with this sha256, and the file it is now."""
        self.finished[shard] = sha256
        self.finished_files[shard] = list(file_identity(os.lstat(self.path / shard)))
        self._write_record()

    def write_text(self, name: str, text: str) -> None:
        write_atomically(self.path / name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        write_atomically(self.path / name, data)

    def end_killed_finish(self, shards: dict[str, list[PlannedTensor]]) -> bool:
        """Whether OUT is this run's output, whole, left by a run of the same record killed inside finish() after the
        rename (refuse_existing_out lets it by): if so, that finish is ended -- its record dropped, OUT's mode set.
        Whole: OUT holds this run's files and the two records, nothing else, each a regular file, and each of
        `shards` (name -> planned tensors) recorded finished, with the planned header and size, and the file whose
        sha256 was recorded, unchanged since (FINISHED_FILES; not hashed again: ~27 GB), or one of that sha256 (a
        shard touched, chmod'ed or copied since, or a record of a version before FINISHED_FILES: hashed). KLError,
        as refuse_existing_out's, for any other OUT, untouched; False where force (OUT is replaced) or no such OUT
        is there."""
        if self.force or not os.path.lexists(self.out / RESUME_RECORD):   # refuse_existing_out let by no other OUT
            return False
        stored = _stored_record(self.out)
        finished, finished_files = _taken_progress(stored)
        if (stored != self.record or files_klconvert_wrote(self.out) != set(self.files)
                or not isinstance(finished, dict) or not set(shards) <= set(finished)
                or not isinstance(finished_files, dict | None)
                or not self._out_whole(shards, finished, finished_files or {})):
            raise quantize_out_exists(self.out)
        with Uninterrupted():
            end_finish(self.out)
            note_complete(self.out)
        return True

    def _out_whole(self, shards: dict[str, list[PlannedTensor]], finished: dict, finished_files: dict) -> bool:
        """Whether OUT holds exactly this run's files and the two records, each a regular file (not a link, FIFO or
        folder), its `shards` as planned (shard_as_planned) and each the file `finished_files` records or, where it
        is not (a rare path), a file of the sha256 `finished` records, not a hard link (as has_finished takes)."""
        try:
            entries = os.listdir(self.out)
            return (sorted(entries) == sorted({*self.files, OUTPUT_RECORD, RESUME_RECORD})
                    and all(stat.S_ISREG(os.lstat(self.out / name).st_mode) for name in entries)
                    and all(shard_as_planned(self.out / name, tensors)
                            and (finished_files.get(name) == list(file_identity(found := os.lstat(self.out / name)))
                                 or (found.st_nlink == 1 and file_sha256(self.out / name) == finished[name]))
                            for name, tensors in shards.items()))
        except OSError:   # unreadable: not known to be whole
            return False

    def finish(self) -> Path:
        """Rename the folder to OUT (an existing OUT goes only now: moved aside, put back where the rename fails, and
        deleted once the new one is in place), then drop its resume record: until the rename, an interrupted finish
        leaves a folder that a rerun takes up."""
        out_exists = self.out.exists() or self.out.is_symlink()
        if out_exists and not self.force:
            raise KLError(f"{self.out}: appeared while converting; move it away and rerun to finish "
                          f"(the finished shards wait in {self.path})"
                          + (", or pass --force to replace it" if force_would_replace(self.out) else ""))
        if out_exists:   # what is at OUT now may not be what was checked when the run began
            refuse_existing_out(self.out, force=True)
        self.refuse_files_not_written()
        write_output_record(self.path, self.files)
        # A kill in between leaves OUT.partial to resume, or the record in OUT: the same command's rerun ends that
        # finish (end_killed_finish). The earlier OUT is deleted inside the block too: an interrupt as OUT is
        # replaced comes once it is gone, where it was left beside the new one (remove_replaced)
        with Uninterrupted():
            replaced = move_aside(self.out) if out_exists else None
            try:
                os.rename(self.path, self.out)
            except BaseException:
                if replaced is not None:
                    put_back(replaced, self.out)
                raise
            try:
                end_finish(self.out)
                note_complete(self.out)   # an interrupt held back meanwhile says so: a rerun is refused, OUT is there
            finally:
                if replaced is not None:
                    remove_replaced(replaced, self.out)
        return self.out


def shard_as_planned(path: Path, tensors: list[PlannedTensor]) -> bool:
    """Whether the shard at `path` is a regular file (not a link) that starts with the header of `tensors`, byte for
    byte, unparsed, and is their size: what is known of it without reading it through. OSError where it cannot be
    read."""
    from klconvert.checkpoint.safetensors_writer import shard_header

    head = shard_header(tensors)
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return False
    with open_regular(path) as f:
        if f.read(len(head)) != head:
            return False
    return path.stat().st_size == len(head) + sum(t.nbytes for t in tensors)


def _stored_record(folder: Path) -> dict | None:
    """The resume record in `folder` (OUT.partial, or an OUT a run killed while finishing left it in), or None where
    there is none that is ours."""
    try:   # a regular file, bounded: the folder may hold anything, a FIFO or /dev/zero under that name too
        stored = read_json(folder / RESUME_RECORD, MAX_RESUME_RECORD_BYTES, RESUME_RECORD)
    except (OSError, ValueError, RecursionError, KLError):   # RecursionError: JSON nested past Python's stack
        return None
    return stored if isinstance(stored, dict) and isinstance(stored.get("source"), dict) else None


def _taken_progress(stored: dict | None) -> tuple[object, object]:
    """A stored resume record's FINISHED and FINISHED_FILES, as stored (None where absent), taken out of it: what is
    left is compared with a run's record."""
    if stored is None:
        return None, None
    return stored.pop(FINISHED, None), stored.pop(FINISHED_FILES, None)


def end_finish(out: Path) -> None:
    """A finished output's last steps, once renamed to OUT: its mode as the umask gives it (the run's writes done),
    then its resume record dropped -- a kill between leaves the record, which tells a rerun to end them."""
    mode = usual_mode(True)
    out.chmod(mode | stat.S_IWUSR)   # the owner's write until the record is gone, which it takes
    (out / RESUME_RECORD).unlink()
    if not mode & stat.S_IWUSR:
        out.chmod(mode)


def umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(folder: bool) -> int:
    """The mode a new folder or file gets from the umask (0755 and 0644 under umask 022)."""
    return (0o777 if folder else 0o666) & ~umask()


def move_aside(out: Path) -> Path:
    """Rename `out` to a fresh hidden name beside it (an empty folder made and renamed over, never a name someone
    holds, and one a later run removes should this one be killed before it does); that name."""
    aside = Path(tempfile.mkdtemp(prefix=temporary_prefix(out, "replaced"), dir=out.parent))
    marked = False
    try:
        mark_temporary(out)   # before the rename: a run killed after it leaves a marked folder, which the next removes
        marked = True
        os.rename(out, aside)
    except BaseException:   # nothing left of the attempt: the mark goes, and the empty folder made for the rename
        if marked:
            unmark_temporary(out)
        try:
            aside.rmdir()
        except OSError:   # not empty: the rename happened after all (an interrupt right after it)
            pass
        raise
    return aside


def put_back(aside: Path, out: Path) -> None:
    """Rename `aside`, where move_aside put `out`, back, unmarked: the earlier OUT as it was, where its replacement
    could not go in. One that cannot go back stays aside, marked, as move_aside left it (the error said is the
    replacement's)."""
    with suppress(OSError):
        os.rename(aside, out)
        unmark_temporary(out)


def _record_shape(record: dict) -> tuple:
    """A resume record's format and keys (its own, its source's, its source shards' entries'): what another klconvert
    version may write otherwise (a local source's shards gained mtime_ns in 21bad3e, format 1 still)."""
    source = record["source"]
    shards = source.get("shards")
    entry_keys = sorted({key for entry in shards.values() if isinstance(entry, dict) for key in entry}) \
        if isinstance(shards, dict) else None
    return record.get("format"), sorted(record), sorted(source), entry_keys


def _other_version(stored: dict, record: dict) -> str | None:
    """'an older klconvert' (or 'a newer klconvert', by its format) where the stored record is not in this run's
    shape, of a source of the same kind (in the same folder, of the same commit or both of none: a hub commit's
    shards have no mtime_ns); 'klconvert X (this is Y)' where the records differ in that version string alone; None
    where neither."""
    before, now = stored["source"], record["source"]
    same_kind = before.get("folder") == now["folder"] and before.get("commit") == now["commit"]
    if stored.get("format") == record["format"] and (not same_kind or _record_shape(stored) == _record_shape(record)):
        version, ours = stored.get("klconvert"), record["klconvert"]
        if isinstance(version, str) and version != ours and {**stored, "klconvert": ours} == record:
            return f"klconvert {shown(version)} (this is {ours})"   # the record's: a file anyone may have edited
        return None
    newer = isinstance(stored.get("format"), int) and stored["format"] > record["format"]
    return "a newer klconvert" if newer else "an older klconvert"


def _what_differs(stored: dict, record: dict) -> str:
    """How an interrupted run's record differs from this run's, as the refusal says it."""
    before, now = stored["source"], record["source"]
    options_differ = {k: v for k, v in stored.items() if k != "source"} != {k: v for k, v in record.items()
                                                                            if k != "source"}
    if before == now:
        return "with other options"
    same_folder = before.get("folder") == now["folder"]
    source = f"of {now['folder']} as its files were then (they have changed since)" if same_folder else \
        "of another source"
    return source + (" and with other options" if options_differ else "")
