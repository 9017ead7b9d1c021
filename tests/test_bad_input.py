"""Each bad input ends in one clear line on stderr, exit status 2, and no traceback."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from testkit import assert_one_line_error, run_cli, run_klconvert


@pytest.fixture
def prompt(tmp_path) -> Path:
    p = tmp_path / "prompt.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.")
    return p


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def shard_holding(folder: Path, name: str) -> Path:
    return folder / index_of(folder)["weight_map"][name]


def rewrite_shard(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def set_index(folder: Path, edit) -> None:
    index = index_of(folder)
    edit(index["weight_map"])
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


NAME = "model.layers.1.self_attn.q_proj.weight"


def damage_missing_shard(folder):
    shard_holding(folder, NAME).unlink()


def damage_truncated_shard(folder):
    path = shard_holding(folder, NAME)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_lying_header(folder):
    path = shard_holding(folder, NAME)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header[NAME]["shape"][0] *= 2  # claims twice the bytes its offsets span
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def damage_tensor_missing(folder):
    rewrite_shard(shard_holding(folder, NAME), lambda t: t.pop(NAME))
    set_index(folder, lambda m: m.pop(NAME))


def damage_unknown_tensor(folder):
    import torch

    extra = "model.layers.1.self_attn.mystery.weight"
    rewrite_shard(shard_holding(folder, NAME), lambda t: t.__setitem__(extra, torch.zeros(2, 2)))
    set_index(folder, lambda m: m.__setitem__(extra, m[NAME]))


def damage_wrong_shape(folder):
    rewrite_shard(shard_holding(folder, NAME), lambda t: t.__setitem__(NAME, t[NAME][:-1].clone()))


CHECKPOINT_DAMAGE = [
    (damage_missing_shard, ["shard is missing"]),
    (damage_truncated_shard, ["truncated"]),
    (damage_lying_header, [NAME, "needs", "bytes"]),
    (damage_tensor_missing, [NAME, "missing"]),
    (damage_unknown_tensor, ["mystery", "maps to nothing"]),
    (damage_wrong_shape, [NAME, "shape"]),
    (lambda f: edit_config(f, lambda c: c.__setitem__("model_type", "llama")), ["model_type 'llama'", "not supported"]),
    (lambda f: edit_config(f, lambda c: c.pop("hidden_size")), ["'hidden_size'", "missing"]),
    (lambda f: edit_config(f, lambda c: c.__setitem__("hidden_size", "64")), ["'hidden_size'", "should be int"]),
    (lambda f: edit_config(f, lambda c: c["linear_attn_config"].pop("kda_layers")), ["kda_layers", "missing"]),
    (lambda f: edit_config(f, lambda c: c["linear_attn_config"].__setitem__("full_attn_layers", [4, 9])),
     ["full_attn_layers", "1-indexed"]),
]


@pytest.mark.parametrize("damage,needles", CHECKPOINT_DAMAGE, ids=lambda x: getattr(x, "__name__", None))
def test_damaged_checkpoint(capsys, tiny_copy, prompt, damage, needles):
    damage(tiny_copy)
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_copy), "--prompt-file", str(prompt),
                        "--max-new-tokens", "2")
    assert_one_line_error(code, err, *needles)


def test_empty_prompt(capsys, tiny_released, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_released), "--prompt-file", str(tmp_path / "empty.txt"))
    assert_one_line_error(code, err, "empty")


def test_non_utf8_prompt(capsys, tiny_released, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_released), "--prompt-file", str(tmp_path / "latin1.txt"))
    assert_one_line_error(code, err, "not UTF-8", "offset 3")


def test_missing_prompt_file(capsys, tiny_released, tmp_path):
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_released), "--prompt-file", str(tmp_path / "nope.txt"))
    assert_one_line_error(code, err, "nope.txt")


def test_prompt_over_the_plan(capsys, tiny_released, prompt):
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_released), "--prompt-file", str(prompt),
                           "--max-new-tokens", "4", "--max-context", "8")
    assert_one_line_error(code, err, "--max-new-tokens 4", "--max-context is 8", "raise --max-context")


def test_no_room_for_a_prompt(capsys, tiny_released, prompt):
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_released), "--prompt-file", str(prompt),
                        "--max-new-tokens", "50", "--max-context", "16")
    assert_one_line_error(code, err, "--max-new-tokens 50 leaves no room for a prompt in --max-context 16")


def test_missing_model_folder(capsys, prompt, tmp_path):
    code, _, err = run_cli(capsys, "run", "--model", str(tmp_path / "none"), "--prompt-file", str(prompt))
    assert_one_line_error(code, err, "no such folder", "pull-and-quantize")


def test_synth_refuses_existing_output(capsys, tiny_released):
    code, _, err = run_cli(capsys, "synth", "--preset", "tiny", "--out", str(tiny_released))
    assert_one_line_error(code, err, "already exists")


def test_usage_error_exits_2(capsys):
    code, _, err = run_cli(capsys, "run", "--max-new-tokens", "-3", "--prompt-file", "x")
    assert code == 2 and "Traceback" not in err and "--max-new-tokens" in err


@pytest.mark.slow
def test_installed_entry_point_prints_no_traceback(tiny_copy, prompt):
    damage_truncated_shard(tiny_copy)
    proc = run_klconvert("run", "--model", tiny_copy, "--prompt-file", prompt)
    assert proc.returncode == 2
    assert proc.stderr.startswith("klconvert: error: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""
