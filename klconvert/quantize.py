"""`quantize` and `pull_and_quantize`: stream a Kimi Linear checkpoint through a quantization policy to a new folder."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Container
from contextlib import nullcontext
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from tqdm import tqdm

from klconvert.checkpoint.name_map import expected_tensors
from klconvert.checkpoint.folder_files import (
    CONFIG_FILE,
    INDEX_FILE,
    MAX_INDEX_BYTES,
    MAX_INDEX_VALUES,
    MAX_SIDE_FILE_BYTES,
    RECIPE_FILE,
    SINGLE_FILE,
    copied_side_file,
    refuse_unfit_side_files,
    without_remote_code,
)
from klconvert.checkpoint.quantized import METHODS, PACKED_TENSOR_SUFFIXES, quant_method
from klconvert.checkpoint.reader import open_checkpoint
from klconvert.checkpoint.regular_file import read_json
from klconvert.checkpoint.safetensors_header import read_header
from klconvert.checkpoint.size_bounds import max_header_bytes, max_header_values
from klconvert.checkpoint.safetensors_writer import index_json, shard_names, split_into_shards, write_shard
from klconvert.convert.model_card import model_card
from klconvert.convert.output_folder import (OutputFolder, OutputLock, parent_made, refuse_existing_out,
                                             refuse_out_over_source)
from klconvert.convert.outputs import ModuleMaker, PlanTotals, plan_modules, plan_totals
from klconvert.convert.provenance import SourceOrigin, source_fingerprint, source_origin
from klconvert.config import MAX_CONFIG_BYTES, KimiLinearConfig
from klconvert.damage_remedy import damaged_folder_remedy
from klconvert.devices import checked_device
from klconvert.disk_space import failed_write
from klconvert.errors import KLError, ValuesRefused, argument, controls_escaped
from klconvert.generation_config import GENERATION_CONFIG_FILE, check_generation_config
from klconvert.hub import SIDE_FILES, HubFile, pull
from klconvert.models import BUNDLED_NAME, DEFAULT_REPO, is_local_model, quantized_folder_name, resolve_model
from klconvert.quant import Policy, Recipe
from klconvert.runtime.host_memory import exhausted
from klconvert.quant.fused import refuse_split_fused
from klconvert.quant.policy import LINEAR
from klconvert.presets import preset_config
from klconvert.quantize_options import choose_policy, refuse_bad_switches, shard_limit
from klconvert.tokenizer import check_tokenizer_if_any
from klconvert.tokenizer_json import written_tokenizer_json
from klconvert.units import binary_size_text, count_text, counted, size_text, size_texts
from klconvert.user_paths import given_path

WRITTEN_FILES = (CONFIG_FILE, INDEX_FILE)  # made here, not copied
MODEL_CARD_FILE = "README.md"
# bump when the output of the same source and options changes (tests/test_bundled_model.py holds it to the tensors
# tools/record_bundled.py recorded with it) or a resume record of today's shape means another thing
RESUME_FORMAT = 1


@dataclass(frozen=True)
class QuantizeResult:
    """The finished folder, where its source came from, its sizes, and this run's time."""

    path: Path
    origin: SourceOrigin
    totals: PlanTotals
    shards: int
    shards_resumed: int  # finished by an interrupted run and kept
    bytes_converted: int  # source bytes this run read and converted (not those of kept shards)
    seconds: float

    def summary(self) -> str:
        t = self.totals
        resumed = f", {self.shards_resumed} kept from an interrupted run" if self.shards_resumed else ""
        return (f"quantized {self.origin.describe()} -> {controls_escaped(str(self.path))}: {size_text(t.bytes_in)} -> "
                f"{size_text(t.bytes_out)} in {counted(self.shards, 'shard')}{resumed} | "
                f"{t.quantized_bits_per_weight:.3f} bits/weight over {count_text(t.quantized_params)} quantized "
                f"params, {t.bits_per_weight:.3f} overall | {self.seconds:.1f} s, "
                f"{self.bytes_converted / 1e6 / max(self.seconds, 1e-9):.1f} MB/s in")


def default_out_name(model: str, policy: Policy) -> Path:
    """quantized_folder_name after the bits of the policy's main ("Linear") group."""
    main = next((g for g in policy.groups if any(e.pattern == LINEAR for e in g.targets)), policy.groups[0])
    return Path(quantized_folder_name(model, policy.kind, main.scheme.bits))


def refuse_quantized_source(src: Path) -> None:
    """KLError when SRC already holds quantized weights: packed tensor names, or a quantization_config of a method
    klconvert does not read. A config of one it reads over tensors none of which is packed is not taken at its word:
    open_checkpoint holds it to them and names the mismatch. It reads config.json and the index as the checkpoint's
    reader does -- regular files only, no further than their bounds -- and leaves whatever it cannot read to
    open_checkpoint, which refuses it in its own words."""
    try:
        config = read_json(src / CONFIG_FILE, MAX_CONFIG_BYTES, CONFIG_FILE)
    except (OSError, ValueError, RecursionError, KLError):  # RecursionError: JSON nested past Python's stack
        return
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        if method is None:   # no object, or one naming no method: quant_method refuses it as what it is
            quant_method(config, str(src / CONFIG_FILE))
        if method in METHODS and _packed_tensor(src, config) is None:
            return
        raise KLError(f"{src}: already quantized (config.json has a quantization_config, quant_method {method!s:.40}); "
                      "quantize the original bf16 checkpoint instead")
    packed = _packed_tensor(src, config)
    if packed is not None:
        raise KLError(f"{src}: already quantized (it holds {packed:.120}, though config.json has no "
                      "quantization_config); quantize the original bf16 checkpoint instead")


def _packed_tensor(src: Path, config: dict) -> str | None:
    """The first tensor SRC's index (or single shard's header) names as a part of a packed weight; None when there is
    none, or no index or header here that can be read."""
    if (src / INDEX_FILE).exists():
        try:
            index = read_json(src / INDEX_FILE, MAX_INDEX_BYTES, INDEX_FILE, MAX_INDEX_VALUES)
        except (OSError, ValueError, RecursionError, KLError):
            return None
        names = index.get("weight_map") if isinstance(index, dict) else None
    elif (src / SINGLE_FILE).is_file():
        try:  # its header read no further than the config's tensor count allows (the reader's own bounds)
            model = KimiLinearConfig.from_dict(config, where=str(src / CONFIG_FILE))
        except KLError:
            return None
        names = read_header(src / SINGLE_FILE, max_header_bytes(model), max_header_values(model),
                            partial(damaged_folder_remedy, src, [src / SINGLE_FILE])).tensors
    else:
        return None
    return next((n for n in names if n.endswith(PACKED_TENSOR_SUFFIXES)), None) if isinstance(names, dict) else None


def _copied_files(src: Path, made: Container[str]) -> list[Path]:
    """The side files OUT takes from SRC, but those of the names `made` (written from what SRC holds), each refused
    when a link out of SRC or past MAX_SIDE_FILE_BYTES. Hidden files stay behind: none is a model's, and klconvert's
    own (a partial output's .klconvert-resume.json) would overwrite OUT's."""
    try:   # glob skips a folder it cannot list, unsaid: the output would lack the tokenizer's files
        os.listdir(src)
    except OSError as e:
        raise KLError(f"{src}: cannot list its files ({e.strerror}); quantize copies the tokenizer and configs "
                      "beside the weights -- make the folder readable for you (chmod u+r, or ask its owner) and "
                      "rerun") from None
    found = sorted({p for pattern in SIDE_FILES for p in src.glob(pattern)
                    if p.is_file() and _copied(p.name) and p.name not in made})
    refuse_unfit_side_files(src, found)
    return found


def _copied(name: str) -> bool:
    """Whether a file of this name in SRC (not in a folder of it) is copied into OUT."""
    return not name.startswith(".") and name not in WRITTEN_FILES and any(fnmatch(name, p) for p in SIDE_FILES)


def _refuse_unfit_listed_files(files: list[HubFile]) -> None:
    """KLError, before a download, for a file to pull that quantize would refuse by its size once it is here: a
    side file over MAX_SIDE_FILE_BYTES, a config or index over its bound."""
    bounds = {CONFIG_FILE: MAX_CONFIG_BYTES, INDEX_FILE: MAX_INDEX_BYTES}
    for f in files:
        bound = bounds.get(f.path, MAX_SIDE_FILE_BYTES if "/" not in f.path and _copied(f.path) else None)
        if bound is not None and f.size is not None and f.size > bound:
            raise KLError(f"the repo's {f.path} is {f.size:,} bytes, over the {binary_size_text(bound)} klconvert "
                          "reads of it, so quantizing would fail after the download; nothing was downloaded -- "
                          "report it to the repo's owner")


def _finished_shards(done: int, total: int) -> str:
    """How far a cut-short quantize got, as its refusal says it: "1 shard of 3 finished", "2 shards of 30 finished"
    (its verb left out, which "1 of 3 shards are finished" got wrong)."""
    return f"{counted(done, 'shard')} of {total:,} finished"


def _write_error(e: OSError, folder: OutputFolder, done: int, total: int, kept: bool) -> KLError:
    where = e.filename2 or e.filename   # filename2: a rename's target (a folder there), not the temporary file
    # the advice may be another output folder, which no rerun of the same command resumes into: the resume is a fact
    return KLError(f"{failed_write(e, Path(where or folder.path))}, then rerun"
                   + (f" (the same command resumes: {_finished_shards(done, total)} in {folder.path})" if kept
                      else ""))


def quantize(src: str | Path, out: str | Path, bits: int | None = None, group_size: int | None = None,
             symmetric: bool | None = None, scheme: str | None = None, recipe: str | Path | Recipe | None = None,
             device: str | None = None, force: bool = False, max_shard_bytes: int | None = None,
             progress: bool = True, allow_split_fused: bool = False, observer: str | None = None) -> QuantizeResult:
    """Quantize the checkpoint in SRC (released or transformers layout; `tiny` is the bundled model) into a new HF
    folder OUT.

    Streams module by module; always writes the released tensor names. OUT is built in OUT.partial and
    renamed when whole; an interrupted run resumes from its finished shards when rerun with the same SRC
    and options. `force` replaces an existing OUT at the final rename and discards a partial folder
    made from another source or with other options. Shards hold at most `max_shard_bytes` (default 5 GB).
    A policy that stores the parts of a module vLLM fuses differently is refused unless `allow_split_fused`.
    """
    # the shard size, the switches, then the policy's flags: the order the command line refuses them in, before
    # torch's import (cli._refuse_quantize_options)
    shard_bytes = shard_limit(max_shard_bytes)
    refuse_bad_switches(force, progress, allow_split_fused, recipe)
    src, out = resolve_model(src), given_path(out, "out")
    policy, recipe_read = choose_policy(bits, group_size, symmetric, scheme, recipe, observer)
    torch_device = checked_device(device)
    refuse_out_over_source(src, out, "quantized model")
    refuse_existing_out(out, force)
    with OutputLock(out) as lock:
        return _quantize(src, out, policy, recipe_read, torch_device, force, shard_bytes, progress, allow_split_fused,
                         lock)


def _quantize(src: Path, out: Path, policy: Policy, recipe: Recipe | None, torch_device: torch.device, force: bool,
              max_shard_bytes: int, progress: bool, allow_split_fused: bool, lock: OutputLock) -> QuantizeResult:
    """quantize() once it holds OUT's `lock`; `recipe` the one `policy` comes from, if any."""
    started = time.monotonic()
    refuse_existing_out(out, force)  # again: a run that held the lock before us may have just finished OUT
    refuse_quantized_source(src)
    checkpoint = open_checkpoint(src, argument("src", "SRC"))
    runtime = recipe.runtime if recipe is not None else {}
    if runtime:   # checked as `plan --model OUT` will read it (see choose_policy), now that the model's length is known
        from klconvert.runtime.plan_report import check_runtime_context

        check_runtime_context(recipe, checkpoint.config)
    tokenizer = check_tokenizer_if_any(src, checkpoint.config)
    # transformers (vLLM too) reads tokenizer.json before tiktoken.model, converting the latter with a split of its
    # own: one written from the ranks klconvert read encodes as it does (a source's own is replaced, not copied)
    made = written_tokenizer_json(tokenizer, src)
    side_files = {path.name: copied_side_file(path) for path in _copied_files(src, made)}  # small: read first
    if GENERATION_CONFIG_FILE in side_files:   # transformers and vLLM stop at its eos_token_id
        check_generation_config(src / GENERATION_CONFIG_FILE, checkpoint.config.vocab_size)
    names_and_shapes = [(name, spec.shape) for name, spec in checkpoint.expected.items()]
    policy = policy.check_against(names_and_shapes)
    if not allow_split_fused:
        refuse_split_fused(policy, names_and_shapes)
    plans = plan_modules(checkpoint, policy)
    totals = plan_totals(plans)
    origin = source_origin(src)
    planned = ModuleMaker(checkpoint, torch_device).planned_tensors(plans)
    shards = split_into_shards(planned, max_shard_bytes)
    names = shard_names(len(shards))
    recipe_yaml = policy.to_recipe_yaml(runtime)
    folder = OutputFolder(out, {"format": RESUME_FORMAT, "klconvert": version("klconvert"),
                                "source": source_fingerprint(checkpoint, origin), "recipe": recipe_yaml,
                                "max_shard_bytes": max_shard_bytes, "shards": names}, force,
                          files=[*names, *WRITTEN_FILES, RECIPE_FILE, *side_files, *made, MODEL_CARD_FILE])
    source_bytes = {p.outputs[0][0]: p.source_bytes for p in plans}  # progress counts a module at its first tensor
    bar: tqdm | None = None
    done = resumed = resumed_bytes = 0
    try:   # from the folder's making on: an interrupt as soon as it is made leaves nothing behind
        if folder.end_killed_finish(dict(zip(names, shards))):   # OUT whole: a run of this command killed finishing it
            lock.going_ahead()
            return QuantizeResult(out, origin, totals, len(shards), len(shards), 0, time.monotonic() - started)
        folder.open()
        lock.going_ahead()
        bar = tqdm(total=totals.bytes_in, unit="B", unit_scale=True, desc=f"quantize {out.name}",
                   disable=None if progress else True)   # None: on a terminal only
        finished = [folder.has_finished(name, shard) for shard, name in zip(shards, names)]
        left = sum(t.nbytes for shard, ok in zip(shards, finished) if not ok for t in shard)
        free = shutil.disk_usage(folder.path).free
        if left > free:
            free_text, left_text = size_texts(free, left)
            raise KLError(f"{folder.path}: {free_text} free but {left_text} of shards are left to write; free some "
                          "space and rerun")
        for shard, name, ok in zip(shards, names, finished):
            if ok:
                resumed += 1
                kept_bytes = sum(source_bytes.get(t.name, 0) for t in shard)
                resumed_bytes += kept_bytes
                bar.update(kept_bytes)
            else:
                sha256 = write_shard(folder.path / name, shard,
                                     on_tensor=lambda t: bar.update(source_bytes.get(t.name, 0)))
                checkpoint.refuse_changed()   # a source shard rewritten in place while open made this one of both
                folder.record_finished(name, sha256)
            done += 1
        config = without_remote_code(checkpoint.config.raw)  # as read and checked, not read again
        config["quantization_config"] = policy.quantization_config()
        config["tie_word_embeddings"] = False  # lm_head is written on its own, even where the source tied it
        folder.write_text(CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        folder.write_text(INDEX_FILE, index_json(shards, names) + "\n")
        folder.write_text(RECIPE_FILE, recipe_yaml)
        for name, data in {**side_files, **made}.items():
            folder.write_bytes(name, data)
        folder.write_text(MODEL_CARD_FILE,
                          model_card(out.name, origin, policy, totals, len(shards), version("klconvert")))
        folder.finish()
    except BaseException as e:
        if bar is not None:
            bar.leave = False  # a failed run ends with its error line, not a half-full bar
        # something a rerun resumes from -- a shard recorded finished, by this run or one before it (a rerun stopped
        # while it checks them keeps them) -- in a folder still there (not removed while this ran); else nothing is
        # left. Not after a refusal of SRC's values: a rerun over the same files meets them again, and SRC mended is
        # another source, whose run is refused the shards (--force offered): for the 48B release, whose last tensor
        # lm_head is, ~25 GB kept for nothing
        kept = bool(folder.finished) and folder.path.is_dir() and not isinstance(e, ValuesRefused)
        if folder.opened:   # else the folder, if any, is not this run's: a refused or ended finish, a refused folder
            folder.remove_unfinished() if kept else folder.remove()
        if isinstance(e, OSError):
            raise _write_error(e, folder, done, len(shards), kept) from None
        if isinstance(e, MemoryError) and not isinstance(e, KLError):   # Python's or numpy's; torch's is named so
            e = exhausted(f"quantizing {src}", e)                          # where it allocates (host_allocation)
        if isinstance(e, KLError):
            raise KLError(f"{e}" + (f" ({_finished_shards(done, len(shards))} in {folder.path}; a rerun "
                                    "with the same options resumes after them while SRC's files stay as they "
                                    "are)" if kept else "")) from None
        raise
    finally:
        if bar is not None:
            bar.close()
    return QuantizeResult(out, origin, totals, len(shards), resumed, totals.bytes_in - resumed_bytes,
                          time.monotonic() - started)


def pull_and_quantize(model: str = DEFAULT_REPO, out: str | Path | None = None, revision: str | None = None,
                      bits: int | None = None, group_size: int | None = None, symmetric: bool | None = None,
                      scheme: str | None = None, recipe: str | Path | Recipe | None = None,
                      device: str | None = None,
                      force: bool = False, max_shard_bytes: int | None = None, progress: bool = True,
                      allow_split_fused: bool = False, observer: str | None = None) -> QuantizeResult:
    """Pull `model` (a hub repo; a folder that exists locally is used as it is; `tiny` is the bundled model) and
    quantize it into `out` (default ./<model-name>-w4a16, -w8a16 or -nf4). Options, and whether OUT's folder takes
    files, are checked before anything is downloaded."""
    shard_limit(max_shard_bytes)   # checked before a download, as the policy and the device are; in quantize's order
    refuse_bad_switches(force, progress, allow_split_fused, recipe)
    local = is_local_model(model)   # as `quantize` refuses a folder that is not there, before its options
    policy, recipe_read = choose_policy(bits, group_size, symmetric, scheme, recipe, observer)
    # the name before the device: the default device starts CUDA, which refusing a mistyped folder need not
    checked_device(device)
    out = given_path(out, "out") if out is not None else default_out_name(model, policy)
    refuse_existing_out(out, force)
    if local and revision is not None:
        what = "the bundled model" if model == BUNDLED_NAME else "a local folder"
        raise KLError(f"--revision {revision} picks a hub revision, but --model {model} is {what}; drop --revision")
    if not local and not allow_split_fused:  # a split shows in any Kimi Linear's names: refuse it before a download
        released = [(n, spec.shape) for n, spec in expected_tensors(KimiLinearConfig.from_dict(
            preset_config("kimi-linear-48b"))).items()]
        refuse_split_fused(policy.check_against(released), released)
    # an OUT that cannot take files is said before a 98 GB download, not after it; a failed run takes back the
    # folders made for it
    with nullcontext() if local else parent_made(out):
        src = model if local else _pulled(model, revision, progress)   # quantize reads tiny
        return quantize(src, out, bits=bits, group_size=group_size, symmetric=symmetric, scheme=scheme,
                        recipe=recipe_read, device=device, force=force, max_shard_bytes=max_shard_bytes,
                        progress=progress,
                        allow_split_fused=allow_split_fused, observer=observer)


def _pulled(model: str, revision: str | None, progress: bool) -> Path:
    """The folder `model`, a hub repo id that names no folder here, is pulled into. The hub's "no such repo" says the
    folder is missing too: a bare word is as likely a folder typed wrong as an id without an owner (gpt2's)."""
    try:
        return pull(model, revision=revision, progress=progress, check_files=_refuse_unfit_listed_files).path
    except KLError as e:
        if isinstance(e.__cause__, RepositoryNotFoundError) and not isinstance(e.__cause__, GatedRepoError):
            raise KLError(f"--model {model}: no such folder here, and {e}") from e
        raise
