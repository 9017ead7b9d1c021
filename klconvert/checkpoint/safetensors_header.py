"""Read and check a safetensors file's header against the file, before any tensor is touched."""
from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from klconvert.checkpoint.regular_file import json_values, open_regular, parse_json
from klconvert.damage_remedy import damaged_folder_remedy
from klconvert.errors import KLError, refuse_if_not_permitted, unreadable_reason

# safetensors dtype tag -> bytes per element
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
MAX_DIMS = 8  # a tensor's dimensions: torch's checkpoints hold up to 5; a longer shape is damage, not a tensor
# The start of a JSON escape of a UTF-16 surrogate (\ud800 to \udfff): Python's json decodes one without its other
# half into a str no UTF-8 holds, where the safetensors library (serde_json, so transformers and vLLM) refuses the
# header ("unexpected end of hex escape"). Headers seldom hold one: only where they do are the strings encoded.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section


def _clipped(value: object) -> str:
    """A header value as an error line quotes it: its repr, cut to 80 characters (a shape may hold 77,000)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + f"... ({len(text):,} characters)"


def _fail(path: Path, remedy: Callable[[], str], what: str) -> KLError:
    return KLError(f"{path}: {what}; the file is damaged or incomplete -- {remedy()}")


def read_header(path: Path, max_bytes: int = MAX_HEADER_BYTES, max_values: int | None = None,
                remedy: Callable[[], str] = damaged_folder_remedy) -> SafetensorsHeader:
    """Parse the header of `path` and check every entry against the file's real size. A header of more than
    `max_bytes` (what the folder's other headers left of their bound) is refused unread, one of more than `max_values`
    JSON values (json_values; None: not counted) unparsed. `remedy`, asked only for a line, says what to do about a
    damaged file: a reader that knows the model folder passes damaged_folder_remedy for it (the default knows none)."""
    fail = partial(_fail, path, remedy)
    try:
        size = path.stat().st_size
        with open_regular(path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise fail(f"only {size:,} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise fail(f"header claims {n:,} bytes, over the safetensors limit of {MAX_HEADER_BYTES:,} "
                           "bytes (100 MB)")
            if n > max_bytes:
                raise fail(f"header claims {n:,} bytes, over the {max_bytes:,} left for the headers of this "
                           "folder's shards (bounded together by the config's tensor count)")
            if 8 + n > size:
                raise fail(f"header claims {n:,} bytes but the file holds {size:,}")
            raw = f.read(n)
    except FileNotFoundError:
        raise KLError(f"{path}: shard is missing; {remedy()}") from None
    except OSError as e:
        refuse_if_not_permitted(e, path)
        raise KLError(f"{path}: cannot read the shard ({e.strerror}); put the shard file there -- {remedy()}") from None
    if max_values is not None and (values := json_values(raw)) > max_values:
        raise fail(f"header holds {values:,} '[', '{{' and ',' bytes, more JSON values than the {max_values:,} "
                   "the config's tensors take")
    try:   # a tensor described twice: the safetensors library reads one entry, the checks here another
        header = parse_json(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a key twice, a 4,300-digit int, deep nesting
        raise fail(f"header is not valid JSON ({unreadable_reason(e, 120)})") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")
    if _SURROGATE_ESCAPE.search(raw):   # a scan in C; the encoding (json's, in C too) then finds a lone half
        try:
            json.dumps(header, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise fail(f"header holds the escape \\u{ord(e.object[e.start]):04x}, half a UTF-16 surrogate "
                       "pair, which is no character: the safetensors library (transformers, vLLM) refuses "
                       "the file") from None

    data_size = size - 8 - n
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata   # absent or null, as safetensors takes it; [], 0 and "" it refuses
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("__metadata__ is not a map of strings")
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise fail(f"entry {_clipped(name)} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise fail(f"tensor {_clipped(name)} has unknown dtype {_clipped(dtype)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise fail(f"tensor {_clipped(name)} has a malformed shape {_clipped(shape)}")
        if len(shape) > MAX_DIMS:   # before their product: 77,000 dims of 2**63 took 24 s
            raise fail(f"tensor {_clipped(name)} has a shape {_clipped(shape)} of {len(shape):,} dimensions, over "
                       f"the {MAX_DIMS} a tensor may have")
        if any(d > data_size for d in shape):
            raise fail(f"tensor {_clipped(name)} has a shape {_clipped(shape)} with a dimension longer than "
                       f"the file's {data_size:,} data bytes")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise fail(f"tensor {_clipped(name)} has malformed data_offsets {_clipped(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise fail(f"tensor {_clipped(name)} has data_offsets {offsets}, not a byte range of the data "
                       "(0 <= begin <= end)")
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != need:
            raise fail(f"tensor {_clipped(name)} ({dtype} {shape}) needs {need:,} bytes but its offsets "
                       f"span {end - begin:,}")
        if end > data_size:
            raise fail(f"tensor {_clipped(name)} ends at byte {end:,} of the data but the file holds only "
                       f"{data_size:,} data bytes (truncated?)")
        tensors[name] = TensorEntry(dtype, tuple(shape), begin, end)

    # the tensors tile the data from its first byte to its last, as the safetensors library requires of a file it
    # opens (in offset order, each begins where the one before ends)
    at, before = 0, None
    for begin, end, name in sorted((t.begin, t.end, k) for k, t in tensors.items()):
        if begin < at:
            raise fail(f"tensors {_clipped(before)} and {_clipped(name)} overlap")
        if begin > at:
            raise fail(f"tensor {_clipped(name)} begins at byte {begin:,} of the data, but the data before it "
                       f"ends at byte {at:,}: {begin - at:,} bytes between them belong to no tensor")
        at, before = end, name
    if at != data_size:
        raise fail(f"its tensors end at byte {at:,} of the data, but the file holds {data_size:,} data bytes: "
                   f"the last {data_size - at:,} belong to no tensor")
    return SafetensorsHeader(path, tensors, metadata, 8 + n)
