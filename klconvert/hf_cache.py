"""The Hugging Face cache's layout, as huggingface_hub writes it: CACHE/models--ORG--NAME/ holds snapshots/COMMIT/, a
link per file into blobs/, where each file is stored once under its ETag. Written out here rather than imported, so
that reading a model folder (the runtime's) loads no huggingface_hub; tests/test_provenance.py holds it to
huggingface_hub's repo_folder_name."""
from __future__ import annotations

SNAPSHOTS = "snapshots"
BLOBS = "blobs"
REPO_SEPARATOR = "--"   # a hub repo id holds none (huggingface_hub's validate_repo_id), so the name parses back
MODEL_FOLDER_PREFIX = f"models{REPO_SEPARATOR}"


def repo_of_model_folder(name: str) -> str | None:
    """The repo id (org/name) a model's folder in the cache is named after, or None for a name that is not one."""
    if not name.startswith(MODEL_FOLDER_PREFIX):
        return None
    return name.removeprefix(MODEL_FOLDER_PREFIX).replace(REPO_SEPARATOR, "/")
