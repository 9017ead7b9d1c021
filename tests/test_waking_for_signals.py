"""klconvert.waking_for_signals: a signal another thread takes is handled in the main thread within a nap, and the
work has ended whenever the wait raises or returns."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from klconvert.errors import KLError
from klconvert import waking_for_signals
from klconvert.waking_for_signals import WAKE_SECONDS, LeftRunning, run_waking_for_signals

# what a wait says it stops, and what giving up on it leaves
SAID = {"stopping": "the work", "left": "the work's files may remain"}
NOTICE = "klconvert: stopping the work; another Ctrl-C quits at once (the work's files may remain)"


def test_the_works_result_and_its_exception_come_back_as_they_are():
    assert run_waking_for_signals(lambda: 42, stop=lambda: None, **SAID) == 42
    error = KLError("the hub refused")

    def refused():
        raise error

    with pytest.raises(KLError) as raised:
        run_waking_for_signals(refused, stop=lambda: None, **SAID)
    assert raised.value is error


def test_a_signal_the_working_thread_takes_is_handled_at_once_and_the_wait_ends_with_the_work(monkeypatch):
    """SIGINT sent to the working thread itself, which CPython's C handler only flags there: the main thread's wait
    (Python's KeyboardInterrupt handler) raises within a nap, stop() is told, and the wait raises only once the work,
    which goes on a while after its stop, has ended. Twice over, the second while the work stops: the second is what
    a Ctrl-C pressed again brings, and it must not end the wait -- Thread.join before Python 3.13, interrupted, took
    the thread to have ended (bpo-45274's fix), so the command ended while a download still wrote."""
    # the second signal comes ~0.6 s after the first: before the notice (which a loaded machine could push it past,
    # the second then giving up on the work, as test_a_work_slow_to_stop_... holds), whatever the load
    monkeypatch.setattr(waking_for_signals, "NOTICE_SECONDS", 60.0)
    working, stopping = threading.Event(), threading.Event()
    events = []

    def work():
        events.append(("started", threading.get_ident()))
        working.set()
        assert stopping.wait(30)
        time.sleep(5 * WAKE_SECONDS)   # a chunk read to its end
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)   # the second, while it stops
        time.sleep(5 * WAKE_SECONDS)
        events.append(("ended", time.monotonic()))

    def stop():
        events.append(("stopped", time.monotonic()))
        stopping.set()

    def interrupt_the_worker():
        assert working.wait(30)
        events.append(("signalled", time.monotonic()))
        signal.pthread_kill(events[0][1], signal.SIGINT)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)   # Python's own: KeyboardInterrupt
    try:
        threading.Thread(target=interrupt_the_worker, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run_waking_for_signals(work, stop, **SAID)
        raised = time.monotonic()
    finally:
        signal.signal(signal.SIGINT, before)
    said = dict(events[1:])
    assert set(said) == {"signalled", "stopped", "ended"}, events
    assert said["stopped"] - said["signalled"] < 1 and said["ended"] <= raised


def test_a_signal_as_the_thread_starts_still_waits_for_the_work_it_began(monkeypatch):
    """Thread.start waits for the new thread, which may by then have begun the work: a signal's exception raised there
    (seen under pytest-xdist, the signal sent as soon as the work began) ended the wait at once, the work running on,
    unstopped and unwaited for."""
    began, stopping, events = threading.Event(), threading.Event(), []
    start_of_the_thread = threading.Thread.start

    def started_then_interrupted(thread):
        start_of_the_thread(thread)
        assert began.wait(30)
        raise KeyboardInterrupt

    def work():
        began.set()
        assert stopping.wait(30)
        time.sleep(3 * WAKE_SECONDS)
        events.append("ended")

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(threading.Thread, "start", started_then_interrupted)
        run_waking_for_signals(work, stopping.set, **SAID)
    assert events == ["ended"]


def test_a_stop_a_signal_interrupts_is_called_again():
    """A second Ctrl-C landing in stop() (a pull's guard.cancel, waiting on huggingface_hub's lock to abort hf_xet's
    session) raises out of it before the work was told: stop() is called again, or the wait lasts as long as the
    work would run unstopped (an hf_xet download to its end)."""
    began, stopping, calls = threading.Event(), threading.Event(), []

    def work():
        began.set()
        calls.append(("told", stopping.wait(5)))

    def stop():
        calls.append("stop")
        if calls.count("stop") == 1:
            raise KeyboardInterrupt   # the second signal's, in the first stop
        stopping.set()

    def interrupt_the_wait():
        assert began.wait(30)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_the_wait, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run_waking_for_signals(work, stop, **SAID)
    finally:
        signal.signal(signal.SIGINT, before)
    assert calls == ["stop", "stop", ("told", True)]


def test_a_work_that_stops_at_once_says_nothing_more(capfd):
    """The usual Ctrl-C: the work stops at its next chunk, and the command's one line stays one."""
    stopping = threading.Event()

    def interrupt_the_wait():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def work():
        threading.Thread(target=interrupt_the_wait, daemon=True).start()
        assert stopping.wait(30)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_waking_for_signals(work, stopping.set, **SAID)
    finally:
        signal.signal(signal.SIGINT, before)
    assert capfd.readouterr().err == ""


def test_a_work_slow_to_stop_is_said_to_be_waited_for_once_and_a_signal_after_that_line_ends_the_wait(monkeypatch,
                                                                                                    capfd):
    """A work that has not stopped NOTICE_SECONDS after the signal (a hash read hung on a dead network file system, a
    download that ignores the abort) was waited for in silence, through every further Ctrl-C. Once, it is said so,
    with what another would leave; signals before that line are waited through as before, one after it ends the wait
    at once (LeftRunning), the work running on."""
    monkeypatch.setattr(waking_for_signals, "NOTICE_SECONDS", 0.5)
    said, say = [], waking_for_signals.say_while_interrupted
    monkeypatch.setattr(waking_for_signals, "say_while_interrupted", lambda line: (said.append(line), say(line)))
    released, events = threading.Event(), []
    main = threading.main_thread().ident

    def work():
        signal.pthread_kill(main, signal.SIGINT)   # as it begins
        time.sleep(0.2)
        signal.pthread_kill(main, signal.SIGINT)   # a second, before the line: waited through
        deadline = time.monotonic() + 30
        while not said and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1)   # the line is said once, not at each nap after it
        events.append("signalled after the line")
        signal.pthread_kill(main, signal.SIGINT)
        released.wait(30)
        events.append("ended")

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(LeftRunning) as left_running:
            run_waking_for_signals(work, stop=lambda: None, **SAID)
        assert events == ["signalled after the line"] and left_running.value.signum == signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, before)
        released.set()
    assert capfd.readouterr().err == NOTICE + "\n" and len(said) == 1
