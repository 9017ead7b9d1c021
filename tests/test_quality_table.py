"""tools/quality_table.py counts a folder quantized elsewhere the way `klconvert quantize` counts its own: stored
bytes over the source's parameters, so a row of --folder and a row it quantizes compare; and the README's table
gives each row's bits per weight as quantize plans them."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import quality_table  # noqa: E402

from klconvert.config import KimiLinearConfig  # noqa: E402
from klconvert.models import BUNDLED_DIR  # noqa: E402
from klconvert.models import resolve_model  # noqa: E402
from klconvert.quantize import quantize  # noqa: E402
from klconvert.quantize_options import choose_policy  # noqa: E402


@pytest.mark.parametrize("bits", [4, 8])
def test_folder_bits_per_weight_equal_what_quantize_reports(tmp_path, bits):
    source = resolve_model("tiny")
    result = quantize(source, tmp_path / "q", bits=bits, device="cpu", progress=False)
    written, _ = quality_table.stored(result.path)
    _, params = quality_table.stored(source)
    assert (written, params) == (result.totals.bytes_out, result.totals.params)
    assert quality_table.planned_bits_per_weight(source, {"bits": bits}) == result.totals.bits_per_weight


def test_the_recipe_every_row_varies_is_the_default_policy(tmp_path):
    """recipe() with no arguments, which the studies change one thing of, is the default policy (quant/defaults.py):
    the projections it keeps, its bits, group size and lm_head bits were literals of the tool's own."""
    def layout(policy):
        return ([(tuple(e.pattern for e in g.targets), g.scheme) for g in policy.groups],
                sorted(e.pattern for e in policy.ignore))

    (tmp_path / "recipe.yaml").write_text(quality_table.recipe())
    assert layout(choose_policy(recipe=tmp_path / "recipe.yaml")[0]) == layout(choose_policy()[0])


def readme_bits() -> list[tuple[str, str, str]]:
    """(section, variant, bits/weight) of each row of the README's quality table."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    head = readme.index("| variant | bits/weight (all) | perplexity |")
    rows, section = [], None
    for line in readme[head:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0].startswith("**"):
            section = cells[0].strip("*")
        else:
            rows.append((section, cells[0], cells[1]))
    return rows


def test_the_readmes_bits_per_weight_are_what_quantize_plans(tmp_path):
    """Each row the tool measures gives its variant's bits per weight; a row of another section (calibrated,
    distilled, rotated) that starts with a schemes' or recipes' variant ('int4 g128 sym (default policy), GPTQ',
    'recipes/32gb.yaml, distilled ...') gives that variant's: calibration, distillation and rotation change values,
    never the layout."""
    pytest.importorskip("bitsandbytes")    # the nf4 row
    source = resolve_model("tiny")
    variants = quality_table.variants(KimiLinearConfig.from_file(source / "config.json"))
    planned = {}
    for i, (section, label, options) in enumerate(variants):
        options = quality_table.quantize_options(options, tmp_path / f"recipe{i}.yaml")
        planned[section, label] = f"{quality_table.planned_bits_per_weight(source, options):.2f}"
    stated = readme_bits()
    assert {(section, label): bits for section, label, bits in stated if (section, label) in planned} == planned
    layouts = {label.replace("(default)", "(default policy)"): bits for (section, label), bits in planned.items()
               if section in ("schemes", "recipes")}
    others = [(label, bits) for section, label, bits in stated if (section, label) not in planned]
    named = [(label, bits, layouts[match[0]]) for label, bits in others
             if (match := re.match(f"(?:{'|'.join(map(re.escape, sorted(layouts, key=len, reverse=True)))})(?=[,:]|$)",
                                   label))]
    assert [row for row in named if row[1] != row[2]] == [] and len(named) >= 30, named


def test_a_model_or_folder_it_cannot_score_is_one_line_before_the_reference_run(tmp_path, monkeypatch, capsys):
    """A quantized --model was refused by the first row's quantize, and a --folder of another vocabulary by its
    run ("token id 3814 is outside the vocabulary", naming no folder) -- each after the bf16 reference's run. A bf16
    --folder was scored as a quantization at 16 bits a weight, and one with no config.json was told to "point
    --model" at a checkpoint (h248)."""
    q4 = quantize(BUNDLED_DIR, tmp_path / "q4", bits=4, device="cpu", progress=False).path
    other = shutil.copytree(q4, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 8192}))
    shards_alone = tmp_path / "shards"
    shards_alone.mkdir()
    shutil.copyfile(next(q4.glob("*.safetensors")), shards_alone / "model.safetensors")
    monkeypatch.setattr(quality_table, "measure", lambda *args: pytest.fail("measured"))
    for args, line in ((["--model", str(q4)], f"{q4}: holds compressed-tensors-quantized weights; this tool reads"),
                       (["--folder", f"mine={other}"], f"--folder mine={other}: a model of 8,192 token ids, --model's "
                                                       "has 4,352; its rows are scored on --model's tokens"),
                       (["--folder", f"bf16={BUNDLED_DIR}"], f"--folder bf16={BUNDLED_DIR}: holds unquantized weights "
                                                             "(its config.json has no quantization_config); --folder "
                                                             "takes a folder quantized elsewhere"),
                       (["--folder", f"bare={shards_alone}"], f"{shards_alone / 'config.json'}: no config.json here; "
                                                              "point --folder at a Kimi Linear checkpoint folder")):
        monkeypatch.setattr(sys, "argv", ["quality_table.py", *args])
        with pytest.raises(SystemExit) as exit:
            quality_table.main()
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith(f"quality_table.py: error: {line}"), err
