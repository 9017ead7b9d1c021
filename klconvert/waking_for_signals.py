"""Waiting for work in other threads while a signal's Python handler can still run. A signal sent to the process (a
terminal's Ctrl-C, `kill`'s SIGTERM) is taken by whichever of its threads the system picks; taken by a worker, CPython's
C handler only flags it, and the Python handler (the entry point's, a pull's guard's) runs in the main thread once that
next runs Python code. A main thread asleep in a wait with no timeout -- huggingface_hub's for its download threads,
ThreadPoolExecutor.map's for the next result -- runs it only when the thread it waits for has finished: a whole shard
later (60 s on the test's stand-in, h315). So the main thread waits here instead, waking every WAKE_SECONDS.

The wait after a signal lasts until the work has stopped, which it does at its next chunk -- unless it never does (a
hash read hung on a dead network file system, a download that ignores the abort): then no Ctrl-C ended the command,
only kill -9, and nothing was said. So a work not stopped NOTICE_SECONDS after the signal is said to be waited for,
once, with what another interrupt would leave, and one after that line ends the wait at once (LeftRunning)."""
from __future__ import annotations

import contextvars
import threading
import time
from typing import Callable, TypeVar

from klconvert.entry import Interrupted, interrupt_name, note_left_running, say_while_interrupted, signal_of

# how long a signal another thread took waits for its handler at most (on top of what the handler does)
WAKE_SECONDS = 0.1
# how long the work may take to stop after a signal before the wait says so: a stop at the next chunk takes a
# fraction of it, and says nothing (an interrupted command's one line stays one)
NOTICE_SECONDS = 2.0

T = TypeVar("T")


class LeftRunning(Interrupted):
    """The interrupt that ended a wait whose work had not stopped (run_waking_for_signals' notice said): that work
    runs on in its threads, so what would clean up after it (a --local-dir's files, the record of the hashes) must
    not -- it would race those threads."""


def run_waking_for_signals(call: Callable[[], T], stop: Callable[[], None], stopping: str, left: str) -> T:
    """call() in a new thread, in a copy of this thread's context (contextvars: where warnings filters are held there,
    as Python 3.14 may, the caller's catch_warnings goes with it), waited for from this one in WAKE_SECONDS naps, so
    that a signal's handler runs here within one. Its result, or its exception raised here as it is (a KLError,
    huggingface_hub's errors, PullInterrupted keep their types). Where this thread's wait raises (a signal's handler:
    KeyboardInterrupt), stop() tells the work to stop, and the wait goes on until the work has ended -- through
    further signals, whose handlers run as they come (a guard's aborts hf_xet again) -- before the last raised is
    raised: what the caller cleans up after a Ctrl-C (a --local-dir's files, the record of the hashes) is then no
    longer being written, and nothing of the work runs on past the command. A stop() that a signal interrupts is
    called again. But where the work has not ended NOTICE_SECONDS after the first signal, one line says so on stderr
    (`stopping`: what is being stopped, "the downloads"; `left`: what the work leaves if given up on now), and a
    signal after that line ends the wait at once: LeftRunning, the work running on, the line the command ends in
    adding `left`, and the command's process ending without waiting for the work's threads (note_left_running)."""
    outcome: dict = {}
    # the work's end, told by the work itself: not Thread.join, which Python before 3.13 takes, once a signal's
    # exception has interrupted it, to have seen the thread end (bpo-45274's fix releases the lock the running thread
    # holds), so the wait ended while the downloads still wrote
    ended = threading.Event()
    # taken by the first of the work beginning and a signal's exception raised as the thread starts (Thread.start
    # waits for the new thread, which may by then be running): a work begun is waited for as below, one not begun
    # never begins
    begun = threading.Lock()

    def work() -> None:
        if not begun.acquire(blocking=False):   # given up as the thread started
            return
        try:
            outcome["result"] = call()
        except BaseException as e:   # raised in the waiting thread once the wait has ended
            outcome["error"] = e
        finally:
            ended.set()

    raised, stopped, said, signalled_at = None, False, False, 0.0
    try:
        threading.Thread(target=contextvars.copy_context().run, args=(work,), name="klconvert-work").start()
    except BaseException as e:   # a signal's handler raised as the thread started
        if begun.acquire(blocking=False):
            raise
        raised, signalled_at = e, time.monotonic()
    while True:   # again after each exception the wait raised
        try:
            while not ended.is_set():
                if raised is not None and not stopped:
                    stop()
                    stopped = True
                if stopped and not said and time.monotonic() - signalled_at >= NOTICE_SECONDS:
                    said = True   # first: a signal as the line is said is one after it (else said twice)
                    again = interrupt_name(signal_of(raised))
                    say_while_interrupted(f"klconvert: stopping {stopping}; another {again} quits at once ({left})")
                ended.wait(WAKE_SECONDS)
            break
        except BaseException as e:   # a signal's handler raised (or a second's, while the work stops)
            if said:   # the user was told what another one does
                note_left_running(left)
                raise LeftRunning(signal_of(e)) from None
            if raised is None:
                signalled_at = time.monotonic()
            raised = e
    if raised is not None:
        raise raised
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
