"""The hex digests the hub names commits and files by, which a pull, a pull record and a resume record are held to
(lowercase, as the hub and hashlib write them)."""
from __future__ import annotations

import re

GIT_SHA = re.compile(r"[0-9a-f]{40}")     # a git object id: a commit, or a file's blob id
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a file's sha256: the hub's for an LFS file, and ours for a finished shard
HASH_CHUNK_BYTES = 8 << 20  # how much of a file is read at a time to hash it (a pull's check, a resume's)
