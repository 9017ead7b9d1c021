"""Where a source checkpoint came from (hub repo and commit, or a local folder), and a cheap fingerprint of it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import validate_repo_id

from klconvert.checkpoint.folder_files import CONFIG_FILE
from klconvert.checkpoint.reader import Checkpoint
from klconvert.checkpoint.regular_file import read_bounded, read_json
from klconvert.config import MAX_CONFIG_BYTES
from klconvert.errors import KLError, controls_escaped
from klconvert.hex_digests import GIT_SHA
from klconvert.hf_cache import SNAPSHOTS, repo_of_model_folder
from klconvert.hub import LOCAL_DIR_RECORD, MAX_PULL_RECORD_BYTES
from klconvert.models import BUNDLED_DIR, BUNDLED_NAME


@dataclass(frozen=True)
class SourceOrigin:
    """The source folder and, when known, the hub repo and commit it was pulled from."""

    folder: Path
    repo: str | None = None
    commit: str | None = None

    @property
    def bundled(self) -> bool:
        """Whether the source is klconvert's bundled model (`tiny`), wherever klconvert is installed."""
        return self.folder == BUNDLED_DIR

    def describe(self) -> str:
        """The source as quantize's summary and model card name it: a local folder by its name alone, as the card
        goes to the hub, where the folder's path would show the user's home and layout (and tell apart the cards of one
        source kept in two places), its control characters escaped (a newline in it made a line of its own, a
        heading in the card); `folder` keeps the path for the resume fingerprint and the pull remedy."""
        if self.bundled:
            return f"the bundled model {BUNDLED_NAME}"
        return f"{self.repo}@{self.commit}" if self.repo else f"local folder {controls_escaped(self.folder.name)}"


def source_origin(folder: str | Path) -> SourceOrigin:
    """The origin recorded by `klconvert pull --local-dir` (.klconvert/pull.json), else read off an HF cache
    snapshot path, else just the folder."""
    folder = Path(folder).resolve()
    try:  # the record is the folder's, as untrusted as the rest of it: it is taken only when well formed
        record = read_json(folder / LOCAL_DIR_RECORD, MAX_PULL_RECORD_BYTES, "pull record")
        repo, commit = record["repo"], record["commit"]
        validate_repo_id(repo)  # a ValueError unless a hub repo id: it goes into the model card's front matter
        if GIT_SHA.fullmatch(commit):
            return SourceOrigin(folder, repo, commit)
    except (OSError, ValueError, RecursionError, KLError, KeyError, TypeError):
        pass
    repo = repo_of_model_folder(folder.parent.parent.name)
    # held to what a pull record is held to: any .../models--A--B/snapshots/NAME/ is no pinned commit (one taken so
    # dropped its shards' mtimes from the resume check, and its name went into the model card's front matter)
    if folder.parent.name == SNAPSHOTS and repo is not None and GIT_SHA.fullmatch(folder.name):
        try:
            validate_repo_id(repo)
        except ValueError:
            return SourceOrigin(folder)
        return SourceOrigin(folder, repo, folder.name)
    return SourceOrigin(folder)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_fingerprint(checkpoint: Checkpoint, origin: SourceOrigin) -> dict:
    """What identifies a source for resuming: folder, commit, config.json, and each shard's size and header; for
    a folder with no hub commit, each shard's modification time too.

    Not the shards' bytes: hashing 98 GB takes minutes. A hub commit pins them (a pull has verified them), so a
    shard damaged and downloaded again has the same fingerprint and the conversion still resumes after it; a
    local folder has no such pin, and a fine-tune saved over it keeps every size and header.
    """
    shards = {}
    for shard, header in sorted(checkpoint.headers.items()):
        entries = {name: [e.dtype, list(e.shape), e.begin, e.end] for name, e in header.tensors.items()}
        found = (checkpoint.folder / shard).stat()
        shards[shard] = {"size": found.st_size, "header_sha256": _sha256(json.dumps(entries, sort_keys=True).encode())}
        if origin.commit is None:
            shards[shard]["mtime_ns"] = found.st_mtime_ns
    return {"folder": str(origin.folder), "repo": origin.repo, "commit": origin.commit,
            "config_sha256": _sha256(read_bounded(checkpoint.folder / CONFIG_FILE, MAX_CONFIG_BYTES, CONFIG_FILE)),
            "shards": shards}
