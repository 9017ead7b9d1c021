"""What the file system refuses, said in one line before any work and leaving nothing behind: a folder on a path's way
that cannot be entered, a path past the system's length, an output that is a mount point, a link or a file, an
earlier output --force cannot write, a source file or folder that cannot be read or listed, a cache that takes no
files; and what a failed write leaves (a bench's --json, a pull's --local-dir).

The permission cases run the command held to the files' mode bits: as a user that is not root directly, as root
through setpriv without the DAC override capabilities; skipped where neither can be arranged."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from hub_standin import HubStandIn, hub_environment
from klconvert import hub
from klconvert.convert import output_folder
from klconvert.convert.output_folder import TEMPORARY_MARKER, move_aside
from klconvert.errors import KLError
from klconvert.quantize import quantize
from test_pull import PULLED, REPO, SHARD_2, files_under, write_checkpoint
from testkit import assert_one_line_error, klconvert_held, run_cli


@pytest.fixture
def chmod_back():
    """chmod(path, mode) for the test; each path's mode is put back afterwards (so tmp_path can be removed)."""
    changed: list[tuple[Path, int]] = []

    def chmod(path: Path, mode: int) -> None:
        changed.append((path, path.stat().st_mode & 0o7777))
        path.chmod(mode)

    yield chmod
    for path, mode in reversed(changed):
        path.chmod(mode)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# 1. A folder on the way that cannot be entered; a path past PATH_MAX

def long_path(tmp_path: Path) -> str:
    return str(tmp_path / (("x" * 200 + "/") * 25) / "out")   # over 5,000 bytes, each name within 255


def path_commands(path: str) -> list[tuple[list[str], str]]:
    """Each command with `path` in each place a path goes, and the flag the error line names."""
    return [
        (["quantize", path, "OUT-unused", "--device", "cpu"], "SRC"),
        (["quantize", "tiny", path, "--device", "cpu"], "OUT"),
        (["synth", "--preset", "tiny", "--out", path], "--out"),
        (["export-onnx", "--model", "tiny", "--out", path], "--out"),
        (["run", "--model", path, "--prompt", "hi"], "--model"),
        (["plan", "--model", path], "--model"),
        (["eval", "--model", path, "--reference", "tiny", "--text-file", "x.txt"], "--model"),
        (["pull", "me/repo", "--local-dir", path], "--local-dir"),
        (["pull-and-quantize", "--model", "tiny", "--out", path, "--device", "cpu"], "--out"),
        (["pull-and-quantize", "--model", path, "--device", "cpu"], "--model"),
        (["bench", "--model", "tiny", "--json", path], "--json"),
    ]


def test_a_path_past_the_systems_length_is_one_line(tmp_path, capsys):
    """It was an OSError (ENAMETOOLONG) out of is_dir() or exists(), a traceback and exit status 1."""
    path = long_path(tmp_path)
    for args, flag in path_commands(path):
        line = assert_one_line_error(*run_cli(capsys, *args)[::2], f"{flag} {path[:60]}...",
                                     "bytes, longer than the system takes (File name too long); give a shorter path")
        assert len(line) < 400, line
    assert entries(tmp_path) == []


def test_files_made_beside_an_output_past_the_systems_length_are_said_at_once(tmp_path, capsys):
    """OUT itself fits, but OUT.partial.lock or a write test beside it would not: said so, and the folders made for
    OUT are gone again (they were left, under a "cannot create files ... (File name too long)" line)."""
    room = 4080 - len(os.fsencode(str(tmp_path))) - 1
    out = tmp_path / ((("y" * 200 + "/") * 25)[:room - 1] + "z")
    assert len(os.fsencode(str(out))) == 4080
    for args in (["quantize", "tiny", out, "--device", "cpu"], ["synth", "--preset", "tiny", "--out", out]):
        assert_one_line_error(*run_cli(capsys, *args)[::2], "its path is too long for the files made beside it",
                              "give a shorter path")
    assert entries(tmp_path) == []


def test_a_folder_on_the_way_that_cannot_be_entered_is_one_line(tmp_path, chmod_back):
    """A path through a folder the user cannot enter (someone else's home at 700): it was a PermissionError out of
    is_dir(), exists() or is_symlink(), a traceback and exit status 1."""
    closed = tmp_path / "closed"
    (closed / "m").mkdir(parents=True)
    chmod_back(closed, 0o000)
    path = str(closed / "m")
    for args, flag in path_commands(path):
        code, err = klconvert_held(*args)
        assert_one_line_error(code, err, f"{flag} {path}: cannot look into {closed} (Permission denied); give a "
                                         "path you can reach")
    chmod_back(closed, 0o700)
    assert entries(closed) == ["m"] and entries(closed / "m") == []


# 2. An output that is a mount point (quantize renames OUT.partial onto OUT, which no rename does onto a mount)

def test_a_mount_point_as_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """It did the whole job, then failed at the rename (EBUSY), leaving a whole OUT.partial beside the mount point
    and an empty hidden folder."""
    out = tmp_path / "mnt"
    out.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: os.fspath(path) == str(out) or real_ismount(path))
    for args in (["quantize", "tiny", out, "--device", "cpu", "--force"],
                 ["quantize", "tiny", out, "--device", "cpu"],
                 ["pull-and-quantize", "--model", "tiny", "--out", out, "--device", "cpu", "--force"]):
        assert_one_line_error(*run_cli(capsys, *args)[::2],
                              f"{out}: is a mount point, which the finished folder", "cannot replace; give a folder "
                              f"inside the volume, e.g. {out / 'quantized'}")
    assert entries(tmp_path) == ["mnt"] and entries(out) == []


def test_moving_an_output_aside_that_fails_leaves_nothing(tmp_path, monkeypatch):
    """The rename of OUT aside failing (EBUSY: a mount point), or the mark before it (a read-only OUT): no empty
    hidden folder beside OUT, no mark in it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def busy(source, target):
        raise OSError(errno.EBUSY, "Device or resource busy", str(source))

    monkeypatch.setattr(output_folder.os, "rename", busy)
    with pytest.raises(OSError):
        move_aside(out)
    assert entries(tmp_path) == ["out"] and entries(out) == ["config.json"]
    monkeypatch.undo()

    def read_only(folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / TEMPORARY_MARKER))

    monkeypatch.setattr(output_folder, "mark_temporary", read_only)
    with pytest.raises(PermissionError):
        move_aside(out)
    assert entries(tmp_path) == ["out"] and entries(out) == ["config.json"]


# 3. An output that is a file or a link: said at once, not "pass --force" and then "not a folder"

@pytest.mark.parametrize("kind,said", [("file", "exists and is not a folder"),
                                       ("link", "is a symbolic link; give the path of a new folder"),
                                       ("dangling", "is a symbolic link to nothing; give the path of a new folder")])
def test_an_output_that_is_a_file_or_a_link_is_said_so_at_once(tmp_path, capsys, kind, said):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    else:
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / ("real" if kind == "link" else "nowhere"))
    before = entries(tmp_path)
    for force in ([], ["--force"]):
        for args in (["quantize", "tiny", out, "--device", "cpu"],
                     ["pull-and-quantize", "--model", "tiny", "--out", out, "--device", "cpu"]):
            line = assert_one_line_error(*run_cli(capsys, *args, *force)[::2], f"{out}: {said}")
            assert "--force" not in line, line
    assert entries(tmp_path) == before


# 4. --force over an earlier output that cannot be written

def test_force_over_a_read_only_earlier_output_is_refused_up_front(tiny_released, tmp_path, chmod_back):
    """It did all the work, then failed "cannot write old/.klconvert-temporary (Permission denied)", leaving an empty
    hidden folder beside OUT."""
    old = quantize(tiny_released, tmp_path / "old", bits=8, group_size=32, device="cpu", progress=False).path
    files = {p.name: p.read_bytes() for p in old.iterdir()}
    chmod_back(old, 0o555)
    code, err = klconvert_held("quantize", tiny_released, old, "--bits", "8", "--group-size", "32", "--device", "cpu",
                               "--force")
    assert_one_line_error(code, err, f"{old}: cannot create files in it (Permission denied), which --force needs to "
                                     "replace it")
    assert entries(tmp_path) == ["old"] and {p.name: p.read_bytes() for p in old.iterdir()} == files


def test_force_whose_new_output_cannot_go_in_leaves_the_earlier_in_place(tiny_released, tmp_path, monkeypatch):
    """The rename of OUT.partial to OUT failing once the earlier OUT was moved aside left no OUT, only the hidden
    .OUT.replaced-PID-XXXXXXXX, marked for the next run to delete: the earlier OUT is put back as it was, unmarked,
    and the finished shards wait in OUT.partial."""
    old = quantize(tiny_released, tmp_path / "old", bits=8, group_size=32, device="cpu", progress=False).path
    files = {p.name: p.read_bytes() for p in old.iterdir()}
    rename = os.rename

    def busy_into_place(source, target, *args, **kwargs):
        if Path(source) == output_folder.partial_path(old):
            raise OSError(errno.EBUSY, "Device or resource busy", str(source))
        rename(source, target, *args, **kwargs)

    monkeypatch.setattr(output_folder.os, "rename", busy_into_place)
    with pytest.raises(KLError, match="Device or resource busy"):
        quantize(tiny_released, old, bits=4, group_size=32, device="cpu", force=True, progress=False)
    assert entries(tmp_path) == ["old", "old.partial"] and {p.name: p.read_bytes() for p in old.iterdir()} == files


# 5, 6. A source file that cannot be read, a source folder that cannot be listed

def test_an_unreadable_side_file_is_a_read_error_before_any_shard(tiny_copy, tmp_path, chmod_back):
    """It failed only after every shard was written, as "cannot write OUT/generation_config.json"."""
    chmod_back(tiny_copy / "generation_config.json", 0o000)
    out = tmp_path / "out"
    code, err = klconvert_held("quantize", tiny_copy, out, "--device", "cpu")
    line = assert_one_line_error(code, err, f"{tiny_copy / 'generation_config.json'}: cannot read it (Permission "
                                            "denied); make it readable for you")
    assert "write" not in line, line
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_source_folder_that_cannot_be_listed_is_refused(tiny_copy, tmp_path, chmod_back):
    """A folder that can be entered but not listed: glob found no side file, and the run ended with status 0 and an
    output without tokenizer_config.json."""
    chmod_back(tiny_copy, 0o111)
    out = tmp_path / "out"
    code, err = klconvert_held("quantize", tiny_copy, out, "--device", "cpu")
    assert_one_line_error(code, err, f"{tiny_copy}: cannot list its files (Permission denied)",
                          "make the folder readable for you")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# 7. A permission problem is not a damaged download

@pytest.mark.parametrize("name,command", [
    ("model-00001-of-00004.safetensors", ["quantize", "{src}", "{out}", "--device", "cpu"]),
    ("model.safetensors.index.json", ["quantize", "{src}", "{out}", "--device", "cpu"]),
    ("config.json", ["plan", "--model", "{src}"]),
    ("tokenizer_config.json", ["run", "--model", "{src}", "--prompt", "hi", "--device", "cpu"]),
    ("tiktoken.model", ["run", "--model", "{src}", "--prompt", "hi", "--device", "cpu"]),
])
def test_a_file_that_cannot_be_read_is_a_permission_problem(tiny_copy, tmp_path, chmod_back, name, command):
    """It said "put the shard file there -- pull the model again", or "re-download the model"."""
    chmod_back(tiny_copy / name, 0o000)
    code, err = klconvert_held(*(arg.format(src=tiny_copy, out=tmp_path / "out") for arg in command))
    line = assert_one_line_error(code, err, f"{tiny_copy / name}: cannot read it (Permission denied); make it "
                                            "readable for you (chmod u+r, or ask its owner)")
    assert "download" not in line and "pull" not in line, line


# 8. bench --json written whole or not at all

BENCH_WITH_A_FULL_DISK = textwrap.dedent("""
    import resource, sys
    import klconvert.bench as B

    class Result:
        peer = None

        def as_dict(self):
            return {"rows": [{"context": i, "ms": 1.0} for i in range(5000)]}

    B.bench = lambda *args, **kwargs: Result()   # the timing, which needs a GPU, stood in for
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))   # a disk that fills after 4 KiB (EFBIG)
    from klconvert.entry import main
    sys.argv = ["klconvert", "bench", "--model", "tiny", "--no-check", "--json", sys.argv[1]]
    main()
""")


def test_a_bench_json_that_cannot_be_written_whole_leaves_the_earlier_file(tmp_path):
    """It was written in place: a full disk left a truncated JSON, the earlier file already overwritten."""
    json_file = tmp_path / "bench.json"
    json_file.write_text('{"earlier": true}\n')
    done = subprocess.run([sys.executable, "-c", BENCH_WITH_A_FULL_DISK, str(json_file)], capture_output=True,
                          text=True, timeout=300)
    assert_one_line_error(done.returncode, done.stderr, f"--json {json_file}: cannot write it (File too large)")
    assert entries(tmp_path) == ["bench.json"] and json_file.read_text() == '{"earlier": true}\n'


# 9, 10. pull: a --local-dir copy from the cache that fails; a cache that takes no files; the disk-space warning

@pytest.fixture
def served(tmp_path):
    with HubStandIn() as server:
        commit = server.add_repo(REPO, write_checkpoint(tmp_path / "upstream"))
        with hub_environment(server.endpoint, tmp_path / "hf_home"):
            yield server, commit


def test_a_failed_copy_from_the_cache_into_a_local_dir_keeps_only_whole_files(served, tmp_path, monkeypatch):
    """huggingface_hub up to 2.4 copies a file the cache holds straight under its final name: a full disk left it cut
    short there (0 bytes, or part of it) while the line said "finished files are kept". (2.5 copies it to a temporary
    name first, which it removes: the copy is told by its source, the cache's file, to fail under either; under 2.5
    the hub leaves nothing cut short, and the test below holds the clean-up to account.)"""
    hub.pull(REPO, progress=False)   # the cache holds the repo
    real_copyfile = shutil.copyfile

    def disk_fills(source, target, *args, **kwargs):
        if Path(source).name == SHARD_2:
            Path(target).write_bytes(Path(source).read_bytes()[:1000])
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_copyfile(source, target, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", disk_fills)
    local_dir = tmp_path / "kimi"
    with pytest.raises(KLError, match="disk full while pulling"):
        hub.pull(REPO, local_dir=local_dir, progress=False)
    upstream = tmp_path / "upstream"
    for name in files_under(local_dir):
        if not name.startswith(".cache/"):
            assert (local_dir / name).read_bytes() == (upstream / name).read_bytes(), name
    assert SHARD_2 not in files_under(local_dir)
    monkeypatch.undo()
    assert [f for f in files_under(hub.pull(REPO, local_dir=local_dir, progress=False).path)
            if not f.startswith(".")] == PULLED


def test_a_file_a_failed_download_cut_short_in_a_local_dir_is_removed(served, tmp_path, monkeypatch):
    """The clean-up itself, under any huggingface_hub: the download leaves a shard cut short under its final name (as
    2.4's copy from the cache did on a full disk) and fails; the pull removes it, and a rerun completes the folder.
    Under 2.5 the test above passes with the clean-up gone, since the hub leaves no such file (h298's F3)."""
    local_dir = tmp_path / "kimi"

    def cut_short(*args, **kwargs):
        local_dir.mkdir(parents=True, exist_ok=True)
        (local_dir / SHARD_2).write_bytes((tmp_path / "upstream" / SHARD_2).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device", str(local_dir / SHARD_2))

    monkeypatch.setattr(hub, "snapshot_download", cut_short)
    with pytest.raises(KLError, match="disk full while pulling"):
        hub.pull(REPO, local_dir=local_dir, progress=False)
    assert SHARD_2 not in files_under(local_dir)
    monkeypatch.undo()
    assert [f for f in files_under(hub.pull(REPO, local_dir=local_dir, progress=False).path)
            if not f.startswith(".")] == PULLED


def test_a_disk_filling_mid_pull_is_said_with_what_the_pull_fetches_and_what_is_free(served, tmp_path, monkeypatch):
    """It said "disk full while pulling ...: free space and rerun", with no size: not how much to free (quantize's
    line says both)."""
    hub.pull(REPO, progress=False)   # the cache holds the repo: the --local-dir pull copies every file from it
    fetched = sum((tmp_path / "upstream" / name).stat().st_size for name in PULLED)
    monkeypatch.setattr(hub, "free_disk_bytes", lambda folder: 3 << 30)   # past the check before the download

    def disk_fills(source, target, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(shutil, "copyfile", disk_fills)
    local_dir = tmp_path / "kimi"
    with pytest.raises(KLError) as refused:
        hub.pull(REPO, local_dir=local_dir, progress=False)
    assert str(refused.value) == (f"disk full while pulling {REPO}@main into {local_dir} (it fetches {fetched:,} "
                                  "bytes in all, 3.22 GB free there); free space and rerun")


def test_a_quota_exceeded_mid_pull_is_said_as_that_with_no_free_space(served, tmp_path, monkeypatch):
    """EDQUOT read "disk full while pulling ... (... 72.99 GB free there)": statvfs's free space is the disk's, which a
    quota hides (h213's F7)."""
    hub.pull(REPO, progress=False)   # the cache holds the repo: the --local-dir pull copies every file from it

    def quota_exceeded(source, target, *args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(target))

    monkeypatch.setattr(shutil, "copyfile", quota_exceeded)
    local_dir = tmp_path / "kimi"
    with pytest.raises(KLError) as refused:
        hub.pull(REPO, local_dir=local_dir, progress=False)
    assert str(refused.value) == (f"disk quota exceeded while pulling {REPO}@main into {local_dir}; remove files that "
                                  "count against your quota there, or have it raised and rerun")


def test_a_cache_under_a_file_is_named_with_what_set_it(served, tmp_path):
    """It went on to huggingface_hub's "Ignored error ..." lines and "rerun the pull to continue"."""
    (tmp_path / "afile").write_text("mine")
    with hub_environment(served[0].endpoint, tmp_path / "afile" / "hf"):
        with pytest.raises(KLError, match=r"^the Hugging Face cache .*afile/hf/hub \(set by HF_HOME\): goes in "
                                          r".*afile, which is not a folder; set HF_HOME \(or HF_HUB_CACHE\)"):
            hub.pull(REPO, progress=False)
    with pytest.raises(KLError, match=r"^the Hugging Face cache .*afile \(set by --cache-dir\): is not a folder; "
                                      "give a --cache-dir you can write to"):
        hub.pull(REPO, cache_dir=tmp_path / "afile", progress=False)
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_cache_that_takes_no_files_is_refused_before_the_pull(served, tmp_path, chmod_back):
    home = tmp_path / "read-only-home"
    home.mkdir()
    chmod_back(home, 0o555)
    code, err = klconvert_held("pull", REPO, env={"HF_HOME": str(home / "hf")})
    assert_one_line_error(code, err, f"the Hugging Face cache {home / 'hf' / 'hub'} (set by HF_HOME): cannot create "
                                     f"files in the folder it goes in, {home} (Permission denied); set HF_HOME")
    assert entries(home) == []


def test_huggingface_hubs_disk_space_warning_is_not_repeated(served, tmp_path, monkeypatch):
    """A disk filling mid-pull flooded stderr with huggingface_hub's "UserWarning: Not enough free disk space" pairs
    before klconvert's own line."""
    monkeypatch.setattr(hub, "free_disk_bytes", lambda folder: 1 << 40)   # klconvert's check passes; then it fills
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hub.pull(REPO, progress=False)
    assert not [w for w in caught if "free disk space" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("limit, said", [
    (200 << 10, "the process may write files of 204,800 B at most (ulimit -f); raise that limit"),
    (None, "its file system takes no file that large; write to another disk"),
])
def test_a_file_too_large_is_said_with_the_limit_that_stops_it(tmp_path, monkeypatch, limit, said):
    """It said "(File too large); fix that", naming neither ulimit -f nor the file system (helper-131)."""
    import resource

    from klconvert import disk_space

    soft = resource.RLIM_INFINITY if limit is None else limit
    monkeypatch.setattr(disk_space.resource, "getrlimit", lambda which: (soft, resource.RLIM_INFINITY))
    assert disk_space.failed_write(OSError(errno.EFBIG, "File too large"), tmp_path) == \
        f"cannot write {tmp_path} (File too large): {said}"


def test_a_real_file_size_limit_is_named_in_one_line(tmp_path):
    """quantize under ulimit -f: the limit it ran into, then the rerun (helper-131)."""
    import resource

    done = subprocess.run([sys.executable, "-m", "klconvert", "quantize", "tiny", tmp_path / "q", "--bits", "4"],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200 << 10, 200 << 10)))
    assert_one_line_error(done.returncode, done.stderr, "(File too large): the process may write files of 204,800 B "
                                                        "at most (ulimit -f); raise that limit, then rerun")


def test_a_write_the_system_refuses_says_what_to_do_about_it(tmp_path):
    """A read-only file system, no permission and a folder removed mid-run ended "(...); fix that"."""
    from klconvert import disk_space

    out = tmp_path / "q"
    out.mkdir()
    said = {number: disk_space.failed_write(OSError(number, os.strerror(number)), where) for number, where in [
        (errno.EROFS, out / "model.safetensors"), (errno.EACCES, out / "model.safetensors"), (errno.EPERM, out),
        (errno.ENOENT, tmp_path / "gone" / "q" / "model.safetensors")]}
    assert said == {
        errno.EROFS: f"cannot write {out / 'model.safetensors'} (Read-only file system): its file system takes no "
                     "writes -- choose an output folder on another disk",
        errno.EACCES: f"cannot write {out / 'model.safetensors'} (Permission denied): make {out} writable for you "
                      "(chmod u+w, or ask its owner), or choose another output folder",
        errno.EPERM: f"cannot write {out} (Operation not permitted): make {out} writable for you (chmod u+w, or ask "
                     "its owner), or choose another output folder",
        errno.ENOENT: f"cannot write {tmp_path / 'gone' / 'q' / 'model.safetensors'} (No such file or directory): "
                      f"{tmp_path / 'gone'} is gone, removed while this ran; leave it alone while klconvert writes "
                      "there"}


def test_a_shard_on_a_file_system_gone_read_only_is_one_line_naming_another_disk(tmp_path, capsys, monkeypatch):
    """ext4's errors=remount-ro takes writes away mid-run; the line said "fix that"."""
    import klconvert.quantize

    def remounted(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(klconvert.quantize, "write_shard", remounted)
    code, _, err = run_cli(capsys, "quantize", "tiny", tmp_path / "q", "--bits", "4", "--device", "cpu")
    assert_one_line_error(code, err, f"cannot write {tmp_path / 'q.partial'}/", "(Read-only file system): its file "
                          "system takes no writes -- choose an output folder on another disk, then rerun")


# 11. A umask that takes the owner's own permissions

@pytest.fixture
def umask_set():
    """os.umask(mask) for the test (a command it runs inherits it); the earlier umask is put back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_a_umask_that_leaves_the_output_unreadable_is_refused_before_any_work(tmp_path, capsys, umask_set):
    """Under umask 0777 quantize and export-onnx left a working folder of mode 000 (OUT.partial, .OUT.partial-PID-*)
    that no later run could list or remove, --force neither; finished, OUT would be unreadable (helper-135)."""
    for mask in (0o777, 0o377):
        umask_set(mask)
        for args in (["quantize", "tiny", tmp_path / "q", "--bits", "4", "--device", "cpu"],
                     ["export-onnx", "--model", "tiny", "--out", tmp_path / "o"],
                     ["synth", "--preset", "tiny", "--out", tmp_path / "s"]):
            assert_one_line_error(*run_cli(capsys, *args)[::2], f"{args[-1] if args[0] != 'quantize' else args[2]}: "
                                  f"the umask ({mask:04o}) would leave what is written there unreadable by you",
                                  "e.g. umask 022, and rerun")
        umask_set(0o022)
        assert entries(tmp_path) == []


def test_a_umask_without_the_owners_write_gives_a_whole_read_only_output(tmp_path, umask_set):
    """Under umask 0277 the working folder was made 0500: quantize failed 'cannot write q.partial (Permission
    denied)', and export-onnx's hidden folder could not take its mark. The run's folders are its own (0700) while
    written; OUT gets the umask's modes at the end."""
    umask_set(0o277)
    for args in (["quantize", "tiny", tmp_path / "q", "--bits", "4", "--device", "cpu"],
                 ["export-onnx", "--model", "tiny", "--out", tmp_path / "o"]):
        code, err = klconvert_held(*args)
        assert code == 0, err
    umask_set(0o022)
    assert entries(tmp_path) == ["o", "q"]
    for out in (tmp_path / "o", tmp_path / "q"):
        assert _mode(out) == 0o500 and {_mode(p) for p in out.iterdir()} == {0o400}, out
        out.chmod(0o700)   # for tmp_path's removal


def test_a_partial_folder_of_mode_000_an_older_version_left_is_taken_up(tmp_path, capsys, umask_set):
    """An empty OUT.partial of mode 000 (what umask 0777 left) made every rerun fail 'cannot write q.partial
    (Permission denied)', --force too; one that holds files but no resume record is refused as before, its mode kept."""
    umask_set(0o022)
    (tmp_path / "q.partial").mkdir(mode=0o000)
    code, err = klconvert_held("quantize", "tiny", tmp_path / "q", "--bits", "4", "--device", "cpu")
    assert code == 0, err
    assert entries(tmp_path) == ["q"] and _mode(tmp_path / "q") == 0o755
    (tmp_path / "r.partial").mkdir()
    (tmp_path / "r.partial" / "mine").write_text("x")
    (tmp_path / "r.partial").chmod(0o000)
    code, err = klconvert_held("quantize", "tiny", tmp_path / "r", "--bits", "4", "--device", "cpu", "--force")
    assert_one_line_error(code, err, f"{tmp_path / 'r.partial'}: exists but holds no readable .klconvert-resume.json")
    assert _mode(tmp_path / "r.partial") == 0o000
    (tmp_path / "r.partial").chmod(0o700)
