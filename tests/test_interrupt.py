"""Ctrl-C at any moment of the `klconvert` command ends in one line, `klconvert: interrupted`, exit status 130: while
its libraries import (at once while the command has changed nothing; once it has, after the import), inside a library
import that would swallow it, after a library swallowed one and failed, a second one inside an import that hangs, and
in a real run; SIGTERM as Ctrl-C, with its own status, 143. An alarm that is no Ctrl-C, and a SIGINT the command was
started ignoring, are let be."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

LONG_RUN = ("run", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "3000", "--max-context", "3008")


def _entry(prelude: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """The command's entry point in a child, after `prelude` sets up where the interrupt lands."""
    code = textwrap.dedent(prelude) + (f"import sys\nsys.argv = ['klconvert', *{list(args)!r}]\n"
                                       "from klconvert.entry import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd)


# a command that has changed something (a file made) before the import the test interrupts: there is work to undo
TOUCHES = "open('made', 'w').close()"


def _assert_interrupted(proc, status: int = 130) -> None:
    """One line, and the status a shell shows for a command SIGINT ended (128 + 2), or SIGTERM (143)."""
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.split("\n")   # the one line, no blank one before it (click's for a terminal's ^C)
    assert lines[-2:] == ["klconvert: interrupted", ""] and lines[-3:-2] != [""] and "Traceback" not in proc.stderr


def _module_swallowing_a_ctrl_c(path, then: str = "") -> None:
    """A module whose import sends itself SIGINT and swallows the KeyboardInterrupt (as torch's import of numpy did),
    then runs `then`, and says that its import ended."""
    path.write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
                    f"try:\n    time.sleep(0.3)\nexcept KeyboardInterrupt:\n    pass\n{then}\n"
                    "print('the import ended')\n")


@pytest.mark.parametrize("module", ["klconvert.cli", "klconvert.errors"])
def test_an_interrupt_while_the_entry_point_imports(module):
    """The entry point imports klconvert's modules after it takes over SIGINT (klconvert.errors, the first: Python's
    own handler raised a KeyboardInterrupt there, with its traceback)."""
    _assert_interrupted(_entry(f"""
        import importlib.abc, os, signal, sys
        class InterruptOnImport(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "{module}":
                    os.kill(os.getpid(), signal.SIGINT)
        sys.meta_path.insert(0, InterruptOnImport())
        """, *LONG_RUN))


def test_an_interrupt_inside_a_long_import_ends_an_untouched_command_at_once(tmp_path):
    """Held until the import was over, a Ctrl-C waited out torch's import (1.5-3 s): a command that has changed
    nothing has nothing to undo, and ends inside the import, which no exception reaches -- what the import itself
    makes (torch's cache folder) is not the command's change."""
    (tmp_path / "slow.py").write_text("import os, signal, time\nos.makedirs('cache', exist_ok=True)\n"
                                      "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(20)\n"
                                      "print('the import ended')\n")
    started = time.monotonic()
    proc = _entry("import klconvert.cli\nklconvert.cli.main = lambda: __import__('slow')\n", cwd=tmp_path)
    assert time.monotonic() - started < 10
    _assert_interrupted(proc, 143)
    assert "the import ended" not in proc.stdout


def test_an_interrupt_inside_an_import_waits_for_it_to_end(tmp_path):
    """Once the command has changed something, a library that swallows KeyboardInterrupt while importing (torch's
    numpy import did) must not lose the Ctrl-C: it is raised once the import is over."""
    _module_swallowing_a_ctrl_c(tmp_path / "swallows.py")
    proc = _entry(f"""
        import sys, time, klconvert.cli
        def imports_then_works():
            {TOUCHES}
            import swallows
            time.sleep(5)
            print("ran on as if no Ctrl-C had come")
        klconvert.cli.main = imports_then_works
        """, cwd=tmp_path)
    _assert_interrupted(proc)
    assert "the import ended" in proc.stdout and "ran on" not in proc.stdout


def test_a_failure_after_a_swallowed_interrupt():
    _assert_interrupted(_entry("""
        import os, signal, time, klconvert.cli
        def swallows_then_fails():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                pass
            raise ImportError("cannot load module more than once per process")
        klconvert.cli.main = swallows_then_fails
        """))


def test_a_failure_inside_the_import_that_swallowed_it(tmp_path):
    """Held back, then the import fails inside itself: one line and 130 -- not the retry's alarm ending the process
    afterwards ("Alarm clock", 142)."""
    _module_swallowing_a_ctrl_c(tmp_path / "fails.py", then="raise ImportError('cannot load module more than once')")
    _assert_interrupted(_entry(f"import klconvert.cli\nklconvert.cli.main = lambda: ({TOUCHES}, __import__('fails'))\n",
                               cwd=tmp_path))


# the interrupted line written slowly (a loaded machine, a slow terminal): past the retry's RETRY_SECONDS
SLOW_LINE = """import os, time
_write = os.write
def _slow(fd, data):
    if fd == 2 and b"interrupted" in bytes(data):
        time.sleep(0.2)
    return _write(fd, data)
os.write = _slow
"""


def test_the_interrupted_line_is_not_cut_by_the_retry(tmp_path):
    """The retry's alarm, still armed, went off while the line was being written: a traceback ending in
    Interrupted, exit status 1 (seen once under load in CI)."""
    _module_swallowing_a_ctrl_c(tmp_path / "fails.py", then="raise ImportError('cannot load module more than once')")
    _assert_interrupted(_entry(SLOW_LINE + f"import klconvert.cli\nklconvert.cli.main = lambda: ({TOUCHES}, "
                                           "__import__('fails'))\n", cwd=tmp_path))


def test_a_second_ctrl_c_stops_an_import_that_hangs(tmp_path):
    (tmp_path / "hangs.py").write_text("import time\ntime.sleep(60)\nprint('the import ended')\n")
    proc = _entry(f"""
        import os, signal, threading, klconvert.cli
        def presses_twice():
            {TOUCHES}
            for at in (0.5, 1.0):
                threading.Timer(at, os.kill, (os.getpid(), signal.SIGINT)).start()
            import hangs
        klconvert.cli.main = presses_twice
        """, cwd=tmp_path)
    _assert_interrupted(proc)
    assert "the import ended" not in proc.stdout


def test_an_alarm_that_is_no_ctrl_c_is_let_be():
    proc = _entry("""
        import signal, time, klconvert.cli
        def times_itself():
            signal.setitimer(signal.ITIMER_REAL, 0.1)   # a library's own timer, or `kill -ALRM`
            time.sleep(0.5)
            print("finished")
        klconvert.cli.main = times_itself
        """)
    assert proc.returncode == 0 and proc.stdout == "finished\n", proc.stderr


def test_a_command_started_ignoring_sigint_keeps_ignoring_it():
    """A background job of a script starts with SIGINT ignored: a Ctrl-C meant for the script's foreground
    command must not stop it."""
    proc = _entry("""
        import os, signal, time, klconvert.cli
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        def works():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
            print("finished")
        klconvert.cli.main = works
        """)
    assert proc.returncode == 0 and proc.stdout == "finished\n", proc.stderr


def test_errors_without_an_interrupt_are_not_called_one():
    proc = _entry("import klconvert.cli\nklconvert.cli.main = lambda: 1 / 0\n")
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr and "interrupted" not in proc.stderr


def test_sigterm_during_a_conversion_is_an_interrupt_that_leaves_nothing(tiny_released, tmp_path):
    """`kill` or `timeout` sends SIGTERM: it left a 721 MB OUT.partial and its lock behind, where Ctrl-C leaves
    nothing (no shard was finished)."""
    proc = _entry("""
        import os, signal, klconvert.quantize as q
        write = q.write_shard
        def write_shard(path, tensors, metadata=None, on_tensor=None):
            os.kill(os.getpid(), signal.SIGTERM)
            return write(path, tensors, metadata, on_tensor)
        q.write_shard = write_shard
        """, "quantize", str(tiny_released), str(tmp_path / "q"), "--bits", "4", "--group-size", "32")
    _assert_interrupted(proc, 143)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.02, 0.3, 0.6, 1.0, 2.0])
def test_a_real_ctrl_c_during_a_run(delay):
    """Timed from when the entry point is about to take over SIGINT: before that the interpreter itself is starting
    (an interrupt there is Python's own, with its traceback, whatever a program does)."""
    code = (f"import sys\nfrom klconvert.entry import main\nsys.argv = ['klconvert', *{list(LONG_RUN)!r}]\n"
            "print('ready', file=sys.stderr, flush=True)\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr.readline() == "ready\n"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    _assert_interrupted(subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
