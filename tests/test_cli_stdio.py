"""What the `klconvert` command does with standard streams it cannot use, a working folder that is gone and a file name
that is not UTF-8: a standard output that cannot be written is one line and status 2 (its reader gone, as after `|
head`: no line, 141, what a shell shows for a command SIGPIPE ended); a message standard error cannot show is dropped,
the status unchanged; a closed standard input read as `--prompt-file -` is one line; and messages name what the user
typed. The streams' cases run through the entry point in this process, its streams real files, and once from a shell."""
from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from klconvert import entry
from klconvert.models import bundled_dir
from testkit import assert_one_line_error, run_cli, run_klconvert

PLAN = ("plan", "--model", "tiny")   # a few lines on stdout, no model loaded
RUN = ("run", "--model", "tiny", "--prompt", "ROMEO.", "--max-new-tokens", "4", "--device", "cpu")


def run_entry(monkeypatch, *args, stdin="keep", stdout, stderr) -> int:
    """The entry point with these standard streams (None: closed; "keep" for stdin: the test's): its exit status."""
    monkeypatch.setattr(sys, "argv", ["klconvert", *map(str, args)])
    if stdin != "keep":
        monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", stderr)
    try:
        entry.main()
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture
def err_file(tmp_path):
    with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as f:
        yield f


def written(f) -> str:
    return Path(f.name).read_text(encoding="utf-8")


@pytest.fixture
def broken_pipe():
    """A pipe's writing end, its reader gone: a write fails with EPIPE (Python ignores SIGPIPE)."""
    read, write = os.pipe()
    os.close(read)
    with open(write, "w", encoding="utf-8") as f:
        yield f


@pytest.mark.parametrize("args", [PLAN, ("--help",), ("run", "--help")])
def test_a_full_standard_output_is_one_line(monkeypatch, err_file, args):
    with open("/dev/full", "w", encoding="utf-8") as full:
        code = run_entry(monkeypatch, *args, stdout=full, stderr=err_file)
    assert_one_line_error(code, written(err_file),
                          "klconvert: error: cannot write standard output (No space left on device)")


def test_a_closed_standard_output_is_one_line(monkeypatch, err_file):
    code = run_entry(monkeypatch, *PLAN, stdout=None, stderr=err_file)
    assert_one_line_error(code, written(err_file), "cannot write standard output (it is closed)")


def test_a_non_blocking_standard_output_waits_for_its_reader():
    """A pipe left non-blocking (a parent's O_NONBLOCK) and full failed the command ("cannot write standard output
    (Resource temporarily unavailable)") while its reader was merely slow (h170): the write waits for it."""
    import threading
    import time

    read, write = os.pipe()
    os.set_blocking(write, False)
    got = []

    def slow_reader():
        time.sleep(0.5)
        with open(read, "rb") as f:
            got.append(f.read())
    reader = threading.Thread(target=slow_reader)
    reader.start()
    text = "ROMEO. But soft, what light through yonder window breaks?\n" * 10_000   # past a pipe's 64 KiB
    with open(write, "w", encoding="utf-8") as out:
        stdout = entry._standard(out, raises=True)   # as the entry point wraps sys.stdout
        stdout.write(text)
        stdout.flush()
    reader.join(timeout=30)
    assert got == [text.encode()]


@pytest.mark.parametrize("command, stdout, reason", [(("quantize", "tiny", "{out}", "--bits", "4"), "/dev/full",
                                                      "No space left on device"),
                                                     (("synth", "--preset", "tiny", "--out", "{out}"), "/dev/full",
                                                      "No space left on device"),
                                                     (("export-onnx", "--model", "tiny", "--out", "{out}"), None,
                                                      "it is closed")])
def test_a_standard_output_that_fails_after_out_is_whole_says_it_is_complete(monkeypatch, tmp_path, err_file, command,
                                                                             stdout, reason):
    """The line said only "cannot write standard output": a user took the finished OUT for a failed conversion, to
    delete or write again (helper-133)."""
    out = tmp_path / "out"
    with open(stdout, "w", encoding="utf-8") if stdout else contextlib.nullcontext() as f:
        code = run_entry(monkeypatch, *(arg.format(out=out) for arg in command), stdout=f, stderr=err_file)
    lines = written(err_file).splitlines()
    assert code == 2 and "Traceback" not in written(err_file), written(err_file)
    assert lines[-1] == (f"klconvert: error: cannot write standard output ({reason}); redirect it somewhere that can "
                         f"take it ({out} is complete: only its path was not printed)")
    assert out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "stderr.txt"]


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_a_path_standard_output_cannot_encode_is_one_line(monkeypatch, tmp_path, err_file, encoding):
    """Under PYTHONIOENCODING=latin-1 (or cp1252) a quantize into q→ ended, OUT whole, in a UnicodeEncodeError
    traceback and status 1 (h282). The path is not printed with the arrow replaced (a script would take another
    path): one line names what the encoding lacks and how to get UTF-8, and says OUT is complete."""
    out = tmp_path / "q→"
    with open(tmp_path / "stdout.txt", "w", encoding=encoding) as stdout:
        code = run_entry(monkeypatch, "quantize", "tiny", out, stdout=stdout, stderr=err_file)
    line = written(err_file).splitlines()[-1]   # after quantize's summary
    assert code == 2 and "Traceback" not in written(err_file), written(err_file)
    assert line.startswith(f"klconvert: error: standard output's encoding, {encoding}, has no U+2192, which the "
                           "command printed; set PYTHONIOENCODING=utf-8"), line
    assert line.endswith(f" ({out} is complete: only its path was not printed)"), line
    assert out.is_dir() and (tmp_path / "stdout.txt").read_text(encoding=encoding) == ""


def test_a_report_standard_output_cannot_encode_shows_the_character_as_a_question_mark(monkeypatch, tmp_path,
                                                                                       err_file):
    """plan's report, whose title names the folder as given, is for people, as run's text is: a character the
    encoding has not shows as ?, where the report was lost whole to a refusal (eval's, after both models ran)."""
    (tmp_path / "q→").symlink_to(bundled_dir())
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "stdout.txt", "w", encoding="latin-1") as stdout:
        code = run_entry(monkeypatch, "plan", "--model", "q→", stdout=stdout, stderr=err_file)
    assert code == 0 and written(err_file) == ""
    assert "q?" in (tmp_path / "stdout.txt").read_text(encoding="latin-1")


@pytest.mark.parametrize("args", [PLAN, RUN])
def test_a_reader_that_is_gone_ends_the_command_quietly(monkeypatch, err_file, broken_pipe, args):
    assert run_entry(monkeypatch, *args, stdout=broken_pipe, stderr=err_file) == 141
    assert written(err_file) == ""


def test_messages_standard_error_cannot_show_change_no_status(monkeypatch, tmp_path, broken_pipe):
    assert run_entry(monkeypatch, "plan", stdout=sys.stdout, stderr=broken_pipe) == 2   # bad input: still 2
    for stderr in (broken_pipe, None):   # a run whose summary line (and the rest) cannot be shown: still 0
        with open(tmp_path / "out.txt", "w", encoding="utf-8") as out:
            assert run_entry(monkeypatch, *RUN, stdout=out, stderr=stderr) == 0
        assert (tmp_path / "out.txt").read_text(encoding="utf-8").strip()


def test_a_closed_standard_input(monkeypatch, err_file):
    code = run_entry(monkeypatch, "run", "--model", "tiny", "--prompt-file", "-", stdin=None, stdout=sys.stdout,
                     stderr=err_file)
    assert_one_line_error(code, written(err_file), "--prompt-file -: standard input is closed")


def test_a_working_folder_that_is_gone(capsys, tmp_path, monkeypatch):
    """torch's import failed in one ("Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"), before any line."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert_one_line_error(*run_cli(capsys, *PLAN)[::2], "the current folder no longer exists; cd to an existing")


def test_a_file_name_that_is_not_utf8(capsys, tmp_path, monkeypatch):
    """Refused by what is wrong with it (its bytes are not UTF-8 text), not as a control character; the line stays
    printable, the name in it written with the byte it names as an escape, caf\\xe9.txt (it was Python's repr,
    'caf\\udce9.txt', h319). Under an ASCII locale (LC_ALL=C, Python's UTF-8 coercion off) a UTF-8 name is refused
    too, and the line says a UTF-8 locale reads it (helper-135: it said only "rename it")."""
    monkeypatch.chdir(tmp_path)
    name = os.fsdecode(b"caf\xe9.txt")
    Path(name).write_text("ROMEO. What light", encoding="utf-8")
    line = assert_one_line_error(*run_cli(capsys, "run", "--model", "tiny", "--prompt-file", name)[::2],
                                 "'--prompt-file': caf\\xe9.txt: its name is not UTF-8 (byte 0xE9)", "rename it")
    assert line.isprintable() and "control character" not in line and "locale" not in line
    Path("café.txt").write_text("ROMEO. What light", encoding="utf-8")
    ascii_locale = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    for given, shown, byte, locale in ((name, "caf\\xe9.txt", "0xE9", False),
                                       ("café.txt", "caf\\xc3\\xa9.txt", "0xC3", True)):   # the bytes, as escapes
        done = run_klconvert("run", "--model", "tiny", "--prompt-file", given, env=ascii_locale, timeout=120)
        line = assert_one_line_error(done.returncode, done.stderr, f"{shown}: its name is not ASCII (byte {byte})",
                                     "rename it")
        assert ("rename it or run under a UTF-8 locale (e.g. LC_ALL=C.UTF-8)" in line) == locale, line


def test_errors_name_the_model_as_it_was_given(capsys, tmp_path, monkeypatch):
    """`tiny`, given or the default, is not shown as the install path, nor ./tiny as tiny."""
    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(*run_cli(capsys, "run", "--model", "tiny", "--engine", "onnxruntime", "--prompt",
                                          "hi")[::2], "klconvert: error: tiny: no genai_config.json here")
    assert str(bundled_dir()) not in line, line
    # with no --model the bundled model runs, and is named as --model names it (h170: it was the install path)
    line = assert_one_line_error(*run_cli(capsys, "run", "--engine", "onnxruntime", "--prompt", "hi")[::2],
                                 "klconvert: error: tiny: no genai_config.json here")
    assert str(bundled_dir()) not in line, line
    assert_one_line_error(*run_cli(capsys, "run", "--model", "./tiny", "--prompt", "hi")[::2],
                          "klconvert: error: --model ./tiny: no such folder")


def test_an_eval_of_another_architecture_names_the_reference_as_given(capsys, tiny_released, tmp_path):
    (tmp_path / "p.txt").write_text("ROMEO. What light", encoding="utf-8")
    line = assert_one_line_error(*run_cli(capsys, "eval", "--model", tiny_released, "--reference", "tiny",
                                          "--text-file", tmp_path / "p.txt")[::2])
    assert "is not the same architecture as --reference tiny (" in line and str(bundled_dir()) not in line, line


def test_standard_input_is_named_as_given(capsys, tmp_path, monkeypatch):
    """--prompt-file - in every message about it (one said `standard input`, another `-`)."""
    for text, args, needle in (("", (), "--prompt-file -: the prompt is empty"),
                               ("word " * 500, ("--max-context", "100"), "the prompt of --prompt-file - (")):
        (tmp_path / "in.txt").write_text(text, encoding="utf-8")
        with open(tmp_path / "in.txt", encoding="utf-8") as stdin:
            monkeypatch.setattr(sys, "stdin", stdin)
            assert_one_line_error(*run_cli(capsys, "run", "--model", "tiny", "--prompt-file", "-",
                                           "--max-new-tokens", "8", *args)[::2], needle)


@pytest.mark.slow
def test_standard_streams_from_a_shell(tmp_path):
    """As a user's shell leaves them: closed (>&-, 2>&-, <&-), full (/dev/full), a reader gone (| head)."""
    (tmp_path / "p.txt").write_text("ROMEO. What light", encoding="utf-8")
    k = f"{sys.executable} -m klconvert run --model tiny --device cpu --max-new-tokens 300 --prompt-file"

    def sh(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=tmp_path, timeout=300)

    for line, needle in ((f"{k} p.txt >/dev/full", "(No space left on device)"), (f"{k} p.txt >&-", "(it is closed)"),
                         (f"{k} - <&-", "--prompt-file -: standard input is closed")):
        proc = sh(line)
        assert_one_line_error(proc.returncode, proc.stderr, needle)
    proc = sh(f"{k} p.txt 2>&- >out.txt")
    assert proc.returncode == 0 and (tmp_path / "out.txt").read_text().strip()
    proc = sh(f"{k} p.txt | head -c 10 >/dev/null; echo \"${{PIPESTATUS[0]}}\"")
    assert proc.stdout == "141\n" and proc.stderr == "", proc.stderr


@pytest.mark.parametrize("closed", ["<&-", ">&-", "2>&-", "<&- >&- 2>&-"])
def test_a_closed_standard_descriptor_is_no_file_of_the_command(tmp_path, closed):
    """A file the command opened took the closed descriptor's number, so what C code wrote to it (a library's
    warning on descriptor 2) landed in that file; and a child the command started had it closed as well."""
    code = textwrap.dedent("""
        import os, subprocess, sys
        from klconvert import entry
        def cli():
            with open("out.txt", "w") as f:
                f.write("the file\\n")
                f.flush()
                for fd in (0, 1, 2):
                    os.write(fd, b"what C code writes\\n")
            child = subprocess.run([sys.executable, "-c", "import os\\nfor fd in 0, 1, 2: os.fstat(fd)"])
            sys.exit(child.returncode)
        entry._run = lambda ctrl_c, command: cli()
        entry.main()
        """)
    proc = subprocess.run(["bash", "-c", f'"$0" -c "$1" {closed}', sys.executable, code], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.txt").read_text() == "the file\n"


def test_an_unbuffered_python_keeps_its_streams_unbuffered():
    """Under python -u (PYTHONUNBUFFERED, common in containers) Python's streams write at once; the entry point's
    wrappers held up to 8 KiB of each, so stderr's notices came at the end and `run`'s texts after its summary."""
    code = ("import sys, time\nfrom klconvert import entry\n"
            "def cli():\n    print('to stderr', file=sys.stderr)\n    sys.stdout.write('to stdout, no newline')\n"
            "    time.sleep(30)\n"
            "entry._run = lambda ctrl_c, command: cli()\nentry.main()\n")
    child = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:   # each there long before the child's 30 s are up (its exit flushed what was held)
        for pipe, written in ((child.stderr, b"to stderr\n"), (child.stdout, b"to stdout, no newline")):
            got = b""
            while len(got) < len(written):   # print writes its text and its newline apart
                assert select.select([pipe], [], [], 15)[0], (written, got)
                got += os.read(pipe.fileno(), 100)
            assert got == written
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
