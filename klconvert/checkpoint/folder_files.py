"""The files of a checkpoint folder found by name, and how large its index and side files may be read (no torch
here: the hub's pull checks the index it downloaded too)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from klconvert.errors import KLError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # a checkpoint of one shard and no index
GENAI_CONFIG = "genai_config.json"  # what `klconvert export-onnx` writes last: an ONNX export, not a checkpoint
MAX_INDEX_BYTES = 64 << 20  # the released index is 2 MB for 20,253 tensors
MAX_SIDE_FILE_BYTES = 32 << 20  # a side file an output copies (tokenizer, chat template, small config); released: <3 MB


def refuse_large_side_files(paths: Iterable[Path]) -> None:
    """KLError for the first side file over MAX_SIDE_FILE_BYTES (checked before an output is begun; the copy then
    reads no further than the bound)."""
    for path in paths:
        size = path.stat().st_size
        if size > MAX_SIDE_FILE_BYTES:
            raise KLError(f"{path}: {size:,} bytes, over the {MAX_SIDE_FILE_BYTES >> 20} MB a side file klconvert "
                          "copies (tokenizer, chat template, small config) may be; remove it or re-download the model")
