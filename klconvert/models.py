"""Model names the verbs accept: `tiny`, the small Kimi Linear trained on Shakespeare and shipped inside the
package (klconvert/bundled/), and the folder `klconvert run` and `export-onnx` use when given no --model."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from klconvert.checkpoint.folder_files import CONFIG_FILE
from klconvert.checkpoint.regular_file import kind_of
from klconvert.errors import KLError
from klconvert.user_paths import given_path, refuse_unreachable, shown_path

BUNDLED_NAME = "tiny"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
DEFAULT_REPO = "moonshotai/Kimi-Linear-48B-A3B-Instruct"  # the release: what `pull` and `pull-and-quantize` fetch


def quantized_folder_name(model: str, kind: str, bits: int) -> str:
    """The folder `pull-and-quantize` writes `model` (a hub repo or a folder) into unless told: <model-name>-w4a16
    (int4), -w8a16 (int8) or -nf4."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    return f"{name}-nf4" if kind == "nf4" else f"{name}-w{bits}a16"


DEFAULT_MODEL_DIR = f"./{quantized_folder_name(DEFAULT_REPO, 'int', 4)}"  # where `pull-and-quantize --bits 4` writes


def bundled_dir() -> Path:
    """The bundled model's folder, checked to hold a checkpoint."""
    if not (BUNDLED_DIR / CONFIG_FILE).is_file():
        raise KLError(f"{BUNDLED_DIR}: the bundled model's files are missing from this install; reinstall klconvert "
                      "(pip install --force-reinstall klconvert), or name a checkpoint folder instead")
    return BUNDLED_DIR


def resolve_model(value: str | Path) -> Path:
    """The string `tiny` names the bundled model; anything else (a Path too: Path("./tiny") is "tiny") is a folder
    path, returned as given (write ./tiny for a folder of that name). KLError for any other type and for ""
    (given_path)."""
    if isinstance(value, str) and value == BUNDLED_NAME:
        return bundled_dir()
    return given_path(value, "the model", f" or {BUNDLED_NAME!r}")


def model_folder(value: str | Path, named: str) -> Path:
    """The folder a model name gives (resolve_model), checked to be one; KLError when it is not, naming the value as
    the caller gave it (`named`: "--model X", "SRC X") and what would work there -- for an owner/name, the commands
    that download a hub repo."""
    folder = resolve_model(value)
    refuse_unreachable(folder, named)
    if folder.is_dir():
        return folder
    if os.path.lexists(folder):   # there, but no folder: a file given for one read "no such folder"
        raise KLError(f"{named}: {_no_folder(folder)}; give a Kimi Linear checkpoint folder or {BUNDLED_NAME}, the "
                      "bundled model")
    # only for a name that is no folder
    from klconvert.convert.output_folder import interrupted_quantize, partial_path
    from klconvert.whole_folder import writing_under_way

    # a run writing it, running or stopped ("no such folder" read as lost; "a/b" as a hub repo id): said first
    if interrupted_quantize(partial_path(folder)):
        raise KLError(f"{named}: no such folder yet: {partial_path(folder)} holds a quantize into it that has not "
                      "finished (running now, or stopped: the same `klconvert quantize` command finishes it); give the "
                      "folder once it is whole")
    if (writing := writing_under_way(folder)) is not None:
        temporary, state = writing
        raise KLError(f"{named}: no such folder yet: a klconvert run writing it (export-onnx or synth) is {state}, "
                      f"into {shown_path(temporary)}; give the folder once that run ends (one stopped: run its command "
                      "again)")
    from klconvert.hub import is_repo_id   # huggingface_hub's check, imported only for a name that is no folder

    if isinstance(value, str) and "/" in value and is_repo_id(value):
        raise KLError(f"{named}: no such folder, and a hub repo id is not fetched here -- `klconvert "
                      f"pull-and-quantize --model {value}` pulls and quantizes it, `klconvert pull {value}` only "
                      "downloads it (and prints the folder to give here)")
    raise KLError(f"{named}: no such folder; give a Kimi Linear checkpoint folder (`klconvert pull` downloads one, "
                  f"`klconvert pull-and-quantize` a quantized one) or {BUNDLED_NAME}, the bundled model")


def is_local_model(model: str) -> bool:
    """Whether pull-and-quantize's --model names a model here -- BUNDLED_NAME or a folder -- rather than a hub repo
    to pull. A name that can only be a path (./x, ~/x, a/b/c, a file, one with a space) and is no folder is refused:
    the hub would say only that it is no repo id."""
    if model == BUNDLED_NAME or Path(model).is_dir():
        return True
    if os.path.lexists(model):   # there, but no folder: a file given for one read "no such folder"
        raise KLError(f"--model {model}: {_no_folder(Path(model))}; give a Kimi Linear checkpoint folder, "
                      f"{BUNDLED_NAME} (the bundled model) or a hub repo id like {DEFAULT_REPO}")
    from klconvert.hub import is_repo_id   # huggingface_hub's check, imported only for a name that is nothing here

    if not is_repo_id(model):
        raise KLError(f"--model {model}: no such folder (and not a hub repo id like {DEFAULT_REPO}); check the path")
    return False


def _no_folder(path: Path) -> str:
    """What `path`, a name that is there but is no folder, is instead: a file, a FIFO ..., or a link that leads
    nowhere."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ENOENT:
            return f"is a link to {os.readlink(path)}, which does not exist (a disk not mounted?)"
        return f"is a link that cannot be followed ({e.strerror})"
    return f"is {'a file' if stat.S_ISREG(mode) else kind_of(mode)}, not a folder"


def default_model(verb: str, needs_tokenizer: bool) -> tuple[Path, str]:
    """What `klconvert run` and `export-onnx` use without --model: the quantized 48B folder when it is here, else
    the bundled model; with the line saying which, `verb` being what the command does with it ("running"). The 48B
    folder must hold its weights, and its tokenizer where the command `needs_tokenizer` (export-onnx copies one only
    where it is there: a folder of weights alone exports). A name
    there that is no folder -- a file, or a link to nothing (a disk not mounted) -- or a folder without config.json
    (made by hand, or emptied) is refused, not passed over, in words that name no --model the user never gave."""
    refuse_unreachable(DEFAULT_MODEL_DIR)
    default = Path(DEFAULT_MODEL_DIR)
    if default.is_dir():
        refuse_unreachable(default / CONFIG_FILE)   # one that cannot be looked at is said so, not as missing
        if not os.path.lexists(default / CONFIG_FILE):
            raise _not_a_default_model(f"holds no {CONFIG_FILE}")
        missing = _missing_files(default, needs_tokenizer)
        if missing:   # a copy cut short: its readers' lines would blame a download, or a --model never given
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise KLError(f"{DEFAULT_MODEL_DIR}: holds {CONFIG_FILE} but not {', '.join(missing[:3])}{more} -- the "
                          "48B folder used when no --model is given is not whole (a copy cut short?); finish copying "
                          f"it, or remove it (then the bundled model runs; `klconvert pull-and-quantize --bits 4` "
                          f"makes the 48B one), or pass --model DIR")
        return default, f"{verb} {DEFAULT_MODEL_DIR} (pass --model to choose another)"
    if os.path.lexists(default):
        raise _not_a_default_model(_no_folder(default))
    return bundled_dir(), (f"no {DEFAULT_MODEL_DIR} here: {verb} the bundled model `{BUNDLED_NAME}` (a small Kimi "
                           f"Linear trained on Shakespeare); {_making_the_default(default)}")


def _making_the_default(default: Path) -> str:
    """How the 48B folder at `default` (none there) is made: by the quantize into it that has not finished, where one
    left its OUT.partial beside it (a new one of other options is refused that folder), else by pull-and-quantize."""
    from klconvert.convert.output_folder import interrupted_quantize, partial_path

    if interrupted_quantize(partial_path(default)):
        return (f"a quantize into the 48B one has not finished ({partial_path(default)}: running now, or stopped -- "
                "rerun the same command to finish it)")
    return "`klconvert pull-and-quantize --bits 4` makes the 48B one"


def _missing_files(folder: Path, needs_tokenizer: bool) -> list[str]:
    """The files a checkpoint folder needs that `folder` lacks: its tokenizer's (where `needs_tokenizer`), and its
    weights -- the shards its index names, or the one-shard file. An index that cannot be read names no shard (its
    reader says what is wrong with it), nor does a name in it that is no plain file name. An ONNX export holds
    weights of its own."""
    from klconvert.checkpoint.folder_files import (GENAI_CONFIG, INDEX_FILE, MAX_INDEX_BYTES, MAX_INDEX_VALUES,
                                                   SINGLE_FILE, is_plain_file_name)
    from klconvert.checkpoint.regular_file import read_json
    from klconvert.tokenizer import BPE_FILE, TOKENIZER_CONFIG_FILE   # (tokenizer imports this module)

    missing = [name for name in (BPE_FILE, TOKENIZER_CONFIG_FILE)
               if needs_tokenizer and not os.path.lexists(folder / name)]
    if os.path.lexists(folder / GENAI_CONFIG):
        return missing
    if not os.path.lexists(folder / INDEX_FILE):
        return missing + ([] if os.path.lexists(folder / SINGLE_FILE) else [f"{INDEX_FILE} or {SINGLE_FILE}"])
    try:
        shards = read_json(folder / INDEX_FILE, MAX_INDEX_BYTES, INDEX_FILE, MAX_INDEX_VALUES)["weight_map"].values()
    except (OSError, ValueError, RecursionError, KLError, KeyError, TypeError, AttributeError):
        return missing
    return missing + sorted({shard for shard in shards
                             if is_plain_file_name(shard) and not os.path.lexists(folder / shard)})


def _not_a_default_model(what: str) -> KLError:
    """The refusal of what is at DEFAULT_MODEL_DIR, `what` it is instead of a checkpoint folder: it says which folder
    that is and what to pass instead."""
    return KLError(f"{DEFAULT_MODEL_DIR}: {what} -- the 48B folder used when no --model is given; pass --model DIR, "
                   f"or --model {BUNDLED_NAME} for the bundled model")
