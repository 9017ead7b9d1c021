"""Plot a training run's loss.json (tools/train_bundled.py) to a PNG: train and validation loss by step.

    python tools/plot_loss.py OUT/loss.json [--png OUT/loss.png]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tool_output import run_tool

from klconvert.checkpoint.regular_file import read_bounded
from klconvert.errors import KLError, shown, unreadable_reason
from klconvert.script_summary import script_summary

# what the plot reads of tools/train_bundled.py's loss.json
PLOTTED = ("step", "train_loss", "validation_step", "validation_loss", "kept_step", "kept_validation_loss",
           "tokens_per_step", "parameters", "train_seconds", "device")
PLOTTED_LINES = (("step", "train_loss"), ("validation_step", "validation_loss"))   # x and y of each line
PLOTTED_NUMBERS = ("kept_step", "kept_validation_loss", "tokens_per_step", "parameters", "train_seconds")
GIVE = "give the loss.json tools/train_bundled.py wrote"
# past this it is no loss.json of tools/train_bundled.py's (some 100 bytes an evaluation): read no further -- /dev/zero
# never ends
MAX_LOSS_LOG_BYTES = 16 << 20


def read_loss_log(loss_json: Path) -> dict:
    """A training run's loss.json, read (piped in too: /dev/stdin); KLError where it cannot be read, is past
    MAX_LOSS_LOG_BYTES, is not JSON, or lacks what the plot reads."""
    try:
        log = json.loads(read_bounded(Path(loss_json), MAX_LOSS_LOG_BYTES, "loss.json", GIVE, pipes=True))
    except (OSError, ValueError, RecursionError) as e:   # a missing file, not a regular one, not JSON, not UTF-8 text
        raise KLError(f"{loss_json}: cannot read it as JSON ({unreadable_reason(e)}); {GIVE}") from None
    missing = [key for key in PLOTTED if key not in log] if isinstance(log, dict) else list(PLOTTED)
    if missing:
        raise KLError(f"{loss_json}: not a training run's loss log (it has no {', '.join(map(repr, missing[:3]))}"
                      f"{' ...' if len(missing) > 3 else ''}); {GIVE}")
    for x, y in PLOTTED_LINES:   # matplotlib's ValueError for lines of two lengths, a format's for a string
        if not (isinstance(log[x], list) and isinstance(log[y], list) and len(log[x]) == len(log[y])
                and all(map(_finite, log[x] + log[y]))):
            raise KLError(f"{loss_json}: its {x!r} and {y!r} are not two lists of numbers of one length; {GIVE}")
    wrong = [key for key in PLOTTED_NUMBERS if not _finite(log[key])]
    if wrong:
        raise KLError(f"{loss_json}: its {wrong[0]!r} is {shown(log[wrong[0]])}, not a number the plot can draw; "
                      f"{GIVE}")
    return log


def _finite(value) -> bool:
    """A number the plot can take as a float: no bool, NaN or infinity, nor an integer past float's range
    (math.isfinite's OverflowError for 10**400)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def plot_loss(loss_json: Path, png: Path) -> None:
    log = read_loss_log(loss_json)   # before matplotlib: a wrong file is said whether or not it is installed
    import matplotlib  # in no extra: the README's plot is made once, by whoever retrains the model
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(log["step"], log["train_loss"], label="train (mean since the last point)")
    ax.plot(log["validation_step"], log["validation_loss"], marker="o", markersize=3,
            label="validation (held-out play, never trained on)")
    kept = log["kept_step"]
    if kept in log["validation_step"]:
        ax.axvline(kept, color="grey", linestyle=":", linewidth=1)
        ppl = math.exp(min(log["kept_validation_loss"], math.log(sys.float_info.max)))   # past it: inf, not overflow
        ax.annotate(f"kept: step {kept}, ppl {ppl:.1f}",
                    (kept, log["kept_validation_loss"]), textcoords="offset points", xytext=(-10, 18), ha="right")
    ax.set_xlabel(f"step ({log['tokens_per_step']:,} tokens each)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"bundled Kimi Linear ({log['parameters'] / 1e6:.1f}M params), Shakespeare, "
                 f"{log['train_seconds']:.0f} s on {log['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(png)
    except OSError as e:   # its folder missing, not writable
        raise KLError(f"{png}: cannot write it ({unreadable_reason(e)}); name a PNG file in a folder you can write "
                      "(--png)") from None
    finally:
        plt.close(fig)


def default_png(loss_json: Path) -> Path:
    """Where the plot goes without --png: beside a loss.json that is a file the user named (or a link they made to
    one), here for one piped or redirected in (/dev/stdin, /dev/fd/0, /proc/self/fd/0, <(...)), whose folder (/dev,
    /dev/fd) is no place for it -- as root, /dev/loss.png was written without a word."""
    beside = loss_json.is_file() and not _names_a_descriptor(loss_json)
    return loss_json.with_name("loss.png") if beside else Path("loss.png")


def _names_a_descriptor(path: Path) -> bool:
    """Whether `path`, or a link on the way from it to its file, is a name in /dev itself or anywhere in /proc: a
    descriptor, which is_file follows to whatever was redirected into it (/dev/stdin -> /proc/self/fd/0 -> the file).
    A file the user made under /dev is in a folder of its own (/dev/shm); none is in /proc. Asked of a file only:
    its links end."""
    hop = path.absolute()   # not normalized: "link/.." is the link's target's parent
    while True:
        folder = hop.parent.resolve()
        if folder == Path("/dev") or folder.is_relative_to("/proc"):
            return True
        if not hop.is_symlink():
            return False
        hop = folder / hop.readlink()


def main() -> None:
    p = argparse.ArgumentParser(description=script_summary(__file__))
    p.add_argument("loss_json", type=Path)
    p.add_argument("--png", type=Path, default=None, help="[default: loss.png beside the JSON, or here for a pipe]")
    a = p.parse_args()
    if a.png is not None and a.png.suffix.lower() != ".png":   # matplotlib's ValueError for a format it has not
        p.exit(2, f"{p.prog}: error: --png {a.png}: name a .png file\n")
    try:
        plot_loss(a.loss_json, a.png or default_png(a.loss_json))
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        p.exit(2, "plot_loss.py: needs matplotlib, which klconvert does not install; pip install matplotlib\n")
    except KLError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")


if __name__ == "__main__":
    run_tool(main)
