"""Ctrl-C at any moment of the `klconvert` command ends in one line, `klconvert: interrupted`, exit status 130: while
its libraries import (at once while the command has changed nothing; once it has, after the import), inside a library
import that would swallow it, after a library swallowed one and failed, a second one inside an import that hangs, and
in a real run; SIGTERM as Ctrl-C, with its own status, 143. An alarm that is no Ctrl-C, and a SIGINT the command was
started ignoring, are let be."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from klconvert.checkpoint.folder_files import CONFIG_FILE
from klconvert.checkpoint.reader import Checkpoint
from klconvert.convert.output_folder import FINISHED_FILES, OUTPUT_RECORD, RESUME_RECORD, TEMPORARY_MARKER, usual_mode
from klconvert.entry import OPENBLAS_THREAD_COUNT_VARIABLES, cpus_to_run_on, signal_status
from klconvert.quantize import quantize
from klconvert.sizes import parse_size
from klconvert.synth.checkpoint import synth
from testkit import run_cli, run_on_a_terminal

LONG_RUN = ("run", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "3000", "--max-context", "3008")


def _entry(prelude: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """The command's entry point in a child, after `prelude` sets up where the interrupt lands."""
    return subprocess.run(_entry_command(prelude, *args), capture_output=True, text=True, timeout=120, cwd=cwd)


def _entry_command(prelude: str, *args: str) -> list[str]:
    """What runs the command's entry point in a child, after `prelude` sets up where the interrupt lands."""
    return [sys.executable, "-c", textwrap.dedent(prelude) + (f"import sys\nsys.argv = ['klconvert', *{list(args)!r}]\n"
                                                              "from klconvert.entry import main\nmain()\n")]


def _command_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The command run through the entry point in this process (testkit.run_cli), as _entry's result: where a test
    is about what the command says and leaves, not about its process (a child spends seconds importing torch)."""
    code, out, err = run_cli(capsys, *args)
    return subprocess.CompletedProcess(["klconvert", *args], code, out, err)


# a command that has changed something (a file made) before the import the test interrupts: there is work to undo
TOUCHES = "open('made', 'w').close()"


def _assert_interrupted(proc, status: int = 130, complete=None, left: str | None = None) -> None:
    """One line, and the status a shell shows for a command SIGINT ended (128 + 2), or SIGTERM (143); the line says
    that the output `complete` is whole, and what the command leaves (`left`), where given."""
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.split("\n")   # the one line, no blank one before it (click's for a terminal's ^C)
    notes = [note for note in (None if complete is None else f"{complete} is complete: only its path was not printed",
                               left) if note is not None]
    line = "klconvert: interrupted" + (f" ({'; '.join(notes)})" if notes else "")
    assert lines[-2:] == [line, ""] and lines[-3:-2] != [""] and "Traceback" not in proc.stderr


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


THREAD_STACK = 256 << 20   # ulimit -s (each thread's stack) of the child whose import cannot start a thread
_STACK_HARD_LIMIT = resource.getrlimit(resource.RLIMIT_STACK)[1]   # ulimit -Hs: how far a child's ulimit -s goes
TWO_CPUS = pytest.mark.skipif(cpus_to_run_on() < 2, reason="one CPU to run on: OpenBLAS starts none")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif(_STACK_HARD_LIMIT != resource.RLIM_INFINITY and _STACK_HARD_LIMIT < THREAD_STACK,
                    reason="ulimit -s's hard limit is under THREAD_STACK")
@pytest.mark.parametrize("openblas_env, said", [
    pytest.param({"OPENBLAS_NUM_THREADS": "2"}, "memory", marks=TWO_CPUS),
    ({"OPENBLAS_NUM_THREADS": "1"}, "interrupt"),
    ({"OPENBLAS_DEFAULT_NUM_THREADS": "1"}, "interrupt"),
    pytest.param({"OMP_NUM_THREADS": "1", "OPENBLAS_DEFAULT_NUM_THREADS": "2"}, "memory", marks=TWO_CPUS)])
def test_a_sigint_inside_an_import_that_cannot_start_a_thread_is_said_as_memory(tmp_path, openblas_env, said):
    """h279: OpenBLAS raises SIGINT where it cannot start one of its threads, as numpy's import (inside torch's)
    loads it: under ulimit -s 256 MiB and ulimit -d 400 MB, `klconvert run --model tiny --device cpu` on 2 threads
    ended in "klconvert: interrupted", 130, where no Ctrl-C came. Inside an import of a process that cannot start a
    thread, it is one line about memory, exit status 2 -- here a module whose import leaves ulimit -d too little room
    for a thread's stack, then raises SIGINT. Where OpenBLAS starts no threads (OPENBLAS_NUM_THREADS=1) the SIGINT
    is not its: a Ctrl-C, said as the interrupt (h291: said as memory, with the advice already followed). h295:
    OPENBLAS_DEFAULT_NUM_THREADS was not read, so under =1 a Ctrl-C was said as memory, and under =2 with
    OMP_NUM_THREADS=1 OpenBLAS's SIGINT as the interrupt."""
    imports_blas = _an_import_that_cannot_start_a_thread(tmp_path)
    stack_limit = (THREAD_STACK, _STACK_HARD_LIMIT)
    proc = subprocess.run(imports_blas, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_STACK, stack_limit),
                          env={**_without_openblas_counts(), **openblas_env})
    if said == "interrupt":
        assert (proc.returncode, proc.stderr) == (130, "klconvert: interrupted\n")
        return
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.rstrip("\n")
    assert line.startswith("klconvert: error: out of host memory (or the process's memory limit) starting a thread "
                           "as a library loaded") and "\n" not in line, proc.stderr
    assert line.endswith("set OPENBLAS_NUM_THREADS=1 (its threads), or lower ulimit -s (each thread's stack)"), line
    assert "the import ended" not in proc.stdout


def _an_import_that_cannot_start_a_thread(folder: Path) -> list[str]:
    """The entry point's command whose main imports a module (written in `folder`) that leaves ulimit -d too little
    room for a thread's stack, then raises SIGINT, as OpenBLAS does where it cannot start one of its threads."""
    (folder / "blas.py").write_text(
        "import resource, signal, time\n"
        "data = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmData'))\n"
        f"resource.setrlimit(resource.RLIMIT_DATA, (data + {THREAD_STACK // 4}, resource.RLIM_INFINITY))\n"
        "signal.raise_signal(signal.SIGINT)\ntime.sleep(20)\nprint('the import ended')\n")
    return _entry_command("import klconvert.cli\nklconvert.cli.main = lambda: __import__('blas')\n")


def _without_openblas_counts() -> dict[str, str]:
    """This process's environment without the variables OpenBLAS reads its thread count from."""
    return {k: v for k, v in os.environ.items() if k not in OPENBLAS_THREAD_COUNT_VARIABLES}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins the child to one CPU")
@pytest.mark.skipif(_STACK_HARD_LIMIT != resource.RLIM_INFINITY and _STACK_HARD_LIMIT < THREAD_STACK,
                    reason="ulimit -s's hard limit is under THREAD_STACK")
@pytest.mark.parametrize("openblas_threads", [None, "8"])
def test_a_sigint_inside_an_import_on_one_cpu_is_the_interrupt(tmp_path, openblas_threads):
    """h292: OpenBLAS starts no more threads than the CPUs the process may run on (its get_num_procs: the
    affinity's), so under `taskset -c 0` it starts none whatever OPENBLAS_NUM_THREADS says, and a SIGINT inside an
    import is a Ctrl-C: it was said as OpenBLAS's out-of-memory, exit status 2, advising OPENBLAS_NUM_THREADS=1, as
    the machine's CPUs were counted -- here the import of the test above, in a child pinned to one CPU."""
    imports_blas = _an_import_that_cannot_start_a_thread(tmp_path)
    stack_limit, cpu = (THREAD_STACK, _STACK_HARD_LIMIT), min(os.sched_getaffinity(0))

    def one_cpu_and_stack_limit():
        os.sched_setaffinity(0, {cpu})
        resource.setrlimit(resource.RLIMIT_STACK, stack_limit)

    env = _without_openblas_counts()
    proc = subprocess.run(imports_blas, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          preexec_fn=one_cpu_and_stack_limit,
                          env=env if openblas_threads is None else {**env, "OPENBLAS_NUM_THREADS": openblas_threads})
    assert (proc.returncode, proc.stderr) == (130, "klconvert: interrupted\n")


# Whether the OpenBLAS numpy loads starts threads as it loads (a thread past the main one once numpy is imported),
# beside what the entry point reads of it; or that numpy loads no OpenBLAS
OPENBLAS_THREADS = """
import os
import numpy
if "openblas" not in open("/proc/self/maps").read():
    raise SystemExit("numpy loads no OpenBLAS")
started = len(os.listdir("/proc/self/task")) > 1
from klconvert.entry import _openblas_starts_threads
print(started, _openblas_starts_threads())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("openblas_env", [
    {}, {"OPENBLAS_DEFAULT_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "1", "OPENBLAS_DEFAULT_NUM_THREADS": "2"},
    {"GOTO_NUM_THREADS": "1", "OPENBLAS_DEFAULT_NUM_THREADS": "2"},
    {"OPENBLAS_NUM_THREADS": "1", "OPENBLAS_DEFAULT_NUM_THREADS": "2"},
    {"OPENBLAS_NUM_THREADS": "0", "OPENBLAS_DEFAULT_NUM_THREADS": "1"},
    {"OPENBLAS_DEFAULT_NUM_THREADS": "0", "OMP_NUM_THREADS": "1"},
    {"OPENBLAS_NUM_THREADS": " +2x"}, {"OPENBLAS_NUM_THREADS": "4294967297"},
    {"OPENBLAS_NUM_THREADS": "99999999999999999999", "OMP_NUM_THREADS": "1"},
    {"OPENBLAS_NUM_THREADS": "-4294967295"}, {"OPENBLAS_NUM_THREADS": "-1", "OMP_NUM_THREADS": "1"},
    {"OPENBLAS_NUM_THREADS": "9" * 5000, "OMP_NUM_THREADS": "1"}],
    ids=lambda env: " ".join(f"{name}={value[:24]}" for name, value in env.items()) or "none")
def test_openblas_starts_threads_as_numpys_openblas_does(openblas_env):
    """h295: the entry point read OpenBLAS's thread count from OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS and
    OMP_NUM_THREADS, never OPENBLAS_DEFAULT_NUM_THREADS, which OpenBLAS reads after the first, and took a number
    past an int's range whole where C's atoi wraps it (4294967297 is 1) or saturates it (99999999999999999999 is -1,
    unset): what it reads is what the OpenBLAS numpy loads does, under each of these environments."""
    proc = subprocess.run([sys.executable, "-c", OPENBLAS_THREADS], capture_output=True, text=True, timeout=120,
                          env={**_without_openblas_counts(), **openblas_env})
    if proc.returncode == 1 and proc.stderr == "numpy loads no OpenBLAS\n":
        pytest.skip("numpy loads no OpenBLAS")
    assert proc.returncode == 0, proc.stderr[-2000:]
    started, read = proc.stdout.split()
    assert read == started


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
    """The second press is sent once the first is held back in the import: two timers 0.5 s apart, delayed together
    on a loaded machine, delivered both before the handler ran, which then ran once -- one Ctrl-C, held for the
    import's 60 s. A CI run passed so in 60.2 s: the import's print, which says it ran to its end, was lost in the
    buffered stdout the interrupt's exit did not flush; it is flushed now (one press alone fails here)."""
    (tmp_path / "hangs.py").write_text("import time\ntime.sleep(60)\nprint('the import ended', flush=True)\n")
    proc = _entry(f"""
        import os, signal, threading, time, klconvert.cli
        from klconvert.entry import Uninterrupted
        def press_twice():
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)
            while not Uninterrupted.ctrl_c.held:   # the first, held back in the import
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
        def presses_twice():
            {TOUCHES}
            threading.Thread(target=press_twice, daemon=True).start()
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
        def write_shard(path, tensors, on_tensor=None):
            os.kill(os.getpid(), signal.SIGTERM)
            return write(path, tensors, on_tensor)
        q.write_shard = write_shard
        """, "quantize", str(tiny_released), str(tmp_path / "q"), "--bits", "4", "--group-size", "32")
    _assert_interrupted(proc, 143)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_as_a_shard_is_opened_is_no_read_failure(tiny_released, tmp_path):
    """An interrupted quantize once said ".../model-00002-of-00002.safetensors: cannot read tensor ... (Bad file
    descriptor)" (h235's F4): an interrupt as os.fdopen returned dropped the file object it made, which closed the
    shard's descriptor, and open_regular closed it again -- EBADF, in place of the interrupt."""
    proc = _entry("""
        import os
        fdopen = os.fdopen
        def interrupted_as_it_returns(fd, *args, **kwargs):
            if not os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
                return fdopen(fd, *args, **kwargs)
            fdopen(fd, *args, **kwargs).close()   # the file made, dropped as the interrupt unwinds: its fd closed
            raise KeyboardInterrupt
        os.fdopen = interrupted_as_it_returns
        """, "quantize", str(tiny_released), str(tmp_path / "q"), "--bits", "4", "--group-size", "32")
    _assert_interrupted(proc)


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


# What holds the interpreter's shutdown up for 2 s after main returns: a thread not yet done (Python waits for it
# with its signal handling still on), or a module global's finalizer (run as the modules are torn down, after Python
# has put the default handler back for each signal it handled: torch's C++ teardown is there)
SLOW_SHUTDOWN = {
    "a thread": "threading.Thread(target=time.sleep, args=(2,)).start()\n",
    "module teardown": "class SlowToFree:\n    def __del__(self, sleep=time.sleep):\n        sleep(2)\n"
                       "kept = SlowToFree()\n",
}


def _ended_then_signalled(prelude: str, signum: int, shutdown: str) -> subprocess.CompletedProcess:
    """The entry point in a child whose interpreter takes 2 s to shut down (SLOW_SHUTDOWN[shutdown]), signalled
    0.5 s after main has returned."""
    code = textwrap.dedent(prelude) + "import sys, threading, time\n" + SLOW_SHUTDOWN[shutdown] + textwrap.dedent("""
        from klconvert.entry import main
        sys.argv = ['klconvert']
        try:
            main()
        finally:
            print("main returned", flush=True)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "main returned\n"
    time.sleep(0.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=20)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("shutdown", list(SLOW_SHUTDOWN))
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("status", [0, 2])
def test_a_signal_while_the_interpreter_shuts_down_leaves_the_commands_status(signum, status, shutdown):
    """Past main, Python's own handlers were back: a Ctrl-C while torch's exit handlers ran gave a traceback
    (KeyboardInterrupt, "Exception ignored in: <module 'threading'>"), or a status of 130 or 143 with no line for a
    command whose work was done. A handler of klconvert's own did not last into the modules' teardown."""
    ends = f"import sys, klconvert.cli\nklconvert.cli.main = lambda: sys.exit({status})\n"
    proc = _ended_then_signalled(ends, signum, shutdown)
    assert (proc.returncode, proc.stderr) == (status, "")


def test_a_second_ctrl_c_while_the_interpreter_shuts_down():
    """The first ended the command (its line, 130); the second, as the interpreter shut down, gave a traceback, or a
    status of -2 (killed by SIGINT) in place of 130."""
    proc = _ended_then_signalled("""
        import os, signal, time, klconvert.cli
        def interrupted():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        klconvert.cli.main = interrupted
        """, signal.SIGINT, "module teardown")
    _assert_interrupted(proc)


# an object whose finalizer a Ctrl-C lands in (tqdm's __del__ did): Python prints what a finalizer raises, and drops it
CTRL_C_IN_A_FINALIZER = """
    import os, signal, time, klconvert.cli
    class Bar:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
    """


@pytest.mark.parametrize("then", ["time.sleep(1); print('ran on')", "sys.exit(0)"])
def test_an_interrupt_a_finalizer_dropped_still_ends_the_command(then):
    """The command ran on to its end after "Exception ignored in: <function tqdm.__del__>", exit status 0; one that
    ended at once after the finalizer (sys.exit(0): click's end of every command) too."""
    proc = _entry(CTRL_C_IN_A_FINALIZER + textwrap.indent(textwrap.dedent(f"""
        import sys
        def works():
            Bar()   # dropped at once: its finalizer runs here
            {then}
        klconvert.cli.main = works
        """), "    "))
    _assert_interrupted(proc)
    assert "ran on" not in proc.stdout and "Exception ignored" not in proc.stderr


# os.rename, then a signal to the process as soon as it has renamed a folder to `out` or `q`: an interrupt between
# the rename into place and what must follow it
SIGNAL_AFTER_THE_RENAME = """
    import os, signal
    _rename = os.rename
    def rename(source, target, *args, **kwargs):
        _rename(source, target, *args, **kwargs)
        if os.path.basename(target) in ("out", "q"):
            os.kill(os.getpid(), signal.{signal})
    os.rename = rename
    """


# the command of the tests below: OUT written whole by whole_folder, in the current folder
WRITES_OUT = """
from pathlib import Path
import klconvert.cli
from klconvert.whole_folder import whole_folder
def writes():
    with whole_folder(Path("out")) as folder:
        (folder / "config.json").write_text("{}")
klconvert.cli.main = writes
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupt_as_the_folder_goes_into_place_leaves_it_whole_and_unmarked(tmp_path, signame):
    """Its temporary mark was left in OUT: synth's rerun said "already exists", export-onnx --force refused OUT as
    holding other files. The line says OUT is whole (it said only "interrupted", and the rerun was refused)."""
    proc = _entry(textwrap.dedent(SIGNAL_AFTER_THE_RENAME.format(signal=signame)) + WRITES_OUT, cwd=tmp_path)
    _assert_interrupted(proc, signal_status(getattr(signal, signame)), complete="out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_RECORD, "config.json"]


def test_an_interrupt_as_a_filled_folders_earlier_entries_go_says_it_is_whole(tmp_path):
    """Filling an existing OUT in place, one that landed once the new entries were in, as the folder the earlier ones
    were moved aside into was deleted (98 GB of an earlier model takes a while), said only "interrupted"."""
    (tmp_path / "out").mkdir()
    proc = _entry(textwrap.dedent("""
        import os, signal
        _rmdir = os.rmdir
        def rmdir(path, *args, **kwargs):
            _rmdir(path, *args, **kwargs)
            if ".out.replaced-" in os.path.basename(path):
                os.kill(os.getpid(), signal.SIGINT)
                [None for _ in range(3)]
        os.rmdir = rmdir
        """) + WRITES_OUT, cwd=tmp_path)
    _assert_interrupted(proc, complete="out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_RECORD, "config.json"]


@pytest.mark.parametrize("deleted", [CONFIG_FILE, TEMPORARY_MARKER])
def test_an_interrupt_as_a_filled_folders_earlier_entries_are_deleted_waits_for_them(tmp_path, deleted):
    """`synth --force` over an earlier synth filling OUT in place: one that landed as the earlier entries, moved
    aside into a hidden folder in OUT, were deleted stopped the deletion, leaving that folder in OUT (the earlier
    model whole but for a file) until a run wrote OUT again. It comes once they are gone."""
    synth = ("synth", "--preset", "tiny", "--out", "out")
    _synth_here(tmp_path / "out")
    files = sorted(os.listdir(tmp_path / "out"))
    proc = _entry(textwrap.dedent(f"""
        import os, signal
        _unlink = os.unlink
        def unlink(path, *args, **kwargs):
            _unlink(path, *args, **kwargs)
            if ".out.replaced-" in os.fspath(path) and os.path.basename(path) == "{deleted}":
                os.kill(os.getpid(), signal.SIGINT)
                [None for _ in range(3)]
        os.unlink = unlink
        """), *synth, "--force", cwd=tmp_path)
    _assert_interrupted(proc, complete="out")
    _assert_deletion_said(proc, "out", "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(os.listdir(tmp_path / "out")) == files


def test_an_interrupt_as_a_filled_folders_last_entry_goes_in_says_it_is_whole(tmp_path):
    """Filling OUT in place, one that landed once the last new entry was in, before OUT was noted whole, said only
    "interrupted" (h235's F2): the rerun was refused, OUT being there, and after --force the user thought the old
    folder kept."""
    (tmp_path / "out").mkdir()
    proc = _entry(textwrap.dedent("""
        import os, signal
        import klconvert.whole_folder as whole_folder
        _move, moves = whole_folder._move, []
        def move(names, source, target):
            _move(names, source, target)
            moves.append(target)
            if len(moves) == 2:   # the earlier entries aside, then the new ones in
                os.kill(os.getpid(), signal.SIGINT)
                [None for _ in range(3)]
        whole_folder._move = move
        """) + WRITES_OUT, cwd=tmp_path)
    _assert_interrupted(proc, complete="out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_RECORD, "config.json"]


@pytest.mark.parametrize("command", ["quantize", "pull-and-quantize"])
def test_an_interrupt_as_quantize_renames_its_output_leaves_no_resume_record(tiny_released, tmp_path, command):
    """Its resume record was left in OUT, and OUT.partial gone: a rerun said "already exists". The line says OUT is
    whole (h220's F3: it said only "interrupted", and the rerun was refused -- the 48B's to quantize again)."""
    out = tmp_path / "q"
    args = (str(tiny_released), str(out)) if command == "quantize" else ("--model", str(tiny_released), "--out",
                                                                          str(out))
    proc = _entry(SIGNAL_AFTER_THE_RENAME.format(signal="SIGINT"), command, *args, "--bits", "4", "--group-size", "32")
    _assert_interrupted(proc, complete=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert ".klconvert-resume.json" not in os.listdir(tmp_path / "q") and (tmp_path / "q" / "config.json").is_file()


@pytest.mark.parametrize("command", [("synth", "--preset", "tiny", "--out", "out"),
                                     ("export-onnx", "--model", "tiny", "--out", "out")])
def test_an_interrupt_as_synth_or_export_onnx_renames_its_output_says_it_is_whole(tmp_path, command):
    """It said only "interrupted", with OUT whole, and the rerun was refused "already exists"."""
    proc = _entry(SIGNAL_AFTER_THE_RENAME.format(signal="SIGINT"), *command, cwd=tmp_path)
    _assert_interrupted(proc, complete="out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and OUTPUT_RECORD in os.listdir(tmp_path / "out")


def _killed_as_quantize_renames_its_output(tiny_released, out, *options: str) -> list[str]:
    """Quantize into `out`, SIGKILLed right after OUT.partial is renamed to OUT -- a kill Uninterrupted cannot hold
    back -- checked to leave OUT whole but for its resume record and mode (0700), and the lock beside it; the files a
    finished OUT holds."""
    killed = _entry(SIGNAL_AFTER_THE_RENAME.format(signal="SIGKILL"), "quantize", str(tiny_released), str(out),
                    *options)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["q", "q.partial.lock"]
    assert RESUME_RECORD in os.listdir(out) and stat.S_IMODE(out.stat().st_mode) == 0o700
    return sorted(set(os.listdir(out)) - {RESUME_RECORD})


def _assert_finished(out, files: list[str]) -> None:
    assert sorted(p.name for p in out.parent.iterdir()) == ["q"]   # the lock gone
    assert sorted(os.listdir(out)) == files and stat.S_IMODE(out.stat().st_mode) == usual_mode(True)


SHARD_SIZE = "150KB"
QUANTIZE_OPTIONS = ("--bits", "4", "--group-size", "32", "--max-shard-size", SHARD_SIZE)


def _quantized_here(tiny_released, out, bits: int = 4, force: bool = False) -> None:
    """What `klconvert quantize SRC OUT` with QUANTIZE_OPTIONS (`bits` in place of 4) writes, quantized in this
    process: an earlier OUT, or the run after an interrupted one, that no test is about the process of (a child
    spends seconds importing torch)."""
    quantize(tiny_released, out, bits=bits, group_size=32, max_shard_bytes=parse_size(SHARD_SIZE, least_bare_bytes=0),
             force=force, progress=False)


def _synth_here(out, force: bool = False) -> None:
    """What `klconvert synth --preset tiny --out OUT` writes, made in this process: an earlier OUT, or the run after an
    interrupted one."""
    synth("tiny", out, force=force, progress=False)


def test_a_kill_as_quantize_renames_its_output_is_finished_by_the_same_command(tiny_released, tmp_path, capsys):
    """The rerun said "already exists" and left the resume record, the 0700 mode and the lock as they were
    (helper-152): only --force, quantizing it all again, cleared them. What the killed run left loads."""
    out = tmp_path / "q"
    files = _killed_as_quantize_renames_its_output(tiny_released, out, *QUANTIZE_OPTIONS)
    Checkpoint(out).get("model.layers.1.block_sparse_moe.experts.0.w1.weight")
    rerun = _command_here(capsys, "quantize", str(tiny_released), str(out), *QUANTIZE_OPTIONS)
    assert rerun.returncode == 0, rerun.stderr
    shards = len([name for name in files if name.endswith(".safetensors")])
    assert rerun.stdout == f"{out}\n" and f"-> {out}: " in rerun.stderr, rerun.stderr
    said = f"{shards} shard" if shards == 1 else f"{shards} shards"
    assert f"{said}, {shards} kept from an interrupted run" in rerun.stderr
    _assert_finished(out, files)


def test_an_interrupt_as_the_same_command_ends_a_killed_finish_says_out_is_whole(tiny_released, tmp_path):
    """One held back while the rerun dropped the killed run's record said only "interrupted", with OUT whole."""
    out = tmp_path / "q"
    files = _killed_as_quantize_renames_its_output(tiny_released, out, *QUANTIZE_OPTIONS)
    rerun = _entry(f"""
        import os, signal
        _unlink = os.unlink
        def unlink(path, *args, **kwargs):
            _unlink(path, *args, **kwargs)
            if os.path.basename(path) == "{RESUME_RECORD}":
                os.kill(os.getpid(), signal.SIGINT)
                [None for _ in range(3)]
        os.unlink = unlink
        """, "quantize", str(tiny_released), str(out), *QUANTIZE_OPTIONS)
    _assert_interrupted(rerun, complete=out)
    _assert_finished(out, files)


def test_a_kill_as_quantize_renames_its_output_still_refuses_other_options_in_one_line(tiny_released, tmp_path,
                                                                                      capsys):
    """The refusal left the dead run's lock beside OUT; it stays one line (no takeover said), and the same command
    then finishes OUT."""
    out = tmp_path / "q"
    files = _killed_as_quantize_renames_its_output(tiny_released, out, *QUANTIZE_OPTIONS)
    other = _command_here(capsys, "quantize", str(tiny_released), str(out), "--bits", "8", *QUANTIZE_OPTIONS[2:])
    held = re.escape(f"{out}: is not empty (it holds {OUTPUT_RECORD}, {RESUME_RECORD}, ")
    assert other.returncode == 2 and re.fullmatch(
        rf"klconvert: error: {held}[^\n]+ and \d+ more\); choose another output folder, or pass --force to replace it "
        r"once the new one is complete\n", other.stderr), other.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"] and RESUME_RECORD in os.listdir(out)
    _quantized_here(tiny_released, out)
    _assert_finished(out, files)


def _replaced_by_an_interrupted_quantize(tiny_released, out, prelude: str) -> subprocess.CompletedProcess:
    """Quantize into `out` (4 bits), then again with other options (8 bits) and --force, `prelude` setting up where
    that run is interrupted; the second run's result."""
    _quantized_here(tiny_released, out)
    return _entry(prelude, "quantize", str(tiny_released), str(out), "--bits", "8", *QUANTIZE_OPTIONS[2:], "--force")


def _assert_replaced(out) -> None:
    """OUT is the second run's (8 bits), whole, alone: the earlier OUT (4 bits), moved aside beside it, is gone."""
    assert sorted(p.name for p in out.parent.iterdir()) == ["q"]
    assert "num_bits: 4" not in (out / "recipe.yaml").read_text() and RESUME_RECORD not in os.listdir(out)


# a signal to the process as a file named `name` is deleted (os.unlink, a full path or one in a folder's descriptor)
SIGNAL_AS_A_FILE_IS_DELETED = """
    import os, signal
    _unlink = os.unlink
    def unlink(path, *args, **kwargs):
        _unlink(path, *args, **kwargs)
        if os.path.basename(path) == "{name}":
            os.kill(os.getpid(), signal.{signal})
            [None for _ in range(3)]
    os.unlink = unlink
    """


@pytest.mark.parametrize("signame, received", [("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM")])
def test_an_interrupt_as_quantize_replaces_its_output_leaves_the_new_one_alone(tiny_released, tmp_path, signame,
                                                                               received):
    """One held back while OUT was moved aside and the new one renamed into place was raised before the earlier OUT
    was deleted: it stayed beside OUT as .q.replaced-PID-XXXXXXXX (98 GB for the real model) until a run wrote OUT
    again. It is deleted first; the line says OUT is whole."""
    out = tmp_path / "q"
    proc = _replaced_by_an_interrupted_quantize(tiny_released, out, SIGNAL_AFTER_THE_RENAME.format(signal=signame))
    _assert_interrupted(proc, signal_status(getattr(signal, signame)), complete=out)
    _assert_deletion_said(proc, out, tmp_path, received)   # held through the rename: said as the deletion starts
    _assert_replaced(out)


def test_an_interrupt_as_the_replaced_output_is_deleted_ends_once_it_is_gone(tiny_released, tmp_path):
    """One that landed as the earlier OUT was deleted stopped the deletion, leaving the rest of it beside OUT: it
    comes once the deletion is done. That is said at once (h247's F3: nothing was, while 98 GB went, which invited
    a second Ctrl-C), before the next file goes."""
    out = tmp_path / "q"
    proc = _replaced_by_an_interrupted_quantize(tiny_released, out, SIGNAL_AS_THE_EARLIER_OUT_IS_DELETED.format(
        interrupted=(1,), signal="SIGINT"))
    _assert_interrupted(proc, complete=out)
    said = _assert_deletion_said(proc, out, tmp_path)
    assert said < proc.stderr.splitlines().index(ANOTHER_DELETED), proc.stderr
    _assert_replaced(out)


# `signal` (SIGINT unless given) as the `interrupted` (their numbers, from 1) of the earlier OUT's files (moved aside:
# .q.replaced-*, or .out.replaced-* in OUT) are deleted, and ANOTHER_DELETED on stderr as each later one is
SIGNAL_AS_THE_EARLIER_OUT_IS_DELETED = """
    import os, signal
    _unlink, deleted = os.unlink, []
    def unlink(path, *args, **kwargs):
        _unlink(path, *args, **kwargs)
        if ".replaced-" in os.fspath(path):
            deleted.append(path)
            if len(deleted) in {interrupted}:
                os.kill(os.getpid(), signal.{signal})
                [None for _ in range(3)]
            elif len(deleted) > min({interrupted}):
                os.write(2, b"another deleted\\n")
    os.unlink = unlink
    """
ANOTHER_DELETED = "another deleted"


def _assert_deletion_said(proc, out, aside_in, received: str = "Ctrl-C") -> int:
    """The line said as an interrupt (`received`) was held back while the earlier OUT, moved aside into a hidden
    folder in `aside_in`, was deleted -- once; its index in stderr's lines."""
    return _deletion_said(proc.stderr.splitlines(), out, aside_in, received)


def _deletion_said(lines: list[str], out, aside_in, received: str) -> int:
    """The index of _assert_deletion_said's line in `lines`, said once."""
    aside = re.escape(os.path.join(aside_in, f".{os.path.basename(out)}.replaced-")) + r"[0-9]+-[a-z0-9_]{8}"
    said = [i for i, line in enumerate(lines) if re.fullmatch(
        f"klconvert: deleting the earlier {re.escape(str(out))} before stopping; a second {received} leaves the rest "
        f"of it in {aside}", line)]
    assert len(said) == 1, lines
    return said[0]


@pytest.mark.parametrize("command", ["quantize", "synth"])
def test_a_second_interrupt_as_the_earlier_output_is_deleted_names_what_it_leaves(tiny_released, tmp_path, command):
    """A second stops the deletion: the rest of the earlier OUT stays, hidden beside OUT (98 GB for the real model)
    or in it, and the line said only "interrupted (OUT is complete: ...)" (h247's F3). It names that folder and how
    it goes: the next run writing OUT removes it."""
    if command == "quantize":
        out, aside_in = tmp_path / "q", tmp_path
        _quantized_here(tiny_released, out)
        again = ("quantize", str(tiny_released), str(out), "--bits", "8", *QUANTIZE_OPTIONS[2:], "--force")
    else:
        out = aside_in = "out"
        _synth_here(tmp_path / out)
        again = ("synth", "--preset", "tiny", "--out", out, "--force")
    proc = _entry(SIGNAL_AS_THE_EARLIER_OUT_IS_DELETED.format(interrupted=(1, 2), signal="SIGINT"), *again,
                  cwd=tmp_path)
    files = sorted(os.listdir(tmp_path / out))   # the new OUT, whole; the rest of the earlier aside, if in OUT
    _assert_deletion_said(proc, out, aside_in)
    left = [name for name in os.listdir(tmp_path / aside_in) if ".replaced-" in name]
    assert len(left) == 1, left
    aside = os.path.join(aside_in, left[0])
    _assert_interrupted(proc, complete=out, left=f"the rest of the earlier {out} is left in {aside}: the next run "
                                                 f"writing {out} removes it, or rm -rf {aside}")
    assert (tmp_path / aside / TEMPORARY_MARKER).is_file()
    if command == "quantize":   # the next run writing OUT
        _quantized_here(tiny_released, out, bits=8, force=True)
    else:
        _synth_here(tmp_path / out, force=True)
    assert not os.path.lexists(tmp_path / aside)
    assert sorted(os.listdir(tmp_path / out)) == sorted(set(files) - set(left))


def test_a_second_interrupt_after_one_held_as_synth_fills_out_stops_the_deletion(tmp_path):
    """synth --force filling OUT in place: an interrupt held as the new entries went in was raised as their block
    ended, before the earlier ones were deleted, so the deletion ran unheld -- the second Ctrl-C was taken for the
    first (the notice only then) and a third stopped it (h252's F1). As quantize's: the notice as the deletion
    starts, and the second stops it, naming what it leaves."""
    first = ("synth", "--preset", "tiny", "--out", "out")
    _synth_here(tmp_path / "out")
    into_out = """
    import os, signal
    _rename, moved_in = os.rename, []
    def rename(source, target, *args, **kwargs):
        _rename(source, target, *args, **kwargs)
        if os.path.dirname(os.path.abspath(target)) == os.path.abspath("out") and ".replaced-" not in os.fspath(source):
            moved_in.append(target)
            if len(moved_in) == 1:
                os.kill(os.getpid(), signal.SIGINT)
                [None for _ in range(3)]
    os.rename = rename
    """
    proc = _entry(into_out + SIGNAL_AS_THE_EARLIER_OUT_IS_DELETED.format(interrupted=(1,), signal="SIGINT"), *first,
                  "--force", cwd=tmp_path)
    said = _assert_deletion_said(proc, "out", "out")
    left = [name for name in os.listdir(tmp_path / "out") if ".replaced-" in name]
    assert len(left) == 1 and ANOTHER_DELETED not in proc.stderr.splitlines()[:said], (left, proc.stderr)
    aside = os.path.join("out", left[0])
    _assert_interrupted(proc, complete="out", left=f"the rest of the earlier out is left in {aside}: the next run "
                                                   f"writing out removes it, or rm -rf {aside}")


@pytest.mark.parametrize("signame, received", [("SIGINT", "Ctrl-C"), ("SIGTERM", "SIGTERM")])
def test_the_deletion_notice_names_the_signal_and_the_last_line_follows_it_on_a_terminal(tmp_path, signame, received):
    """On a terminal, the notice said as synth --force deleted the earlier OUT named "a second Ctrl-C" after a
    SIGTERM too, and a blank line parted it from the line the command ended in: each went behind a line break,
    which closes a terminal's ^C, though the notice had ended the line. It names what was received, and the last
    line follows it."""
    synth = ("synth", "--preset", "tiny", "--out", "out")
    _synth_here(tmp_path / "out")
    code, _, shown = run_on_a_terminal(_entry_command(SIGNAL_AS_THE_EARLIER_OUT_IS_DELETED.format(
        interrupted=(1,), signal=signame), *synth, "--force"), timeout=120, cwd=tmp_path)
    assert code == signal_status(getattr(signal, signame)), shown
    lines = shown.replace("\r\n", "\n").split("\n")
    said = _deletion_said(lines, "out", "out", received)
    assert [line for line in lines[said + 1:] if line != ANOTHER_DELETED] == [
        "klconvert: interrupted (out is complete: only its path was not printed)", ""], shown


@pytest.mark.parametrize("killed", ["as the new OUT goes in", "as the earlier OUT is deleted"])
def test_a_kill_as_quantize_replaces_its_output_leaves_the_earlier_to_the_next_run(tiny_released, tmp_path, killed):
    """A SIGKILL (which nothing holds back) leaves the earlier OUT, moved aside, marked: the next run writing OUT
    removes it. One as it was deleted left what was not yet deleted of it without its mark, wherever shutil.rmtree
    came to that among the rest: no later run removed it. The mark goes last."""
    out = tmp_path / "q"
    kill = {"as the new OUT goes in": SIGNAL_AFTER_THE_RENAME.format(signal="SIGKILL"),
            "as the earlier OUT is deleted": SIGNAL_AS_A_FILE_IS_DELETED.format(name=TEMPORARY_MARKER,
                                                                                signal="SIGKILL")}[killed]
    proc = _replaced_by_an_interrupted_quantize(tiny_released, out, kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert any(name.startswith(".q.replaced-") for name in os.listdir(tmp_path))
    _quantized_here(tiny_released, out, bits=8, force=True)
    _assert_replaced(out)


def test_an_interrupt_inside_the_write_test_of_an_earlier_output_stops_no_replacement(tiny_released, tmp_path):
    """One that landed as quantize --force checked that OUT takes files, between its test file's making and its
    deletion, left that empty .q.write-test-PID-XXXXXXXX in OUT, and every later --force was refused "also holds
    other files, which klconvert did not write" naming it. It is a run's temporary, which the next run removes."""
    out = tmp_path / "q"
    proc = _replaced_by_an_interrupted_quantize(tiny_released, out, """
        import os, signal, tempfile
        _mkstemp = tempfile.mkstemp
        def mkstemp(*args, **kwargs):
            made = _mkstemp(*args, **kwargs)
            if os.path.basename(os.path.dirname(made[1])) == "q":   # OUT's own write test
                os.kill(os.getpid(), signal.SIGINT)
                [None for _ in range(3)]
            return made
        tempfile.mkstemp = mkstemp
        """)
    _assert_interrupted(proc)
    assert any(name.startswith(".q.write-test-") for name in os.listdir(out))
    _quantized_here(tiny_released, out, bits=8, force=True)
    _assert_replaced(out)
    assert not any(name.startswith(".q.") for name in os.listdir(out))


def _entries(folder) -> dict:
    """Each entry's kind and mode, file, size and modification time."""
    return {name: (f.st_mode, f.st_ino, f.st_size, f.st_mtime_ns)
            for name in os.listdir(folder) for f in [os.lstat(folder / name)]}


def _damage(out, damage: str) -> None:
    shard = sorted(out.glob("*.safetensors"))[-1]
    if damage == "a shard gone":
        shard.unlink()
    elif damage == "a shard a byte short":
        os.truncate(shard, shard.stat().st_size - 1)
    elif damage == "a file a FIFO":
        (out / "config.json").unlink()
        os.mkfifo(out / "config.json")
    elif damage == "a shard a link to its copy":
        copy = shard.rename(out.parent / shard.name)
        shard.symlink_to(copy)
    elif damage == "a shard's last byte flipped":   # its size, header and modification time kept
        found = shard.stat()
        with open(shard, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)[0]
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last ^ 0xFF]))
        os.utime(shard, ns=(found.st_atime_ns, found.st_mtime_ns))
    else:
        (out / "notes.txt").write_text("mine\n")


@pytest.mark.parametrize("damage", ["a shard gone", "a shard a byte short", "a file a FIFO",
                                    "a shard a link to its copy", "a file of the user's added",
                                    "a shard's last byte flipped"])
def test_a_kill_as_quantize_renames_its_output_is_finished_only_where_out_is_whole(tiny_released, tmp_path, damage,
                                                                                  capsys):
    """Only the file list in OUT's output record was compared: with a shard gone (or a file a FIFO, or the user's
    notes added) the rerun said "kept from an interrupted run" and exited 0 (h155); a shard rewritten in place with
    its size, header and modification time kept was taken too (helper-161). OUT is left as it was."""
    out = tmp_path / "q"
    _killed_as_quantize_renames_its_output(tiny_released, out, *QUANTIZE_OPTIONS)
    _damage(out, damage)
    before = _entries(out)
    rerun = _command_here(capsys, "quantize", str(tiny_released), str(out), *QUANTIZE_OPTIONS)
    advice = (" (or move it away)" if damage == "a file of the user's added"   # --force refuses that too: not offered
              else ", or pass --force to replace it once the new one is complete")
    assert rerun.returncode == 2 and re.fullmatch(rf"klconvert: error: {re.escape(str(out))}: is not empty \(it holds "
                                                  rf"[^\n]+\); choose another output folder{re.escape(advice)}\n",
                                                  rerun.stderr), rerun.stderr
    assert _entries(out) == before
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def _harmless(out, change: str) -> None:
    shard = sorted(out.glob("*.safetensors"))[-1]
    if change == "a shard touched":
        shard.touch()
    elif change == "a shard chmod 644":
        shard.chmod(0o644)
    elif change == "OUT copied in its place (cp -a)":
        copy = shutil.copytree(out, out.parent / "copy", symlinks=True)
        shutil.rmtree(out)
        copy.rename(out)
    else:   # a record written before its FINISHED_FILES key
        record = json.loads((out / RESUME_RECORD).read_text())
        del record[FINISHED_FILES]
        (out / RESUME_RECORD).write_text(json.dumps(record))


@pytest.mark.parametrize("change", ["a shard touched", "a shard chmod 644", "OUT copied in its place (cp -a)",
                                    "a record without finished_files"])
def test_a_kill_as_quantize_renames_its_output_is_finished_where_its_shards_are_the_same_bytes(tiny_released,
                                                                                            tmp_path, change):
    """A shard no longer the file FINISHED_FILES records (touched, chmod'ed, copied) or a record from before that key
    said "already exists" (helper-167): such a shard is hashed, and one of the recorded sha256 ends the finish."""
    out = tmp_path / "q"
    files = _killed_as_quantize_renames_its_output(tiny_released, out, *QUANTIZE_OPTIONS)
    _harmless(out, change)
    _quantized_here(tiny_released, out)
    _assert_finished(out, files)


@pytest.mark.parametrize("record", ["a FIFO", "not JSON", "ours, but no output record beside it"])
def test_an_out_holding_no_record_of_ours_is_refused_before_the_source_is_read(tmp_path, record, capsys):
    """Any entry under the resume record's name let OUT past the early 'already exists' (h155): pull-and-quantize
    went on to download the model, quantize to read SRC (here a folder with no config.json) before refusing."""
    out, src = tmp_path / "q", tmp_path / "src"
    out.mkdir(), src.mkdir()
    (out / "notes.txt").write_text("mine\n")
    if record == "a FIFO":
        os.mkfifo(out / RESUME_RECORD)
    else:
        (out / RESUME_RECORD).write_text("{" if record == "not JSON" else '{"source": {}}')
    refused = _command_here(capsys, "quantize", str(src), str(out), *QUANTIZE_OPTIONS)
    assert refused.returncode == 2 and refused.stderr.splitlines() == [   # --force, which refuses notes.txt, unoffered
        f"klconvert: error: {out}: is not empty (it holds {RESUME_RECORD}, notes.txt); choose another output folder "
        "(or move it away)"], refused.stderr
    assert sorted(os.listdir(out)) == sorted([RESUME_RECORD, "notes.txt"])


def test_an_interrupt_landing_as_the_command_ends_is_one_line_not_a_traceback():
    """One that landed in _run's own handling of the command's end (its check of a SystemExit) left main as
    Interrupted: a traceback, exit status 1, for a command that had decided 0."""
    proc = _entry("""
        import signal, klconvert.entry as entry
        def ends_as_interrupted(ctrl_c, command):
            raise entry.Interrupted(signal.SIGTERM)   # where one lands past the command's own handling
        entry._run = ends_as_interrupted
        """)
    _assert_interrupted(proc, 143)


# a SIGINT to the process inside tempfile.mkdtemp, the folder made, its name not yet returned: the one of `kind`
SIGNAL_INSIDE_MKDTEMP = textwrap.dedent("""
    import os, signal, tempfile
    _mkdtemp = tempfile.mkdtemp
    def mkdtemp(*args, **kwargs):
        made = _mkdtemp(*args, **kwargs)
        if "{kind}" in os.path.basename(made):
            os.kill(os.getpid(), signal.SIGINT)
            [None for _ in range(3)]
        return made
    tempfile.mkdtemp = mkdtemp
    """)


def test_an_interrupt_as_the_aside_folder_is_made_leaves_out_as_it_was(tmp_path):
    """Filling an existing OUT in place, one that landed inside mkdtemp -- the folder made, its name not yet
    returned -- left an empty hidden .out.replaced-PID-XXXXXXXX in OUT."""
    (tmp_path / "out").mkdir()
    proc = _entry(SIGNAL_INSIDE_MKDTEMP.format(kind="replaced") + WRITES_OUT, cwd=tmp_path)
    _assert_interrupted(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list((tmp_path / "out").iterdir()) == []


# a SIGINT to the process as soon as OUT.partial (q.partial) is made -- by its os.mkdir, inside OutputFolder.open, or by
# all of OutputFolder.open -- before the call returns: where an interrupt fell between the folder and its clean-up
SIGNAL_AS_THE_PARTIAL_FOLDER_IS_MADE = {
    "by its mkdir": """
        import os, signal
        _mkdir = os.mkdir
        def mkdir(path, *args, **kwargs):
            _mkdir(path, *args, **kwargs)
            if os.path.basename(path) == "q.partial":
                os.kill(os.getpid(), signal.SIGINT)
                [None for _ in range(3)]
        os.mkdir = mkdir
        """,
    "by OutputFolder.open": """
        import os, signal
        from klconvert.convert.output_folder import OutputFolder
        _open = OutputFolder.open
        def open_then_interrupted(self):
            taken_up = _open(self)
            os.kill(os.getpid(), signal.SIGINT)
            [None for _ in range(3)]
            return taken_up
        OutputFolder.open = open_then_interrupted
        """}


@pytest.mark.parametrize("command", ["quantize", "pull-and-quantize"])
@pytest.mark.parametrize("made", list(SIGNAL_AS_THE_PARTIAL_FOLDER_IS_MADE))
def test_an_interrupt_as_the_partial_folder_is_made_leaves_nothing(tiny_released, tmp_path, command, made):
    """One that landed as OUT.partial was made, before the clean-up took it in, left it holding only its resume
    record, and a rerun with other options was refused "holds an interrupted conversion with other options; pass
    --force" (h220's F1)."""
    args = (str(tiny_released), str(tmp_path / "q")) if command == "quantize" else (
        "--model", str(tiny_released), "--out", str(tmp_path / "q"))
    proc = _entry(SIGNAL_AS_THE_PARTIAL_FOLDER_IS_MADE[made], command, *args, "--bits", "4", "--group-size", "32")
    _assert_interrupted(proc)
    assert list(tmp_path.iterdir()) == []
    assert quantize(tiny_released, tmp_path / "q", bits=8, progress=False).shards_resumed == 0


@pytest.mark.parametrize("in_place", [False, True])
def test_an_interrupt_as_the_folder_to_fill_is_made_leaves_out_as_it_was(tmp_path, in_place):
    """One that landed inside mkdtemp -- the folder made, its name not yet returned -- left an empty hidden
    .out.partial-PID-XXXXXXXX beside OUT (or in it), which only a later run removed: synth's, export-onnx's."""
    if in_place:
        (tmp_path / "out").mkdir()
    proc = _entry(SIGNAL_INSIDE_MKDTEMP.format(kind="partial") + WRITES_OUT, cwd=tmp_path)
    _assert_interrupted(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if in_place else [])
    assert not in_place or list((tmp_path / "out").iterdir()) == []


def test_an_interrupt_as_the_lock_is_released_leaves_no_lock_file(tmp_path):
    """One that landed as OutputLock.__exit__ was entered, before its first line, left OUT.partial.lock beside the
    finished OUT (the next run took it over, saying so)."""
    proc = _entry(textwrap.dedent("""
        import signal, klconvert.entry as entry
        from klconvert.convert.output_folder import OutputLock
        def interrupted_on_entry(self, *exc):
            raise entry.Interrupted(signal.SIGINT)
        OutputLock.__exit__ = interrupted_on_entry
        """) + WRITES_OUT, cwd=tmp_path)
    _assert_interrupted(proc, complete="out")   # OUT is whole by then
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("removed", [True, False])
def test_an_output_gone_by_the_interrupt_is_not_said_complete(tmp_path, removed):
    """A tool run under the entry point (tools/tool_output.run_tool) that quantizes into a temporary folder of its own,
    then removes it, was interrupted with "(.../tmpXXXX/v0 is complete: only its path was not printed)", naming a
    folder that no longer was (h248's F1): a folder note_complete named is said only while it is there."""
    out = tmp_path / "v0"
    code = textwrap.dedent(f"""
        import os, shutil, signal, time
        from pathlib import Path
        from klconvert.entry import Uninterrupted, main, note_complete
        def command():
            out = Path({str(out)!r})
            out.mkdir()
            with Uninterrupted():
                note_complete(out)
            if {removed!r}:
                shutil.rmtree(out)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        main(command)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    _assert_interrupted(proc, complete=None if removed else out)
