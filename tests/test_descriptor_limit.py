"""Out of file descriptors (`ulimit -n`), wherever it strikes -- safetensors opening a shard, the chat template's
child, onnxruntime's import or run, a write test -- is one line naming the limit and how to raise it, exit status 2:
never a traceback, nor a line that blames the files (download the checkpoint again, export the folder again).

Each command runs in a child that uses up its descriptors right before the call named (all but `spare` below a
limit of LIMIT), so the refusal strikes there whatever the libraries opened before."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from klconvert import errors
from klconvert.onnx.export import export_onnx

LIMIT = 64
LINE = (rf"^klconvert: error: (.*: )?out of file descriptors: the process may open {LIMIT} files at once "
        rf"\(ulimit -n {LIMIT}\); raise the limit \(e\.g\. ulimit -n 1024\) and rerun$")

# a child's exhaust(spare): all its descriptors but `spare` used up, under a limit of LIMIT
EXHAUST = textwrap.dedent(f"""
    import os, resource

    def exhaust(spare):
        resource.setrlimit(resource.RLIMIT_NOFILE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        for fd in held[len(held) - spare:]:
            os.close(fd)
""")

# argv: spare, module:attribute to wrap, the first argument it must be called with ('' for any), klconvert's args
DRIVER = EXHAUST + textwrap.dedent("""
    import importlib, sys
    import torch, safetensors, klconvert.cli, klconvert.entry, klconvert.checkpoint.reader  # noqa: not what is tried
    spare, target, first, args = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
    module, name = target.split(":")
    owner = importlib.import_module(module)
    real = getattr(owner, name)

    def exhausting(*a, **k):
        if not first or (a and a[0] == first):
            exhaust(spare)
        return real(*a, **k)

    setattr(owner, name, exhausting)
    sys.argv = ["klconvert", *args]
    klconvert.entry.main()
""")


def klconvert_exhausted(spare: int, target: str, *args, first: str = "", cwd: Path | None = None):
    return subprocess.run([sys.executable, "-c", DRIVER, str(spare), target, first, *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def assert_descriptor_line(done) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and lines, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("klconvert: error: "), done.stderr[-2000:]
    assert re.fullmatch(LINE, lines[0]), lines[0]


def test_a_shard_opened_out_of_descriptors_is_not_called_damaged(tmp_path):
    """ulimit -n 5 and 6 on quantize: safetensors said the shard was not there ('No such file or directory ...;
    download the checkpoint again', for a 98 GB download that is whole) with no descriptor left, and raised a
    RuntimeError (a traceback, exit status 1) with one. A tensor's read now holds one descriptor while it lasts."""
    done = klconvert_exhausted(0, "klconvert.checkpoint.reader:open_regular", "quantize", "tiny", tmp_path / "q4",
                               "--bits", "4")
    assert_descriptor_line(done)
    assert ".safetensors: out of file descriptors" in done.stderr
    done = klconvert_exhausted(1, "klconvert.checkpoint.reader:open_regular", "quantize", "tiny", tmp_path / "q4",
                               "--bits", "4")
    assert done.returncode == 0 and (tmp_path / "q4" / "config.json").is_file(), done.stderr[-2000:]


def test_export_out_of_descriptors_leaves_nothing_the_next_run_keeps(tmp_path):
    """ulimit -n 5 on export-onnx: a traceback, and a hidden .OUT.partial-* folder left. With no descriptor left to
    remove it, the marked temporary is left for the next run, which removes it."""
    done = klconvert_exhausted(0, "klconvert.checkpoint.reader:open_regular", "export-onnx", "--model", "tiny", "--out",
                               tmp_path / "e")
    assert_descriptor_line(done)
    assert not (tmp_path / "e").exists()
    export_onnx("tiny", tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


REMOVE_WITH_ONE_DESCRIPTOR = EXHAUST + textwrap.dedent("""
    import shutil, sys
    from pathlib import Path
    from klconvert.convert.output_folder import _remove_tree
    tops = [Path(sys.argv[1]), Path(sys.argv[2])]
    for top in tops:
        for folder in (top / "a" / "b" / "c", top / "d"):
            folder.mkdir(parents=True)
            (folder / "f").write_bytes(b"x")
    exhaust(1)
    try:
        shutil.rmtree(tops[0])
    except OSError as e:
        print("rmtree:", e.strerror)
    _remove_tree(tops[1])
    print("left:", *[top.name for top in tops if top.exists()])
""")


def test_a_temporary_is_removed_with_one_descriptor_free(tmp_path):
    """whole_folder's cleanup of a run out of descriptors: shutil.rmtree holds two a level, so it failed where one was
    free and left the hidden temporary; _remove_tree holds one at a time."""
    done = subprocess.run([sys.executable, "-c", REMOVE_WITH_ONE_DESCRIPTOR, tmp_path / "rmtree", tmp_path / "ours"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "rmtree: Too many open files\nleft: rmtree\n"


@pytest.mark.parametrize("spare", [0, 2])
def test_the_chat_template_child_out_of_descriptors(spare):
    """ulimit -n 5 to 11 on run --chat: subprocess.run's os.pipe raised OSError EMFILE, a traceback."""
    done = klconvert_exhausted(spare, "subprocess:run", "run", "--model", "tiny", "--prompt", "hi",
                               "--max-new-tokens", "2", "--chat")
    assert_descriptor_line(done)


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("descriptors") / "onnx"
    export_onnx("tiny", out)
    return out


def test_importing_onnxruntime_out_of_descriptors(onnx_folder):
    """ulimit -n 6 on run --engine onnxruntime: the import's OSError EMFILE went past require's ImportError, a
    traceback."""
    done = klconvert_exhausted(0, "importlib:import_module", "run", "--model", onnx_folder, "--engine", "onnxruntime",
                               "--prompt", "hi", "--max-new-tokens", "2", first="onnxruntime")
    assert_descriptor_line(done)
    assert "importing onnxruntime" in done.stderr


@pytest.mark.parametrize("spare", [0, 1])
def test_an_onnx_run_out_of_descriptors_is_not_called_a_bad_export(spare, onnx_folder):
    """ulimit -n 7 on run --engine onnxruntime: 'onnxruntime failed running it ([Errno 24] Too many open files);
    export the folder again'."""
    done = klconvert_exhausted(spare, "klconvert.onnx.session:interruptible", "run", "--model", onnx_folder,
                               "--engine", "onnxruntime", "--prompt", "hi", "--max-new-tokens", "2")
    assert_descriptor_line(done)
    assert "export the folder again" not in done.stderr


def test_the_output_write_test_out_of_descriptors(tmp_path):
    """ulimit -n 4 on export-onnx: 'cannot create files in the folder it goes in (Too many open files); choose a
    folder you can write to', of a folder that takes files."""
    done = klconvert_exhausted(0, "klconvert.whole_folder:make_parent", "export-onnx", "--model", "tiny", "--out",
                               tmp_path / "e")
    assert_descriptor_line(done)
    assert f"{tmp_path / 'e'}: out of file descriptors" in done.stderr


@pytest.mark.parametrize("read", ["recipe", "prompt file"])
def test_a_file_read_out_of_descriptors_is_not_blamed(read, tmp_path):
    """ulimit -n at a read whose own message names the file: 'cannot read the recipe (Too many open files); check the
    --recipe path', 'cannot read it (Too many open files); check the path' -- of files that are there and readable."""
    given = tmp_path / "given.txt"
    if read == "recipe":
        given.write_text((Path(__file__).parents[1] / "recipes" / "32gb.yaml").read_text())
        done = klconvert_exhausted(0, "klconvert.quant.recipe:open_regular", "quantize", "tiny", tmp_path / "q4",
                                   "--recipe", given)
    else:
        given.write_text("Friends, Romans, countrymen")
        done = klconvert_exhausted(0, "builtins:open", "run", "--model", "tiny", "--prompt-file", given,
                                   "--max-new-tokens", "2", first=str(given))
    assert_descriptor_line(done)
    assert "check the" not in done.stderr
    assert not (tmp_path / "q4").exists()


@pytest.mark.parametrize(("number", "limits", "said"), [
    (errno.EMFILE, (8, 4096), "may open 8 files at once (ulimit -n 8); raise the limit (e.g. ulimit -n 1024)"),
    (errno.EMFILE, (1000, 4096), "may open 1,000 files at once (ulimit -n 1000); raise the limit (e.g. ulimit -n "
                                 "2000)"),
    (errno.EMFILE, (8, 512), "raise the limit (e.g. ulimit -n 512, its hard limit)"),
    (errno.EMFILE, (8, 8), "raise the limit (e.g. ulimit -n 1024: its hard limit, ulimit -Hn, is 8 too, which only "
                           "root may raise)"),
    (errno.ENFILE, (8, 4096), "the system is out of file descriptors (its limit for all processes together, "
                              "fs.file-max); close other programs, or raise it (sysctl fs.file-max)"),
])
def test_the_line_names_what_bounds_the_descriptors(number, limits, said, monkeypatch):
    """The limit a user can raise is named with a value that raises it: the soft limit up to the hard one, past it
    only as root; the whole system's limit (ENFILE) is no ulimit's."""
    monkeypatch.setattr(errors.resource, "getrlimit", lambda which: limits)
    line = str(errors.descriptors_exhausted(OSError(number, os.strerror(number)), "f.safetensors"))
    assert line.startswith("f.safetensors: ") and line.endswith(f"{said} and rerun"), line
    # a library's error in the system's words, with no errno (safetensors' RuntimeError)
    assert str(errors.descriptors_exhausted(RuntimeError(f"unable to open file: {os.strerror(number)} ({number})"),
                                            "f.safetensors")) == line
    assert errors.descriptors_exhausted(OSError(errno.ENOENT, "No such file or directory")) is None
