"""Hostile files and inputs -- huge size fields, ids past the vocabulary, endless prompts, runaway chat templates,
NaN weights -- are refused in one line with exit status 2, in bounded memory, before anything is built from them."""
from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import klconvert
from bounded_cli import klconvert_bounded
from klconvert.checkpoint.name_map import expected_tensors
from klconvert.checkpoint.reader import Checkpoint
from klconvert.checkpoint.regular_file import json_values
from klconvert.checkpoint.folder_files import MAX_INDEX_BYTES, MAX_INDEX_VALUES
from klconvert.checkpoint.size_bounds import (
    MAX_TENSORS,
    check_model_size,
    max_header_bytes,
    max_header_values,
    tensor_and_param_count,
)
from klconvert.config import KimiLinearConfig
from klconvert.damage_remedy import WRITTEN_REMEDY
from klconvert.errors import KLError
from klconvert.presets import preset_config
from klconvert.release import layer_lists
from testkit import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # subprocesses under memory limits: seconds each; CI runs them


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_config(folder: Path, edit) -> None:
    edit_json(folder / "config.json", edit)


def run_args(folder: Path, *extra: str, max_new_tokens: int = 2) -> tuple:
    return ("run", "--model", folder, "--prompt", "The quick brown fox", "--max-new-tokens", str(max_new_tokens),
            "--device", "cpu", *extra)


def run_on(folder: Path, *extra: str, max_new_tokens: int = 2):
    return klconvert_bounded(*run_args(folder, *extra, max_new_tokens=max_new_tokens))


def refusal_here(capsys, *args) -> str:
    """The one `klconvert: error:` line of the command run in this process (testkit.run_cli), with exit status 2 and
    no traceback: for a refusal that is about what it says, not about the memory it is made in."""
    code, _, err = run_cli(capsys, *args)
    return assert_one_line_error(code, err)


def test_a_real_run_fits_under_the_limit(tiny_released):
    """The limit the refusals run under is not so tight that a normal run fails (or they would pass for nothing)."""
    done = run_on(tiny_released)
    assert done.code == 0, done.err[-2000:]


# ---- size fields ---------------------------------------------------------------------------------------------
def _more_layers(config: dict, layers: int) -> None:
    config["num_hidden_layers"] = layers
    config["linear_attn_config"].update(layer_lists(layers))


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c.update(num_experts=10**9), ["'num_experts' is 1000000000", "sane range"]),
    (lambda c: c.update(num_hidden_layers=10**9), ["'num_hidden_layers' is 1000000000"]),
    (lambda c: (_more_layers(c, 1000), c.update(num_experts=4000)), ["tensors", "over the"]),
])
def test_huge_size_fields_are_refused_in_bounded_memory(tiny_copy, edit, needles):
    edit_config(tiny_copy, edit)
    for done in (run_on(tiny_copy), klconvert_bounded("plan", "--model", tiny_copy)):
        line = done.error_line()
        for needle in needles:
            assert needle in line, line


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c.update(vocab_size=10**12), ["'vocab_size'"]),
    (lambda c: c.update(hidden_size=10**400), ["field 'hidden_size' is an integer of 401 digits, outside the sane"]),
    (lambda c: c.update(model_type="m" * 500_000), [f"model_type '{'m' * 76}... is not supported"]),
    (lambda c: c.update(moe_router_activation_func="s" * 500_000),
     [f"moe_router_activation_func='{'s' * 76}... is not supported"]),
    (lambda c: c.update(q_lora_rank=10**400), ["q_lora_rank=an integer of 401 digits (a low-rank MLA query)"]),
    (lambda c: c.update(routed_scaling_factor=float("nan")), ["routed_scaling_factor", "positive number"]),
    (lambda c: c.update(rms_norm_eps=float("inf")), ["rms_norm_eps", "positive number"]),
    (lambda c: c.update(routed_scaling_factor=10**400), ["routed_scaling_factor", "positive number"]),
    (lambda c: c.update(routed_scaling_factor=1e30), ["routed_scaling_factor", "at most 1000"]),  # NaN logits
    (lambda c: c.update(num_hidden_layers=1024), ["missing [9, 10, 11, 12, 13, 14, 15, 16, ... 1008 more]"]),
    (lambda c: c.update(eos_token_id=[10**6]), ["eos_token_id 1000000", "vocabulary"]),
    (lambda c: c.update(first_k_dense_replace=99), ["first_k_dense_replace"]),
    (lambda c: c.update(num_expert_group=0), ["num_expert_group"]),
    (lambda c: c.update(num_expert_group=3, topk_group=1), ["num_expert_group 3", "equal groups of at least 2"]),
    (lambda c: c.update(num_expert_group=16, topk_group=16), ["num_expert_group 16", "at least 2"]),
    (lambda c: c.update(num_expert_group=4, topk_group=1, num_experts_per_token=5), ["num_experts_per_token 5"]),
    # fields the runtime implements one value of: another ran silently as the released model
    (lambda c: c.update(hidden_act="gelu"), ["'hidden_act' is 'gelu'", "implements only 'silu'"]),
    (lambda c: c.update(moe_layer_freq=7), ["'moe_layer_freq' is 7", "implements only 1"]),
    (lambda c: c.update(moe_layer_freq=True), ["'moe_layer_freq' is True", "implements only 1"]),
    (lambda c: c.update(num_nextn_predict_layers=3), ["'num_nextn_predict_layers' is 3"]),
    (lambda c: c.update(num_shared_experts=0), ["'num_shared_experts' is 0", "1..64"]),  # was a shape message
    (lambda c: c.update(use_grouped_topk="maybe"), ["'use_grouped_topk' should be bool"]),
    # transformers' name for model_max_length: checked under the name the config gives it
    (lambda c: (c.pop("model_max_length"), c.update(max_position_embeddings=0)),
     ["field 'max_position_embeddings' is 0, outside the sane range"]),
    (lambda c: c.update(max_position_embeddings=4096),
     ["fields 'model_max_length' (1048576) and 'max_position_embeddings' (4096) are two names of one field and "
      "disagree"]),
    # the weights' dtype, which klconvert's outputs copy and transformers and vLLM load the model in
    (lambda c: c.update(torch_dtype="garbage"), ["'torch_dtype' is 'garbage'", "one of bfloat16, float16, float32"]),
    (lambda c: c.update(torch_dtype="float64"), ["'torch_dtype' is 'float64'"]),
    (lambda c: c.update(torch_dtype=5), ["'torch_dtype' should be str or null, got int 5"]),
    (lambda c: (c.pop("torch_dtype"), c.update(dtype="auto")), ["'dtype' is 'auto'"]),
    (lambda c: c.update(dtype="float32"),
     ["fields 'torch_dtype' ('bfloat16') and 'dtype' ('float32') are two names of one field and disagree"]),
    # transformers' layer kinds, which it builds the model from where they are there, held to the release's
    (lambda c: c.update(layer_types=["linear_attention"] * c["num_hidden_layers"]),
     ["field 'layer_types' (['linear_attention',", "says other layer kinds than linear_attn_config"]),
    (lambda c: c.update(mlp_layer_types=["sparse"] * c["num_hidden_layers"]),
     ["field 'mlp_layer_types' (['sparse',", "says other layer kinds than first_k_dense_replace"]),
    # a count of one layer is said as one ("for 1 layers" before; units.counted)
    (lambda c: c.update(num_hidden_layers=1, linear_attn_config={**c["linear_attn_config"], "kda_layers": [1],
                                                                 "full_attn_layers": [1]}),
     ["full_attn_layers hold 2 entries for 1 layer; each layer is named once"]),
])
def test_config_fields_are_checked(edit, needles):
    config = preset_config("tiny")
    edit(config)
    with pytest.raises(KLError) as error:
        KimiLinearConfig.from_dict(config)
    for needle in needles:
        assert needle in str(error.value), error.value


def test_null_multi_token_prediction_layers_read_as_absent():
    """num_nextn_predict_layers null (no MTP layers) was refused as another model while the field left out was not;
    a null max_position_embeddings beside model_max_length was refused as disagreeing with it."""
    config = preset_config("tiny")
    released = KimiLinearConfig.from_dict(config)
    assert KimiLinearConfig.from_dict({**config, "num_nextn_predict_layers": None}) == released
    assert KimiLinearConfig.from_dict({**config, "max_position_embeddings": None}) == released   # the alias too
    config.pop("num_nextn_predict_layers")
    assert KimiLinearConfig.from_dict(config) == released


def test_max_position_embeddings_bounds_the_context(tiny_copy, capsys):
    """transformers' name for model_max_length: a config giving only it is bounded by it (it was ignored, and the
    release's 1,048,576 let --max-context run past the model), and each refusal names it so (they named
    model_max_length, a field that config.json does not have). The config is no hostile file, and the refusals of
    options and of a prompt given on the command line run in this process (each a child under the memory limit took
    seconds importing torch; at 8,192 tokens of this model the limit could not tell a refusal made after the plan's
    buffers from one made before); eval's endless --text-file /dev/zero is refused under the limit, as text is."""
    edit_config(tiny_copy, lambda c: (c.pop("model_max_length"), c.update(max_position_embeddings=4096)))
    assert KimiLinearConfig.from_file(tiny_copy / "config.json").model_max_length == 4096
    line = refusal_here(capsys, *run_args(tiny_copy, "--max-context", "8192"))
    assert "--max-context 8192 is over the model's max_position_embeddings 4,096" in line, line
    line = refusal_here(capsys, *run_args(tiny_copy, max_new_tokens=5000))
    assert "the model's max_position_embeddings of 4,096 tokens; lower --max-new-tokens" in line, line
    line = refusal_here(capsys, "run", "--model", tiny_copy, "--prompt", "word " * 5000, "--device", "cpu")
    assert "is over the model's max_position_embeddings of 4,096 tokens" in line, line
    line = refusal_here(capsys, "run", "--model", tiny_copy, "--prompt", "word " * 1500, "--max-context", "2048",
                        "--device", "cpu")
    assert ("but --max-context is 2048; raise --max-context (up to the model's max_position_embeddings 4,096)"
            in line), line
    line = refusal_here(capsys, "plan", "--model", tiny_copy, "--max-context", "8192")
    assert "--max-context 8192 is over the model's max_position_embeddings 4,096" in line, line
    line = klconvert_bounded("eval", "--model", tiny_copy, "--reference", tiny_copy, "--text-file", "/dev/zero",
                             "--max-tokens", "8192").error_line()
    assert "--max-tokens 8192 is over the model's max_position_embeddings 4,096" in line, line
    line = refusal_here(capsys, "bench", "--model", tiny_copy, "--context", "8192")
    assert "--context 8192 is over the model's max_position_embeddings 4,096" in line, line
    with pytest.raises(KLError, match=r"^max_context=8192 \(--max-context\) is over the model's "
                       "max_position_embeddings 4,096; lower it$"):
        klconvert.load(tiny_copy, device="cpu", max_context=8192)


def _header_dtype_as_a_list(folder: Path) -> None:
    shard = next(folder.glob("model-*.safetensors"))
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = [header[name]["dtype"]]
    raw = json.dumps(header).encode()
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _first_shard_as_a_list(index: dict) -> None:
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = [index["weight_map"][name]]


@pytest.mark.parametrize("edit, needles", [   # JSON lists and objects where a string belongs
    (_header_dtype_as_a_list, ["unknown dtype ["]),
    (lambda f: edit_json(f / "model.safetensors.index.json", _first_shard_as_a_list),
     ["weight_map gives", "not a file name (list)"]),
    (lambda f: edit_json(f / "tokenizer_config.json", lambda c: c.update(bos_token=["[BOS]"])),
     ["bos_token is ['[BOS]'], not a special token"]),
    (lambda f: edit_json(f / "tokenizer_config.json", lambda c: c.update(eos_token={"content": ["x"]})),
     ["eos_token is {'content': ['x']}, not a special token"]),
])
def test_a_list_where_a_name_belongs_is_refused(tiny_copy, edit, needles):
    edit(tiny_copy)
    line = run_on(tiny_copy).error_line()
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("name, needle", [("config.json", "cannot read the config"),
                                          ("model.safetensors.index.json", "cannot read the index"),
                                          ("tiktoken.model", "cannot read the BPE ranks"),
                                          ("tokenizer_config.json", "tokenizer_config.json")])
def test_a_fifo_in_the_folder_is_refused_not_waited_on(tiny_copy, name, needle):
    """Opening a FIFO blocks until something writes to it: a folder's files are read only when regular."""
    (tiny_copy / name).unlink()
    os.mkfifo(tiny_copy / name)
    line = run_on(tiny_copy).error_line()
    assert needle in line and "not a regular file (a FIFO)" in line, line


def test_a_fifo_shard_is_refused(tiny_copy):
    shard = next(tiny_copy.glob("model-*.safetensors"))
    shard.unlink()
    os.mkfifo(shard)
    assert "not a regular file" in run_on(tiny_copy).error_line()


def test_sizes_are_held_to_the_shard_headers(tiny_copy):
    edit_config(tiny_copy, lambda c: c.update(num_experts=4000))  # in range; the shards cannot hold it
    line = run_on(tiny_copy).error_line()
    assert "parameters" in line and "bytes" in line


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_config_holding_nan_or_infinity_is_refused(tiny_copy, constant):
    """Python's json reads them, into a config that quantize copied out as invalid JSON."""
    path = tiny_copy / "config.json"
    path.write_text(path.read_text().replace('"rope_theta": 10000.0', f'"rope_theta": {constant}'))
    with pytest.raises(KLError, match=rf"config\.json: holds {constant}, which is not a JSON number"):
        KimiLinearConfig.from_file(path)


def test_a_huge_or_deep_config_file_is_refused_unread(tiny_copy):
    (tiny_copy / "config.json").write_text('{"a": "' + "x" * (2 << 20) + '"}')
    assert "far larger" in run_on(tiny_copy).error_line()
    (tiny_copy / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in run_on(tiny_copy).error_line()


def quantize_on(folder: Path):
    return klconvert_bounded("quantize", folder, folder.parent / "out", "--group-size", "32", "--device", "cpu")


@pytest.mark.parametrize("edit, needle", [
    (lambda f: os.truncate(f / "config.json", 8 << 30), "far larger"),  # sparse: 8 GB that read whole would not fit
    (lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    (lambda f: ((f / "config.json").unlink(), os.mkfifo(f / "config.json")), "not a regular file"),
    (lambda f: edit_config(f, lambda c: c.update(quantization_config=["int4"])),
     "quantization_config is a list (['int4']), not an object"),
    (lambda f: ((f / "model.safetensors.index.json").unlink(), os.mkfifo(f / "model.safetensors.index.json")),
     "not a regular file"),
    # deep, of fewer values than MAX_INDEX_VALUES: more are refused by their count, unparsed
    (lambda f: (f / "model.safetensors.index.json").write_text("[" * 60_000 + "]" * 60_000), "nested too deeply"),
    (lambda f: edit_json(f / "model.safetensors.index.json", lambda i: i.update(weight_map=[1, 2])),
     "no 'weight_map' object"),
], ids=["huge config", "deep config", "config fifo", "quantization_config a list", "index fifo", "deep index",
        "weight_map a list"])
def test_quantize_refuses_a_hostile_source_before_reading_it(tiny_copy, edit, needle):
    """quantize looks for quantized weights in SRC before it opens it as a checkpoint: that look reads as the
    checkpoint's reader does (bounded, regular files), so whatever it meets is refused in one line."""
    edit(tiny_copy)
    done = quantize_on(tiny_copy)
    assert needle in done.error_line(), done.err
    assert not (tiny_copy.parent / "out").exists()


def test_a_huge_index_is_refused_past_its_bound(tiny_copy):
    """Bounded by the config's tensor count, as the headers are: a 61 MB index of 5 M short entries, under the
    absolute 64 MB, took 864 MB to refuse (and a MemoryError under an address-space limit)."""
    index = tiny_copy / "model.safetensors.index.json"
    entries = ", ".join(f'"{i}a": "a"' for i in range(200_000))
    index.write_text(index.read_text().replace('"weight_map": {', '"weight_map": {' + entries + ", ", 1))
    line = run_on(tiny_copy).error_line()
    assert re.search(r"model.safetensors.index.json: [\d,]+ bytes, more than the index of the tensors config.json "
                     r"declares can hold \([\d,]+\); the index is corrupt", line), line


def _empty_lists(count: int) -> str:
    return '"pad": [' + ",".join(["[]"] * count) + "]"


@pytest.mark.parametrize("command", ["run", "quantize"])
def test_an_index_of_many_empty_lists_is_refused_unparsed(tiny_copy, command):
    """Parsed, an empty list takes ~37x its bytes: a 63 MB index of `[[]]` took 2.4 GB to refuse (of short entries,
    1.1 GB). An index holds an entry a stored tensor, so a count of its values past MAX_INDEX_VALUES is refused before
    the parse (here within the tiny index's byte bound)."""
    index = tiny_copy / "model.safetensors.index.json"
    index.write_text(index.read_text().replace('"metadata": {', '"metadata": {' + _empty_lists(MAX_INDEX_VALUES // 2)
                                               + ", ", 1))
    line = (run_on(tiny_copy) if command == "run" else quantize_on(tiny_copy)).error_line()
    assert re.search(r"model.safetensors.index.json: cannot read the index \([\d,]+ '\[', '\{' and ',' bytes, more "
                     rf"JSON values than the {MAX_INDEX_VALUES:,} a model.safetensors.index.json holds\); "
                     + re.escape(WRITTEN_REMEDY), line), line


def test_an_index_of_many_short_entries_is_refused_unparsed(tmp_path, monkeypatch):
    """Where no config bounds its bytes (the pull's check of the shards it names, quantize's look for packed
    weights), an index of short entries within MAX_INDEX_BYTES took ~1.1 GB to parse: past MAX_INDEX_VALUES it is
    refused before the parse."""
    from klconvert.checkpoint import regular_file

    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": {' + ",".join(f'"{i:x}": "a"' for i in range(MAX_INDEX_VALUES))
                     + "}}")
    monkeypatch.setattr(regular_file, "parse_json", lambda text: pytest.fail("parsed"))
    with pytest.raises(ValueError, match=rf"^{MAX_INDEX_VALUES + 3:,} '\[', '\{{' and ',' bytes, more JSON values than "
                                         rf"the {MAX_INDEX_VALUES:,} a {index.name} holds$"):
        regular_file.read_json(index, MAX_INDEX_BYTES, index.name, MAX_INDEX_VALUES)


@pytest.mark.parametrize("pad", ["empty lists", "short strings"])
@pytest.mark.parametrize("single_file, command", [(False, "run"), (True, "run"), (True, "quantize")])
def test_a_header_of_many_values_is_refused_unparsed(tiny_copy, single_file, command, pad):
    """A header under its byte bound but of more JSON values than the config's tensors take (a 99 MB header of `[[]]`
    took 3.7 GB to refuse, the released config's 43 MB 1.7 GB; padded with short strings to that byte bound, 1.1 GB)
    is refused before the parse; here a small one, past the tiny config's count by one."""
    if single_file:
        _into_one_file(tiny_copy)
    shard = sorted(tiny_copy.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    bound = max_header_values(KimiLinearConfig.from_file(tiny_copy / "config.json"))
    found = json_values(data[8:8 + n])
    items = ["[]"] * ((bound - found) // 2 - 1) if pad == "empty lists" else ['""']

    def padded() -> bytes:
        return data[8:8 + n].rstrip()[:-1] + b', "pad": [' + ", ".join(items).encode() + b"]}"

    items += ['""'] * (bound + 1 - json_values(padded()))   # each adds its comma
    raw = padded()
    assert json_values(raw) == bound + 1 and raw.count(b'""') > (0 if pad == "empty lists" else bound // 2)
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    line = (run_on(tiny_copy) if command == "run" else quantize_on(tiny_copy)).error_line()
    assert f"{shard}: header holds {bound + 1:,} '[', '{{' and ',' bytes, more JSON values than the {bound:,} the " \
           "config's tensors take; the file is damaged" in line, line


@pytest.mark.parametrize("preset, layers", [("tiny", None), ("kimi-linear-48b", None), ("kimi-linear-48b", 5)])
def test_the_closed_form_count_matches_the_table(preset, layers):
    config = KimiLinearConfig.from_dict(preset_config(preset, layers))
    table = expected_tensors(config)
    assert tensor_and_param_count(config) == (len(table), sum(math.prod(s.shape) for s in table.values()))
    check_model_size(config, "here")


def test_the_tensor_bound_refuses_before_building(monkeypatch):
    config = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b"))
    monkeypatch.setattr("klconvert.checkpoint.size_bounds.MAX_TENSORS", len(expected_tensors(config)) - 1)
    with pytest.raises(KLError, match="tensors"):
        check_model_size(config, "here")
    assert MAX_TENSORS >= len(expected_tensors(config))


def test_the_tensor_bound_writes_its_counts_with_thousands_separators():
    """It said "(27 layers x 4096 experts)" beside "320,013 tensors": every count in the line with ','."""
    with pytest.raises(KLError, match=r"^here: this config means 320,013 tensors \(27 layers x 4,096 experts\), over "
                                      r"the 262,144 klconvert reads; fix the config$"):   # its counts with ','
        check_model_size(KimiLinearConfig.from_dict({**preset_config("kimi-linear-48b"), "num_experts": 4096}), "here")


# ---- tokenizer ids --------------------------------------------------------------------------------------------
def _add_rank(folder: Path, rank: int) -> None:
    with open(folder / "tiktoken.model", "a") as f:
        f.write(f"{base64.b64encode(b'hostile-token').decode()} {rank}\n")


@pytest.mark.parametrize("edit, needles", [
    (lambda f: _add_rank(f, 2_000_000), ["rank 2000000", "vocabulary of 1,280 ids"]),
    (lambda f: _add_rank(f, 10**9), ["rank 1000000000"]),
    (lambda f: edit_json(f / "tokenizer_config.json", lambda c: c["added_tokens_decoder"].update(
        {"3000000": {"content": "<|far|>", "special": True}})), ["id 3000000", "vocabulary"]),
    (lambda f: (edit_config(f, lambda c: c.update(vocab_size=1 << 20)),
                edit_json(f / "tokenizer_config.json", lambda c: c["added_tokens_decoder"].update(
                    {"1000000": {"content": "<|far|>", "special": True}}))), ["special tokens", "8,192"]),
])
def test_tokenizer_ids_are_bounded_by_the_vocabulary(tiny_copy, edit, needles):
    edit(tiny_copy)
    line = run_on(tiny_copy).error_line()
    for needle in needles:
        assert needle in line, line


@pytest.mark.parametrize("field, value, needles", [
    ("eos_token_id", 262, ["config.json: eos_token_id 262 is the text token", "not a special token of "
                           "tokenizer_config.json (its eos_token has id 1025)", "generation would stop wherever"]),
    ("eos_token_id", [1026, 300], ["eos_token_id 300 is the text token"]),   # a list: each id
])
def test_config_token_ids_are_special_tokens_of_the_tokenizer(tiny_copy, field, value, needles):
    """config.json's eos ids are where generation stops (beside the tokenizer's): an ordinary text token there
    stopped a run wherever that text came; run and quantize (whose output copies config.json) refuse it."""
    edit_config(tiny_copy, lambda c: c.update({field: value}))
    for done in (run_on(tiny_copy), quantize_on(tiny_copy)):
        line = done.error_line()
        for needle in needles:
            assert needle in line, line
    assert not (tiny_copy.parent / "out").exists()


def test_config_eos_may_be_another_special_than_the_tokenizers(tiny_copy):
    """The release's config.json says eos <|im_end|> where its tokenizer says [EOS]: both stop, nothing refused."""
    from klconvert.runtime.engine import load

    edit_config(tiny_copy, lambda c: c.update(eos_token_id=[1026, 1030], bos_token_id=1031, pad_token_id=None))
    engine = load(tiny_copy, device="cpu", max_context=16)
    assert {1025, 1026, 1030} <= engine.stop_ids


def test_config_bos_and_pad_ids_are_not_held_to_the_specials(tiny_copy, capsys):
    """klconvert reads neither; a fine-tune's generic pad_token_id 0 (a text token here) was refused by run and
    quantize for a while (the reviewer's finding). A run that is not refused: in this process."""
    edit_config(tiny_copy, lambda c: c.update(bos_token_id=5, pad_token_id=0))
    code, _, err = run_cli(capsys, *run_args(tiny_copy))
    assert code == 0, err[-2000:]


# ---- endless text -------------------------------------------------------------------------------------------
def test_an_endless_prompt_is_refused_after_the_context(tiny_released):
    line = klconvert_bounded("run", "--model", tiny_released, "--prompt-file", "/dev/zero").error_line()
    assert "over the model's model_max_length of 1,048,576" in line and "--max-context" not in line
    line = klconvert_bounded("run", "--model", tiny_released, "--prompt-file", "-", "--max-context", "64",
                             "--max-new-tokens", "4",
                             stdin=b"word " * 1000).error_line()
    assert "--max-context is 64" in line and "raise --max-context" in line


def test_eval_reads_only_the_tokens_it_scores(tiny_released):
    done = klconvert_bounded("eval", "--model", tiny_released, "--reference", tiny_released, "--text-file",
                             "/dev/zero", "--max-tokens", "8", "--device", "cpu")
    assert done.code == 0, done.err[-2000:]
    assert "tokens" in done.out and "8" in done.out
    line = klconvert_bounded("eval", "--model", tiny_released, "--reference", tiny_released, "--text-file",
                             "/dev/zero", "--max-tokens", str(10**12)).error_line()
    assert "--max-tokens 1000000000000 is over the model's model_max_length 1,048,576" in line


def test_prompts_say_what_is_true_about_the_context(tiny_released):
    line = klconvert_bounded("run", "--model", tiny_released, "--prompt", "hi", "--max-context", "2000000").error_line()
    assert "--max-context 2000000 is over the model's model_max_length 1,048,576" in line
    line = klconvert_bounded("run", "--model", tiny_released, "--prompt", "hi", "--max-new-tokens", "2000000"
                             ).error_line()
    assert "lower --max-new-tokens" in line and "--max-context" not in line


def test_a_prompt_too_long_is_named_among_several(tiny_released, tmp_path, capsys):
    """8,000 bytes of prompt against a context of 256: a refusal about what it says, in this process."""
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("To be, or not to be")
    long.write_text("To be, or not to be " * 400)
    line = refusal_here(capsys, "run", "--model", tiny_released, "--prompt-file", short, "--prompt-file", long,
                        "--max-new-tokens", "8", "--max-context", "256")
    assert f"the prompt of --prompt-file {long} (" in line and "raise --max-context" in line


# ---- chat templates -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("template, needle", [
    ("{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}", "range() items"),
    ("{{ 'a' * 10**10 }}", "memory"),
    ("{{ 'a'.ljust(10**10) }}", "memory"),
    ("{% for i in range(99999) %}{{ 'ab' * 9999 }}{% endfor %}", "characters"),
])
def test_a_runaway_chat_template_is_stopped(tiny_copy, template, needle):
    edit_json(tiny_copy / "tokenizer_config.json", lambda c: c.update(chat_template=template))
    line = run_on(tiny_copy, "--chat").error_line()
    assert "chat_template failed to render" in line and needle in line, line


def test_a_chat_template_is_held_to_what_the_context_can_hold(tiny_copy):
    """`run --chat` stops a render once it is longer than the prompt's room in the context can hold (it rendered and
    encoded 100,000 characters of a two-letter prompt, then counted the ids)."""
    edit_json(tiny_copy / "tokenizer_config.json", lambda c: c.update(chat_template="{{ 'x' * 100000 }}"))
    line = run_on(tiny_copy, "--chat", "--max-context", "512").error_line()
    assert "(over 510 tokens) plus --max-new-tokens 2 needs a context of more than 512 tokens but --max-context is " \
           "512; raise --max-context" in line, line


def test_a_chat_with_no_room_left_is_over_the_context_not_a_broken_template(tiny_copy, capsys):
    """With the prompt's room in the context a token or two, the bundled template's own text passed the render's
    bound, and the line said "chat_template failed to render ...; fix the template" (the reviewer's finding). The
    bundled template and a context of 20: a refusal about what it says, in this process."""
    line = refusal_here(capsys, "run", "--model", tiny_copy, "--prompt", "hi", "--chat", "--max-context", "20",
                        "--max-new-tokens", "19", "--device", "cpu")
    assert "the prompt of --prompt (over 1 token) plus --max-new-tokens 19 needs a context of more than 20 tokens " \
           "but --max-context is 20; raise --max-context" in line, line


def test_a_chat_template_is_stopped_at_its_cpu_limit(monkeypatch):
    from klconvert import chat_template

    monkeypatch.setattr(chat_template, "CPU_SECONDS", 1)
    busy = "{% set s = 'a' * 50000 %}{% for c in s %}{% for d in s %}{% endfor %}{% endfor %}"
    with pytest.raises(KLError, match="more than 1 s of CPU"):
        chat_template.render_chat_template(busy, "here", messages=[])


def test_the_renderer_imports_nothing_from_the_working_folder(tmp_path, monkeypatch):
    """`python -m` puts its working folder first on the import path, and the child imports json first: run from a
    folder holding a json.py (a cloned model repo's, say), the renderer ran it."""
    from klconvert import chat_template

    marker = tmp_path / "ran"
    for module in ("json", "jinja2", "resource"):
        (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r})\n")
    monkeypatch.chdir(tmp_path)
    assert chat_template.render_chat_template("{{ messages[0] }}!", "here", messages=["hi"]) == "hi!"
    assert not marker.exists()



def test_what_a_template_raises_is_said_short():
    """raise_exception of 3 million ESC characters made the "one line" 12 MB (each escaped) and the parent 285 MB;
    at 60 million the child's JSON of it ran out of memory and the line blamed the install."""
    from klconvert import chat_template

    with pytest.raises(KLError) as e:
        chat_template.render_chat_template("{{ raise_exception('\\x1b' * (3000000 * (messages|length))) }}", "here",
                                           messages=["hi"])
    assert str(e.value).startswith("here: chat_template failed to render (TemplateError: \x1b") and \
        len(str(e.value)) < chat_template.ERROR_CHARS + 200, len(str(e.value))

@pytest.mark.parametrize("blocked, said", [
    ("jinja2", "rendering a chat template needs jinja2, which cannot be imported (No module named 'jinja2.ext'; "
               "'jinja2' is not a package); repair the install: pip install --force-reinstall jinja2"),
    ("jinja2.sandbox", "rendering a chat template needs jinja2, which cannot be imported (import of jinja2.sandbox "
                       "halted; None in sys.modules); repair the install"),
    ("klconvert.errors", "here: the chat template renderer could not run (it exited with status 1: "),
])
def test_a_renderer_that_cannot_run_blames_the_install_not_the_template(tmp_path, monkeypatch, blocked, said):
    """jinja2 (or a module of it) unimportable in the child, or the child unable to start, read "chat_template failed
    to render (...); fix the template": no fix of the template helps."""
    from klconvert import chat_template

    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{blocked!r}] = None\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(KLError) as e:
        chat_template.render_chat_template("{{ messages[0] }}!", "here", messages=["hi"])
    assert str(e.value).startswith(said) and "fix the template" not in str(e.value), str(e.value)

# ---- NaN and infinite weights ---------------------------------------------------------------------------------
NAME = "model.layers.1.self_attn.q_proj.weight"


def _poison(folder: Path, value: float, name: str = NAME) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name].view(-1)[77] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tiny_copy, value):
    _poison(tiny_copy, value)
    line = run_on(tiny_copy).error_line()
    assert NAME in line and "flat index 77" in line and "NaN or infinite" in line


def test_checkpoint_get_checks_every_slice(tiny_copy, monkeypatch):
    monkeypatch.setattr("klconvert.checkpoint.reader.FINITE_CHECK_ELEMENTS", 1000)
    _poison(tiny_copy, float("nan"), "model.embed_tokens.weight")
    checkpoint = Checkpoint(tiny_copy)
    with pytest.raises(KLError, match=r"model.embed_tokens.weight holds nan at flat index 77"):
        checkpoint.get("model.embed_tokens.weight")
    assert torch.isfinite(checkpoint.get(NAME)).all()


@pytest.mark.parametrize("half", [0, 1], ids=["w1", "w3"])   # gate_up_proj's halves
def test_a_non_finite_value_in_a_stack_is_placed_in_the_stack(tiny_transformers, tmp_path, half):
    """A transformers-layout stack is read an expert's part at a time: the flat index was the part's own (391 for
    [5, 3, 7] of a [16, 256, 128] gate_up_proj), which in the tensor the line names is another, healthy value."""
    folder = shutil.copytree(tiny_transformers, tmp_path / "tf")
    stack = "model.layers.1.mlp.experts.gate_up_proj"
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][stack]
    tensors = load_file(shard)
    _, rows, columns = tensors[stack].shape
    row = half * rows // 2 + 3
    tensors[stack][5, row, 7] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    checkpoint = Checkpoint(folder)
    with pytest.raises(KLError, match=rf"{stack} holds nan at flat index {(5 * rows + row) * columns + 7:,} "):
        for part in ("w1", "w3"):
            checkpoint.get(f"model.layers.1.block_sparse_moe.experts.5.{part}.weight")


def test_large_finite_weights_are_not_mistaken_for_infinite(tiny_copy):
    """The fast check sums in fp32: finite values summing past its range fall back to the exact check."""
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    shard = tiny_copy / index["weight_map"][NAME]
    tensors = load_file(shard)
    tensors[NAME].view(-1)[:4] = torch.finfo(tensors[NAME].dtype).max
    save_file(tensors, shard, metadata={"format": "pt"})
    assert Checkpoint(tiny_copy).get(NAME).view(-1)[0] == torch.finfo(tensors[NAME].dtype).max


def test_numbers_of_thousands_of_digits_are_refused(tiny_copy, tmp_path):
    """Python will not parse an int of 4,300+ digits (a ValueError, not a JSON or YAML error)."""
    from klconvert.quant import load_recipe
    from klconvert.tokenizer import Tokenizer

    huge = "9" * 5000
    config = (tiny_copy / "config.json").read_text()
    (tiny_copy / "config.json").write_text(config.replace('"num_experts": 16', f'"num_experts": {huge}'))
    with pytest.raises(KLError, match="config.json: not a config"):
        KimiLinearConfig.from_file(tiny_copy / "config.json")
    (tiny_copy / "config.json").write_text(config)
    edit_json(tiny_copy / "tokenizer_config.json", lambda c: c["added_tokens_decoder"].update(
        {huge: {"content": "<|far|>", "special": True}}))
    with pytest.raises(KLError, match="added_tokens_decoder entry"):
        Tokenizer.from_folder(tiny_copy)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "48gb.yaml"
    (tmp_path / "r.yaml").write_text(re.sub(r"max_context: *\d+", f"max_context: {huge}", recipe.read_text()))
    with pytest.raises(KLError, match="runtime.max_context"):
        load_recipe(tmp_path / "r.yaml")


def _pad_header(shard: Path, entries: int) -> None:
    """Add `entries` empty tensors to the shard's header (each valid on its own: zero bytes at offset 0)."""
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    padding = "".join(f',"pad{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(entries))
    raw = data[8:8 + n].rstrip()[:-1] + padding.encode() + b"}"
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def test_shard_headers_are_bounded_in_all_not_only_each(tiny_copy):
    """Headers each far under the format's 100 MB, but together far past what the config's tensors need, are
    refused before they are parsed, not after their entries fill the memory."""
    for shard in tiny_copy.glob("model-*.safetensors"):
        _pad_header(shard, 400_000)
    line = run_on(tiny_copy).error_line()
    assert "header claims" in line and "left for the headers of this folder's shards" in line, line


def _into_one_file(folder: Path) -> None:
    """The folder's shards made one model.safetensors, without an index."""
    tensors = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (folder / "model.safetensors.index.json").unlink()
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize("command", ["run", "quantize"])
def test_a_single_file_header_is_bounded_by_the_config(tiny_copy, tmp_path, command):
    """One model.safetensors (no index) whose header is under the format's 100 MB but far past what the config's
    tensors need: refused unparsed, in bounded memory, by run and by quantize's already-quantized check alike."""
    _into_one_file(tiny_copy)
    _pad_header(tiny_copy / "model.safetensors", 1_400_000)  # ~85 MB: parsed, past the memory limit
    done = run_on(tiny_copy) if command == "run" else \
        klconvert_bounded("quantize", tiny_copy, tmp_path / "out", "--device", "cpu")
    line = done.error_line()
    assert "header claims" in line and "left for the headers of this folder's shards" in line, line


def test_weights_that_overflow_the_activations_are_refused_not_printed(tiny_copy):
    """Finite weights (here the final norm's, at 3e38) can still overflow the logits: run printed NUL bytes for them.
    The prompt's logits are checked, so the refusal comes before any token."""
    norm = "model.norm.weight"
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    shard = tiny_copy / index["weight_map"][norm]
    tensors = load_file(shard)
    tensors[norm].fill_(3e38)
    save_file(tensors, shard, metadata={"format": "pt"})
    done = run_on(tiny_copy)
    assert "NaN or infinite logits for the prompt" in done.error_line() and done.out == ""


def test_an_onnx_export_is_named_as_such_where_a_checkpoint_belongs(tiny_copy, capsys):
    """A folder of the wrong kind, no hostile file: a refusal about what it says, in this process."""
    for name in ("model.safetensors.index.json", *(p.name for p in tiny_copy.glob("model-*.safetensors"))):
        (tiny_copy / name).unlink()
    (tiny_copy / "genai_config.json").write_text("{}")
    assert "an ONNX export (genai_config.json), not a safetensors checkpoint; run it with `klconvert run --engine " \
           "onnxruntime`" in refusal_here(capsys, *run_args(tiny_copy))


def test_the_header_bounds_hold_the_released_model_quantized_in_one_file():
    """The 48B's headers bounded by its tensor count: every 2-D weight stored asymmetric int4 (four entries, the most
    a pack-quantized weight has; the embedding and router too), all in one shard, is under both bounds (helper-124:
    `*` -> `//` in max_header_bytes left the bound at ~1 MiB and no test failed: only the tiny model's were read)."""
    from klconvert.checkpoint.safetensors_writer import PlannedTensor, shard_header

    c = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b"))
    planned = []
    for name, spec in expected_tensors(c).items():
        if len(spec.shape) != 2 or not name.endswith(".weight"):
            planned.append(PlannedTensor(name, torch.bfloat16, spec.shape, None))
            continue
        out, inp, module = *spec.shape, name.removesuffix(".weight")
        planned += [PlannedTensor(f"{module}.weight_packed", torch.int32, (out, inp // 8), None),
                    PlannedTensor(f"{module}.weight_scale", torch.bfloat16, (out, -(-inp // 128)), None),
                    PlannedTensor(f"{module}.weight_shape", torch.int64, (2,), None),
                    PlannedTensor(f"{module}.weight_zero_point", torch.int32, (-(-out // 8), -(-inp // 128)), None)]
    header = shard_header(planned)
    assert len(header) < max_header_bytes(c) and json_values(header) < max_header_values(c)


# Reads a 78-byte file under a bound of 64 MiB with 32 MiB of address space left to the process
READ_SMALL_FILE_UNDER_ULIMIT_V = """
import resource, sys
from pathlib import Path
from klconvert.checkpoint.regular_file import read_bounded
with open("/proc/self/status") as status:
    mapped = int(next(line for line in status if line.startswith("VmSize:")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + (32 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
print(len(read_bounded(Path(sys.argv[1]), 64 << 20, "index")))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_a_small_file_read_under_a_large_bound_takes_its_own_size(tmp_path):
    """One read of the whole bound reserved it: a 78 KB index, read under 32 MiB of ulimit -v room, was a MemoryError
    (helper-131)."""
    import subprocess
    import sys

    (tmp_path / "small.json").write_text("{}" * 39)
    done = subprocess.run([sys.executable, "-c", READ_SMALL_FILE_UNDER_ULIMIT_V, tmp_path / "small.json"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout == "78\n", done.stderr[-2000:]


@pytest.mark.parametrize("size, refused", [(0, False), (1 << 20, False), ((1 << 20) + 5, False), ((2 << 20) + 1, True)])
def test_read_bounded_reads_to_its_bound_and_refuses_past_it(tmp_path, size, refused):
    from klconvert.checkpoint import regular_file

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    if refused:
        with pytest.raises(KLError, match=r"f\.bin: over 2 MB, far larger than any model's index; re-download"):
            regular_file.read_bounded(path, 2 << 20, "index")
    else:
        assert regular_file.read_bounded(path, 2 << 20, "index") == path.read_bytes()
