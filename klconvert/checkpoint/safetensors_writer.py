"""Write safetensors shards one tensor at a time, so memory stays near one tensor, not the model."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from klconvert.checkpoint.safetensors_header import DTYPE_BYTES
from klconvert.checkpoint.stored_tensor import TORCH_DTYPES
from klconvert.disk_space import writing

DTYPE_TAGS = {dtype: tag for tag, dtype in TORCH_DTYPES.items()}   # torch dtype -> the tag the header names it by


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: its name, dtype and shape now, its values when `make()` is called."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[DTYPE_TAGS[self.dtype]]


def split_into_shards(tensors: Iterable[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Group tensors in order into shards of at most `max_shard_bytes` (a larger tensor gets its own shard)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(n: int) -> list[str]:
    """The released checkpoint's shard names: model-00001-of-000NN.safetensors."""
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def shard_header(tensors: list[PlannedTensor]) -> bytes:
    """The bytes before the data of the safetensors file write_shard writes for `tensors`: the header's length, then
    the header, padded so that the data section starts 8-byte aligned."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_TAGS[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_shard(path: Path, tensors: list[PlannedTensor], on_tensor: Callable[[PlannedTensor], None] | None = None
                ) -> str:
    """Write one safetensors file, making each tensor only when its turn comes; the sha256 of its bytes.

    Written to `path` + ".partial" and renamed when whole, so a cut-off write never looks complete; a failed write
    names `path` (`writing`).
    """
    head = shard_header(tensors)
    partial = path.with_name(path.name + ".partial")
    digest = hashlib.sha256(head)
    with writing(path, len(head) + sum(t.nbytes for t in tensors)), open(partial, "wb") as f:
        f.write(head)
        for t in tensors:
            value = t.make()
            if value.dtype != t.dtype or tuple(value.shape) != t.shape:
                raise ValueError(f"{t.name}: made {value.dtype} {tuple(value.shape)}, planned {t.dtype} {t.shape}")
            if value.numel():
                data = value.contiguous().reshape(-1).view(torch.uint8).numpy().data
                f.write(data)
                digest.update(data)
            del value  # release it before the next tensor is made
            if on_tensor:
                on_tensor(t)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return digest.hexdigest()


def index_json(shards: list[list[PlannedTensor]], names: list[str]) -> str:
    """model.safetensors.index.json for the given shards."""
    total = sum(t.nbytes for shard in shards for t in shard)
    weight_map = {t.name: names[i] for i, shard in enumerate(shards) for t in shard}
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
