"""The output folder under construction: OUT.partial beside OUT, resumable by finished shard, renamed when whole."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from klconvert.checkpoint.safetensors_header import read_header
from klconvert.checkpoint.safetensors_writer import TORCH_TO_SAFETENSORS, PlannedTensor
from klconvert.errors import KLError

RESUME_RECORD = ".klconvert-resume.json"  # what the partial folder is for: source fingerprint and options


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def refuse_existing_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise KLError(f"{out}: already exists; choose another output folder, or pass --force to replace it "
                      "once the new one is complete")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class OutputFolder:
    """OUT.partial: created fresh, or taken up from an interrupted run with the same record, and renamed to
    OUT when whole (replacing an existing OUT only then, and only with force)."""

    def __init__(self, out: Path, record: dict, force: bool):
        self.out, self.path, self.force = out, partial_path(out), force
        self.record = json.loads(json.dumps(record))  # JSON types, to compare with the stored one

    def open(self) -> bool:
        """Make the folder ready; True when an interrupted run's folder was taken up."""
        if self.path.exists() or self.path.is_symlink():
            if self._stored_record() == self.record:
                self.remove_unfinished()
                return True
            if not self.force:
                raise KLError(f"{self.path}: holds an interrupted conversion of another source or with other "
                              "options; rerun with the same SRC and options to resume it, or pass --force to "
                              "start over")
            _remove(self.path)
        self.path.mkdir(parents=True)
        _write_atomically(self.path / RESUME_RECORD, json.dumps(self.record, indent=1) + "\n")
        return False

    def _stored_record(self) -> dict | None:
        try:
            return json.loads((self.path / RESUME_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def remove_unfinished(self) -> None:
        """Delete files an interrupted write left under a temporary name."""
        for leftover in self.path.glob("*.partial"):
            leftover.unlink(missing_ok=True)

    def has_finished(self, shard: str, tensors: list[PlannedTensor]) -> bool:
        """Whether `shard` was written whole by an earlier run, with exactly the planned tensors."""
        path = self.path / shard
        if not path.is_file():
            return False
        try:
            header = read_header(path)
        except KLError:
            return False
        planned = {t.name: (TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape)) for t in tensors}
        found = {name: (e.dtype, e.shape) for name, e in header.tensors.items()}
        return found == planned and path.stat().st_size == header.data_start + sum(t.nbytes for t in tensors)

    def write_text(self, name: str, text: str) -> None:
        _write_atomically(self.path / name, text)

    def finish(self) -> Path:
        """Drop the resume record and rename the folder to OUT (an existing OUT goes only now)."""
        out_exists = self.out.exists() or self.out.is_symlink()
        if out_exists and not self.force:
            raise KLError(f"{self.out}: appeared while converting; move it away and rerun to finish "
                          f"(the finished shards wait in {self.path}), or pass --force to replace it")
        (self.path / RESUME_RECORD).unlink()
        if out_exists:
            replaced = self.out.with_name(self.out.name + ".replaced")
            if replaced.exists() or replaced.is_symlink():
                _remove(replaced)
            os.rename(self.out, replaced)
            os.rename(self.path, self.out)
            _remove(replaced)
        else:
            os.rename(self.path, self.out)
        return self.out
