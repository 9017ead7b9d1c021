"""The one exception type for errors a user can cause: printed as one line, exit status 2."""
import errno


class KLError(Exception):
    """An expected error: bad input, a missing file, a request the plan cannot hold.

    The message says what was wrong, where, and what to do; the CLI prints it on one line
    with no traceback and exits with `exit_code`.
    """

    exit_code = 2


class PlanDoesNotFit(KLError):
    """The memory plan asked for needs more than the given GPU memory: an answer, not bad input (exit status 3)."""

    exit_code = 3


def either(choices, flag: str | None = None) -> str:
    """`choices` as a message offers them: "4 or 8", or as the command line's `flag` takes them, "--bits 4 or --bits
    8"."""
    return " or ".join(str(c) if flag is None else f"{flag} {c}" for c in choices)


_UNSAID = object()
_SHOWN_CHARS = 80   # of a value's repr in a message
MAX_LISTED = 8      # values a message lists before it says how many more
ERROR_CHARS = 300   # of what a parser or a template raises (its start), or a renderer said (its end), in a message
_LOG10_2 = 0.30102999566398120


def shown(value) -> str:
    """A value the caller gave, as a message shows it: its repr, cut to _SHOWN_CHARS; an integer of more digits than
    that by its length and sign (Python refuses to print one of over 4,300 digits: the refusal raised ValueError)."""
    if isinstance(value, int):
        n = abs(value)
        digits = max(1, int(n.bit_length() * _LOG10_2))
        digits += n >= 10 ** digits   # exact: bit_length's estimate is the count or one short
        if digits > _SHOWN_CHARS:
            return f"{'a negative' if value < 0 else 'an'} integer of {digits:,} digits"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


def few(values) -> str:
    """Sorted values for a one-line message, each as `shown`: the first MAX_LISTED, then how many more."""
    values = sorted(values)
    more = f", ... {len(values) - MAX_LISTED} more" if len(values) > MAX_LISTED else ""
    return "[" + ", ".join(map(shown, values[:MAX_LISTED])) + more + "]"


def argument(name: str, flag: str, value=_UNSAID) -> str:
    """An argument as a message names it to both kinds of caller: as the Python API's `name` (with the `value` given,
    when there is one, as `shown`) and as the command line's `flag` that sets it -- "max_context=0 (--max-context)",
    "batch (--batch)"."""
    return f"{name if value is _UNSAID else f'{name}={shown(value)}'} ({flag})"


def refuse_non_bool(value, name: str, flag: str | None = None) -> None:
    """KLError unless `value`, the Python API's `name` (the command line's `flag`, where it has one), is a bool: the
    truth of "no", 1 or None is no answer -- force="no" would replace a folder."""
    if type(value) is not bool:
        said = argument(name, flag, value) if flag is not None else f"{name}={value!r}"
        raise KLError(f"{said} is not a bool; pass True or False")


def first_line(error: BaseException) -> str:
    """An error's first non-blank line (its type's name when it has none): what a one-line message quotes of it."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def unreadable_reason(error: BaseException, limit: int = 200) -> str:
    """Why a file or a JSON answer could not be read, in a few words: "nested too deeply" for JSON nested past
    Python's stack (a RecursionError's text speaks only of the recursion), else first_line, cut at `limit`."""
    return "nested too deeply" if isinstance(error, RecursionError) else first_line(error)[:limit]


def is_permission_error(error: BaseException) -> bool:
    """Whether an OSError is the system's refusal to let this user at a file (EACCES, EPERM): said as that, with the
    permissions to fix -- not as a file that is damaged or missing."""
    return isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM)


def read_failure(error: OSError, where: object, otherwise: str) -> str:
    """The line for a file `where` that could not be read: for a permission problem, to fix the permissions; else
    the system's reason and `otherwise`, what to do."""
    if is_permission_error(error):
        return (f"{where}: cannot read it ({error.strerror}); make it readable for you (chmod u+r, or ask its owner) "
                "and rerun")
    return f"{where}: cannot read it ({error.strerror or first_line(error)}); {otherwise}"


def refuse_if_not_permitted(error: BaseException, where: object) -> None:
    """KLError saying to fix the permissions when `error` (reading `where`) is a permission problem -- never the
    damaged or missing file a reader's own line would call it; nothing otherwise."""
    if is_permission_error(error):
        raise KLError(read_failure(error, where, "")) from None
