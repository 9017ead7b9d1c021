"""One writer per output folder: a second quantize into the same OUT is refused naming the first, which finishes
whole; a lock left by a dead run is taken over and said so."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import pytest

import klconvert.quantize as quantize_module
from klconvert.checkpoint.reader import Checkpoint
from klconvert.quantize import quantize
from quantize_helpers import break_shard_write, folder_files
from testkit import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # subprocesses under memory limits: seconds each; CI runs them

ARGS = ("--bits", "8", "--group-size", "32")


def klconvert_quantize(src, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "klconvert", "quantize", str(src), str(out), *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tiny_released, tmp_path_factory):
    """The same quantization, run alone."""
    return quantize(tiny_released, tmp_path_factory.mktemp("ref") / "q", bits=8, group_size=32, progress=False).path


def assert_same_output(out, reference) -> None:
    got, want = folder_files(out), folder_files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        if name != "README.md":  # the model card names its own folder
            assert got[name] == want[name], name
    Checkpoint(out).get("model.layers.1.block_sparse_moe.experts.0.w1.weight")


def test_a_second_writer_is_refused_and_the_first_finishes_whole(tiny_released, reference, tmp_path, monkeypatch):
    out = tmp_path / "q"
    holding, release = threading.Event(), threading.Event()
    write_shard = quantize_module.write_shard

    def slow_write_shard(*args, **kwargs):  # the first run stops inside its first shard until told to go on
        holding.set()
        assert release.wait(120)
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "write_shard", slow_write_shard)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(result=quantize(tiny_released, out, bits=8, group_size=32,
                                                                          progress=False)))
    thread.start()
    try:
        assert holding.wait(120)
        second = klconvert_quantize(tiny_released, out)
        _, err = second.communicate(timeout=120)
    finally:
        release.set()
        thread.join(120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, err
    assert f"another klconvert run (pid {os.getpid()}) is writing it" in lines[0] and "q.partial" in lines[0]
    assert first["result"].path == out
    assert_same_output(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no partial folder, no lock file


def test_two_runs_at_once_leave_one_whole_output(tiny_released, reference, tmp_path):
    out = tmp_path / "q"
    runs = [klconvert_quantize(tiny_released, out) for _ in range(2)]
    finished = [(run.returncode, err) for run in runs for _, err in [run.communicate(timeout=300)]]
    codes = sorted(code for code, _ in finished)
    assert codes == [0, 2], finished
    refused = next(err for code, err in finished if code == 2)
    assert ("another klconvert run" in refused or "is not empty (it holds " in refused), refused
    assert_same_output(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_dead_runs_lock_is_taken_over(tiny_released, reference, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "q.partial.lock").write_text(f"{dead.pid}\n")
    run = subprocess.run([sys.executable, "-m", "klconvert", "quantize", str(tiny_released), str(tmp_path / "q"),
                          *ARGS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"taking over {tmp_path / 'q.partial.lock'}, left by process {dead.pid} (no longer running)" in run.stderr
    assert_same_output(tmp_path / "q", reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_a_rerun_refused_over_a_dead_runs_partial_is_one_line(tiny_released, tmp_path, capsys, monkeypatch):
    """The dead run's lock was said taken over before the refusal: two lines on stderr (helper-152)."""
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        break_shard_write(m, 2, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            quantize(tiny_released, out, bits=4, group_size=32, max_shard_bytes=150_000, progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "q.partial.lock").write_text(f"{dead.pid}\n")
    code, _, err = run_cli(capsys, "quantize", tiny_released, out, *ARGS, "--max-shard-size", "150000")
    assert_one_line_error(code, err, f"{out}.partial: holds an interrupted conversion with other options")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.partial"]


@pytest.mark.parametrize("held", ["99999999999999999999999\n", "0\n", "-7\n", "not a pid\n", ""])
def test_a_lock_file_holding_no_pid_is_taken_over(tiny_released, reference, tmp_path, held):
    """A number past pid_t's range once overflowed os.kill: whatever is no process's id is a stale lock."""
    (tmp_path / "q.partial.lock").write_text(held)
    quantize(tiny_released, tmp_path / "q", bits=8, group_size=32, progress=False)
    assert_same_output(tmp_path / "q", reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.parametrize("kind, needle", [("folder", "(a folder)"), ("link", "(a symbolic link)"),
                                          ("fifo", "(not a regular file: a FIFO, device or socket)")])
def test_a_lock_path_that_is_no_regular_file_is_refused(tiny_released, tmp_path, capsys, kind, needle):
    """A folder there once raised IsADirectoryError; a link would have had the pid written over its target."""
    lock, target = tmp_path / "q.partial.lock", tmp_path / "precious.txt"
    target.write_text("mine")
    {"folder": lock.mkdir, "link": lambda: lock.symlink_to(target), "fifo": lambda: os.mkfifo(lock)}[kind]()
    code, _, err = run_cli(capsys, "quantize", tiny_released, tmp_path / "q", *ARGS)
    assert_one_line_error(code, err, f"{lock}: cannot use it as this output's lock file {needle}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt", "q.partial.lock"]
    assert target.read_text() == "mine"


def test_a_full_disk_at_the_lock_is_one_line_and_leaves_nothing(tiny_released, tmp_path, capsys, monkeypatch):
    """The pid was written with no try: a traceback, exit 1, an empty lock file and the folders made for OUT left."""
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("klconvert.convert.output_folder.os.pwrite", full)
    out = tmp_path / "new" / "q"
    assert_one_line_error(*run_cli(capsys, "quantize", tiny_released, out, *ARGS)[::2],
                          f"disk full writing {tmp_path / 'new' / 'q.partial.lock'} (", " free); free some space and "
                          "rerun")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, said", [
    (errno.ENOSPC, "disk full writing {lock} (1,000 bytes free); free some space and rerun"),
    (errno.EIO, "cannot write {lock} (Input/output error): its disk or file system failed the write -- check it "
                "(the kernel's log, dmesg), or write to another disk and rerun"),
], ids=["disk-full", "io-error"])
def test_a_lock_file_that_cannot_be_made_is_one_line_and_leaves_nothing(tiny_released, tmp_path, capsys, monkeypatch,
                                                                        error, said):
    """The lock's open failing (a disk with no inode left, a failing disk), before anything is written: h182 found no
    test of it."""
    lock = tmp_path / "new" / "q.partial.lock"
    real_open = os.open

    def failing(path, *args, **kwargs):
        if os.fspath(path) == str(lock):
            raise OSError(error, os.strerror(error), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing)
    monkeypatch.setattr("klconvert.disk_space.free_disk_bytes", lambda folder: 1000)
    code, out, err = run_cli(capsys, "quantize", tiny_released, tmp_path / "new" / "q", *ARGS)
    assert assert_one_line_error(code, err) == f"klconvert: error: {said.format(lock=lock)}"
    assert out == "" and list(tmp_path.iterdir()) == []


def test_a_lock_file_whose_pid_cannot_be_written_is_one_line_and_leaves_nothing(tiny_released, tmp_path, capsys,
                                                                                monkeypatch):
    """The pid's write failing on a failing disk (a full one: test_a_full_disk_at_the_lock_is_one_line_...)."""
    def failing(fd, data, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("klconvert.convert.output_folder.os.pwrite", failing)
    code, out, err = run_cli(capsys, "quantize", tiny_released, tmp_path / "new" / "q", *ARGS)
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: cannot write {tmp_path / 'new' / 'q.partial.lock'} (Input/output error): its disk or file "
        "system failed the write -- check it (the kernel's log, dmesg), or write to another disk and rerun")
    assert out == "" and list(tmp_path.iterdir()) == []
