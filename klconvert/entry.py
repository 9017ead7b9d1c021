"""The `klconvert` command's entry point. Before anything else it holds any closed standard descriptor on /dev/null,
takes over SIGINT and SIGTERM, then the standard streams, so that the command ends in one line or none -- never a
traceback, nor a run that goes on.

Signals. Ctrl-C or SIGTERM (`kill`, `timeout`) at any moment ends in one line, `klconvert: interrupted`, with the status
a shell shows for a command the signal ended: 130 for SIGINT, 143 for SIGTERM -- once the command's output is whole
(note_complete), the line says so, as a rerun would be refused, the output being there. A signal the command was started
ignoring (a background job of a script) stays ignored. Python's own handler raises KeyboardInterrupt wherever the main
thread is. Inside an import that goes wrong: a library may swallow it half-imported (torch's import of numpy did, on
this machine 0.5-0.6 s into `klconvert run`, and then either failed on the next import, "cannot load module more than
once per process", or ran on as if no Ctrl-C had come). So an interrupt that lands inside an import is never raised
there. While the command has changed no file (what a library's own import makes, torch's cache folder, is not the
command's), there is nothing to clean up: the process ends at once, the import left as it is (in one line about
memory and exit status 2 where no thread starts then: that SIGINT is OpenBLAS's, which raises it where it cannot
start its threads as numpy loads, not a Ctrl-C). Once it has, a first
interrupt inside an import is held back and raised as soon as no import is running (a second is raised where it
lands: an import that hangs can still be stopped), and whatever fails after an interrupt was heard is reported as
the interrupt. One that lands inside a finalizer (tqdm's __del__), which Python prints and drops, is raised again once
out of it; one during steps that must not be parted (Uninterrupted: a folder renamed into place, then its mark
removed) as they end. A command that a second interrupt made give up on work still running in other threads
(note_left_running) ends its process at once, in its line: Python's exit would wait for those threads. Once the
command has ended, SIGINT and SIGTERM are ignored while the interpreter shuts down (torch's exit handlers, 0.4-2 s):
the process ends with the status the command decided. A tools/ script imports torch at its top, before main runs its
main (main(command)): it takes over first (take_over_early), and until its command runs an interrupt is one inside
an import.

Standard streams. A standard output that cannot be written (a full disk, closed: `>&-`) fails the command at its
first write, as StdoutFailed (the CLI says so in one line; for a reader that is gone, `| head`, it ends quietly with
141, as a command SIGPIPE killed does), and so does a character its encoding cannot write (PYTHONIOENCODING=latin-1,
a path's →: the line says how to get UTF-8; replaced, the path would be another to a script that reads it); a message
standard error cannot show (closed, a reader gone) is dropped, and the command ends as it would have. A standard
descriptor (0, 1, 2) the command was started without is held open on /dev/null first, so that no file the command
opens takes its number: what a library writes to descriptor 2 (a CUDA or Triton warning) would land in that file."""
from __future__ import annotations

import errno  # all but signal are loaded with the interpreter: no import runs before the handler but signal's
import io
import os
import signal
import sys

TYPE_CHECKING = False   # typing's own, without importing typing, which the interpreter does not load
if TYPE_CHECKING:
    from typing import Callable

RETRY_SECONDS = 0.02  # how soon an interrupt held back during an import is tried again
# the signals that interrupt the command: Ctrl-C, and SIGTERM (`kill`, `timeout`)
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_status(signum: int) -> int:
    """The exit status a shell shows for a command that signal `signum` ended: 128 + its number (SIGINT 130, SIGPIPE
    141, SIGTERM 143)."""
    return 128 + signum


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM as the handler raises it: a KeyboardInterrupt (what cleans up after Ctrl-C cleans up after
    either) that knows its signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(interrupt: BaseException | None) -> int:
    """The signal a KeyboardInterrupt stands for: an Interrupted's own, else (Python's own handler's) SIGINT."""
    return getattr(interrupt, "signum", signal.SIGINT)


def interrupt_name(signum: int) -> str:
    """Signal `signum` as a line names what the user did: "Ctrl-C" for SIGINT, its own name (SIGTERM) otherwise."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def complete_note(path: os.PathLike) -> str:
    """What the line of a command that failed after writing its output `path` whole adds: a user took the finished
    output for a failed conversion, to delete or write again (a rerun is refused: it exists)."""
    return f"{path} is complete: only its path was not printed"


def _after_ctrl_c(line: str, fresh_line: bool = False) -> str:
    """`line` as said after an interrupt: behind a line break on a terminal (it closes the terminal's ^C), but on a
    `fresh_line` (_CtrlC.fresh_line), where the break would leave a blank line."""
    return ("\n" if sys.stderr.isatty() and not fresh_line else "") + line


def _interrupted_line(complete: os.PathLike | None = None, left: str | None = None, fresh_line: bool = False) -> str:
    """The line an interrupted command ends with; `complete`: the output it had written whole before the interrupt
    came; `left`: what it leaves behind (note_left); `fresh_line`: as _after_ctrl_c's."""
    notes = [note for note in (None if complete is None else complete_note(complete), left) if note is not None]
    return _after_ctrl_c("klconvert: interrupted" + (f" ({'; '.join(notes)})" if notes else ""), fresh_line)


def exit_interrupted(signum: int) -> None:
    """End the command after signal `signum`: _interrupted_line on stderr (saying that the command's output is whole
    where note_complete said so and it is still there, and what it leaves where note_left did), exit status
    signal_status(signum), 130 still -- the user did interrupt it. Never returns."""
    ctrl_c = Uninterrupted.ctrl_c
    complete, left, fresh_line = (None, None, False) if ctrl_c is None else (ctrl_c.complete, ctrl_c.left,
                                                                             ctrl_c.fresh_line)
    # one gone is none: a tool's quantize into its own temporary folder (quality_table's), removed as the interrupt
    # unwound, was said to be complete
    line = _interrupted_line(complete if complete is not None and os.path.lexists(complete) else None, left,
                             fresh_line)
    if ctrl_c is not None and ctrl_c.left_running:
        # Python's exit would wait for the threads left running (concurrent.futures joins its pools' workers, a
        # hash read hung on a dead network file system among them) -- for ever: the process ends here instead
        _end_now(signum, line)
    print(line, file=sys.stderr)
    sys.exit(signal_status(signum))


def note_complete(path: os.PathLike) -> None:
    """Say that the command has written its output, `path`, whole: an interrupt from now on ends in a line that says
    so. Called inside the Uninterrupted block that puts the output in place, so that the interrupt it held back is
    one of those. Outside the entry point, nothing."""
    if Uninterrupted.ctrl_c is not None:
        Uninterrupted.ctrl_c.complete = path


def note_left(what: str) -> None:
    """Say what an interrupt stopped the command in the middle of leaves behind, and how it goes: the line the
    command ends in adds `what`. Outside the entry point, nothing."""
    if Uninterrupted.ctrl_c is not None:
        Uninterrupted.ctrl_c.left = what


def note_left_running(what: str) -> None:
    """Say that the command gives up waiting for work in other threads that a second interrupt found still running
    (run_waking_for_signals): the line it ends in adds `what` that work leaves behind, and the process ends at once,
    those threads unwaited for (exit_interrupted). Outside the entry point, nothing."""
    if Uninterrupted.ctrl_c is not None:
        Uninterrupted.ctrl_c.left = what
        Uninterrupted.ctrl_c.left_running = True


def say_while_interrupted(line: str) -> None:
    """Say `line` on stderr now, while the command stops after an interrupt (what it waits for, what a second would
    do), as an Uninterrupted block's notice is said: behind a line break that closes a terminal's ^C, and the line it
    ends in then without one, unless another Ctrl-C came after it."""
    _say_notice(Uninterrupted.ctrl_c, line)


def _say_notice(ctrl_c: _CtrlC | None, line: str) -> None:
    """say_while_interrupted's `line`, under the entry point's `ctrl_c` (None: outside it)."""
    _say_now(_after_ctrl_c(line, ctrl_c is not None and ctrl_c.fresh_line))
    if ctrl_c is not None:
        ctrl_c.fresh_line = True


def _say_now(line: str) -> None:
    """Write `line` on standard error's descriptor at once, from a signal handler too: the command's stream may be
    in the middle of a write (a progress bar's), which a second write into its buffer would break."""
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (AttributeError, OSError):  # no standard error (closed), or one that cannot take it
        pass


def _end_now(signum: int, line: str | None = None, status: int | None = None) -> None:
    """End the process inside whatever it is doing (an import): no exception, no clean-up, no exit handlers -- what
    the standard streams hold written first -- in _interrupted_line and signal_status(signum), or in `line` and
    `status`."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:   # closed, full, a reader gone: what it held is lost, as it would be anyway
            pass
    _say_now(_interrupted_line() if line is None else line)
    os._exit(signal_status(signum) if status is None else status)


def _end_if_no_thread_starts(signum: int) -> None:
    """End the process now in one line about memory, exit status 2, where a SIGINT came inside an import and the
    process cannot start a thread: a library's, not a Ctrl-C -- OpenBLAS raises it where it could not start one of
    its threads as numpy's import loads it (host_memory.thread_refused); nothing otherwise."""
    if signum != signal.SIGINT or not _openblas_starts_threads():   # then the SIGINT is not its: a Ctrl-C
        return
    try:
        from klconvert.runtime.host_memory import thread_refused

        refused = thread_refused()
    except Exception:   # out of memory to import or word it: said as the interrupt, as before
        return
    if refused is not None:
        _end_now(signum, f"klconvert: error: {refused}", refused.exit_code)


# The variables OpenBLAS takes its thread count from, first to last, the first above 0 being the count (else the
# CPUs): openblas_read_env keeps OPENBLAS_NUM_THREADS, else OPENBLAS_DEFAULT_NUM_THREADS, as one number, which
# blas_get_cpu_number takes before GOTO_NUM_THREADS, then OMP_NUM_THREADS (OpenBLAS's driver/others/openblas_env.c,
# memory.c).
OPENBLAS_THREAD_COUNT_VARIABLES = ("OPENBLAS_NUM_THREADS", "OPENBLAS_DEFAULT_NUM_THREADS", "GOTO_NUM_THREADS",
                                   "OMP_NUM_THREADS")
LONG_MIN, LONG_MAX = -(1 << 63), (1 << 63) - 1   # a C long's bounds on 64-bit Linux and macOS (LP64)


def _openblas_starts_threads() -> bool:
    """Whether OpenBLAS starts threads as it loads: its count, read as its openblas_read_env and blas_get_cpu_number
    do (OPENBLAS_THREAD_COUNT_VARIABLES, each as C's atoi, the first above 0; else the CPUs), and capped as
    blas_get_cpu_number does at the CPUs the process may run on, past 1. A Ctrl-C under such limits with
    OPENBLAS_NUM_THREADS=1 set was said as OpenBLAS's (h291), under `taskset -c 0`, where it starts none whatever the
    variables say (h292), and under OPENBLAS_DEFAULT_NUM_THREADS=1, which this did not read (h295)."""
    cpus = cpus_to_run_on()
    for name in OPENBLAS_THREAD_COUNT_VARIABLES:
        if (count := _c_atoi(os.environ.get(name, ""))) > 0:
            return min(count, cpus) > 1
    return cpus > 1


def _c_atoi(text: str) -> int:
    """`text` read as glibc's atoi reads it, (int) strtol(text, NULL, 10), which OpenBLAS reads its variables with:
    C's blanks, a sign and the digits that lead, saturated at a long's bounds and cut to an int's low 32 bits --
    4294967297 is 1, 99999999999999999999 (LONG_MAX) is -1, -4294967295 is 1; 0 where no digit leads."""
    number = text.lstrip(" \t\n\v\f\r")
    sign = -1 if number.startswith("-") else 1
    number = number[1:] if number[:1] in ("-", "+") else number
    digits = number[:len(number) - len(number.lstrip("0123456789"))].lstrip("0")
    # 20 digits are past a long's bounds already, and int() refuses thousands of them
    value = min(max(sign * int(digits[:20] or "0"), LONG_MIN), LONG_MAX)
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def cpus_to_run_on() -> int:
    """The CPUs the process may run on: its affinity's (taskset, a cpuset, a batch scheduler's pinning), as Linux's
    sched_getaffinity gives them, else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # no affinity to ask (macOS, Windows)
        return os.cpu_count() or 1


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


# the audit event note_change raises: a file change no Python call makes, so Python raises no event of its own
FILE_CHANGE_EVENT = "klconvert.file_change"
# the audit events (Python's "audit events table", and note_change's) that make, change or remove a file: once the
# command (not an import) has raised one, there may be something to undo after an interrupt; and an "open" event's
# flags that do
FILE_CHANGES = frozenset({"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.link", "os.symlink",
                          FILE_CHANGE_EVENT})
FILE_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def note_change(path) -> None:
    """Say, before it starts, that the command changes `path` through code the audit hook cannot see: C or Rust
    that opens and writes the file itself (safetensors' save_file)."""
    sys.audit(FILE_CHANGE_EVENT, os.fspath(path))


class _CtrlC:
    """SIGINT's and SIGTERM's handler, SIGALRM's while an interrupt is held back, and the audit hook that tells
    whether the command has changed a file."""

    def __init__(self) -> None:
        self.heard = self.held = self.changed = self.ended = False
        self.loading = False   # taken over early: the script's own imports run, its command not yet (take_over_early)
        self.before: dict = {}   # each signal's handler before ours (install)
        self.signum = signal.SIGINT
        self.uninterrupted = 0   # how many Uninterrupted blocks are running
        self.complete: os.PathLike | None = None   # the command's output, once it is whole (note_complete)
        self.left: str | None = None   # what an interrupt leaves behind, and how it goes (note_left)
        self.left_running = False   # work in other threads given up on, still running (note_left_running)
        # what the Uninterrupted block running says as soon as an interrupt is held back in it, until said (its notice)
        self.notice: Callable[[str], str] | None = None
        # whether stderr's terminal is at the start of a line: a notice ended the last, and no Ctrl-C (whose ^C the
        # terminal echoes) came since
        self.fresh_line = False

    def interrupt(self, signum, frame) -> None:
        if self.ended:   # the command has ended (main's last steps): as after uninstall, ignored
            return
        if signum == signal.SIGINT:
            self.fresh_line = False
        if self.held or not (self.loading or _importing(frame) or self.uninterrupted):
            self._raise(signum)
        if not self.changed:
            _end_if_no_thread_starts(signum)
            _end_now(signum)
        self.heard = self.held = True
        self.signum = signum
        signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)   # ask again soon: on_alarm
        self.say_notice()

    def say_notice(self) -> None:
        """Say the running Uninterrupted block's notice, once, as an interrupt is held back in it, naming what was
        received (interrupt_name)."""
        if self.notice is not None:
            notice, self.notice = self.notice, None
            _say_notice(self, notice(interrupt_name(self.signum)))

    def on_alarm(self, signum, frame) -> None:
        if not self.held:  # no interrupt of ours is waiting: not a Ctrl-C
            return
        if self.loading or _importing(frame) or self.uninterrupted:
            signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
            return
        self._raise(self.signum)

    def settle(self) -> None:
        """The command ends now, on the interrupt it heard: no retry left to raise it again while the line is
        written."""
        self.held = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def _raise(self, signum: int) -> None:
        self.heard, self.held, self.signum = True, False, signum
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise Interrupted(signum)

    def audit(self, event: str, args: tuple) -> None:
        """The first file the command (in any thread) makes, writes, moves or removes, but inside an import."""
        opens_to_write = event == "open" and len(args) > 2 and isinstance(args[2], int) and args[2] & FILE_WRITES
        if self.changed or not (event in FILE_CHANGES or opens_to_write):
            return
        if not _importing(sys._getframe()):
            self.changed = True

    def unraisable(self, unraisable) -> None:
        """sys.unraisablehook's: an interrupt raised inside a finalizer (a __del__, a weakref's callback: tqdm's), which
        Python prints and drops, so the command ran on to its end and exit status 0, is held back and raised again
        once out of it; anything else goes to the hook before."""
        if not isinstance(unraisable.exc_value, Interrupted):
            self.before_unraisable(unraisable)
            return
        self.held = True
        signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)

    def install(self) -> bool:
        """Take over SIGINT and SIGTERM (a run stopped either way cleans up as after Ctrl-C), each unless it is
        ignored, SIGALRM for the retries, and the hook that hears an interrupt a finalizer dropped; whether it took
        either signal."""
        self.before = {sig: signal.signal(sig, self.interrupt) for sig in INTERRUPT_SIGNALS
                       if signal.getsignal(sig) is not signal.SIG_IGN}
        if self.before:
            self.before[signal.SIGALRM] = signal.signal(signal.SIGALRM, self.on_alarm)
            self.before_unraisable, sys.unraisablehook = sys.unraisablehook, self.unraisable
            sys.addaudithook(self.audit)
            Uninterrupted.ctrl_c = self
        return bool(self.before)

    def uninstall(self) -> None:
        """The command has ended: SIGINT and SIGTERM are ignored from now on, so that the process ends with the status
        the command decided. While the interpreter shuts down (0.4-2 s with torch's exit handlers) Python's own
        handler gave a traceback and the default one a status of 130 or 143 with no line, for a command whose work
        was done; and a handler of ours would not last -- Python puts the default back for every signal it handles
        before it tears the modules down, and leaves only an ignored one as it is. No retry left pending past the
        command (it would end the process as SIGALRM's, "Alarm clock"); the audit hook, which Python cannot remove,
        returns at once from now on."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self.before.items():
            signal.signal(sig, handler if sig == signal.SIGALRM else signal.SIG_IGN)
        sys.unraisablehook = self.before_unraisable
        self.changed = True
        Uninterrupted.ctrl_c = None


class Uninterrupted:
    """`with Uninterrupted():` around steps that Ctrl-C or SIGTERM must not part (a folder renamed into place, then its
    temporary mark removed: an interrupt between them left the mark in OUT, which then no run would replace): one
    that comes meanwhile is held back and raised as they end -- a second, where it lands. `notice`: the line said on
    stderr as soon as one is held back in the block (or as it starts, one held already), given what was received
    ("Ctrl-C" or "SIGTERM": interrupt_name), for steps that may take a while (98 GB deleted): what the command is
    waiting for, and what a second interrupt would leave -- silence invited that second. Outside the entry point
    (the Python API, a test in the same process) nothing is held."""

    ctrl_c: _CtrlC | None = None   # the entry point's, while it is installed

    def __init__(self, notice: Callable[[str], str] | None = None):
        self.notice = notice

    def __enter__(self) -> None:
        self.ctrl_c = Uninterrupted.ctrl_c
        if self.ctrl_c is None:
            return
        self.ctrl_c.uninterrupted += 1
        if self.notice is not None:   # an outer block's, unsaid, is the one to say again once this one ends
            self.outer_notice, self.ctrl_c.notice = self.ctrl_c.notice, self.notice
            if self.ctrl_c.held:
                self.ctrl_c.say_notice()

    def __exit__(self, kind, error, traceback) -> None:
        if self.ctrl_c is None:
            return
        self.ctrl_c.uninterrupted -= 1
        if self.notice is not None:
            self.ctrl_c.notice = self.outer_notice
        if kind is None and self.ctrl_c.held and not self.ctrl_c.uninterrupted and not _importing(sys._getframe()):
            self.ctrl_c._raise(self.ctrl_c.signum)   # else the retry raises it once out of the import, or the failure


class StdoutFailed(Exception):
    """A write to standard output failed; its message is what went wrong and what to do, as the CLI's line says it.
    `errno`: its OSError's (EBADF for a closed one), None for a character the encoding cannot write. Not an OSError,
    which click takes for its own: one of a reader that is gone (EPIPE) it answered with status 1, unsaid.
    `complete`: the output the command had written whole before, whose path it was printing (the CLI's line says so:
    a user took the failed command's OUT for a failed conversion)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.complete: os.PathLike | None = None


def _unencodable(encoding: str, character: str) -> str:
    """What a StdoutFailed says of a `character` that standard output's `encoding` cannot write: how to get UTF-8
    (PYTHONIOENCODING wins over the locale, so the locale is offered only where it is unset)."""
    locale = "" if "PYTHONIOENCODING" in os.environ else " or run under a UTF-8 locale, e.g. LC_ALL=C.UTF-8"
    return (f"standard output's encoding, {encoding}, has no U+{ord(character):04X}, which the command printed; set "
            f"PYTHONIOENCODING=utf-8{locale}")


class _StandardFile(io.RawIOBase):
    """Standard output's or error's file descriptor (None: closed) under the command's sys.stdout or sys.stderr. Once
    a write fails, every later byte is dropped, so that nothing fails twice (as Python flushes the stream at exit);
    standard output's first failure is raised as StdoutFailed, standard error's is not."""

    def __init__(self, fd: int | None, raises: bool):
        super().__init__()
        self.fd, self.raises, self.failed = fd, raises, False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return super().fileno() if self.fd is None else self.fd

    def isatty(self) -> bool:
        return self.fd is not None and os.isatty(self.fd)

    def write(self, data) -> int:
        if not self.failed:
            try:
                if self.fd is None:
                    raise OSError(errno.EBADF, "it is closed")
                view, done = memoryview(data), 0
                while done < len(view):   # unbuffered (python -u), nothing else retries a short write
                    try:
                        done += os.write(self.fd, view[done:])
                    except BlockingIOError:   # a descriptor left non-blocking (O_NONBLOCK: a parent's pipe) is
                        import select         # full: wait for its reader, as a blocking one would

                        select.select([], [self.fd], [])
                return done
            except OSError as e:
                self.failed = True
                if self.raises:
                    raise StdoutFailed(f"cannot write standard output ({e.strerror}); redirect it somewhere that can "
                                       "take it", e.errno) from None
        return len(data)


class _StandardOutput(io.TextIOWrapper):
    """Standard output's text: a character its encoding cannot write (PYTHONIOENCODING=latin-1, a path's →), where
    its errors are strict, fails the command as StdoutFailed, in one line -- Python's UnicodeEncodeError was a
    traceback. Not replaced unsaid: a script that reads a printed path would take another path. (`run`, whose text
    people read, sets its errors to replace.)"""

    def write(self, text: str) -> int:
        try:
            return super().write(text)
        except UnicodeEncodeError as e:
            raise StdoutFailed(_unencodable(self.encoding, e.object[e.start])) from None


def _standard(stream, raises: bool):
    """`stream` (sys.stdout or sys.stderr; None where it was closed) written through a _StandardFile, as it was
    encoded and buffered; one with no file descriptor (a test's capture) as it is."""
    if stream is None:
        return io.TextIOWrapper(io.BufferedWriter(_StandardFile(None, raises)), encoding="utf-8",
                                errors="backslashreplace")
    try:
        fd = stream.fileno()
    except OSError:
        return stream
    stream.flush()
    raw = _StandardFile(fd, raises)   # unbuffered where Python's stream is (python -u, PYTHONUNBUFFERED): no 8 KiB held
    buffered = raw if isinstance(getattr(stream, "buffer", None), io.RawIOBase) else io.BufferedWriter(raw)
    return (_StandardOutput if raises else io.TextIOWrapper)(buffered, encoding=stream.encoding,
                                                             errors=stream.errors, line_buffering=stream.line_buffering,
                                                             write_through=stream.write_through)


def _hold_standard_descriptors() -> None:
    """Each of descriptors 0, 1 and 2 the command was started without, opened on /dev/null: a file opened later
    would take its number (the lowest free), and C code writing to it (a library's warning on 2, a compiler the
    command starts) would write into that file. Python left sys.stdin, sys.stdout or sys.stderr None for it all the
    same, so the command's streams still treat it as closed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:   # closed: those below it are open, so /dev/null gets this number
            os.set_inheritable(os.open(os.devnull, os.O_RDWR), True)   # as a standard descriptor is: a child's too


# the handler a script took over with before its own imports (take_over_early), which main then runs its command under
_early: _CtrlC | None = None


def take_over_early() -> None:
    """Take over SIGINT and SIGTERM now, for a script whose own imports come before main(command) runs its command (a
    tools/ script's: torch's import, a second or more, gave a Ctrl-C there Python's own KeyboardInterrupt traceback).
    Until main runs the command the script is loading: an interrupt anywhere in it is taken as one inside an import,
    which ends a script that has changed no file at once, in the command's one line."""
    global _early
    if _early is None:
        _hold_standard_descriptors()   # before the audit hook, as main does
        _early = _CtrlC()
        _early.loading = _early.install()


def main(command: Callable[[], None] | None = None) -> None:
    """The `klconvert` command, or `command` in its place (a tools/ script's main: its Ctrl-C and SIGTERM end as the
    command's do, in one line and 130 or 143, never a traceback, nor a SIGTERM that leaves its temporaries), under
    the handler take_over_early installed where it did."""
    _hold_standard_descriptors()   # before the audit hook: opening /dev/null changes no file of the user's
    ctrl_c = _early if _early is not None else _CtrlC()
    installed = bool(ctrl_c.before) or ctrl_c.install()
    ctrl_c.loading = False
    streams = sys.stdout, sys.stderr
    try:
        sys.stdout, sys.stderr = _standard(sys.stdout, raises=True), _standard(sys.stderr, raises=False)
        _run(ctrl_c, command)
    except KeyboardInterrupt as e:   # one that landed as the command ended, past _run's own handling: as any other
        ctrl_c.settle()
        exit_interrupted(signal_of(e))
    finally:
        ctrl_c.ended = True   # first, and no call before it: from here an interrupt is ignored (the handler's check)
        if installed:
            ctrl_c.uninstall()
        try:  # what is left in the command's stdout: a failure now is dropped (the command has ended otherwise)
            sys.stdout.flush()
        except StdoutFailed:
            pass
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def _run(ctrl_c: _CtrlC, command: Callable[[], None] | None) -> None:
    try:
        if command is None:
            from klconvert.cli import main as command

        command()
    except SystemExit as e:
        if not (ctrl_c.held and e.code in (None, 0)):   # held, and the command would end as if it never came
            raise
    except BaseException:
        if not ctrl_c.heard:
            raise
    else:
        if not ctrl_c.held:
            return
    # an interrupt held back through the command's last import or dropped by a finalizer, which the command ran on
    # past to its end, is still the answer; whatever broke after an interrupt was heard broke because of it
    ctrl_c.settle()
    exit_interrupted(ctrl_c.signum)

