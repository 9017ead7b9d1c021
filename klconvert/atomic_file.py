"""A small file written whole or not at all: the one way klconvert writes its JSON records, configs and tokenizer
files (tensors go through checkpoint.safetensors_writer)."""
from __future__ import annotations

import os
from pathlib import Path

from klconvert.disk_space import writing


def write_atomically(path: Path, data: bytes) -> None:
    """`data` as `path`, whole or not at all. Written first to a hidden name beside `path` that is this process's own
    (created exclusively: a link put at that name is refused, not followed), then renamed over `path` (a link there
    is replaced, never written through); a failed write leaves nothing behind, and names `path` (`writing`)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    temporary.unlink(missing_ok=True)
    try:
        with writing(path, len(data)), open(temporary, "xb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
