"""Where a source checkpoint came from (hub repo and commit, or a local folder), and a cheap fingerprint of it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from klconvert.checkpoint.reader import Checkpoint
from klconvert.hub import LOCAL_DIR_RECORD

HF_CACHE_REPO_PREFIX = "models--"  # the HF cache's models--org--name/snapshots/<commit>/ layout


@dataclass(frozen=True)
class SourceOrigin:
    """The source folder and, when known, the hub repo and commit it was pulled from."""

    folder: Path
    repo: str | None = None
    commit: str | None = None

    def describe(self) -> str:
        return f"{self.repo}@{self.commit}" if self.repo else f"local folder {self.folder}"


def source_origin(folder: str | Path) -> SourceOrigin:
    """The origin recorded by `klconvert pull --local-dir` (.klconvert/pull.json), else read off an HF cache
    snapshot path, else just the folder."""
    folder = Path(folder).resolve()
    try:
        record = json.loads((folder / LOCAL_DIR_RECORD).read_text(encoding="utf-8"))
        if isinstance(record.get("repo"), str) and isinstance(record.get("commit"), str):
            return SourceOrigin(folder, record["repo"], record["commit"])
    except (OSError, ValueError, AttributeError):
        pass
    storage = folder.parent.parent
    if folder.parent.name == "snapshots" and storage.name.startswith(HF_CACHE_REPO_PREFIX):
        return SourceOrigin(folder, storage.name.removeprefix(HF_CACHE_REPO_PREFIX).replace("--", "/"), folder.name)
    return SourceOrigin(folder)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_fingerprint(checkpoint: Checkpoint, origin: SourceOrigin) -> dict:
    """What identifies a source for resuming: folder, commit, config.json, and each shard's size and header.

    Not the shards' bytes: hashing 98 GB takes minutes, and a pull has already verified them. A shard
    damaged and downloaded again has the same fingerprint, so the conversion still resumes after it.
    """
    shards = {}
    for shard, header in sorted(checkpoint.headers.items()):
        entries = {name: [e.dtype, list(e.shape), e.begin, e.end] for name, e in header.tensors.items()}
        shards[shard] = {"size": (checkpoint.folder / shard).stat().st_size,
                         "header_sha256": _sha256(json.dumps(entries, sort_keys=True).encode())}
    return {"folder": str(origin.folder), "repo": origin.repo, "commit": origin.commit,
            "config_sha256": _sha256((checkpoint.folder / "config.json").read_bytes()), "shards": shards}
