"""The `klconvert` command's entry point. It imports nothing heavy before it takes over Ctrl-C, so that an interrupt
at any moment ends in one line, `klconvert: interrupted`, exit status 130, not a traceback -- nor a run that goes on.

Python's own handler raises KeyboardInterrupt wherever the main thread is. Inside an import that goes wrong: a
library may swallow it half-imported (torch's import of numpy did, on this machine 0.5-0.6 s into `klconvert run`,
and then either failed on the next import, "cannot load module more than once per process", or ran on as if no
Ctrl-C had come). So a first interrupt that lands inside an import is held back and raised as soon as no import is
running (a second is raised where it lands: an import that hangs can still be stopped); and whatever fails after an
interrupt was heard is reported as the interrupt. SIGTERM is taken the same way. A SIGINT the command was started
ignoring (a background job of a script) stays ignored."""
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
        self.heard = self.held = False

    def interrupt(self, signum, frame) -> None:
        if self.held or not _importing(frame):
            self._raise()
        self.heard = self.held = True
        signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)   # ask again soon: on_alarm

    def on_alarm(self, signum, frame) -> None:
        if not self.held:  # no interrupt of ours is waiting: not a Ctrl-C
            return
        if _importing(frame):
            signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)
            return
        self._raise()

    def _raise(self) -> None:
        self.heard, self.held = True, False
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise KeyboardInterrupt

    def install(self) -> bool:
        """Take over SIGINT and SIGTERM (`kill`, `timeout`: a run stopped either way cleans up as after Ctrl-C), each
        unless it is ignored, and SIGALRM for the retries; whether it took either."""
        self.before = {sig: signal.signal(sig, self.interrupt) for sig in (signal.SIGINT, signal.SIGTERM)
                       if signal.getsignal(sig) is not signal.SIG_IGN}
        if self.before:
            self.before[signal.SIGALRM] = signal.signal(signal.SIGALRM, self.on_alarm)
        return bool(self.before)

    def uninstall(self) -> None:
        """No retry left pending past the command (it would end the process as SIGALRM's, "Alarm clock")."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self.before.items():
            signal.signal(sig, handler)


def main() -> None:
    ctrl_c = _CtrlC()
    installed = ctrl_c.install()
    try:
        from klconvert.cli import main as cli_main

        cli_main()
        if ctrl_c.held:  # an interrupt held back through the command's last import: it is still the answer
            exit_interrupted()
    except SystemExit:
        raise
    except BaseException:
        if ctrl_c.heard:  # whatever broke after a Ctrl-C broke because of it
            exit_interrupted()
        raise
    finally:
        if installed:
            ctrl_c.uninstall()
