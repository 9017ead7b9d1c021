"""What any test may use: the relative error of a tensor against its reference, and the klconvert command run
in this process or as a user runs it, held to the files' mode bits (as root too), or with its stderr read as a
terminal shows it."""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from klconvert.cli import main

ROOT = Path(__file__).resolve().parent.parent  # the project's root: a checkout, or an unpacked sdist


# transformers' KimiLinear takes fla-core's Triton kernels (chunk_kda, l2norm) whenever fla imports, on CPU tensors
# too, where they cannot run: a test of its PyTorch path on the CPU skips where fla is installed (CI has no fla)
TRANSFORMERS_ON_THE_CPU = pytest.mark.skipif(importlib.util.find_spec("fla") is not None,
                                             reason="fla-core is installed: transformers would run its Triton kernels "
                                                    "on these CPU tensors")


def project_files() -> set[str]:
    """The project's files, relative to its root: what git tracks, in a checkout; in an unpacked sdist, which has no
    .git, the files the sdist holds (the SOURCES.txt setuptools wrote into it)."""
    if (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return set(filter(None, tracked.decode().split("\0")))
    return set((ROOT / "klconvert.egg-info" / "SOURCES.txt").read_text().splitlines())


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS(got - ref) / RMS(ref), in fp64 on the CPU; NaN anywhere gives NaN (and fails any bound)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's own weights as klconvert bench counts them (bench.module_weights)."""
    from klconvert.bench import module_weights

    return sum(t.numel() * t.element_size() for t in module_weights(module))


def gpu_with_free(monkeypatch, free: int, total: int = 80 << 30) -> None:
    """torch.cuda as a card with `free` bytes of its `total` left by its CUDA context and other processes, and
    nothing in this process's cache: what device_memory.device_room reads, on a machine without one."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def run_cli(capsys, *args, stdin: str | None = None) -> tuple[int, str, str]:
    """Run the klconvert entry point in this process: (exit status, stdout, stderr)."""
    return run_main(capsys, main, ["klconvert", *map(str, args)], stdin=stdin)


def run_main(capsys, entry, argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    """Run a command's `entry` (its main) in this process with sys.argv `argv`: (exit status, from SystemExit or 0
    where it returns; stdout; stderr). An exception other than SystemExit leaves the test."""
    old_argv, old_stdin = sys.argv, sys.stdin
    sys.argv = argv
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    try:
        entry()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv, sys.stdin = old_argv, old_stdin
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_klconvert(*args, stdin: str | None = None, cwd=None, env: dict | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m klconvert ARGS` in a new process, as a user does (env: variables to add or, as None, drop)."""
    environ = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run([sys.executable, "-m", "klconvert", *map(str, args)], capture_output=True, text=True,
                          input=stdin, cwd=cwd, env=environ, timeout=timeout)


DAC_OVERRIDE_CAPS = "-dac_override,-dac_read_search"  # what lets root past files' mode bits, dropped


def held_to_modes() -> list[str]:
    """The command prefix that runs a command held to files' mode bits (none for a user that is not root); skips the
    test where that cannot be arranged."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and no setpriv to drop the DAC override capabilities")
    prefix = [setpriv, f"--bounding-set={DAC_OVERRIDE_CAPS}", f"--inh-caps={DAC_OVERRIDE_CAPS}"]
    try:
        works = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        works = False
    if not works:
        pytest.skip("running as root, and setpriv cannot drop the DAC override capabilities here")
    return prefix


def klconvert_held(*args, env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    """Run `python -m klconvert ARGS` held to the files' mode bits: (exit status, stderr)."""
    done = subprocess.run([*held_to_modes(), sys.executable, "-m", "klconvert", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    return done.returncode, done.stderr


def emitting_a_special(src, out, token: int, special: int):
    """A copy of the unquantized checkpoint folder `src` at `out` with the embedding's and lm_head's rows `token` and
    `special` swapped: it emits the special id wherever `src` emitted `token`, and reads it back as `src` read `token`
    (how a test makes the model end a turn on a special token, which config.json's eos ids must be)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in set(tensors) & {"model.embed_tokens.weight", "lm_head.weight"}:
            tensors[name][[token, special]] = tensors[name][[special, token]]
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


def shown_lines(err: str) -> list[str]:
    """stderr as a terminal leaves it: a carriage return overwrites the line (progress bars); blanks dropped."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit status 2 and one line on stderr, `klconvert: error: ...`, holding each needle; returns the line."""
    assert code == 2, err
    lines = shown_lines(err)
    assert len(lines) == 1 and lines[0].startswith("klconvert: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_klconvert_on_a_terminal(*args, timeout: float = 300) -> tuple[int, str, str]:
    """Run `python -m klconvert ARGS` in a new process whose stderr is a terminal: run_on_a_terminal's."""
    return run_on_a_terminal([sys.executable, "-m", "klconvert", *map(str, args)], timeout)


def run_on_a_terminal(command: list[str], timeout: float = 300, cwd=None) -> tuple[int, str, str]:
    """Run `command` in a new process (in `cwd`) whose stderr is a terminal (a pseudo-terminal, 100 columns):
    (exit status, stdout, what the terminal received: carriage returns kept, each newline as its \\r\\n)."""
    import fcntl
    import pty
    import select
    import struct
    import tempfile
    import termios
    import time

    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=terminal, cwd=cwd)
        finally:
            os.close(terminal)
        shown, deadline = bytearray(), time.monotonic() + timeout
        try:
            while True:
                if not select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    proc.kill()
                    raise TimeoutError(f"{' '.join(command)} ran past {timeout} s")
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:   # EIO: the command has ended, closing its end of the terminal
                    break
                if not chunk:
                    break
                shown += chunk
        finally:
            os.close(master)
        code = proc.wait(timeout=timeout)
        out.seek(0)
        return code, out.read().decode(), shown.decode(errors="replace")
