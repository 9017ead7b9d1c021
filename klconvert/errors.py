"""The one exception type for errors a user can cause: printed as one line, exit status 2."""


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

