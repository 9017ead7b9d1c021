"""The files of a checkpoint folder found by name, and how large its index and side files may be read (no torch
here: the hub's pull checks the index it downloaded too)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from klconvert.checkpoint.regular_file import read_bounded
from klconvert.errors import KLError, read_failure
from klconvert.hf_cache import BLOBS, SNAPSHOTS
from klconvert.units import binary_size_text

CONFIG_FILE = "config.json"  # the model's config, transformers' name for it
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"  # a checkpoint of one shard and no index
PICKLED_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")  # transformers' pickled weights: never read
RECIPE_FILE = "recipe.yaml"  # what `klconvert quantize` writes into its output: the recipe it applied, provenance
RECIPE_HEADER = "# The quantization recipe klconvert applied (llm-compressor recipe shape).\n"  # its first line
GENAI_CONFIG = "genai_config.json"  # what `klconvert export-onnx` writes last: an ONNX export, not a checkpoint
MAX_INDEX_BYTES = 64 << 20  # the released index is 2 MB for 20,253 tensors
# Objects and arrays a model's JSON holds beside one for each of its entries: its own, its metadata's, and `[` `{`
# in names and strings.
JSON_CONTAINERS_SLACK = 1 << 16
# An index's JSON values (json_values): an entry a stored tensor (the released bf16 index 20,253; packed, up to ~4 a
# weight), each after its comma; parsed, 2**20 short entries take ~160 MB (64 MB of them took 1.1 GB).
MAX_INDEX_VALUES = 1 << 20
MAX_FILE_NAME_BYTES = 255  # NAME_MAX of Linux's, macOS's and Windows' file systems
MAX_SIDE_FILE_BYTES = 32 << 20  # a side file an output copies (tokenizer, chat template, small config); released: <3 MB
# The end of a line for weights that config.json does not make: which of the two is wrong, a reader cannot tell
CONFIG_MISMATCH = ("the checkpoint does not match its config.json -- put back the config.json its weights came with, "
                   "or download the checkpoint again")


def is_plain_file_name(name: object) -> bool:
    """Whether `name`, read from untrusted JSON, is a plain, printable file name inside a folder, that any file system
    takes: no folder, no "." or "..", at most MAX_FILE_NAME_BYTES."""
    return (isinstance(name, str) and name.isprintable() and name == os.path.basename(name)
            and name not in ("", ".", "..")
            and len(os.fsencode(name)) <= MAX_FILE_NAME_BYTES)   # printable: no lone surrogate fsencode refuses


def refuse_link_out(path: Path, folder: Path | None = None) -> None:
    """KLError when `path`, a file of the model folder `folder` (default: the folder it is in), is a link to a file
    outside it: klconvert reads a model's files from its own folder only (a chat template linked to /etc/passwd was
    read into the prompt), and an output copies the file a link names (outputs get shared: a link to ~/.ssh/id_rsa
    must not travel). In the Hugging Face cache's snapshots/<commit>/ (and any folder under it: a repo keeping its
    model in a subfolder) a file is a link into the repo's blobs/, which is its own. A link round in a loop is left to
    the file's reader, which names it."""
    root = Path(os.path.realpath(path.parent if folder is None else folder))
    own = (root,) + tuple(place.parent.parent / BLOBS for place in (root, *root.parents)
                          if place.parent.name == SNAPSHOTS)
    target = Path(os.path.realpath(path))
    if not any(target.is_relative_to(place) for place in own):
        raise KLError(f"{path}: a link to {target}, outside the model folder; klconvert reads a model's files from its "
                      "own folder only (and an output copies the file a link names), so put the file itself in the "
                      "folder (or remove the link)")


def refuse_unfit_side_files(folder: Path, paths: Iterable[Path]) -> None:
    """KLError for the first side file of `folder` that is a link to a file outside it (refuse_link_out) or over
    MAX_SIDE_FILE_BYTES (checked before an output is begun; the copy then reads no further than the bound)."""
    for path in paths:
        refuse_link_out(path, folder)
        size = path.stat().st_size
        if size > MAX_SIDE_FILE_BYTES:
            raise KLError(f"{path}: {size:,} bytes, over the {binary_size_text(MAX_SIDE_FILE_BYTES)} a side file "
                          "klconvert copies (tokenizer, chat template, small config) may be; remove it or re-download "
                          "the model")


def without_remote_code(fields: dict) -> dict:
    """A config's fields less `auto_map`, which points at the release's Python files: an output has none of them
    (hub.SIDE_FILES), so with it transformers' and vLLM's --trust-remote-code failed to load the folder; without it
    both take their own kimi_linear classes, with or without that flag."""
    return {k: v for k, v in fields.items() if k != "auto_map"}


def copied_side_file(path: Path) -> bytes:
    """The bytes an output writes for a side file it copies (quantize, export-onnx): as read; a JSON object that names
    remote code is written again without it (a file that is no JSON object is copied as it is: not klconvert's to
    judge). A file that cannot be read is said as that."""
    try:
        data = read_bounded(path, MAX_SIDE_FILE_BYTES, path.name)
    except OSError as e:
        raise KLError(read_failure(e, path, "check the file (or re-download the model)")) from None
    if path.suffix == ".json":   # parsed whatever its bytes: "auto\u005fmap" is the key too
        try:   # json.loads as transformers reads it: a key given twice keeps its last, and is written once
            fields = json.loads(data)
        except (ValueError, RecursionError):
            return data
        if isinstance(fields, dict) and "auto_map" in fields:
            return _json_file(without_remote_code(fields))
    return data


def _json_file(fields: dict) -> bytes:
    """`fields` as a JSON file: non-ASCII as UTF-8, but escaped where a string holds what UTF-8 cannot (a lone
    surrogate, which json reads from "\\ud800")."""
    try:
        return _json_bytes(fields, ensure_ascii=False)
    except UnicodeEncodeError:
        return _json_bytes(fields, ensure_ascii=True)


def _json_bytes(fields: dict, ensure_ascii: bool) -> bytes:
    """Indented, as the release's files are, where that stays within MAX_SIDE_FILE_BYTES (lists nested deep indent
    past it: 4 MB at 100 deep became 434 MB), else on one line."""
    pieces, size = [], 0
    for piece in json.JSONEncoder(indent=2, ensure_ascii=ensure_ascii).iterencode(fields):
        pieces.append(piece.encode())
        size += len(pieces[-1])
        if size > MAX_SIDE_FILE_BYTES:
            return json.dumps(fields, ensure_ascii=ensure_ascii).encode() + b"\n"
    return b"".join(pieces) + b"\n"
