"""klconvert.atomic_file.write_atomically: whole or not at all, links replaced rather than written through."""
from __future__ import annotations

import os

import pytest

from klconvert.atomic_file import write_atomically


def test_a_file_is_written_whole_and_replaces_what_was_there(tmp_path):
    path = tmp_path / "record.json"
    path.write_bytes(b"old")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["record.json"]


def test_a_link_at_the_name_is_replaced_and_its_target_kept(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"keep")
    (tmp_path / "record.json").symlink_to(precious)
    write_atomically(tmp_path / "record.json", b"new")
    assert precious.read_bytes() == b"keep" and not (tmp_path / "record.json").is_symlink()
    assert (tmp_path / "record.json").read_bytes() == b"new"


def test_a_failed_write_leaves_nothing_behind_and_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    path.write_bytes(b"old")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["record.json"]
