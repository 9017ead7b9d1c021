"""`klconvert synth`: the released format exactly, both layouts, and streaming one tensor at a time."""
from __future__ import annotations

import errno
import gc
import itertools
import json
import math
import os
import re
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from klconvert.checkpoint.name_map import expected_tensors
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.checkpoint.safetensors_writer import PlannedTensor, shard_header, write_shard
from klconvert.config import KimiLinearConfig
from klconvert.convert.output_folder import OUTPUT_RECORD, OutputLock
from klconvert.errors import KLError
from klconvert.synth.checkpoint import synth
from klconvert.presets import PRESETS, preset_config
from klconvert.quant import load_recipe, policy_from_options
from klconvert.quantize import quantize
from klconvert.release import NUM_SPECIAL_TOKENS
from klconvert.synth.tokenizer_files import write_tokenizer_files
from klconvert.tokenizer import Tokenizer
from klconvert.units import size_text
from testkit import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_released_format(tiny_released):
    files = sorted(p.name for p in tiny_released.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for name in ("config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json"):
        assert name in files
    config = json.loads((tiny_released / "config.json").read_text())
    assert config["model_type"] == "kimi_linear" and config["architectures"] == ["KimiLinearForCausalLM"]
    assert config["linear_attn_config"]["full_attn_layers"] == [4, 8]  # 1-indexed, as released
    index = json.loads((tiny_released / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        (tiny_released / s).stat().st_size for s in shards) - sum(
        8 + int.from_bytes((tiny_released / s).read_bytes()[:8], "little") for s in shards)
    with safe_open(str(tiny_released / index["weight_map"]["model.layers.1.self_attn.A_log"]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("model.layers.1.self_attn.A_log").dtype == torch.float32
        assert f.get_tensor("model.layers.1.self_attn.A_log").shape == (1, 1, 4, 1)
    assert not [p for p in tiny_released.parent.iterdir() if "partial" in p.name]
    assert round(sum(p.stat().st_size for p in tiny_released.iterdir()) / 1e6) == 14  # README, --help: 14 MB


def test_synth_writes_the_files_the_readme_lists(tiny_released):
    """README's synth section names every file synth writes, the shards by their pattern (it left out
    generation_config.json and special_tokens_map.json)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### `klconvert synth`"):]
    listed = set(re.findall(r"`([\w.-]+\.(?:json|model|safetensors))`", section[:section.index("It streams")]))
    shard = "model-0000i-of-0000N.safetensors"
    assert shard in listed
    written = {name for name in os.listdir(tiny_released)
               if not re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)}
    assert written == listed - {shard}


def test_a_real_size_layers_largest_tensor_is_the_embedding_the_readme_names():
    """README: synth's memory stays near one tensor, the largest of one real-size layer the 0.75 GB embedding (its
    peak RSS is a measurement: BENCHMARKS.md)."""
    c = KimiLinearConfig.from_dict(preset_config("kimi-linear-48b", layers=1))
    largest = max(expected_tensors(c).values(), key=lambda spec: math.prod(spec.shape))
    assert largest.category == "embedding"
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    bf16_bytes = 2 * math.prod(largest.shape)
    assert f"whose largest tensor is the {bf16_bytes / 1e9:.2f} GB embedding: peak RSS in BENCHMARKS.md" in readme
    assert "## synth's memory, one real-size layer" in (ROOT / "BENCHMARKS.md").read_text()


@pytest.mark.parametrize("preset", PRESETS)
def test_a_presets_token_ids_name_the_special_tokens_of_the_tokenizer_beside_it(preset, tmp_path):
    """config.json's eos_token_id is <|im_end|> (README: the release's is), bos_token_id [BOS] and pad_token_id
    [PAD], of the tokenizer synth writes with it, for every preset (kimi-linear-48b is the release's config.json):
    loading takes any special token as eos, and other runtimes stop where config.json's eos_token_id says."""
    config = preset_config(preset)
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_tokenizer_files(tmp_path, num_ranks=config["vocab_size"] - NUM_SPECIAL_TOKENS,
                          num_specials=NUM_SPECIAL_TOKENS)
    specials = Tokenizer.from_folder(tmp_path).special_tokens
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        specials["[BOS]"], specials["<|im_end|>"], specials["[PAD]"])


def test_transformers_layout_holds_the_same_values(tiny_released, tiny_transformers):
    a, b = open_checkpoint(tiny_released), open_checkpoint(tiny_transformers)
    assert b.sources["model.layers.1.block_sparse_moe.experts.3.w3.weight"].name == \
        "model.layers.1.mlp.experts.gate_up_proj"
    assert b.sources["model.layers.1.self_attn.k_conv1d.weight"].name == "model.layers.1.self_attn.conv1d.weight"
    for name in a.expected:
        assert torch.equal(a.get(name), b.get(name)), name


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    x = open_checkpoint(synth("tiny", tmp_path / "a", seed=7, progress=False).path)
    y = open_checkpoint(synth("tiny", tmp_path / "b", seed=7, progress=False).path)
    z = open_checkpoint(synth("tiny", tmp_path / "c", seed=8, progress=False).path)
    name = "model.layers.2.block_sparse_moe.experts.5.w1.weight"
    assert torch.equal(x.get(name), y.get(name)) and not torch.equal(x.get(name), z.get(name))


def test_the_seed_seeds_the_weights_not_the_tokenizer(tiny_released, tmp_path, capsys):
    """h268's F3: --seed (README, --help: the seed of the random weights) seeded the made-up BPE merges too, so two
    seeds' folders had tokenizers whose ids meant other text and `eval --model A --reference B` of them was refused.
    Every seed writes the same tokenizer files, and the two folders compare."""
    other = synth("tiny", tmp_path / "other", seed=2, progress=False).path
    for name in ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (other / name).read_bytes() == (tiny_released / name).read_bytes(), name
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    code, out, err = run_cli(capsys, "eval", "--model", other, "--reference", tiny_released, "--text-file", text,
                             "--max-tokens", "16", "--device", "cpu")
    assert code == 0 and re.search(r"^tokens +16$", out, re.M), err


@pytest.mark.parametrize("layout", ["released", "transformers"])
def test_an_apps_default_device_changes_no_byte(tiny_released, tiny_transformers, tmp_path, layout):
    """Under torch.set_default_device("meta") the transformers layout's stacked tensors were made there, and writing
    them failed ("can't convert meta device type tensor to numpy"). Made on the host: the same files."""
    torch.set_default_device("meta")
    try:
        out = synth("tiny", tmp_path / "tiny", seed=1, layout=layout, progress=False).path
    finally:
        torch.set_default_device(None)
    want = tiny_released if layout == "released" else tiny_transformers
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in want.iterdir())
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in want.iterdir())


def test_layers_keep_the_three_to_one_pattern():
    config = preset_config("kimi-linear-48b", layers=8)
    assert config["linear_attn_config"]["full_attn_layers"] == [4, 8]
    assert config["linear_attn_config"]["kda_layers"] == [1, 2, 3, 5, 6, 7]
    assert preset_config("kimi-linear-48b")["linear_attn_config"]["full_attn_layers"] == [4, 8, 12, 16, 20, 24, 27]


def test_the_tiny_preset_is_the_structure_the_readme_states():
    """README's synth table: the tiny preset's layers and MoE, and which linear inputs are multiples of the int
    kernels' 128-wide k-tiles -- all but f_b_proj's and g_b_proj's (the KDA head size, 32; the bundled model's is 128,
    test_bundled_model.py), which the default policy and every shipped recipe keep unquantized."""
    c = KimiLinearConfig.from_dict(preset_config("tiny"))
    kinds = ["MLA" if layer in c.full_attn_layers else "KDA" for layer in range(c.num_hidden_layers)]
    pattern = ", ".join(kind + (f" x{n}" if n > 1 else "")
                        for kind, n in ((kind, len(list(run))) for kind, run in itertools.groupby(kinds)))
    assert c.first_k_dense_replace == 1 and c.num_shared_experts == 1 and c.num_experts_per_token < c.num_experts
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    stated = (f"({c.num_hidden_layers} layers: {pattern}; dense layer 0; MoE of {c.num_experts} experts with a shared "
              "expert; every linear input a multiple of 128, as the Triton kernels need, but `f_b_proj`'s and "
              f"`g_b_proj`'s, the KDA head size, {c.kda_head_dim}, which the default policy and the shipped recipes "
              "keep unquantized)")
    assert stated in readme
    linear = [(s.name, s.shape) for s in expected_tensors(c).values() if len(s.shape) == 2]
    off_tile = [(name, shape) for name, shape in linear if shape[1] % 128]
    assert {name.split(".")[-2] for name, _ in off_tile} == {"f_b_proj", "g_b_proj"}
    assert {shape[1] for _, shape in off_tile} == {c.kda_head_dim}
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for policy in (policy_from_options(), *(load_recipe(recipe).policy for recipe in recipes)):
        assert all(policy.scheme_for(name, shape) is None for name, shape in off_tile), policy


@pytest.mark.slow
def test_writer_holds_one_tensor_at_a_time(tmp_path):
    """Each tensor is made only when its turn comes, and is gone before the next is made."""
    alive: list[weakref.ref] = []

    def make(i):
        def build():
            gc.collect()
            assert all(r() is None for r in alive), "an earlier tensor is still held"
            t = torch.full((256, 256), float(i))
            alive.append(weakref.ref(t))
            return t
        return build

    planned = [PlannedTensor(f"t{i}", torch.float32, (256, 256), make(i)) for i in range(5)]
    write_shard(tmp_path / "s.safetensors", planned)
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert [float(f.get_tensor(f"t{i}")[0, 0]) for i in range(5)] == [0, 1, 2, 3, 4]


def test_interrupted_write_leaves_nothing_complete(tmp_path, monkeypatch):
    import klconvert.synth.checkpoint as synth_module

    calls = {"n": 0}
    real = synth_module.write_shard

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synth_module, "write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        synth("tiny", tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_a_dangling_link_is_refused_up_front(tmp_path, capsys, monkeypatch):
    """out.exists() let a link to nothing through, to a traceback after all the work."""
    import klconvert.synth.checkpoint as synth_module

    monkeypatch.setattr(synth_module, "write_shard", lambda *a, **k: pytest.fail("wrote before refusing"))
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    assert_one_line_error(*run_cli(capsys, "synth", "--preset", "tiny", "--out", tmp_path / "out")[::2],
                          "out: is a symbolic link to nothing")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_full_disk_part_way_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """The line named OUT, not the shard it was writing, nor that shard's size (helper-133)."""
    import klconvert.synth.checkpoint as synth_module

    sizes = []

    def full(path, tensors, on_tensor=None):   # the real writer, its second tensor's bytes refused
        def no_space():
            raise OSError(errno.ENOSPC, "No space left on device")

        sizes.append(len(shard_header(tensors)) + sum(t.nbytes for t in tensors))
        return write_shard(path, [tensors[0], replace(tensors[1], make=no_space), *tensors[2:]], on_tensor)

    monkeypatch.setattr(synth_module, "write_shard", full)
    out = tmp_path / "new" / "deeper" / "out"
    assert_one_line_error(*run_cli(capsys, "synth", "--preset", "tiny", "--out", out)[::2],
                          f"disk full writing {out / 'model-00001-of-00004.safetensors'} ({size_text(sizes[0])} to "
                          "write, ", " free); free some space and rerun")
    assert list(tmp_path.iterdir()) == []   # the folders made for it too


def test_too_little_space_is_said_before_writing_in_readable_units(tmp_path, capsys, monkeypatch):
    """It said "0.0 GB free but the checkpoint needs 0.0 GB", and left out the headers and tokenizer files."""
    import klconvert.synth.checkpoint as synth_module

    tensors = sum(t.nbytes for t in synth_module._released_layout(
        expected_tensors(KimiLinearConfig.from_dict(preset_config("tiny"))), 0))
    monkeypatch.setattr(synth_module, "free_disk_bytes", lambda folder: tensors + 1)   # the tensors alone fit
    line = assert_one_line_error(*run_cli(capsys, "synth", "--preset", "tiny", "--out", tmp_path / "out")[::2],
                                 f"{size_text(tensors + 1)} free but the shards need up to ")
    assert " MB;" in line and list(tmp_path.iterdir()) == []


def test_synth_prints_the_folder_it_wrote_on_stdout(tmp_path, capsys):
    """As quantize, export-onnx and pull do, for a script to take: it printed nothing there, while an interrupt once
    OUT was whole said "OUT is complete: only its path was not printed" (h282)."""
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, "synth", "--preset", "tiny", "--layers", "2", "--out", out)
    assert code == 0 and printed == f"{out}\n", err


@pytest.mark.parametrize("out, printed", [("./-s", "./-s"), ("-", "./-"), ("-s/out", "./-s/out")])
def test_a_folder_named_with_a_leading_dash_is_printed_as_no_option(tmp_path, capsys, monkeypatch, out, printed):
    """h292: `synth --out ./-s` printed -s, the ./ typed to keep the name from reading as an option dropped (pathlib
    drops it), and a script's `ls "$out"` took it as ls's -s. Printed with ./ before it, as typed or not."""
    monkeypatch.chdir(tmp_path)
    code, said, err = run_cli(capsys, "synth", "--preset", "tiny", "--layers", "2", "--out", out)
    assert code == 0 and said == f"{printed}\n", err
    assert (tmp_path / out / "config.json").is_file()


def test_a_second_synth_on_the_same_out_is_refused_in_one_line(tmp_path, capsys):
    """It did all the work, then crashed on os.replace (Directory not empty)."""
    out = tmp_path / "out"
    with OutputLock(out):
        assert_one_line_error(*run_cli(capsys, "synth", "--preset", "tiny", "--out", out)[::2],
                              f"another klconvert run (pid {os.getpid()}) is writing it")
    assert list(tmp_path.iterdir()) == []


def test_progress_that_is_no_bool_is_refused(tmp_path):
    with pytest.raises(KLError, match=r"^progress='no' is not a bool; pass True or False$"):
        synth("tiny", tmp_path / "out", progress="no")
    assert list(tmp_path.iterdir()) == []


def held(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_force_replaces_a_folder_klconvert_wrote_once_the_new_one_is_whole(tiny_released, tmp_path, capsys):
    """synth had no --force, though quantize's and export-onnx's replace a folder klconvert wrote (its record lists
    every file): an earlier synth at --out had to be moved away by hand. It now replaces one as they do -- an earlier
    synth, a quantize output -- leaving none of the earlier files."""
    out = tmp_path / "out"
    again = ("synth", "--preset", "tiny", "--layers", "2", "--seed", "1", "--out", out)
    assert run_cli(capsys, "synth", "--preset", "tiny", "--layers", "2", "--out", out)[0] == 0
    earlier = held(out)
    assert_one_line_error(*run_cli(capsys, *again)[::2], f"{out}: is not empty (it holds {OUTPUT_RECORD}, config.json, "
                          "generation_config.json and ", " more); choose another output folder, or pass --force to "
                          "replace it once the new one is whole")
    assert held(out) == earlier
    assert run_cli(capsys, *again, "--force")[0] == 0
    assert held(out).keys() == earlier.keys() and held(out) != earlier   # seed 1's weights
    open_checkpoint(out)

    quantized = quantize(tiny_released, tmp_path / "q", bits=4, group_size=32, device="cpu", progress=False).path
    assert run_cli(capsys, *again[:-1], quantized, "--force")[0] == 0
    assert held(quantized) == held(out)


def test_force_replaces_no_folder_klconvert_did_not_write(tmp_path, capsys):
    """As quantize's and export-onnx's --force: a file of the user's beside a synth output, and a folder no record
    says klconvert wrote (a download's files, which a synth of a klconvert before the record wrote too), are refused
    by name, with --force or without (no refusal offers what would be refused), and left as they were."""
    out = tmp_path / "out"
    synth = ("synth", "--preset", "tiny", "--layers", "2", "--out", out)
    assert run_cli(capsys, *synth)[0] == 0
    (out / "notes.txt").write_text("mine")
    for record in (True, False):
        if not record:
            (out / "notes.txt").unlink()
            (out / OUTPUT_RECORD).unlink()
        before = held(out)
        for force in ((), ("--force",)):
            line = assert_one_line_error(*run_cli(capsys, *synth, *force)[::2])
            assert ("--force" in line) == bool(force), line
        assert held(out) == before
        foreign = "notes.txt" if record else "config.json, generation_config.json, model-00001-of-00001.safetensors"
        assert line.startswith(f"klconvert: error: {out}: --force replaces only a folder klconvert wrote (or an empty "
                               f"one), and this also holds other files, which klconvert did not write: {foreign}"), line
        assert line.endswith("; move them out of it, or choose another output folder")


def test_force_that_is_no_bool_is_refused(tmp_path):
    """force="no" would replace a folder, its truth taken for yes."""
    synth("tiny", tmp_path / "out", layers=2, progress=False)
    before = held(tmp_path / "out")
    with pytest.raises(KLError, match=re.escape("force='no' (--force) is not a bool; pass True or False")):
        synth("tiny", tmp_path / "out", layers=2, progress=False, force="no")
    assert held(tmp_path / "out") == before
