"""klconvert.whole_folder, how synth, export-onnx and the tools write a folder: whole or not at all, one writer at a
time, what a killed run left removed by the next, a failed write one line, the folder in the umask's usual modes."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from klconvert.errors import KLError
from klconvert.whole_folder import whole_folder


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_the_folder_gets_the_umasks_usual_modes(tmp_path, umask_022):
    """The tools' folders were left 0700 (mkdtemp's) with 0600 shards."""
    out = tmp_path / "out"
    with whole_folder(out) as folder:
        os.close(os.open(folder / "shard.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
        (folder / "sub").mkdir(mode=0o700)
    assert _mode(out) == 0o755 and _mode(out / "sub") == 0o755 and _mode(out / "shard.safetensors") == 0o644


def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(KLError, match=rf"^disk full writing {out / 'x'} \(.* free\); free some space and rerun "
                                      rf"\(nothing was written to {out}\)$"):
        with whole_folder(out) as folder:
            (folder / "x").write_bytes(b"part")
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "x"))
    assert list(tmp_path.iterdir()) == []   # the folders made for OUT, the lock and the hidden folder are gone


def test_a_second_writer_is_refused_and_the_first_finishes(tmp_path):
    out = tmp_path / "out"
    with whole_folder(out) as folder:
        (folder / "mine").write_text("first")
        with pytest.raises(KLError, match=rf"out: another klconvert run \(pid {os.getpid()}\) is writing it"):
            with whole_folder(out):
                pass
    assert (out / "mine").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_that_appears_at_out_meanwhile_is_never_renamed_over(tmp_path):
    """os.replace took an empty folder made at OUT while writing, silently."""
    out = tmp_path / "out"
    with pytest.raises(KLError, match="out: appeared while writing it; move it away and rerun"):
        with whole_folder(out) as folder:
            (folder / "x").write_text("ours")
            out.mkdir()
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_is_taken(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with whole_folder(out) as folder:
        (folder / "x").write_text("ours")
    assert (out / "x").read_text() == "ours"


def test_what_a_killed_run_left_is_removed_by_the_next(tmp_path):
    """A killed synth left .OUT.partial-XXXX (up to 98 GB) for ever: now named with its writer's pid and marked,
    removed by the next run on OUT once that process is gone; a live process's, a folder so named without the mark
    (a user's own), and names that are no temporary of ours, stay."""
    from klconvert.convert.output_folder import mark_temporary

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = (f".out.partial-{dead.pid}-abcd_123", f".out.replaced-{dead.pid}-x1y2z3w4",
             f".out.partial-{os.getpid()}-abcdefgh", ".out.partial-notes", f".other.partial-{dead.pid}-abcdefgh",
             f".out.partial-{dead.pid}-draft_v2")
    left = {name: tmp_path / name for name in names}
    for folder in left.values():
        folder.mkdir()
        (folder / "shard").write_bytes(b"x" * 100)
        if not folder.name.endswith("draft_v2"):   # the user's own folder, named like a temporary by chance
            mark_temporary(folder)
    with whole_folder(tmp_path / "out") as folder:
        assert [p.name for p in folder.iterdir()] == [".klconvert-temporary"]   # a run's own temporary is marked
        (folder / "x").write_text("ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *list(left)[2:]])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x"]   # the mark is gone from what it wrote


def test_an_empty_folder_is_filled_in_place_with_the_marker_last(tmp_path, monkeypatch, umask_022):
    """An empty OUT (a mount point, which no rename replaces: export-onnx failed there with EBUSY) keeps its inode and
    mode; its files are moved up into it, the file that says the folder is whole last."""
    out = tmp_path / "out"
    out.mkdir(mode=0o750)
    before = out.stat().st_ino
    moves = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (moves.append(os.path.basename(b)), real_rename(a, b)))
    with whole_folder(out, last="genai_config.json") as folder:
        assert folder.parent == out
        for name in ("genai_config.json", "model.onnx", "a.json"):
            (folder / name).write_text(name)
    assert out.stat().st_ino == before and _mode(out) == 0o750
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "genai_config.json", "model.onnx"]
    assert moves[-1] == "genai_config.json" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_in_place_leaves_the_folder_empty_and_a_killed_ones_leftover_is_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KLError, match="disk full"):
        with whole_folder(out) as folder:
            (folder / "x").write_text("part")
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "x"))
    assert list(out.iterdir()) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".out.partial-{dead.pid}-abcdefgh").mkdir()   # what a run killed while writing in place leaves
    with whole_folder(out) as folder:
        (folder / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_failed_put_back_keeps_the_earlier_folder_under_a_name_no_run_removes(tmp_path, monkeypatch):
    """Moved aside under a hidden temporary name, the earlier OUT was a dead run's leftover to the next run."""
    from klconvert.whole_folder import Replaceable

    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier").write_text("keep me")
    anything = Replaceable("an earlier folder", lambda folder: True)
    real_rename = os.rename

    def rename(a, b):   # OUT taken by someone between the move aside and the rename of the new folder
        if os.path.basename(a).startswith(".out.partial-"):
            os.mkdir(out)
            (out / "theirs").write_text("theirs")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KLError, match=r"out: taken while replacing it; the earlier out is kept as .*out\.earlier-"):
        with whole_folder(out, force=True, replaceable=anything) as folder:
            (folder / "config.json").write_text("{}")
    (kept,) = tmp_path.glob("out.earlier-*")
    assert (kept / "earlier").read_text() == "keep me" and (out / "theirs").read_text() == "theirs"


def test_a_name_too_long_for_what_is_made_beside_it_is_refused_up_front(tmp_path):
    """train_bundled's up-front refuse_taken passed it, and whole_folder refused it after the training."""
    from klconvert.whole_folder import refuse_taken

    with pytest.raises(KLError, match="its name is too long .* choose a name of at most 223 bytes"):
        refuse_taken(tmp_path / ("m" * 230))
    assert list(tmp_path.iterdir()) == []


def test_a_relative_empty_out_is_filled_in_place(tmp_path, monkeypatch):
    """Python 3.12's mkdtemp returns an absolute path where OUT's entries are relative: the in-place check compared
    the two and failed every such run after its work."""
    monkeypatch.chdir(tmp_path)
    Path("out").mkdir()
    real_mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: os.path.abspath(real_mkdtemp(**kw)))   # 3.12's, on any
    with whole_folder(Path("out")) as folder:
        (folder / "config.json").write_text("{}")
    assert sorted(p.name for p in Path("out").iterdir()) == ["config.json"]


def test_a_leftover_inside_out_whose_pid_runs_again_is_removed_before_the_work(tmp_path):
    """A container's runs share a pid (1): a marked leftover inside OUT under this very pid passed the first check,
    was kept as a live run's, and failed the run after its body."""
    from klconvert.convert.output_folder import mark_temporary

    out = tmp_path / "out"
    leftover = out / f".out.partial-{os.getpid()}-abcdefgh"
    leftover.mkdir(parents=True)
    (leftover / "shard").write_bytes(b"x")
    mark_temporary(leftover)
    with whole_folder(out) as folder:
        (folder / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_an_interrupt_while_moving_in_leaves_out_empty_not_looking_complete(tmp_path, monkeypatch):
    """An interrupt between a move and its record left config.json alone in OUT."""
    out = tmp_path / "out"
    out.mkdir()
    real_rename = os.rename

    def rename(a, b):
        real_rename(a, b)
        if os.path.basename(b) == "config.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with whole_folder(out) as folder:
            for name in ("config.json", "model.safetensors"):
                (folder / name).write_text(name)
    assert list(out.iterdir()) == []


def test_a_run_killed_before_its_folder_is_in_place_leaves_it_marked(tmp_path, monkeypatch):
    """The mark went before the moves and the rename: a kill there left an unmarked temporary no run removed (in
    place, one that refused every rerun)."""
    import klconvert.whole_folder as whole_folder_module
    from klconvert.convert.output_folder import TEMPORARY_MARKER

    out = tmp_path / "out"
    out.mkdir()

    def killed(folder):
        raise SystemExit("killed")   # stands for the kill: what is on disk now is what a kill leaves

    monkeypatch.setattr(whole_folder_module, "give_usual_modes", killed)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)   # a kill runs no clean-up
    with pytest.raises(SystemExit):
        with whole_folder(out) as folder:
            (folder / "config.json").write_text("{}")
    (left,) = out.iterdir()
    assert (left / TEMPORARY_MARKER).is_file()
