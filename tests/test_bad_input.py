"""Each bad input ends in one clear line on stderr, exit status 2, and no traceback."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from klconvert.checkpoint.name_map import sliced_shape
from klconvert.checkpoint.reader import Checkpoint
from klconvert.damage_remedy import WRITTEN_REMEDY
from klconvert.quantize import quantize
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


def rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def damage_lying_header(folder):
    def claim_twice_the_bytes(header):  # twice the bytes its offsets span
        header[NAME]["shape"][0] *= 2

    rewrite_header(shard_holding(folder, NAME), claim_twice_the_bytes)


def damage_negative_offsets(folder):
    def shift_below_zero(header):  # the same span, before the data
        begin, end = header[NAME]["data_offsets"]
        header[NAME]["data_offsets"] = [begin - end - 10**6, -10**6]

    rewrite_header(shard_holding(folder, NAME), shift_below_zero)


def damage_header_over_the_format_limit(folder):
    path = shard_holding(folder, NAME)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 200 << 20) + data[8:])


def damage_shape_of_huge_dims(folder):
    """77,000 dimensions of 2**63 - 1: their product took 24 s, then a 4,300-digit int failed to print (a traceback)."""
    rewrite_header(shard_holding(folder, NAME), lambda h: h[NAME].update(shape=[2**63 - 1] * 77_000))


def damage_too_short_for_a_header(folder):
    path = shard_holding(folder, NAME)
    path.write_bytes(path.read_bytes()[:5])


def damage_header_longer_than_the_file(folder):
    """The 8-byte length intact, the file cut inside the header it announces."""
    path = shard_holding(folder, NAME)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8 + n - 1])


def damage_header_not_json(folder):
    path = shard_holding(folder, NAME)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"{" * n + data[8 + n:])


def damage_bool_dimension(folder):
    """JSON's true is an int to Python: [true, rows x cols] spans the right bytes but is no shape."""
    def bool_first_dim(header):
        rows, cols = header[NAME]["shape"]
        header[NAME]["shape"] = [True, rows * cols]

    rewrite_header(shard_holding(folder, NAME), bool_first_dim)


def damage_bool_offset(folder):
    """[begin, true]: without the bool check, an end of byte 1 (then a size mismatch, not the malformed entry)."""
    rewrite_header(shard_holding(folder, NAME), lambda h: h[NAME].update(data_offsets=[h[NAME]["data_offsets"][0],
                                                                                      True]))


def damage_overlapping_tensors(folder):
    """A second entry naming the same bytes as q_proj."""
    rewrite_header(shard_holding(folder, NAME),
                   lambda h: h.__setitem__("model.layers.1.self_attn.alias.weight", dict(h[NAME])))


def damage_trailing_bytes(folder):
    """Bytes past the last tensor: the safetensors library refuses the file; read_header took it."""
    path = shard_holding(folder, NAME)
    path.write_bytes(path.read_bytes() + bytes(16))


def damage_cut_by_one_byte(folder):
    path = shard_holding(folder, NAME)
    path.write_bytes(path.read_bytes()[:-1])


def damage_gap_before_a_tensor(folder):
    """The first tensor's entry gone from the header, its bytes left where they were."""
    def drop_first(header):
        del header[min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])]

    rewrite_header(shard_holding(folder, NAME), drop_first)


def damage_long_shard_name(folder):
    shard = shard_holding(folder, NAME).name
    set_index(folder, lambda m: m.update({n: "x" * 300 + ".safetensors" for n, s in m.items() if s == shard}))


def damage_directory_for_a_shard(folder):
    path = shard_holding(folder, NAME)
    path.unlink()
    path.mkdir()


def damage_symlink_loop_for_a_shard(folder):
    path = shard_holding(folder, NAME)
    path.unlink()
    os.symlink(path.name, path)


def damage_packed_weight_without_quantization_config(folder):
    packed = NAME.removesuffix("weight") + "weight_packed"
    rewrite_shard(shard_holding(folder, NAME), lambda t: t.__setitem__(packed, torch.zeros(2, 2, dtype=torch.int32)))
    set_index(folder, lambda m: m.__setitem__(packed, m[NAME]))


def damage_float_scale_without_quantization_config(folder):
    """A bf16 scale beside a bf16 weight (compressed-tensors' dense and fp8 formats keep one) was a tensor that
    "maps to nothing", as if the config were another model's."""
    scale = NAME.removesuffix("weight") + "weight_scale"
    rewrite_shard(shard_holding(folder, NAME), lambda t: t.__setitem__(scale, t[NAME][:, :1].clone()))
    set_index(folder, lambda m: m.__setitem__(scale, m[NAME]))


def given_twice(object_text: str, key: str, value) -> str:
    """A JSON object's text with `key` given once more, as `value`, before its own entries (json.loads keeps the
    last of the two, other readers the first)."""
    return "{" + json.dumps(key) + ": " + json.dumps(value) + ", " + object_text.lstrip()[1:]


def damage_config_key_twice(folder):
    path = folder / "config.json"
    path.write_text(given_twice(path.read_text(), "num_hidden_layers", 2))


def damage_index_entry_twice(folder):
    """NAME placed in two shards: json.loads kept the second, a first-wins reader would look in the other."""
    index = index_of(folder)
    other = next(shard for shard in index["weight_map"].values() if shard != index["weight_map"][NAME])
    (folder / "model.safetensors.index.json").write_text(
        '{"metadata": ' + json.dumps(index["metadata"]) + ', "weight_map": '
        + given_twice(json.dumps(index["weight_map"]), NAME, other) + "}")


def damage_header_entry_twice(folder):
    """NAME described twice in its shard's header, the first time as the same bytes read [cols, rows]."""
    path = shard_holding(folder, NAME)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    transposed = {**header[NAME], "shape": header[NAME]["shape"][::-1]}
    raw = given_twice(json.dumps(header), NAME, transposed).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def damage_tokenizer_config_key_twice(folder):
    path = folder / "tokenizer_config.json"
    path.write_text(given_twice(path.read_text(), "added_tokens_decoder", {}))


def damage_tensor_missing(folder):
    rewrite_shard(shard_holding(folder, NAME), lambda t: t.pop(NAME))
    set_index(folder, lambda m: m.pop(NAME))


def damage_unknown_tensor(folder):
    import torch

    extra = "model.layers.1.self_attn.mystery.weight"
    rewrite_shard(shard_holding(folder, NAME), lambda t: t.__setitem__(extra, torch.zeros(2, 2)))
    set_index(folder, lambda m: m.__setitem__(extra, m[NAME]))


def damage_prefixed_layer_name(folder):
    """A layer's router under a longer name (PEFT's base_model.model. before a transformers-layout name): a name is
    matched whole, so it maps to nothing rather than standing in for the router."""
    router, prefixed = "model.layers.1.block_sparse_moe.gate.weight", "base_model.model.layers.1.mlp.gate.weight"
    rewrite_shard(shard_holding(folder, router), lambda t: t.__setitem__(prefixed, t.pop(router)))
    set_index(folder, lambda m: m.__setitem__(prefixed, m.pop(router)))


def damage_wrong_shape(folder):
    rewrite_shard(shard_holding(folder, NAME), lambda t: t.__setitem__(NAME, t[NAME][:-1].clone()))


CHECKPOINT_DAMAGE = [
    (damage_missing_shard, ["shard is missing"]),
    # it said "(1 tensors, e.g. ..., are indexed in it)"
    (lambda f: set_index(f, lambda m: m.__setitem__(NAME, "model-extra.safetensors")),
     ["model-extra.safetensors: shard is missing (1 tensor, e.g. ", ", is indexed in it)"]),
    (damage_truncated_shard, ["truncated"]),
    (damage_lying_header, [NAME, "needs 65,536 bytes but its offsets span 32,768"]),   # said "65536"
    (damage_negative_offsets, [NAME, "data_offsets [-", "not a byte range of the data"]),
    (damage_shape_of_huge_dims, [NAME, "has a shape [9223372036854775807, 9223372036854775807, ",
                                 "(1,617,000 characters) of 77,000 dimensions, over the 8 a tensor may have"]),
    (lambda f: rewrite_header(shard_holding(f, NAME), lambda h: h[NAME].update(shape=[0, 10**30])),
     [NAME, "has a shape [0, 1000000000000000000000000000000] with a dimension longer than the file's"]),
    (damage_header_over_the_format_limit, ["header claims 209,715,200 bytes",
                                           "over the safetensors limit of 104,857,600 bytes (100 MB)"]),
    (damage_too_short_for_a_header, ["only 5 bytes, too short for a safetensors header", WRITTEN_REMEDY]),
    (damage_header_longer_than_the_file, ["header claims", "bytes but the file holds"]),
    (damage_header_not_json, ["header is not valid JSON"]),
    (damage_bool_dimension, [NAME, "has a malformed shape [True, "]),
    (damage_bool_offset, [NAME, "has malformed data_offsets [", ", True]"]),
    (damage_overlapping_tensors, ["tensors 'model.layers.1.self_attn.alias.weight' and", NAME, "overlap"]),
    (damage_trailing_bytes, ["its tensors end at byte", "the last 16 belong to no tensor"]),
    (damage_cut_by_one_byte, ["ends at byte 4,185,456 of the data but the file holds only 4,185,455 data bytes "
                                "(truncated?)"]),
    (damage_gap_before_a_tensor, ["begins at byte", "of the data, but the data before it ends at byte 0",
                                  "bytes between them belong to no tensor"]),
    (lambda f: rewrite_header(shard_holding(f, NAME), lambda h: h.__setitem__("__metadata__", [])),
     ["__metadata__ is not a map of strings"]),
    (damage_long_shard_name, ["shard name 'xxx", "not a plain file name", "at most 255 bytes", WRITTEN_REMEDY]),
    (damage_directory_for_a_shard, ["not a regular file (a directory)", WRITTEN_REMEDY]),
    (damage_symlink_loop_for_a_shard, ["Too many levels of symbolic links", WRITTEN_REMEDY]),
    (damage_packed_weight_without_quantization_config, [
        "weight_packed' has dtype I32", "config.json has no quantization_config",
        "put back the config.json the quantized weights came with"]),
    (damage_float_scale_without_quantization_config, [
        "weight_scale' is a part of a quantized weight", "config.json has no quantization_config",
        "put back the config.json the quantized weights came with"]),
    (damage_config_key_twice, ["config.json: not a config (key 'num_hidden_layers' appears twice in one object",
                               "re-download the model"]),
    (damage_index_entry_twice, ["model.safetensors.index.json: cannot read the index (key "
                                f"'{NAME}' appears twice in one object", WRITTEN_REMEDY]),
    (damage_header_entry_twice, [f"header is not valid JSON (key '{NAME}' appears twice in one object",
                                 WRITTEN_REMEDY]),
    (damage_tokenizer_config_key_twice, ["tokenizer_config.json: not a tokenizer config (key 'added_tokens_decoder' "
                                         "appears twice in one object", "re-download the model"]),
    (damage_tensor_missing, [NAME, "missing"]),
    (damage_unknown_tensor, ["mystery", "maps to nothing"]),
    (damage_prefixed_layer_name, ["'base_model.model.layers.1.mlp.gate.weight' maps to nothing"]),
    (damage_wrong_shape, [NAME, "shape"]),
    (lambda f: edit_config(f, lambda c: c.__setitem__("model_type", "llama")), ["model_type 'llama'", "not supported"]),
    # helper-129: quantize copied it, and vLLM would pick its model class by it
    (lambda f: edit_config(f, lambda c: c.__setitem__("architectures", ["LlamaForCausalLM"])),
     ["architectures ['LlamaForCausalLM'] is not ['KimiLinearForCausalLM']", "re-download the model"]),
    (lambda f: edit_config(f, lambda c: c.__setitem__("architectures", "KimiLinearForCausalLM")),
     ["architectures 'KimiLinearForCausalLM' is not ['KimiLinearForCausalLM']"]),
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


def _with_entry_field(folder: Path, escaped_key: str) -> Path:
    """NAME's header entry given one more field, `"<escaped_key>": "x"` (JSON text as written), as h180's F5 made it:
    the shard holding it."""
    path = shard_holding(folder, NAME)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8:8 + n].decode()
    at = text.index("{", text.index(json.dumps(NAME))) + 1
    raw = (text[:at] + f'"{escaped_key}": "x", ' + text[at:]).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return path


@pytest.mark.parametrize("escaped_key, said", [(r"\ud800", r"\ud800"), (r"\udc00\ud800", r"\udc00"),
                                               (r"\\\udbff", r"\udbff")],
                         ids=["high", "low-before-high", "after-an-escaped-backslash"])
def test_a_header_holding_half_a_surrogate_pair_is_refused(capsys, tiny_copy, escaped_key, said):
    """h180's F5: a header escape of one UTF-16 surrogate without its other half was read (Python's json decodes it),
    where the safetensors library refuses the file ('unexpected end of hex escape'): transformers and vLLM could not
    open a folder klconvert ran."""
    import klconvert
    from safetensors import SafetensorError, safe_open

    shard = _with_entry_field(tiny_copy, escaped_key)
    with pytest.raises(SafetensorError, match="escape"):   # the library's own word on it
        safe_open(shard, "pt")
    code, _, err = run_cli(capsys, "run", "--model", tiny_copy, "--prompt", "hi", "--max-new-tokens", "1",
                           "--device", "cpu")
    line = (f"{shard}: header holds the escape {said}, half a UTF-16 surrogate pair, which is no character: the "
            f"safetensors library (transformers, vLLM) refuses the file; the file is damaged or incomplete -- "
            f"{WRITTEN_REMEDY}")
    assert assert_one_line_error(code, err) == f"klconvert: error: {line}"
    with pytest.raises(klconvert.KLError) as refused:
        klconvert.load(tiny_copy, device="cpu", max_context=64)
    assert str(refused.value) == line


@pytest.mark.parametrize("escaped_key", [r"\ud83d\ude00", r"\\ud800", r"\u00e9"],
                         ids=["a-whole-pair", "an-escaped-backslash-then-text", "not-a-surrogate"])
def test_a_header_of_escapes_the_safetensors_library_reads_is_read(tiny_copy, escaped_key):
    from safetensors import safe_open

    with safe_open(_with_entry_field(tiny_copy, escaped_key), "pt"):   # the library's own word on it
        pass
    assert Checkpoint(tiny_copy).get(NAME).isfinite().all()


MISMATCH_ADVICE = ("the checkpoint does not match its config.json -- put back the config.json its weights came with, "
                   "or download the checkpoint again")
EXPERT_W2 = "model.layers.1.block_sparse_moe.experts.{}.w2.weight"
STACKED_W2 = "model.layers.1.mlp.experts.down_proj"   # the same weights as transformers stacks them


def _add_stacked_w2(folder: Path, extra_experts: int, drop_released: bool) -> tuple[Path, torch.Tensor]:
    """Layer 1's w2 weights added stacked, `extra_experts` past the config's, in the shard of expert 0's (the released
    per-expert tensors dropped when `drop_released`): (that shard, the stacked tensor)."""
    names = [EXPERT_W2.format(e) for e in range(json.loads((folder / "config.json").read_text())["num_experts"])]
    weights = [load_file(shard_holding(folder, name))[name] for name in names]
    stacked = torch.stack(weights + weights[:extra_experts])
    shard = shard_holding(folder, names[0])
    if drop_released:
        for name in names:
            rewrite_shard(shard_holding(folder, name), lambda t, name=name: t.pop(name))
        set_index(folder, lambda m: [m.pop(name) for name in names])
    rewrite_shard(shard, lambda t: t.__setitem__(STACKED_W2, stacked))
    set_index(folder, lambda m: m.__setitem__(STACKED_W2, shard.name))
    return shard, stacked


def test_weights_and_config_that_disagree_are_told_what_to_do(capsys, tiny_copy, prompt):
    """Lines that said what and where but not what to do: 'maps to nothing ...; the checkpoint does not match its
    config.json', 'takes N of its M values; ...', 'is missing from the checkpoint; the download is incomplete or the
    config does not match the weights', and 'the checkpoint mixes layouts twice over' (h182)."""
    run = ("run", "--model", tiny_copy, "--prompt-file", prompt, "--max-new-tokens", "2")
    shard, stacked = _add_stacked_w2(tiny_copy, 0, drop_released=False)
    assert assert_one_line_error(*run_cli(capsys, *run)[::2]) == (
        f"klconvert: error: {shard}: tensor '{STACKED_W2}' provides {EXPERT_W2.format(0)}, which tensor "
        f"'{EXPERT_W2.format(0)}' provides too: the checkpoint holds that weight twice, in two layouts; download the "
        "checkpoint again, or rewrite it keeping one of the two")

    rewrite_shard(shard, lambda t: t.pop(STACKED_W2))
    set_index(tiny_copy, lambda m: m.pop(STACKED_W2))
    shard, stacked = _add_stacked_w2(tiny_copy, 1, drop_released=True)
    used, held = stacked[:-1].numel(), stacked.numel()
    assert assert_one_line_error(*run_cli(capsys, *run)[::2]) == (
        f"klconvert: error: {shard}: tensor '{STACKED_W2}' has shape {list(stacked.shape)}, but this config "
        f"({len(stacked) - 1} experts) takes {used:,} of its {held:,} values; {MISMATCH_ADVICE}")

    rewrite_shard(shard, lambda t: t.pop(STACKED_W2))
    set_index(tiny_copy, lambda m: m.pop(STACKED_W2))
    assert assert_one_line_error(*run_cli(capsys, *run)[::2]) == (
        f"klconvert: error: {tiny_copy}: tensor {EXPERT_W2.format(0)} and {len(stacked) - 2} more is missing from "
        f"the checkpoint, which its config.json (8 layers, {len(stacked) - 1} experts) asks for; put back the "
        f"config.json its weights came with, else the checkpoint is incomplete -- {WRITTEN_REMEDY}")

    damage_unknown_tensor(tiny_copy)
    assert assert_one_line_error(*run_cli(capsys, *run)[::2]) == (
        f"klconvert: error: {shard_holding(tiny_copy, NAME)}: tensor 'model.layers.1.self_attn.mystery.weight' maps "
        f"to nothing in a Kimi Linear model with this config (8 layers, {len(stacked) - 1} experts); "
        f"{MISMATCH_ADVICE}")


def test_control_characters_from_the_download_are_escaped_in_the_error(capsys, tiny_copy, prompt):
    """A tensor name holding a terminal's title-setting sequence reached stderr as it was."""
    extra = "model.layers.1.self_attn.x\x1b]0;PWNED\x07\x00.weight"
    rewrite_shard(shard_holding(tiny_copy, NAME), lambda t: t.__setitem__(extra, torch.zeros(2, 2)))
    set_index(tiny_copy, lambda m: m.__setitem__(extra, m[NAME]))
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_copy), "--prompt-file", str(prompt))
    assert_one_line_error(code, err, "self_attn.x\\x1b]0;PWNED\\x07\\x00.weight", "maps to nothing")
    assert all(c.isprintable() or c == "\n" for c in err)


@pytest.mark.parametrize("command", ["run", "plan"])
def test_values_from_the_folder_are_said_short(capsys, tiny_copy, prompt, command):
    """A tensor name of 1.5 M characters in the index was said whole (a 1.5 MB line); a pad_token_id of 4,299 digits
    in config.json was written out (4.4 KB)."""
    args = ("--prompt-file", str(prompt)) if command == "run" else ()
    set_index(tiny_copy, lambda m: m.__setitem__("x" * 1_500_000, m[NAME]))
    code, _, err = run_cli(capsys, command, "--model", str(tiny_copy), *args)
    assert len(assert_one_line_error(code, err, "tensor 'xxx", "... is indexed in ", "does not hold it")) < 400
    set_index(tiny_copy, lambda m: m.pop("x" * 1_500_000))
    edit_config(tiny_copy, lambda c: c.__setitem__("pad_token_id", 10 ** 4299 - 1))
    code, _, err = run_cli(capsys, command, "--model", str(tiny_copy), *args)
    assert len(assert_one_line_error(code, err, "pad_token_id an integer of 4,299 digits is outside the vocabulary")) \
        < 400


def test_a_symlink_loop_is_not_called_missing(capsys, tiny_copy, prompt):
    damage_symlink_loop_for_a_shard(tiny_copy)
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_copy), "--prompt-file", str(prompt))
    assert "missing" not in assert_one_line_error(code, err, "symbolic links")


@pytest.mark.parametrize("extra", [-1, 1])
def test_stacked_experts_must_number_what_the_config_says(capsys, tiny_transformers, tmp_path, prompt, extra):
    """The transformers layout stacks a layer's experts in one tensor: 15 or 17 of them for 16 is refused."""
    folder = shutil.copytree(tiny_transformers, tmp_path / "tiny-tf")
    name = "model.layers.1.mlp.experts.gate_up_proj"

    def restack(tensors):
        stacked = tensors[name]
        tensors[name] = stacked[:extra].clone() if extra < 0 else torch.cat([stacked, stacked[:extra]])

    rewrite_shard(shard_holding(folder, name), restack)
    code, _, err = run_cli(capsys, "run", "--model", str(folder), "--prompt-file", str(prompt), "--max-new-tokens", "2")
    assert_one_line_error(code, err, name, f"[{16 + extra}, ", "the checkpoint does not match its config.json")


@pytest.mark.parametrize("name, dim", [("model.layers.1.mlp.experts.gate_up_proj", 1),
                                       ("model.layers.1.self_attn.conv1d.weight", 0)], ids=["gate-up", "conv1d"])
def test_a_stacked_tensor_a_row_short_is_refused(capsys, tiny_transformers, tmp_path, prompt, name, dim):
    """The transformers layout cuts a layer's gate and up projections (its q, k and v convs) out of one tensor: one a
    row short, whose last part would come out a row short, is refused by its shape."""
    folder = shutil.copytree(tiny_transformers, tmp_path / "tiny-tf")

    def cut(tensors):
        tensors[name] = tensors[name].narrow(dim, 0, tensors[name].shape[dim] - 1).clone()

    rewrite_shard(shard_holding(folder, name), cut)
    code, _, err = run_cli(capsys, "run", "--model", str(folder), "--prompt-file", str(prompt), "--max-new-tokens", "2")
    assert_one_line_error(code, err, name, "which does not give", "the checkpoint does not match its config.json")


def test_an_expert_index_at_a_stacks_end_does_not_fit_it():
    """A stack one expert short whose rows make up the values (gate_up_proj [1, 4 x I, H] where 2 experts take
    [2, 2 x I, H]) passes the reader's count of values: the last expert's index, equal to the stack's size and so past
    its end, is what refuses it before a read would index past the end."""
    assert sliced_shape((1, 512, 128), (1, slice(0, 128))) is None
    assert sliced_shape((1, 512, 128), (0, slice(128, 256))) == (128, 128)


def tie_embeddings(folder: Path, keep_lm_head: bool) -> None:
    edit_config(folder, lambda c: c.update(tie_word_embeddings=True))
    if not keep_lm_head:
        rewrite_shard(shard_holding(folder, "lm_head.weight"), lambda t: t.pop("lm_head.weight"))
        set_index(folder, lambda m: m.pop("lm_head.weight"))


def test_tied_embeddings_stand_in_for_lm_head(tiny_copy, tmp_path):
    """tie_word_embeddings: true and no lm_head.weight (as transformers saves a tied model): lm_head is the
    embedding. A quantized copy stores lm_head on its own, so its config unties them."""
    tie_embeddings(tiny_copy, keep_lm_head=False)
    checkpoint = Checkpoint(tiny_copy)
    assert torch.equal(checkpoint.get("lm_head.weight"), checkpoint.get("model.embed_tokens.weight"))
    out = quantize(tiny_copy, tmp_path / "q", bits=8, group_size=32, device="cpu", progress=False).path
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in Checkpoint(out).sources


def test_tied_embeddings_beside_a_stored_lm_head_are_refused(capsys, tiny_copy, prompt):
    tie_embeddings(tiny_copy, keep_lm_head=True)
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_copy), "--prompt-file", str(prompt))
    assert_one_line_error(code, err, "config.json: tie_word_embeddings is true", "also stores lm_head.weight")


@pytest.mark.parametrize("files", [("pytorch_model.bin",),
                                   ("pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin")])
def test_pickled_weights_are_named_never_opened(capsys, tiny_copy, prompt, monkeypatch, files):
    """A folder of .bin weights and no safetensors is no incomplete download: the message says klconvert does not
    unpickle them and how to convert them, and nothing reads them."""
    for shard in [*tiny_copy.glob("*.safetensors"), tiny_copy / "model.safetensors.index.json"]:
        shard.unlink()
    for name in files:
        (tiny_copy / name).write_bytes(b"\x80\x04not read")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a .bin file was unpickled"))
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_copy), "--prompt-file", str(prompt))
    assert_one_line_error(code, err, f"holds pickled PyTorch weights ({sorted(files)[0]}) and no safetensors",
                          "never unpickles", "save_pretrained(out, safe_serialization=True)")


def test_fp8_weights_are_named_not_called_damaged(capsys, tiny_copy, prompt):
    """Block-FP8 weights (F8_E4M3 beside a weight_scale_inv, as DeepSeek-style FP8 releases store them) with no
    quantization_config: another form of the model, to be quantized from the bf16 release."""
    def to_fp8(tensors):
        scale = tensors[NAME].float().abs().amax() / 448
        tensors[NAME] = (tensors[NAME].float() / scale).to(torch.float8_e4m3fn)
        tensors[NAME + "_scale_inv"] = scale.reshape(1, 1)

    rewrite_shard(shard_holding(tiny_copy, NAME), to_fp8)
    set_index(tiny_copy, lambda m: m.__setitem__(NAME + "_scale_inv", m[NAME]))
    code, _, err = run_cli(capsys, "run", "--model", str(tiny_copy), "--prompt-file", str(prompt))
    line = assert_one_line_error(code, err, f"tensor '{NAME}' has dtype F8_E4M3: the folder holds FP8-quantized "
                                 "weights", "quantize from the bf16 release")
    assert "damaged" not in line


def _export_onnx(src: Path, out: Path) -> tuple[str, ...]:
    if importlib.util.find_spec("onnx") is None:
        pytest.skip("onnx is not installed")
    return "export-onnx", "--model", str(src), "--out", str(out)


@pytest.mark.parametrize("command", [
    lambda src, out: ("quantize", str(src), str(out), "--group-size", "32", "--device", "cpu"),
    _export_onnx,
], ids=["quantize", "export-onnx"])
def test_a_broken_source_tokenizer_is_refused_before_writing(capsys, tiny_copy, tmp_path, command):
    """quantize and export-onnx check the tokenizer as run does: no finished folder that run then refuses."""
    (tiny_copy / "tiktoken.model").unlink()
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *command(tiny_copy, out))
    assert_one_line_error(code, err, "tiktoken.model")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("command", [
    lambda src, out: ("quantize", str(src), str(out), "--group-size", "32", "--device", "cpu"),
    _export_onnx,
], ids=["quantize", "export-onnx"])
def test_a_source_of_weights_alone_still_converts(capsys, tiny_copy, tmp_path, command):
    """No tokenizer files at all is no broken tokenizer: the output holds the weights, as the source does."""
    for name in ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tiny_copy / name).unlink()
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *command(tiny_copy, out))
    assert code == 0, err
    assert not (out / "tiktoken.model").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("command", [
    lambda src, out: ("quantize", str(src), str(out), "--group-size", "32", "--device", "cpu"),
    _export_onnx,
], ids=["quantize", "export-onnx"])
def test_a_huge_side_file_is_refused_before_writing(capsys, tiny_copy, tmp_path, command):
    """special_tokens_map.json is copied, never parsed: only its size is checked, and before OUT is begun."""
    os.truncate(tiny_copy / "special_tokens_map.json", 40 << 20)  # sparse
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *command(tiny_copy, out))
    assert_one_line_error(code, err, "special_tokens_map.json: 41,943,040 bytes, over the 32.0 MiB a")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def _linked_out(folder: Path, name: str, outside: Path) -> Path:
    """`name` moved out of the model folder, a link to it left in its place; returns where it went."""
    outside.mkdir(exist_ok=True)
    target = outside / name
    shutil.move(folder / name, target)
    (folder / name).symlink_to(target)
    return target


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json", "tiktoken.model", "config.json"])
def test_a_model_file_linked_from_outside_the_folder_is_refused(capsys, tiny_copy, tiny_released, tmp_path, name):
    """run --chat read a chat_template.jinja that linked to /etc/passwd into the prompt; quantize refused such a link
    (an output copies it), run, eval and plan followed it. Now every reader of a folder's small files refuses it,
    export-onnx (which copies the tokenizer files and chat template) before it begins its output."""
    if name == "chat_template.jinja":
        (tiny_copy / name).write_text("{{ messages[0]['content'] }}")
    target = _linked_out(tiny_copy, name, tmp_path / "outside")
    needle = f"{tiny_copy / name}: a link to {target}, outside the model folder"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    for args in (("run", "--model", tiny_copy, "--prompt", "hi", "--max-new-tokens", "1", "--chat", "--device", "cpu"),
                 ("eval", "--model", tiny_copy, "--reference", tiny_released, "--text-file", text, "--device", "cpu"),
                 ("plan", "--model", tiny_copy),
                 ("export-onnx", "--model", tiny_copy, "--out", tmp_path / "onnx")):
        if args[0] == "export-onnx" and importlib.util.find_spec("onnx") is None:
            continue
        if args[0] == "plan" and name not in ("config.json",):
            continue   # the plan reads no tokenizer
        if args[0] == "eval" and name == "chat_template.jinja":
            continue   # eval renders no chat
        assert_one_line_error(*run_cli(capsys, *args)[::2], needle, "put the file itself in the folder")
    assert not [p for p in tmp_path.iterdir() if "onnx" in p.name]


UNREADABLE_AS = {"config.json": ("the config", "re-download the model"),
                  "tokenizer_config.json": ("the tokenizer config", "re-download the model"),
                  "chat_template.jinja": ("the chat template", "fix the file or re-download the model")}


@pytest.mark.parametrize("name", list(UNREADABLE_AS))
def test_a_small_file_that_is_a_folder_or_no_utf8_is_said_so_in_klconverts_words(capsys, tiny_copy, name):
    """A folder there read "cannot read the config ([Errno 22] not a regular file (a directory): '<the path again>')";
    a byte that is not UTF-8, the codec's "'utf-8' codec can't decode byte 0xff in position 7: invalid start byte"
    (h182), where a prompt file gets errors.not_utf8's line."""
    path = tiny_copy / name
    path.unlink(missing_ok=True)   # the tiny release keeps its chat template in tokenizer_config.json
    path.write_bytes(b'{"x": "\xff"}')
    run = ("run", "--model", tiny_copy, "--prompt", "hi", "--max-new-tokens", "1", "--chat", "--device", "cpu")
    assert assert_one_line_error(*run_cli(capsys, *run)[::2]) == (
        f"klconvert: error: {path}: not UTF-8 text (bad byte at offset 7); convert it to UTF-8, or re-download the "
        "model")
    path.unlink()
    path.mkdir()
    what, advice = UNREADABLE_AS[name]
    assert assert_one_line_error(*run_cli(capsys, *run)[::2]) == (
        f"klconvert: error: {path}: cannot read {what} (not a regular file (a directory)); {advice}")


def test_a_folders_recipe_linked_from_outside_is_refused_by_plan(capsys, tiny_released, tmp_path):
    out = tmp_path / "q"
    assert run_cli(capsys, "quantize", tiny_released, out, "--bits", "4", "--group-size", "32")[0] == 0
    target = _linked_out(out, "recipe.yaml", tmp_path / "outside")
    assert_one_line_error(*run_cli(capsys, "plan", "--model", out)[::2],
                          f"{out / 'recipe.yaml'}: a link to {target}, outside the model folder")


@pytest.mark.parametrize("subfolder", ["", "model"])
def test_files_linked_into_the_hub_caches_blobs_are_read(capsys, tiny_released, tmp_path, subfolder):
    """The Hugging Face cache's snapshots/<commit>/ holds links into the repo's blobs/: the files are its own -- in a
    subfolder of the snapshot too (a repo keeping its model there)."""
    storage = tmp_path / "models--org--name"
    snapshot, blobs = storage / "snapshots" / ("a" * 40) / subfolder, storage / "blobs"
    shutil.copytree(tiny_released, snapshot)
    blobs.mkdir()
    up = Path(*[".."] * (3 if subfolder else 2))
    for name in ("config.json", "tiktoken.model", "tokenizer_config.json"):
        (snapshot / name).rename(blobs / name)
        (snapshot / name).symlink_to(up / "blobs" / name)
    code, _, err = run_cli(capsys, "run", "--model", snapshot, "--prompt", "hi", "--max-new-tokens", "1", "--chat",
                           "--device", "cpu")
    assert code == 0, err


def test_empty_prompt(capsys, tiny_released, tmp_path):
    (tmp_path / "empty.txt").write_text("")   # whitespace alone is a prompt (test_text_input)
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
    assert_one_line_error(code, err, "is not empty (it holds ")


@pytest.mark.parametrize("command", [
    lambda out: ("synth", "--preset", "tiny", "--out", str(out)),
    lambda out: ("quantize", "tiny", str(out), "--device", "cpu"),
    lambda out: _export_onnx("tiny", out),
], ids=["synth", "quantize", "export-onnx"])
def test_a_folder_that_is_not_empty_is_refused_naming_what_it_holds(capsys, tmp_path, command):
    """It said "already exists", naming nothing, where synth and export-onnx take an existing empty folder: the
    shell's own log.txt in `--out . > log.txt` read as a folder taken (h282). The line names what is in the way,
    as a terminal shows a name, and how many more."""
    out = tmp_path / "ex"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = assert_one_line_error(*run_cli(capsys, *command(out))[::2])
    assert line == (f"klconvert: error: {out}: is not empty (it holds notes.txt); choose another output folder (or "
                    "move it away)"), line
    for name in ("a\nb", "c", "d"):
        (out / name).write_text("mine")
    line = assert_one_line_error(*run_cli(capsys, *command(out))[::2])
    assert f"{out}: is not empty (it holds a\\nb, c, d and 1 more); " in line, line
    assert sorted(p.name for p in out.iterdir()) == ["a\nb", "c", "d", "notes.txt"]


@pytest.mark.parametrize("args,flag", [
    (("run", "--model", "", "--prompt", "hi"), "--model"),
    (("quantize", "", "out", "--bits", "4"), "SRC"),
    (("quantize", "tiny", "", "--bits", "4"), "OUT"),
    (("pull-and-quantize", "--model", "", "--bits", "4"), "--model"),
    (("pull-and-quantize", "--model", "tiny", "--out", ""), "--out"),
    (("eval", "--model", "tiny", "--reference", "", "--text-file", "t.txt"), "--reference"),
    (("eval", "--model", "tiny", "--reference", "tiny", "--text-file", ""), "--text-file"),
    (("plan", "--model", ""), "--model"),
    (("plan", "--preset", "tiny", "--recipe", ""), "--recipe"),
    (("export-onnx", "--model", "tiny", "--out", ""), "--out"),
    (("pull", ""), "REPO"),
    (("pull", "--local-dir", ""), "--local-dir"),
    (("synth", "--preset", "tiny", "--out", ""), "--out"),
    (("bench", "--model", ""), "--model"),
    (("bench", "--preset", "kimi-linear-48b", "--json", ""), "--json"),
    (("pull", "--cache-dir", ""), "--cache-dir"),
    (("run", "--model", "tiny", "--prompt-file", ""), "--prompt-file"),
    (("quantize", "tiny", "out", "--recipe", ""), "--recipe"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(capsys, tmp_path, monkeypatch, args, flag):
    """pathlib reads "" as ".": an unset shell variable quietly named the current folder (a checkpoint there ran,
    export-onnx wrote into it, quantize raised a traceback)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, flag, "empty")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_quantize_refuses_an_output_naming_the_current_folder(capsys, tmp_path, monkeypatch, out):
    """OUT.partial is made beside OUT and renamed onto it: "." raised a traceback (PosixPath('.') has an empty
    name)."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    code, _, err = run_cli(capsys, "quantize", "tiny", out, "--bits", "4", "--force")
    assert_one_line_error(code, err, "names the current folder or one above it", "give the new folder's name")
    assert [p.name for p in tmp_path.iterdir()] == ["here"] and not any((tmp_path / "here").iterdir())


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


@pytest.mark.parametrize("given", ["1,,2", "4096,", ",4096", " , "])
def test_a_bench_list_with_an_empty_item_is_refused(capsys, given):
    """`--batch 1,,2` timed batches 1 and 2, the empty item (a typo for 16?) quietly dropped."""
    code, _, err = run_cli(capsys, "bench", "--preset", "kimi-linear-48b", "--batch", given)
    assert_one_line_error(code, err, "--batch", f"{given!r}: give comma-separated whole numbers")
