"""The `klconvert` command: one verb per subcommand, each parsing its flags and calling one library function."""
from __future__ import annotations

import errno
import math
import os
import re
import signal
import stat
import sys
from array import array
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from klconvert.checkpoint.folder_files import CONFIG_FILE, MAX_FILE_NAME_BYTES
from klconvert.checkpoint.regular_file import kind_of
from klconvert.config import KimiLinearConfig
from klconvert.devices import DEVICE_NAMES, NOT_A_DEVICE, checked_device, device_name
from klconvert.entry import StdoutFailed, complete_note, exit_interrupted, signal_of, signal_status
from klconvert.errors import (KLError, PlanDoesNotFit, controls_escaped, descriptors_exhausted,
                             descriptors_exhausted_behind, flag_value, shown)
from klconvert.extras import require
from klconvert.models import (BUNDLED_NAME, DEFAULT_MODEL_DIR, DEFAULT_REPO, bundled_dir, default_model,
                              is_local_model, model_folder)
from klconvert.presets import PRESETS
from klconvert.recipes import shipped_names
from klconvert.runtime.device_memory import (COMMAND_LEVERS, PRESET_BENCH_LEVERS, BatchDoesNotFit, ContextDoesNotFit,
                                             DepthCheckDoesNotFit, DeviceLevers, DeviceMemoryExhausted,
                                             PromptsDoNotFit, WeightsDoNotFit, device_exhausted, fewer_bits_hold_less)
from klconvert.runtime.host_memory import OUT_OF_HOST_MEMORY, import_exhausted
from klconvert.shell_command import shell_command
from klconvert.sizes import GPU_MEMORY_EXAMPLES, SHARD_SIZE_EXAMPLES
from klconvert.units import binary_size_text, counted, size_text, size_texts
from klconvert.user_paths import refuse_unreachable, shown_path

if TYPE_CHECKING:
    from klconvert.quant import Recipe

# the runtime's MLA cache dtypes by name (runtime/state.py MLA_CACHE_DTYPES; named here, torch-free, for --help)
MLA_CACHE_DTYPE = click.Choice(["bfloat16", "float8_e4m3fn"])
# the runtime's compute dtypes by name (runtime/engine.py COMPUTE_DTYPES; named here, torch-free, for --help)
DTYPE = click.Choice(["bfloat16", "float32"])
DECODE_CONTEXT = 4096  # what `klconvert bench` decodes at when given no --context (nor --prefill)
PEER_PRESET = "kimi-linear-48b"  # the shapes `klconvert bench --peer transformers` times, cut to --peer-layers
PEER_LAYERS = 4  # the layers of the peer's model unless --peer-layers (all of them in bf16: 98 GB)
# the most --peer-layers takes, refused as the command line is read: preset_config's refusal came after the whole bench
PEER_MAX_LAYERS = PRESETS[PEER_PRESET]["num_hidden_layers"]
PREFILL_BAR_DELAY = 2.0  # seconds a prefill runs before `klconvert run` shows its bar on a terminal


# a whole number as people type one: ASCII digits, a leading - (a range or the command refuses one it cannot take);
# int() also takes '1_6', ' 16', '+4' and other scripts' digits ('١٦', '１６')
PLAIN_INTEGER = re.compile(r"-?[0-9]+")
MAX_INTEGER_DIGITS = 24  # past any number an option takes (a seed's 2**64 - 1 has 20): a longer one is refused short


def digit_count(text: str) -> int:
    """How many digits `text` holds, in any script (int() reads them all)."""
    return sum(c.isdigit() for c in text)


class PlainDigits(click.ParamType):
    """What an integer option's type reads first: the text PLAIN_INTEGER takes, else refused naming the value."""

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            if (digits := digit_count(value)) > MAX_INTEGER_DIGITS:   # no line echoes it whole
                self.fail(f"{shown(value.strip())} ({digits:,} digits) is longer than any number this option takes; "
                          "give a smaller one", param, ctx)
            if not PLAIN_INTEGER.fullmatch(value):
                try:   # the number int() reads it as, said back in plain digits
                    advice = f"write it as {int(value)}"
                except ValueError:
                    advice = "give one, e.g. 16"
                self.fail(f"{value[:40]!r} is not a whole number in the digits 0-9; {advice}", param, ctx)
        return super().convert(value, param, ctx)


class Integer(PlainDigits, click.types.IntParamType):
    """click's INT, reading PlainDigits' text only."""


class IntegerRange(PlainDigits, click.IntRange):
    """click.IntRange, reading PlainDigits' text only."""


INTEGER = Integer()
SEED = IntegerRange(0, 2**64 - 1)  # what torch.Generator.manual_seed takes (runtime/sampling.py SEEDS)
LAYERS = IntegerRange(min=1)  # a preset cut to N layers (presets.preset_config refuses fewer too)


# a decimal number as people type one, as PLAIN_INTEGER a whole one: float() also takes '1_0', '+1' and other
# scripts' digits ('٠.٥')
PLAIN_DECIMAL = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (FloatRange lets nan through: every comparison with it is false),
    reading PLAIN_DECIMAL's text only."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if isinstance(value, str) and not PLAIN_DECIMAL.fullmatch(value):
            self.fail(f"{value[:40]!r} is not a number in the digits 0-9; give one, e.g. 0.7", param, ctx)
        return number


def path_problem(value: str) -> str | None:
    """What makes a path given on the command line unusable, or None: bytes that are not text in the file names'
    encoding (Python holds them as lone surrogates, which no UTF-8 message or model card can write), a control
    character (it would reach the terminal, and a folder's model card, as a line of its own), or a name longer than
    a file system allows."""
    undecoded = next((c for c in value if "\udc80" <= c <= "\udcff"), None)   # os.fsdecode's escape of a byte
    if undecoded is not None:
        try:   # UTF-8 text, refused only by the locale's ASCII (LC_ALL=C without PEP 538/540's UTF-8 coercion)
            os.fsencode(value).decode("utf-8")
            locale = " or run under a UTF-8 locale (e.g. LC_ALL=C.UTF-8)"
        except UnicodeDecodeError:
            locale = ""
        return (f"its name is not {sys.getfilesystemencoding().upper()} (byte 0x{ord(undecoded) - 0xDC00:02X}), the "
                f"encoding of file names here; rename it{locale}")
    if not value.isprintable():
        return "it holds a control character (a newline, a tab, an escape); give a plain path"
    longest = max(len(os.fsencode(name)) for name in value.split(os.sep))
    if longest > MAX_FILE_NAME_BYTES:
        return (f"a name in it is {longest:,} bytes, over the {MAX_FILE_NAME_BYTES} a file system allows; give a "
                "shorter name")
    return None


def refuse_unreachable_arg(value: str, param: click.Parameter | None) -> None:
    """KLError, naming the flag (or argument) and the path, when a path given on the command line cannot be looked
    at -- a folder on its way that cannot be entered, a path past the system's length (user_paths.unreachable): said
    here, where every path the user gives comes in, before any command touches it."""
    if param is None:
        named = shown_path(value)
    else:
        named = f"{param.opts[0] if isinstance(param, click.Option) else param.human_readable_name} {shown_path(value)}"
    refuse_unreachable(value, named)


class PathArg(click.Path):
    """A click.Path that refuses the empty string, which pathlib reads as ".": an unset shell variable would quietly
    name the current folder; what `path_problem` finds; and a path that cannot be looked at (refuse_unreachable_arg)."""

    def convert(self, value, param, ctx):
        if value == "":
            self.fail("an empty path; give the path", param, ctx)
        if problem := path_problem(value):
            self.fail(f"{shown_path(value)}: {problem}", param, ctx)
        if not (self.allow_dash and value == "-"):
            refuse_unreachable_arg(value, param)
        return super().convert(value, param, ctx)


# a text file to read, or - for standard input (text_input), kept as typed: a Path reads ./- (the file named -) as -
TEXT_FILE = PathArg(allow_dash=True)


class ModelArg(click.ParamType):
    """A model named on the command line: not empty, for the reason PathArg gives (and an empty repo id is none)."""

    name = "text"

    def __init__(self, what: str, folder: bool = True):
        self.what, self.folder = what, folder   # folder: it may name a folder (checked as PathArg checks a path)

    def convert(self, value, param, ctx):
        if value == "":
            self.fail(f"an empty name; give {self.what}", param, ctx)
        if problem := path_problem(value):
            self.fail(f"{shown_path(value)}: {problem}", param, ctx)
        if self.folder and value != BUNDLED_NAME:
            refuse_unreachable_arg(value, param)
        return value


MODEL = ModelArg(f"a checkpoint folder or {BUNDLED_NAME}")
REPO = ModelArg("a hub repo id (owner/name)", folder=False)
REPO_OR_MODEL = ModelArg(f"a hub repo id, a checkpoint folder or {BUNDLED_NAME}")


class DeviceArg(click.ParamType):
    """--device: a name klconvert.devices reads (device_name: cpu, cuda or cuda:N), another refused as any bad value
    of a flag is, without torch; whether torch sees that GPU, checked_device says when the command runs."""

    name = "device"

    def get_metavar(self, param, ctx=None):
        return f"[{'|'.join(DEVICE_NAMES)}]"

    def convert(self, value, param, ctx):
        try:
            device_name(value)
        except KLError:   # the library's line names device= too; the parser's names the flag and the command
            self.fail(f"{value[:80]!r} {NOT_A_DEVICE}", param, ctx)
        return value


DEVICE = DeviceArg()


def _given_more_than_once(param: click.Parameter, times: int, ctx: click.Context | None = None,
                          advice: str = "") -> click.BadParameter:
    """The refusal of an option given `times` times that takes one value, by all its names (--sym / --asym)."""
    return click.BadParameter(f"given {times} times; give it once{advice}", ctx=ctx,
                              param_hint=[*param.opts, *param.secondary_opts])


class OptionsOnce(click.Command):
    """A klconvert command, which refuses an option given more than once before anything is parsed (those `multiple`
    by design aside: --include, --prompt-file): click keeps the last value and drops the rest unsaid (`eval --model q4
    --model tiny` measured tiny against tiny; `quantize --sym --asym` wrote asymmetric scales)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:
            _refuse_repeated_options(self, ctx, args)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:   # click's parser raises some (an option given no value) without the context,
            e.ctx = e.ctx or ctx        # which names the command and its --help in the line
            raise

    def invoke(self, ctx: click.Context):
        """The command; the GPU's memory running out, or a plan past the room (a context, a batch, the prompts or the
        weights that do not fit, bench's depth check), is said naming this command's own flags (for_command): in an
        engine, in place of the API's arguments; elsewhere (a bench's weights, a quantize), torch's refusal as one
        line."""
        try:
            return super().invoke(ctx)
        except (DeviceMemoryExhausted, ContextDoesNotFit, BatchDoesNotFit, PromptsDoNotFit, WeightsDoNotFit,
                DepthCheckDoesNotFit) as e:
            raise e.for_command(self.device_levers(ctx.params)) from None
        except RuntimeError as e:   # torch.OutOfMemoryError is one
            exhausted = device_exhausted(e, ())
            if exhausted is None:
                raise
            raise exhausted.for_command(self.device_levers(ctx.params)) from None

    def device_levers(self, params: dict) -> DeviceLevers | None:
        """What asks for less of the device in this command, given its `params` (COMMAND_LEVERS; None: the API's
        words stay)."""
        return COMMAND_LEVERS.get(self.name)


class BenchCommand(OptionsOnce):
    """bench, whose ways to fewer weights are what it times: fewer --layers only of a --preset of more than one (a
    --model folder's config.json sets its layers)."""

    def device_levers(self, params: dict) -> DeviceLevers | None:
        preset, layers = params.get("preset"), params.get("layers")
        if preset in PRESETS and (layers or PRESETS[preset]["num_hidden_layers"]) > 1:
            return PRESET_BENCH_LEVERS
        return super().device_levers(params)


def _refuse_repeated_options(command: click.Command, ctx: click.Context, args: list[str]) -> None:
    """Refuses the first option in `args` given more than once (_given_more_than_once): its names counted as one
    (--sym and --asym, a short alias), `--bits=8` as --bits, each option's value skipped as click's parser takes it
    (`--prompt --bits` is the prompt "--bits"), nothing past a bare --."""
    options = {name: param for param in command.get_params(ctx) if isinstance(param, click.Option)
               for name in (*param.opts, *param.secondary_opts)}
    times: dict[click.Option, int] = {}
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            break
        name, attached = arg, False   # attached: its value is in the same word
        if arg.startswith("--") and "=" in arg:
            name, attached = arg.partition("=")[0], True
        elif arg.startswith("-") and not arg.startswith("--") and arg not in options and arg[:2] in options:
            name, attached = arg[:2], True   # -Xvalue
        param = options.get(name)
        if param is None:   # an argument, or no option (click names it)
            continue
        times[param] = times.get(param, 0) + 1
        if not (param.is_flag or param.count or attached):
            for _ in range(param.nargs):
                next(rest, None)
    for param, given in times.items():
        if given > 1 and not param.multiple and param.expose_value:   # --help twice is still the help
            raise _given_more_than_once(param, given, ctx)


class OneLineErrors(click.Group):
    """The klconvert group: every error a user can cause -- a KLError or a usage error -- ends in one line on stderr,
    `klconvert: error: ...`, with the error's exit status (2 for bad input) and no traceback; so does a standard
    output that cannot be written (one whose reader is gone: no line, 141)."""

    command_class = OptionsOnce

    def main(self, args=None, prog_name=None, standalone_mode: bool = True, **extra):
        if not standalone_mode:  # the caller handles the errors (click's own non-standalone contract)
            return super().main(args, prog_name, standalone_mode=False, **extra)
        try:
            _refuse_a_working_folder_that_is_gone()
            result = super().main(args, prog_name, standalone_mode=False, **extra)
            sys.stdout.flush()   # what the command left in stdout's buffer: failing to write it fails the command
            return result
        except StdoutFailed as e:   # klconvert.entry's standard output (a full disk, closed, a reader gone, an
            # encoding that cannot write a character)
            if e.errno == errno.EPIPE:   # its reader stopped reading (`| head`): no line, and a shell's status for
                sys.exit(signal_status(signal.SIGPIPE))   # a command SIGPIPE ended, as Python ignores SIGPIPE
            click.echo(f"klconvert: error: {e}" + (f" ({complete_note(e.complete)})" if e.complete is not None else ""),
                       err=True)
            sys.exit(KLError.exit_code)
        except KLError as e:   # one raised while out of file descriptors blames what it read: the limit is said
            e = descriptors_exhausted_behind(e) or e
            click.echo(f"klconvert: error: {_one_line(str(e))}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.NoArgsIsHelpError as e:   # `klconvert` alone: the help as it is, not one line of it
            click.echo(e.ctx.get_help(), err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:   # a subcommand's named; the group's own need no name: the line starts with it
            command = e.ctx.command_path if e.ctx is not None else "klconvert"
            named = f"{command}: " if e.ctx is not None and e.ctx.parent is not None else ""
            click.echo(f"klconvert: error: {named}{_one_line(e.format_message())} (see `{command} --help`)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            exhausted = descriptors_exhausted_behind(e)
            click.echo(f"klconvert: error: {_one_line(e.format_message() if exhausted is None else str(exhausted))}",
                       err=True)
            sys.exit(e.exit_code if exhausted is None else exhausted.exit_code)
        except click.exceptions.Abort as e:   # click's, of an interrupt while it read the command line
            exit_interrupted(signal_of(e.__cause__))
        except KeyboardInterrupt as e:
            exit_interrupted(signal_of(e))
        except (RuntimeError, ImportError, OSError) as e:   # out of file descriptors wherever it struck (a pipe, a
            # library's import or its open: safetensors' RuntimeError) or an import out of memory (import_exhausted);
            # else not a user's (the GPU's memory run out is a command's, OptionsOnce.invoke)
            exhausted = descriptors_exhausted(e) or import_exhausted(e)
            if exhausted is None:
                raise
            click.echo(f"klconvert: error: {_one_line(str(exhausted))}", err=True)
            sys.exit(exhausted.exit_code)
        except MemoryError:   # the host's memory, or a limit on the process's: whatever asked for it, one line
            click.echo(f"klconvert: error: {OUT_OF_HOST_MEMORY}; free some memory, or "
                       "give the command less to hold (a shorter context or text, a smaller batch or model)", err=True)
            sys.exit(2)

    def invoke(self, ctx: click.Context):
        """The command; an interrupt ends it here (click, meeting a KeyboardInterrupt first, would answer with a
        blank line on stderr, for a terminal's ^C: exit_interrupted writes that only to one)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            exit_interrupted(signal_of(e))


def _refuse_a_working_folder_that_is_gone() -> None:
    """A current folder removed under the shell: every relative path fails, and so does torch's import ("Intel
    oneMKL FATAL ERROR: Cannot load libtorch_cpu.so") -- said first, in one line."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise KLError("the current folder no longer exists; cd to an existing folder") from None


def echo_complete(path: Path) -> None:
    """Print `path`, the output the command has written whole, on standard output (for a script to take); one that
    cannot take it fails the command still, its line saying that `path` is complete. A relative path that starts
    with a dash is printed with ./ before it, which pathlib drops where it was typed: `synth --out ./-s` printed -s,
    which a script's `ls "$out"` read as its option (h292)."""
    text = str(path)
    try:
        click.echo(f"./{text}" if text.startswith("-") else text)
    except StdoutFailed as e:
        e.complete = path
        raise


def _one_line(message: str) -> str:
    """The message on one line, any character a terminal would act on (ESC, BEL, NUL...) written as its escape:
    tensor names, index keys and a template's own error text come from the download."""
    return controls_escaped(" ".join(message.split()))


# Each command's help is given as help=, not taken from its docstring: python -OO (PYTHONOPTIMIZE=2) drops docstrings
@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             help="Pull, quantize and run Moonshot AI's Kimi Linear on one GPU.")
@click.version_option(package_name="klconvert")
def cli() -> None:
    pass


@cli.command(help="Write a random-weight checkpoint in exactly the released format.")
@click.option("--preset", type=click.Choice(list(PRESETS)), required=True,
              help="tiny: a small model (14 MB) of the same structure; kimi-linear-48b: the released shapes.")
@click.option("--layers", type=LAYERS, default=None, help="Keep only N layers (3:1 KDA:MLA pattern kept).")
@click.option("--seed", type=IntegerRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the random weights.")
@click.option("--layout", type=click.Choice(["released", "transformers"]), default="released", show_default=True,
              help="Tensor layout: the released checkpoint's, or the native transformers port's.")
@click.option("--out", type=PathArg(path_type=Path), required=True, help="Folder to create, or an empty one.")
@click.option("--force", is_flag=True,
              help="Replace --out, once the new one is whole, where klconvert wrote it (its .klconvert-output.json "
                   "lists every file: a synth, quantize or export output).")
def synth(preset: str, layers: int | None, seed: int, layout: str, out: Path, force: bool) -> None:
    from klconvert.synth.checkpoint import synth as write_synth

    result = write_synth(preset, out, layers=layers, seed=seed, layout=layout, force=force)
    click.echo(f"wrote {result.path}: {result.tensors} tensors, {size_text(result.bytes)} "
               f"in {counted(result.shards, 'shard')}", err=True)
    echo_complete(result.path)


@cli.command(help="Download a repo's safetensors, configs and tokenizer (never pickles or code) and verify every "
             f"file.\n\nREPO defaults to the release, {DEFAULT_REPO}.")
@click.argument("repo", type=REPO, default=DEFAULT_REPO)
@click.option("--revision", default=None, help="Branch, tag or commit [default: main].")
@click.option("--include", multiple=True, help="Only files matching this pattern (repeatable).")
@click.option("--exclude", multiple=True, help="Skip files matching this pattern (repeatable).")
@click.option("--local-dir", type=PathArg(path_type=Path), default=None, help="Download into this folder.")
@click.option("--cache-dir", type=PathArg(path_type=Path), default=None,
              help="Hugging Face cache to use [default: $HF_HUB_CACHE (or the older $HUGGINGFACE_HUB_CACHE), else "
                   "$HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub].")
def pull(repo: str, revision: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
         local_dir: Path | None, cache_dir: Path | None) -> None:
    from klconvert.hub import pull as hub_pull

    if local_dir is not None and cache_dir is not None:
        raise KLError("give at most one of --local-dir and --cache-dir")
    result = hub_pull(repo, revision=revision, include=list(include) or None, exclude=list(exclude) or None,
                      local_dir=local_dir, cache_dir=cache_dir)
    click.echo(f"{repo}@{result.commit}: {counted(len(result.files), 'file')} verified, "
               f"{result.bytes_downloaded / 1e9:.2f} GB downloaded", err=True)
    echo_complete(result.path)


def _over_context_length(flag: str, value: int, config: KimiLinearConfig) -> KLError:
    """A flag's number of tokens past the model's context length (model_max_length, named as its config names it)."""
    return KLError(f"{flag_value(flag, value)} is over the model's {config.model_max_length_name} "
                   f"{config.model_max_length:,}; lower it")


def _context_error(where: str, tokens: int, at_least: bool, max_new_tokens: int, max_context: int | None,
                   config: KimiLinearConfig) -> KLError:
    """What is true when the prompt of `where` (the flag that gave it), of `tokens` (or more), plus --max-new-tokens
    does not fit."""
    prompt = (f"the prompt of {where} ({'over ' if at_least else ''}{counted(tokens, 'token')}) plus "
              f"--max-new-tokens {max_new_tokens}")
    need, limit, limit_name = tokens + max_new_tokens, config.model_max_length, config.model_max_length_name
    if max_context is not None and need <= limit:
        return KLError(f"{prompt} needs a context of {'more than ' if at_least else ''}{counted(need, 'token')} but "
                       f"--max-context is {max_context}; raise --max-context (up to the model's {limit_name} "
                       f"{limit:,}) or shorten the prompt")
    return KLError(f"{prompt} is over the model's {limit_name} of {counted(limit, 'token')}; shorten the prompt or "
                   "lower --max-new-tokens")


def _given_once(param: click.Parameter, given: tuple[str, ...]) -> str | None:
    """--prompt's one value: `multiple` (which OptionsOnce leaves to it) so that its refusal can name the batch."""
    if len(given) > 1:
        raise _given_more_than_once(param, len(given), advice=" (several --prompt-file FILE make a batch)")
    return given[0] if given else None


@cli.command(help="Continue a prompt (or several, as one batch): the text streams to stdout, a summary goes to "
             "stderr.")
@click.option("--model", type=MODEL, default=None,
              help=f"Checkpoint folder (released, transformers or quantized layout), or {BUNDLED_NAME} for the "
                   f"bundled model [default: {DEFAULT_MODEL_DIR} when it exists, else {BUNDLED_NAME}].")
@click.option("--prompt", multiple=True, callback=lambda ctx, param, given: _given_once(param, given),
              help="The prompt text itself (instead of --prompt-file).")
@click.option("--prompt-file", "prompt_files", type=TEXT_FILE, multiple=True,
              help="UTF-8 text file with the prompt, or - for standard input; repeat it to continue several prompts "
                   "as one batch (each at its own length).")
@click.option("--max-new-tokens", type=IntegerRange(min=0), default=256, show_default=True,
              help="Stop after this many new tokens (or earlier, at a stop token: <|im_end|>, the tokenizer's eos, "
                   "config.json's eos_token_id); 0 only prefills the prompts, printing no text.")
@click.option("--temperature", type=FiniteFloat(min=0.0), default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=FiniteFloat(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True,
              help="Sample only from the smallest set of tokens whose probability reaches P; 1 keeps them all.")
@click.option("--seed", type=SEED, default=None,
              help="Seed for sampling [default: a fresh random seed, which the summary prints].")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user turn with the model's chat template.")
@click.option("--show-special", is_flag=True,
              help="Print generated special tokens (<|im_assistant|>, <|reserved_token_N|>, ...) as text, but the "
                   "stop token that ends a sequence; by default they are skipped.")
@click.option("--max-context", type=IntegerRange(min=1), default=None,
              help="Context the memory plan holds [default: prompt + max-new-tokens].")
@click.option("--device", type=DEVICE, default=None,
              help="Where to run; cuda:N picks the N-th GPU [default: cuda if present].")
@click.option("--dtype", type=DTYPE, default=None,
              help="Compute dtype [default: bfloat16 on cuda, float32 on cpu].")
@click.option("--kernels", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
              help="Triton kernels (int weights, fused KDA step, fused MoE) or the PyTorch reference; auto: "
                   "Triton on cuda.")
@click.option("--engine", type=click.Choice(["klconvert", "onnxruntime"]), default="klconvert", show_default=True,
              help="klconvert's runtime, or onnxruntime (CPU) on a folder written by `klconvert export-onnx`.")
@click.option("--progress/--no-progress", default=None,
              help=f"A prefill progress bar on stderr, in tokens/s [default: on a terminal, for prefills longer "
                   f"than {PREFILL_BAR_DELAY:g} s].")
def run(model: str | None, prompt: str | None, prompt_files: tuple[str, ...], max_new_tokens: int, temperature: float,
        top_p: float, seed: int | None, chat: bool, show_special: bool, max_context: int | None, device: str | None,
        dtype: str | None, kernels: str, engine: str, progress: bool | None) -> None:
    _refuse_sampling_flags_when_greedy(click.get_current_context(), temperature)
    _stdout_for_people()
    from klconvert.text_input import read_prompt
    from klconvert.tokenizer import ChatPastTokens, StreamDecoder, Tokenizer

    # which model runs is said once every check has passed, just before it runs
    folder, which = default_model("running", needs_tokenizer=True) if model is None else \
        (model_folder(model, f"--model {model}"), None)
    # the model as its lines name it: as given, or the default by the name --model takes (not the install path)
    named = model if model is not None else BUNDLED_NAME if folder == bundled_dir() else str(folder)
    if engine == "onnxruntime":  # before the context checks, which would name --max-context
        _refuse_runtime_flags_for_onnxruntime(device, dtype, kernels, max_context)
        from klconvert.onnx import refuse_export_under_way   # (its telemetry off, as below)

        refuse_export_under_way(folder, named)   # not one of its files said missing, config.json first
    else:
        _refuse_triton_without_cuda(kernels, device)
    config = KimiLinearConfig.from_file(folder / CONFIG_FILE)
    limit, limit_name = config.model_max_length, config.model_max_length_name
    if max_context is not None and max_context > limit:
        raise _over_context_length("--max-context", max_context, config)
    budget = (max_context or limit) - max_new_tokens  # the most prompt tokens the context can hold
    if budget < 1:
        raise KLError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in "
                      + (f"--max-context {max_context}; raise --max-context or lower --max-new-tokens"
                         if max_context is not None and max_context < limit else
                         f"the model's {limit_name} of {counted(limit, 'token')}; lower --max-new-tokens"))
    tokenizer = Tokenizer.from_folder(folder)
    if prompt is not None and prompt_files:
        raise KLError("give the prompt as --prompt TEXT or --prompt-file FILE (- for standard input), not both")
    if prompt_files.count("-") > 1:
        raise KLError(f"--prompt-file - is given {prompt_files.count('-')} times, but standard input can be read "
                      "once; give it once (other prompts as files)")
    prompts = []
    for prompt_file in prompt_files or (None,):
        text = read_prompt(prompt, prompt_file, tokenizer, budget)
        ids = text.ids
        if chat and text.whole:   # the render held to what the context leaves the prompt
            try:
                ids = tokenizer.encode_chat([{"role": "user", "content": text.text}], budget)
            except ChatPastTokens as e:
                raise _context_error(text.where, e.max_tokens, True, max_new_tokens, max_context, config) from None
        if len(ids) > budget:
            raise _context_error(text.where, len(ids), not text.whole, max_new_tokens, max_context, config)
        prompts.append(array("i", ids))   # 4 bytes a token, not a list's ~40: many long prompts wait for the plan
    longest = max(len(ids) for ids in prompts)
    if engine == "onnxruntime":
        import klconvert.onnx  # noqa: F401 -- its telemetry off before require imports onnxruntime
        require("onnxruntime", "--engine onnxruntime")
        from klconvert.onnx.session import OnnxEngine

        runner = OnnxEngine(named)   # named as given in its messages
    else:
        from klconvert.runtime.engine import load  # torch loads only now: every refusal above runs without it

        runner = load(folder, device=device, dtype=dtype, max_context=max_context or longest + max_new_tokens,
                      batch=len(prompts), kernels=kernels, needed_context=longest + max_new_tokens)
        runner.check_fits(longest, max_new_tokens)
    if which is not None:
        click.echo(f"klconvert: {which}", err=True)
    streams = [StreamDecoder(tokenizer) for _ in prompts]
    hidden = runner.stop_ids if show_special else tokenizer.special_ids | runner.stop_ids   # what generate stops at
    texts = [[] for _ in prompts]

    def emit(sequence: int, token: int) -> None:  # one prompt streams; several are printed whole, in order
        if token not in hidden:
            texts[sequence].append(streams[sequence].push(token))
            if len(prompts) == 1:
                sys.stdout.write(texts[0].pop())
                sys.stdout.flush()

    if seed is None:  # drawn here, so that the summary can say which (--seed then repeats the run)
        seed = int.from_bytes(os.urandom(8), "little")
    runner.generate(prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, on_token=emit,
                    on_prefill=_prefill_bar(sum(len(ids) for ids in prompts), progress))   # at the model's stop ids
    # --max-new-tokens 0 only prefills: no continuation was asked for, and none is printed -- not an empty line a
    # script reads as one, nor a header over nothing for each prompt file (the summary says "0 new")
    for i, (parts, stream) in enumerate(zip(texts, streams) if max_new_tokens else ()):
        if len(prompts) > 1:
            sys.stdout.write(f"==> {prompt_files[i]} <==\n")
        sys.stdout.write("".join(parts) + stream.flush() + "\n")
    summary = _run_summary(runner.stats, seed if temperature > 0 else None)
    if engine == "onnxruntime":
        click.echo(f"{summary} | onnxruntime: cpu float32, batch {len(prompts)}", err=True)
        return
    plan = runner.plan
    click.echo(f"{summary} | plan: {runner.device} {str(runner.dtype).split('.')[-1]} "
               f"{'triton' if runner.triton else 'torch'}, "
               f"context {plan.context:,}, batch {plan.batch}, total {binary_size_text(plan.total)}", err=True)


def _run_summary(stats, seed: int | None) -> str:
    """The start of `run`'s summary line from its GenerationStats: the prompt's tokens, the prefill's and decode's
    rates, the new tokens, and the `seed` a sampled run drew (None: greedy, no seed said). Counts with ','; the seed in
    plain digits, as --seed takes it back."""
    decode = f"decode {stats.decode_tps:.1f} tokens/s" if stats.timed_steps else "no decode step"   # not a rate of 0
    return (f"prompt {counted(stats.prompt_tokens, 'token')} | prefill {stats.prefill_tps:.1f} tokens/s | "
            f"{stats.new_tokens:,} new, {decode}" + (f" | seed {seed}" if seed is not None else ""))


def _given(ctx: click.Context, name: str) -> bool:
    """Whether the command line gave the parameter `name`, not its default."""
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)


def _refuse_sampling_flags_when_greedy(ctx: click.Context, temperature: float) -> None:
    """--top-p and --seed shape sampling: given without --temperature (greedy, the default) they would do nothing,
    and the user most likely meant to sample. An explicit --temperature 0 takes them (a sweep over temperatures that
    passes the same flags each time)."""
    if temperature > 0 or _given(ctx, "temperature"):
        return
    given = [flag for flag, name in (("--top-p", "top_p"), ("--seed", "seed")) if _given(ctx, name)]
    if given:
        raise KLError(f"{' and '.join(given)} given with the default --temperature 0, which decodes greedily: --top-p "
                      f"and --seed take effect only with --temperature > 0; add --temperature T above 0 to sample, "
                      f"or drop {' and '.join(given)}")


def _refuse_runtime_flags_for_onnxruntime(device: str | None, dtype: str | None, kernels: str,
                                          max_context: int | None) -> None:
    """The flags of klconvert's runtime that --engine onnxruntime cannot honour (it runs the exported fp32 graph on
    the CPU, its cache growing with the sequence)."""
    given = [flag for flag, bad in ((f"--device {device}", device is not None and device_name(device)[0] == "cuda"),
                                    ("--dtype bfloat16", dtype == "bfloat16"),
                                    (f"--kernels {kernels}", kernels == "triton"),
                                    ("--max-context", max_context is not None)) if bad]
    if given:
        raise KLError(f"{given[0]} is a flag of klconvert's runtime; --engine onnxruntime runs the exported fp32 "
                      "graph on the CPU -- drop it, or use --engine klconvert")


def _prefill_bar(total: int, progress: bool | None):
    """A tqdm bar on stderr counting prompt tokens in tokens/s -- always with --progress, never with --no-progress,
    else on a terminal once a prefill has run PREFILL_BAR_DELAY seconds -- closed as the last token goes in.
    Returns its update(n) for Engine.generate's on_prefill, or None (no bar, no per-segment sync)."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="prefill", unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
               delay=0 if progress else PREFILL_BAR_DELAY)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update


def _refuse_triton_without_cuda(kernels: str, device: str | None) -> None:
    """--kernels triton off CUDA, refused before the prompt is read (runtime.weights.refuse_triton_off_cuda, which
    load applies too)."""
    if kernels != "triton":
        return
    from klconvert.runtime.weights import refuse_triton_off_cuda

    refuse_triton_off_cuda(kernels, checked_device(device))


@cli.command(name="export-onnx", help="Write the checkpoint as an ONNX graph that onnxruntime runs (prefill and "
             "decode, state in and out).")
@click.option("--model", type=MODEL, default=None,
              help=f"Checkpoint folder (quantized int4/int8 weights stay packed), or {BUNDLED_NAME} for the bundled "
                   f"model [default: {DEFAULT_MODEL_DIR} when it exists, else {BUNDLED_NAME}].")
@click.option("--out", type=PathArg(path_type=Path), required=True,
              help="New folder for model.onnx, genai_config.json, config.json and the tokenizer files.")
@click.option("--opset", type=INTEGER, default=None,
              help="ONNX opset of the default domain [default: the oldest the export takes, 18].")
@click.option("--force", is_flag=True,
              help="Replace --out, once the new one is whole, where klconvert wrote it (its .klconvert-output.json "
                   "lists every file: an export, a synth or quantize output) or it holds an older klconvert's "
                   "export; never the --model folder, one holding it or one inside it.")
def export_onnx(model: str | None, out: Path, opset: int | None, force: bool) -> None:
    require("onnx", "export-onnx")
    from klconvert.onnx.export import DEFAULT_OPSET, export_onnx as export

    folder, which = default_model("exported", needs_tokenizer=False) if model is None else \
        (model_folder(model, f"--model {model}"), None)
    path = export(folder, out, opset=DEFAULT_OPSET if opset is None else opset, force=force)
    if which is not None:   # said once the export is done: a refused one is its error line alone
        click.echo(f"klconvert: {which}", err=True)
    click.echo(f"wrote {path} (run it: {shell_command('klconvert', 'run', '--model', out, '--engine', 'onnxruntime')})",
               err=True)
    echo_complete(out)


@cli.command(help="Print the memory plan: weights, KDA state, MLA cache, workspace, headroom, largest context."
             "\n\nExits with status 3 when the plan does not fit the GPU memory given (--gpu-memory, or a recipe's).")
@click.option("--model", type=MODEL, default=None,
              help=f"Checkpoint folder to plan for, or {BUNDLED_NAME} (the bundled model); without --recipe, its "
                   "recipe.yaml's runtime section sets the defaults of the flags below.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Plan for a preset instead of a folder.")
@click.option("--layers", type=LAYERS, default=None, help="With --preset: keep only N layers.")
@click.option("--recipe", type=PathArg(path_type=Path), default=None,
              help=f"A recipe YAML, or a shipped one by name ({', '.join(shipped_names())}): its quantization sizes "
                   "the weights, its runtime section sets the defaults of the flags below (in place of a --model "
                   "folder's recipe.yaml).")
@click.option("--gpu-memory", default=None,
              help=f"Device memory to fit, e.g. {GPU_MEMORY_EXAMPLES} [default: the recipe's, else no fit check].")
@click.option("--max-context", type=IntegerRange(min=1), default=None,
              help="Planned context [default: the recipe's, else 131072].")
@click.option("--batch", type=IntegerRange(min=1), default=None,
              help="Planned batch [default: the recipe's, else 1].")
@click.option("--mla-cache-dtype", type=MLA_CACHE_DTYPE, default=None,
              help="MLA latent cache dtype [default: the recipe's, else bfloat16].")
@click.option("--kda-state-dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="KDA recurrent state dtype [default: the recipe's, else float32]; the runtime keeps it in "
                   "float32, so bfloat16 sizes only what it would save.")
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default=None,
              help="Without --recipe: weight bits of the quantized layers, lm_head at 8 (at 16: nothing quantized) "
                   "[default: a folder as stored, a preset at 16].")
@click.option("--group-size", type=INTEGER, default=None,
              help="With --bits 4 or 8: input columns per scale, e.g. 32, 64, 128; -1: one scale per row "
                   "[default: 128].")
def plan(model: str | None, preset: str | None, layers: int | None, recipe: Path | None, gpu_memory: str | None,
         max_context: int | None, batch: int | None, mla_cache_dtype: str | None, kda_state_dtype: str | None,
         bits: str | None, group_size: int | None) -> None:
    _stdout_for_people()
    if (model is None) == (preset is None):
        raise KLError("give exactly one of --model DIR or --preset NAME")
    _refuse_layers_with_model(model, layers)
    folder = None if model is None else model_folder(model, f"--model {model}")
    if folder is not None:   # its config.json read and checked before the planner imports torch (~2 s of CPU): a
        # folder that holds no model is refused as `run` refuses it, in a fifth of a second (plan_for reads it again)
        KimiLinearConfig.from_file(folder / CONFIG_FILE)
    # so are --gpu-memory, the weight flags and a --recipe, in plan_for's order (it checks them again and takes the
    # recipe read): a mistyped size or recipe name is refused in a fifth of a second too
    from klconvert.plan_inputs import check_weight_flags, model_config
    from klconvert.sizes import gpu_memory_bytes

    memory_limit = gpu_memory_bytes(gpu_memory) if gpu_memory is not None else None
    check_weight_flags(recipe, None if bits is None else int(bits), group_size)
    read_recipe = None
    if recipe is not None:   # plan_for reads it once the model's config and size have passed
        from klconvert.checkpoint.size_bounds import check_model_size
        from klconvert.quant.recipe import load_recipe

        check_model_size(*model_config(folder, preset, layers))
        read_recipe = load_recipe(recipe)
    from klconvert.quant.scheme import GROUP_SIZE
    from klconvert.runtime.plan_report import plan_for, render_plan

    same = dict(model=folder, preset=preset, layers=layers, batch=batch, context=max_context, memory_limit=memory_limit,
                mla_cache_dtype=mla_cache_dtype, kda_state_dtype=kda_state_dtype)
    p = plan_for(recipe=read_recipe, bits=None if bits is None else int(bits), group_size=group_size, **same)
    # a preset is said as one: `--preset tiny` (random weights, presets.TINY) is not `--model tiny` (the bundled model),
    # nor a preset cut to fewer layers the whole one
    title = model if model is not None else f"preset {preset}" + (f", {counted(layers, 'layer')}" if layers else "")
    click.echo(render_plan(p, title=title + (f" with {recipe}" if recipe else "")))
    if p.memory_limit is not None and p.headroom < 0:
        fit = p.largest_context()
        if fit:
            advice = f"plan for a context of {fit:,} or fewer"
        elif p.weights > p.memory_limit and plan_for(bits=4, **same).weights < p.memory_limit:
            advice = (f"the weights alone do not fit: plan with fewer bits (--bits 4 with groups of {GROUP_SIZE}, "
                      "which the kernels keep packed) or a smaller recipe, or for a larger GPU")
        elif p.weights > p.memory_limit:
            advice = (f"the weights alone do not fit, even at 4 bits with groups of {GROUP_SIZE}: plan for a larger "
                      "GPU")
        elif p.batch > 1:   # the weights fit; the batch's state and decode workspace do not, at any context
            advice = (f"the weights ({binary_size_text(p.weights)}) fit, but a batch of {p.batch:,} sequences' state "
                      "and workspace do not at any context: plan a smaller --batch")
        else:   # nor one sequence's, and no batch is smaller
            advice = (f"the weights ({binary_size_text(p.weights)}) fit, but one sequence's state and workspace do not "
                      "at any context: plan for a larger GPU")
        # a byte short in bytes: "needs 75.9 MiB but the GPU memory is 75.9 MiB" read as fitting
        needs, has = size_texts(p.total, p.memory_limit, text=binary_size_text)
        raise PlanDoesNotFit(f"the plan needs {needs} but the GPU memory is {has}; {advice}")


def _refuse_layers_with_model(model: str | None, layers: int | None) -> None:
    if model is not None and layers is not None:
        raise KLError("--layers cuts a --preset; a --model folder's config.json sets its layers -- drop --layers")


def _shard_bytes(max_shard_size: str | None) -> int | None:
    """--max-shard-size as bytes (None: the default), held to the quantizer's minimum (shard_limit)."""
    if max_shard_size is None:
        return None
    from klconvert.quantize_options import shard_limit
    from klconvert.sizes import parse_size

    return shard_limit(parse_size(max_shard_size, "--max-shard-size", least_bare_bytes=0,
                                  examples=SHARD_SIZE_EXAMPLES), max_shard_size)


def _refuse_quantize_options(max_shard_size: str | None, bits: int | None, group_size: int | None,
                             symmetric: bool | None, scheme: str | None, observer: str | None, recipe: Path | None,
                             force: bool, allow_split_fused: bool) -> tuple[int | None, Recipe | None]:
    """--max-shard-size as bytes (_shard_bytes) and the --recipe read (None without one), which the quantizer is
    given in place of its path (it checks it again, but reads no file that may have changed since); first, a KLError
    for the options of quantize and pull-and-quantize that need no model, in the order the quantizer refuses them:
    the shard size, the switches, the policy's flags and --recipe. Before the quantizer imports torch (~2 s of CPU),
    so a mistyped flag or recipe name is refused in a fifth of a second; torch comes only with --scheme nf4
    (bitsandbytes) and a recipe's runtime: section (checked as the planner reads it), after what is refused without
    it."""
    from klconvert.quantize_options import choose_policy, refuse_bad_switches

    max_shard_bytes = _shard_bytes(max_shard_size)
    refuse_bad_switches(force, True, allow_split_fused, recipe)   # True: progress, which the command line never sets
    return max_shard_bytes, choose_policy(bits, group_size, symmetric, scheme, recipe, observer)[1]


def _quantize_options(command):
    """The flags `quantize` and `pull-and-quantize` share, in the order --help lists them."""
    options = [
        click.option("--bits", type=INTEGER, default=None,
                     help="Bits of the quantized layers: 4 or 8 [default: 4]; lm_head stays at 8, or as stored "
                          "(bf16 in the release) with --scheme nf4."),
        click.option("--group-size", type=INTEGER, default=None,
                     help="Input columns per scale, e.g. 32, 64, 128; -1: one scale per row [default: 128]."),
        click.option("--sym/--asym", "symmetric", default=None,
                     help="Symmetric scales, or asymmetric with zero points [default: --sym]."),
        click.option("--scheme", type=click.Choice(["int", "nf4"]), default=None,
                     help="int: compressed-tensors pack-quantized [default], the one vLLM and transformers load; "
                          "nf4: bitsandbytes 4-bit, which vLLM cannot load, nor transformers unless a recipe keeps "
                          "the routed experts unquantized."),
        click.option("--observer", type=click.Choice(["minmax", "mse"]), default=None,
                     help="How each int group's range is chosen: minmax [default], or mse (llm-compressor's MSE "
                          "observer: shrunk to the least round-trip error; up to 20 trials a weight)."),
        click.option("--recipe", type=PathArg(path_type=Path), default=None,
                     help="llm-compressor-shaped recipe YAML saying how each tensor is stored (instead of the "
                          f"five flags above), or a shipped one by name ({', '.join(shipped_names())})."),
        click.option("--device", type=DEVICE, default=None,
                     help="Where to quantize; cuda:N picks the N-th GPU [default: cuda if present]."),
        click.option("--max-shard-size", default=None,
                     help=f"Largest output shard, e.g. {SHARD_SIZE_EXAMPLES} [default: 5GB]; a rerun after a kill "
                          "redoes only the unfinished shard, so smaller shards lose less."),
        click.option("--force", is_flag=True,
                     help="Replace an existing output folder that klconvert wrote (or an empty one), only once "
                          "the new one is whole, and discard an interrupted run made with other options."),
        click.option("--allow-split-fused", is_flag=True,
                     help="Accept a recipe that stores parts of a module vLLM fuses (e.g. in_proj_qkvgfab) "
                          "differently; the folder then loads in klconvert and transformers, not in vLLM."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command(help="Quantize the checkpoint in SRC (a folder, or tiny for the bundled model) into a new folder OUT "
             "in compressed-tensors' format (bitsandbytes' with --scheme nf4); resumes if interrupted.")
@click.argument("src", type=MODEL)
@click.argument("out", type=PathArg(path_type=Path))
@_quantize_options
def quantize(src: str, out: Path, bits: int | None, group_size: int | None, symmetric: bool | None,
             scheme: str | None, observer: str | None, recipe: Path | None, device: str | None,
             max_shard_size: str | None, force: bool, allow_split_fused: bool) -> None:
    folder = model_folder(src, f"SRC {src}")   # before torch's import: "no such folder" in a fifth of a second
    max_shard_bytes, recipe_read = _refuse_quantize_options(max_shard_size, bits, group_size, symmetric, scheme,
                                                            observer, recipe, force, allow_split_fused)
    # SRC's config.json is read by the quantizer once its options and OUT have passed (OUT refused before SRC is read)
    from klconvert.quantize import quantize as quantize_checkpoint

    result = quantize_checkpoint(folder, out, bits=bits, group_size=group_size,
                                 symmetric=symmetric, scheme=scheme, observer=observer,
                                 recipe=recipe_read, device=device, force=force, allow_split_fused=allow_split_fused,
                                 max_shard_bytes=max_shard_bytes)
    click.echo(result.summary(), err=True)
    echo_complete(result.path)


@cli.command(name="pull-and-quantize",
             help="Pull a Kimi Linear repo (or take a local folder) and quantize it in one go.")
@click.option("--model", type=REPO_OR_MODEL, default=DEFAULT_REPO, show_default=True,
              help=f"Hub repo to pull, a local checkpoint folder (used as it is), or {BUNDLED_NAME} (the bundled "
                   "model).")
@click.option("--revision", default=None, help="Branch, tag or commit of the hub repo [default: main].")
@click.option("--out", type=PathArg(path_type=Path), default=None,
              help="Folder to create [default: ./<model-name>-w4a16, -w8a16 or -nf4].")
@_quantize_options
def pull_and_quantize(model: str, revision: str | None, out: Path | None, bits: int | None, group_size: int | None,
                      symmetric: bool | None, scheme: str | None, observer: str | None, recipe: Path | None,
                      device: str | None, max_shard_size: str | None, force: bool, allow_split_fused: bool) -> None:
    is_local_model(model)   # before torch's import: a folder that is not there refused in a fifth of a second
    max_shard_bytes, recipe_read = _refuse_quantize_options(max_shard_size, bits, group_size, symmetric, scheme,
                                                            observer, recipe, force, allow_split_fused)
    from klconvert.quantize import pull_and_quantize as pull_and_quantize_checkpoint

    result = pull_and_quantize_checkpoint(model, out, revision=revision, bits=bits, group_size=group_size,
                                          symmetric=symmetric, scheme=scheme, observer=observer, recipe=recipe_read,
                                          device=device,
                                          force=force, allow_split_fused=allow_split_fused,
                                          max_shard_bytes=max_shard_bytes)
    click.echo(result.summary(), err=True)
    echo_complete(result.path)


@cli.command(name="eval", help="Perplexity of both, KL of the model from the reference, top-1 and router agreement.")
@click.option("--model", type=MODEL, required=True, help="The model to measure (e.g. quantized): a folder, or tiny.")
@click.option("--reference", type=MODEL, required=True,
              help="The model it should match (e.g. its bf16 source; tiny for the bundled model); its tokenizer "
                   "reads the text.")
@click.option("--text-file", type=TEXT_FILE, required=True,
              help="UTF-8 text to run both models on (- reads standard input).")
@click.option("--max-tokens", type=IntegerRange(min=2), default=2048, show_default=True,
              help="Cut the tokenized text to this many tokens (only that much of the file is read).")
@click.option("--device", type=DEVICE, default=None,
              help="Where to run; cuda:N picks the N-th GPU [default: cuda if present].")
@click.option("--dtype", type=DTYPE, default=None,
              help="Compute dtype [default: bfloat16 on cuda, float32 on cpu].")
def eval_(model: str, reference: str, text_file: str, max_tokens: int, device: str | None,
          dtype: str | None) -> None:
    _stdout_for_people()
    from klconvert.evaluate import MIN_SCORED_TOKENS, evaluate, render_eval
    from klconvert.text_input import read_text_file
    from klconvert.tokenizer import Tokenizer

    # the reference's folder first, for its config and tokenizer, which read the text; evaluate checks --model
    reference_dir = model_folder(reference, f"--reference {reference}")
    config = KimiLinearConfig.from_file(reference_dir / CONFIG_FILE, "--reference")
    if max_tokens > config.model_max_length:
        raise _over_context_length("--max-tokens", max_tokens, config)
    text = read_text_file(text_file, "--text-file", Tokenizer.from_folder(reference_dir), max_tokens,
                          MIN_SCORED_TOKENS)
    result = evaluate(model, reference, text, max_tokens=max_tokens, device=device, dtype=dtype)
    click.echo(render_eval(result, model, reference))   # as the user named them: `tiny`, not the install path


def _int_list(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    items = value.split(",")   # an empty item is refused: "1,,2" is a typo, not batches 1 and 2
    longest = max(digit_count(item) for item in items)
    if longest > MAX_INTEGER_DIGITS:   # no line echoes it whole
        raise click.BadParameter(f"{shown(value)}: a number of {longest:,} digits is longer than any this option "
                                 "takes; give smaller ones")
    try:
        if not all(PLAIN_INTEGER.fullmatch(item) for item in items):
            raise ValueError
        out = [int(item) for item in items]   # ValueError past Python's 4,300 digits
    except ValueError:
        raise click.BadParameter(f"{value[:80]!r}: give comma-separated whole numbers in the digits 0-9, e.g. "
                                 "4096,131072") from None
    if min(out) < 1:
        raise click.BadParameter(f"{value[:80]!r}: give comma-separated numbers of at least 1")
    return out


@cli.command(cls=BenchCommand,
             help="Decode speed on the GPU: checked first, then ms/token, tokens/s, memory and the bandwidth floor; "
             "with --prefill, prefill time and tokens/s, peak memory reserved against the plan.")
@click.option("--model", type=MODEL, default=None,
              help=f"A checkpoint folder to time, or {BUNDLED_NAME} (its weights; caches filled with random "
                   "values).")
@click.option("--preset", type=click.Choice(["kimi-linear-48b"]), default=None,
              help="Time the released shapes with random quantized weights made on the GPU.")
@click.option("--layers", type=LAYERS, default=None, help="With --preset: keep only N layers.")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="With --preset: bits of the quantized layers (default policy, lm_head int8, group 128).")
@click.option("--context", "contexts", default=None, callback=_int_list,
              help=f"Comma-separated contexts to decode at (cache rows already filled) [default: "
                   f"{DECODE_CONTEXT}, none with --prefill].")
@click.option("--prefill", "prefills", default=None, callback=_int_list,
              help="Comma-separated prompt lengths to time the prefill of (batch 1, random tokens), e.g. "
                   "131072,1048576; checked first against prefill + one decode step (calm weights) unless "
                   "--no-check.")
@click.option("--batch", "batches", default="1", show_default=True, callback=_int_list,
              help="Comma-separated batch sizes.")
@click.option("--mla-cache-dtype", type=MLA_CACHE_DTYPE, default="bfloat16",
              show_default=True,
              help="The latent cache's dtype (float8_e4m3fn: one byte a value, an fp32 scale a row).")
@click.option("--new-tokens", type=IntegerRange(min=16), default=128, show_default=True,
              help="Decode steps timed per configuration.")
@click.option("--check/--no-check", "check_depth", default=True, show_default=True,
              help="Before timing: the Triton path against the PyTorch bf16 path at this depth, and with --prefill "
                   "a prefill against prefill + one decode step (calm weights with a preset); --no-check skips "
                   "both. The graph-vs-eager check always runs.")
@click.option("--peer", type=click.Choice(["none", "transformers"]), default="none", show_default=True,
              help="Also time transformers' KimiLinearForCausalLM in this call (bf16, the release's shapes at "
                   "--peer-layers layers, batch 1, whatever --model or --preset times).")
@click.option("--peer-layers", type=IntegerRange(1, PEER_MAX_LAYERS), default=None,
              help=f"With --peer transformers: layers of the peer's model (all {PEER_MAX_LAYERS} in bf16 need 98 GB) "
                   f"[default: {PEER_LAYERS}].")
@click.option("--spread-routing", is_flag=True,
              help="Route each sequence to its own random experts (~100 distinct per layer at batch 16, as real text "
                   "spreads) instead of the weights' router; random weights route a whole batch alike.")
@click.option("--json", "json_file", type=PathArg(allow_dash=True), default=None,   # ./- kept as typed: a file
              help="Write the results here.")
def bench(model: str | None, preset: str | None, layers: int | None, bits: str, contexts: list[int] | None,
          prefills: list[int] | None, batches: list[int], mla_cache_dtype: str, new_tokens: int, check_depth: bool,
          peer: str, peer_layers: int | None, spread_routing: bool, json_file: str | None) -> None:
    if (model is None) == (preset is None):
        raise KLError("give exactly one of --model DIR or --preset kimi-linear-48b")
    _refuse_layers_with_model(model, layers)
    if peer_layers is not None and peer != "transformers":
        raise KLError(f"--peer-layers {peer_layers} sizes the peer's model, and no peer is timed; add --peer "
                      "transformers, or drop --peer-layers")
    _refuse_what_bench_would_ignore(click.get_current_context(), model, bits, contexts, prefills, batches, new_tokens,
                                    spread_routing, peer)
    import json
    from contextlib import nullcontext

    from klconvert import bench as B
    from klconvert.atomic_file import write_atomically
    from klconvert.convert.output_folder import parent_made
    from klconvert.presets import preset_config

    if peer == "transformers":
        B.transformers_peer()
        asked = f"--peer-layers {peer_layers}" if peer_layers else f"--peer transformers ({PEER_LAYERS} layers)"
        B.refuse_a_peer_that_does_not_fit(lambda n: preset_config(PEER_PRESET, n), peer_layers or PEER_LAYERS, asked,
                                          new_tokens)
    if json_file == "-":   # standard input or output wherever else a path takes it: a file named - was written
        raise KLError("--json -: bench writes its results whole to a file, not to standard output; give a file name, "
                      "e.g. bench.json")
    json_file = None if json_file is None else Path(json_file)
    if json_file is not None and json_file.is_dir():
        raise KLError(f"--json {json_file}: is a folder; give a file name, e.g. {json_file / 'bench.json'}")
    if json_file is not None:
        _refuse_what_the_results_would_replace(json_file)
        if model is not None:
            _refuse_a_file_of_the_model(json_file, model_folder(model, f"--model {model}"))
    # its folder made now, not after minutes of timing, and removed again if the bench fails (no GPU, say)
    with parent_made(json_file) if json_file is not None else nullcontext():
        if preset is not None:
            config = KimiLinearConfig.from_dict(preset_config(preset, layers))
            weights = B.random_quantized_weights(config, int(bits), "cuda")
            calm = B.random_quantized_weights(config, int(bits), "cuda", calm=True) if check_depth else None
            label = B.preset_label(int(bits))
        else:
            from klconvert.checkpoint.quantized import QuantizedSource
            from klconvert.checkpoint.reader import Checkpoint

            ckpt = Checkpoint(model_folder(model, f"--model {model}"))
            config = ckpt.config
            weights = B.Weights(ckpt.get, ckpt.packed,
                                {n: s.scheme for n, s in ckpt.sources.items() if isinstance(s, QuantizedSource)})
            calm, label = (weights if check_depth else None), str(model)
        for flag, asked in (("--prefill", prefills), ("--context", contexts)):
            if max(asked or [0]) > config.model_max_length:
                raise _over_context_length(flag, max(asked), config)
        B.check_new_tokens(config, new_tokens)   # bench() checks it too; here with the other flags
        if contexts is None:
            contexts = [] if prefills else [DECODE_CONTEXT]
        try:
            result = B.bench(config, weights, bits=label, contexts=contexts, batches=batches,
                             mla_cache_dtype=mla_cache_dtype, new_tokens=new_tokens, calm_weights=calm,
                             report=lambda line: click.echo(line, err=True), spread=spread_routing,
                             prefills=prefills or [])
        except RuntimeError as e:   # torch.OutOfMemoryError outside an engine (filling its caches, say)
            # said as in an engine, where fewer bits of these weights would hold less (invoke words it for bench)
            exhausted = device_exhausted(e, (), fewer_bits=fewer_bits_hold_less(weights.schemes))
            if exhausted is None:
                raise
            raise exhausted from None
        if peer == "transformers":
            weights = calm = None   # the bench's, freed for the peer (refuse_a_peer_that_does_not_fit)
            result.peer = B.time_transformers(preset_config(PEER_PRESET, peer_layers or PEER_LAYERS),
                                              new_tokens=new_tokens,
                                              report=lambda line: click.echo(line, err=True))
        if json_file is not None:
            try:   # whole or not at all: a full disk leaves the earlier file as it was, not a truncated one
                write_atomically(json_file, json.dumps(result.as_dict(), indent=1).encode())
            except OSError as e:
                raise KLError(f"--json {json_file}: cannot write it ({e.strerror}); the figures are in the lines "
                              "above") from None


def _refuse_a_file_of_the_model(json_file: Path, folder: Path) -> None:
    """A --json that names a file of the --model folder being timed (its config.json, a shard) was replaced by the
    results, and the model no longer loaded: refused before the bench."""
    target = Path(os.path.realpath(json_file))
    if target.exists() and target.is_relative_to(os.path.realpath(folder)):
        raise KLError(f"--json {json_file}: is a file of the model folder {folder}, which the results would replace; "
                      "give a name outside it")


def _refuse_what_bench_would_ignore(ctx: click.Context, model: str | None, bits: str, contexts: list[int] | None,
                                    prefills: list[int] | None, batches: list[int], new_tokens: int,
                                    spread_routing: bool, peer: str) -> None:
    """bench's flags that what it times would not use, refused as --layers with --model is: --bits beside a --model
    folder, and beside --prefill alone (no decode rows) the decode rows' --batch, --new-tokens (unless the peer
    decodes them) and --spread-routing."""
    if model is not None and _given(ctx, "bits"):
        raise KLError(f"--bits {bits} sets the bits of a --preset's random weights; a --model folder is timed as it "
                      "is stored -- drop --bits")
    if contexts is not None or not prefills:
        return
    unused = [flag for flag, given in ((f"--batch {','.join(map(str, batches))}", _given(ctx, "batches")),
                                       (f"--new-tokens {new_tokens}", _given(ctx, "new_tokens") and peer == "none"),
                                       ("--spread-routing", spread_routing)) if given]
    if unused:
        names = " and ".join(flag.split()[0] for flag in unused)
        raise KLError(f"{' and '.join(unused)} {'shapes' if len(unused) == 1 else 'shape'} the decode rows, and "
                      "--prefill without --context times none (each prompt is prefilled alone, at batch 1); add "
                      f"--context N to time decode rows too, or drop {names}")


def _refuse_what_the_results_would_replace(json_file: Path) -> None:
    """bench writes --json whole, a new file renamed over the name (write_atomically): a link there (/dev/stdout is
    one) or a FIFO, device or socket would be replaced by that file, not written into -- refused before the bench."""
    try:
        mode = os.lstat(json_file).st_mode
    except (FileNotFoundError, NotADirectoryError):   # a new name (PathArg refused one that cannot be looked at)
        return
    if stat.S_ISLNK(mode):
        raise KLError(f"--json {json_file}: is a link (to {os.readlink(json_file)}), which the results would replace, "
                      "not write through; give the file's own name or a new one")
    if not stat.S_ISREG(mode):
        raise KLError(f"--json {json_file}: is {kind_of(mode)}, not a file; give the name of a file to write (a new "
                      "one, or one to replace)")


ALLOCATOR_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")  # the user's wins


def _stdout_for_people() -> None:
    """Standard output as a command whose output people read (run's text, plan's and eval's reports) writes it: a
    character its encoding cannot hold (PYTHONIOENCODING=latin-1, a model folder's name) shows as ?, where a path that
    scripts read is refused whole (klconvert.entry's StdoutFailed) -- eval's report lost after both models ran."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")


def expandable_segments() -> None:
    """Unless the user configured torch's allocator, let it grow one virtually contiguous segment per stream
    instead of caching fixed-size segments: a 128K-token prefill on an H200 (27 layers, 2026-11-30) then held 0.6
    GiB over its live peak instead of 1.6, and a 4K decode 26.1 GiB instead of 28.0 against a 25.2 GiB plan, at the
    same speed. torch reads this at its first CUDA allocation, so it is set before any command runs."""
    if not any(name in os.environ for name in ALLOCATOR_ENV):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def main() -> None:
    """The CLI: expected errors end in one line on stderr (see OneLineErrors). The console command enters through
    klconvert.entry, which takes over Ctrl-C and the standard streams first."""
    expandable_segments()
    cli.main(prog_name="klconvert")
