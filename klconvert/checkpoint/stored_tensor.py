"""One stored tensor read out of an open safetensors shard by plain reads, never through a memory mapping: a shard
cut short while mapped kills the process (SIGBUS, exit status 135, no line) at the first touch of a page past its new
end, where a read comes back short and is refused in one line."""
from __future__ import annotations

import ctypes
import math
from typing import BinaryIO

import torch

from klconvert.checkpoint.safetensors_header import DTYPE_BYTES, SafetensorsHeader
from klconvert.errors import KLError, shown

TORCH_DTYPES = {   # safetensors dtype tag -> torch dtype: every tag DTYPE_BYTES knows
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "I16": torch.int16, "F16": torch.float16,
    "BF16": torch.bfloat16, "U32": torch.uint32, "I32": torch.int32, "F32": torch.float32, "U64": torch.uint64,
    "I64": torch.int64, "F64": torch.float64,
}


def index_span(shape: tuple[int, ...], index: tuple) -> tuple[int, tuple[int, ...]]:
    """The first element and the shape of `tensor[index]` in a row-major tensor of `shape`, for an index of whole
    numbers and at most one slice last (what the name map cuts: an expert of a stack, a part of a fused weight), so
    that the elements are one run."""
    if any(isinstance(ix, slice) for ix in index[:-1]):
        raise ValueError(f"index {index} does not cut one run of elements")
    first, out = 0, []
    for dim, ix in enumerate(index):
        stride = math.prod(shape[dim + 1:])
        if isinstance(ix, slice):
            first += ix.start * stride
            out.append(ix.stop - ix.start)
        else:
            first += ix * stride
    return first, (*out, *shape[len(index):])


def read_stored(file: BinaryIO, header: SafetensorsHeader, name: str, index: tuple = ()) -> torch.Tensor:
    """Tensor `name` of the shard open as `file`, whose header is `header`, cut by `index` (index_span's kind). KLError
    where the file ends before the tensor's bytes: it was cut short after its header was checked against its size."""
    entry = header.tensors[name]
    first, shape = index_span(entry.shape, index)
    itemsize = DTYPE_BYTES[entry.dtype]
    start, nbytes = header.data_start + entry.begin + first * itemsize, math.prod(shape) * itemsize
    out = torch.empty(nbytes, dtype=torch.uint8, device="cpu")   # the host's, whatever default device the caller set
    if nbytes:
        into = memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
        file.seek(start)
        done = 0
        while done < nbytes:   # a read returns at most ~2 GB, and a network file system may return less
            got = file.readinto(into[done:])
            if not got:
                raise KLError(f"{header.path}: ends at byte {start + done:,}, inside tensor {shown(name)} (bytes "
                              f"{start:,} to {start + nbytes:,}): the file was cut short while this command read it -- "
                              "run again once whatever rewrites it is done, or download the checkpoint again")
            done += got
    return out.view(TORCH_DTYPES[entry.dtype]).reshape(shape)
