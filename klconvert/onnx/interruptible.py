"""A Ctrl-C (or SIGTERM) that stops onnxruntime mid-run. Python runs a signal's handler in the main thread between
bytecodes, so while that thread sits in session.run the handler waits for the run to end -- a damaged graph's Loop of
2**62 trips never ended, and Ctrl-C did nothing. Python's C-level handler still writes the signal's number to the
wakeup fd at once; a thread reading it sets the run's RunOptions.terminate, which onnxruntime checks between nodes and
a Loop's trips. session.run itself stays in the main thread (run on a worker thread and stopped so, onnxruntime
aborted the process at exit)."""
from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import onnxruntime as ort

STOPPING = (signal.SIGINT, signal.SIGTERM)   # the signals the command line ends on (klconvert/entry.py)


class _SignalWatch:
    """The process's one wakeup pipe and the thread that reads it: a stopping signal's number sets `terminate` on the
    RunOptions of the run in progress, if any, and is kept in `heard`."""

    def __init__(self):
        self.read, self.write = os.pipe()
        os.set_blocking(self.write, False)   # set_wakeup_fd's rule: the C handler must never block
        self.lock = threading.Lock()
        self.running: ort.RunOptions | None = None
        self.heard: int | None = None
        threading.Thread(target=self._watch, name="onnxruntime-signals", daemon=True).start()

    def _watch(self) -> None:
        while True:
            for signum in os.read(self.read, 64):
                if signum in STOPPING:
                    with self.lock:
                        if self.running is not None:
                            self.running.terminate = True
                            self.heard = signum


@functools.cache
def _signal_watch() -> _SignalWatch:
    return _SignalWatch()


@contextmanager
def interruptible(options: ort.RunOptions) -> Iterator[list[int]]:
    """Around a session.run given `options`: a SIGINT or SIGTERM meanwhile terminates the run. Yields a list that,
    once the block is left, holds the signal that did (empty if none did). Outside the main thread, which alone may
    set the wakeup fd (and alone runs signal handlers), it changes nothing."""
    heard: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield heard
        return
    watch = _signal_watch()
    with watch.lock:
        watch.running, watch.heard = options, None
        options.terminate = False
    before = signal.set_wakeup_fd(watch.write)
    try:
        yield heard
    finally:
        signal.set_wakeup_fd(before)
        with watch.lock:
            watch.running = None
            options.terminate = False
            if watch.heard is not None:
                heard.append(watch.heard)
