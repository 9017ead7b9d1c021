"""tools/gptq_bundled.py hands llm-compressor klconvert's own scheme layout: the recipe a quantize wrote, with GPTQ
in place of round-to-nearest and nothing else changed (the tool itself runs in llm-compressor's environment); it and
the two tools sharing its calibration (awq_bundled.py, autoround_bundled.py) check their arguments before importing
llm-compressor, which is not installed here."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import autoround_bundled  # noqa: E402
import awq_bundled  # noqa: E402
import gptq_bundled  # noqa: E402
import tool_output  # noqa: E402

from klconvert.models import BUNDLED_DIR, resolve_model  # noqa: E402
from klconvert.quantize import quantize  # noqa: E402


def test_gptq_recipe_keeps_the_groups_and_ignore_list_of_klconvert_recipe(tmp_path):
    out = quantize(resolve_model("tiny"), tmp_path / "q4", bits=4, device="cpu", progress=False).path
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    gptq = yaml.safe_load(gptq_bundled.gptq_recipe(out / "recipe.yaml"))
    modifiers = gptq["quant_stage"]["quant_modifiers"]
    assert list(modifiers) == ["GPTQModifier"]
    assert modifiers["GPTQModifier"] == written["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert "runtime" not in gptq


TOOLS = [gptq_bundled, awq_bundled, autoround_bundled]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q4"
    return quantize(resolve_model("tiny"), out, bits=4, device="cpu", progress=False).path / "recipe.yaml"


def _run(tool, monkeypatch, capsys, *args: str, missing: tuple[str, ...] = ()) -> tuple[int, str, list]:
    """The tool's main with `args`, llm-compressor's calibration replaced by a note of what it was given, and every
    library but those `missing` installed: (exit status, stderr, the calibrations it reached)."""
    reached = []
    monkeypatch.setattr(gptq_bundled, "calibrate", lambda *given: reached.append(given))
    monkeypatch.setattr(awq_bundled, "keep_cached_activations_unpinned", lambda: None, raising=False)
    monkeypatch.setattr(tool_output, "find_spec", lambda name: None if name in missing else object())
    monkeypatch.setattr(sys, "argv", [Path(tool.__file__).name, *map(str, args)])
    try:
        tool.main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err, reached


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t.__name__)
def test_each_mistake_is_one_line_before_the_calibration(tmp_path, recipe, monkeypatch, capsys, tool):
    """None of the three checked its arguments: a missing recipe was a FileNotFoundError traceback, a folder an
    IsADirectoryError, --samples -3 a calibration on no windows, and an existing OUT or a model folder without its
    tokenizer files a failure after the whole calibration."""
    taken = tmp_path / "taken"
    (taken / "keep").mkdir(parents=True)
    untokenized = shutil.copytree(BUNDLED_DIR, tmp_path / "untokenized")
    (untokenized / "tiktoken.model").unlink()
    (tmp_path / "other.yaml").write_text("quant_stage:\n")
    q4 = recipe.parent
    mistakes = {
        (tmp_path / "missing.yaml", tmp_path / "out"): "missing.yaml: cannot read it (No such file or directory)",
        (tmp_path, tmp_path / "out"): "cannot read it (Is a directory)",
        (tmp_path / "other.yaml", tmp_path / "out"): "other.yaml: holds no quant_stage.quant_modifiers.Quantization",
        (recipe, taken): "taken: is not empty (it holds keep)",
        (recipe, untokenized / "out", "--model", untokenized): "out: is inside the source folder",
        (recipe, tmp_path / "out", "--model", untokenized): "untokenized: holds no tiktoken.model",
        (recipe, tmp_path / "out", "--model", q4): "q4: holds compressed-tensors-quantized weights; this tool reads",
        (recipe, tmp_path / "out", "--samples", "4000", "--seq-len", "512"): "--samples 4000 x --seq-len 512: the",
        (recipe, tmp_path / "out", "--samples", "-3"): "--samples: '-3' is not a whole number of at least 1",
        (recipe, tmp_path / "out", "--seq-len", "0"): "--seq-len: '0' is not a whole number of at least 1",
    }
    for args, needle in mistakes.items():
        code, err, reached = _run(tool, monkeypatch, capsys, *args)
        last = err.splitlines()[-1]   # after argparse's usage, for its own refusals
        assert code == 2 and last.startswith(f"{Path(tool.__file__).name}: error: ") and needle in last, (args, err)
        assert err.count("error") == 1 and not reached
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.yaml", "taken", "untokenized"]


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t.__name__)
def test_good_arguments_reach_the_calibration_with_their_windows(tmp_path, recipe, monkeypatch, capsys, tool):
    code, err, reached = _run(tool, monkeypatch, capsys, recipe, tmp_path / "out", "--samples", "3", "--seq-len", "16")
    assert code == 0 and not err, err
    [(model, out, text, windows)] = reached
    assert (model, out) == (BUNDLED_DIR, tmp_path / "out") and "quant_stage" in yaml.safe_load(text)
    assert [len(w) for w in windows] == [16] * 3 and windows[0] != windows[1]


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("missing", ["llmcompressor", "datasets"])
def test_a_library_klconvert_does_not_install_is_named_in_one_line(tmp_path, recipe, monkeypatch, capsys, tool,
                                                                   missing):
    """In klconvert's own environment gptq and autoround ended in a ModuleNotFoundError traceback for 'datasets', awq
    in one for 'llmcompressor', after the arguments' checks."""
    code, err, reached = _run(tool, monkeypatch, capsys, recipe, tmp_path / "out", "--samples", "3", "--seq-len", "16",
                              missing=(missing,))
    assert code == 2 and err.count("\n") == 1 and not reached, err
    assert err.startswith(f"{Path(tool.__file__).name}: error: needs the module {missing!r}, which klconvert does not "
                          "install; run this tool in an environment of llm-compressor's own: python -m venv")
    assert not any(tmp_path.iterdir())
