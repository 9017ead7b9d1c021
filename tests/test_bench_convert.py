"""bench/convert.py at its edges: what it is given is checked before the first `klconvert synth`, which writes
gigabytes (--layers 0 was synth's refusal followed by `time -v`'s 25 lines of figures, --bits 3 quantize's after the
synth, a missing --workdir a traceback), a command that fails is its own last line, and SIGTERM stops the command it
runs and removes its folder (it left an empty klconvert-bench-* folder, and the command running)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONVERT = Path(__file__).resolve().parent.parent / "bench" / "convert.py"

# convert.py with `klconvert` replaced by `command`, checkpoints of no size: (its main run with `args`)
_STANDIN = """import sys
sys.path.insert(0, {bench!r})
import convert
convert.KLCONVERT = [sys.executable, "-c", {command!r}]
convert.FIXED_BYTES = convert.LAYER_BYTES = 0
sys.argv = ["convert.py", *{args!r}]
convert.main()
"""


def _with_command(command: str, *args: str, cwd: Path) -> subprocess.Popen:
    code = _STANDIN.format(bench=str(CONVERT.parent), command=command, args=list(args))
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_arguments_are_refused_before_any_synth(tmp_path):
    (tmp_path / "afile").write_text("")
    for args, line in ((["--layers", "0"], "argument --layers: '0' is not a whole number of at least 1"),
                       (["--layers", "2", "28"], "--layers 28: preset kimi-linear-48b has only 27 layers"),
                       (["--bits", "3"], "argument --bits: invalid choice: 3 (choose from 4, 8)"),
                       (["--workdir", "missing"], "--workdir missing: no such folder"),
                       (["--workdir", "afile"], "--workdir afile: not a folder")):
        proc = subprocess.run([sys.executable, str(CONVERT), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == f"convert.py: error: {line}", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.slow
def test_a_failing_command_is_its_own_last_line(tmp_path):
    proc = _with_command("import sys; print('warming up', file=sys.stderr); sys.exit('klconvert: error: no room')",
                         "--layers", "1", "--workdir", str(tmp_path), cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert err.endswith(" failed (1): klconvert: error: no room\n") and not list(tmp_path.iterdir()), err


@pytest.mark.slow
def test_sigterm_stops_the_command_and_removes_its_folder(tmp_path):
    started = tmp_path / "started"   # the command's pid, once it runs
    proc = _with_command(f"import os, time; open({str(started)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
                         "--layers", "1", "--workdir", str(tmp_path), cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (started.exists() and started.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    command = int(started.read_text())
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("klconvert-bench-")]) == 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and err == "convert.py: interrupted\n", err
    assert [p.name for p in tmp_path.iterdir()] == ["started"]
    deadline = time.monotonic() + 10   # stopped with it, not left running (an orphan, reaped by init)
    while Path(f"/proc/{command}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{command}").exists()
