"""What the scripts here share at their edges: numeric arguments held to their range by argparse (one usage line,
exit 2, where a 0 or a negative ended in a traceback or a silently wrong run), and a --model that must be a bf16
folder checked as one. Their output folders are written whole or not at all by klconvert.whole_folder (an existing OUT
refused before any work; an empty folder is taken: the GPU machine's $OUT is one); each runs under klconvert's entry
point (run_tool), and a library klconvert does not install is named before it is needed (refuse_missing).

Each script imports this module first, before torch: run as a program, it takes over Ctrl-C and SIGTERM as it is
imported (klconvert.entry.take_over_early), so that one during the script's imports ends in the same one line."""
from __future__ import annotations

import sys
from pathlib import Path

from klconvert.entry import main as klconvert_entry, take_over_early

TOOLS = Path(__file__).resolve().parent


def _a_script_here_runs() -> bool:
    """Whether the program running is a script of this folder (`python tools/NAME.py`), not a test or a caller that
    imports one, whose own signal handling stays theirs."""
    program = getattr(sys.modules.get("__main__"), "__file__", None)
    return program is not None and Path(program).resolve().parent == TOOLS


if _a_script_here_runs():
    take_over_early()

import argparse  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from importlib.util import find_spec  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from klconvert.errors import KLError  # noqa: E402

if TYPE_CHECKING:   # the checkpoint reader imports torch (~1.6 s of CPU): a script that reads no checkpoint
    # (plot_loss.py, make_corpus.py) answers --help and refuses its arguments without it
    from klconvert.checkpoint.reader import Checkpoint

# A --seed's largest: synth's per-tensor streams (tensor_generator, train_bundled's initial values) seed torch with
# seed * 1,000,003 + a crc32, which must fit the 64 bits torch.Generator.manual_seed takes; `klconvert synth --seed`
# takes the same range
MAX_SEED = 2**32 - 1


def positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def seed_number(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else None
    if value is None or value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to {MAX_SEED:,}")
    return value


def _finite(text: str, zero_too: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 <= value if zero_too else 0 < value) or value == float("inf") or value != value:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_float(text: str) -> float:
    return _finite(text, False, "a positive finite number")


def nonnegative_float(text: str) -> float:
    return _finite(text, True, "a finite number >= 0")


# what a tool that reads the shards by the release's names asks for as --model
RELEASE_FORMAT = "a bf16 folder in the release's format (the bundled one, or a `klconvert pull` download)"


def bf16_checkpoint(model: Path) -> Checkpoint:
    """`model` opened as klconvert checks any download (shard names, sizes, the tensors the config implies); KLError
    where it is quantized: a tool that reads the release's tensors by name found none of the packed weights'
    (rotate_bundled.py died with KeyError 'lm_head.weight'), and a calibration would start from rounded weights."""
    from klconvert.checkpoint.reader import open_checkpoint

    checkpoint = open_checkpoint(model)
    if checkpoint.quant_method:
        raise KLError(f"{model}: holds {checkpoint.quant_method}-quantized weights; this tool reads {RELEASE_FORMAT}: "
                      "give that as --model")
    return checkpoint


def refuse_other_layout(checkpoint: Checkpoint, reads: Iterable[str]) -> None:
    """KLError where `checkpoint` stores one of `reads`, tensors a tool reads from its shards by their released names,
    under another layout's name (`klconvert synth --layout transformers`'s: rotate_bundled.py died with KeyError
    'model.layers.0.self_attn.f_a_proj.weight'). Not asked by the calibration tools: they load the folder through
    transformers, whose port reads both layouts."""
    stored = {name for header in checkpoint.headers.values() for name in header.tensors}
    renamed = next((name for name in reads if name not in stored), None)
    if renamed is not None:
        raise KLError(f"{checkpoint.folder}: holds {renamed!r} under another layout's name (as `klconvert synth "
                      f"--layout transformers` writes); this tool reads {RELEASE_FORMAT}: give that as --model")


def run_tool(main: Callable[[], None]) -> None:
    """A script's `main` run as the `klconvert` command runs (klconvert.entry): Ctrl-C or SIGTERM ends it in one line
    and status 130 or 143, its output folder cleaned up (each printed a KeyboardInterrupt traceback, and a SIGTERM
    left OUT.partial.lock and its hidden temporary behind)."""
    klconvert_entry(main)


def refuse_missing(modules: Iterable[str], install: str) -> None:
    """KLError naming the first of `modules` that cannot be imported (looked up, not imported) and how to `install`
    it: the libraries a tool needs that klconvert does not install (each was a ModuleNotFoundError traceback)."""
    missing = next((name for name in modules if find_spec(name) is None), None)
    if missing is not None:
        raise KLError(f"needs the module {missing!r}, which klconvert does not install; {install}")
