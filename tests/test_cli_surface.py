"""The command line's surface: every flag described, --device one type everywhere, every user error (usage errors
included) one line with exit status 2, plan's exit status 3, --prompt, and a torch-free `--help`."""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest

from bounded_cli import klconvert_bounded
from klconvert.cli import ALLOCATOR_ENV, DEVICE, LAYERS, SEED, PlainDigits, cli
from klconvert import whole_folder
from klconvert.checkpoint.folder_files import MAX_FILE_NAME_BYTES
from klconvert.models import bundled_dir
from klconvert.errors import KLError
from klconvert.convert.output_folder import MAX_PID, RESUME_RECORD, lock_path, mark_temporary, temporary_prefix
from testkit import assert_one_line_error, run_cli, run_klconvert_on_a_terminal


def test_klconvert_alone_prints_the_help(capsys):
    """It printed the whole help folded into one 786-byte error line (click's NoArgsIsHelpError is a UsageError)."""
    status, out, err = run_cli(capsys)
    help_text = cli.get_help(click.Context(cli, info_name="klconvert"))
    assert (status, out, err) == (2, "", help_text + "\n") and "\nCommands:\n" in err


def test_help_describes_every_flag():
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help and param.help.strip(), f"klconvert {name} {param.opts[0]} has no help"


@pytest.mark.parametrize("command", ["", "run"])
def test_help_describes_every_command_under_python_oo_too(command):
    """click took the group's and each command's text from its docstring, which python -OO (PYTHONOPTIMIZE=2) drops:
    `klconvert --help` listed the commands bare, `run --help` had no description (helper-135)."""
    def shown(*python_flags: str) -> str:
        environ = {name: value for name, value in os.environ.items() if name != "PYTHONOPTIMIZE"}
        done = subprocess.run([sys.executable, *python_flags, "-m", "klconvert", *command.split(), "--help"],
                              capture_output=True, text=True, env=environ, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    text = shown()
    assert shown("-OO") == text
    described = cli.commands[command] if command else cli
    assert described.help and described.help.split("\n")[0] in " ".join(text.split())
    if not command:
        for name, listed in cli.commands.items():   # each command's one-line summary beside its name
            assert re.search(rf"^  {name} +{re.escape(' '.join(listed.help.split()[:3]))}", text, re.M), name


def test_version_prints_the_packages_version():
    """README: `klconvert --version` prints the version -- the installed package's, which is pyproject's."""
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert version("klconvert") == declared
    done = subprocess.run([sys.executable, "-m", "klconvert", "--version"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"klconvert, version {declared}\n", "")


@pytest.mark.parametrize("flag, uses", [("mla_cache_dtype", 2), ("kda_state_dtype", 1), ("dtype", 2)])
def test_dtype_choices_are_the_runtimes(flag, uses):
    from klconvert.runtime.engine import COMPUTE_DTYPES
    from klconvert.runtime.plan_report import KDA_STATE_DTYPES
    from klconvert.runtime.state import MLA_CACHE_DTYPES
    names = list({"mla_cache_dtype": MLA_CACHE_DTYPES, "kda_state_dtype": KDA_STATE_DTYPES,
                  "dtype": COMPUTE_DTYPES}[flag])
    flags = [param for command in cli.commands.values() for param in command.params if param.name == flag]
    assert len(flags) == uses and all(list(p.type.choices) == names for p in flags)


def test_choices_are_the_codes_tables():
    """The torch-free CLI cannot import these tables for its choices (they sit beside torch code): held to them here."""
    from klconvert.quant.group_rules import OBSERVERS, SUPPORTED_BITS
    from klconvert.quant.scheme import KINDS
    from klconvert.runtime.sampling import SEEDS
    from klconvert.runtime.weights import KERNEL_MODES
    from klconvert.synth.checkpoint import LAYOUTS

    choices = {(name, p.name): list(p.type.choices) for name, command in cli.commands.items()
               for p in command.params if isinstance(p.type, click.Choice)}
    assert choices[("run", "kernels")] == list(KERNEL_MODES)
    assert choices[("quantize", "observer")] == choices[("pull-and-quantize", "observer")] == list(OBSERVERS)
    assert choices[("quantize", "scheme")] == choices[("pull-and-quantize", "scheme")] == list(KINDS)
    assert choices[("synth", "layout")] == list(LAYOUTS)
    assert choices[("bench", "bits")] == [str(bits) for bits in SUPPORTED_BITS]
    assert choices[("plan", "bits")] == [str(bits) for bits in SUPPORTED_BITS] + ["16"]   # 16: nothing quantized
    assert (SEED.min, SEED.max) == (0, SEEDS - 1)


def test_device_is_one_type_in_every_command():
    """Each --device reads its name as klconvert.devices does (cpu, cuda or cuda:N; tests/test_devices.py)."""
    types = [param.type for command in cli.commands.values() for param in command.params if param.name == "device"]
    assert len(types) == 4 and all(t is DEVICE for t in types)


@pytest.mark.parametrize("command", ["synth", "plan", "bench"])
def test_layers_is_one_type_in_every_command(capsys, command):
    """Each --layers is LAYERS, its least shown in --help as bench's was ([x>=1]; synth's and plan's showed none) and
    0 refused by click before any work."""
    types = [param.type for each in cli.commands.values() for param in each.params if param.name == "layers"]
    assert len(types) == 3 and all(t is LAYERS for t in types)
    status, out, _ = run_cli(capsys, command, "--help")
    assert status == 0 and re.search(r"--layers INTEGER RANGE(?:[^\n]|\n {20,})*?\[x>=1\]", out), out
    assert_one_line_error(*run_cli(capsys, command, "--preset", "kimi-linear-48b", "--layers", "0")[::2],
                          "Invalid value for '--layers': 0 is not in the range x>=1")


@pytest.mark.parametrize("command", ["synth", "plan"])
def test_layers_past_the_preset_are_told_what_to_give(capsys, command, tmp_path):
    """`synth --preset tiny --layers 9` said "preset tiny has only 8 layers" and no more (h319): the line now says
    what --layers takes for that preset."""
    out = ["--out", tmp_path / "out"] if command == "synth" else []
    assert_one_line_error(*run_cli(capsys, command, "--preset", "tiny", "--layers", "9", *out)[::2],
                          "--layers 9: preset tiny has only 8 layers; give --layers 1 to 8, or leave it out for all "
                          "of them")
    assert not (tmp_path / "out").exists()


def test_bench_help_takes_any_checkpoint_folder_as_the_readme_does():
    """bench times a folder as it is stored, bf16 too (tiny is), as its README section says; its --model help said
    'A quantized checkpoint folder to time'."""
    option = next(param for param in cli.commands["bench"].params if param.name == "model")
    assert option.help.startswith("A checkpoint folder to time, or tiny")
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "(a folder is timed as it is stored)" in readme[readme.index("### `klconvert bench`"):]


@pytest.mark.parametrize("args, needles", [
    (["run", "--bogus"], ["klconvert run: No such option '--bogus'", "see `klconvert run --help`"]),
    (["quantize", "only-src"], ["Missing argument 'OUT'"]),
    (["frobnicate"], ["No such command 'frobnicate'"]),
    (["run", "--prompt", "x", "--temperature", "nan"], ["'--temperature'", "'nan' is not a finite number"]),
    (["run", "--prompt", "x", "--temperature", "inf"], ["'--temperature'", "'inf' is not a finite number"]),
    (["run", "--prompt", "x", "--top-p", "nan"], ["'--top-p'", "not a finite number"]),
    (["run", "--prompt", "x", "--seed", "99999999999999999999999"], ["'--seed'", "not in the range"]),
    (["synth", "--preset", "tiny", "--out", "x", "--seed", "99999999999999999999999"], ["'--seed'"]),
    (["run", "--prompt", "x", "--device", "tpu"], ["Invalid value for '--device': 'tpu' is not supported; use cpu, "
                                                   "cuda or cuda:N"]),
    (["eval", "--model", "a", "--reference", "b", "--text-file", "c", "--device", "tpu"],
     ["Invalid value for '--device': 'tpu'"]),
    (["quantize", "a", "b", "--device", "tpu"], ["Invalid value for '--device': 'tpu'"]),
    (["pull-and-quantize", "--device", "tpu"], ["Invalid value for '--device': 'tpu'"]),
    (["pull", "../../etc/passwd"], ["'../../etc/passwd' is not a hub repo id"]),
    (["pull-and-quantize", "--model", "./typo-dir"], ["--model ./typo-dir: no such folder"]),
    (["plan", "--preset", "tiny", "--gpu-memory", "9" * 400 + "GB"], ["--gpu-memory", "give a size like"]),
    (["plan", "--preset", "tiny", "--gpu-memory", ""], ["--gpu-memory ''", "give a size like"]),  # not: no limit
    (["run", "--model", "tiny", "--prompt-file", "-", "--prompt-file", "-"],
     ["--prompt-file - is given 2 times, but standard input can be read once"]),
    (["run", "--model", "tiny", "--prompt", "ROMEO.", "--prompt", "JULIET."],     # click kept the last, unsaid
     ["'--prompt': given 2 times; give it once (several --prompt-file FILE make a batch)"]),
    (["run", "--model", "tiny", "--prompt-file", "esc\x1b[31mred.txt"],   # it heads the file's text on stdout
     ["'--prompt-file'", "holds a control character"]),
    (["pull", "acme/model", "--local-dir", "a", "--cache-dir", "b"],
     ["give at most one of --local-dir and --cache-dir"]),
    # int() reads these; no one types them for a number (`--max-tokens 1_6` evaluated 16 tokens)
    (["eval", "--model", "a", "--reference", "b", "--text-file", "c", "--max-tokens", "1_6"],
     ["Invalid value for '--max-tokens': '1_6' is not a whole number in the digits 0-9; write it as 16"]),
    (["eval", "--model", "a", "--reference", "b", "--text-file", "c", "--max-tokens", "\u0661\u0666"],   # Arabic-Indic
     ["Invalid value for '--max-tokens': '\u0661\u0666' is not a whole number in the digits 0-9; write it as 16"]),
    (["eval", "--model", "a", "--reference", "b", "--text-file", "c", "--max-tokens", "16k"],
     ["Invalid value for '--max-tokens': '16k' is not a whole number in the digits 0-9; give one, e.g. 16"]),
    (["quantize", "a", "b", "--bits", "+4"], ["Invalid value for '--bits': '+4' is not a whole number"]),
    (["plan", "--preset", "tiny", "--group-size", " 64"],
     ["Invalid value for '--group-size': ' 64' is not a whole number in the digits 0-9; write it as 64"]),
    (["bench", "--preset", "kimi-linear-48b", "--context", "4_096"],
     ["Invalid value for '--context': '4_096': give comma-separated whole numbers in the digits 0-9"]),
    (["bench", "--preset", "kimi-linear-48b", "--batch", "1,\uff11\uff16"], ["'--batch'", "in the digits 0-9"]),
])
def test_user_errors_are_one_line(capsys, args, needles):
    assert_one_line_error(*run_cli(capsys, *args)[::2], *needles)


@pytest.mark.parametrize("args, line", [
    (["quantize", "tiny", "out", "--bits"],
     "klconvert quantize: Option '--bits' requires an argument. (see `klconvert quantize --help`)"),
    (["run", "--prompt"], "klconvert run: Option '--prompt' requires an argument. (see `klconvert run --help`)"),
    (["--bogus"], "No such option '--bogus'. (see `klconvert --help`)"),
    (["--version=3"], "Option '--version' does not take a value. (see `klconvert --help`)"),
])
def test_a_usage_error_names_its_command_once(capsys, args, line):
    """An option given no value read "klconvert: error: klconvert: Option '--bits' requires an argument. (see
    `klconvert --help`)": click's parser raised it without the subcommand's context. The group's own errors said
    "klconvert:" twice too."""
    assert assert_one_line_error(*run_cli(capsys, *args)[::2]) == f"klconvert: error: {line}"


def test_usage_errors_are_one_line_from_the_installed_command():
    proc = subprocess.run([sys.executable, "-m", "klconvert", "run", "--max-new-tokens", "-3"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("klconvert: error: klconvert run: Invalid value for '--max-new-tokens'")


@pytest.mark.parametrize("args, named, times", [
    (["eval", "--model", "q4", "--model", "tiny", "--reference", "tiny", "--text-file", "t"], "'--model'", 2),
    (["quantize", "tiny", "OUT", "--bits", "4", "--bits=8"], "'--bits'", 2),   # 8-bit was written
    (["quantize", "tiny", "OUT", "--sym", "--asym"], "'--sym' / '--asym'", 2),   # asymmetric was written
    (["pull-and-quantize", "--model", "tiny", "--out", "OUT", "--asym", "--asym"], "'--sym' / '--asym'", 2),
    (["run", "--prompt", "x", "--max-new-tokens", "1", "--max-new-tokens", "2", "--max-new-tokens=3"],
     "'--max-new-tokens'", 3),
    (["bench", "--model", "tiny", "--check", "--no-check"], "'--check' / '--no-check'", 2),
])
def test_an_option_given_twice_is_refused_not_its_last_value_taken(capsys, tmp_path, monkeypatch, args, named, times):
    """click kept a repeated option's last value unsaid: `eval --model q4 --model tiny` measured tiny against tiny.
    Refused before anything runs (nothing written), in the words of --prompt's refusal."""
    monkeypatch.chdir(tmp_path)
    command = f"klconvert {args[0]}"
    assert_one_line_error(*run_cli(capsys, *args)[::2], f"{command}: Invalid value for {named}: given {times} times; "
                                                         f"give it once (see `{command} --help`)")
    assert list(tmp_path.iterdir()) == []


def test_only_options_are_counted_as_given(capsys, tmp_path, monkeypatch):
    """An option's value that reads as a flag is its value, as click takes it (the prompt `--model`); nothing past a
    bare -- is an option; the repeatable options repeat."""
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run_cli(capsys, "run", "--prompt", "--model", "--model", "tiny", "--top-p", "0.5")[::2],
                          "--top-p given with the default --temperature 0")
    assert_one_line_error(*run_cli(capsys, "run", "--prompt", "x", "--top-p", "0.5", "--", "--top-p")[::2],
                          "Got unexpected extra argument (--top-p)")
    assert_one_line_error(*run_cli(capsys, "pull", "acme/model", "--include", "*.json", "--include", "*.txt",
                                   "--exclude", "a", "--exclude", "b", "--local-dir", "a", "--cache-dir", "b")[::2],
                          "give at most one of --local-dir and --cache-dir")
    (tmp_path / "a.txt").write_text("ROMEO.")
    (tmp_path / "b.txt").write_text("JULIET.")
    assert_one_line_error(*run_cli(capsys, "run", "--prompt-file", "a.txt", "--prompt-file", "b.txt", "--seed",
                                   "1")[::2], "--seed given with the default --temperature 0")
    assert run_cli(capsys, "run", "--help", "-h")[0] == 0


def test_every_integer_option_reads_plain_digits():
    """Each whole-number option reads the digits 0-9 and a leading - (--group-size -1; a range refuses others), not
    what int() also reads; a value of a leading 0 is that number."""
    types = {(name, param.name): param.type for name, command in cli.commands.items() for param in command.params
             if isinstance(param.type, click.types.IntParamType)}
    assert len(types) == 18 and all(isinstance(t, PlainDigits) for t in types.values()), types
    group_size = types[("quantize", "group_size")]
    assert [group_size.convert(text, None, None) for text in ("64", "064", "-1", 128)] == [64, 64, -1, 128]
    for text in ("+4", "1_6", "\u0661\u0666", "\uff11\uff16", " 16", "16 ", "", "-", "0x10", "1e3"):
        with pytest.raises(click.BadParameter, match="is not a whole number in the digits 0-9"):
            group_size.convert(text, None, None)
    with pytest.raises(click.BadParameter, match="not in the range"):
        types[("eval", "max_tokens")].convert("-2", None, None)


@pytest.mark.parametrize("args, words", [
    (["plan", "--preset", "tiny", "--group-size", "9" * 5000], "9... (5,000 digits) is longer than any number this "
     "option takes; give a smaller one"),   # click's own "is not a valid integer" echoed all of it
    (["plan", "--preset", "tiny", "--max-context", "9" * 4000], "(4,000 digits) is longer than any number"),
    (["plan", "--preset", "tiny", "--group-size", " " + "9" * 4000], "(4,000 digits) is longer than any number"),
    (["bench", "--preset", "kimi-linear-48b", "--context", "4096," + "9" * 300], "9...: a number of 300 digits "
     "is longer than any this option takes; give smaller ones"),
])
def test_a_number_of_thousands_of_digits_is_not_echoed_whole(capsys, args, words):
    """h188: a 5,000-digit --group-size printed one 5,133-character line, a 4,000-digit --max-context was echoed whole
    by the refusal after it, and ' ' + 4,000 digits was told to 'write it as' all of them."""
    line = assert_one_line_error(*run_cli(capsys, *args)[::2], words)
    assert len(line) < 300, len(line)


def test_every_decimal_option_reads_plain_digits():
    """--temperature and --top-p read decimal numbers in the digits 0-9, not what float() also reads."""
    types = {(name, param.name): param.type for name, command in cli.commands.items() for param in command.params
             if isinstance(param.type, click.types.FloatParamType)}
    assert set(types) == {("run", "temperature"), ("run", "top_p")}, types
    temperature = types[("run", "temperature")]
    assert [temperature.convert(text, None, None) for text in ("0.7", "1", "1.", ".5", "7e-1", "0")] == \
        [0.7, 1.0, 1.0, 0.5, 0.7, 0.0]
    for text in ("1_0", "+1", "\u0660.\u0665", "\uff11", " 1", "1 "):
        with pytest.raises(click.BadParameter, match="is not a number in the digits 0-9"):
            temperature.convert(text, None, None)
    with pytest.raises(click.BadParameter, match="is not a finite number"):
        temperature.convert("inf", None, None)


def test_triton_kernels_need_cuda(capsys, tiny_released, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' CPU interpreter is not a user's GPU
    line = assert_one_line_error(*run_cli(capsys, "run", "--model", tiny_released, "--prompt", "x", "--device", "cpu",
                                          "--kernels", "triton")[::2])
    assert "kernels='triton' (--kernels) needs a CUDA GPU" in line and "use kernels='torch' (--kernels torch)" in line


@pytest.mark.slow
def test_a_recipe_nested_too_deeply(capsys, tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("quant_stage: " + "[" * 5000 + "]" * 5000 + "\n")
    for args in (["plan", "--preset", "tiny", "--recipe", deep],
                 ["quantize", "tiny", tmp_path / "b", "--recipe", deep]):
        assert_one_line_error(*run_cli(capsys, *args)[::2], "deep.yaml: nested too deeply to be a recipe")


def test_a_recipe_that_is_not_one_is_refused_unread(capsys, tmp_path):
    """/dev/zero is refused unopened (not a regular file), a huge file after a bounded read; NaN and Inf are not
    sizes."""
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--recipe", "/dev/zero")[::2],
                          "/dev/zero: cannot read the recipe (not a regular file (a device)); check the --recipe path")
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--recipe", tmp_path)[::2],
                          f"{tmp_path}: cannot read the recipe (not a regular file (a directory)); check the --recipe")
    (tmp_path / "latin1.yaml").write_bytes("caf\xe9".encode("latin-1"))
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--recipe", tmp_path / "latin1.yaml")[::2],
                          "latin1.yaml: not UTF-8 text (bad byte at offset 3), so no recipe; check the --recipe path")
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(4 << 30)   # sparse: read whole, 4 GB
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--recipe", huge)[::2],
                          "huge.yaml: over 1024 KiB, far larger than a recipe")
    base = (Path(__file__).parents[1] / "recipes" / "48gb.yaml").read_text()
    for value in (".nan", ".inf", "-.inf"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(re.sub(r"gpu_memory:.*", f"gpu_memory: {value}", base))
        assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--recipe", recipe)[::2],
                              "runtime.gpu_memory should be a positive number of bytes")


def test_prompt_text_or_file(capsys, tiny_released):
    both = run_cli(capsys, "run", "--model", tiny_released, "--prompt", "x", "--prompt-file", "-")
    assert_one_line_error(*both[::2], "--prompt TEXT or --prompt-file FILE")
    assert_one_line_error(*run_cli(capsys, "run", "--model", tiny_released)[::2], "--prompt TEXT or --prompt-file")
    assert_one_line_error(*run_cli(capsys, "run", "--model", tiny_released, "--prompt", "")[::2],
                          "--prompt: the prompt is empty; write some text into it")
    from klconvert.tokenizer import Tokenizer

    for prompt in ("Once upon a time", "\n"):   # whitespace alone starts the model unconditionally, as the API does
        code, out, err = run_cli(capsys, "run", "--model", tiny_released, "--prompt", prompt,
                                 "--max-new-tokens", "3", "--device", "cpu")
        tokens = len(Tokenizer.from_folder(tiny_released).encode(prompt))
        noun = "token" if tokens == 1 else "tokens"   # "\n" is one token
        assert code == 0 and err.startswith(f"prompt {tokens} {noun} | "), err


def test_a_presets_plan_is_titled_as_the_preset_not_as_the_bundled_model(capsys):
    """`plan --preset tiny` (random weights, presets.TINY) and `plan --model tiny` (the bundled trained model) are two
    models of different sizes: both were "Memory plan for tiny"."""
    code, out, err = run_cli(capsys, "plan", "--preset", "tiny")
    assert code == 0 and out.startswith("Memory plan for preset tiny: "), err
    code, out, err = run_cli(capsys, "plan", "--model", "tiny", "--recipe", "48gb")
    assert code == 0 and out.startswith("Memory plan for tiny with 48gb: "), err
    code, out, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--layers", "4")   # 12 GiB, not 92 (h177)
    assert code == 0 and out.startswith("Memory plan for preset kimi-linear-48b, 4 layers: "), err


def test_plan_exits_3_when_it_does_not_fit(capsys):
    code, out, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--bits", "4", "--gpu-memory", "24GiB")
    assert code == 3 and "does NOT fit" in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("klconvert: error: the plan needs"), err
    code, out, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--bits", "4", "--gpu-memory", "80GiB")
    assert code == 0 and "does NOT fit" not in out, err


@pytest.mark.parametrize("args, advice", [
    (["--gpu-memory", "30GiB", "--max-context", "1048576"], "plan for a context of"),
    (["--gpu-memory", "16GiB"], "the weights alone do not fit, even at 4 bits with groups of 128: plan for a larger "
                                "GPU"),   # it said "plan with --bits 4"
    (["--gpu-memory", "40GiB", "--group-size", "64"], "the weights alone do not fit: plan with fewer bits (--bits 4 "
                                                      "with groups of 128"),
    (["--gpu-memory", "80GiB", "--batch", "2000"], "a batch of 2,000 sequences' state and workspace do not at any "
                                                   "context: plan a smaller --batch"),
])
def test_a_plan_that_does_not_fit_says_what_to_change(capsys, args, advice):
    code, _, err = run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--bits", "4", *args)
    assert code == 3 and advice in err, err


@pytest.mark.parametrize("args, given", [(["--group-size", "64"], "--group-size"), (["--bits", "4"], "--bits"),
                                         (["--bits", "4", "--group-size", "64"], "--bits and --group-size")])
def test_a_plan_refuses_a_recipe_with_bits_or_group_size_as_one(capsys, args, given):
    """`plan --recipe 48gb --group-size 64` was told "add --bits 4 or 8, or drop --group-size", and adding --bits was
    then refused as a recipe given with --bits (h319): each is refused as given beside the recipe."""
    code, _, err = run_cli(capsys, "plan", "--preset", "tiny", "--recipe", "48gb", *args)
    assert code == 2 and err == f"klconvert: error: give a recipe or {given}, not both: the recipe already says how " \
                                "each tensor is stored\n", err


@pytest.mark.parametrize("opset", ["17", "99"])
def test_an_opset_refusal_gives_the_reason_of_its_own_side(capsys, tmp_path, opset):
    """`export-onnx --opset 17` was told "choose 18 to 27 (opset 28 needs IR version 14, which onnxruntime 1.30 ...
    cannot load)", the reason no newer opset is taken, not why 17 is not (h319): an opset under the oldest names
    the ops that need it; one past the newest keeps the newest's reason."""
    pytest.importorskip("onnx")
    from klconvert.onnx.export import MIN_OPSET, MIN_OPSET_OPS, newest_opset

    newest, why = newest_opset()
    code, _, err = run_cli(capsys, "export-onnx", "--model", "tiny", "--out", tmp_path / "onnx", "--opset", opset)
    expected = f"(the graph's {MIN_OPSET_OPS} need opset {MIN_OPSET})" if int(opset) < MIN_OPSET else f"({why})"
    assert code == 2 and err == f"klconvert: error: --opset {opset}: choose {MIN_OPSET} to {newest} {expected}\n", err
    assert not (tmp_path / "onnx").exists()


def test_a_numpy_or_torch_opset_is_taken_as_the_whole_number_it_is(tmp_path):
    """export_onnx(opset=numpy.int64(18)) was refused "--opset np.int64(18): choose 18 to 27 (a whole number)",
    the value in range said to be none: the opset is read as the API's other numbers are (as_number), numpy's and
    0-d torch integers taken, a float or bool refused. Its refusal comes first: past it, OUT's (a folder of another's
    files) is what a taken opset meets."""
    pytest.importorskip("onnx")
    import numpy as np
    import torch

    from klconvert.onnx.export import MIN_OPSET, export_onnx

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    for opset in (np.int64(MIN_OPSET), torch.tensor(MIN_OPSET)):
        with pytest.raises(KLError) as refused:
            export_onnx("tiny", taken, opset=opset)
        assert "--opset" not in str(refused.value) and "notes.txt" in str(refused.value), refused.value
    for opset in (float(MIN_OPSET), True):
        with pytest.raises(KLError, match=r"\(a whole number\)"):
            export_onnx("tiny", taken, opset=opset)


def test_a_plan_of_one_sequence_past_the_gpu_asks_for_no_smaller_batch(capsys):
    """Where the weights fit and one sequence's state and workspace do not, the advice was "a batch of 1 sequences'
    state and workspace do not at any context: plan a smaller --batch", a batch no plan has."""
    code, _, err = run_cli(capsys, "plan", "--model", "tiny", "--gpu-memory", "23MiB")
    assert code == 3 and err.rstrip("\n").endswith(
        "the weights (22.5 MiB) fit, but one sequence's state and workspace do not at any context: plan for a larger "
        "GPU"), err


def test_a_small_plans_refusal_gives_its_figures_in_units_that_show_them(capsys):
    """The bundled model's plan on a 20 MiB GPU read "the plan needs 0.29 GiB but the GPU memory is 0.02 GiB" (0.00
    for 2 MiB): the table above it gives MiB."""
    code, out, err = run_cli(capsys, "plan", "--model", "tiny", "--gpu-memory", "20MiB")
    total = next(line.split()[-2:] for line in out.splitlines() if line.startswith("total"))
    assert code == 3 and f"the plan needs {' '.join(total)} but the GPU memory is 20.0 MiB;" in err, err


def test_a_plan_a_byte_past_the_gpu_says_both_figures_in_bytes(capsys):
    """A plan a byte past --gpu-memory read "the plan needs 75.9 MiB but the GPU memory is 75.9 MiB" (h266), as
    fitting: two figures that would read alike are said in bytes (size_texts), as the runtime's refusals say them."""
    from klconvert.runtime.plan_report import plan_for

    total = plan_for(model=bundled_dir(), context=4096).total
    code, _, err = run_cli(capsys, "plan", "--model", "tiny", "--max-context", "4096", "--gpu-memory", f"{total - 1}B")
    assert code == 3 and f"the plan needs {total:,} bytes but the GPU memory is {total - 1:,} bytes;" in err, err


def test_running_out_of_host_memory_is_one_line(capsys, monkeypatch):
    def exhausted(**_):
        raise MemoryError
    monkeypatch.setattr("klconvert.runtime.plan_report.plan_for", exhausted)
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny")[::2], "out of host memory")


def _a_library_whose_import_raises(tmp_path, monkeypatch, text: str, error: str = "RuntimeError") -> None:
    """onnxruntime, shadowed by a module whose import raises error(text), as torch's raised std::bad_alloc under
    `ulimit -v 700000` (torch/library.py, 39 lines of traceback, exit status 1)."""
    (tmp_path / "onnxruntime.py").write_text(f"raise {error}({text!r})\n")
    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.delitem(sys.modules, "klconvert.onnx.session", raising=False)
    monkeypatch.syspath_prepend(tmp_path)


def test_an_import_out_of_memory_is_one_line(capsys, tmp_path, monkeypatch):
    _a_library_whose_import_raises(tmp_path, monkeypatch, "std::bad_alloc")
    code, _, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "hi", "--engine", "onnxruntime")
    assert_one_line_error(code, err, "out of host memory (or the process's memory limit) importing onnxruntime: "
                                     "std::bad_alloc")


def test_a_shared_library_the_loader_cannot_map_is_out_of_memory_in_one_line(capsys, tmp_path, monkeypatch):
    """Under ulimit -v 350000, torch's import failed to map libtorch_cpu.so: an ImportError, a traceback, exit 1
    (helper-131); through `require`, it would have advised reinstalling the package."""
    text = "libtorch_cpu.so: failed to map segment from shared object"
    _a_library_whose_import_raises(tmp_path, monkeypatch, text, "ImportError")
    code, _, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "hi", "--engine", "onnxruntime")
    line = assert_one_line_error(code, err, f"out of host memory (or the process's memory limit) importing "
                                            f"onnxruntime: {text}")
    assert "reinstall" not in line, line


def test_other_runtime_errors_are_not_called_out_of_memory(capsys, tmp_path, monkeypatch):
    """Only std::bad_alloc, and only out of an import: a library's other error, or a bad_alloc elsewhere, is left as
    it is (a bug to report, not the host's memory)."""
    _a_library_whose_import_raises(tmp_path, monkeypatch, "something else broke")
    with pytest.raises(RuntimeError, match="something else broke"):
        run_cli(capsys, "run", "--model", "tiny", "--prompt", "hi", "--engine", "onnxruntime")

    def bad_alloc(*_, **__):
        raise RuntimeError("std::bad_alloc")
    monkeypatch.setattr("klconvert.runtime.engine.load", bad_alloc)
    with pytest.raises(RuntimeError, match="std::bad_alloc"):
        run_cli(capsys, "run", "--model", "tiny", "--prompt", "hi", "--device", "cpu")


@pytest.mark.parametrize("value, size", [("0", "0 B"), ("0GB", "0 B"), ("1B", "1 B"), ("512KiB", "524,288 B")])
def test_a_gpu_of_no_memory_is_refused(capsys, value, size):
    """`--gpu-memory 1B` and `512KiB` were planned (a plan that fits nothing, exit status 3); a recipe refused them."""
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--gpu-memory", value)[::2],
                          f"--gpu-memory '{value}' is {size}, no GPU's memory; give it, e.g. 80GiB, 24GB or 141G")


@pytest.mark.parametrize("value, bytes_", [("80", "80"), ("24.5", "24"), (" 141 ", "141")])
def test_a_gpu_memory_without_a_unit_that_reads_as_a_few_bytes_is_refused(capsys, value, bytes_):
    """`--gpu-memory 80` was 80 bytes: "the GPU memory is 0.00 GiB ... plan for a larger GPU", exit status 3."""
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--gpu-memory", value)[::2],
                          f"--gpu-memory {value.strip()}: a size with no unit is bytes, and {bytes_} B is no GPU's "
                          f"memory; did you mean {value.strip()}GB or {value.strip()}GiB? give the unit")
    code, _, err = run_cli(capsys, "plan", "--preset", "tiny", "--gpu-memory", str(80 * 2**30))   # bytes, as ever
    assert code == 0, err


def test_a_size_in_other_digits_is_refused(capsys, tmp_path):
    """float() reads other scripts' digits, and the size's pattern took them: `--gpu-memory ８０GiB` planned 80 GiB,
    `--max-shard-size ٥GB` wrote shards of 5 GB."""
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--gpu-memory", "\uff18\uff10GiB")[::2],
                          "--gpu-memory '\uff18\uff10GiB': give a size like 80GiB, 24GB or 141G")
    assert_one_line_error(*run_cli(capsys, "quantize", "tiny", tmp_path / "q", "--max-shard-size", "\u0665GB")[::2],
                          "--max-shard-size '\u0665GB': give a size like 5GB or 500MB")   # a shard's sizes
    assert not (tmp_path / "q").exists()


_TAKEN_UNITS = "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, K, M, G, T, or none for bytes)"


@pytest.mark.parametrize("args, line", [
    (["plan", "--preset", "tiny", "--gpu-memory", "1PiB"],
     f"--gpu-memory '1PiB': 'PiB' is not a unit it takes {_TAKEN_UNITS}; give a size like 80GiB, 24GB or 141G"),
    (["plan", "--preset", "tiny", "--gpu-memory", "1 PB"],
     f"--gpu-memory '1 PB': 'PB' is not a unit it takes {_TAKEN_UNITS}; give a size like 80GiB, 24GB or 141G"),
    (["plan", "--preset", "tiny", "--gpu-memory", "16777216TiB"],   # 2**64 bytes
     "--gpu-memory '16777216TiB' is 2**64 bytes (16 EiB) or more, past the largest size it takes; give a size like "
     "80GiB, 24GB or 141G"),
    (["quantize", "tiny", "q", "--max-shard-size", "20000000TB"],
     "--max-shard-size '20000000TB' is 2**64 bytes (16 EiB) or more, past the largest size it takes; give a size "
     "like 5GB or 500MB"),
    (["quantize", "tiny", "q", "--max-shard-size", "5gigabytes"],
     f"--max-shard-size '5gigabytes': 'gigabytes' is not a unit it takes {_TAKEN_UNITS}; give a size like 5GB or "
     "500MB"),
])
def test_a_well_formed_size_past_what_is_taken_says_why(capsys, tmp_path, monkeypatch, args, line):
    """`--gpu-memory 1PiB` and `--max-shard-size 20000000TB` were "give a size like 80GiB, 24GB or 141G": not what was
    wrong (a unit not taken, a size past 2**64 bytes), and GPU memories for a shard's size."""
    from klconvert.sizes import parse_size

    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run_cli(capsys, *args)[::2], line)
    assert not (tmp_path / "q").exists()
    assert parse_size("16777215TiB") == 2**64 - 2**40 and parse_size("1 gib") == 2**30   # the largest, any case


def test_a_shard_size_of_a_few_bytes_without_a_unit_is_still_bytes(capsys, tmp_path):
    """The GPU-memory check in parse_size refused `--max-shard-size 500` (any number of bytes is a shard's size)."""
    code, _, err = run_cli(capsys, "quantize", "tiny", tmp_path / "q", "--bits", "8", "--max-shard-size", "500000")
    assert code == 0, err
    assert len(list((tmp_path / "q").glob("model-*.safetensors"))) > 1


def test_a_recipe_gpu_memory_of_a_few_bytes_is_refused(capsys, tmp_path):
    base = (Path(__file__).parents[1] / "recipes" / "48gb.yaml").read_text()
    for value, needle in (("48", "runtime.gpu_memory 48 is 48 B, no GPU's memory; write 48GB or 48GiB"),
                          ("'48'", "runtime.gpu_memory 48: a size with no unit is bytes, and 48 B is no GPU's memory; "
                                   "did you mean 48GB or 48GiB? give the unit"),   # as --gpu-memory 48 says
                          ("'0GB'", "runtime.gpu_memory '0GB' is 0 B, no GPU's memory; write e.g. 48GiB or 80GB"),
                          ("'1B'", "runtime.gpu_memory '1B' is 1 B, no GPU's memory")):   # were GPUs of 0 B
        recipe = tmp_path / "r.yaml"
        recipe.write_text(re.sub(r"gpu_memory:.*", f"gpu_memory: {value}", base))
        assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--recipe", recipe)[::2], needle)


@pytest.mark.parametrize("value, line", [
    ("1PiB", f"runtime.gpu_memory '1PiB': 'PiB' is not a unit it takes {_TAKEN_UNITS}; give a size like 48GiB or "
             "80GB"),
    ("16777216TiB", "runtime.gpu_memory '16777216TiB' is 2**64 bytes (16 EiB) or more, past the largest size it "
                    "takes; give a size like 48GiB or 80GB"),
    (str(2**64), f"runtime.gpu_memory {2**64} is 2**64 bytes (16 EiB) or more, past the largest size it takes; "
                 "write e.g. 48GiB or 80GB"),
    ("-5GB", "runtime.gpu_memory '-5GB': give a size like 48GiB or 80GB"),   # no size at all, as before
    ("nanGB", "runtime.gpu_memory 'nanGB': give a size like 48GiB or 80GB"),
])
def test_a_recipe_gpu_memory_past_what_is_taken_says_why(capsys, tmp_path, value, line):
    """A recipe's `gpu_memory: 1PiB` or `16777216TiB` was "is not a size" where --gpu-memory says what was wrong (a
    unit not taken, a size past 2**64 bytes), and a number of 2**63 bytes or more "should be a positive number of
    bytes"; a number under 2**64, as --gpu-memory takes, is planned."""
    base = (Path(__file__).parents[1] / "recipes" / "48gb.yaml").read_text()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(re.sub(r"gpu_memory:.*", f"gpu_memory: {value}", base))
    line_number = base[:base.index("gpu_memory:")].count("\n") + 1
    assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--recipe", recipe)[::2],
                          f"r.yaml:{line_number}: {line}")
    recipe.write_text(re.sub(r"gpu_memory:.*", f"gpu_memory: {2**64 - 1}", base))
    code, _, err = run_cli(capsys, "plan", "--preset", "tiny", "--recipe", recipe)
    assert code == 0, err


def test_plan_refuses_a_context_over_the_models_limit(capsys, tmp_path):
    line = assert_one_line_error(*run_cli(capsys, "plan", "--preset", "tiny", "--max-context", "2000000")[::2])
    assert "--max-context 2000000 is over the model's model_max_length 1,048,576" in line
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "48gb.yaml"
    text = re.sub(r"max_context: *\d+", "max_context: 4000000", recipe.read_text())
    (tmp_path / "big.yaml").write_text(text)
    line = assert_one_line_error(*run_cli(capsys, "plan", "--preset", "kimi-linear-48b", "--recipe",
                                          tmp_path / "big.yaml")[::2])
    assert "runtime.max_context 4000000 is over the model's model_max_length" in line


def test_a_folders_plan_without_a_context_takes_its_models_limit_when_shorter(capsys, tmp_path):
    """plan --model DIR with no --max-context plans the default context, or the model's own limit where that is
    shorter (h169's mutation testing: planning the default past it passed every test), as run takes it."""
    folder = tmp_path / "short"
    shutil.copytree(bundled_dir(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_max_length"] = 5000
    (folder / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli(capsys, "plan", "--model", folder)
    assert code == 0 and re.search(r": batch 1, context 5,000,", out), err + out


def test_help_and_errors_do_not_load_torch():
    code = ("import sys, click, klconvert.errors, klconvert\n"
            "from klconvert.cli import cli\n"
            "assert cli.main(['--help'], standalone_mode=False) == 0\n"
            "assert cli.main(['run', '--help'], standalone_mode=False) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert callable(klconvert.Tokenizer.from_folder) and 'torch' not in sys.modules\n"
            "try:\n"   # a --device that names no device, refused as it is parsed
            "    cli.main(['run', '--prompt', 'x', '--device', 'cuda:x'], standalone_mode=False)\n"
            "except click.BadParameter as e:\n"
            "    assert 'not supported' in e.format_message() and 'torch' not in sys.modules, (e, 'torch imported')\n"
            "else:\n"
            "    raise AssertionError('--device cuda:x was taken')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def assert_refused_without_torch(args: list[str], needle: str) -> None:
    """`klconvert ARGS` refused (KLError) with `needle` in its message, in a child that imported no torch: a child,
    since what is asserted is what the process imports."""
    code = ("import sys\n"
            "from klconvert.cli import cli\n"
            "from klconvert.errors import KLError\n"
            "try:\n"
            f"    cli.main({args!r}, standalone_mode=False)\n"
            "except KLError as e:\n"
            f"    assert {needle!r} in str(e), e\n"
            "    assert 'torch' not in sys.modules, 'torch was imported'\n"
            "else:\n"
            "    raise AssertionError('taken')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_folder_that_holds_no_model_is_refused_to_plan_without_torch(tmp_path):
    """plan --model imported torch (~2 s of CPU) before it read the folder's config.json, so refusing a folder that
    holds no Kimi Linear took ten times as long as run's refusal of it. (quantize reads it after its options and OUT
    have passed, with torch: test_interrupt's ..._refused_before_the_source_is_read.)"""
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    assert_refused_without_torch(["plan", "--model", str(folder)], "model_type 'llama' is not supported")


@pytest.mark.parametrize("command", [["run", "--prompt", "x", "--model", "{folder}"], ["plan", "--model", "{folder}"],
                                     ["quantize", "{folder}", "out"], ["pull-and-quantize", "--model", "{folder}"]])
def test_a_model_folder_that_is_not_there_is_refused_without_torch(tmp_path, command):
    """models.model_folder looks for a run writing a folder that is not there (convert.output_folder, whole_folder),
    and those imported the shard writer and the checkpoint reader, and torch with them: "no such folder" took 2.6 s
    of CPU. pull-and-quantize refused one in the quantizer, after torch's import, as it refuses a name that is no
    folder and no hub repo id (models.is_local_model)."""
    assert_refused_without_torch([arg.format(folder=tmp_path / "typo") for arg in command], "typo: no such folder")


_PLAN_48B = ["plan", "--preset", "kimi-linear-48b"]


@pytest.mark.parametrize("args, needle", [
    (["--gpu-memory", "80"], "--gpu-memory 80: a size with no unit is bytes"),
    (["--gpu-memory", "0GB"], "--gpu-memory '0GB' is 0 B, no GPU's memory"),
    (["--group-size", "64"], "--group-size 64 sizes the groups of --bits 4 or 8"),
    (["--bits", "4", "--group-size", "12"], "--group-size 12 is not a positive multiple of 8"),
    (["--bits", "4", "--recipe", "48gb"], "give a recipe or --bits, not both"),
    (["--recipe", "49gb"], "49gb: no such recipe file"),
    (["--recipe", "{bad}"], "not valid YAML"),
], ids=["bare-size", "no-gpu", "group-size-alone", "group-size", "recipe-and-bits", "recipe-name", "recipe-yaml"])
def test_a_plans_flags_are_refused_without_torch(tmp_path, args, needle):
    """plan's --gpu-memory, weight flags and --recipe were refused by the planner, which imports torch (~2 s of CPU):
    a mistyped size or recipe name took ten times as long to refuse as a missing folder."""
    (tmp_path / "bad.yaml").write_text("quant_stage: [\n")
    assert_refused_without_torch(_PLAN_48B + [arg.format(bad=tmp_path / "bad.yaml") for arg in args], needle)


def test_a_plans_recipe_is_read_after_the_models_config_as_before(tmp_path):
    """plan reads --recipe before torch's import, after what plan_for refused before it read one: the preset cut to
    --layers, a folder's config.json."""
    assert_refused_without_torch(_PLAN_48B + ["--layers", "99", "--recipe", "49gb"],
                                 "--layers 99: preset kimi-linear-48b has only 27 layers; give --layers 1 to 27")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert_refused_without_torch(["plan", "--model", str(tmp_path), "--recipe", "49gb"],
                                 "model_type 'llama' is not supported")


_QUANTIZE_TINY = {"quantize": ["quantize", "tiny", "{out}"],
                  "pull-and-quantize": ["pull-and-quantize", "--model", "tiny", "--out", "{out}"]}


@pytest.mark.parametrize("command", list(_QUANTIZE_TINY))
@pytest.mark.parametrize("args, needle", [
    (["--max-shard-size", "5XB"], "--max-shard-size '5XB': 'XB' is not a unit it takes"),
    (["--max-shard-size", "0"], "--max-shard-size '0': a shard holds at least 1 byte"),
    (["--allow-split-fused"], "--allow-split-fused lets a --recipe split a module vLLM fuses"),
    (["--bits", "3"], "--bits 3 is not supported"),
    (["--group-size", "12"], "--group-size 12 is not a positive multiple of 8"),
    (["--scheme", "nf4", "--bits", "8"], "--scheme nf4 is 4-bit and symmetric, in blocks of 64 with bitsandbytes' own "
                                         "scales; drop --bits 8"),
    (["--scheme", "nf4", "--observer", "mse"], "drop --observer mse"),
    (["--recipe", "48gb", "--observer", "mse"], "--recipe 48gb says how each tensor is stored; drop --observer"),
    (["--recipe", "49gb"], "49gb: no such recipe file"),
    (["--recipe", "{bad}"], "not valid YAML"),
    # the quantizer's order, kept: the shard size, then the switches, then the policy's flags
    (["--bits", "3", "--max-shard-size", "0"], "--max-shard-size '0'"),
    (["--bits", "3", "--allow-split-fused"], "--allow-split-fused lets"),
], ids=["shard-unit", "shard-0", "split-fused-alone", "bits", "group-size", "nf4-bits", "nf4-observer",
        "recipe-and-observer", "recipe-name", "recipe-yaml", "shard-before-bits", "switch-before-bits"])
def test_quantizes_flags_are_refused_without_torch(tmp_path, command, args, needle):
    """quantize's and pull-and-quantize's flags (the policy's, --recipe, --allow-split-fused, --max-shard-size) were
    refused by the quantizer, which imports torch (~2 s of CPU): a mistyped flag or recipe name took ten times as long
    to refuse as a missing folder. OUT is still refused after them and before SRC is read (test_interrupt's
    ..._refused_before_the_source_is_read)."""
    (tmp_path / "bad.yaml").write_text("quant_stage: [\n")
    assert_refused_without_torch([arg.format(out=tmp_path / "q", bad=tmp_path / "bad.yaml")
                                  for arg in _QUANTIZE_TINY[command] + args], needle)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("preset, want", [({}, "expandable_segments:True"),
                                          ({"PYTORCH_ALLOC_CONF": "max_split_size_mb:64"}, None),
                                          ({"PYTORCH_CUDA_ALLOC_CONF": "backend:native"}, "backend:native"),
                                          ({"PYTORCH_HIP_ALLOC_CONF": "expandable_segments:False"}, None)])
def test_the_command_grows_allocator_segments_unless_the_user_chose(preset, want):
    """`klconvert` sets torch's allocator to expandable segments before any command runs (held memory then stays
    near the live peak and the plan); a user's own allocator setting (ALLOCATOR_ENV) is left as it is."""
    code = ("import os, sys\n"
            "from klconvert.cli import main\n"
            "sys.argv = ['klconvert', '--version']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env | preset)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(want)


def test_a_python_program_chooses_its_allocator_itself():
    """README: the command sets expandable segments; a Python program sets the variable itself -- importing
    klconvert and loading a model leave torch's allocator settings as the program had them."""
    code = ("import os, sys\n"
            "import klconvert\n"
            "klconvert.load('tiny', device='cpu', max_context=16)\n"
            f"print([name for name in {ALLOCATOR_ENV!r} if name in os.environ])\n")
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_refusals_run_in_bounded_memory(tiny_released):
    """A sample of the above under the address-space limit: the refusals come before anything big is loaded."""
    for args in (["run", "--model", tiny_released, "--prompt", "x", "--temperature", "nan"],
                 ["pull-and-quantize", "--model", "./typo-dir"]):
        klconvert_bounded(*args).error_line()


@pytest.mark.parametrize("verb", ["plan", "bench"])
def test_layers_with_a_model_folder_is_refused_not_ignored(capsys, tiny_released, verb):
    assert_one_line_error(*run_cli(capsys, verb, "--model", tiny_released, "--layers", "3")[::2],
                          "--layers cuts a --preset; a --model folder's config.json sets its layers")


def test_quantize_shows_no_bar_off_a_terminal(capsys, tmp_path):
    """Its bar wrote carriage returns into a log, and an error line ran on after them."""
    code, out, err = run_cli(capsys, "quantize", "tiny", tmp_path / "q", "--bits", "8")
    assert code == 0 and out.strip() == str(tmp_path / "q")
    assert "\r" not in err and len(err.splitlines()) == 1 and err.startswith("quantized "), err


def test_quantize_shows_its_bar_on_a_terminal(tmp_path):
    """README: its progress bar shows on a terminal only, as git's and pip's do -- the terminal's half: on one, the
    bar redraws its line, and the summary follows it."""
    code, out, shown = run_klconvert_on_a_terminal("quantize", "tiny", tmp_path / "q", "--bits", "8")
    assert code == 0 and out == f"{tmp_path / 'q'}\n", shown
    assert shown.count("\rquantize q: ") >= 2 and "quantize q: 100%" in shown, shown
    assert shown.rsplit("\r\n", 2)[-2].startswith("quantized the bundled model tiny -> "), shown


def test_quantize_help_states_the_defaults_the_code_has():
    """The help restates the flags' defaults in words; they are defined once (quant.defaults), and held to it here.
    --bits' said lm_head stays at 8, where --scheme nf4 keeps it as stored (h283)."""
    from klconvert.quant.defaults import DEFAULT, LM_HEAD_BITS, policy_from_options

    helps = {p.name: " ".join(p.help.split()) for p in cli.commands["quantize"].params if isinstance(p, click.Option)}
    assert f"[default: {DEFAULT.bits}]; lm_head stays at {LM_HEAD_BITS}, or as stored (bf16 in the release) with " \
           "--scheme nf4." in helps["bits"]
    nf4 = policy_from_options(4, scheme="nf4")
    assert "lm_head" in [entry.pattern for entry in nf4.ignore] and len(nf4.groups) == 1
    assert f"[default: {DEFAULT.group_size}]" in helps["group_size"]
    assert f"[default: {'--sym' if DEFAULT.symmetric else '--asym'}]" in helps["symmetric"]
    assert f"{DEFAULT.kind}: compressed-tensors pack-quantized [default]" in helps["scheme"]
    assert f"{DEFAULT.observer} [default]" in helps["observer"]


def test_scheme_help_says_where_an_nf4_folder_loads():
    """--scheme's help said only "nf4: bitsandbytes 4-bit", as if the folder loaded wherever a bitsandbytes one does:
    vLLM 0.33 has no bitsandbytes method, and transformers cannot put NF4 in the routed experts' 3-D stacks (README,
    Interop; tests/test_interop_transformers_nf4.py)."""
    helps = {p.name: p.help for p in cli.commands["quantize"].params if isinstance(p, click.Option)}
    assert "[default], the one vLLM and transformers load" in helps["scheme"]
    # the command's description said "a new compressed-tensors folder OUT", nf4's too (h283)
    assert "in compressed-tensors' format (bitsandbytes' with --scheme nf4)" in " ".join(
        cli.commands["quantize"].help.split())
    assert "nf4: bitsandbytes 4-bit, which vLLM cannot load, nor transformers unless a recipe keeps the routed " \
           "experts unquantized." in helps["scheme"]


def test_plan_and_bench_help_state_the_defaults_the_code_has():
    """plan's and bench's help, and quantize's of the MSE observer, restate the default policy and the observer's
    search in words (as the README does, held by test_readme_bounds.py): held to the code here."""
    from klconvert.quant.defaults import DEFAULT, LM_HEAD_BITS
    from klconvert.quant.groupwise import MSE_GRID, MSE_MAX_SHRINK

    helps = {(name, p.name): p.help for name, command in cli.commands.items() for p in command.params
             if isinstance(p, click.Option)}
    assert f"lm_head at {LM_HEAD_BITS} " in helps[("plan", "bits")]
    assert f"[default: {DEFAULT.group_size}]" in helps[("plan", "group_size")]
    assert f"(default policy, lm_head int{LM_HEAD_BITS}, group {DEFAULT.group_size})" in helps[("bench", "bits")]
    assert f"up to {int(MSE_MAX_SHRINK * MSE_GRID)} trials a weight" in helps[("quantize", "observer")]


def test_size_flags_help_offers_the_examples_their_refusals_offer():
    """--gpu-memory's help offered "80GiB, 24GB", its refusals "80GiB, 24GB or 141G" and "80GiB or 24GB"; the
    --max-shard-size help "5GB, 500MB", its refusal "5GB or 500MB": each said in one place (klconvert/sizes.py)."""
    from klconvert.release import RELEASED_SHARD_BYTES
    from klconvert.sizes import GPU_MEMORY_EXAMPLES, SHARD_SIZE_EXAMPLES, parse_size

    helps = {(name, p.name): " ".join(p.help.split()) for name, command in cli.commands.items()
             for p in command.params if isinstance(p, click.Option) and p.help}
    assert [name for name, option in helps if option == "gpu_memory"] == ["plan"]
    assert f"e.g. {GPU_MEMORY_EXAMPLES} [default" in helps[("plan", "gpu_memory")]
    for command in ("quantize", "pull-and-quantize"):
        assert f"e.g. {SHARD_SIZE_EXAMPLES} [default: 5GB]" in helps[(command, "max_shard_size")]
    assert parse_size("5GB") == RELEASED_SHARD_BYTES


def test_plan_help_says_a_model_folders_recipe_sets_the_flags_defaults(capsys, tiny_released, tmp_path):
    """h283: a --model folder's recipe.yaml gives plan its runtime defaults (a GPU memory: a fit check, exit 3),
    where the help named only --recipe's; --model's help says so, and --recipe's that it takes the folder's place."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_released, folder)
    (folder / "recipe.yaml").write_text("runtime:\n  gpu_memory: 1MiB\n  max_context: 1000\n")
    code, out, _ = run_cli(capsys, "plan", "--model", folder)
    assert code == 3 and "1,000" in out, out
    helps = {p.name: " ".join(p.help.split()) for p in cli.commands["plan"].params if isinstance(p, click.Option)}
    assert "without --recipe, its recipe.yaml's runtime section sets the defaults of the flags below" in helps["model"]
    assert "the defaults of the flags below (in place of a --model folder's recipe.yaml)" in helps["recipe"]
    assert "(--gpu-memory, or a recipe's)" in cli.commands["plan"].help


def test_other_defaults_the_cli_states_are_the_codes():
    """Defaults the torch-free CLI writes out, where the code defining them imports torch or onnx: held to it here."""
    import inspect

    from klconvert.bench import bench
    from klconvert.evaluate import MIN_SCORED_TOKENS, evaluate
    from klconvert.release import RELEASED_SHARD_BYTES

    options = {(name, p.name): p for name, command in cli.commands.items() for p in command.params}
    assert options[("eval", "max_tokens")].default == inspect.signature(evaluate).parameters["max_tokens"].default
    assert options[("eval", "max_tokens")].type.min == MIN_SCORED_TOKENS
    assert options[("bench", "new_tokens")].default == inspect.signature(bench).parameters["new_tokens"].default
    assert f"[default: {RELEASED_SHARD_BYTES // 10**9}GB]" in options[("quantize", "max_shard_size")].help
    onnx_export = pytest.importorskip("klconvert.onnx.export")
    assert f"the oldest the export takes, {onnx_export.DEFAULT_OPSET}]" in options[("export-onnx", "opset")].help
    assert onnx_export.DEFAULT_OPSET == onnx_export.MIN_OPSET


@pytest.mark.parametrize("name", ["missing", "m" * MAX_FILE_NAME_BYTES], ids=["name", "name-at-NAME_MAX"])
@pytest.mark.parametrize("args, named", [
    (["quantize", "missing", "qm"], "SRC missing"),        # it said "pass --model DIR": quantize has no --model
    (["run", "--model", "missing", "--prompt", "x"], "--model missing"),
    (["export-onnx", "--model", "missing", "--out", "o"], "--model missing"),
    (["bench", "--model", "missing"], "--model missing"),
    (["plan", "--model", "missing"], "--model missing"),
    (["eval", "--model", "missing", "--reference", "tiny", "--text-file", "t.txt"], "--model missing"),
    (["eval", "--model", "tiny", "--reference", "missing", "--text-file", "t.txt"], "--reference missing"),
])
def test_a_missing_model_folder_is_named_as_its_command_takes_it(capsys, tmp_path, monkeypatch, args, named, name):
    """Each command words it for its own option (or SRC), and says what a valid model is. A name at NAME_MAX, whose
    NAME.partial (and the other names a run writing it makes) is past it, failed with a traceback (ENAMETOOLONG,
    helper-166)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("ROMEO. What light")
    args, named = [name if arg == "missing" else arg for arg in args], named.replace("missing", name)
    line = assert_one_line_error(*run_cli(capsys, *args)[::2], f"{named}: no such folder; give a Kimi Linear "
                                 "checkpoint folder", "or tiny, the bundled model")
    assert ("--model" in line) == named.startswith("--model"), line
    assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob("qm"))


@pytest.mark.parametrize("args", [["run", "--model", "q4", "--prompt", "x"], ["plan", "--model", "q4"],
                                  ["quantize", "q4", "q8", "--bits", "8"]])
def test_a_model_folder_a_quantize_is_still_writing_is_said_so(capsys, tmp_path, monkeypatch, args):
    """A quantize into q4 that has not finished (running, or killed between its renames) left q4.partial and no q4:
    "no such folder" read as the model lost (helper-139)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q4.partial").mkdir()
    (tmp_path / "q4.partial" / RESUME_RECORD).write_text('{"source": {}}')
    assert_one_line_error(*run_cli(capsys, *args)[::2], "q4: no such folder yet: q4.partial holds a quantize into it "
                          "that has not finished (running now, or stopped: the same `klconvert quantize` command "
                          "finishes it); give the folder once it is whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4.partial"]


@pytest.mark.parametrize("partial", ["the user's", "empty", "a link", "another user's"])
@pytest.mark.parametrize("args", [["plan", "--model", "q4"], ["quantize", "q4", "q8", "--bits", "8"]])
def test_a_partial_folder_no_quantize_left_is_not_said_to_be_one(capsys, tmp_path, monkeypatch, args, partial):
    """q4.partial that is no quantize's -- a folder of the user's (or empty), a link to a folder holding a resume
    record, another user's -- was said to be 'a quantize into it that has not finished', which that quantize then
    refused as 'not an interrupted klconvert run' (helper-166): it is no such folder."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / ("elsewhere" if partial == "a link" else "q4.partial")
    folder.mkdir()
    if partial == "the user's":
        (folder / "notes.txt").write_text("the user's own")
    elif partial != "empty":
        (folder / RESUME_RECORD).write_text('{"source": {}}')
    if partial == "a link":
        (tmp_path / "q4.partial").symlink_to(folder)
    if partial == "another user's":
        monkeypatch.setattr(os, "getuid", lambda uid=os.getuid(): uid + 1)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(*run_cli(capsys, *args)[::2], "q4: no such folder; give a Kimi Linear checkpoint folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == left


@pytest.mark.parametrize("state", ["running", "stopped", "stopped, its pid another process's now"])
@pytest.mark.parametrize("args", [["run", "--engine", "onnxruntime", "--model", "out/x4", "--prompt", "x"],
                                  ["plan", "--model", "out/x4"]])
def test_a_model_folder_an_export_is_still_writing_is_said_so(capsys, tmp_path, monkeypatch, request, args, state):
    """An export-onnx into out/x4 that has not finished (running, or killed) left .x4.partial-PID-XXXXXXXX and its
    lock beside a missing out/x4: the relative path was read as a hub repo id ('no such folder, and a hub repo id is
    not fetched here', helper-165). A killed run's lock file naming a pid a live process has since was 'under way
    (pid N)': the lock is held by none (helper-167)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "x4"
    out.parent.mkdir()
    running = state == "running"
    pid = os.getpid() if state != "stopped" else MAX_PID
    temporary = Path(tempfile.mkdtemp(prefix=temporary_prefix(out, "partial", pid), dir=out.parent))
    mark_temporary(temporary)
    if state != "stopped":
        lock_path(out).write_text(f"{pid}\n")
    held = os.open(lock_path(out), os.O_RDONLY) if running else None
    if held is not None:   # as OutputLock holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        request.addfinalizer(lambda: os.close(held))
    left = sorted(p.name for p in out.parent.iterdir())
    assert_one_line_error(*run_cli(capsys, *args)[::2], "out/x4: no such folder yet: a klconvert run writing it "
                          f"(export-onnx or synth) is under way ({f'pid {pid}' if running else 'or was stopped'}), "
                          f"into out/{temporary.name}; give the folder once that run ends (one stopped: run its "
                          "command again)")
    assert sorted(p.name for p in out.parent.iterdir()) == left


def test_only_names_an_export_writing_a_model_folder_makes_are_looked_into(tmp_path, monkeypatch):
    """writing_under_way took each entry of the folder OUT goes in as a Path and looked at it (1M entries: +1.4 s,
    +60 MB, helper-166): the name comes first."""
    out = tmp_path / "x4"
    for name in ["a", ".x4", ".x4.replaced-1-abcdefgh", "x4.partial", ".x4.partial-1-abcdefgh"]:
        (tmp_path / name).mkdir()
    (tmp_path / ".x4.partial-1-abcdefgh" / "notes.txt").write_text("the user's own")   # no run's: not marked
    looked_into, runs_temporary = [], whole_folder.runs_temporary
    monkeypatch.setattr(whole_folder, "runs_temporary",
                        lambda entry, out: looked_into.append(entry.name) or runs_temporary(entry, out))
    assert whole_folder.writing_under_way(out) is None
    assert looked_into == [".x4.partial-1-abcdefgh"]


def test_a_source_folder_without_config_is_named_as_quantize_takes_it(capsys, tmp_path):
    """It said "point --model at ...": quantize takes SRC (helper-129)."""
    (tmp_path / "hw.partial").mkdir()
    assert_one_line_error(*run_cli(capsys, "quantize", tmp_path / "hw.partial", tmp_path / "q")[::2],
                          "hw.partial/config.json: no config.json here; point src (SRC) at a Kimi Linear checkpoint "
                          "folder")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("make, what", [
    (lambda path: path.write_text("not a model"), "is a file, not a folder"),
    (os.mkfifo, "is a FIFO, not a folder"),
    (lambda path: path.symlink_to(path), "is a link that cannot be followed (Too many levels of symbolic links)"),
    (lambda path: path.symlink_to("gone"), "is a link to gone, which does not exist (a disk not mounted?)"),
], ids=["file", "fifo", "link-loop", "link-to-nothing"])
@pytest.mark.parametrize("command", [["run", "--prompt", "x", "--model"], ["quantize"], ["plan", "--model"],
                                     ["eval", "--reference", "tiny", "--text-file", "t.txt", "--model"]])
def test_a_model_that_is_no_folder_is_said_to_be_what_it_is(capsys, tmp_path, monkeypatch, make, what, command):
    """A file (a FIFO, a link) given for a model folder read "no such folder" (helper-129)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("ROMEO. What light")
    make(tmp_path / "m")
    named = "SRC m" if command == ["quantize"] else "--model m"
    assert_one_line_error(*run_cli(capsys, *command, "m", *(["qm"] if command == ["quantize"] else []))[::2],
                          f"{named}: {what}; give a Kimi Linear checkpoint folder or tiny, the bundled model")
    assert not (tmp_path / "qm").exists()


@pytest.mark.parametrize("args, named", [
    (["quantize", "moonshotai/Kimi-Linear-48B-A3B-Instruct", "qx"], "SRC moonshotai/Kimi-Linear-48B-A3B-Instruct"),
    (["run", "--model", "moonshotai/Kimi-Linear-48B-A3B-Instruct", "--prompt", "x"],
     "--model moonshotai/Kimi-Linear-48B-A3B-Instruct"),
])
def test_a_hub_repo_id_for_a_folder_points_at_the_commands_that_pull(capsys, tmp_path, monkeypatch, args, named):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run_cli(capsys, *args)[::2], f"{named}: no such folder",
                          "`klconvert pull-and-quantize --model moonshotai/Kimi-Linear-48B-A3B-Instruct` pulls and "
                          "quantizes it", "`klconvert pull moonshotai/Kimi-Linear-48B-A3B-Instruct` only downloads it")


def test_the_readers_own_missing_folder_names_no_flag(tmp_path):
    """The Python API (klconvert.load, Checkpoint) has no flags: it says what is missing and what a checkpoint is."""
    from klconvert.checkpoint.reader import Checkpoint
    from klconvert.errors import KLError

    with pytest.raises(KLError) as caught:
        Checkpoint(tmp_path / "nope")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'nope'}: no such checkpoint folder; name a folder holding a Kimi Linear "
                              "checkpoint (config.json and safetensors weights)"), message
    assert "--" not in message


@pytest.mark.parametrize("args, given", [
    (["--prompt-file", "p.txt", "--top-p", "0.5"], "--top-p given with the default --temperature 0"),
    (["--seed", "5", "--prompt", "hi", "--top-p", "0.9"], "--top-p and --seed given with the default --temperature 0"),
])
def test_sampling_flags_without_a_temperature_are_refused_not_ignored(capsys, tmp_path, monkeypatch, args, given):
    """Greedy decoding takes neither: they were dropped unsaid."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("ROMEO.")
    assert_one_line_error(*run_cli(capsys, "run", "--model", "tiny", *args)[::2], given,
                          "--top-p and --seed take effect only with --temperature > 0")


def test_an_explicit_greedy_temperature_takes_the_sampling_flags(capsys, tmp_path, monkeypatch):
    """A sweep over temperatures passes the same --seed and --top-p each time; at an explicit --temperature 0 they
    change nothing and are taken."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "run", "--model", "tiny", "--prompt", "hi", "--temperature", "0", "--top-p", "0.5",
                           "--seed", "0", "--max-new-tokens", "2")
    assert code == 0, err
