"""A Ctrl-C (or SIGTERM) that stops onnxruntime mid-run. Python runs a signal's handler in the main thread between
bytecodes, so while that thread sits in session.run the handler waits for the run to end -- a damaged graph's Loop of
2**62 trips never ended, and Ctrl-C did nothing. Python's C-level handler still writes the signal's number to the
wakeup fd at once; a thread reading it sets the run's RunOptions.terminate, which onnxruntime checks between nodes and
a Loop's trips. session.run itself stays in the main thread (run on a worker thread and stopped so, onnxruntime
aborted the process at exit).

The program's own signal handling is left as it was: every signal number read goes on to the wakeup fd set before the
run (asyncio's: its add_signal_handler saw no signal that came during a run), and only a signal whose handler is one
that ends the program (stopping) terminates the run -- one the program handles itself (a SIGTERM that asks for a
graceful shutdown) lets the run finish, its handler running after it as it would anyway."""
from __future__ import annotations

import functools
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import onnxruntime as ort

from klconvert.entry import Uninterrupted

STOPPING = (signal.SIGINT, signal.SIGTERM)   # the signals the command line ends on (klconvert/entry.py)


def stopping(signum: int) -> bool:
    """Whether signal `signum` (SIGINT or SIGTERM) now ends the program as Ctrl-C does: its handler is Python's own
    (KeyboardInterrupt, or the default action), asyncio.run's (which cancels the program's main task), or klconvert's
    command line's (entry.py). A handler of the program's own decides for itself once the run is over."""
    handler = signal.getsignal(signum)
    if handler in (signal.default_int_handler, signal.SIG_DFL):
        return True
    if isinstance(handler, functools.partial):   # asyncio.run's: its Runner's _on_sigint, given the main task
        handler = handler.func
    owner, function = getattr(handler, "__self__", None), getattr(handler, "__func__", None)
    # asyncio, loaded only where the program uses it; Runner is Python 3.11's
    on_sigint = getattr(getattr(sys.modules.get("asyncio.runners"), "Runner", None), "_on_sigint", None)
    return (owner is not None and owner is Uninterrupted.ctrl_c   # the entry point's, while it is installed
            or function is not None and function is on_sigint)


class _SignalWatch:
    """The process's one wakeup pipe and the thread that reads it: a stopping signal's number sets `terminate` on the
    RunOptions of the run in progress, if any, and is kept in `heard`; every number read is written on to `forward`,
    the wakeup fd set before the run. The pipe is read only under `lock`, so that none read is ever left unforwarded
    as the run ends (`take`)."""

    def __init__(self):
        self.read, self.write = os.pipe()
        for fd in (self.read, self.write):
            os.set_blocking(fd, False)   # set_wakeup_fd's rule: the C handler must never block; take's: never wait
        self.lock = threading.Lock()
        self.running: ort.RunOptions | None = None
        self.forward: int | None = None
        self.heard: int | None = None
        threading.Thread(target=self._watch, name="onnxruntime-signals", daemon=True).start()

    def _watch(self) -> None:
        while True:
            select.select([self.read], [], [])
            with self.lock:
                self.take()

    def take(self) -> None:
        """Under `lock`: act on every signal number the pipe holds."""
        while True:
            try:
                signums = os.read(self.read, 512)
            except BlockingIOError:   # none left (or the main thread took them first)
                return
            if self.forward is not None:
                try:
                    os.write(self.forward, signums)
                except OSError:   # full or closed: dropped, as Python's own handler drops them
                    pass
            for signum in signums:
                if self.running is not None and signum in STOPPING and stopping(signum):
                    self.running.terminate = True
                    self.heard = signum


@functools.cache
def _signal_watch() -> _SignalWatch:
    return _SignalWatch()


os.register_at_fork(after_in_child=_signal_watch.cache_clear)   # a child has no watching thread, maybe a held lock


@contextmanager
def interruptible(options: ort.RunOptions) -> Iterator[list[int]]:
    """Around a session.run given `options`: a stopping SIGINT or SIGTERM meanwhile terminates the run. Yields a list
    that, once the block is left, holds the signal that did (empty if none did). Outside the main thread, which alone
    may set the wakeup fd (and alone runs signal handlers), it changes nothing."""
    heard: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield heard
        return
    watch = _signal_watch()
    with watch.lock:
        watch.running, watch.heard = options, None
        options.terminate = False
        before = signal.set_wakeup_fd(watch.write)
        watch.forward = None if before in (-1, watch.write) else before
    try:
        yield heard
    finally:
        with watch.lock:
            signal.set_wakeup_fd(before)
            watch.take()   # what came before the line above goes on to `before` too
            watch.running = watch.forward = None
            options.terminate = False
            if watch.heard is not None:
                heard.append(watch.heard)
