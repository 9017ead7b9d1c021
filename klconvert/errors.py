"""The one exception type for errors a user can cause: printed as one line, exit status 2; and the one line an
interrupted command ends with."""
import sys
from typing import NoReturn

INTERRUPTED_EXIT = 130  # a shell's status for a command ended by SIGINT (128 + 2)


class KLError(Exception):
    """An expected error: bad input, a missing file, a request the plan cannot hold.

    The message says what was wrong, where, and what to do; the CLI prints it on one line
    with no traceback and exits with `exit_code`.
    """

    exit_code = 2


class PlanDoesNotFit(KLError):
    """The memory plan asked for needs more than the given GPU memory: an answer, not bad input (exit status 3)."""

    exit_code = 3


def first_line(error: BaseException) -> str:
    """An error's first non-blank line (its type's name when it has none): what a one-line message quotes of it."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def unreadable_reason(error: BaseException, limit: int = 200) -> str:
    """Why a file or a JSON answer could not be read, in a few words: "nested too deeply" for JSON nested past
    Python's stack (a RecursionError's text speaks only of the recursion), else first_line, cut at `limit`."""
    return "nested too deeply" if isinstance(error, RecursionError) else first_line(error)[:limit]


def exit_interrupted() -> NoReturn:
    """End the command after Ctrl-C: one line on stderr (after a line break that closes a terminal's ^C echo),
    exit status INTERRUPTED_EXIT."""
    print("\nklconvert: interrupted" if sys.stderr.isatty() else "klconvert: interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT)
