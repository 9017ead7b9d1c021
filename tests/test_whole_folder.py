"""klconvert.whole_folder, how synth, export-onnx and the tools write a folder: whole or not at all, one writer at a
time, what a killed run left removed by the next, a failed write one line, the folder in the umask's usual modes."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from klconvert.convert.output_folder import OUTPUT_RECORD, write_output_record
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


def test_the_runs_own_folders_are_usable_under_a_umask_without_the_owners_rights(tmp_path, monkeypatch):
    """mkdtemp's 0700 is masked by the umask: under 0777 the hidden folder was mode 000, which a run not root could
    neither write nor remove, left beside OUT (helper-135). Each folder the run makes is its own (0700) while written
    (the folder filled, and the one earlier entries are moved aside into); OUT gets the umask's modes last."""
    import klconvert.whole_folder as whole_folder_module
    from klconvert.convert.output_folder import mark_temporary

    modes_marked = []
    monkeypatch.setattr(whole_folder_module, "mark_temporary",
                        lambda folder: (modes_marked.append(_mode(folder)), mark_temporary(folder)))
    out, in_place = tmp_path / "out", tmp_path / "in-place"
    in_place.mkdir(mode=0o755)
    old = os.umask(0o277)
    try:
        for folder_out in (out, in_place):
            with whole_folder(folder_out) as folder:
                (folder / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert modes_marked == [0o700, 0o700, 0o700]
    assert _mode(out) == 0o500 and _mode(in_place) == 0o755   # an existing OUT keeps its own mode
    assert _mode(out / "config.json") == _mode(in_place / "config.json") == 0o400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in-place", "out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in in_place.iterdir()) == [OUTPUT_RECORD,
                                                                                                 "config.json"]
    out.chmod(0o700)   # for tmp_path's removal


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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_RECORD, "x"]   # the mark is gone


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
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_RECORD, "a.json", "genai_config.json", "model.onnx"]
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
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_RECORD, "config.json"]


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
    assert sorted(p.name for p in Path("out").iterdir()) == [OUTPUT_RECORD, "config.json"]


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
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_RECORD, "config.json"]


def test_an_interrupt_while_moving_in_leaves_out_empty_not_looking_complete(tmp_path, monkeypatch):
    """An interrupt between a move and its record left config.json alone in OUT."""
    out = tmp_path / "out"
    out.mkdir()
    real_rename = os.rename

    def rename(a, b):
        real_rename(a, b)
        if os.path.basename(b) == "config.json" and os.path.dirname(b) == str(out):   # its move in, not back out
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
    monkeypatch.setattr(whole_folder_module, "remove_temporary", lambda folder: None)   # a kill runs no clean-up
    with pytest.raises(SystemExit):
        with whole_folder(out) as folder:
            (folder / "config.json").write_text("{}")
    (left,) = out.iterdir()
    assert (left / TEMPORARY_MARKER).is_file()


# ---- a mount point, a read-only parent, a stray mark --------------------------------------------------------------
def _as_mount_point(monkeypatch, out: Path) -> None:
    """OUT made a mount point as the kernel sees it: it cannot be renamed away (EBUSY), and nothing renames across
    its edge (EXDEV)."""
    real_rename, top = os.rename, os.path.abspath(out)

    def rename(a, b):
        a, b = os.path.abspath(a), os.path.abspath(b)
        if top in (a, b):
            raise OSError(errno.EBUSY, "Device or resource busy", a)
        if (a.startswith(top + os.sep)) != (b.startswith(top + os.sep)):
            raise OSError(errno.EXDEV, "Invalid cross-device link", a)
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)


def _read_only(monkeypatch, folder: Path) -> None:
    """`folder` takes no new entry (a read-only file system; chmod stops no root, who runs these tests at times)."""
    top = os.path.abspath(folder)
    for name in ("open", "mkdir", "rename", "unlink", "rmdir"):
        real = getattr(os, name)

        def refusing(*args, real=real, **kwargs):
            paths = [arg for arg in args if isinstance(arg, (str, Path))]   # rename's both
            if any(os.path.dirname(os.path.abspath(path)) == top for path in paths):
                raise OSError(errno.EROFS, "Read-only file system", str(paths[0]))
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, refusing)


def _earlier_export(out: Path) -> dict[str, str]:
    out.mkdir(exist_ok=True)
    files = {"genai_config.json": "earlier config", "model.onnx": "earlier model", "tokenizer.json": "earlier"}
    for name, text in files.items():
        (out / name).write_text(text)
    return files


def _visible(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir() if not p.name.startswith(".")}


def test_force_onto_a_mount_point_replaces_it_in_place_never_looking_whole_when_not(tmp_path, monkeypatch):
    """A mount point of files cannot be renamed away: --force failed with EBUSY after all the work. Now its files
    are replaced in place, and after every rename OUT holds the marker only when it holds the one whole set -- and
    whatever it holds, a record listing it (a kill at any point leaves a folder --force replaces, not the user's)."""
    from klconvert.convert.output_folder import TEMPORARY_MARKER
    from klconvert.whole_folder import Replaceable

    out = tmp_path / "out"
    earlier = _earlier_export(out)
    write_output_record(out, list(earlier))   # as this version writes one
    new = {"genai_config.json": "new config", "model.onnx": "new model", "model.onnx.data": "new data"}
    before = out.stat().st_ino
    _as_mount_point(monkeypatch, out)
    mounted_rename, seen = os.rename, []

    def rename(a, b):
        mounted_rename(a, b)
        seen.append(os.path.basename(b))
        if (out / "genai_config.json").exists():
            assert _visible(out) in (earlier, new), seen
        held = {p.name for p in out.iterdir() if not p.name.startswith(".out.")}
        assert not held or held <= {OUTPUT_RECORD, *json.loads((out / OUTPUT_RECORD).read_text())["files"]}, seen
        for hidden in out.glob(".out.*"):   # what is hidden in OUT a kill leaves for the next run to remove
            assert hidden.name == ".out.partial.lock" or (hidden / TEMPORARY_MARKER).is_file() or not any(
                hidden.iterdir()), hidden

    monkeypatch.setattr(os, "rename", rename)
    ran = []
    with whole_folder(out, force=True, replaceable=Replaceable("an earlier export", lambda p: True),
                      last="genai_config.json") as folder:
        ran.append(True)
        for name, text in new.items():
            (folder / name).write_text(text)
    assert ran and out.stat().st_ino == before
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_RECORD, *new]) and _visible(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and seen[-1] == "genai_config.json"


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()])
def test_a_replacement_in_place_that_fails_puts_the_earlier_files_back(tmp_path, monkeypatch, failure):
    """A move in that fails after the earlier files went aside: they come back, and nothing of the run stays."""
    from klconvert.whole_folder import Replaceable

    out = tmp_path / "out"
    earlier = _earlier_export(out)
    _as_mount_point(monkeypatch, out)
    mounted_rename = os.rename

    def rename(a, b):   # the new model.onnx's move into OUT fails (after the earlier files went aside)
        if os.path.basename(a) == "model.onnx" and ".out.partial-" in str(a):
            raise failure
        mounted_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(type(failure) if isinstance(failure, KeyboardInterrupt) else KLError):
        with whole_folder(out, force=True, replaceable=Replaceable("an earlier export", lambda p: True),
                          last="genai_config.json") as folder:
            for name in ("genai_config.json", "model.onnx", "z.bin"):
                (folder / name).write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted(earlier) and _visible(out) == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("earlier", [False, True])
def test_a_mount_point_under_a_read_only_folder_is_filled_in_place(tmp_path, monkeypatch, earlier):
    """The lock and the write test went beside OUT, in its read-only parent: train_bundled's up-front refuse_taken
    passed, and whole_folder failed after the training. Now they go inside OUT, hidden, and are gone after."""
    from klconvert.whole_folder import Replaceable, refuse_taken

    out = tmp_path / "mnt" / "out"
    out.mkdir(parents=True)
    if earlier:
        _earlier_export(out)
    _as_mount_point(monkeypatch, out)
    _read_only(monkeypatch, out.parent)
    anything = Replaceable("an earlier export", lambda p: True)
    refuse_taken(out, earlier, anything)
    with whole_folder(out, earlier, anything) as folder:
        (folder / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_RECORD, "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"] and [p.name for p in out.parent.iterdir()] == ["out"]


@pytest.mark.parametrize("exists", [False, True])
def test_a_folder_that_takes_no_file_is_refused_before_any_work(tmp_path, monkeypatch, exists):
    """train_bundled calls refuse_taken before its training: OUT (or the folder it goes in) taking no file was said
    only after it."""
    from klconvert.whole_folder import refuse_taken

    out = tmp_path / "out"
    if exists:
        out.mkdir()
    _read_only(monkeypatch, out if exists else tmp_path)
    where = "it" if exists else f"the folder it goes in, {tmp_path}"
    with pytest.raises(KLError, match=rf"^{out}: cannot create files in {where} \(Read-only file system\); choose a "
                                      "folder you can write to$"):
        refuse_taken(out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if exists else [])


def test_a_finished_folder_a_kill_left_marked_stays_the_users(tmp_path, monkeypatch):
    """A kill between the rename into place and the mark's removal leaves the mark in the finished OUT: it is still
    the user's folder, refused as taken, kept by every later run beside it, never removed as a temporary -- and
    --force replaces it (export-onnx --force refused it as holding other files: no command could replace it)."""
    import klconvert.whole_folder as whole_folder_module
    from klconvert.convert.output_folder import TEMPORARY_MARKER
    from klconvert.whole_folder import Replaceable, refuse_taken

    out = tmp_path / "out"

    def killed(folder):
        raise SystemExit("killed")

    monkeypatch.setattr(whole_folder_module, "unmark_temporary", killed)
    monkeypatch.setattr(whole_folder_module, "remove_temporary", lambda folder: None)   # a kill runs no clean-up
    with pytest.raises(SystemExit):
        with whole_folder(out) as folder:
            (folder / "config.json").write_text("{}")
    monkeypatch.undo()
    finished = {TEMPORARY_MARKER: "", "config.json": "{}", OUTPUT_RECORD: '{\n "files": [\n  "config.json"\n ]\n}\n'}
    assert {p.name: p.read_text() for p in out.iterdir()} == finished
    with pytest.raises(KLError, match=rf"out: is not empty \(it holds {OUTPUT_RECORD}, config.json\); choose"):
        with whole_folder(out):
            pass
    for beside in ("other", "out2", "out/sub"):   # each removes dead runs' leftovers beside it and in it
        with whole_folder(tmp_path / beside) as folder:
            (folder / "config.json").write_text("{}")
    assert {p.name: p.read_text() for p in out.iterdir() if p.is_file()} == finished
    with pytest.raises(KLError, match="named as klconvert names its temporary folders"):   # one a run could take
        refuse_taken(tmp_path / ".q4.partial-123-abcdefgh")
    for name in ("config.json", OUTPUT_RECORD):
        (out / "sub" / name).unlink()
    (out / "sub").rmdir()
    only_config = Replaceable("an earlier config", lambda p: p.name == "config.json")
    with whole_folder(out, force=True, replaceable=only_config) as folder:
        (folder / "config.json").write_text("[]")
    assert _visible(out) == {"config.json": "[]"}
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_RECORD, "config.json"]


def test_force_is_offered_only_where_it_would_replace_out(tmp_path):
    """export-onnx told any taken OUT to pass --force, which then refused one holding the user's files (h182)."""
    from klconvert.whole_folder import Replaceable, refuse_taken

    out = tmp_path / "out"
    earlier = _earlier_export(out)
    export_files = Replaceable("an earlier export", lambda p: p.name in earlier, any_klconvert_output=True)
    with pytest.raises(KLError, match="pass --force to replace it once the new one is whole$"):
        refuse_taken(out, replaceable=export_files)
    (out / "notes.txt").write_text("mine")
    for force in (False, True):   # refused with --force too: what it would lead to
        with pytest.raises(KLError) as refused:
            refuse_taken(out, force, replaceable=export_files)
        assert ("--force" in str(refused.value)) == force, refused.value
    assert str(refused.value) == (f"{out}: --force replaces only a folder klconvert wrote (or an empty one, or an "
                                  "earlier export), and this also holds other files, which klconvert did not write: "
                                  "notes.txt; move them out of it, or choose another output folder")
    with pytest.raises(KLError, match="is not empty \\(it holds genai_config.json, model.onnx, notes.txt and 1 "
                       "more\\); choose another output folder \\(or move it away\\)$"):
        refuse_taken(out, True)   # nothing --force replaces (the bundled model's tools')


def test_only_a_replaceable_that_opts_in_takes_any_folder_klconvert_wrote(tmp_path):
    """Every caller's --force replaced any folder whose record listed all it held: train_tokenizer's --force, which
    promises an earlier tokenizer, replaced a whole model folder. A record counts only where the caller opts in."""
    from klconvert.whole_folder import Replaceable, refuse_taken

    out = tmp_path / "out"
    with whole_folder(out) as folder:   # klconvert's, by its record
        (folder / "model.safetensors").write_text("weights")
        (folder / "tiktoken.model").write_text("ranks")
    tokenizer = Replaceable("an earlier tokenizer", lambda p: p.name == "tiktoken.model")
    for force in (False, True):
        with pytest.raises(KLError) as refused:
            refuse_taken(out, force, tokenizer)
        assert ("--force" in str(refused.value)) == force, refused.value
    assert str(refused.value) == (f"{out}: --force replaces only an empty folder or an earlier tokenizer, and this "
                                  "also holds other files: model.safetensors; move them out of it, or choose another "
                                  "output folder")
    refuse_taken(out, True, Replaceable("an earlier tokenizer", tokenizer.may_hold, any_klconvert_output=True))
    (out / "model.safetensors").unlink()
    refuse_taken(out, True, tokenizer)   # its own kind, record and all


def test_what_a_kill_left_in_a_finished_folder_stops_no_replacement(tmp_path, monkeypatch):
    """A kill after the marker went in, in place, leaves the hidden folders in the whole OUT, the lock beside it: a
    rerun is refused as taken, and --force replaces it (they are a dead run's, not files of OUT's)."""
    import klconvert.whole_folder as whole_folder_module
    from klconvert.whole_folder import Replaceable

    out = tmp_path / "out"
    earlier = _earlier_export(out)

    def killed(folder):
        raise SystemExit("killed")

    export_files = Replaceable("an earlier export", lambda p: p.name in {*earlier, "model.onnx.data"})
    monkeypatch.setattr(whole_folder_module, "unmark_temporary", killed)
    monkeypatch.setattr(whole_folder_module, "remove_temporary", lambda folder: None)   # a kill runs no clean-up
    monkeypatch.setattr(whole_folder_module, "remove_replaced", lambda aside, out: None)
    with pytest.raises(SystemExit):
        with whole_folder(out, force=True, replaceable=export_files, last="genai_config.json") as folder:
            (folder / "genai_config.json").write_text("second")
    monkeypatch.undo()
    (tmp_path / "out.partial.lock").write_text("999999\n")   # the lock too (beside OUT): a kill does not remove it
    assert _visible(out) == {"genai_config.json": "second"} and len(list(out.glob(".out.*"))) == 2
    with pytest.raises(KLError, match=rf"out: is not empty \(it holds {OUTPUT_RECORD}, genai_config.json\); "
                       "choose another output folder, or pass --force to replace it once the new one is whole"):
        with whole_folder(out, replaceable=export_files):
            pass
    with whole_folder(out, force=True, replaceable=export_files, last="genai_config.json") as folder:
        (folder / "genai_config.json").write_text("third")
    assert _visible(out) == {"genai_config.json": "third"}
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_RECORD, "genai_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("change", ["added", "rewritten", "removed"])
def test_an_out_changed_while_filled_in_place_is_left_as_it_is(tmp_path, change):
    """What is in OUT besides the run's own may not change while the run writes: the new files never go in over it."""
    from klconvert.whole_folder import Replaceable

    out = tmp_path / "out"
    _earlier_export(out)
    with pytest.raises(KLError, match="out: changed while writing into it; move it away and rerun"):
        with whole_folder(out, force=True, replaceable=Replaceable("an earlier export", lambda p: True),
                          last="genai_config.json") as folder:
            (folder / "genai_config.json").write_text("new")
            if change == "added":
                (out / "notes.txt").write_text("theirs")
            elif change == "rewritten":
                (out / "model.onnx.new").write_text("theirs")
                os.replace(out / "model.onnx.new", out / "model.onnx")
            else:
                (out / "tokenizer.json").unlink()
    assert _visible(out)["genai_config.json"] == "earlier config" and not list(out.glob(".out.*"))


def test_an_out_made_as_the_run_takes_the_lock_is_not_filled_under_the_wrong_lock(tmp_path, monkeypatch):
    """A missing OUT is locked beside it, an existing one in it: one made in between (by the lock's holder before
    us) would be filled while a run locking it in OUT could write it too."""
    import klconvert.whole_folder as whole_folder_module
    from klconvert.convert.output_folder import OutputLock

    out = tmp_path / "out"

    class MadeMeanwhile(OutputLock):
        def __enter__(self):
            entered = super().__enter__()
            out.mkdir()
            return entered

    monkeypatch.setattr(whole_folder_module, "OutputLock", MadeMeanwhile)
    with pytest.raises(KLError, match="out: appeared as this run started; rerun to write into it"):
        with whole_folder(out):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list(out.iterdir()) == []


@pytest.mark.parametrize("in_place", [False, True])
def test_a_failed_runs_folder_loses_its_mark_last(tmp_path, monkeypatch, in_place):
    """Deleting a failed run's folder (a 98 GB one takes a while) took its mark with the rest, in whatever order: a
    kill meanwhile left an unmarked folder no run removed -- in OUT, one that refused every rerun."""
    from klconvert.convert.output_folder import TEMPORARY_MARKER

    out = tmp_path / "out"
    if in_place:
        out.mkdir()
    real_unlink, marks = os.unlink, []

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if os.path.basename(path).startswith(("shard-", "part-")):   # a kill now leaves the rest, marked
            marks.append(any(p.is_file() for p in tmp_path.glob(f"**/.out.partial-*/{TEMPORARY_MARKER}")))

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(RuntimeError):
        with whole_folder(out) as folder:
            (folder / "sub").mkdir()
            for i in range(40):
                (folder / f"shard-{i}").write_bytes(b"x")
                (folder / "sub" / f"part-{i}").write_bytes(b"x")
            raise RuntimeError("the work fails")
    assert len(marks) == 80 and all(marks)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if in_place else [])


@pytest.mark.parametrize("earlier", [False, True])
def test_quantize_and_a_run_filling_out_in_place_refuse_each_other(tmp_path, earlier):
    """quantize locks OUT beside it; a run filling an existing OUT in place locked it in OUT, so neither refused the
    other (an export went into the folder quantize was about to rename over). Both lock beside OUT now, where OUT's
    parent takes files -- as it must for quantize's OUT.partial."""
    from klconvert.convert.output_folder import OutputLock
    from klconvert.whole_folder import Replaceable

    out = tmp_path / "out"
    out.mkdir()
    files = _earlier_export(out) if earlier else {}
    with OutputLock(out):   # quantize's, as quantize.py takes it
        with pytest.raises(KLError, match=r"another klconvert run \(pid \d+\) is writing it"):
            with whole_folder(out, force=True, replaceable=Replaceable("an earlier export", lambda p: True),
                              last="genai_config.json") as folder:
                (folder / "genai_config.json").write_text("new")
    assert _visible(out) == files and sorted(p.name for p in out.iterdir()) == sorted(files)


def test_an_earlier_file_that_vanishes_while_going_aside_keeps_the_others(tmp_path, monkeypatch):
    """The undo of a failed move aside looked for each name in the source, not the target: an earlier file gone
    before its move stopped the undo, and the files already aside were deleted with the aside folder."""
    from klconvert.whole_folder import Replaceable

    out = tmp_path / "out"
    earlier = _earlier_export(out)
    real_rename = os.rename

    def rename(a, b):   # tokenizer.json deleted by someone else just as its move aside begins
        if os.path.basename(a) == "tokenizer.json" and ".out.replaced-" in str(b):
            os.unlink(a)
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KLError):
        with whole_folder(out, force=True, replaceable=Replaceable("an earlier export", lambda p: True),
                          last="genai_config.json") as folder:
            (folder / "genai_config.json").write_text("new")
    del earlier["tokenizer.json"]
    assert _visible(out) == earlier and sorted(p.name for p in out.iterdir()) == sorted(earlier)


def test_a_write_test_removed_by_a_run_taking_the_lock_is_no_refusal(tmp_path, monkeypatch):
    """refuse_taken's write test in OUT is made before the lock: a run taking the lock meanwhile removes every
    temporary in OUT, this one too, and the unlink that followed said OUT took no files."""
    import klconvert.whole_folder as whole_folder_module
    from klconvert.whole_folder import refuse_taken

    out = tmp_path / "out"
    out.mkdir()
    real_mkstemp = tempfile.mkstemp

    def removed_at_once(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        os.unlink(path)   # as remove_dead_runs_temporaries in another run does
        return fd, path

    monkeypatch.setattr(whole_folder_module.tempfile, "mkstemp", removed_at_once)
    refuse_taken(out)
    assert list(out.iterdir()) == []
