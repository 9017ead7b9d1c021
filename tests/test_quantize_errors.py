"""Each bad input to `klconvert quantize` is one `klconvert: error:` line, exit 2, no traceback, and no OUT."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import klconvert.quantize as quantize_module
from klconvert import atomic_file, disk_space
from klconvert.errors import KLError
from klconvert.quant import policy_from_options
from klconvert.quantize import quantize
from quantize_helpers import break_shard_write
from testkit import assert_one_line_error, klconvert_held, run_cli


@pytest.fixture(scope="module")
def quantized(tiny_released, tmp_path_factory):
    return quantize(tiny_released, tmp_path_factory.mktemp("q") / "q", bits=8, group_size=32, progress=False).path


def fails(capsys, tmp_path, *args: str, src=None) -> str:
    """Run `klconvert quantize SRC OUT ARGS`; check the error shape and that no OUT exists; return the line."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", src, out, *args)
    line = assert_one_line_error(code, err)
    assert not out.exists()
    return line


def write_recipe(tmp_path, groups: dict, ignore: list[str]) -> str:
    config_groups = {name: {"targets": targets, "weights": {"num_bits": 4, "group_size": 32}}
                     for name, targets in groups.items()}
    recipe = {"quant_stage": {"quant_modifiers": {"QuantizationModifier": {"ignore": ignore,
                                                                           "config_groups": config_groups}}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return str(path)


KEEP = ["re:.*gate$", "re:.*(f_a|f_b|g_a|g_b|b)_proj$", "re:.*conv1d$", "lm_head"]


@pytest.mark.parametrize("args,needle", [
    (("--bits", "3"), "--bits 3 is not supported; use --bits 4 or --bits 8"),
    (("--bits", "8", "--scheme", "nf4"), "--scheme nf4 is 4-bit and symmetric, in blocks of 64 with bitsandbytes' "
                                         "own scales; drop --bits 8"),
    (("--scheme", "nf4", "--group-size", "32", "--asym"), "bitsandbytes' own scales; drop --group-size 32, --asym"),
    (("--scheme", "nf4", "--observer", "mse"), "; drop --observer mse"),
    (("--group-size", "20"), "--group-size 20 is not a positive multiple of 8 (or -1 for per-channel); use "
                             "--group-size 32, 64 or 128"),
    (("--group-size", "48"), "--group-size 48 does not divide 128, the input dim of "),
    (("--recipe", "r.yaml"), "r.yaml: no such recipe file"),
])
def test_bad_options(tiny_released, tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    assert needle in fails(capsys, tmp_path, *args, src=tiny_released)


WHOLE_GROUPS = re.compile(r"; use --group-size (\d+), the largest that divides the input dim of every weight the "
                          r"flags quantize, or a smaller one that does: (.+)$")


def test_a_group_size_that_leaves_partial_groups_is_told_the_sizes_dividing_every_weight(tiny_released, tmp_path,
                                                                                        capsys):
    """--group-size 256 was told to "use a group size that divides 128 or leave this tensor out of the recipe's
    targets" -- no recipe was given, and a size that divides one weight's input dim may not divide the next one's
    (the 48B: 'divides 2304', then 'divides 4096'). Now it names the flag and the sizes that divide every weight's, the
    largest first; each of them quantizes."""
    line = fails(capsys, tmp_path, "--group-size", "256", src=tiny_released)   # tiny's inputs are 128 and 256
    advice = WHOLE_GROUPS.search(line)
    assert advice and line.startswith("klconvert: error: --group-size 256 does not divide 128, the input dim of "), line
    assert (advice[1], advice[2]) == ("128", "32 or 64") and "recipe" not in line
    for size in (advice[1], *advice[2].split(" or ")):
        code, _, err = run_cli(capsys, "quantize", tiny_released, tmp_path / f"g{size}", "--group-size", size)
        assert code == 0, err


def test_a_recipe_group_size_that_leaves_partial_groups_names_its_group_and_the_sizes_dividing_it(tiny_released,
                                                                                                  tmp_path, capsys):
    """From a recipe the line names the tensor, its target and group, and offers the group_size that divides every
    tensor the group selects (a size that divides this one's alone may leave the next one's partial); it quantizes."""
    recipe = Path(write_recipe(tmp_path, {"group_0": ["Linear"]}, KEEP))
    recipe.write_text(recipe.read_text().replace('"group_size": 32', '"group_size": 256'))
    line = fails(capsys, tmp_path, "--recipe", recipe, src=tiny_released)
    assert re.search(r": model\.\S+\.weight \(target 'Linear' of group_0, \S*recipe\.yaml:1\): group size 256 does not "
                     r"divide the input dim of shape \[\d+, 128\]; use group_size 128, the largest that divides the "
                     r"input dim of every tensor group_0 selects, or a smaller one that does: 32 or 64; or leave this "
                     r"tensor out of the recipe's targets$", line), line
    recipe.write_text(recipe.read_text().replace('"group_size": 256', '"group_size": 128'))
    code, _, err = run_cli(capsys, "quantize", tiny_released, tmp_path / "g128", "--recipe", recipe,
                           "--allow-split-fused")   # KEEP keeps b_proj and f_a_proj, which vLLM fuses with q/k/v
    assert code == 0, err


def shared_experts_recipe(tmp_path, bits: int, group_size: int) -> Path:
    """The shared experts at `bits` in groups of `group_size` by a target that mentions "experts" (which transformers
    reads the routed experts with), the rest int4 in groups of 128 by "Linear"; the groups at lines 7 and 10."""
    recipe = tmp_path / "shared.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        quant_stage:
          quant_modifiers:
            QuantizationModifier:
              ignore: {json.dumps(KEEP)}
              config_groups:
                shared:
                  targets: ["re:.*shared_experts.*"]
                  weights: {{num_bits: {bits}, group_size: {group_size}}}
                rest:
                  targets: [Linear]
                  weights: {{num_bits: 4, group_size: 128}}
        """))
    return recipe


def test_a_recipe_group_size_advice_keeps_the_routed_experts_read_as_stored(tiny_released, tmp_path, capsys):
    """h188: a shared-experts group of group_size 256 (tiny's shared experts take 128 inputs) was offered 128, 32 or
    64; 32 and 64 met the next refusal, transformers reading the routed experts with this group's scheme while
    "Linear" stores them at 128. Now only the size that keeps the two alike is offered, and it quantizes."""
    recipe = shared_experts_recipe(tmp_path, 4, 256)
    line = fails(capsys, tmp_path, "--recipe", recipe, src=tiny_released)
    assert line == ("klconvert: error: model.layers.1.block_sparse_moe.shared_experts.gate_proj.weight (target "
                    f"'re:.*shared_experts.*' of shared, {recipe}:7): group size 256 does not divide the input dim of "
                    "shape [128, 128]; use group_size 128, group rest's: transformers reads the routed experts with "
                    "the scheme of group shared (its target 're:.*shared_experts.*' is the first that mentions "
                    '"experts") and group rest stores them, so the two must stay alike; or leave this tensor out of '
                    "the recipe's targets")
    with pytest.raises(KLError) as api:
        quantize(tiny_released, tmp_path / "api", recipe=recipe, progress=False)
    assert f"klconvert: error: {api.value}" == line
    followed = shared_experts_recipe(tmp_path, 4, 128)
    code, _, err = run_cli(capsys, "quantize", tiny_released, tmp_path / "g128", "--recipe", followed,
                           "--allow-split-fused")
    assert code == 0, err


def test_a_partial_group_no_size_can_keep_alike_is_told_what_can(tiny_released, tmp_path, capsys):
    """At 8 bits no group size makes the shared experts' scheme the routed experts' (int4): the refusal is that of
    transformers' reading, whose advice (a target without the word "experts") frees the group size."""
    recipe = shared_experts_recipe(tmp_path, 8, 256)
    line = fails(capsys, tmp_path, "--recipe", recipe, src=tiny_released)
    assert line == (f"klconvert: error: {recipe}:7: transformers reads the routed experts with the scheme of group "
                    "shared (int8 g256 sym: its target 're:.*shared_experts.*' is the first that mentions "
                    '"experts"), but group rest stores them (int4 g128 sym); write the other groups\' targets as re: '
                    'patterns without the word "experts" (e.g. re:^lm_head$, re:.*\\.shared_\\w+\\.down_proj$)')


def test_recipe_problems(tiny_released, tmp_path, capsys):
    nothing = write_recipe(tmp_path, {"group_0": ["Linear"], "group_1": ["re:.*no_such_module$"]}, KEEP)
    line = fails(capsys, tmp_path, "--recipe", nothing, src=tiny_released)
    assert "target 're:.*no_such_module$' of group_1 selects no tensor" in line and "recipe.yaml:" in line

    router = write_recipe(tmp_path, {"group_0": ["Linear"]}, KEEP[1:])  # the router no longer ignored
    line = fails(capsys, tmp_path, "--recipe", router, src=tiny_released)
    assert "would quantize model.layers.1.block_sparse_moe.gate.weight (the MoE router)" in line

    norms = write_recipe(tmp_path, {"group_0": ["Linear", "re:.*input_layernorm$"]}, KEEP)
    assert "(a norm weight), which must stay in high precision" in fails(capsys, tmp_path, "--recipe", norms,
                                                                          src=tiny_released)
    line = fails(capsys, tmp_path, "--recipe", nothing, "--bits", "8", src=tiny_released)
    assert "says how each tensor is stored; drop --bits" in line
    line = fails(capsys, tmp_path, "--recipe", nothing, "--observer", "mse", src=tiny_released)
    assert "says how each tensor is stored; drop --observer" in line


@pytest.mark.parametrize("weights, line, said", [
    ("{num_bits: 8, type: nf4}", 6, "not num_bits 8; set num_bits: 4"),
    ("{num_bits: 4, type: nf4, group_size: 128}", 6, "not group_size 128; set group_size: 64"),
    ("{num_bits: 4, type: nf4, symmetric: false}", 6, "not symmetric false; set symmetric: true"),
    ("{num_bits: 4, type: nf4, observer: mse}", 6, "not observer mse; set observer: minmax"),
])
def test_an_nf4_recipe_group_is_told_the_setting_nf4_takes(tiny_released, tmp_path, capsys, weights, line, said):
    """num_bits: 8 read "nf4 is 4-bit, symmetric, in blocks of 64, min-max; got bits=8, group_size=64,
    symmetric=True, observer=minmax": the API's field names, every field, and nothing to do (h182)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      config_groups:\n"
                      f"        a:\n          weights: {weights}\n          targets: [Linear]\n")
    assert fails(capsys, tmp_path, "--recipe", recipe, src=tiny_released) == (
        f"klconvert: error: {recipe}:{line}: nf4 is 4-bit, symmetric, in blocks of 64, min-max, {said}")


def test_truncated_shard(tiny_copy, tmp_path, capsys):
    shard = sorted(tiny_copy.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert "truncated?" in fails(capsys, tmp_path, "--group-size", "32", src=tiny_copy)


def _poison(folder, victim: str, values=(float("nan"),)) -> None:
    """Set the first len(values) elements of `victim` to `values` (the whole tensor when one value is given)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][victim]
    tensors = load_file(shard)
    if len(values) == 1:
        tensors[victim] = torch.full_like(tensors[victim], values[0])
    else:
        tensors[victim].view(-1)[:len(values)] = torch.tensor(values, dtype=tensors[victim].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_weights_too_large_for_a_finite_scale_are_one_line(tiny_copy, tmp_path, capsys):
    """Finite bf16 weights near its largest: asymmetric max - min overflows, and the folder's scale would be inf
    (the folder looked complete and failed to load)."""
    victim = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    _poison(tiny_copy, victim, (3.0e38, -3.0e38))
    line = fails(capsys, tmp_path, "--group-size", "32", "--asym", src=tiny_copy)
    assert f"{victim}: its scale" in line and "the source's weights are too large" in line


def test_weights_nf4_cannot_hold_are_one_line(tiny_copy, tmp_path, capsys):
    """Two finite blocks near bf16's largest value: bitsandbytes' double quantization overflows (the folder was written,
    exit 0, and its reader refused it as damaged)."""
    victim = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    _poison(tiny_copy, victim, (3.0e38,) + (0.0,) * 63 + (3.0e38,))
    line = fails(capsys, tmp_path, "--scheme", "nf4", src=tiny_copy)
    assert f"{victim}: its NF4 quant state overflows" in line and "the int scheme holds them" in line


def test_corrupt_values_in_a_shard_leave_nothing_behind(tiny_copy, tmp_path, capsys):
    victim = "model.layers.2.self_attn.o_proj.weight"
    _poison(tiny_copy, victim)
    line = fails(capsys, tmp_path, "--group-size", "32", src=tiny_copy)
    assert f"tensor {victim} holds nan" in line and "NaN or infinite" in line and "resumes" not in line
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.partial.lock").exists()


@pytest.mark.parametrize("value, said", [(float("nan"), "tensor lm_head.weight holds nan"),
                                         (torch.finfo(torch.bfloat16).max, "lm_head.weight: its scale")])
def test_values_refused_after_finished_shards_keep_nothing(tiny_copy, tmp_path, value, said):
    """A rerun over the same files meets the same values, and once the source is mended a rerun was refused the kept
    shards (its files have changed) and offered --force: the line offered a resume that no rerun takes, and kept the
    finished shards (for the 48B release, whose last tensor lm_head is, ~25 GB) for nothing."""
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    shard = tiny_copy / index["weight_map"]["lm_head.weight"]
    good = shard.read_bytes()
    _poison(tiny_copy, "lm_head.weight", (value,))  # the last tensor written
    options = dict(group_size=32, max_shard_bytes=2 << 20, progress=False)
    with pytest.raises(KLError, match=re.escape(said)) as refused:
        quantize(tiny_copy, tmp_path / "out", **options)
    assert "finished in" not in str(refused.value) and "resume" not in str(refused.value)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()
    shard.write_bytes(good)
    assert quantize(tiny_copy, tmp_path / "out", **options).path.is_dir()


WRITE_SIZES = r"\([\d.,]+ (?:GB|MB|bytes) to write, [\d.,]+ (?:GB|MB|bytes) free\)"  # a disk-full line's


def test_disk_full(tiny_released, tmp_path, capsys, monkeypatch):
    """The line named OUT.partial, not the shard it was writing, nor that shard's size (helper-133)."""
    break_shard_write(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    line = fails(capsys, tmp_path, "--group-size", "32", src=tiny_released)
    shard = re.escape(str(tmp_path / "out.partial" / "model-00001-of-"))
    assert re.search(rf"disk full writing {shard}\d{{5}}\.safetensors {WRITE_SIZES}; free some space, then rerun",
                     line), line
    assert "resumes" not in line
    assert not (tmp_path / "out.partial").exists()  # nothing finished, nothing left behind


def test_a_quota_exceeded_is_said_as_that_with_no_free_space(tiny_released, tmp_path, capsys, monkeypatch):
    """EDQUOT read "disk full writing ... (... free)": statvfs's free space is the disk's, which a quota hides (h213's
    F7)."""
    break_shard_write(monkeypatch, 1, OSError(errno.EDQUOT, "Disk quota exceeded"))
    line = fails(capsys, tmp_path, "--group-size", "32", src=tiny_released)
    shard = re.escape(str(tmp_path / "out.partial" / "model-00001-of-"))
    assert re.search(rf"disk quota exceeded writing {shard}\d{{5}}\.safetensors; remove files that count against "
                     "your quota there, or have it raised, then rerun", line), line
    assert "disk full" not in line and "free)" not in line


def test_a_full_disks_free_space_is_what_was_left_as_it_filled(tiny_released, tmp_path, capsys, monkeypatch):
    """helper-133: the line's "free" was measured after the failed run removed what it wrote -- room for a rerun,
    where the disk had just filled -- so a disk full of a run's own shards read "(... to write, 40 GB free)"."""
    partial = tmp_path / "out.partial"
    monkeypatch.setattr(disk_space, "free_disk_bytes", lambda folder: 1000 if partial.exists() else 40 * 10**9)
    break_shard_write(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    line = fails(capsys, tmp_path, "--group-size", "32", src=tiny_released)
    assert re.search(r" to write, 1,000 bytes free\); free some space, then rerun", line), line
    assert not partial.exists()


def test_disk_full_writing_the_config_names_it(tiny_released, tmp_path, capsys, monkeypatch):
    """A write that fails in the file, not at its open, named OUT.partial only (helper-133)."""
    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def opened(path, mode):
        return (FullDisk if path.name.startswith(".config.json.") else open)(path, mode)

    monkeypatch.setattr(atomic_file, "open", opened, raising=False)
    line = fails(capsys, tmp_path, "--group-size", "32", src=tiny_released)
    config = re.escape(str(tmp_path / "out.partial" / "config.json"))
    assert re.search(rf"disk full writing {config} {WRITE_SIZES}; free some space, then rerun \(the "
                     r"same command resumes: (\d+) shards? of \1 finished in", line), line


def test_existing_out(tiny_released, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "quantize", tiny_released, tmp_path / "out", "--group-size", "32")
    assert_one_line_error(code, err, "already exists", "--force")
    assert list((tmp_path / "out").iterdir()) == []


def test_existing_out_is_offered_force_only_where_force_replaces_it(quantized, tiny_released, tmp_path, capsys):
    """Any existing OUT was told "or pass --force to replace it", and --force then refused a folder holding files
    klconvert did not write (h182): the offer goes only where --force would take OUT."""
    theirs, ours, ours_and_theirs = (tmp_path / name for name in ("theirs", "ours", "ours-and-theirs"))
    theirs.mkdir()
    shutil.copytree(quantized, ours)
    shutil.copytree(quantized, ours_and_theirs)
    for folder in (theirs, ours_and_theirs):
        (folder / "notes.txt").write_text("mine")
    for out, offered in ((theirs, False), (ours, True), (ours_and_theirs, False)):
        args = ("quantize", tiny_released, out, "--bits", "8", "--group-size", "32")
        line = assert_one_line_error(*run_cli(capsys, *args)[::2], f"{out}: is not empty (it holds ",
                                     "; choose another output folder")
        assert ("--force" in line) == offered, line
        if not offered:
            assert line.endswith("choose another output folder (or move it away)"), line
            assert_one_line_error(*run_cli(capsys, *args, "--force")[::2], "--force replaces only")
        assert (out / "notes.txt").exists() != (out == ours)


def test_out_is_the_source(tiny_copy, capsys):
    code, _, err = run_cli(capsys, "quantize", tiny_copy, tiny_copy, "--group-size", "32", "--force")
    assert_one_line_error(code, err, "is the source folder")
    assert (tiny_copy / "config.json").exists()


def test_already_quantized_source(quantized, tmp_path, capsys):
    assert "already quantized (config.json has a quantization_config, quant_method compressed-tensors)" in fails(
        capsys, tmp_path, "--group-size", "32", src=quantized)
    stripped = shutil.copytree(quantized, tmp_path / "stripped")
    config = json.loads((stripped / "config.json").read_text())
    del config["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    assert "already quantized (it holds model.layers.0.self_attn.q_proj.weight_packed, though config.json has no " \
           "quantization_config)" in fails(capsys, tmp_path, "--group-size", "32", src=stripped)


@pytest.mark.parametrize("declared, said", [
    ([1, 2], "quantization_config is a list ([1, 2]), not an object naming its quant_method"),
    ({"format": "pack-quantized"}, "quantization_config has no quant_method"),
])
def test_a_quantization_config_naming_no_method_is_not_called_quantized(tiny_copy, tmp_path, capsys, declared, said):
    """Over bf16 weights it was "already quantized (..., quant_method unknown); quantize the original bf16 checkpoint
    instead" -- of the original bf16 checkpoint (helper-138)."""
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "quantization_config": declared}))
    line = fails(capsys, tmp_path, "--group-size", "32", src=tiny_copy)
    assert f"{tiny_copy / 'config.json'}: {said}" in line and "already quantized" not in line, line


@pytest.mark.parametrize("declared, needle", [
    (policy_from_options(bits=4).quantization_config(), "declares pack-quantized weights, but no tensor here is "
                                                        "stored packed (no *.weight_packed)"),
    (policy_from_options(scheme="nf4").quantization_config(), "declares bitsandbytes weights, but no tensor here is "
                                                              "stored packed (no *.weight.absmax)"),
], ids=["compressed-tensors", "bitsandbytes"])
def test_a_quantization_config_over_float_weights_is_named_not_called_quantized(tiny_copy, tmp_path, capsys,
                                                                                declared, needle):
    """quantize trusted quantization_config alone: float weights under a config copied over them were "already
    quantized", and the fix it named -- quantize the bf16 checkpoint -- was this folder. The tensors decide."""
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "quantization_config": declared}))
    line = fails(capsys, tmp_path, "--group-size", "32", "--device", "cpu", src=tiny_copy)
    assert f"{tiny_copy}/config.json: quantization_config {needle}: this config.json does not belong to these " \
           "weights -- put back the one they came with, or delete its quantization_config" in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_requested_without_cuda(tiny_released, tmp_path, capsys):
    assert "device='cuda' (--device): no CUDA device" in fails(capsys, tmp_path, "--group-size", "32", "--device",
                                                               "cuda", src=tiny_released)


@pytest.mark.parametrize("where", ["proc", "read-only"])
def test_an_output_folder_that_takes_no_files_is_one_line(tiny_released, tmp_path, capsys, where):
    """OUT in an existing folder where no file can be created: quantize and synth say so, and leave nothing. The
    read-only folder's commands run held to its mode bits, which root would otherwise write past."""
    if where == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        parent = Path("/proc")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir(mode=0o555)
    out = parent / f"klconvert-out-{os.getpid()}"
    for args in (["quantize", tiny_released, out, "--device", "cpu"], ["synth", "--preset", "tiny", "--out", out]):
        code, err = run_cli(capsys, *args)[::2] if where == "proc" else klconvert_held(*args)
        assert_one_line_error(code, err, f"{out}: cannot create files in the folder it goes in, {parent} (",
                              "); choose a folder you can write to")
    assert not any(f"klconvert-out-{os.getpid()}" in p.name for p in parent.iterdir())   # nor a probe


def test_an_output_path_under_a_file_is_one_line(tiny_released, tmp_path, capsys):
    """OUT whose parent is a regular file: quantize and synth say so, and leave nothing."""
    (tmp_path / "afile").write_text("x")
    for args in (["quantize", tiny_released, tmp_path / "afile" / "out", "--device", "cpu"],
                 ["synth", "--preset", "tiny", "--out", tmp_path / "afile" / "out"]):
        assert_one_line_error(*run_cli(capsys, *args)[::2],
                              f"{tmp_path / 'afile' / 'out'}: cannot create the folder it goes in, "
                              f"{tmp_path / 'afile'} (a file is in the way); choose another output path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_huge_side_file_is_refused_before_anything_is_written(tiny_copy, tmp_path, capsys):
    os.truncate(tiny_copy / "generation_config.json", 40 << 20)  # sparse: a side file past any model's
    line = fails(capsys, tmp_path, "--group-size", "32", "--device", "cpu", src=tiny_copy)
    assert "generation_config.json: 41,943,040 bytes, over the 32.0 MiB a" in line, line
    assert not (tmp_path / "out.partial").exists()


def test_klconvert_bookkeeping_in_the_source_is_not_copied(tiny_copy, tmp_path, monkeypatch):
    """A source holding a partial output's resume record (or any hidden file) gives OUT none of them: the record of
    OUT.partial stays its own until the rename, so a run stopped after the side files still resumes."""
    (tiny_copy / ".klconvert-resume.json").write_text('{"format": 1}')
    (tiny_copy / ".hidden.json").write_text("{}")

    def stop(*args):
        raise KLError("stopped before the model card")

    monkeypatch.setattr("klconvert.quantize.model_card", stop)
    with pytest.raises(KLError, match="stopped before the model card"):
        quantize(tiny_copy, tmp_path / "out", bits=8, group_size=32, device="cpu", progress=False)
    partial = tmp_path / "out.partial"
    assert (partial / "generation_config.json").read_bytes() == (tiny_copy / "generation_config.json").read_bytes()
    assert "source" in json.loads((partial / ".klconvert-resume.json").read_text())
    assert not (partial / ".hidden.json").exists()


def test_a_side_file_linked_from_outside_the_source_is_refused(tiny_copy, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for sharing")
    (tiny_copy / "leak.json").symlink_to(secret)
    line = fails(capsys, tmp_path, src=tiny_copy)
    assert "leak.json: a link to" in line and "outside the model folder" in line


def test_side_files_linked_into_the_hub_caches_blobs_are_copied(tiny_released, tmp_path):
    """The Hugging Face cache's snapshots/<commit>/ holds links into the repo's blobs/: the files are its own."""
    storage = tmp_path / "models--org--name"
    snapshot, blobs = storage / "snapshots" / ("a" * 40), storage / "blobs"
    shutil.copytree(tiny_released, snapshot)
    blobs.mkdir()
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (snapshot / name).rename(blobs / name)
        (snapshot / name).symlink_to(Path("../../blobs") / name)
    out = quantize(snapshot, tmp_path / "q", bits=8, group_size=32, progress=False).path
    assert (out / "tiktoken.model").read_bytes() == (blobs / "tiktoken.model").read_bytes()


def test_a_refused_run_leaves_no_folders_it_made_for_out(tiny_copy, tmp_path, capsys):
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "hidden_size": -1}))
    code, _, err = run_cli(capsys, "quantize", tiny_copy, tmp_path / "deep" / "a" / "out")
    assert_one_line_error(code, err, "hidden_size")
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("command", ["quantize", "synth", "pull-and-quantize"])
@pytest.mark.parametrize("name,needle", [("q\nlicense: evil", "holds a control character"),
                                         ("a" * 300, "300 bytes, over the 255"),
                                         ("a" * 250, "too long for the files made beside it"),
                                         # the write test's name was left out: "cannot create files in the folder"
                                         ("a" * 240, "choose a name of at most 223 bytes")])
def test_an_out_name_no_file_system_or_terminal_takes_is_one_line(tiny_released, tmp_path, capsys, command, name,
                                                                  needle):
    out = str(tmp_path / name)
    args = {"quantize": ("quantize", tiny_released, out), "synth": ("synth", "--preset", "tiny", "--out", out),
            "pull-and-quantize": ("pull-and-quantize", "--model", tiny_released, "--out", out)}[command]
    assert_one_line_error(*run_cli(capsys, *args)[::2], needle)
    assert list(tmp_path.iterdir()) == []


# ---- the Python API: values the command line's parser never passes ------------------------------------------
def test_numpy_and_torch_integers_are_whole_numbers_to_quantize(tiny_released, tmp_path):
    """As load and generate take them: bits=np.int64(4) was "--bits np.int64(4) is not supported; use --bits 4"."""
    out = quantize(tiny_released, tmp_path / "q", bits=np.int64(4), group_size=torch.tensor(32),
                   max_shard_bytes=np.int32(400_000), progress=False).path
    config = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert config["weights"]["num_bits"] == 4 and config["weights"]["group_size"] == 32


@pytest.mark.parametrize("options,needle", [
    # symmetric="no" quantized symmetric and symmetric=0 asymmetric, each written as given into config.json
    (dict(symmetric="no"), "--sym/--asym: symmetric='no' is not a bool; pass symmetric=True (--sym), False"),
    (dict(symmetric=0), "symmetric=0 is not a bool"),
    (dict(bits=4.0), "--bits 4.0 is not supported; use --bits 4 or --bits 8"),   # was a TypeError
    (dict(bits="4"), "--bits '4' is not supported"),   # was "--bits 4 is not supported; use --bits 4"
    (dict(bits=True), "--bits True is not supported"),
    (dict(group_size=32.0), "--group-size 32.0 is not a whole number; use 32, 64 or 128"),
    (dict(group_size="32"), "--group-size '32' is not a whole number"),   # was a TypeError
    (dict(group_size=True), "--group-size True is not a whole number"),
    (dict(scheme=""), "--scheme '' is not supported; use --scheme int or --scheme nf4"),   # was the default
    (dict(scheme="int4"), "--scheme 'int4' is not supported"),
    (dict(observer=""), "--observer '' is not supported; use --observer minmax or --observer mse"),
    (dict(observer=0), "--observer 0 is not supported"),
    # 0 was the default 5 GB; -5, 1.5 and True a shard per tensor
    (dict(max_shard_bytes=0), "max_shard_bytes=0 (--max-shard-size): give a whole number of bytes, at least 1"),
    (dict(max_shard_bytes=-5), "max_shard_bytes=-5 (--max-shard-size)"),
    (dict(max_shard_bytes=1.5), "max_shard_bytes=1.5 (--max-shard-size)"),
    (dict(max_shard_bytes=True), "max_shard_bytes=True (--max-shard-size)"),
    (dict(device="tpu"), "device='tpu' (--device) is not supported; use cpu, cuda or cuda:N"),  # was torch's
    (dict(device="meta"), "device='meta' (--device) is not supported"),
    (dict(device=0), "device=0 (--device) is not supported"),
    # each taken by its truth: force="no" replaced an existing OUT, allow_split_fused="no" wrote a folder vLLM refuses
    (dict(force="no"), "force='no' (--force) is not a bool; pass True or False"),
    (dict(force=1), "force=1 (--force) is not a bool"),
    (dict(allow_split_fused="no"), "allow_split_fused='no' (--allow-split-fused) is not a bool"),
    (dict(progress=None), "progress=None is not a bool; pass True or False"),
    # a flag that changes nothing is said, not ignored: only a recipe can split a module vLLM fuses
    (dict(allow_split_fused=True), "--allow-split-fused lets a --recipe split a module vLLM fuses, and no --recipe "
                                   "is given (the other options never split one); drop --allow-split-fused"),
])
def test_a_bad_value_from_python_is_refused_up_front(tiny_released, tmp_path, options, needle):
    out = tmp_path / "q"
    with pytest.raises(KLError) as e:
        quantize(tiny_released, out, **{"progress": False, **options})
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_pull_and_quantize_refuses_a_bad_device_or_shard_size_before_any_download(tmp_path, monkeypatch):
    def no_pull(*args, **kwargs):
        raise AssertionError("pulled")

    monkeypatch.setattr(quantize_module, "pull", no_pull)
    for options, needle in ((dict(device="tpu"), "device='tpu' (--device)"),
                            (dict(max_shard_bytes=0), "max_shard_bytes=0"),
                            (dict(force="no"), "force='no' (--force) is not a bool"),
                            (dict(allow_split_fused=True), "no --recipe is given")):
        with pytest.raises(KLError, match=re.escape(needle)):
            quantize_module.pull_and_quantize("acme/kimi", tmp_path / "q", progress=False, **options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("entry", ["quantize", "pull_and_quantize"])
@pytest.mark.parametrize("other", [dict(allow_split_fused=True), dict(bits=3), dict(device="tpu")],
                         ids=["switch", "bits", "device"])
def test_the_api_refuses_the_shard_size_first_as_the_command_line_does(tmp_path, entry, other):
    """`klconvert quantize tiny q --bits 3 --max-shard-size 0` is refused for the shard size, before torch's import
    (cli._refuse_quantize_options: the shard size, the switches, the policy's flags), where quantize(bits=3,
    max_shard_bytes=0) was refused for --bits, and for the device before the shard size, though b6f770f called the
    command line's order the quantizer's (test_cli_surface's shard-before-bits case holds the command line's).
    Both say the shard size first."""
    with pytest.raises(KLError, match=re.escape("max_shard_bytes=0 (--max-shard-size)")):
        getattr(quantize_module, entry)("tiny", tmp_path / "q", max_shard_bytes=0, progress=False, **other)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["added_tokens_decoder"][max(c["added_tokens_decoder"], key=int)].update(lstrip=None),
     "sets lstrip to None, which is neither true nor false, so "
     "transformers cannot load the tokenizer; set it to false, or re-download the model"),
    (lambda c: c["additional_special_tokens"].__setitem__(2, 0),
     "additional_special_tokens[2] is 0, not a special token (its text, or {\"__type\": "
     "\"AddedToken\", \"content\": <its text>}), so transformers cannot load the tokenizer; fix the file or "
     "re-download the model"),
    # h192: held as bos_token is -- transformers added the text as a new id past the vocabulary, or failed on an int
    *((lambda c, key=key, value=value: c.update({key: value}),
       f"{key} {value!r} is not in added_tokens_decoder; fix the file or re-download the model")
      for key, value in (("unk_token", "<|nope|>"), ("mask_token", "<mask>"), ("think_token", "<think>"))),
    (lambda c: c.update(unk_token=5),
     "unk_token is 5, not a special token (its text, or {\"__type\": \"AddedToken\", \"content\": <its text>}), so "
     "transformers cannot load the tokenizer; fix the file or re-download the model"),
    # a named token as a dict: transformers takes a serialized AddedToken of bool flags only
    (lambda c: c.update(bos_token={"content": "[BOS]"}),
     "bos_token is {'content': '[BOS]'}, not a special token (its text, or {\"__type\": \"AddedToken\", \"content\": "
     "<its text>}), so transformers cannot load the tokenizer; fix the file or re-download the model"),
    (lambda c: c.update(eos_token={"__type": "AddedToken", "content": "[EOS]", "lstrip": None}),
     "eos_token sets lstrip to None, which is neither true nor false, so transformers cannot load the tokenizer; fix "
     "the file or re-download the model"),
])
def test_a_tokenizer_config_transformers_cannot_load_is_refused_before_anything_is_written(tiny_copy, tmp_path, capsys,
                                                                                          edit, words):
    """h180's probe: quantize copied it, exit 0, into an output whose tokenizer transformers then failed to load."""
    path = tiny_copy / "tokenizer_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    line = fails(capsys, tmp_path, "--group-size", "32", "--device", "cpu", src=tiny_copy)
    assert f"{path}: " in line and line.endswith(words), line
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("text, words", [
    ('{"eos_token_id": 5, "eos_token_id": 6}', "not a generation config (key 'eos_token_id' appears twice in one "
                                               "object); fix the file or re-download the model"),
    ('{"eos_token_id": [5, 1000000]}', "eos_token_id 1000000 is outside the vocabulary 0.."),
    ('{"eos_token_id": "[EOS]"}', "eos_token_id '[EOS]' is not a token id or a list of them; fix the file or "
                                  "re-download the model"),
    ('{"eos_token_id": [true]}', "eos_token_id [True] is not a token id or a list of them"),
    ('[]', "expected a JSON object at the top level; fix the file or re-download the model"),
    ('{"eos_token_id": 5, "pad_token_id": 99999}', "pad_token_id 99999 is outside the vocabulary 0.."),   # h188
    ('{"bos_token_id": -5}', "bos_token_id -5 is outside the vocabulary 0.."),
    ('{"pad_token_id": [5]}', "pad_token_id [5] is not a token id; fix the file or re-download the model"),
])
def test_a_generation_config_with_other_stop_ids_is_refused_before_anything_is_written(tiny_copy, tmp_path, capsys,
                                                                                       text, words):
    """h180's probe: quantize copied a generation_config.json giving eos_token_id twice (json, and so transformers,
    keeps the last; other readers the first) or past the vocabulary, where transformers and vLLM take stop ids."""
    path = tiny_copy / "generation_config.json"
    path.write_text(text)
    line = fails(capsys, tmp_path, "--group-size", "32", "--device", "cpu", src=tiny_copy)
    assert f"{path}: {words}" in line, line
    assert not (tmp_path / "out.partial").exists()


def test_a_shard_that_cannot_be_written_is_one_line_and_leaves_no_out(tiny_released, tmp_path, capsys, monkeypatch):
    """A failing disk (EIO) at the second shard, the first finished: the line names the shard, the system's reason and
    what a rerun keeps; OUT is not there, only OUT.partial with the finished shard, which the rerun resumes from."""
    break_shard_write(monkeypatch, 2, OSError(errno.EIO, "Input/output error"))
    line = fails(capsys, tmp_path, "--bits", "8", "--group-size", "32", "--max-shard-size", "1MB", src=tiny_released)
    partial = tmp_path / "out.partial"
    finished = [p.name for p in partial.glob("*.safetensors")]
    assert len(finished) == 1 and finished[0].startswith("model-00001-of-"), finished
    total = int(finished[0].split("-of-")[1].removesuffix(".safetensors"))
    assert line == (f"klconvert: error: cannot write {partial / finished[0].replace('00001-of', '00002-of')} "
                    "(Input/output error): its disk or file system failed the write -- check it (the kernel's log, "
                    "dmesg), or write to another disk, then rerun (the same command resumes: 1 shard of "
                    f"{total} finished in {partial})")
    assert not (partial / "config.json").exists()
    monkeypatch.undo()
    assert quantize(tiny_released, tmp_path / "out", bits=8, group_size=32, max_shard_bytes=10**6,
                    progress=False).shards_resumed == 1
