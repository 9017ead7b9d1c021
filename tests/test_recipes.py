"""GPU-tier recipes fit their tiers; `klconvert plan --recipe` names a bad recipe's line; weights sized as stored."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from klconvert.sizes import parse_size
from klconvert.errors import MAX_LISTED, KLError
from klconvert.kernels.int_layout import ROWS
from klconvert.quant import QuantScheme, compress_weight, load_recipe
from klconvert.quant.group_rules import CHANNEL
from klconvert.runtime.memory_plan import stored_bytes
from klconvert.runtime.plan_report import plan_for
from testkit import assert_one_line_error, run_cli

RECIPE_DIR = Path(__file__).parent.parent / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))
HEADROOM = 0.05
BF16_EXPERTS = 26 * 256 * 3 * 1024 * 2304 * 2  # the routed experts of the released model, in bytes


def test_every_tier_has_a_recipe_except_24gb():
    assert sorted(p.name for p in RECIPES) == ["141gb.yaml", "32gb.yaml", "48gb.yaml", "80gb.yaml"]
    assert "No 24 GB recipe" in (RECIPE_DIR / "32gb.yaml").read_text()  # the smallest tier's comment says why


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_fits_its_tier_with_headroom(path):
    recipe = load_recipe(path)
    p = plan_for(preset="kimi-linear-48b", recipe=recipe)
    assert p.context == recipe.runtime["max_context"] and p.batch == recipe.runtime["batch"]
    assert p.memory_limit == parse_size(recipe.runtime["gpu_memory"]) == int(path.stem[:-2]) * 2**30
    assert p.headroom >= HEADROOM * p.memory_limit, f"{path.name}: {p.headroom / 2**30:.2f} GiB headroom"
    assert p.weight_bytes["experts"] < 0.52 * BF16_EXPERTS  # the routed experts at 8 bits or fewer


def test_plan_command_takes_the_recipe_and_flags_override_it(capsys):
    code, out, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--layers", "4",
                                    "--recipe", str(RECIPE_DIR / "32gb.yaml"), "--max-context", "4096",
                                    "--mla-cache-dtype", "float8_e4m3fn")
    assert code == 0, err
    assert "context 4,096" in out and "MLA cache float8_e4m3fn" in out and "GPU memory" in out
    fp32_state_out = out
    assert re.search(r"MLA latent cache / token +580 B", out)  # 1 MLA layer: 576 values x 1 byte + an fp32 scale
    # the recipe's gpu_memory (32 GiB), batch (1) and KDA state dtype (float32) give way to the flags too (h169's
    # mutants: the recipe's gpu_memory taken over the flag, the flag's state dtype ignored, the state sized at 4 bytes)
    code, out, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--layers", "4", "--recipe", "32gb",
                             "--gpu-memory", "80GiB", "--batch", "2", "--kda-state-dtype", "bfloat16")
    assert code == 0, err
    assert "batch 2," in out and "KDA state bfloat16" in out and re.search(r"GPU memory +80\.00 GiB", out)
    # a bf16 state is a size only: the runtime keeps fp32, and the plan's head says so (only then)
    assert "KDA state bfloat16 (sized only: the runtime keeps it in float32)" in out
    assert "sized only" not in fp32_state_out
    # 3 KDA layers of the first 4, 32 heads, a 128 x 128 state each, 2 bytes a value
    assert re.search(r"KDA recurrent state / sequence +3\.0 MiB \(3\.1 MB\)", out), out
    code, _, err = run_cli(capsys, "plan", "--preset", "tiny", "--recipe", str(RECIPE_DIR / "32gb.yaml"),
                                  "--bits", "4")
    assert code == 2 and "not both" in err


@pytest.mark.parametrize("layers", [("--layers", "1"), ()], ids=["1-layer", "all-layers"])
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_plans_the_preset_at_any_layer_count(path, layers, capsys):
    """The shipped recipes are written for the released model. At --layers 1 (layer 0 alone, whose MLP is dense: no
    routed experts) the experts group's "Linear" selected nothing there and the plan was refused; a preset cut to
    --layers is held to its whole model, as quantize holds a recipe to the checkpoint it converts."""
    code, out, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", *layers, "--recipe", path.stem)
    assert code == 0 and err == "", err
    assert out.startswith("Memory plan for") and "weights total" in out


def test_fp8_mla_cache_is_one_byte_a_value_and_a_scale_a_row():
    p = plan_for(preset="kimi-linear-48b", layers=4, mla_cache_dtype="float8_e4m3fn", context=1 << 20)
    assert p.mla_bytes_per_token == 1 * (576 * 1 + 4)
    assert p.mla_cache_bytes == 580 << 20


RECIPE = r"""quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: [lm_head, "re:.*\\.(block_sparse_moe|mlp)\\.gate$", "re:.*(f_a|f_b|g_a|g_b|b)_proj$", "re:.*conv1d$"]
      config_groups:
        group_0:
          targets: ["Linear", "re:.*w1$"]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32}
"""
# case: (text replaced -> by, line the error names, what it says)
BAD_RECIPES = {
    "unknown runtime key": (("group_size: 32}\n", "group_size: 32}\nruntime:\n  max_contxt: 4096\n"), 10,
                            "unknown key 'max_contxt'"),
    "unknown modifier key": (("      ignore:", "      scheme_typo: W4A16\n      ignore:"), 4,
                             "unknown key 'scheme_typo'"),
    "bad regex": (('"re:.*w1$"', '"re:.*experts.(w1"'), 7, "not a valid regular expression"),
    "target selecting nothing": (('"re:.*w1$"', r'"re:.*\\.experts\\.\\d+\\.w9$"'), 7, "selects no tensor"),
    "escape sequence in a target": (('"re:.*w1$"', r'"re:.*w1\e[2J$"'), 7,
                                    r"'re:.*w1\x1b[2J$' holds a control character or an unpaired surrogate"),
    "unpaired surrogate in ignore": (("[lm_head,", r'["lm_head\ud800",'), 4, "holds a control character or an "
                                                                            "unpaired surrogate; a name or pattern"),
    "control character in a group name": (("group_0:", '"group\\t0":'), 6, "a key of config_groups"),
    "nf4 by channel": (("type: int, symmetric: true, strategy: group, group_size: 32", "type: nf4, strategy: channel"),
                       8, "strategy 'channel' is not nf4's"),
    # values said in the message, quoted short (a YAML explicit key may be a line of 1 MB; they were quoted whole)
    "a huge group name": (("group_0:", f"? {'g' * 500_000}\n        :"), 6,
                          f"config group name '{'g' * 76}... is 500,000 characters long; give it a name of at most"),
    "a huge unknown key": (("      ignore:", f"      ? {'k' * 500_000}\n      : 1\n      ignore:"), 4,
                           f"unknown key '{'k' * 76}... in "),
    "a huge type": (("type: int,", f"type: {'t' * 500_000},"), 8, f"type '{'t' * 76}... is not supported"),
}


@pytest.mark.parametrize("case", BAD_RECIPES)
def test_recipe_errors_name_the_line(case, tmp_path, capsys):
    (old, new), line, message = BAD_RECIPES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE.replace(old, new))
    code, out, err = run_cli(capsys, "plan", "--preset", "tiny", "--recipe", str(path))
    assert code == 2 and out == ""
    assert err.startswith(f"klconvert: error: {path}:{line}:") and message in err, err[:400]
    assert len(err.strip().splitlines()) == 1 and len(err) < 1000, err[:400]


# keys enough that listing them all is far past the line's bound of 1,000 characters (17 KB; the finding's 40,000 made
# 680 KB, and YAML took seconds to read them, twice a test)
MANY_KEYS = 1_000


@pytest.mark.parametrize("text, needles", [
    ("".join(f"s{i:06d}_stage: 1\n" for i in range(MANY_KEYS)),
     ("the recipe should hold exactly one '<name>_stage' section, got ['s000000_stage', ",
      f"... {MANY_KEYS - MAX_LISTED} more]")),
    ("quant_stage:\n" + "".join(f"  m{i:06d}_modifiers: 1\n" for i in range(MANY_KEYS)),
     ("quant_stage should hold exactly one key named '<name>_modifiers', got ['m000000_modifiers', ",
      f"{MANY_KEYS - MAX_LISTED} more]")),
    (RECIPE.replace("num_bits: 4", "num_bits: " + "9" * 4299),
     ("supports 4 or 8 bits, got an integer of 4,299 digits",)),
    (RECIPE.replace("num_bits: 4", f"num_bits: !{'t' * 500_000} 4"),
     ("could not determine a constructor for the tag",)),
], ids=["stages", "modifiers", "bits", "tag"])
def test_a_recipe_of_many_keys_or_huge_values_is_said_short(text, needles, tmp_path, capsys):
    """40,000 stage or modifier keys were all listed (a 680 KB line); an int of 4,299 digits, a tag of 500,000
    characters were said whole."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for args in (("plan", "--preset", "tiny"), ("quantize", "tiny", tmp_path / "q")):
        line = assert_one_line_error(*run_cli(capsys, *args, "--recipe", path)[::2], *needles)
        assert len(line) < 1000, len(line)


@pytest.mark.parametrize("layers", ["1", "2"])
def test_a_preset_cut_to_layers_still_refuses_a_target_its_whole_model_lacks(layers, tmp_path, capsys):
    (old, new), line, message = BAD_RECIPES["target selecting nothing"]
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE.replace(old, new))
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--layers", layers, "--recipe", path)[::2],
                          f"{path}:{line}:", message)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, True), QuantScheme(4, 32, False), QuantScheme(8, CHANNEL, True),
                                    QuantScheme(8, 16, False)], ids=lambda s: s.describe().replace(" ", "-"))
def test_stored_bytes_are_the_written_tensors(scheme):
    w = torch.randn(36, 96, dtype=torch.bfloat16)  # 36 rows: int4 zero points fill 4.5 int32 words
    written = compress_weight("m", w, scheme)
    held = sum(t.numel() * t.element_size() for name, t in written.items() if name != "m.weight_shape")
    assert stored_bytes((36, 96), scheme, torch.bfloat16) == held


def test_stored_bytes_nf4():
    # the tensors bitsandbytes 0.50.2 writes for a [1024, 2304] expert weight (importing it takes ~10 s on CPU):
    # weight uint8 [n/2, 1], absmax uint8 [n/64], quant_map fp32 [16], nested_absmax fp32 [144],
    # nested_quant_map fp32 [256]; the quant state's JSON is read into Python, not held
    nf4 = QuantScheme(4, 64, True, "nf4")
    assert stored_bytes((1024, 2304), nf4, torch.bfloat16) == 1179648 + 36864 + 64 + 576 + 1024


@pytest.mark.parametrize("group_size", [128, 32])
def test_plan_of_a_quantized_folder_sizes_its_tensors_as_a_gpu_holds_them(tiny_released, tmp_path, group_size):
    """Experts the Triton kernels take (groups of 128) are planned as the repack holds what was written, zero points
    as wide as the scales (whole blocks of rows here: none padded); groups of 32, which they do not take and the
    runtime dequantizes, as bf16 -- what the GPU holds, not what the folder's recipe.yaml says."""
    from safetensors import safe_open

    from klconvert.quantize import quantize

    out = quantize(tiny_released, tmp_path / "int4-asym", bits=4, group_size=group_size, symmetric=False,
                   device="cpu", progress=False).path
    p = plan_for(model=out)
    held = bf16 = 0
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for n in f.keys():
                if ".experts." in n and n.endswith(("weight_packed", "weight_scale")):
                    held += f.get_tensor(n).nbytes * (2 if n.endswith("weight_scale") else 1)
                if ".experts." in n and n.endswith("weight_shape"):
                    assert f.get_tensor(n)[0] % ROWS == 0
                    bf16 += 2 * math.prod(f.get_tensor(n).tolist())
    assert p.weight_bytes["experts"] == (held if group_size == 128 else bf16)


@pytest.mark.parametrize("runtime,message", [
    ("gpu_memory: .nan", "runtime.gpu_memory should be a positive number of bytes, got nan"),
    ("gpu_memory: '1e400GiB'", "runtime.gpu_memory '1e400GiB': give a size like 48GiB or 80GB"),
    ("batch: 99999999999999999999", "runtime.batch 99999999999999999999 is past the 65,536 sequences"),
    ("batch: 65537", "runtime.batch 65537 is past the 65,536 sequences"),   # one past what --batch takes
    ("mla_cache_dtype: int8", "MLA cache dtype 'int8' is not supported"),
    ("max_context: 99999999", "runtime.max_context 99999999 is over the model's model_max_length"),
])
def test_quantize_refuses_a_runtime_section_plan_would_refuse(runtime, message, tiny_released, tmp_path, capsys):
    """quantize writes the recipe into OUT/recipe.yaml, which `klconvert plan --model OUT` reads."""
    path = tmp_path / "bad.yaml"
    path.write_text(RECIPE + f"runtime:\n  {runtime}\n")   # the value on line 10
    for args in (("quantize", tiny_released, tmp_path / "q"), ("plan", "--preset", "tiny")):
        code, _, err = run_cli(capsys, *args, "--recipe", str(path))
        assert_one_line_error(code, err, f"{path}:10: ", message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_a_recipes_batch_is_taken_up_to_what_the_flag_takes(tmp_path, capsys):
    """runtime.batch 65,536, the most --batch takes, plans (h169's mutation testing: refusing it passed every test)."""
    path = tmp_path / "big.yaml"
    path.write_text(RECIPE + "runtime:\n  batch: 65536\n  max_context: 64\n")
    code, out, err = run_cli(capsys, "plan", "--preset", "tiny", "--recipe", str(path))
    assert code == 0 and ": batch 65536," in out, err


def test_plan_refuses_an_absurd_batch(capsys):
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--batch", "99999999999999999999")[::2],
                          "--batch 99999999999999999999: plan 1 to 65,536 sequences")


def test_a_shipped_recipe_is_found_by_name_wherever_klconvert_runs(tmp_path, monkeypatch):
    """A wheel user has no recipes/ folder: `--recipe 48gb` (or the README's recipes/48gb.yaml) is the shipped one,
    a file of that name in the working folder wins, and an unknown name lists the shipped ones."""
    from klconvert.recipes import FOLDER, shipped_names

    assert shipped_names() == sorted(p.stem for p in RECIPES) and FOLDER == RECIPE_DIR.resolve()
    monkeypatch.chdir(tmp_path)
    for given in ("48gb", "48gb.yaml", "recipes/48gb.yaml"):
        assert load_recipe(given).policy == load_recipe(FOLDER / "48gb.yaml").policy, given
    (tmp_path / "48gb").write_text((FOLDER / "32gb.yaml").read_text())
    assert load_recipe("48gb").policy == load_recipe(FOLDER / "32gb.yaml").policy
    with pytest.raises(KLError, match="24gb: no such recipe file; check the --recipe path, or name a shipped recipe: "
                                      + ", ".join(shipped_names())):
        load_recipe("24gb")
    with pytest.raises(KLError, match="no such recipe file"):
        load_recipe("elsewhere/48gb.yaml")


def test_a_folder_of_a_shipped_recipes_name_hides_it_not(tmp_path, monkeypatch, capsys):
    """`quantize SRC 32gb --recipe 32gb`, then `plan --recipe 32gb` beside the output: "32gb: cannot read the recipe
    (not a regular file (a directory))". A folder (or a link to one) is no recipe file: the shipped one is read."""
    from klconvert.recipes import FOLDER

    monkeypatch.chdir(tmp_path)
    (tmp_path / "32gb").mkdir()
    (tmp_path / "recipes" / "48gb.yaml").mkdir(parents=True)
    (tmp_path / "80gb").symlink_to(tmp_path / "32gb")
    for given, shipped in (("32gb", "32gb"), ("recipes/48gb.yaml", "48gb"), ("80gb", "80gb")):
        assert load_recipe(given).policy == load_recipe(FOLDER / f"{shipped}.yaml").policy, given
    code, out, err = run_cli(capsys, "plan", "--preset", "tiny", "--recipe", "32gb")
    assert code == 0 and err == "" and out.startswith("Memory plan for preset tiny with 32gb"), err
    with pytest.raises(KLError, match="not a regular file"):   # named by its whole path, the folder is the user's
        load_recipe(tmp_path / "32gb")


def test_only_a_relative_name_that_is_no_file_finds_a_shipped_recipe(tmp_path, monkeypatch):
    """/recipes/48gb.yaml (a missing mount) and a dangling link are the user's paths, refused as such -- not
    quietly swapped for the shipped recipe."""
    from klconvert.recipes import shipped_recipe

    monkeypatch.chdir(tmp_path)
    for given in ("/recipes/48gb.yaml", "/48gb", "//48gb.yaml", "other/48gb.yaml", "./recipes/x/48gb.yaml"):
        assert shipped_recipe(Path(given)) is None, given
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "48gb.yaml").symlink_to(tmp_path / "nowhere.yaml")
    assert shipped_recipe(Path("recipes/48gb.yaml")) is None
    with pytest.raises(KLError, match="recipes/48gb.yaml: no such recipe file"):
        load_recipe("recipes/48gb.yaml")
    assert shipped_recipe(Path("./48gb")) is not None
