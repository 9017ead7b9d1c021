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
