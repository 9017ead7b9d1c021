"""Shared by the quantize tests: run the CLI in-process, read its stderr as a terminal shows it, break the writer."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import klconvert.quantize as quantize_module
from klconvert.cli import main
from klconvert.convert import outputs
from klconvert.quant.pack_quantized import PACKED_NAMES


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the klconvert entry point in-process; return (exit status, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["klconvert", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def shown_lines(err: str) -> list[str]:
    """stderr as a terminal leaves it: a carriage return overwrites the line (progress bars); blanks dropped."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = shown_lines(err)
    assert len(lines) == 1 and lines[0].startswith("klconvert: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


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

    def writer(path: Path, tensors, metadata=None, on_tensor=None):
        written[0] += 1
        if written[0] == shard_number:
            def fail():
                raise error
            half = len(tensors) // 2
            tensors = [*tensors[:half], replace(tensors[half], make=fail), *tensors[half + 1:]]
        return real(path, tensors, metadata, on_tensor)

    monkeypatch.setattr(quantize_module, "write_shard", writer)


def modules_in_shards(index: dict, shards: set[str]) -> list[str]:
    """The quantized modules with at least one tensor in `shards`."""
    return sorted({name.rsplit(".", 1)[0] for name, shard in index["weight_map"].items()
                   if shard in shards and name.endswith(PACKED_NAMES)})


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
