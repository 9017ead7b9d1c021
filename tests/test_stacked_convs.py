"""stack_kda_convs rewrites shards in place, so it reads the folder as a checkpoint first: a shard name from the
index is untrusted, and one that points outside the folder is refused before anything is written. Its shards are
written by safetensors' Rust code, which the entry point's audit hook cannot see, so it says so itself."""
from __future__ import annotations

import json
import re
import shutil
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from klconvert import entry
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.convert import stacked_convs
from klconvert.convert.stacked_convs import stack_kda_convs
from klconvert.damage_remedy import WRITTEN_REMEDY
from klconvert.errors import KLError
from testkit import assert_one_line_error, run_cli


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


def _files(folder):
    """Each file's bytes, modification time and mode."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
            for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("stopped_at", ["the second shard", "the index"])
def test_a_stopped_call_is_named_by_run_and_finished_by_the_next(tiny_released, tiny_copy, tmp_path, monkeypatch,
                                                                  capsys, stopped_at):
    """Its shards are replaced one at a time and the index last: stopped between, the index names a layer's
    q/k/v_conv1d in a shard that holds them stacked. run says to call it again (not to download), and that call
    finishes the job: the same files (bytes and modes) as one call that ran through."""
    whole = shutil.copytree(tiny_released, tmp_path / "whole")
    layers = stack_kda_convs(whole)
    saves, save_file = [], stacked_convs.save_file

    def save_once(*args, **kwargs):
        if saves:
            raise KeyboardInterrupt
        saves.append(save_file(*args, **kwargs))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(stacked_convs, *(("save_file", save_once) if stopped_at == "the second shard"
                                   else ("write_atomically", interrupted)))
        with pytest.raises(KeyboardInterrupt):
            stack_kda_convs(tiny_copy)
    code, _, err = run_cli(capsys, "run", "--model", tiny_copy, "--prompt", "hi")
    line = assert_one_line_error(code, err)
    assert re.fullmatch(r"klconvert: error: .*/model\.safetensors\.index\.json: names (model\.layers\.\d+\.self_attn\.)"
                        r"q/k/v_conv1d\.weight in model-00001-of-00004\.safetensors, which holds them stacked as "
                        r"\1conv1d\.weight: a stack_kda_convs on this folder stopped before it rewrote the index; run "
                        r"stack_kda_convs on the folder again to finish it", line)

    other = shutil.copytree(tiny_copy, tmp_path / "other")   # any other disagreement besides: the download is bad
    index = json.loads((other / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (other / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KLError, match=f"does not list; the index and shards disagree -- {re.escape(WRITTEN_REMEDY)}"):
        stack_kda_convs(other)

    # the first shard holds 3 of the tiny model's 6 KDA layers
    assert stack_kda_convs(tiny_copy) == {"the second shard": layers - 3, "the index": 0}[stopped_at]
    bytes_and_modes = [{n: (f[0], f[2]) for n, f in _files(folder).items()} for folder in (tiny_copy, whole)]
    assert bytes_and_modes[0] == bytes_and_modes[1]


MLA_LAYER = "model.layers.3.self_attn."   # the tiny model's first full-attention layer (no convs of its own)


def _stopped_at_one_layer(folder, damage: str) -> tuple:
    """Stack one KDA layer's q/k/v_conv1d in its shard as a stopped stack_kda_convs leaves it, the index untouched,
    but with `damage` (DAMAGE_LINES): a conv1d that call never writes; (the stacked conv1d's name, its shard)."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    q_conv = next(name for name in index["weight_map"] if name.endswith(".q_conv1d.weight"))
    layer, shard = q_conv.removesuffix("q_conv1d.weight"), folder / index["weight_map"][q_conv]
    tensors = load_file(shard)
    parts = [tensors[f"{layer}{part}_conv1d.weight"] for part in "qkv"]
    if damage == "on an MLA layer":   # the KDA layer's own left as they are, the index naming the MLA layer's there
        layer = MLA_LAYER
        index["weight_map"].update({f"{layer}{part}_conv1d.weight": shard.name for part in "qkv"})
        index_path.write_text(json.dumps(index))
    else:
        for part in "qkv":
            del tensors[f"{layer}{part}_conv1d.weight"]
    stacked = torch.cat(parts) if damage != "two parts" else torch.cat(parts[:2])
    if damage == "2-D":
        stacked = stacked.reshape(len(stacked), -1)
    elif damage == "fp32":
        stacked = stacked.float()
    tensors[f"{layer}conv1d.weight"] = stacked.contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    return f"{layer}conv1d.weight", shard


SHAPE_LINE = (r"has shape \[.*\], which does not give .* its expected shape .*; the checkpoint does not match its "
              "config.json")
DAMAGE_LINES = {
    "2-D": SHAPE_LINE,
    "two parts": SHAPE_LINE,
    "on an MLA layer": r"maps to nothing in a Kimi Linear model with this config \(.*\); the checkpoint does not "
                       "match its config.json",
    "fp32": r"has dtype F32, while most of the folder's KDA convs are BF16; it is not what a stopped stack_kda_convs "
            r"leaves in place of the indexed q/k/v_conv1d \(that keeps their dtype\): the checkpoint is damaged -- "
            + re.escape(WRITTEN_REMEDY),
}


@pytest.mark.parametrize("damage", DAMAGE_LINES)
def test_a_stopped_call_s_folder_damaged_besides_is_refused_for_the_damage(tiny_copy, capsys, damage):
    """A stacked conv1d of the wrong shape in place of a layer's q/k/v_conv1d, or on an MLA layer, was named a stopped
    call, to run again, and that call refused it for its shape (h155); one in fp32 where the folder's convs are bf16
    was finished as a stopped call's (helper-161). The damage's line comes first, from both, and the run's is one
    line; the folder is left as it was."""
    stacked, shard = _stopped_at_one_layer(tiny_copy, damage)
    before = _files(tiny_copy)
    line = rf"{re.escape(shard.name)}: tensor '{re.escape(stacked)}' {DAMAGE_LINES[damage]}"
    for call in (open_checkpoint, stack_kda_convs):
        with pytest.raises(KLError, match=line):
            call(tiny_copy)
    code, _, err = run_cli(capsys, "run", "--model", tiny_copy, "--prompt", "hi")
    assert re.search(line, assert_one_line_error(code, err))
    assert _files(tiny_copy) == before


def test_a_second_call_writes_nothing(tiny_copy):
    assert stack_kda_convs(tiny_copy)
    before = _files(tiny_copy)
    assert stack_kda_convs(tiny_copy) == 0
    assert _files(tiny_copy) == before


def test_a_rewritten_shard_keeps_its_mode(tiny_copy):
    """Not safetensors' private 0600: a folder shared with another user (a serving container) stays readable."""
    shards = sorted(tiny_copy.glob("*.safetensors"))
    for shard, mode in zip(shards, [0o640, 0o644, 0o604, 0o444]):
        shard.chmod(mode)
    modes = {shard.name: stat.S_IMODE(shard.stat().st_mode) for shard in shards}
    inodes = {shard.name: shard.stat().st_ino for shard in shards}
    assert stack_kda_convs(tiny_copy)
    assert {shard.name: shard.stat().st_ino != inodes[shard.name] for shard in shards} == {
        shard.name: True for shard in shards[:3]} | {shards[3].name: False}   # the three holding convs rewritten
    assert {shard.name: stat.S_IMODE(shard.stat().st_mode) for shard in shards} == modes
