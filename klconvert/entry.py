"""The `klconvert` command's entry point. It imports nothing heavy before it takes over Ctrl-C, so that an interrupt
at any moment ends in one line, `klconvert: interrupted`, exit status 130, not a traceback -- nor a run that goes on.

Python's own handler raises KeyboardInterrupt wherever the main thread is. Inside an import that goes wrong: a
library may swallow it half-imported (torch's import of numpy did, on this machine 0.5-0.6 s into `klconvert run`,
and then either failed on the next import, "cannot load module more than once per process", or ran on as if no
Ctrl-C had come). So an interrupt that lands inside an import is held back and raised as soon as no import is
running; and whatever fails after an interrupt was heard is reported as the interrupt."""
from __future__ import annotations

import signal

from klconvert.errors import exit_interrupted

RETRY_SECONDS = 0.02  # how soon an interrupt held back during an import is tried again


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class _CtrlC:
    """SIGINT's handler, and SIGALRM's while an interrupt is held back."""

    def __init__(self) -> None:
        self.heard = False

    def interrupt(self, signum, frame) -> None:
        self.heard = True
        if _importing(frame):
            signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)   # ask again soon: on_alarm
            return
        raise KeyboardInterrupt

    def on_alarm(self, signum, frame) -> None:
        self.interrupt(signal.SIGINT, frame)

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.interrupt)
        signal.signal(signal.SIGALRM, self.on_alarm)


def main() -> None:
    ctrl_c = _CtrlC()
    ctrl_c.install()
    try:
        from klconvert.cli import main as cli_main

        cli_main()
    except SystemExit:
        raise
    except BaseException:
        if ctrl_c.heard:  # whatever broke after a Ctrl-C broke because of it
            exit_interrupted()
        raise
