"""The one exception type for errors a user can cause: printed as one line, exit status 2."""
import errno

try:
    import resource   # imported now: out of file descriptors, an import that opens a file would fail too
except ImportError:  # not a POSIX system: no process limits to read
    resource = None


class KLError(Exception):
    """An expected error: bad input, a missing file, a request the plan cannot hold.

    The message says what was wrong, where, and what to do; the CLI prints it on one line
    with no traceback and exits with `exit_code`.
    """

    exit_code = 2


class ValuesRefused(KLError):
    """A refusal of the values a checkpoint holds (a NaN or an infinity, a weight past what its quantized form can
    hold): a rerun over the same files meets them again, so quantize keeps no finished shards for one."""


class PlanDoesNotFit(KLError):
    """The memory plan asked for needs more than the given GPU memory: an answer, not bad input (exit status 3)."""

    exit_code = 3


def either(choices, flag: str | None = None) -> str:
    """`choices` as a message offers them: "4 or 8", or as the command line's `flag` takes them, "--bits 4 or --bits
    8"."""
    return " or ".join(str(c) if flag is None else f"{flag} {c}" for c in choices)


def flag_value(flag: str, n: int) -> str:
    """A flag with a number, as a message echoes what the user gave or says what to give: as the command line takes
    it, "--max-context 2000000", in plain digits. Flags take only the digits 0-9, and bench's --context and --batch
    take comma lists, where "--context 131,072" would be two contexts; a count said in prose is written with
    thousands separators (units.counted, f"{n:,}")."""
    return f"{flag} {n}"


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


def controls_escaped(text: str) -> str:
    """`text` with each character a terminal or a markdown page would act on (a newline, ESC, BEL, NUL, an unpaired
    surrogate) written as its escape (`\\n`, `\\x1b`): a name from the disk or the download shown in a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# The letters whose names start with a vowel sound: the first of a name said letter by letter ("an HTTPError")
_VOWEL_SOUNDING_LETTERS = "aefhilmnorsx"
# Starts of names whose u is said "you", a consonant sound ("a uint8", "a UserDict")
_U_SAID_YOU = ("uint", "uni", "usa", "use", "usi", "uuid", "utf")


def a_type(value) -> str:
    """`value`'s type as a message names what it got, its article by the name's sound: "an int", "a str", "an
    ndarray" (n said "en"), "a uint8" (u said "you")."""
    name = type(value).__name__
    lower = name.lower()
    if lower.startswith(_U_SAID_YOU):
        return f"a {name}"
    # said letter by letter: an initialism ("OSError", "HTTPError"), or numpy's "nd" (n-dimensional), no syllable
    if name[:2].isupper() or lower.startswith("nd"):
        return f"{'an' if lower[:1] in _VOWEL_SOUNDING_LETTERS else 'a'} {name}"
    return f"{'an' if lower[:1] in 'aeiou' else 'a'} {name}"


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
    """Why a file or a JSON answer could not be read, in a few words: an OSError's reason as the system words it (its
    text says "[Errno 22]" and the path again, which the line names already); "nested too deeply" for JSON nested past
    Python's stack (a RecursionError's text speaks only of the recursion); else first_line; cut at `limit`."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:limit]
    return "nested too deeply" if isinstance(error, RecursionError) else first_line(error)[:limit]


def not_utf8(where: object, offset: int) -> str:
    """The start of the line for a file `where` that is not UTF-8 text, its first bad byte at `offset`."""
    return f"{where}: not UTF-8 text (bad byte at offset {offset})"


def is_permission_error(error: BaseException) -> bool:
    """Whether an OSError is the system's refusal to let this user at a file (EACCES, EPERM): said as that, with the
    permissions to fix -- not as a file that is damaged or missing."""
    return isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM)


def read_failure(error: OSError, where: object, otherwise: str) -> str:
    """The line for a file `where` that could not be read: for a permission problem, to fix the permissions; else
    the system's reason and `otherwise`, what to do; out of file descriptors, descriptors_exhausted's line."""
    exhausted = descriptors_exhausted(error, where)
    if exhausted is not None:
        return str(exhausted)
    if is_permission_error(error):
        return (f"{where}: cannot read it ({error.strerror}); make it readable for you (chmod u+r, or ask its owner) "
                "and rerun")
    return f"{where}: cannot read it ({error.strerror or first_line(error)}); {otherwise}"


def refuse_if_not_permitted(error: BaseException, where: object) -> None:
    """KLError saying to fix the permissions when `error` (reading `where`) is a permission problem, or to raise the
    limit when it is out of file descriptors -- never the damaged or missing file a reader's own line would call it;
    nothing otherwise."""
    refuse_out_of_descriptors(error, where)
    if is_permission_error(error):
        raise KLError(read_failure(error, where, "")) from None


# the system's words for out of file descriptors, for a library's error that carries no errno (safetensors': "unable to
# open file <...> in read-only mode: Too many open files (24)"); the whole system's first, as they hold the process's
_DESCRIPTORS_SAID = ((errno.ENFILE, "Too many open files in system"), (errno.EMFILE, "Too many open files"))
DESCRIPTORS_SUGGESTED = 1024   # the ulimit -n a refusal suggests, at the least


def descriptors_exhausted(error: BaseException | None, where: object = None) -> KLError | None:
    """A KLError saying the process (EMFILE: its limit, ulimit -n) or the system (ENFILE) has no file descriptor
    left, when `error` is that refusal (out_of_descriptors); None otherwise. Said of `where` when given: never as a
    file missing or damaged, as a reader's own line would."""
    said = out_of_descriptors(error)
    return None if said is None else KLError(f"{'' if where is None else f'{where}: '}{said} and rerun")


def descriptors_exhausted_behind(error: BaseException) -> KLError | None:
    """descriptors_exhausted's KLError when running out of file descriptors is what `error` was raised while handling
    (its __cause__ or __context__, however deep: `raise ... from None` keeps the context), said of the file the
    refused open named; None when `error` says so itself or nothing behind it ran out. A line of its own that blames
    the file ("cannot read it (Too many open files); check the path") gives way to it."""
    seen = {id(error)}
    behind = error.__cause__ or error.__context__
    while behind is not None and id(behind) not in seen:
        said = out_of_descriptors(behind)
        if said is not None:
            return None if said in str(error) else descriptors_exhausted(behind, getattr(behind, "filename", None))
        seen.add(id(behind))
        behind = behind.__cause__ or behind.__context__
    return None


def refuse_out_of_descriptors(error: BaseException | None, where: object = None) -> None:
    """descriptors_exhausted's KLError raised, where `error` is out of file descriptors; nothing otherwise."""
    exhausted = descriptors_exhausted(error, where)
    if exhausted is not None:
        raise exhausted from None


def out_of_descriptors(error: BaseException | None) -> str | None:
    """What bounds the file descriptors and how to raise it, for the caller to end (" and rerun"), when `error` is
    the system's refusal of one more -- an OSError of EMFILE or ENFILE, or another error in the system's words; None
    otherwise."""
    if isinstance(error, OSError) and error.errno is not None:
        number = error.errno if error.errno in (errno.EMFILE, errno.ENFILE) else None
    else:
        number = next((n for n, said in _DESCRIPTORS_SAID if error is not None and said in str(error)), None)
    if number is None:
        return None
    if number == errno.ENFILE:
        return ("the system is out of file descriptors (its limit for all processes together, fs.file-max); close "
                "other programs, or raise it (sysctl fs.file-max)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE) if resource is not None else (None, None)
    if soft is None or soft == resource.RLIM_INFINITY:
        return ("out of file descriptors: the process may open no more files at once; raise its limit (e.g. "
                f"ulimit -n {DESCRIPTORS_SUGGESTED})")
    suggested = max(DESCRIPTORS_SUGGESTED, 2 * soft)
    raise_it = (f"e.g. ulimit -n {suggested}" if hard == resource.RLIM_INFINITY or hard >= suggested else
                f"e.g. ulimit -n {hard}, its hard limit" if hard > soft else
                f"e.g. ulimit -n {suggested}: its hard limit, ulimit -Hn, is {hard} too, which only root may raise")
    return (f"out of file descriptors: the process may open {soft:,} files at once (ulimit -n {soft}); raise the "
            f"limit ({raise_it})")
