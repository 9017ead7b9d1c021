"""stack_kda_convs rewrites shards in place, so it reads the folder as a checkpoint first: a shard name from the
index is untrusted, and one that points outside the folder is refused before anything is written. Its shards are
written by safetensors' Rust code, which the entry point's audit hook cannot see, so it says so itself."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from klconvert import entry
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.convert import stacked_convs
from klconvert.convert.stacked_convs import stack_kda_convs
from klconvert.errors import KLError


def test_a_shard_outside_the_folder_is_refused_untouched(tiny_copy, tmp_path):
    index_path = tiny_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = next(iter(index["weight_map"].values()))
    outside = shutil.copyfile(tiny_copy / shard, tmp_path / "outside.safetensors")
    before = outside.read_bytes()
    index["weight_map"] = {name: "../outside.safetensors" for name in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    with pytest.raises(KLError, match=r"shard name '../outside.safetensors' is not a plain file name"):
        stack_kda_convs(tiny_copy)
    assert outside.read_bytes() == before
    assert json.loads(index_path.read_text()) == index


def test_the_stacked_folder_reads_the_same_and_a_second_run_finds_nothing(tiny_released, tiny_copy):
    names = json.loads((tiny_copy / "model.safetensors.index.json").read_text())["weight_map"]
    convs = [n for n in names if n.endswith(("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"))]
    assert convs and stack_kda_convs(tiny_copy) == len(convs) // 3 and stack_kda_convs(tiny_copy) == 0
    stacked = json.loads((tiny_copy / "model.safetensors.index.json").read_text())["weight_map"]
    assert not set(convs) & set(stacked) and sum(n.endswith(".conv1d.weight") for n in stacked) == len(convs) // 3
    before, after = open_checkpoint(tiny_released), open_checkpoint(tiny_copy)
    assert all(torch.equal(before.get(name), after.get(name)) for name in before.expected)


def test_a_shard_written_by_rust_is_a_change_before_it_is_written(tiny_copy, monkeypatch):
    """The entry point's hook, which hears only Python's own file calls, knows the command changed a file before
    save_file writes one: an interrupt from then on is handled, not ended at once with a shard half-written."""
    ctrl_c = entry._CtrlC()
    sys.addaudithook(ctrl_c.audit)   # for good (Python cannot remove one): it returns at once once `changed` is set
    changed_before_writes, write = [], stacked_convs.save_file

    def save_file(*args, **kwargs):
        changed_before_writes.append(ctrl_c.changed)
        return write(*args, **kwargs)

    try:
        monkeypatch.setattr(stacked_convs, "save_file", save_file)
        assert stack_kda_convs(tiny_copy)
    finally:
        ctrl_c.changed = True
    assert changed_before_writes and all(changed_before_writes)
