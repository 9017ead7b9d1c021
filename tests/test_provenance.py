"""source_origin takes the repo and commit for the model card from the source folder's `.klconvert/pull.json`, which
is as untrusted as the rest of the folder: a well-formed record is taken, anything else ignored (the source is then
named as a local folder), without a traceback, a wait on a FIFO, or a read past the record's bound."""
from __future__ import annotations

import json
import os

import pytest
from huggingface_hub.file_download import repo_folder_name

from klconvert.convert.provenance import source_origin
from klconvert.hub import LOCAL_DIR_RECORD, MAX_PULL_RECORD_BYTES

REPO = "moonshotai/Kimi-Linear-48B-A3B-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def record(folder):
    path = folder / LOCAL_DIR_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_well_formed_record_names_the_repo_and_commit(tmp_path):
    record(tmp_path).write_text(json.dumps({"repo": REPO, "commit": COMMIT, "files": []}))
    origin = source_origin(tmp_path)
    assert (origin.folder, origin.repo, origin.commit) == (tmp_path.resolve(), REPO, COMMIT)


def test_a_snapshot_of_the_hub_cache_names_the_repo_and_commit(tmp_path):
    """klconvert/hf_cache.py writes the cache's layout out (so that the runtime loads no huggingface_hub): it is held
    here to the folder huggingface_hub names a repo's snapshots after."""
    snapshot = tmp_path / repo_folder_name(repo_id=REPO, repo_type="model") / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    origin = source_origin(snapshot)
    assert (origin.folder, origin.repo, origin.commit) == (snapshot.resolve(), REPO, COMMIT)


@pytest.mark.parametrize("repo_folder, name", [
    ("models--org--name", "mine"),                     # a name that is no commit
    ("models--evil--x: y #z", COMMIT),                 # a repo id the hub has none of (it went into the card's YAML)
    ("models--a--b--c", COMMIT),
], ids=["a name for a commit", "a repo id that is none", "three parts"])
def test_a_folder_that_only_looks_like_a_snapshot_is_a_local_folder(tmp_path, repo_folder, name):
    """Any .../models--A--B/snapshots/NAME/ was taken as the hub's commit NAME of A/B (h177): a folder so named had
    its shards' mtimes dropped from the resume check, so a quantize resumed over weights changed in place, and its
    name went into the model card's front matter. It is held to what a pull record is held to."""
    snapshot = tmp_path / repo_folder / "snapshots" / name
    snapshot.mkdir(parents=True)
    origin = source_origin(snapshot)
    assert (origin.folder, origin.repo, origin.commit) == (snapshot.resolve(), None, None)


@pytest.mark.parametrize("write", [
    lambda p: p.write_text(json.dumps({"repo": f"{REPO}\nbase_model: someone/else", "commit": COMMIT})),
    lambda p: p.write_text(json.dumps({"repo": REPO, "commit": "main"})),
    lambda p: p.write_text(json.dumps({"repo": ["x"], "commit": COMMIT})),
    lambda p: p.write_text(json.dumps([REPO, COMMIT])),
    lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
    lambda p: (p.touch(), os.truncate(p, 8 << 30)),  # sparse: 8 GB that is never read whole
    os.mkfifo,
], ids=["a newline in the repo", "a branch for a commit", "a list for a repo", "a list for the record",
        "nested too deeply", "huge", "a FIFO"])
def test_anything_else_is_ignored(tmp_path, write):
    write(record(tmp_path))
    origin = source_origin(tmp_path)
    assert (origin.folder, origin.repo, origin.commit) == (tmp_path.resolve(), None, None)


def test_a_record_past_its_own_bound_is_ignored_unparsed(tmp_path):
    """The record is a small one, bounded by MAX_PULL_RECORD_BYTES, not the verified-files record's 64 MB: 63 MB of
    `[[]]` took 2.4 GB to parse. One well formed but a byte past the bound is not taken."""
    body = json.dumps({"repo": REPO, "commit": COMMIT, "files": []})
    record(tmp_path).write_text(body[:-1] + ', "pad": "' + "x" * (MAX_PULL_RECORD_BYTES - len(body) - 10) + '"}')
    assert record(tmp_path).stat().st_size == MAX_PULL_RECORD_BYTES + 1
    origin = source_origin(tmp_path)
    assert (origin.folder, origin.repo, origin.commit) == (tmp_path.resolve(), None, None)
