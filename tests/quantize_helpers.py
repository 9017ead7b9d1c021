"""Shared by the quantize tests: count the quantizer's calls, break the writer, compare folders."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import klconvert.quantize as quantize_module
from klconvert.convert import outputs
from klconvert.quant.stored import PACKED_PARTS


def count_quantize_calls(monkeypatch) -> list[str]:
    """Record the module of every compress_weight call the converter makes."""
    calls: list[str] = []
    real = outputs.compress_weight

    def counting(prefix, w, scheme):
        calls.append(prefix)
        return real(prefix, w, scheme)

    monkeypatch.setattr(outputs, "compress_weight", counting)
    return calls


def break_shard_write(monkeypatch, shard_number: int, error: BaseException) -> None:
    """Make the writing of the shard_number-th shard (1-based, counting only shards written) raise `error`
    halfway through, after the real writer has put part of it on disk."""
    real = quantize_module.write_shard
    written = [0]

    def writer(path: Path, tensors, on_tensor=None):
        written[0] += 1
        if written[0] == shard_number:
            def fail():
                raise error
            half = len(tensors) // 2
            tensors = [*tensors[:half], replace(tensors[half], make=fail), *tensors[half + 1:]]
        return real(path, tensors, on_tensor)

    monkeypatch.setattr(quantize_module, "write_shard", writer)


def modules_in_shards(index: dict, shards: set[str]) -> list[str]:
    """The quantized modules with at least one tensor in `shards`."""
    return sorted({name.rsplit(".", 1)[0] for name, shard in index["weight_map"].items()
                   if shard in shards and name.endswith(PACKED_PARTS)})


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
