"""klconvert.hub.pull against the loopback hub stand-in: filtering, cache, offline, resume, checks, errors."""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub._local_folder import get_local_download_paths
from safetensors.torch import save_file

from klconvert import entry, hub, hub_guard, waking_for_signals
from klconvert.entry import Interrupted
from klconvert.errors import KLError
from klconvert.units import size_text, size_texts
from klconvert.verified_files import MAX_RECORD_VALUES, VerifiedFiles
from hub_standin import EGRESS_MESSAGE, HubStandIn, git_blob_id, hub_environment
from testkit import (assert_one_line_error, run_cli, run_klconvert, run_klconvert_on_a_terminal, run_main,
                     shown_lines)

REPO = "moonshotai/Kimi-Linear-48B-A3B-Instruct"
SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
PULLED = sorted([
    "config.json", SHARD_1, SHARD_2, "model.safetensors.index.json",
    "tiktoken.model", "tokenizer_config.json", "chat_template.jinja",
])
NEVER_PULLED = ["pytorch_model.bin", "modeling_kimi.py", "notes.pkl", "README.md"]


def write_checkpoint(folder: Path, index_names_missing_shard: bool = False) -> Path:
    """A tiny Kimi-like repo folder: two safetensors shards with their index, configs, tokenizer, and bait."""
    folder.mkdir(parents=True)
    save_file({"model.embed_tokens.weight": torch.arange(64.0).reshape(8, 8)}, str(folder / SHARD_1))
    save_file({"lm_head.weight": torch.ones(64, 64)}, str(folder / SHARD_2))  # 16 KiB: room to cut it short
    weight_map = {"model.embed_tokens.weight": SHARD_1, "lm_head.weight": SHARD_2}
    if index_names_missing_shard:
        weight_map["model.norm.weight"] = "model-00003-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "kimi_linear", "hidden_size": 8}))
    (folder / "tiktoken.model").write_bytes(b"IQ== 0\nIg== 1\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TikTokenTokenizer"}))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be fetched")
    (folder / "modeling_kimi.py").write_text("raise SystemExit('remote code must never be fetched')\n")
    (folder / "notes.pkl").write_bytes(b"\x80\x04 another pickle")
    (folder / "README.md").write_text("# not a weight\n")
    return folder


@pytest.fixture
def hub_server():
    with HubStandIn() as server:
        yield server


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "upstream")


@pytest.fixture
def served(hub_server, checkpoint, tmp_path):
    """(stand-in, commit of REPO) with huggingface_hub pointed at the stand-in and HF_HOME in tmp."""
    commit = hub_server.add_repo(REPO, checkpoint)
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home"):
        yield hub_server, commit


def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf_home" / "hub"


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.mark.parametrize("given, cache", [
    ({"HF_HUB_CACHE": "a", "HUGGINGFACE_HUB_CACHE": "c", "HF_HOME": "b"}, "a"),
    ({"HUGGINGFACE_HUB_CACHE": "c", "HF_HOME": "b"}, "c"), ({"HF_HOME": "b", "XDG_CACHE_HOME": "x"}, "b/hub"),
    ({"XDG_CACHE_HOME": "x"}, "x/huggingface/hub"), ({}, "home/.cache/huggingface/hub")],
    ids=["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "none"])
def test_the_cache_a_pull_takes_is_the_one_its_help_names(tmp_path, given, cache):
    """--cache-dir's help said "[default: $HF_HOME/hub]" (h283): HF_HUB_CACHE wins when set, and with neither it is
    ~/.cache/huggingface/hub; and it left out the older HUGGINGFACE_HUB_CACHE and XDG_CACHE_HOME, which move it too
    (h291). An offline pull of a repo no cache holds names the cache it looked in."""
    from klconvert.cli import cli

    env = {**dict.fromkeys(CACHE_VARIABLES), **{name: str(tmp_path / value) for name, value in given.items()},
           "HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    done = run_klconvert("pull", "acme/none", env=env)
    assert_one_line_error(done.returncode, done.stderr, f"HF_HUB_OFFLINE is set and {tmp_path / cache} holds no "
                                                        "complete copy of acme/none@main")
    help_text = next(p.help for p in cli.commands["pull"].params if p.name == "cache_dir")
    assert help_text.endswith("[default: $HF_HUB_CACHE (or the older $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, "
                              "else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub].")


def test_pull_into_cache_fetches_only_safe_files_at_the_resolved_commit(served, checkpoint, tmp_path):
    server, commit = served
    result = hub.pull(REPO, progress=False)

    storage = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"
    assert result.path == storage / "snapshots" / commit
    assert result.commit == commit
    assert (storage / "refs" / "main").read_text() == commit
    assert files_under(result.path) == PULLED
    assert sorted(f.path for f in result.files) == PULLED
    assert result.bytes_downloaded == sum((checkpoint / p).stat().st_size for p in PULLED)
    assert all(server.requests[(m, p)] == 0 for m in ("HEAD", "GET") for p in NEVER_PULLED)
    shard = next(f for f in result.files if f.path == SHARD_2)
    assert shard.sha256 == hashlib.sha256((checkpoint / SHARD_2).read_bytes()).hexdigest()
    assert not (result.path / "klconvert-pull.json").exists()  # the snapshot holds the repo's files only

    again = hub.pull(REPO, progress=False)
    assert (again.path, again.commit, again.bytes_downloaded) == (result.path, commit, 0)
    assert all(server.gets(p) == 1 for p in PULLED)


def test_pull_by_commit_sha_and_progress_output(served, capsys):
    server, commit = served
    result = hub.pull(REPO, revision=commit, progress=True)
    assert result.commit == commit
    said = capsys.readouterr().err
    assert f"is commit {commit}" in said and "pulling 7 files" in said and "modeling_kimi.py" in said
    assert "\r" not in said and "Verifying" not in said   # stderr is no terminal here: the line, and no bars


def test_a_pull_that_leaves_nothing_on_the_hub_does_not_say_so(hub_server, checkpoint, tmp_path, capsys):
    """It said "leaving 0 on the hub ()"."""
    for path in NEVER_PULLED:
        (checkpoint / path).unlink()
    hub_server.add_repo(REPO, checkpoint)
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home"):
        hub.pull(REPO, progress=True)
    said = capsys.readouterr().err
    assert f"pulling {len(PULLED)} files (" in said and "leaving" not in said


def test_local_dir_gets_files_and_a_pull_record(served, checkpoint, tmp_path):
    server, commit = served
    out = tmp_path / "kimi"
    result = hub.pull(REPO, local_dir=out, progress=False)

    assert result.path == out.resolve()
    assert [p for p in files_under(out) if not p.startswith(".")] == PULLED
    record = json.loads((out / ".klconvert" / "pull.json").read_text())
    assert (record["repo"], record["revision"], record["commit"]) == (REPO, "main", commit)
    recorded = {f["path"]: f for f in record["files"]}
    assert sorted(recorded) == PULLED
    for path in PULLED:
        data = (checkpoint / path).read_bytes()
        assert recorded[path]["size"] == len(data)
        assert recorded[path]["sha256"] == hashlib.sha256(data).hexdigest()
    assert not (cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct" / "snapshots").exists()

    again = hub.pull(REPO, local_dir=out, progress=False)
    assert again.bytes_downloaded == 0 and all(server.gets(p) == 1 for p in PULLED)


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_the_command_prints_the_folder_alone_on_stdout_and_the_commit_on_stderr(served, tmp_path, into):
    """README: pull "prints the folder on stdout and the resolved commit on stderr" -- stdout is the path and nothing
    else, for `cd "$(klconvert pull)"`; stderr, a log here, holds the announcement and the summary, no bars."""
    server, commit = served
    out = tmp_path / "kimi"
    proc = run_klconvert("pull", REPO, *(["--local-dir", out] if into == "local-dir" else []))
    assert proc.returncode == 0, proc.stderr
    folder = out.resolve() if into == "local-dir" else (
        cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct" / "snapshots" / commit)
    assert proc.stdout == f"{folder}\n"
    announcement, summary = proc.stderr.splitlines()
    assert announcement.startswith(f"{REPO}@main is commit {commit}: pulling {len(PULLED)} files "), announcement
    assert summary == f"{REPO}@{commit}: {len(PULLED)} files verified, 0.00 GB downloaded"
    assert "\r" not in proc.stderr
    assert [p for p in files_under(folder) if not p.startswith(".")] == PULLED   # the folder it names


def test_a_copy_of_one_byte_is_said_as_one(tmp_path):
    """The lines that give a copy's size beside the hub's ("SHARD has N bytes, the hub published M": the offline
    check, and the verification's) said "has 1 bytes", and neither count with its thousands, as 4b0a430's counts
    do: each says its count with counted, the hub's with its thousands."""
    (tmp_path / "config.json").write_bytes(b"{")
    f = hub.HubFile(path="config.json", size=12345)
    with pytest.raises(KLError, match="config.json has 1 byte, the hub published 12,345;"):
        hub._check_sizes(tmp_path, [f], "REPO@COMMIT")
    assert hub._check_file(tmp_path, f, None, None, threading.Event()) == (
        None, "config.json has 1 byte, the hub published 12,345")


def test_a_pull_of_one_file_says_one_file(served, tmp_path):
    """The announcement and the summary said "pulling 1 files" and "1 files verified" (4614e18's units.counted left
    them): a count of one file is said in the singular."""
    server, commit = served
    proc = run_klconvert("pull", REPO, "--include", "config.json", "--local-dir", tmp_path / "kimi")
    assert proc.returncode == 0, proc.stderr
    announcement, summary = proc.stderr.splitlines()
    assert announcement.startswith(f"{REPO}@main is commit {commit}: pulling 1 file ("), announcement
    assert summary == f"{REPO}@{commit}: 1 file verified, 0.00 GB downloaded"


def test_the_bars_show_on_a_terminal(served, tmp_path):
    """README: pull's progress bars show on a terminal only -- the terminal's half (a log's is above): on one, the
    download's and the verification's bars redraw their lines after the announcement."""
    server, commit = served
    code, out, shown = run_klconvert_on_a_terminal("pull", REPO, "--local-dir", tmp_path / "kimi")
    assert code == 0 and out == f"{(tmp_path / 'kimi').resolve()}\n", shown
    lines = shown.split("\r\n")
    assert lines[0].startswith(f"{REPO}@main is commit {commit}: pulling {len(PULLED)} files "), shown
    assert f"{REPO}@{commit}: {len(PULLED)} files verified, 0.00 GB downloaded" in lines, shown
    assert f"\rFetching {len(PULLED)} files: 100%" in shown and "\rVerifying: 100%" in shown, shown
    # the summary last: huggingface_hub 2.x's download bars, left open, were drawn again after it at exit
    assert shown.rstrip("\r\n").endswith(f"{len(PULLED)} files verified, 0.00 GB downloaded"), shown


def count_hashing(monkeypatch) -> list[str]:
    """The names of the files the pull reads to hash, from now on."""
    hashed: list[str] = []
    real = hub._digests

    def counting(path, size, bar, stopped):
        hashed.append(path.name)
        return real(path, size, bar, stopped)

    monkeypatch.setattr(hub, "_digests", counting)
    return hashed


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_a_second_pull_hashes_only_what_changed(served, tmp_path, monkeypatch, into):
    server, commit = served
    where = {"local_dir": tmp_path / "kimi"} if into == "local-dir" else {}
    hashed = count_hashing(monkeypatch)
    first = hub.pull(REPO, progress=False, **where)
    assert sorted(hashed) == sorted(Path(p).name for p in PULLED)
    if into == "cache":  # the record sits beside the snapshots, never in them
        storage = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"
        assert (storage / ".klconvert" / "verified" / f"{commit}.json").is_file()
        assert files_under(first.path) == PULLED

    hashed.clear()
    again = hub.pull(REPO, progress=False, **where)
    assert hashed == [] and again.files == first.files  # same sizes and sha256, none read again

    shard = first.path / SHARD_2
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again, and still good
    assert hub.pull(REPO, progress=False, **where).files == first.files and hashed == [SHARD_2]
    hashed.clear()  # and the record was saved again with its new mtime: the next pull hashes nothing
    assert hub.pull(REPO, progress=False, **where).files == first.files and hashed == []

    hashed.clear()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))  # same size, new content and mtime: caught, removed, fetched again on rerun
    with pytest.raises(KLError, match=f"1 file.* failed verification .*{SHARD_2} has sha256"):
        hub.pull(REPO, progress=False, **where)
    assert hashed == [SHARD_2] and not shard.exists()
    assert hub.pull(REPO, progress=False, **where).files == first.files and server.gets(SHARD_2) == 2


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("damage", [lambda p: p.write_text('{"files": {"config.json": {"size": "x"}}, '),
                                    lambda p: p.write_text("[" * 100_000 + "]" * 100_000), _fifo],
                         ids=["cut short", "nested too deeply", "a FIFO"])
def test_a_damaged_verification_record_means_hashing_again(served, tmp_path, monkeypatch, damage):
    out = tmp_path / "kimi"
    first = hub.pull(REPO, local_dir=out, progress=False)
    damage(out / ".klconvert" / "verified.json")
    hashed = count_hashing(monkeypatch)
    assert hub.pull(REPO, local_dir=out, progress=False).files == first.files
    assert sorted(hashed) == sorted(Path(p).name for p in PULLED)


@pytest.mark.parametrize("entry", [lambda e: {k: v for k, v in e.items() if k != "sha256"},
                                   lambda e: {k: v for k, v in e.items() if k != "mtime_ns"},
                                   lambda e: {**e, "size": str(e["size"])}, lambda e: 5],
                         ids=["no sha256", "no mtime", "size a string", "a number"])
def test_a_malformed_entry_in_a_record_of_valid_json_means_hashing_that_file_again(served, tmp_path, monkeypatch,
                                                                                    entry):
    """Only the entry is ignored (_well_formed's mutants let it out as a KeyError, or hashed every file again)."""
    out = tmp_path / "kimi"
    first = hub.pull(REPO, local_dir=out, progress=False)
    record = out / ".klconvert" / "verified.json"
    body = json.loads(record.read_text())
    body["files"]["config.json"] = entry(body["files"]["config.json"])
    record.write_text(json.dumps(body))
    hashed = count_hashing(monkeypatch)
    assert hub.pull(REPO, local_dir=out, progress=False).files == first.files and hashed == ["config.json"]


def test_a_record_of_more_objects_than_files_is_ignored_unparsed(served, tmp_path, monkeypatch):
    """Its entries sound, but padded with empty lists (~37x their bytes parsed: 64 MB of them took ~2.3 GB): the
    record is ignored before the parse, and every file hashed again."""
    out = tmp_path / "kimi"
    hub.pull(REPO, local_dir=out, progress=False)
    record = out / ".klconvert" / "verified.json"
    body = json.loads(record.read_text())
    record.write_text(json.dumps({**body, "padding": [[]] * MAX_RECORD_VALUES}))
    hashed = count_hashing(monkeypatch)
    hub.pull(REPO, local_dir=out, progress=False)
    assert sorted(hashed) == sorted(Path(p).name for p in PULLED)


def test_a_record_that_cannot_be_written_costs_only_time(served, tmp_path, monkeypatch):
    out = tmp_path / "kimi"
    (out / ".klconvert" / "verified.json").mkdir(parents=True)  # in the way of the record
    first = hub.pull(REPO, local_dir=out, progress=False)
    hashed = count_hashing(monkeypatch)
    assert hub.pull(REPO, local_dir=out, progress=False).files == first.files
    assert len(hashed) == len(PULLED) and not list((out / ".klconvert").glob("*.partial"))


def test_include_and_exclude_narrow_the_default_set(served):
    server, _ = served
    configs = hub.pull(REPO, include=["*.json"], exclude=["tokenizer_config.json"], progress=False)
    assert files_under(configs.path) == ["config.json", "model.safetensors.index.json"]
    assert server.gets(SHARD_1) == 0  # shards left out by --include do not fail the index check

    everything = hub.pull(REPO, include=["*"], progress=False)  # "*" still cannot admit pickles or .py
    assert files_under(everything.path) == PULLED


def test_include_matching_nothing_is_an_error(served):
    with pytest.raises(KLError, match="no file of .* matches .* the repo has: .*config.json"):
        hub.pull(REPO, include=["*.gguf"], progress=False)


@pytest.mark.parametrize("pattern", ["*.bin", "modeling_kimi.py", "notes.pkl", "*.PT"])
def test_include_never_admits_pickles_or_python(served, pattern):
    server, _ = served
    with pytest.raises(KLError, match="never downloads"):
        hub.pull(REPO, include=[pattern], progress=False)
    assert sum(server.requests.values()) == 0


def test_offline_is_served_from_a_prefilled_cache(served, hub_server, tmp_path):
    server, commit = served
    online = hub.pull(REPO, progress=False)
    asked = sum(server.requests.values())
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        offline = hub.pull(REPO, progress=False)
        configs = hub.pull(REPO, include=["*.json"], progress=False)
    assert (offline.path, offline.commit, offline.bytes_downloaded) == (online.path, commit, 0)
    assert sorted(f.path for f in offline.files) == PULLED
    assert [f.path for f in configs.files] == ["config.json", "model.safetensors.index.json", "tokenizer_config.json"]
    assert sum(server.requests.values()) == asked


def test_offline_works_from_a_local_dir_and_from_a_cache_without_tree_listing(served, hub_server, tmp_path):
    server, commit = served
    hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)
    online = hub.pull(REPO, progress=False)
    old_style = tmp_path / "old_hf_home"  # as an older huggingface_hub leaves it: no trees/<commit>.json
    shutil.copytree(tmp_path / "hf_home", old_style, symlinks=True)
    shutil.rmtree(old_style / "hub" / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct" / "trees")
    asked = sum(server.requests.values())
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        local = hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)
    with hub_environment(hub_server.endpoint, old_style, HF_HUB_OFFLINE="1"):
        from_disk = hub.pull(REPO, exclude=["*.jinja"], progress=False)
    assert (local.path, local.commit) == ((tmp_path / "kimi").resolve(), commit)
    assert sorted(f.path for f in local.files) == PULLED
    assert from_disk.commit == commit and from_disk.path.name == online.path.name
    assert sorted(f.path for f in from_disk.files) == [p for p in PULLED if p != "chat_template.jinja"]
    assert sum(server.requests.values()) == asked


def test_an_offline_pull_of_a_local_dir_a_pull_left_unfinished_is_refused(served, checkpoint, tmp_path):
    """A pull into a --local-dir cut short before huggingface_hub cached the commit's tree listing there (a Ctrl-C as
    it began, a lost connection), then an offline pull: with no listing it listed the folder from the disk and said
    what was there verified -- the 3 of 7 files put there and the user's own notes.json as the repo's. It is refused
    in one line, the folder as it was."""
    server, commit = served
    out = tmp_path / "kimi"
    out.mkdir()
    for path in PULLED[:3]:
        shutil.copy(checkpoint / path, out / path)
    (out / "notes.json").write_text("{}")

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt
    real, hub.snapshot_download = hub.snapshot_download, cut_short
    try:
        with pytest.raises(KeyboardInterrupt):
            hub.pull(REPO, local_dir=out, progress=False)
    finally:
        hub.snapshot_download = real
    before = files_under(out)
    with hub_environment(server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        with pytest.raises(KLError) as refused:
            hub.pull(REPO, local_dir=out, progress=False)
    assert str(refused.value) == (f"HF_HUB_OFFLINE is set and --local-dir {out} holds no finished pull of "
                                  f"{REPO}@{commit} (its .klconvert/pull.json names none): unset HF_HUB_OFFLINE and "
                                  "rerun the pull to finish it")
    assert files_under(out) == before


def test_an_offline_pull_of_a_local_dir_with_no_cached_listing_takes_the_files_the_pull_wrote(served, tmp_path,
                                                                                            monkeypatch):
    """Where the cache holds no tree listing of the commit (an older huggingface_hub's), an offline pull of a finished
    --local-dir takes the files its record lists, not the user's own JSON beside them."""
    server, commit = served
    out = tmp_path / "kimi"
    hub.pull(REPO, local_dir=out, progress=False)
    (out / "notes.json").write_text("{}")
    monkeypatch.setattr(hub, "_cached_listing", lambda *args: None)
    with hub_environment(server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        assert sorted(f.path for f in hub.pull(REPO, local_dir=out, progress=False).files) == PULLED


@pytest.mark.parametrize("change", ["cut short", "size edited", "records named"])
def test_an_offline_pull_of_a_local_dir_with_no_cached_listing_checks_the_sizes_the_pull_wrote(served, tmp_path,
                                                                                              monkeypatch, change):
    """The record of the finished pull gives each file's size, as the cached listing does: a shard cut short since (a
    copy of the folder that stopped part way) was taken whole and "verified" where the cache held no listing, while
    the same pull with the listing refused it; a record whose size is no count of bytes, or that names a file in the
    records' own folders (edited by hand: taken as the repo's, which no pull writes there), is no record of a finished
    pull."""
    server, commit = served
    out = tmp_path / "kimi"
    hub.pull(REPO, local_dir=out, progress=False)
    if change == "cut short":
        (out / SHARD_2).write_bytes((out / SHARD_2).read_bytes()[:100])
        said = f"the cached copy of {REPO}@{commit} in {out} is incomplete .*{SHARD_2} has 100 bytes"
    else:
        record = json.loads((out / ".klconvert" / "pull.json").read_text())
        if change == "size edited":
            record["files"][0]["size"] = "many"
        else:
            (out / ".cache" / "extra.safetensors").write_bytes(b"x" * 8)
            record["files"].append({"path": ".cache/extra.safetensors", "size": 8})
        (out / ".klconvert" / "pull.json").write_text(json.dumps(record))
        said = f"--local-dir {out} holds no finished pull of {REPO}@{commit}"
    monkeypatch.setattr(hub, "_cached_listing", lambda *args: None)
    with hub_environment(server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        with pytest.raises(KLError, match=said):
            hub.pull(REPO, local_dir=out, progress=False)


def test_an_offline_pull_into_a_local_dir_removes_nothing_when_it_fails(served, hub_server, tmp_path, monkeypatch):
    """An offline pull writes none of the repo's files into --local-dir, so a failure removes none of them:
    a file that changed while it ran -- another pull's, still being written -- is not its own to clean up."""
    hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)
    shard = tmp_path / "kimi" / SHARD_2

    def another_pull_writes_and_this_one_fails(*args, **kwargs):
        shard.write_bytes(b"half of a shard that another pull is writing")
        raise OSError("the disk went away")
    monkeypatch.setattr(hub, "snapshot_download", another_pull_writes_and_this_one_fails)
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        with pytest.raises(KLError, match="the disk went away"):
            hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)
    assert shard.read_bytes() == b"half of a shard that another pull is writing"


def test_a_new_commit_reuses_the_cached_blobs(served, hub_server, checkpoint):
    server, first = served
    hub.pull(REPO, progress=False)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "kimi_linear", "hidden_size": 16}))
    second = hub_server.add_repo(REPO, checkpoint)
    result = hub.pull(REPO, progress=False)
    assert result.commit == second != first
    assert result.bytes_downloaded == (checkpoint / "config.json").stat().st_size
    assert server.gets("config.json") == 2 and server.gets(SHARD_1) == server.gets(SHARD_2) == 1


def test_offline_with_an_empty_cache_says_so(hub_server, checkpoint, tmp_path):
    hub_server.add_repo(REPO, checkpoint)
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        with pytest.raises(KLError, match="HF_HUB_OFFLINE is set .* no complete copy of"):
            hub.pull(REPO, progress=False)


@pytest.mark.slow
def test_interrupted_pull_resumes_without_refetching_finished_files(served, checkpoint, tmp_path, caplog):
    server, commit = served
    server.cut_short[SHARD_2] = 4096  # the connection drops mid-file...
    server.unavailable.add(SHARD_2)  # ...and the hub stays down for it: this pull fails
    with pytest.raises(KLError, match="rerun the pull to continue"):
        hub.pull(REPO, progress=False)
    snapshot = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct" / "snapshots" / commit
    finished = [p for p in PULLED if p != SHARD_2]
    assert files_under(snapshot) == finished
    assert not list(cache_dir(tmp_path).rglob("*.incomplete"))

    server.unavailable.clear()
    result = hub.pull(REPO, progress=False)
    assert files_under(result.path) == PULLED
    assert result.bytes_downloaded == (checkpoint / SHARD_2).stat().st_size
    assert all(server.gets(p) == 1 for p in finished)
    assert server.gets(SHARD_2) == 3  # cut, 503, then the rerun
    assert not [r for r in caplog.records if r.getMessage().startswith("Error while downloading from")]


@pytest.mark.slow
def test_a_dropped_connection_resumes_with_a_range_request(served, checkpoint, monkeypatch):
    server, _ = served
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # so the bytes before the cut reach the disk
    server.cut_short[SHARD_2] = 4096
    result = hub.pull(REPO, progress=False)
    assert server.ranges[SHARD_2] == ["bytes=4096-"]
    assert (result.path / SHARD_2).read_bytes() == (checkpoint / SHARD_2).read_bytes()


def test_wrong_published_sha256_fails_naming_the_file_and_removes_it(served, tmp_path):
    server, commit = served
    server.wrong_sha256.add(SHARD_1)
    with pytest.raises(KLError, match=f"{SHARD_1} has sha256 .* the hub published"):
        hub.pull(REPO, progress=False)
    storage = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"
    assert SHARD_1 not in files_under(storage / "snapshots" / commit)
    assert not (storage / "blobs" / server.published_sha256(SHARD_1, server.repos[REPO].files[SHARD_1])).exists()

    server.wrong_sha256.clear()
    assert files_under(hub.pull(REPO, progress=False).path) == PULLED


def test_a_file_that_fails_verification_on_every_pull_is_told_apart_from_a_damaged_download(served, checkpoint):
    """The line said only "rerun to fetch them again", which never helps when the hub's published hash and its bytes
    disagree (h182): it says so, and what to do then, on each pull that fails."""
    server, commit = served
    server.wrong_sha256.add(SHARD_1)
    actual = hashlib.sha256((checkpoint / SHARD_1).read_bytes()).hexdigest()
    published = server.published_sha256(SHARD_1, server.repos[REPO].files[SHARD_1])
    for _ in range(2):
        proc = run_klconvert("pull", REPO)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.splitlines()[-1] == (
            f"klconvert: error: 1 file of {REPO}@{commit} failed verification and was removed ({SHARD_1} has "
            f"sha256 {actual}, the hub published {published}); rerun the pull to fetch it again -- if the same "
            "file fails again, the repo's file does not match the hash the hub publishes for it, which no rerun "
            "fixes: tell the repo's owner, or pull another revision (--revision)")


def test_wrong_sha256_in_a_local_dir_removes_the_file(served, tmp_path):
    server, _ = served
    server.wrong_sha256.add(SHARD_2)
    with pytest.raises(KLError, match=SHARD_2):
        hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)
    assert not (tmp_path / "kimi" / SHARD_2).exists()
    assert not (tmp_path / "kimi" / ".klconvert" / "pull.json").exists()  # no provenance for a failed pull


def test_a_users_link_in_a_local_dir_keeps_its_target(served, checkpoint, tmp_path):
    """A shard the user linked into a pulled --local-dir from elsewhere that then fails verification: the link goes,
    not the file it points to (the HF cache's own snapshot links, to its blobs, take their blob with them)."""
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"x" * (checkpoint / SHARD_2).stat().st_size)  # the published size, older than the pull
    hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)
    (tmp_path / "kimi" / SHARD_2).unlink()
    (tmp_path / "kimi" / SHARD_2).symlink_to(mine)  # huggingface_hub's metadata still calls the file current
    with pytest.raises(KLError, match=f"{SHARD_2} has sha256"):
        hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)
    assert not (tmp_path / "kimi" / SHARD_2).is_symlink() and mine.read_bytes() == b"x" * mine.stat().st_size


def test_not_enough_disk_space_is_refused_before_downloading(served, monkeypatch, tmp_path):
    server, _ = served
    monkeypatch.setattr(hub, "free_disk_bytes", lambda folder: 1000)
    with pytest.raises(KLError, match="not enough disk space .* only 1,000 bytes is free"):
        hub.pull(REPO, progress=False)
    assert sum(n for (method, _), n in server.requests.items() if method == "GET") == 0
    assert not list(cache_dir(tmp_path).rglob("*.safetensors"))


def test_index_naming_a_shard_the_repo_lacks_fails(hub_server, tmp_path):
    hub_server.add_repo(REPO, write_checkpoint(tmp_path / "broken", index_names_missing_shard=True))
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home"):
        with pytest.raises(KLError, match=r"names 1 shard that is not a file of the repo \('model-00003-of-00002"):
            hub.pull(REPO, progress=False)


def test_progress_that_is_no_bool_is_refused_before_any_request(tmp_path):
    with pytest.raises(KLError, match=r"^progress='no' is not a bool; pass True or False$"):
        hub.pull(REPO, local_dir=tmp_path / "out", progress="no")   # no hub here: a request would fail otherwise
    assert list(tmp_path.iterdir()) == []


def test_unknown_repo_and_revision_are_one_line_errors(served):
    with pytest.raises(KLError, match="has no repo moonshotai/nope .* HF_TOKEN") as unknown_repo:
        hub.pull("moonshotai/nope", progress=False)
    with pytest.raises(KLError, match="has no repo nope .* HF_TOKEN"):   # an id without an owner, as gpt2's
        hub.pull("nope", progress=False)
    with pytest.raises(KLError, match="has no revision 'v9'") as unknown_revision:
        hub.pull(REPO, revision="v9", progress=False)
    assert "\n" not in str(unknown_repo.value) + str(unknown_revision.value)


@pytest.mark.parametrize("revision", ["..", "../../../../escaped", "/tmp/escaped", "main/../main", "", "a\nb",
                                      "x" * 300])
def test_a_revision_that_is_a_path_is_refused_before_any_request(served, tmp_path, revision):
    """huggingface_hub keeps the revision as the file refs/<revision> in the cache: ".." or an absolute path wrote
    outside it (and ".." pulled main under the name "..")."""
    server, _ = served
    with pytest.raises(KLError, match="is not a branch, tag or commit name"):
        hub.pull(REPO, revision=revision, progress=False)
    assert not server.requests and not list(tmp_path.rglob("escaped*"))


def test_an_answer_the_client_cannot_follow_is_one_line(served):
    """A redirect loop (or a body that does not decode, a bad URL) raised the HTTP client's own error: a traceback."""
    server, _ = served

    class RedirectLoop:
        def _route(self, send_body):
            if not self.path.startswith("/api/models"):
                return super()._route(send_body)
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

    handler = server._server.RequestHandlerClass
    server._server.RequestHandlerClass = type("Looping", (RedirectLoop, handler), {})
    try:
        with pytest.raises(KLError, match="sent an answer the client cannot follow .*redirects.* check HF_ENDPOINT"):
            hub.pull(REPO, progress=False)
    finally:
        server._server.RequestHandlerClass = handler


def test_private_repo_needs_a_token(hub_server, checkpoint, tmp_path):
    hub_server.add_repo("moonshotai/private", checkpoint, private=True)
    hub_server.tokens.add("hf_good")
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home"):
        with pytest.raises(KLError, match="set HF_TOKEN"):
            hub.pull("moonshotai/private", progress=False)
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home", HF_TOKEN="hf_bad"):
        with pytest.raises(KLError, match="rejected the token"):
            hub.pull("moonshotai/private", progress=False)
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home", HF_TOKEN="hf_good"):
        assert files_under(hub.pull("moonshotai/private", progress=False).path) == PULLED


def _listing_plus(entry: dict):
    return lambda info: info | {"siblings": info["siblings"] + [entry]}


def _sibling(path, size=5) -> dict:
    return {"rfilename": path, "size": size, "blobId": "0" * 40}


@pytest.mark.parametrize("edit, needle", [
    (_listing_plus(_sibling("../victim.json")), "names a file '../victim.json', not a path inside the repo"),
    (_listing_plus(_sibling(None)), "names a file 'None', not a path inside the repo"),
    (_listing_plus(_sibling("a\x1b]0;title\x07.md")), "names a file 'a\\x1b]0;title\\x07.md', not a path inside"),
    (_listing_plus(_sibling("two\nlines.json")), "names a file 'two\\nlines.json', not a path inside the repo"),
    (_listing_plus(_sibling("config.json/inner.json")), "names 'config.json' both as a file and as a folder"),
    (_listing_plus(_sibling("extra.json", size="5")), "gives 'extra.json' the size 5, not a number of bytes"),
    (_listing_plus(_sibling("extra.json", size=-(1 << 40))), "the size -1099511627776, not a number of bytes"),
    (lambda info: info | {"sha": "../../../escaped"}, "resolved moonshotai/Kimi-Linear-48B-A3B-Instruct to commit "
                                                      "'../../../escaped', which is not a 40-digit sha"),
    (lambda info: b"<html>not the hub</html>", "answered for moonshotai/Kimi-Linear-48B-A3B-Instruct with something "
                                               "that is not the hub's JSON"),
    (lambda info: info | {"siblings": {"a": 1}}, "something that is not the hub's JSON"),
    (lambda info: info | {"siblings": [s | {"blobId": None} if s["rfilename"] == "config.json" else s
                                       for s in info["siblings"]]}, "gives 'config.json' no size or no hash"),
    (lambda info: info | {"siblings": [{k: v for k, v in s.items() if k != "size"} for s in info["siblings"]]},
     "no size or no hash, so it could not be verified"),
])
def test_a_hostile_listing_is_refused_before_anything_is_written(served, tmp_path, edit, needle):
    """The hub's listing names what is written, hashed and removed here: a path out of the folder, a file that is
    also a folder, sizes that are not byte counts, a commit that is not a sha, an answer that is not JSON."""
    server, _ = served
    victim = tmp_path / "victim.json"
    victim.write_text("mine")
    server.info_edit = edit
    with pytest.raises(KLError, match=re.escape(needle)):
        hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)
    assert victim.read_text() == "mine" and not (tmp_path / "kimi").exists()
    assert not list(tmp_path.rglob("escaped*"))
    assert sum(n for (method, _), n in server.requests.items() if method == "GET") == 0


@pytest.mark.parametrize("local, name_bytes", [(False, 256), (True, 250)])
def test_a_file_name_too_long_to_write_here_is_refused_before_any_download(served, tmp_path, local, name_bytes):
    """It downloaded everything else, then failed on ENAMETOOLONG. In a --local-dir huggingface_hub keeps a record
    of each file under its name plus ".metadata", so there a name of 250 bytes is already too long."""
    server, _ = served
    name = "a" * (name_bytes - len(".json")) + ".json"
    server.info_edit = _listing_plus(_sibling(f"sub/{name}"))
    with pytest.raises(KLError, match=rf"names 'sub/a{{20}}\.\.\.\.json', whose name is {name_bytes} bytes, over "
                                      rf"the {246 if local else 255} a file system takes here; leave it out with "
                                      "--exclude"):
        hub.pull(REPO, local_dir=tmp_path / "kimi" if local else None, progress=False)
    assert sum(n for (method, _), n in server.requests.items() if method == "GET") == 0
    assert hub.pull(REPO, exclude=["sub/*"], local_dir=tmp_path / "kimi" if local else None, progress=False).files


@pytest.mark.parametrize("values, needle", [
    ([1, 2], "a shard name that is not a string"),
    (["/etc/hostname"], "1 shard that is not a file of the repo ('/etc/hostname')")])
def test_an_index_naming_odd_shards_is_refused(hub_server, checkpoint, tmp_path, values, needle):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict(zip(index["weight_map"], values * len(index["weight_map"])))
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    hub_server.add_repo(REPO, checkpoint)
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home"):
        with pytest.raises(KLError, match=re.escape(needle)):
            hub.pull(REPO, progress=False)


def test_an_index_past_its_bound_is_refused_unparsed(hub_server, checkpoint, tmp_path):
    index = checkpoint / "model.safetensors.index.json"
    index.write_bytes(index.read_bytes() + b" " * (64 << 20))  # valid JSON, padded past the reader's 64 MB
    hub_server.add_repo(REPO, checkpoint)
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home"):
        with pytest.raises(KLError, match="model.safetensors.index.json: over 64 MB, far larger than any model's"):
            hub.pull(REPO, progress=False)


def test_what_huggingface_hub_refuses_mid_download_is_one_line(served, tmp_path, monkeypatch):
    """A server's X-Linked-Size past huggingface_hub's limit ends in its ValueError (\"install hf_xet\")."""
    def refuse(*args, **kwargs):
        raise ValueError("The file is too large to be downloaded using the regular download method.\nUse hf_xet")
    monkeypatch.setattr(hub, "snapshot_download", refuse)
    with pytest.raises(KLError, match=r"sent something huggingface_hub refuses while pulling .* \(The file is too "
                                      r"large to be downloaded using the regular download method\.\); check"):
        hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)


@pytest.mark.parametrize("files_first, kept", [(1, r" \(finished files are kept\)"), (0, "")])
def test_a_connection_lost_mid_download_says_to_rerun(served, monkeypatch, files_first, kept):
    """It added "or set HF_HUB_OFFLINE=1 to use a cached copy": the cache's copy of the revision being pulled is the
    one the drop left short, which an offline pull refuses as incomplete. Finished files are said to be kept only
    where a file had arrived whole (it was said of a drop before any)."""
    real_snapshot_download = hub.snapshot_download

    def drop(*args, allow_patterns, **kwargs):
        real_snapshot_download(*args, allow_patterns=allow_patterns[:files_first], **kwargs)
        raise hub.TRANSPORT_ERRORS[0]("[Errno 104] Connection reset by peer")
    monkeypatch.setattr(hub, "snapshot_download", drop)
    with pytest.raises(KLError, match=rf"^lost the connection to .* while pulling {REPO}@main \(\[Errno "
                                      rf"104\] Connection reset by peer\); rerun the pull to continue{kept}$"):
        hub.pull(REPO, progress=False)


def test_a_refusal_before_any_file_says_nothing_of_kept_files(served, monkeypatch):
    """A model info answer the guard refused ended "check HF_ENDPOINT (finished files are kept)": no file had been
    fetched. Nor is anything kept where the one file asked for is refused mid-body (h177: it was said once a file's
    body had begun to arrive)."""
    server, _ = served
    monkeypatch.setattr(hub_guard, "MAX_OTHER_BYTES", 64)
    with pytest.raises(KLError, match=rf"sent over 0 MiB in answers that are not file downloads while pulling {REPO}; "
                                      "the endpoint is not answering as the hub does -- check HF_ENDPOINT$"):
        hub.pull(REPO, progress=False)
    assert not server.requests   # no file was asked for
    monkeypatch.setattr(hub_guard, "MAX_OTHER_BYTES", 16 << 20)
    server.body_edit[SHARD_2] = "unframed"
    real_snapshot_download = hub.snapshot_download
    monkeypatch.setattr(hub, "snapshot_download", lambda *args, allow_patterns, **kwargs: real_snapshot_download(
        *args, allow_patterns=[SHARD_2], **kwargs))
    with pytest.raises(KLError, match=rf"sent over 16,472 bytes for '{SHARD_2}', the size the listing gives while "
                                      rf"pulling {REPO}; .* -- check HF_ENDPOINT$"):
        hub.pull(REPO, progress=False)


def test_a_repo_cannot_place_files_in_the_folders_of_our_records():
    """A repo's .klconvert/pull.json, left in --local-dir by a pull that then failed, named another origin for the
    model card; .cache/huggingface/ is huggingface_hub's own."""
    paths = ["config.json", ".klconvert/pull.json", ".cache/huggingface/download/x.json", "sub/.klconvert/pull.json"]
    assert hub.select_files(paths) == ["config.json", "sub/.klconvert/pull.json"]


ESCAPED = "../../../escaped"  # from the cache's blobs/ or snapshots/<commit>/ folder: out of the cache


def _file_headers(server, path: str, **changed: str) -> dict[str, str]:
    """The headers the stand-in sends for `path`, with some of them changed (None: left out)."""
    served = server.repos[REPO].files[path]
    headers = {"ETag": f'"{served.sha256 or served.blob_id}"', "X-Repo-Commit": server.repos[REPO].commit}
    if served.sha256 is not None:
        headers |= {"X-Linked-Etag": f'"{served.sha256}"', "X-Linked-Size": str(len(served.data))}
    headers |= {name.replace("_", "-"): value for name, value in changed.items()}
    return {name: value for name, value in headers.items() if value is not None}


@pytest.mark.parametrize("path, changed, gone, needle", [
    (SHARD_1, {"X_Linked_Etag": f'"{ESCAPED}"'}, False, f"with X-Linked-Etag '\"{ESCAPED}\"', which is not a digest"),
    ("config.json", {"ETag": f'W/"{ESCAPED}"'}, False, f"with ETag 'W/\"{ESCAPED}\"', which is not a digest"),
    ("config.json", {"X_Repo_Commit": ESCAPED}, False, f"from commit '{ESCAPED}', not "),
    ("config.json", {"X_Repo_Commit": ESCAPED}, True, f"from commit '{ESCAPED}', not "),
    ("config.json", {"X_Repo_Commit": "0" * 40}, False, f"from commit '{'0' * 40}', not "),   # a sha, another one
    # huggingface_hub's own refusal said "rerun the pull to continue", which cannot help
    ("config.json", {"X_Repo_Commit": None}, False, "answered for 'config.json' with no X-Repo-Commit, which the hub"),
    (SHARD_1, {"X_Repo_Commit": None}, False, f"answered for '{SHARD_1}' with no X-Repo-Commit, which the hub sends"),
])
@pytest.mark.parametrize("into", ["cache", "local_dir"])
def test_file_headers_that_would_name_paths_out_of_the_cache_are_refused(served, tmp_path, path, changed, gone,
                                                                         needle, into):
    """huggingface_hub names the blob after X-Linked-Etag (else ETag), the snapshot after X-Repo-Commit, and on a 404
    a .no_exist marker after X-Repo-Commit: from a hostile endpoint each wrote outside the cache."""
    server, commit = served
    server.header_edit[path] = _file_headers(server, path, **changed)
    if gone:
        server.gone.add(path)
    with pytest.raises(KLError, match=re.escape(needle)) as error:
        hub.pull(REPO, local_dir=tmp_path / "kimi" if into == "local_dir" else None, progress=False)
    # finished files are said to be kept where another file had arrived whole first
    assert re.search(r"the endpoint is not answering as the hub does -- check HF_ENDPOINT( \(finished files are "
                     r"kept\))?$", str(error.value))
    assert not [p for p in tmp_path.rglob("*escaped*")]


@pytest.mark.parametrize("misstated, needle", [
    ("longer", f"answered '{SHARD_2}' with 32,944 bytes where the listing gives 16,472"),
    ("unframed", f"sent over 16,472 bytes for '{SHARD_2}', the size the listing gives"),
    ("gzip", "in 'gzip' encoding when asked for none"),
])
def test_a_body_past_the_listed_size_is_cut_off_and_removed(served, tmp_path, misstated, needle):
    """A file's body stops at the size the listing gives (a declared length past it is refused before the body, an
    undeclared one at that many bytes), and an encoded body, whose size on the wire says nothing, is refused."""
    server, commit = served
    server.body_edit[SHARD_2] = misstated
    with pytest.raises(KLError, match=re.escape(needle)):
        hub.pull(REPO, progress=False)
    storage = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"
    assert SHARD_2 not in files_under(storage / "snapshots" / commit)
    assert not [p for p in storage.rglob("*") if p.is_file() and p.stat().st_size > 16 << 10]
    assert not [p for p in storage.rglob("*.incomplete")]
    del server.body_edit[SHARD_2]
    assert files_under(hub.pull(REPO, progress=False).path) == PULLED


def test_a_tree_listing_whose_next_page_never_ends_is_refused(served, monkeypatch):
    """huggingface_hub lists the tree again, following Link: next; that is bounded in answers and in bytes."""
    server, _ = served
    server.tree_next_forever = True
    monkeypatch.setattr(hub_guard, "MAX_OTHER_ANSWERS", 40)
    with pytest.raises(KLError, match="sent over 40 answers that are not file downloads"):
        hub.pull(REPO, progress=False)
    monkeypatch.setattr(hub_guard, "MAX_OTHER_ANSWERS", 10_000)
    monkeypatch.setattr(hub_guard, "MAX_OTHER_BYTES", 64 << 10)
    with pytest.raises(KLError, match="sent over 0 MiB in answers that are not file downloads"):
        hub.pull(REPO, progress=False)


def test_a_hub_that_stops_answering_its_json_requests_is_given_up(served, monkeypatch):
    """huggingface_hub sends the hub's JSON requests with no timeout: a server that never answered one, or sent it a
    byte at a time, hung the pull for good (helper-157)."""
    server, _ = served
    monkeypatch.setattr(hub_guard, "SILENCE_SECONDS", 1)
    server.api_silence = 5.0
    started = time.monotonic()
    with pytest.raises(KLError, match=re.escape(f"cannot resolve {REPO}@main at {server.endpoint} (ReadTimeout: ")):
        hub.pull(REPO, progress=False)
    assert time.monotonic() - started < 4
    server.api_silence = 0.0
    monkeypatch.setattr(hub_guard, "MAX_OTHER_SECONDS", 1)
    server.api_trickle = 0.05
    with pytest.raises(KLError, match=r"took over 1 s to answer the requests that are not file downloads while "
                                      r"pulling .*, the last /api/models/"):
        hub.pull(REPO, progress=False)
    assert time.monotonic() - started < 8


def test_a_listing_retried_after_timeouts_is_bounded_in_time_too(served, monkeypatch, caplog):
    """huggingface_hub 2.4 retries a tree listing that timed out five times, backing off between: 6 x 60 s + 23 s, past
    MAX_OTHER_SECONDS, with two lines of its own a retry before klconvert's (helper-163). The attempts that never
    finished count; huggingface_hub 1.33 and 2.0 make one, and its timeout is the line. Which a version does is told
    by what it does, not by its number (2.0 was taken as retrying, h299's F4): whether it sends the listing's first
    page through its retrying client, http_backoff, where 1.33 and 2.0 send it once."""
    from huggingface_hub.utils import _pagination

    server, _ = served
    monkeypatch.setattr(hub_guard, "SILENCE_SECONDS", 1)
    monkeypatch.setattr(hub_guard, "MAX_OTHER_SECONDS", 1.5)
    server.tree_silence = 10.0
    sent_with_retries = []
    real_backoff = _pagination.http_backoff

    def recording(method, url, *args, **kwargs):
        sent_with_retries.append(url)
        return real_backoff(method, url, *args, **kwargs)
    monkeypatch.setattr(_pagination, "http_backoff", recording)
    with pytest.raises(KLError) as refused:
        hub.pull(REPO, progress=False)
    retried = any("/tree/" in url for url in sent_with_retries)
    assert re.search(re.escape(f"{server.endpoint} took over 1.5 s to answer the requests that are not file downloads "
                               f"while pulling {REPO}, the last /api/models/{REPO}/tree/") if retried
                     else r"\(timed out\); rerun the pull", str(refused.value)), str(refused.value)
    assert not [r for r in caplog.records if "thrown while requesting" in r.getMessage()
                or r.getMessage().startswith("Retrying in")]


def test_a_file_sent_slower_than_the_floor_is_given_up(served, tmp_path, monkeypatch):
    """A file's body a byte every 9 s passes huggingface_hub's 10 s read timeout: a 5 GB shard never ended
    (helper-163). Under SLOW_WINDOW_BYTES in a window of SLOW_WINDOW_SECONDS, the pull ends in one line."""
    server, commit = served
    monkeypatch.setattr(hub_guard, "SLOW_WINDOW_SECONDS", 1)
    monkeypatch.setattr(hub_guard, "SLOW_WINDOW_BYTES", 4 << 10)
    server.slow_body[SHARD_2] = 0.5          # 16 KiB: 2 KiB/s
    with pytest.raises(KLError, match=rf"sent [\d,]+ bytes of '{SHARD_2}' in 1 s, under 4,096 a second, while pulling "
                                      rf"{REPO}; check the network connection and HF_ENDPOINT, then rerun the pull"):
        hub.pull(REPO, progress=False)
    storage = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"
    assert SHARD_2 not in files_under(storage / "snapshots" / commit)
    server.slow_body[SHARD_2] = 0.05          # 20 KiB/s: over the floor
    assert files_under(hub.pull(REPO, progress=False).path) == PULLED


def test_a_redirect_s_body_is_bounded_as_the_hub_s_json(served, monkeypatch):
    """The client reads a redirect's body whole before it follows: a 302 with 1.5 GB of body took 3.3 GB of memory
    (helper-163)."""
    server, _ = served
    server.api_redirect_body = b"x" * (64 << 10)
    monkeypatch.setattr(hub_guard, "MAX_OTHER_BYTES", 32 << 10)
    with pytest.raises(KLError, match="sent over 0 MiB in answers that are not file downloads"):
        hub.pull(REPO, progress=False)
    server.api_redirect_body = b"x" * 100   # a redirect's usual few bytes
    assert files_under(hub.pull(REPO, progress=False).path) == PULLED


def test_a_client_that_resets_its_connection_leaves_the_stand_in_quiet(capfd):
    """The stand-in printed a traceback for a connection reset mid-request into the stderr of the test running the
    pull, whose one-line check then failed (test_hash_mismatch_stops_before_quantizing, now and then under -n 4)."""
    with HubStandIn() as server:
        client = socket.create_connection(server._server.server_address[:2])
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close with a reset
        client.sendall(b"GET /api/models/")
        time.sleep(0.2)
        client.close()
        time.sleep(0.5)
    assert "Traceback" not in capfd.readouterr().err


def test_a_redirect_to_a_file_url_is_refused(served, tmp_path):
    """httpx cannot follow a 302 to file://: it read as a lost connection, and the line said to rerun the pull."""
    server, commit = served
    server.via_cdn, server.cdn_endpoint = True, "file:///etc"
    with pytest.raises(KLError, match=rf"redirected '(\S+)' to 'file:///etc/cdn/{REPO}/\1', which is not a web "
                                      "address"):   # whichever LFS file's download thread came first
        hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False)
    assert not (tmp_path / "kimi" / SHARD_1).exists()


def test_a_listing_past_the_file_bounds_is_refused(served, monkeypatch):
    monkeypatch.setattr(hub, "MAX_LISTED_FILES", 10)
    with pytest.raises(KLError, match="names 11 files, more than the 10 a model repo could hold"):
        hub.pull(REPO, progress=False)
    monkeypatch.setattr(hub, "MAX_PULLED_FILES", 3)
    monkeypatch.setattr(hub, "MAX_LISTED_FILES", 20_000)
    with pytest.raises(KLError, match=r"has 7 files to pull, more than the 3 one pull takes; narrow it with "
                                      r"--include/--exclude"):
        hub.pull(REPO, progress=False)


@pytest.mark.slow
def test_ctrl_c_stops_the_download_threads(served, tmp_path):
    """The main thread's KeyboardInterrupt waits for huggingface_hub's download threads: they stop at their next
    chunk, and leave no partial file, instead of finishing a shard."""
    server, commit = served
    server.slow_body[SHARD_2] = 0.5          # 16 KiB: 8 s to send
    threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        hub.pull(REPO, progress=False)
    assert time.monotonic() - start < 5
    storage = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"
    assert SHARD_2 not in files_under(storage / "snapshots" / commit)
    assert not [p for p in storage.rglob("*.incomplete")]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_sigterm_stops_the_download_threads_as_ctrl_c_does(served, tmp_path):
    """`kill` or `timeout` sends SIGTERM, which the entry point raises as an interrupt in the main thread alone: the
    download threads went on to the end of every file in flight (h220: 24 s on the stand-in; 8 shards of 5 GB for the
    release) before the command ended. They stop at their next chunk, as after a Ctrl-C, with SIGTERM's status."""
    server, commit = served
    server.slow_body[SHARD_2] = 0.5          # 16 KiB: 8 s to send
    storage = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"
    proc = subprocess.Popen([sys.executable, "-m", "klconvert", "pull", REPO], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(storage.rglob("*.incomplete")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)   # until a download has begun
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    err = proc.communicate(timeout=60)[1]
    assert time.monotonic() - signalled < 4
    assert proc.returncode == 143 and shown_lines(err)[-1:] == ["klconvert: interrupted"], err
    assert SHARD_2 not in files_under(storage / "snapshots" / commit)
    assert not [p for p in storage.rglob("*.incomplete")]


@pytest.mark.slow
def test_a_signal_during_the_xet_abort_does_not_wait_on_its_lock(monkeypatch):
    """A second signal landing while the first's handler aborts hf_xet's session runs the handler again, in the same
    thread, while huggingface_hub's lock (a plain threading.Lock) is held: a nested abort waited on it forever (h247's
    F4). Here the abort holds such a lock and the second signal lands inside it."""
    held = threading.Lock()
    aborts, nested = [], []

    def abort_xet_session():
        assert held.acquire(timeout=2), "the nested abort waited on the lock the first one holds"
        try:
            aborts.append(1)
            if len(aborts) == 1:
                guard._interrupt(signal.SIGINT, None)   # the second signal, landing mid-abort
        finally:
            held.release()

    monkeypatch.setattr(hub_guard, "abort_xet_session", abort_xet_session)
    guard = hub_guard.AnswerGuard("http://127.0.0.1:9", REPO)
    guard._before = {signal.SIGINT: lambda signum, frame: nested.append(signum)}
    guard._interrupt(signal.SIGINT, None)
    assert guard.cancelled and aborts == [1] and nested == [signal.SIGINT, signal.SIGINT]
    guard._interrupt(signal.SIGINT, None)   # a later signal aborts again: hf_xet may have made a session since
    assert aborts == [1, 1]


def pulled_and_interrupted() -> None:
    with pytest.raises(KeyboardInterrupt):
        hub.pull(REPO, progress=False)


def interrupt_a_xet_pull(hub_server, checkpoint, tmp_path, interrupt=lambda: os.kill(os.getpid(), signal.SIGINT),
                         pull_interrupted=pulled_and_interrupted) -> None:
    """Pull REPO through hf_xet from a storage server that does not answer (`pull_interrupted`: the pull, holding
    that it was interrupted), send SIGINT to this process (`interrupt`: a signal sent otherwise) once hf_xet has
    asked it (the downloads in flight), and hold that the pull ends within 5 s with nothing of the shards left."""
    commit = hub_server.add_repo(REPO, checkpoint)
    hub_server.xet_stall = True
    signalled = []

    def interrupt_once_hf_xet_asks():
        deadline = time.monotonic() + 60
        while not hub_server.cas_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        signalled.append(time.monotonic())
        interrupt()

    with hub_environment(hub_server.endpoint, tmp_path / "hf_home", HF_HUB_DISABLE_XET="0"):
        threading.Thread(target=interrupt_once_hf_xet_asks, daemon=True).start()
        pull_interrupted()
        assert time.monotonic() - signalled[0] < 5 and hub_server.cas_requests
    storage = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"
    assert not {SHARD_1, SHARD_2} & set(files_under(storage / "snapshots" / commit))
    assert not [p for p in storage.rglob("*.incomplete")]


def test_ctrl_c_cancels_hf_xets_downloads(hub_server, checkpoint, tmp_path):
    """hf_xet downloads through its own client, which no chunk of the guard's passes through, and huggingface_hub
    aborts it only on an interrupt in the thread that downloads, never one of snapshot_download's: a Ctrl-C waited
    for its downloads in flight (here a storage server that does not answer, which hf_xet retries for minutes). The
    guard aborts them as it stops the download threads."""
    interrupt_a_xet_pull(hub_server, checkpoint, tmp_path)


def test_a_download_thread_reaching_hf_xet_after_the_abort_is_stopped(hub_server, checkpoint, tmp_path, monkeypatch):
    """A download thread past its file's request, which the guard stops, and not yet at hf_xet when the Ctrl-C's
    abort ran made a new session and downloaded through it (60 s on the stand-in; seen under load, 1 pull in 40).
    Here the first thread to ask for hf_xet's session waits until the abort has run."""
    from huggingface_hub.utils import _xet

    aborted = threading.Event()

    def abort_then_tell():
        _xet.abort_xet_session()
        aborted.set()

    holder, asked = _xet._GLOBAL_XET_HOLDER, itertools.count()
    session_of_the_holder = holder.get

    def session_after_the_abort_for_the_first():
        if next(asked) == 0:
            assert aborted.wait(30)
        return session_of_the_holder()

    monkeypatch.setattr(hub_guard, "abort_xet_session", abort_then_tell)
    monkeypatch.setattr(holder, "get", session_after_the_abort_for_the_first)
    interrupt_a_xet_pull(hub_server, checkpoint, tmp_path)
    assert aborted.is_set() and next(asked) >= 2   # the held thread asked, after the abort


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupt_a_download_thread_takes_ends_the_pull_as_soon(hub_server, checkpoint, tmp_path, monkeypatch,
                                                                    capsys, signame):
    """A signal sent to the process (a terminal's Ctrl-C, `kill`'s SIGTERM) is taken by whichever of its threads the
    system picks: in a download thread CPython's C handler only flags it, and the Python one (the guard's, which
    stops the downloads, then the entry point's) runs once the main thread next runs Python code. That thread slept
    in huggingface_hub's wait for the downloads, with no timeout, until one ended: 60 s on the stand-in, a whole
    shard for the release (h315: 1 to 3 pulls in 40 of test_ctrl_c_cancels_hf_xets_downloads under load). Here the
    signal goes to a thread waiting in hf_xet: the command ends at once, in its line, as after any other."""
    from huggingface_hub.utils import _xet

    signum = getattr(signal, signame)
    holder, downloading = _xet._GLOBAL_XET_HOLDER, []
    session_of_the_holder = holder.get

    def session_noting_its_thread():
        downloading.append(threading.get_ident())
        return session_of_the_holder()

    def pulled_through_the_command():   # the entry point's, which takes over SIGTERM too
        code, _, err = run_main(capsys, entry.main, ["klconvert", "pull", REPO])
        assert code == 128 + signum and shown_lines(err)[-1:] == ["klconvert: interrupted"], err

    monkeypatch.setattr(holder, "get", session_noting_its_thread)
    interrupt_a_xet_pull(hub_server, checkpoint, tmp_path, lambda: signal.pthread_kill(downloading[0], signum),
                         pulled_through_the_command)


class SlowSha256:
    """hashlib's sha256 at 50 ms a chunk: to the test's clock, a file of gigabytes."""

    def __init__(self):
        self.digest = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        time.sleep(0.05)
        self.digest.update(chunk)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("taken_by", ["the process", "a hashing thread"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_an_interrupt_stops_the_verifications_hashing(tmp_path, monkeypatch, signame, taken_by):
    """Ctrl-C or SIGTERM while a pull verified its files waited for the files being hashed (HASH_WORKERS at once,
    5 GB shards for the release: seconds a GB) to be read to their end: they stop at their next chunk. Taken by a
    hashing thread (the system hands a signal sent to the process to any of its threads), it waited for that
    thread's file to be hashed whole before its handler ran: the main thread slept in the pool's wait for the
    next result, with no timeout."""
    hashing = []

    class SlowSha256NotingItsThread(SlowSha256):
        def update(self, chunk: bytes) -> None:
            hashing.append(threading.get_ident())
            super().update(chunk)

    monkeypatch.setattr(hub, "HASH_CHUNK_BYTES", 1024)
    monkeypatch.setattr(hub, "hashlib", SimpleNamespace(sha256=SlowSha256NotingItsThread, sha1=hashlib.sha1))
    folder = tmp_path / "pulled"
    folder.mkdir()
    wanted = [hub.HubFile(f"model-{n}.safetensors", 100 << 10, "0" * 64) for n in range(2 * hub.HASH_WORKERS)]
    for f in wanted:
        (folder / f.path).write_bytes(bytes(f.size))   # 100 chunks: 5 s to hash

    def interrupt(signum, frame):   # as the entry point raises either signal, in the main thread
        raise Interrupted(signum)

    signum = getattr(signal, signame)
    before = signal.signal(signum, interrupt)
    send = ((lambda: os.kill(os.getpid(), signum)) if taken_by == "the process" else
            (lambda: signal.pthread_kill(hashing[0], signum)))
    timer = threading.Timer(0.5, send)
    try:
        timer.start()
        start = time.monotonic()
        with pytest.raises(Interrupted):
            hub._verify(folder, wanted, REPO, False, VerifiedFiles(tmp_path / "verified.json"), None)
        assert time.monotonic() - start < 1.5
    finally:
        timer.cancel()   # a signal after its handler is put back would end the test run (SIGTERM's default)
        signal.signal(signum, before)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_hash_that_never_stops_ends_the_command_at_a_second_interrupt_after_its_line(tmp_path, signame):
    """A file whose read never returns (a network file system gone dead) held the command through every Ctrl-C --
    each was waited through until the hashing stopped, which it never did -- and nothing was said: only kill -9 ended
    it. The wait says, once, that it is stopping the hashing and that another Ctrl-C quits at once; the one after that
    line ends the command in its line, saying what it leaves, with 130 (SIGTERM's 143, the line naming SIGTERM), its
    process ending although the hashing threads (non-daemon, a pool's, which Python's exit joins) are still blocked."""
    signum = getattr(signal, signame)
    folder = tmp_path / "pulled"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(1024))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, threading
        from pathlib import Path
        from klconvert import hub
        from klconvert.entry import main
        from klconvert.verified_files import VerifiedFiles

        def hangs(path, size, bar, stopped):
            print("hashing", flush=True)
            threading.Event().wait()   # the read that never returns
        hub._digests = hangs
        folder = Path({str(folder)!r})
        wanted = [hub.HubFile("model.safetensors", 1024, "0" * 64)]
        main(lambda: hub._verify(folder, wanted, "the repo", False, VerifiedFiles(folder / "verified.json"), None))
        """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert select.select([child.stdout], [], [], 60)[0] and child.stdout.readline() == "hashing\n"
        child.send_signal(signum)
        assert select.select([child.stderr], [], [], 30)[0]
        notice = child.stderr.readline()
        child.send_signal(signum)
        signalled = time.monotonic()
        err = child.communicate(timeout=30)[1]
        assert time.monotonic() - signalled < 5
    finally:
        child.kill()
        child.wait()
    left = "the hashes of this run are not recorded: the next pull reads those files again"
    received = "Ctrl-C" if signum == signal.SIGINT else signame
    assert notice == f"klconvert: stopping the hashing; another {received} quits at once ({left})\n", notice
    assert child.returncode == 128 + signum and err == f"klconvert: interrupted ({left})\n", err
    assert not (folder / "verified.json").exists()   # not saved while the hashing threads could still write to it


def test_a_download_given_up_on_at_a_second_ctrl_c_is_not_cleaned_up_after(served, tmp_path, monkeypatch):
    """A download that ignores the abort (hf_xet's, hung) is given up on at a Ctrl-C after the wait's line: the
    --local-dir's clean-up after a failed download (_keep_only_this_commits_files, removing what a rerun would not
    take) would race the download still writing there, so it does not run, and the line says what may remain."""
    monkeypatch.setattr(waking_for_signals, "NOTICE_SECONDS", 0.5)
    released, cleaned = threading.Event(), []
    monkeypatch.setattr(hub, "_keep_only_this_commits_files", lambda *args: cleaned.append(args))
    main = threading.main_thread().ident

    def hangs(*args, **kwargs):   # a download that no abort stops
        signal.pthread_kill(main, signal.SIGINT)
        released.wait(10)
        raise hub_guard.PullInterrupted

    def interrupt_after_the_line(line):
        said.append(line)
        signal.pthread_kill(main, signal.SIGINT)

    said = []
    monkeypatch.setattr(hub, "snapshot_download", hangs)
    monkeypatch.setattr(waking_for_signals, "say_while_interrupted", interrupt_after_the_line)
    out = tmp_path / "kimi"
    try:
        with pytest.raises(waking_for_signals.LeftRunning):
            hub.pull(REPO, local_dir=out, progress=False)
        assert not cleaned
    finally:
        released.set()
    assert said == [f"klconvert: stopping the downloads; another Ctrl-C quits at once (partial downloads may remain in "
                    f"{out}; the next pull removes or replaces them)"]


@pytest.mark.slow
def test_an_interrupted_verification_keeps_the_files_it_finished(tmp_path, monkeypatch):
    """A Ctrl-C while a pull verified its files saved nothing of what it had hashed, so the rerun hashed every file
    again (minutes for the release's 98 GB): the files finished, and as the hub publishes them, are recorded, and
    neither a file cut off mid-hash nor one that failed."""
    monkeypatch.setattr(hub, "HASH_CHUNK_BYTES", 1024)
    monkeypatch.setattr(hub, "hashlib", SimpleNamespace(sha256=SlowSha256, sha1=hashlib.sha1))
    folder = tmp_path / "pulled"
    folder.mkdir()
    sizes = {"config.json": 1024, "tokenizer_config.json": 1024, "damaged.json": 1024,
             **{f"model-{n}.safetensors": 200 << 10 for n in range(hub.HASH_WORKERS)}}   # 10 s each to hash
    wanted = [hub.HubFile(path, size, hashlib.sha256(bytes(size)).hexdigest()) for path, size in sizes.items()]
    wanted[2] = hub.HubFile("damaged.json", 1024, "0" * 64)
    for f in wanted:
        (folder / f.path).write_bytes(bytes(f.size))
    record = tmp_path / "verified.json"

    def interrupt(signum, frame):   # as the entry point raises it, in the main thread
        raise Interrupted(signum)

    before = signal.signal(signal.SIGINT, interrupt)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(Interrupted):
            hub._verify(folder, wanted, REPO, False, VerifiedFiles(record), None)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, before)
    assert sorted(json.loads(record.read_text())["files"]) == ["config.json", "tokenizer_config.json"]

    monkeypatch.setattr(hub, "hashlib", hashlib)
    hashed = count_hashing(monkeypatch)
    with pytest.raises(KLError, match="1 file.* failed verification .*damaged.json has sha256"):
        hub._verify(folder, wanted, REPO, False, VerifiedFiles(record), None)
    assert sorted(hashed) == sorted(path for path in sizes if path not in ("config.json", "tokenizer_config.json"))


def test_no_request_leaves_after_a_ctrl_c(served):
    """A download thread that goes on to another file, or retries one, after the Ctrl-C is stopped before its request
    is sent."""
    from huggingface_hub.utils import get_session

    server, _ = served
    with hub_guard.AnswerGuard(server.endpoint, REPO):
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)   # the handler runs at the next bytecode
        with pytest.raises(hub_guard.PullInterrupted):
            get_session().get(f"{server.endpoint}/{REPO}/resolve/main/config.json")
    assert server.gets("config.json") == 0


def test_the_guard_lets_no_file_through_before_the_commit_is_resolved(served):
    """The pull resolves its commit before it asks for any file, so the guard holds every file's X-Repo-Commit to
    that one; before, it let any 40-digit sha through, an arm no pull reached and no test held."""
    from huggingface_hub.utils import get_session

    server, commit = served
    with hub_guard.AnswerGuard(server.endpoint, REPO):
        with pytest.raises(RuntimeError, match="'config.json' was asked for before the pull resolved its commit"):
            get_session().get(f"{server.endpoint}/{REPO}/resolve/{commit}/config.json")


def test_a_pull_where_sigint_is_ignored_runs_through_a_sigint(served, tmp_path):
    """Under nohup (SIGINT ignored) a SIGINT stopped the download threads, and the pull failed."""
    server, commit = served
    server.slow_body[SHARD_2] = 0.05          # 16 KiB: 0.8 s to send
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        pulled = hub.pull(REPO, progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert files_under(pulled.path) == PULLED


@pytest.mark.parametrize("under", [False, True])
def test_a_local_dir_that_is_a_file_is_said_so(tmp_path, under):
    """It said "[Errno 20] Not a directory ... rerun the pull to continue": no rerun makes a file a folder."""
    (tmp_path / "afile").write_text("mine")
    local_dir = tmp_path / "afile" / "sub" if under else tmp_path / "afile"
    said = f"goes in {tmp_path / 'afile'}, which is a file" if under else "is a file"
    with pytest.raises(KLError, match=rf"^--local-dir {re.escape(str(local_dir))}: {re.escape(said)}, not a folder; "
                                      "name a folder to download into"):
        hub.pull(REPO, local_dir=local_dir, progress=False)
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_download_is_said_to_change_files_before_it_starts(served, tmp_path, monkeypatch):
    """hf_xet writes its downloads in Rust, which the entry point's audit hook cannot hear: pull says the target
    changes before snapshot_download starts, so an interrupt from then on is cleaned up after, not ended at once."""
    calls, download = [], hub.snapshot_download
    monkeypatch.setattr(hub, "note_change", lambda path: calls.append(("change", Path(path))))
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: calls.append(("download",)) or download(*a, **k))
    hub.pull(REPO, progress=False)
    assert calls == [("change", cache_dir(tmp_path)), ("download",)]


def closed_endpoint() -> str:
    """A loopback address nothing listens on: connections to it are refused, as to a hub that cannot be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_an_unreachable_hub_says_to_check_the_network_not_to_rerun(tmp_path):
    """It said "rerun the pull to continue (finished files are kept)": nothing was fetched, and a rerun meets the
    same refused connection. With nothing cached, HF_HUB_OFFLINE=1 could not help either."""
    endpoint = closed_endpoint()
    with hub_environment(endpoint, tmp_path / "hf_home"):
        for args in (["pull", "nope/nope"], ["pull-and-quantize", "--model", "nope/nope", "--out", tmp_path / "q"]):
            proc = run_klconvert(*args)
            line = assert_one_line_error(proc.returncode, proc.stderr, f"cannot resolve nope/nope@main at {endpoint} "
                                         "(ConnectError:", "and the cache holds no copy of it; check the network "
                                         "connection, any proxy (HTTPS_PROXY) and HF_ENDPOINT")
            assert "rerun" not in line and "kept" not in line and "HF_HUB_OFFLINE" not in line, line
    assert not (tmp_path / "q").exists()


def test_an_unreachable_hub_with_a_cached_copy_points_to_it(served, tmp_path):
    """A copy pulled before: the hub unreachable now, HF_HUB_OFFLINE=1 is what works -- and does. One line, from the
    installed command too (huggingface_hub's own warning, that it used the cached commit, came first)."""
    hub.pull(REPO, progress=False)
    with hub_environment(closed_endpoint(), tmp_path / "hf_home"):
        proc = run_klconvert("pull", REPO)
        line = assert_one_line_error(proc.returncode, proc.stderr, "cannot reach ", f"to look up {REPO}@main",
                                     "set HF_HUB_OFFLINE=1 to use it")
        assert "rerun" not in line and "kept" not in line, line
    with hub_environment(closed_endpoint(), tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        assert files_under(hub.pull(REPO, progress=False).path) == PULLED


def test_pull_tiny_says_it_is_the_bundled_model(served):
    """`tiny` names the bundled model where a model goes; pull takes hub repos, and asked the hub for one."""
    server, _ = served
    proc = run_klconvert("pull", "tiny")
    assert_one_line_error(proc.returncode, proc.stderr, "tiny is the bundled model, installed with "
                          "klconvert, not a hub repo", "`klconvert run --model tiny`", "pull takes a hub repo id")
    assert not server.requests


def test_a_second_pull_into_the_same_local_dir_is_refused_while_the_first_runs(served, tmp_path):
    """Nothing kept two pulls out of one --local-dir: the second failed with a false reason ("not in the repo at
    this commit") or removed the first's files as its own unfinished ones. Now it is refused naming the first, which
    finishes whole."""
    server, commit = served
    server.slow_body[SHARD_2] = 0.1          # 16 KiB: ~2 s to send
    local_dir, lock = tmp_path / "kimi", tmp_path / "kimi.partial.lock"
    first: list = []
    pulling = threading.Thread(target=lambda: first.append(hub.pull(REPO, local_dir=local_dir, progress=False)))
    pulling.start()
    try:
        deadline = time.monotonic() + 30
        while not lock.exists():
            assert time.monotonic() < deadline and pulling.is_alive()
            time.sleep(0.01)
        with pytest.raises(KLError, match=rf"^{re.escape(str(local_dir))}: another klconvert run \(pid {os.getpid()}\) "
                                          r"is writing it"):
            hub.pull(REPO, local_dir=local_dir, progress=False)
    finally:
        pulling.join(60)
    assert first and first[0].commit == commit and not lock.exists()
    assert hub.pull(REPO, local_dir=local_dir, progress=False).files == first[0].files


@pytest.mark.parametrize("given", [".", ".."])
def test_a_local_dir_named_by_dot_or_dot_dot_is_pulled_into(served, tmp_path, monkeypatch, given):
    """The pull lock took the path as given: `.` was a ValueError traceback (a path with no name to put a lock
    beside), `..` refused as naming no folder to create."""
    here = tmp_path / "kimi" / "sub"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    result = hub.pull(REPO, local_dir=Path(given), progress=False)
    folder = here if given == "." else here.parent
    assert SHARD_1 in files_under(folder) and result.files
    assert not [p for p in tmp_path.rglob("*.lock") if ".cache" not in p.parts]


@pytest.mark.parametrize("misstated", [None, "unframed"])
def test_files_the_hub_hands_to_its_cdn_are_bounded_by_their_listed_size(served, tmp_path, monkeypatch, misstated):
    """huggingface.co answers an LFS file's resolve with a 302 to its CDN: the CDN's body is that file's, bounded by
    its listed size, not an answer of the budget other answers share (which every shard would overrun), and
    nothing else (helper-124: the stand-in never redirected, so no test told the two apart)."""
    server, commit = served
    server.via_cdn = True
    monkeypatch.setattr(hub_guard, "MAX_OTHER_BYTES", 8 << 10)   # under a shard's 16,472 bytes
    if misstated is None:
        assert files_under(hub.pull(REPO, progress=False).path) == PULLED
        return
    server.body_edit[SHARD_2] = misstated
    with pytest.raises(KLError, match=re.escape(f"sent over 16,472 bytes for '{SHARD_2}', the size the listing gives")):
        hub.pull(REPO, progress=False)
    storage = cache_dir(tmp_path) / "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"
    assert SHARD_2 not in files_under(storage / "snapshots" / commit)


# h182's audit: refusals of a pull that no test quoted -- each held to its whole line, exit 2, no traceback, nothing
# left that looks complete, and (where it gives advice) the advice followed.

STORAGE = "models--moonshotai--Kimi-Linear-48B-A3B-Instruct"


def refused_mid_pull(capsys, *args) -> str:
    """Run `klconvert pull REPO ARGS` in this process, refused once its download began: exit 2, no traceback, stdout
    empty, and on stderr the announcement, then the one line it returns."""
    code, out, err = run_cli(capsys, "pull", REPO, *args)
    lines = shown_lines(err)
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert len(lines) == 2 and lines[0].startswith(f"{REPO}@main is commit "), err
    return lines[1]


def others_first(monkeypatch) -> None:
    """Every file but SHARD_2 downloaded before the pull's own download: a failure at SHARD_2 then comes after files
    finished, as on a 98 GB pull (in one download, eight at a time, which comes first is the threads' race)."""
    real_snapshot_download = hub.snapshot_download

    def download(*args, allow_patterns, **kwargs):
        real_snapshot_download(*args, allow_patterns=[p for p in allow_patterns if p != SHARD_2], **kwargs)
        return real_snapshot_download(*args, allow_patterns=allow_patterns, **kwargs)
    monkeypatch.setattr(hub, "snapshot_download", download)


def pulled_where(tmp_path, commit, into: str) -> Path:
    """The folder a pull `into` the cache or a --local-dir (tmp_path / "kimi") fills."""
    if into == "local-dir":
        return (tmp_path / "kimi").resolve()
    return cache_dir(tmp_path) / STORAGE / "snapshots" / commit


def assert_nothing_complete_looking(tmp_path, commit, into: str) -> None:
    """The shard that failed is not there under its name, nor the record of a finished pull."""
    folder = pulled_where(tmp_path, commit, into)
    assert [p for p in files_under(folder) if not p.startswith(".")] == [p for p in PULLED if p != SHARD_2]
    assert not (folder / hub.LOCAL_DIR_RECORD).exists()


class _NoWaiting:
    """The time module as huggingface_hub's retries see it, without their waits (1 + 2 + 4 + 8 + 8 s a file)."""

    @staticmethod
    def sleep(seconds: float) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_a_server_error_mid_pull_says_to_rerun_and_the_rerun_finishes(served, tmp_path, capsys, monkeypatch, into):
    """The hub failing one shard's download (a 503 after its retries) once other files finished."""
    server, commit = served
    server.unavailable.add(SHARD_2)
    others_first(monkeypatch)
    where = ["--local-dir", tmp_path / "kimi"] if into == "local-dir" else []
    url = f"{server.endpoint}/{REPO}/resolve/{commit}/{SHARD_2}"
    assert refused_mid_pull(capsys, *where) == (
        f"klconvert: error: {server.endpoint} failed while pulling {REPO}@main: Server error '503 Service "
        f"Unavailable' for url '{url}'; rerun the pull to continue (finished files are kept)")
    assert_nothing_complete_looking(tmp_path, commit, into)
    server.unavailable.clear()
    assert files_under(hub.pull(REPO, progress=False, **({"local_dir": tmp_path / "kimi"} if where else {})).path)
    assert all(server.gets(p) == 1 for p in PULLED if p != SHARD_2)


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_a_write_failing_mid_pull_names_the_file_and_its_reason(served, checkpoint, tmp_path, capsys, monkeypatch,
                                                                into):
    """A disk's I/O error as a shard is moved into place: the line quoted Python's "[Errno 5] Input/output error:
    '/...'"; it names the file and the system's reason."""
    from huggingface_hub import file_download

    server, commit = served
    others_first(monkeypatch)
    blob = hashlib.sha256((checkpoint / SHARD_2).read_bytes()).hexdigest()
    real_move = file_download._chmod_and_move

    def failing(src, dst):
        if Path(dst).name in (SHARD_2, blob):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_move(src, dst)
    monkeypatch.setattr(file_download, "_chmod_and_move", failing)
    target = (tmp_path / "kimi").resolve() if into == "local-dir" else cache_dir(tmp_path)
    failed_at = target / (SHARD_2 if into == "local-dir" else f"{STORAGE}/blobs/{blob}")
    where = ["--local-dir", tmp_path / "kimi"] if into == "local-dir" else []
    assert refused_mid_pull(capsys, *where) == (
        f"klconvert: error: pulling {REPO}@main into {target} failed at {failed_at} (Input/output error); rerun the "
        "pull to continue (finished files are kept)")
    assert_nothing_complete_looking(tmp_path, commit, into)
    monkeypatch.undo()
    assert files_under(hub.pull(REPO, progress=False, **({"local_dir": tmp_path / "kimi"} if where else {})).path)


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_a_used_up_download_allowance_says_so_and_when_a_rerun_can_work(served, tmp_path, capsys, monkeypatch, into):
    """h299's F3: the hub's 402 for an account past its download (egress) allowance was "402 Client Error.; rerun the
    pull to continue" under huggingface_hub 2.5 (its EgressLimitError, whose reason is on later lines) and "cannot
    fetch ... (HfHubHTTPError: Client error '402 Payment Required' for url ...); rerun the pull" under 2.4: neither
    said why, and a rerun fails the same way until the allowance renews. The line names the file, the hub's reason
    and what to do."""
    server, commit = served
    server.egress_limited.add(SHARD_2)
    others_first(monkeypatch)
    assert refused_mid_pull(capsys, *(["--local-dir", tmp_path / "kimi"] if into == "local-dir" else [])) == (
        f"klconvert: error: {server.endpoint} refused {SHARD_2} of {REPO}@main with 402 Payment Required, the "
        f"account's download (egress) allowance used up ({EGRESS_MESSAGE}); rerun the pull once the allowance "
        "allows (finished files are kept), or set HF_TOKEN to an account with a larger one")
    assert_nothing_complete_looking(tmp_path, commit, into)


def test_a_402_s_reason_is_said_in_one_line_of_printable_text():
    """The reason huggingface_hub gives with a 402 is the hub's text, untrusted: its X-Error-Message and its body's
    errors, joined in lines. The line says it on one line, its controls escaped, cut at ERROR_CHARS."""
    from huggingface_hub.errors import HfHubHTTPError

    from klconvert.errors import ERROR_CHARS

    http = hub._HTTP_MODULES[0]
    url = f"http://hub.example/{REPO}/resolve/main/{SHARD_2}"
    response = http.Response(402, request=http.Request("GET", url))
    error = HfHubHTTPError("402 Client Error.", response=response,
                           server_message="Egress limit reached.\nYou've downloaded \x1b[2J5.1 TB" + " more" * 100)
    said = str(hub._allowance_used_up(error, hub_guard.AnswerGuard("http://hub.example", REPO), f"{REPO}@main"))
    reason = said.split(" used up (")[1].split("); rerun")[0]
    assert said.isprintable() and reason.startswith("Egress limit reached. You've downloaded \\x1b[2J5.1 TB more")
    assert len(reason) == ERROR_CHARS and reason.endswith("..."), reason


def test_a_file_the_hub_cannot_locate_mid_pull_says_what_it_answered(served, tmp_path, capsys, monkeypatch):
    """A shard's HEAD answering 503 (the hub down mid-pull): the line quoted huggingface_hub's own words, "An error
    happened while trying to locate the file on the Hub ... make sure your Internet connection is on.", and not
    what the hub had answered."""
    from huggingface_hub.utils import _http

    server, commit = served
    monkeypatch.setattr(_http, "time", _NoWaiting())
    others_first(monkeypatch)

    class HeadDown:
        def do_HEAD(self):
            if self.path.endswith(SHARD_2) and server.unavailable:
                return self._error(503, None, "Service Unavailable", send_body=False)
            return super().do_HEAD()

    server.unavailable.add(SHARD_2)
    handler = server._server.RequestHandlerClass
    server._server.RequestHandlerClass = type("HeadDown", (HeadDown, handler), {})
    url = f"{server.endpoint}/{REPO}/resolve/{commit}/{SHARD_2}"
    assert refused_mid_pull(capsys) == (
        f"klconvert: error: cannot fetch {REPO}@main from {server.endpoint} (HfHubHTTPError: Server error '503 Service "
        f"Unavailable' for url '{url}'); rerun the pull to continue (finished files are kept)")
    assert_nothing_complete_looking(tmp_path, commit, "cache")
    server.unavailable.clear()
    assert files_under(hub.pull(REPO, progress=False).path) == PULLED


def test_a_token_with_the_repo_name_mistyped_says_to_check_the_name(hub_server, checkpoint, tmp_path, capsys):
    """With a token the hub answers 404 for a repo it does not show (without one, 401): the name is what to check."""
    hub_server.add_repo(REPO, checkpoint, private=True)
    hub_server.tokens.add("hf_good")
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home", HF_TOKEN="hf_good"):
        code, out, err = run_cli(capsys, "pull", REPO[:-1], "--local-dir", tmp_path / "kimi")
        assert assert_one_line_error(code, err) == (
            f"klconvert: error: {hub_server.endpoint} has no repo {REPO[:-1]} visible to your token: check the name")
        assert files_under(hub.pull(REPO, local_dir=tmp_path / "kimi", progress=False).path)
    assert out == ""


def test_offline_a_local_dir_no_pull_filled_says_to_pull_online(served, tmp_path, capsys):
    """HF_HUB_OFFLINE with the commit known from the cache, but no copy in the --local-dir asked for."""
    server, commit = served
    hub.pull(REPO, progress=False)
    local_dir = tmp_path / "kimi"
    with hub_environment(server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        code, out, err = run_cli(capsys, "pull", REPO, "--local-dir", local_dir)
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: HF_HUB_OFFLINE is set and {local_dir} holds no copy of {REPO}@{commit}: unset "
        "HF_HUB_OFFLINE and pull once online")
    assert out == "" and not local_dir.exists()
    assert files_under(hub.pull(REPO, local_dir=local_dir, progress=False).path)


@pytest.mark.parametrize("edit, said", [
    (lambda info: info | {"siblings": info["siblings"] + info["siblings"][:1]}, "names 'README.md' twice"),
    (lambda info: info | {"siblings": [s | {"blobId": "zz"} if s["rfilename"] == "config.json" else s
                                       for s in info["siblings"]]},
     "gives 'config.json' a blob_id 'zz' that is not a hex digest"),
])
def test_a_malformed_listing_is_one_whole_line(served, tmp_path, capsys, edit, said):
    server, commit = served
    server.info_edit = edit
    code, out, err = run_cli(capsys, "pull", REPO, "--local-dir", tmp_path / "kimi")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {server.endpoint}'s listing of {REPO}@{commit} {said}; the repo or the endpoint is broken "
        "-- check HF_ENDPOINT, or report it to the repo's owner")
    assert out == "" and not (tmp_path / "kimi").exists()


def test_a_commit_that_is_no_sha_is_one_whole_line(served, tmp_path, capsys):
    """The commit names cache folders: one that is not 40 hex digits is refused before any is made."""
    server, _ = served
    server.info_edit = lambda info: info | {"sha": "v1.0"}
    code, out, err = run_cli(capsys, "pull", REPO)
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {server.endpoint} resolved {REPO} to commit 'v1.0', which is not a 40-digit sha; check "
        "HF_ENDPOINT")
    assert out == "" and not (cache_dir(tmp_path) / STORAGE / "snapshots").exists()


@pytest.mark.parametrize("edit", [lambda info: info | {"sha": None},
                                  lambda info: {k: v for k, v in info.items() if k != "sha"}], ids=["null", "absent"])
def test_a_model_info_without_its_commit_is_one_line(served, tmp_path, capsys, edit):
    """huggingface_hub asserts the answer has a "sha": its AssertionError was a traceback, exit 1."""
    server, _ = served
    server.info_edit = edit
    code, out, err = run_cli(capsys, "pull", REPO, "--local-dir", tmp_path / "kimi")
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: {server.endpoint} answered for {REPO} with something that is not the hub's JSON (Repo "
        "info returned from server must have a revision sha.); check HF_ENDPOINT, or retry later")
    assert out == "" and not (tmp_path / "kimi").exists()


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_an_incomplete_copy_offline_is_fetched_whole_by_the_online_pull_it_advises(served, checkpoint, tmp_path,
                                                                                    capsys, into):
    """HF_HUB_OFFLINE over a copy with a shard cut short (a disk that failed): the line says to pull online, and that
    pull failed, the cut shard taken as fetched and then refused by the verification ("rerun the pull to fetch them
    again"); it fetches it, and it alone."""
    server, commit = served
    where = {"local_dir": tmp_path / "kimi"} if into == "local-dir" else {}
    shard = hub.pull(REPO, progress=False, **where).path / SHARD_2
    shard.resolve().write_bytes(shard.read_bytes()[:1000])
    folder = pulled_where(tmp_path, commit, into)
    with hub_environment(server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        code, out, err = run_cli(capsys, "pull", REPO, *(["--local-dir", where["local_dir"]] if where else []))
    assert assert_one_line_error(code, err) == (
        f"klconvert: error: the cached copy of {REPO}@{commit} in {folder} is incomplete and HF_HUB_OFFLINE is set: "
        f"{SHARD_2} has 1,000 bytes, the hub published {(checkpoint / SHARD_2).stat().st_size:,}; unset HF_HUB_OFFLINE "
        "and rerun to fetch the rest")
    assert out == "" and shard.stat().st_size == 1000
    again = hub.pull(REPO, progress=False, **where)
    assert again.bytes_downloaded == (checkpoint / SHARD_2).stat().st_size
    assert (again.path / SHARD_2).read_bytes() == (checkpoint / SHARD_2).read_bytes()
    assert server.gets(SHARD_2) == 2 and all(server.gets(p) == 1 for p in PULLED if p != SHARD_2)


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_a_pull_refused_for_disk_space_removes_no_copy_of_another_size(served, checkpoint, tmp_path, monkeypatch,
                                                                       into):
    """A copy of another size than the hub's (a shard cut short) is removed only once the pull is past its refusals:
    one refused for disk space leaves it (h197: a user's edited config.json in a --local-dir was deleted, then the
    pull refused); the shard's refetch counts toward the space the pull needs."""
    where = {"local_dir": tmp_path / "kimi"} if into == "local-dir" else {}
    shard = hub.pull(REPO, progress=False, **where).path / SHARD_2
    shard.resolve().write_bytes(b"x" * 1000)
    size = (checkpoint / SHARD_2).stat().st_size
    monkeypatch.setattr(hub, "free_disk_bytes", lambda folder: size - 1 - 1000)   # 1,000 more once the copy goes
    with pytest.raises(KLError, match=f"needs {size:,} bytes for 1 file but only {size - 1:,} bytes is free"):
        hub.pull(REPO, progress=False, **where)
    assert shard.resolve().read_bytes() == b"x" * 1000


def test_a_pull_refused_writes_no_folder_of_huggingface_hubs_into_a_local_dir(served, checkpoint, tmp_path,
                                                                              monkeypatch):
    """A --local-dir holding a file of a shard's size and no record of anyone's: asking huggingface_hub for its
    record of that file (f7aa1be) made its .cache/huggingface/download folders there, and a pull then refused for
    disk space left them in the user's folder."""
    out = tmp_path / "kimi"
    out.mkdir()
    shutil.copy(checkpoint / SHARD_2, out / SHARD_2)
    monkeypatch.setattr(hub, "free_disk_bytes", lambda folder: 0)
    with pytest.raises(KLError, match="not enough disk space"):
        hub.pull(REPO, local_dir=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [SHARD_2]


def test_a_pull_refused_leaves_huggingface_hubs_records_as_they_were_and_reads_them_bounded(served, tmp_path,
                                                                                           monkeypatch, capfd):
    """h305: klconvert asked huggingface_hub's read_download_metadata for its record of each --local-dir file (f7aa1be),
    which removes a record it cannot parse (with a warning line), takes and makes the file's lock, waiting for as long
    as another process holds it, and reads each line whole: a pull then refused for disk space had removed the
    user's records, made lock files, and read a record of 32 MiB without a line break into memory (twice), where a
    record is three short lines. The records are read as they are, no further than MAX_DOWNLOAD_RECORD_BYTES."""
    import tracemalloc

    out = tmp_path / "kimi"
    hub.pull(REPO, local_dir=out, progress=False)
    (out / ".klconvert" / "verified.json").unlink()    # huggingface_hub's records speak
    (out / SHARD_1).unlink()          # something to fetch, so that the pull is refused
    records = out / hub.LOCAL_DIR_DOWNLOADS
    (records / f"{SHARD_2}.metadata").write_text("not a record\n")
    (records / "config.json.metadata").write_bytes(b"0" * (32 << 20))
    for lock in records.glob("*.lock"):
        lock.unlink()
    before = sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*"))
    monkeypatch.setattr(hub, "free_disk_bytes", lambda folder: 0)
    capfd.readouterr()
    tracemalloc.start()
    try:
        with pytest.raises(KLError, match="not enough disk space"):
            hub.pull(REPO, local_dir=out, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*")) == before
    assert "metadata" not in capfd.readouterr().err
    assert peak < 8 << 20, f"{peak:,} bytes"


def _pulled_commit(folder: Path) -> str:
    return json.loads((folder / hub.LOCAL_DIR_RECORD).read_text())["commit"]


def test_an_offline_pull_of_another_commit_into_a_local_dir_is_refused(served, hub_server, checkpoint, tmp_path):
    """An offline pull writes no pull record: one of another commit into a --local-dir holding a later one took the
    folder's files as its commit's (by their sizes alone) and left the record naming the later one, which quantize's
    model card and resume then took for them. Now it is refused, the folder and its record as they were."""
    server, first = served
    out = tmp_path / "kimi"
    hub.pull(REPO, local_dir=out, progress=False)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "kimi_linear", "hidden_size": 16}))
    second = hub_server.add_repo(REPO, checkpoint)
    hub.pull(REPO, local_dir=out, progress=False)
    before = {path: (out / path).read_bytes() for path in [*PULLED, hub.LOCAL_DIR_RECORD.as_posix()]}
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        with pytest.raises(KLError, match=re.escape(
                f"--local-dir {out}: holds {REPO}@{second} (its .klconvert/pull.json), not {REPO}@{first}, and "
                "HF_HUB_OFFLINE is set, so nothing is fetched or checked to make it this one; unset HF_HUB_OFFLINE "
                "and rerun to pull it into the folder, or pull into another --local-dir")):
            hub.pull(REPO, revision=first, local_dir=out, progress=False)
        assert hub.pull(REPO, revision=second, local_dir=out, progress=False).commit == second   # its own: taken
    assert {path: (out / path).read_bytes() for path in before} == before


def test_a_pull_of_another_commit_that_would_leave_the_earlier_ones_files_is_refused(served, hub_server, checkpoint,
                                                                                      tmp_path):
    """A pull of a new commit's shards alone into a --local-dir holding the earlier commit wrote a record naming the
    new commit for the folder, whose config.json and tokenizer files were still the earlier one's. Now it is refused
    before any download, naming those files; a pull of every file the folder holds goes ahead."""
    server, first = served
    out = tmp_path / "kimi"
    hub.pull(REPO, local_dir=out, progress=False)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "kimi_linear", "hidden_size": 16}))
    second = hub_server.add_repo(REPO, checkpoint)
    asked = sum(server.requests.values())
    with pytest.raises(KLError) as refused:
        hub.pull(REPO, include=["model-*"], local_dir=out, progress=False)
    assert str(refused.value) == (
        f"--local-dir {out}: holds files of {REPO}@{first} (its .klconvert/pull.json) that this pull of "
        f"{REPO}@{second} does not fetch, ['chat_template.jinja', 'config.json', 'model.safetensors.index.json', "
        "'tiktoken.model', 'tokenizer_config.json'], so the folder would hold files of both; pull without the "
        "--include/--exclude that leave them out, remove them, or pull into another --local-dir")
    assert _pulled_commit(out) == first and sum(server.requests.values()) == asked   # no file asked for
    for path in ("chat_template.jinja", "config.json", "tiktoken.model", "tokenizer_config.json"):
        (out / path).unlink()   # removed: what is left is all the new pull's
    assert hub.pull(REPO, include=["model*"], local_dir=out, progress=False).commit == second
    assert _pulled_commit(out) == second
    assert hub.pull(REPO, local_dir=out, progress=False).commit == second and _pulled_commit(out) == second


def test_a_pull_of_a_commit_that_deleted_files_the_folder_holds_names_them_to_remove(served, hub_server, checkpoint,
                                                                                     tmp_path):
    """A pull, with no --include/--exclude, of a commit that deleted a file the earlier pull wrote was told to pull
    "without the --include/--exclude that leave them out", which it had not given. It is told the file is no longer
    in the repo, to remove it or pull into another --local-dir; removed, the pull goes ahead."""
    server, first = served
    out = tmp_path / "kimi"
    hub.pull(REPO, local_dir=out, progress=False)
    (checkpoint / "chat_template.jinja").unlink()
    second = hub_server.add_repo(REPO, checkpoint)
    with pytest.raises(KLError) as refused:
        hub.pull(REPO, local_dir=out, progress=False)
    assert str(refused.value) == (
        f"--local-dir {out}: holds files of {REPO}@{first} (its .klconvert/pull.json) that {REPO}@{second} no longer "
        "has, ['chat_template.jinja'], so the folder would hold files of both; remove them, or pull into another "
        "--local-dir")
    assert _pulled_commit(out) == first
    (out / "chat_template.jinja").unlink()
    assert hub.pull(REPO, local_dir=out, progress=False).commit == second and _pulled_commit(out) == second


def test_a_pull_of_the_same_commit_by_the_repo_id_in_another_case_is_taken(served, hub_server, checkpoint, tmp_path):
    """The hub takes a repo id without regard to case: a pull of the folder's own commit, its id in other letters,
    was refused as another repo's."""
    server, first = served
    out = tmp_path / "kimi"
    hub.pull(REPO, local_dir=out, progress=False)
    assert hub_server.add_repo(REPO.lower(), checkpoint) == first
    assert hub.pull(REPO.lower(), include=["config.json"], local_dir=out, progress=False).commit == first


def reweigh_shards(checkpoint: Path) -> int:
    """New weights in the shards at the sizes they had, as a re-upload of fixed weights of the same shapes is;
    returns the shards' bytes."""
    sizes = [(checkpoint / shard).stat().st_size for shard in (SHARD_1, SHARD_2)]
    save_file({"model.embed_tokens.weight": -torch.arange(64.0).reshape(8, 8)}, str(checkpoint / SHARD_1))
    save_file({"lm_head.weight": torch.full((64, 64), 2.0)}, str(checkpoint / SHARD_2))
    assert [(checkpoint / shard).stat().st_size for shard in (SHARD_1, SHARD_2)] == sizes
    return sum(sizes)


def interrupt_during(server: HubStandIn, path: str) -> None:
    """A Ctrl-C to this process once `path`'s body has begun to arrive (sent slowly: 16 KiB take 8 s)."""
    server.slow_body[path] = 0.5

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while not server.gets(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()


@pytest.mark.parametrize("stop", ["503", pytest.param("ctrl-c", marks=pytest.mark.slow)])
@pytest.mark.parametrize("vouched", [True, False], ids=["recorded", "unrecorded"])
def test_a_failed_update_leaves_no_file_of_the_earlier_commit_under_the_new_ones_name(
        served, hub_server, checkpoint, tmp_path, capsys, monkeypatch, vouched, stop):
    """h299's F1: an update of a --local-dir to a commit whose shards kept their sizes, failing at a shard. The pull
    took a file of the right size as already here and left it to huggingface_hub, which up to 2.4 deleted it before
    the download and since 2.5 replaces it once the new one is whole: under 2.5 the failed pull left the earlier
    commit's shard beside the new commit's, and `run` and `quantize` took the mix. A file the pull's records show to
    be another commit's (`recorded`) or that nothing vouches for (`unrecorded`: records gone) is not left under its
    name, whether the hub failed the shard (503) or the user stopped the pull (Ctrl-C); the rerun finishes the new
    commit."""
    server, first = served
    out = tmp_path / "kimi"
    hub.pull(REPO, local_dir=out, progress=False)
    if not vouched:
        shutil.rmtree(out / ".cache")
        shutil.rmtree(out / hub.LOCAL_DIR_RECORD.parent)
    reweigh_shards(checkpoint)
    second = hub_server.add_repo(REPO, checkpoint)
    others_first(monkeypatch)
    if stop == "503":
        server.unavailable.add(SHARD_2)
        assert refused_mid_pull(capsys, "--local-dir", out).startswith(
            f"klconvert: error: {server.endpoint} failed while pulling {REPO}@main: Server error '503 Service "
            "Unavailable'")
    else:
        interrupt_during(server, SHARD_2)
        with pytest.raises(KeyboardInterrupt):
            hub.pull(REPO, local_dir=out, progress=False)
    assert_nothing_complete_looking(tmp_path, second, "local-dir")
    server.unavailable.clear()
    if SHARD_2 in server.slow_body:   # sent at once to the rerun (the interrupted answer's thread still reads it)
        server.slow_body[SHARD_2] = 0
    assert hub.pull(REPO, local_dir=out, progress=False).commit == second
    assert all((out / path).read_bytes() == (checkpoint / path).read_bytes() for path in PULLED)


def test_an_update_of_same_size_files_says_what_it_fetches_and_counts_the_room_it_frees(
        served, hub_server, checkpoint, tmp_path, capsys, monkeypatch):
    """h299's F2: an update of a --local-dir to a commit whose shards kept their sizes said "fetching 0 bytes" and
    0.00 GB downloaded, and checked no space, where it fetched both shards; under huggingface_hub 2.5, which keeps
    the earlier file until the new one is whole, a disk with room for one copy failed it "disk full (it fetches 0
    bytes in all ...)" on every rerun. The shards count as fetched, and the room of the earlier commit's copies,
    removed before the download, as free; where nothing vouches for a file, it is hashed first (h305) and this
    commit's is already here."""
    server, first = served
    out = tmp_path / "kimi"
    total = sum((checkpoint / path).stat().st_size for path in PULLED)
    hub.pull(REPO, local_dir=out, progress=False)
    shards = reweigh_shards(checkpoint)
    second = hub_server.add_repo(REPO, checkpoint)
    monkeypatch.setattr(hub, "free_disk_bytes", lambda folder: shards - 1)   # room for them once the old ones go
    capsys.readouterr()
    result = hub.pull(REPO, local_dir=out, progress=True)
    fetched, free, freed = size_texts(shards, shards - 1, shards)
    assert (f"{size_text(total - shards)} already here, fetching {fetched} into {out} ({free} free, {freed} more "
            "once the 2 copies here not of this commit are removed)") in capsys.readouterr().err
    assert (result.commit, result.bytes_downloaded) == (second, shards)
    assert all((out / path).read_bytes() == (checkpoint / path).read_bytes() for path in PULLED)

    shutil.rmtree(out / ".cache")   # nothing vouches for the files: hashed first, they are this commit's
    shutil.rmtree(out / hub.LOCAL_DIR_RECORD.parent)
    monkeypatch.setattr(hub, "free_disk_bytes", lambda folder: 0)
    assert hub.pull(REPO, local_dir=out, progress=False).bytes_downloaded == 0


@pytest.mark.parametrize("content", ["this commit's", "another"])
def test_copies_put_in_a_local_dir_by_hand_are_hashed_before_the_download(served, checkpoint, tmp_path, capsys,
                                                                          monkeypatch, content):
    """h305: files of the listed sizes put in a --local-dir by hand (no record of klconvert's or huggingface_hub's)
    were left to huggingface_hub, which hashes such a file only as it reaches it, and a pull stopped before then
    (Ctrl-C, a failure) removed every one it had not reached: the release's 98 GB, gone. They are hashed first:
    this commit's are already here, kept whatever happens to the download, and not fetched again; another
    content's are removed before the download as an earlier commit's copies are, their room counted free."""
    server, commit = served
    out = tmp_path / "kimi"
    out.mkdir()
    here = [path for path in PULLED if path != SHARD_2]
    for path in here:
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(checkpoint / path, out / path)
    if content == "another":
        with (out / SHARD_1).open("r+b") as shard:   # its last byte changed: the listed size, another content
            shard.seek(-1, os.SEEK_END)
            last = shard.read(1)[0]
            shard.seek(-1, os.SEEK_END)
            shard.write(bytes([last ^ 1]))
    kept = {path: (out / path).read_bytes() for path in here}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt   # as the download begins: huggingface_hub has reached no file
    monkeypatch.setattr(hub, "snapshot_download", stopped)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        hub.pull(REPO, local_dir=out, progress=True)
    fetched = [SHARD_2] + ([SHARD_1] if content == "another" else [])
    fetch_text = size_text(sum((checkpoint / path).stat().st_size for path in fetched))
    said = capsys.readouterr().err
    assert f"fetching {fetch_text} into {out}" in said, said
    assert ("more once the 1 copy here not of this commit is removed)" in said) == (content == "another"), said
    if content == "another":
        assert not (out / SHARD_1).exists()   # removed before the download
        del kept[SHARD_1]
    assert {path: (out / path).read_bytes() for path in kept} == kept
    monkeypatch.undo()
    result = hub.pull(REPO, local_dir=out, progress=False)
    assert result.bytes_downloaded == sum((checkpoint / path).stat().st_size for path in fetched)
    assert all((out / path).read_bytes() == (checkpoint / path).read_bytes() for path in PULLED)


def copied_by_hand(checkpoint: Path, out: Path, other_content: tuple[str, ...] = ()) -> None:
    """Every file a pull takes, copied into the --local-dir `out` with no record of anyone's; those in
    `other_content` with their last byte changed: the listed size, another content."""
    out.mkdir()
    for path in PULLED:
        shutil.copy(checkpoint / path, out / path)
    for path in other_content:
        with (out / path).open("r+b") as copy:
            copy.seek(-1, os.SEEK_END)
            last = copy.read(1)[0]
            copy.seek(-1, os.SEEK_END)
            copy.write(bytes([last ^ 1]))


def count_huggingface_hub_hashing(monkeypatch) -> list[str]:
    """The names of the --local-dir files huggingface_hub reads to hash (sha_fileobj, where it checks a copy it has no
    record of against an LFS file's sha256), from now on."""
    from huggingface_hub import file_download

    hashed: list[str] = []
    real = file_download.sha_fileobj

    def counting(fileobj, *args, **kwargs):
        hashed.append(Path(fileobj.name).name)
        return real(fileobj, *args, **kwargs)

    monkeypatch.setattr(file_download, "sha_fileobj", counting)
    return hashed


def test_copies_put_in_a_local_dir_by_hand_are_read_once_and_never_fetched(served, checkpoint, tmp_path, capsys,
                                                                           monkeypatch):
    """h309: all of a commit's files put in a --local-dir by hand, which the pull hashes first and finds this
    commit's (4a8ba5e), were handed to huggingface_hub all the same, which has no record of its own for them: it
    hashed every LFS copy again (98 GB for the release: minutes) and downloaded every other again (config.json, the
    tokenizer's files), which _verify then hashed a third time, while the pull said it fetched 0 bytes. Each copy is
    read once, by the pull's own check, none is fetched or rewritten (nor asked about: huggingface_hub holds its
    record of each now), and the 0 bytes it says are the bytes it fetched; the next pull reads and asks for nothing,
    and an offline one takes the repo's files, not the user's own JSON beside them."""
    server, commit = served
    out = tmp_path / "kimi"
    copied_by_hand(checkpoint, out)
    (out / "notes.json").write_text("{}")
    written = {path: ((out / path).stat().st_ino, (out / path).stat().st_mtime_ns) for path in PULLED}
    hashed, hashed_by_huggingface_hub = count_hashing(monkeypatch), count_huggingface_hub_hashing(monkeypatch)
    capsys.readouterr()
    result = hub.pull(REPO, local_dir=out, progress=True)
    assert sorted(hashed) == PULLED and hashed_by_huggingface_hub == [], (hashed, hashed_by_huggingface_hub)
    assert {key: n for key, n in server.requests.items() if n} == {}
    assert {path: ((out / path).stat().st_ino, (out / path).stat().st_mtime_ns) for path in PULLED} == written
    assert result.bytes_downloaded == 0 and f"fetching {size_text(0)} into {out}" in capsys.readouterr().err
    assert all((out / path).read_bytes() == (checkpoint / path).read_bytes() for path in PULLED)

    hashed.clear()
    again = hub.pull(REPO, local_dir=out, progress=False)
    assert (hashed, hashed_by_huggingface_hub, again.files, again.bytes_downloaded) == ([], [], result.files, 0)
    assert {key: n for key, n in server.requests.items() if n} == {}
    with hub_environment(server.endpoint, tmp_path / "hf_home", HF_HUB_OFFLINE="1"):
        assert [f.path for f in hub.pull(REPO, local_dir=out, progress=False).files] == PULLED


def test_a_copy_put_in_a_local_dir_by_hand_of_another_content_is_still_replaced(served, checkpoint, tmp_path,
                                                                              monkeypatch):
    """Beside copies of this commit's files put there by hand, a shard (LFS) and a config file (not) of the listed
    sizes and another content are fetched and replaced -- they alone, and what the pull says it fetched is their
    bytes."""
    server, commit = served
    out = tmp_path / "kimi"
    others = (SHARD_1, "config.json")
    copied_by_hand(checkpoint, out, others)
    hashed = count_hashing(monkeypatch)
    result = hub.pull(REPO, local_dir=out, progress=False)
    assert {path: n for path in PULLED if (n := server.gets(path))} == dict.fromkeys(others, 1)
    assert result.bytes_downloaded == sum((checkpoint / path).stat().st_size for path in others)
    assert all((out / path).read_bytes() == (checkpoint / path).read_bytes() for path in PULLED)
    assert sorted(hashed) == sorted([*PULLED, *others]), hashed   # each copy checked, and the two fetched verified


def interrupt_hashing_at_the_last(monkeypatch, out: Path):
    """A pull into `out` whose hashing of the copies there is cut off by a Ctrl-C at PULLED's last (one at a time, in
    PULLED's order); returns hub._digests as it was, for the rerun to hash with."""
    real = hub._digests

    def interrupted_at_the_last(path, size, bar, stopped):
        if path.name == PULLED[-1]:
            raise Interrupted(signal.SIGINT)
        return real(path, size, bar, stopped)
    monkeypatch.setattr(hub, "HASH_WORKERS", 1)
    monkeypatch.setattr(hub, "_digests", interrupted_at_the_last)
    with pytest.raises(Interrupted):
        hub.pull(REPO, local_dir=out, progress=False)
    return real


def test_copies_hashed_whole_before_a_ctrl_c_are_not_read_again_by_huggingface_hub(served, checkpoint, tmp_path,
                                                                                  monkeypatch):
    """A Ctrl-C while the pull hashed copies put in a --local-dir by hand keeps the hashes it finished (b447509), so
    the rerun takes those copies as this commit's by klconvert's record without hashing them -- and so it wrote no
    record of huggingface_hub's for them either (a14977d wrote one only for the copies hashed in the same run):
    huggingface_hub hashed every such LFS copy again and fetched every other again, the cost a14977d removed. The
    rerun reads only the copy cut off, asks the hub for nothing, and fetches 0 bytes."""
    server, commit = served
    out = tmp_path / "kimi"
    copied_by_hand(checkpoint, out)
    monkeypatch.setattr(hub, "_digests", interrupt_hashing_at_the_last(monkeypatch, out))
    hashed, hashed_by_huggingface_hub = count_hashing(monkeypatch), count_huggingface_hub_hashing(monkeypatch)
    result = hub.pull(REPO, local_dir=out, progress=False)
    assert (hashed, hashed_by_huggingface_hub) == ([PULLED[-1]], []), (hashed, hashed_by_huggingface_hub)
    assert {key: n for key, n in server.requests.items() if n} == {}
    assert result.bytes_downloaded == 0
    assert all((out / path).read_bytes() == (checkpoint / path).read_bytes() for path in PULLED)


def test_copies_put_in_a_local_dir_by_hand_with_a_later_clock_are_not_read_again(served, checkpoint, tmp_path,
                                                                               monkeypatch):
    """Copies whose modification time is ahead of this machine's clock (copied with their times from a machine whose
    clock runs ahead, or onto a file server whose does): huggingface_hub takes its record of a file only where the
    file is at most a second newer than the record, and a14977d dated the record by this machine's clock, so it
    hashed those LFS copies again and fetched the others again. The record stands for the copy as it was hashed."""
    server, commit = served
    out = tmp_path / "kimi"
    copied_by_hand(checkpoint, out)
    ahead = time.time() + 3600
    for path in PULLED:
        os.utime(out / path, (ahead, ahead))
    hashed, hashed_by_huggingface_hub = count_hashing(monkeypatch), count_huggingface_hub_hashing(monkeypatch)
    result = hub.pull(REPO, local_dir=out, progress=False)
    assert (sorted(hashed), hashed_by_huggingface_hub) == (PULLED, []), (hashed, hashed_by_huggingface_hub)
    assert {key: n for key, n in server.requests.items() if n} == {}
    assert result.bytes_downloaded == 0


@pytest.mark.parametrize("path", ["config.json", SHARD_1])
def test_a_copy_changed_after_the_pull_hashed_it_is_not_vouched_for(served, checkpoint, tmp_path, monkeypatch, path):
    """A copy put in a --local-dir by hand, hashed and found this commit's, then changed before the download (the
    release's copies take minutes to hash, and the record of huggingface_hub's went in once all were): a14977d dated
    that record by the clock when it wrote it, past the change, so huggingface_hub took the changed copy as this
    commit's, and the pull failed verification ("rerun the pull"). The record vouches for the copy as it was hashed,
    so huggingface_hub checks the changed one (an LFS copy by its hash, another by fetching it) and the pull ends
    with this commit's file."""
    server, commit = served
    out = tmp_path / "kimi"
    copied_by_hand(checkpoint, out)
    copied = time.time() - 3600   # put there an hour ago
    for name in PULLED:
        os.utime(out / name, (copied, copied))
    real, changed = hub._digests, []

    def changed_once_hashed(local, size, bar, stopped):
        digests = real(local, size, bar, stopped)
        if local.name == path and not changed:   # the same size, another content, minutes later
            changed.append(path)
            with local.open("r+b") as copy:
                copy.seek(-1, os.SEEK_END)
                last = copy.read(1)[0]
                copy.seek(-1, os.SEEK_END)
                copy.write(bytes([last ^ 1]))
            os.utime(local, (copied + 600, copied + 600))
        return digests
    monkeypatch.setattr(hub, "_digests", changed_once_hashed)
    result = hub.pull(REPO, local_dir=out, progress=False)
    assert all((out / name).read_bytes() == (checkpoint / name).read_bytes() for name in PULLED)
    assert {f.path for f in result.files} == set(PULLED)


def test_a_folder_in_a_local_dir_where_a_file_goes_is_named_before_anything_changes(served, checkpoint, tmp_path,
                                                                                   capsys):
    """A folder of the user's under a file's name (a shard's, say) was taken for a copy not of this commit, of the
    wrong size: announced as "1 copy here not of this commit" to be removed, then the pull failed removing it,
    "... failed at DIR/PATH (Is a directory); check that DIR is a folder you can write", the folder being one the user
    can write. One line names it and what to do, before anything is announced or changes."""
    out = tmp_path / "kimi"
    (out / SHARD_1).mkdir(parents=True)
    (out / SHARD_1 / "notes.txt").write_text("mine")
    shutil.copy(checkpoint / "config.json", out / "config.json")
    capsys.readouterr()
    with pytest.raises(KLError) as refused:
        hub.pull(REPO, local_dir=out, progress=True)
    assert str(refused.value) == (f"--local-dir {out}: holds a folder {SHARD_1}, where {REPO}@{served[1]} has a file; "
                                  "move it out of the way, or pull into another --local-dir")
    assert capsys.readouterr().err == ""
    assert files_under(out) == ["config.json", f"{SHARD_1}/notes.txt"]


def test_a_file_in_a_local_dir_where_a_folder_goes_is_named_before_anything_changes(hub_server, checkpoint, tmp_path,
                                                                                   capsys):
    """The other way round from a folder under a file's name: a file of the user's under the name of a folder that a
    file to pull goes in. The pull announced itself, fetched every other file, then failed "... failed at DIR/sub
    (File exists); rerun the pull to continue", on every rerun. One line names it and what to do, before anything is
    announced, fetched or changed."""
    (checkpoint / "sub").mkdir()
    (checkpoint / "sub" / "extra.json").write_text("{}")
    commit = hub_server.add_repo(REPO, checkpoint)
    out = tmp_path / "kimi"
    out.mkdir()
    (out / "sub").write_text("mine")
    capsys.readouterr()
    with hub_environment(hub_server.endpoint, tmp_path / "hf_home"), pytest.raises(KLError) as refused:
        hub.pull(REPO, local_dir=out, progress=True)
    assert str(refused.value) == (f"--local-dir {out}: holds a file sub, where {REPO}@{commit} has a folder (of "
                                  "sub/extra.json); move it out of the way, or pull into another --local-dir")
    assert capsys.readouterr().err == ""
    assert files_under(out) == ["sub"] and (out / "sub").read_text() == "mine"
    assert sum(n for (method, _), n in hub_server.requests.items() if method == "GET") == 0


def test_a_ctrl_c_while_copies_in_a_local_dir_are_hashed_keeps_the_hashes_it_finished(served, checkpoint, tmp_path,
                                                                                     monkeypatch):
    """A Ctrl-C (or SIGTERM) while the pull hashed the copies nothing vouched for (4a8ba5e: "Checking files here",
    the release's 98 GB put in by hand) saved none of what it had hashed, so the rerun hashed every copy again, as
    _verify's hashing did until it kept what it had finished: the copies hashed whole and this commit's are recorded,
    and neither one of another content (verified_at_pull believes the record) nor the one cut off."""
    out = tmp_path / "kimi"
    out.mkdir()
    for path in PULLED:
        shutil.copy(checkpoint / path, out / path)
    with (out / SHARD_1).open("r+b") as shard:   # its last byte changed: the listed size, another content
        shard.seek(-1, os.SEEK_END)
        last = shard.read(1)[0]
        shard.seek(-1, os.SEEK_END)
        shard.write(bytes([last ^ 1]))
    real = interrupt_hashing_at_the_last(monkeypatch, out)
    kept = sorted(VerifiedFiles(out / hub.VERIFIED_RECORD).entries)
    assert kept == [path for path in PULLED if path not in (SHARD_1, PULLED[-1])], kept
    monkeypatch.setattr(hub, "_digests", real)
    hashed = count_hashing(monkeypatch)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt   # as the download begins: the rerun's hashing before it is done
    monkeypatch.setattr(hub, "snapshot_download", stopped)
    with pytest.raises(KeyboardInterrupt):
        hub.pull(REPO, local_dir=out, progress=False)
    assert sorted(hashed) == sorted([SHARD_1, PULLED[-1]]), hashed


@pytest.mark.parametrize("path", ["config.json", SHARD_1])
def test_a_copy_in_a_local_dir_that_cannot_be_read_is_named_before_anything_changes(served, checkpoint, tmp_path,
                                                                                  monkeypatch, path):
    """A file of the listed size that the user cannot read (another user's, mode 600; a disk's read error), hashed
    before the download since 4a8ba5e, failed the pull 'pulling REPO@main into DIR failed at DIR/PATH (Permission
    denied); check that DIR is a folder you can write', where the folder takes files and the copy is what is wrong
    (a config file's, which huggingface_hub replaces unread, pulled before 4a8ba5e). One line names the copy, why it
    cannot be read, and what to do, and the folder is left as it was. (The refusal stands in for the mode bits, which
    do not bind root, who runs CI; under setpriv without the DAC override the real ones give the same line.)"""
    out = tmp_path / "kimi"
    out.mkdir()
    shutil.copy(checkpoint / path, out / path)

    def unreadable(file, *args, **kwargs):
        if Path(file) == out / path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return open(file, *args, **kwargs)
    monkeypatch.setattr(hub, "open", unreadable, raising=False)   # the name _digests opens a copy by
    with pytest.raises(KLError) as refused:
        hub.pull(REPO, local_dir=out, progress=False)
    assert str(refused.value) == (f"--local-dir {out}: cannot read {path} (Permission denied), a file of the size "
                                  f"{REPO}@{served[1]} lists, which a pull hashes before the download to keep it if it "
                                  "is that file; make it readable, or remove it, and rerun the pull")
    assert files_under(out) == [path] and (out / path).read_bytes() == (checkpoint / path).read_bytes()


def test_the_hub_versions_tested_are_listed_once_in_the_readme_s_interop_row():
    """h299's F5: pyproject's huggingface-hub line said "1.33 and 2.4 tested" beside the README's Interop row, which
    named 2.5.0 too. The row is the one list: pyproject points to it, and it names every version .ci/interop runs
    these tests under."""
    root = Path(__file__).resolve().parent.parent
    row = next(line for line in (root / "README.md").read_text().splitlines() if line.startswith("| huggingface-hub |"))
    listed = set(re.findall(r"\d+\.\d+\.\d+", row.split("|")[2]))
    pinned = set(re.findall(r"huggingface-hub==(\d+\.\d+\.\d+)", (root / ".ci" / "interop").read_text()))
    assert pinned and pinned <= listed, (pinned, listed)
    dependency = next(line for line in (root / "pyproject.toml").read_text().splitlines()
                      if line.strip().startswith('"huggingface-hub'))
    assert "the versions tested: README's Interop row" in dependency and "tested (" not in dependency, dependency


def killed_mid_download(server: HubStandIn, tmp_path: Path, into: str) -> list[Path]:
    """SIGKILL a `klconvert pull` (into the cache or the --local-dir tmp_path / "kimi") once huggingface_hub has begun
    SHARD_2's temporary file; each file it left behind (a download's name), grown by 1,000 bytes as a killed 5 GB
    shard's would be by gigabytes (a body is written in 10 MB pieces: here a small file's whole body at most)."""
    server.slow_body[SHARD_2] = 0.5          # 16 KiB: 8 s to send
    local_dir = tmp_path / "kimi"
    watched = local_dir / ".cache" if into == "local-dir" else cache_dir(tmp_path) / STORAGE / "blobs"
    proc = subprocess.Popen([sys.executable, "-m", "klconvert", "pull", REPO,
                             *(["--local-dir", str(local_dir)] if into == "local-dir" else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while server.gets(SHARD_2) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)   # until SHARD_2's body is on its way, its temporary file made before the request
    proc.kill()
    proc.wait()
    server.slow_body[SHARD_2] = 0
    left = sorted(watched.rglob("*.incomplete"))
    assert left and all(re.fullmatch(r".+\.[0-9a-f]{8}\.incomplete", p.name) for p in left), left
    for path in left:
        with path.open("ab") as grown:
            grown.write(b"\0" * 1000)
    return left


@pytest.mark.slow
@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_what_a_killed_pull_left_downloading_is_removed_by_the_next_and_its_room_counted(served, tmp_path, capsys,
                                                                                        monkeypatch, into):
    """huggingface_hub (1.33 to 2.5) writes each download under a name of its process's own, FILE.<8 hex>.incomplete,
    and removes it when the download fails or is interrupted, but not when the process is killed (SIGKILL, out of
    memory, power lost), and no later download reuses or removes it: for the release's 5 GB shards, 8 in flight, a
    killed pull left up to 40 GB in the cache or the --local-dir that no one sees, and that the next pull's disk check
    took as used. The next pull removes what no process is writing, past its refusals, and counts its room as
    free."""
    server, commit = served
    where = {"local_dir": tmp_path / "kimi"} if into == "local-dir" else {}
    left = killed_mid_download(server, tmp_path, into)
    n, room = len(left), sum(path.stat().st_size for path in left)
    removing = (f"once the {n} unfinished download{'s' if n > 1 else ''} a killed pull left "
                f"{'are' if n > 1 else 'is'} removed")
    monkeypatch.setattr(hub, "free_disk_bytes", lambda folder: 0)
    with pytest.raises(KLError, match=re.escape(f"is free {removing}; ")) as refused:
        hub.pull(REPO, progress=False, **where)
    assert f"but only {size_text(room)} is free" in str(refused.value)
    assert sum(path.stat().st_size for path in left) == room   # a refused pull removes nothing
    monkeypatch.undo()
    capsys.readouterr()
    result = hub.pull(REPO, progress=True, **where)
    assert f"free, {size_text(room)} more {removing})" in capsys.readouterr().err
    assert not any(path.exists() for path in left) and result.commit == commit
    assert set(PULLED) <= set(files_under(pulled_where(tmp_path, commit, into)))


def unfinished_download(tmp_path: Path, into: str, path: str, etag: str) -> tuple[Path, Path]:
    """(the name of the temporary file a download of the repo's `path` writes, ending as a killed one's would; the
    lock huggingface_hub holds while it writes one), as huggingface_hub names them in the cache and in the
    --local-dir tmp_path / "kimi"."""
    if into == "local-dir":
        files = get_local_download_paths(tmp_path / "kimi", path)
        begun, lock = files.incomplete_path(etag), files.lock_path
    else:
        begun = cache_dir(tmp_path) / STORAGE / "blobs" / f"{etag}.incomplete"
        lock = cache_dir(tmp_path) / ".locks" / STORAGE / f"{etag}.lock"
    return begun.with_name(f"{begun.stem}.0123abcd.incomplete"), lock


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_unfinished_downloads_beside_a_lock_another_process_holds_are_kept(served, checkpoint, tmp_path, capsys,
                                                                           into):
    """Where another process holds one of huggingface_hub's locks beside them (another pull, `hf download`, here of
    README.md, which this pull leaves on the hub: a lock this pull takes would hold it up), a file there may be that
    process's, however old: all are kept and their room not counted; once the lock is free, the next pull removes
    them."""
    where = {"local_dir": tmp_path / "kimi"} if into == "local-dir" else {}
    hub.pull(REPO, progress=False, **where)
    left = unfinished_download(tmp_path, into, SHARD_2, hashlib.sha256((checkpoint / SHARD_2).read_bytes())
                               .hexdigest())[0]
    left.write_bytes(b"\0" * 1000)
    lock = unfinished_download(tmp_path, into, "README.md", git_blob_id((checkpoint / "README.md").read_bytes()))[1]
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; lock = open(sys.argv[1], 'a'); "
                               "fcntl.flock(lock, fcntl.LOCK_EX); print(flush=True); sys.stdin.read()", str(lock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()   # the lock is held
        capsys.readouterr()
        hub.pull(REPO, progress=True, **where)
        assert "a killed pull left" not in capsys.readouterr().err and left.stat().st_size == 1000
    finally:
        holder.communicate(b"", timeout=60)
    hub.pull(REPO, progress=True, **where)
    assert "free, 1,000 bytes more once the 1 unfinished download a killed pull left is removed)" in \
        capsys.readouterr().err
    assert not left.exists()


def test_unfinished_downloads_are_told_by_their_locks_past_the_open_files_limit(served, tmp_path, capsys):
    """h305: a cache keeps a lock of huggingface_hub's for each file version of the repo it ever fetched, and never
    removes one; the pull held them all open at once to tell whether any was taken, and past `ulimit -n` (1,024 by
    default on many systems) one could not be opened and counted as held, so that a killed pull's leftovers stayed
    for good, their room not counted, and nothing said so. Here 300 locks past a limit 200 above the files open."""
    hub.pull(REPO, progress=False)
    locks = cache_dir(tmp_path) / ".locks" / STORAGE
    for version in range(300):
        (locks / f"{version:040x}.lock").touch()
    left = cache_dir(tmp_path) / STORAGE / "blobs" / f"{'a' * 64}.0123abcd.incomplete"
    left.write_bytes(b"\0" * 1000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 200, hard))
    try:
        capsys.readouterr()
        hub.pull(REPO, progress=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "1,000 bytes more once the 1 unfinished download a killed pull left is removed)" in capsys.readouterr().err
    assert not left.exists()


@pytest.mark.parametrize("into", ["cache", "local-dir"])
def test_an_unfinished_download_the_pull_may_not_remove_is_left_and_the_pull_goes_on(served, checkpoint, tmp_path,
                                                                                    monkeypatch, into):
    """h305: a killed pull's leftover that this user may not remove -- another user's in a shared cache whose folders
    have the sticky bit (`chmod 1777`, as /tmp: only a file's owner removes it), or one made immutable -- failed every
    pull of the repo, 'failed at .../blobs/<etag>.<8 hex>.incomplete (Operation not permitted); check that CACHE is a
    folder you can write', where nothing else was wrong: removing them is the pull's tidying, not its work. It is left,
    and the pull goes on. (The refusal stands in for the sticky bit, which does not bind root, who runs CI.)"""
    where = {"local_dir": tmp_path / "kimi"} if into == "local-dir" else {}
    hub.pull(REPO, progress=False, **where)
    left = unfinished_download(tmp_path, into, SHARD_2, hashlib.sha256((checkpoint / SHARD_2).read_bytes())
                               .hexdigest())[0]
    left.write_bytes(b"\0" * 1000)
    unlink = Path.unlink

    def refused(path, missing_ok=False):
        if path == left:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        return unlink(path, missing_ok=missing_ok)
    monkeypatch.setattr(Path, "unlink", refused)
    assert hub.pull(REPO, progress=False, **where).commit == served[1]
    assert left.stat().st_size == 1000


def test_what_is_not_huggingface_hubs_unfinished_download_of_this_repo_is_kept(served, hub_server, checkpoint,
                                                                                tmp_path):
    """Only huggingface_hub's temporary names in its own folders of this repo go: another repo's in the cache, an
    `<etag>.incomplete` (which huggingface_hub before 1.33 resumes), and a user's own files named *.incomplete
    elsewhere in a --local-dir are left, while the pull removes its repo's."""
    etag = hashlib.sha256((checkpoint / SHARD_2).read_bytes()).hexdigest()
    hub_server.add_repo("other/model", checkpoint)
    hub.pull("other/model", progress=False)
    out = tmp_path / "kimi"
    hub.pull(REPO, progress=False)
    hub.pull(REPO, local_dir=out, progress=False)
    theirs = [cache_dir(tmp_path) / "models--other--model" / "blobs" / f"{etag}.0123abcd.incomplete",
              cache_dir(tmp_path) / STORAGE / "blobs" / f"{etag}.incomplete",
              out / f"{'0' * 32}.incomplete", out / "notes" / "draft.0123abcd.incomplete",
              out / ".cache" / "mine" / f"{'0' * 32}.incomplete"]
    for path in theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"kept")
    ours = [unfinished_download(tmp_path, into, SHARD_2, etag)[0] for into in ("cache", "local-dir")]
    ours.append(ours[1].with_name(f"{'0' * 32}.incomplete"))   # 2.5's copy from the cache into a --local-dir
    for path in ours:
        path.write_bytes(b"\0" * 1000)
    hub.pull(REPO, progress=False)
    hub.pull(REPO, local_dir=out, progress=False)
    assert [path.read_bytes() for path in theirs] == [b"kept"] * len(theirs)
    assert not any(path.exists() for path in ours)
