"""The record of what a pull verified, kept beside the files: each file's size, mtime and hashes, so that a second
pull of a complete copy re-hashes only the files that changed since (~98 GB of shards otherwise)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from klconvert.atomic_file import write_atomically
from klconvert.checkpoint.folder_files import JSON_CONTAINERS_SLACK
from klconvert.checkpoint.regular_file import read_json
from klconvert.errors import KLError, argument
from klconvert.hf_cache import SNAPSHOTS

# What was verified (size, mtime, hashes), so a second pull re-hashes only what changed: in a --local-dir, and in
# the cache beside the repo's snapshots (never inside them), one record per commit (cached_record).
VERIFIED_RECORD = Path(".klconvert") / "verified.json"

MAX_RECORD_BYTES = 64 << 20  # far above any real record (a few hundred bytes a file); a larger one is ignored
# JSON values a record holds (json_values): ~6 a file (a pull takes at most hub.MAX_PULLED_FILES); past it one is
# ignored unparsed
MAX_RECORD_VALUES = JSON_CONTAINERS_SLACK


class VerifiedFiles:
    """{repo path: size, mtime_ns, sha256, git_blob_id} for one folder of pulled files, read from and saved to
    `record`. An entry stands only while the file on disk has the size and mtime it had when it was hashed."""

    def __init__(self, record: Path):
        self.record = record
        self.entries: dict[str, dict] = {}
        try:
            body = read_json(record, MAX_RECORD_BYTES, "verified-files record", MAX_RECORD_VALUES)
            self.entries = {p: e for p, e in body["files"].items() if _well_formed(e)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, KLError):
            self.entries = {}  # no record, or a damaged, huge or special one: everything is hashed again

    def digests(self, path: str, stat: os.stat_result) -> tuple[str, str] | None:
        """(sha256, git blob id) recorded for `path`, if the file (whose stat is given) is unchanged since."""
        e = self.entries.get(path)
        if e is None or (e["size"], e["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
            return None
        return e["sha256"], e["git_blob_id"]

    def remember(self, path: str, stat: os.stat_result, sha256: str, git_blob_id: str) -> None:
        """Record `path` as hashed; `stat` is taken before hashing, so a change during it shows next time."""
        self.entries[path] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256,
                              "git_blob_id": git_blob_id}

    def forget(self, path: str) -> None:
        self.entries.pop(path, None)

    def save(self) -> None:
        """Write the record atomically (a temporary file per process, then a rename). A record that cannot be
        written costs only time (the next pull hashes again), so that is not an error."""
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.record, (json.dumps({"files": self.entries}, indent=1, sort_keys=True) + "\n")
                             .encode())
        except OSError:
            pass


def _well_formed(e) -> bool:
    return (isinstance(e, dict) and all(isinstance(e.get(k), int) for k in ("size", "mtime_ns"))
            and all(isinstance(e.get(k), str) for k in ("sha256", "git_blob_id")))


def cached_record(storage: Path, commit: str) -> Path:
    """The record of a pull of `commit` into the HF cache, whose repo folder (models--ORG--NAME) is `storage`."""
    return storage / VERIFIED_RECORD.parent / "verified" / f"{commit}.json"


def verified_at_pull(path: Path) -> bool:
    """Whether `path`, a model's file, is one a pull checked against the hash the hub publishes for it, unchanged since
    (the size and mtime its record holds): a file of a snapshot in the HF cache, or of a --local-dir pull."""
    try:
        found = os.stat(path)   # through the cache's link: its blob, as the pull hashed it
        folder = Path(os.path.realpath(Path(path).parent))   # the file's own link not followed: blobs/ holds no record
        for top in (folder, *folder.parents):
            if top.parent.name == SNAPSHOTS:
                record = cached_record(top.parent.parent, top.name)
            elif os.path.isfile(top / VERIFIED_RECORD):
                record = top / VERIFIED_RECORD
            else:
                continue
            return VerifiedFiles(record).digests((folder / Path(path).name).relative_to(top).as_posix(), found) \
                is not None
    except (OSError, ValueError):   # none there, or a name no path holds: not verified
        pass
    return False


def redownload_advice(path: str | Path, local: str = "re-download the model") -> str:
    """What a line about a damaged model file (at `path`) says to do: `local`, a download again, unless a pull verified
    the file, unchanged since (verified_at_pull) -- a re-download brings the same bytes then, the repo's own."""
    if not verified_at_pull(Path(path)):
        return local
    return (f"report it to the repo's owner, or pull another {argument('revision', '--revision')}: a pull checked "
            "this file against the hash the hub publishes, so a re-download brings the same bytes")
