"""A path the user names, looked at before anything uses it: a folder on the way that cannot be entered (a home
folder at mode 700), or a path longer than the system takes, is said in one line naming the path and the cause --
not an OSError out of whichever is_dir() or exists() first touches it. Whether anything is there is left to the
caller: only a path that cannot be looked at is refused."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from klconvert.errors import KLError, a_type, controls_escaped, shown

SHOWN_PATH_CHARS = 100  # a path longer than this is shortened in messages (one over PATH_MAX fills a screen)


def given_path(value, what: str, other: str = "") -> Path:
    """`value`, a path the Python API was given as `what` ("out", "the model"), as a Path; KLError for anything but a
    str or PathLike (None, bytes, an int were pathlib's TypeErrors), naming what else it takes (`other`: " or 'tiny'"),
    and for "" -- an empty path, which Path() reads as the current folder, is never taken for it (the command line
    refuses one too)."""
    if not isinstance(value, (str, os.PathLike)):
        raise KLError(f"{what} {shown(value)} should be a path (a str or Path){other}, got {a_type(value)}")
    if isinstance(value, str) and value == "":
        raise KLError(f"{what} is an empty path, which is never read as the current folder; give the path (\".\" "
                      "for the current folder)")
    return Path(value)


def shown_path(path: str | Path) -> str:
    """`path` as a message shows it: whole, or its start and end around "..." when longer than SHOWN_PATH_CHARS.
    A byte of a name that is not text in the file names' encoding is written as its escape, \\xff, which the line can
    print and the user can match to the byte the refusal names (Python holds it as a lone surrogate, and its repr,
    '\\udcff', named no byte); a control character as controls_escaped writes it (\\n, \\x1b)."""
    text = str(path)
    if len(text) <= SHOWN_PATH_CHARS:
        return _escaped(text)
    return f"{_escaped(text[:60])}...{_escaped(text[-30:])}"   # shortened before escaping: no escape is cut


def _escaped(text: str) -> str:
    """`text`, a path or a part of one, with its bytes that are no text in the file names' encoding and its control
    characters written as escapes (shown_path)."""
    try:   # the bytes the system holds, each that is no text in its encoding as \\xNN
        text = os.fsencode(text).decode(sys.getfilesystemencoding(), "backslashreplace")
    except UnicodeEncodeError:   # a lone surrogate no file name's bytes give (the Python API takes any str)
        pass
    return controls_escaped(text)


def unreachable(path: str | Path) -> str | None:
    """Why `path` cannot be looked at, with what to do, or None when it can (whether or not anything is there)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):   # nothing there, or a file on the way: the caller's to say
        return None
    except OSError as e:
        return _why(path, e)
    return None


def refuse_unreachable(path: str | Path, named: str | None = None) -> None:
    """KLError when `path` cannot be looked at (unreachable), the line starting with `named` (default: the path)."""
    problem = unreachable(path)
    if problem is not None:
        raise KLError(f"{named if named is not None else shown_path(path)}: {problem}")


def _why(path: str | Path, e: OSError) -> str:
    if e.errno == errno.ENAMETOOLONG:
        return (f"the path is {len(os.fsencode(os.fspath(path))):,} bytes, longer than the system takes "
                f"({e.strerror}); give a shorter path")
    if e.errno in (errno.EACCES, errno.EPERM):
        folder = _closed_folder(Path(path))
        return (f"cannot look into {folder} ({e.strerror}); give a path you can reach, or get access to that folder "
                "(its owner can chmod a+x it)")
    return f"cannot look at it ({e.strerror}); check the path"


def _closed_folder(path: Path) -> str:
    """The folder on `path`'s way that cannot be entered: the first whose entry cannot be looked at."""
    chain = [*reversed(path.parents), path]   # "/" or "." first
    for folder, entry in zip(chain, chain[1:]):
        try:
            os.lstat(entry)
        except PermissionError:
            return f"the current folder ({os.getcwd()})" if str(folder) == "." else str(folder)
        except OSError:
            break
    return str(path.parent)
