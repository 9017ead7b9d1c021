"""`klconvert plan`: build a MemoryPlan for a folder or a preset, from a recipe or --bits, and render it as a table."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import click
import torch

from klconvert.checkpoint.folder_files import RECIPE_FILE, refuse_link_out
from klconvert.checkpoint.name_map import expected_tensors
from klconvert.checkpoint.quantized import QuantizedSource
from klconvert.checkpoint.reader import Checkpoint
from klconvert.checkpoint.regular_file import open_regular
from klconvert.checkpoint.size_bounds import check_model_size
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError, flag_value, not_utf8, shown
from klconvert.plan_inputs import check_weight_flags, model_config
from klconvert.presets import preset_config
from klconvert.quant import Policy, Recipe, load_recipe, policy_from_options
from klconvert.quant.group_rules import SUPPORTED_BITS
from klconvert.quant.recipe import MAX_RECIPE_BYTES, parse_runtime_section
from klconvert.quant.scheme import GROUP_SIZE
from klconvert.runtime.bind import packed_choice
from klconvert.runtime.memory_plan import MAX_BATCH, MemoryPlan, weight_bytes
from klconvert.runtime.model import KimiLinear
from klconvert.runtime.state import MLA_CACHE_DTYPES
from klconvert.runtime.weights import HeldPacked
from klconvert.sizes import LEAST_BARE_BYTES, PAST_SIZE_BOUND, SIZE_BOUND, parse_size
from klconvert.units import binary_size_text, counted

# What a plan takes where neither a flag nor the recipe's runtime: section says (the help and README restate these;
# tests/test_memory_plan.py holds the help to them)
RUNTIME_DEFAULTS = {"max_context": 131072, "batch": 1, "mla_cache_dtype": "bfloat16", "kda_state_dtype": "float32"}
KDA_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RECIPE_GPU_MEMORY_EXAMPLES = "48GiB or 80GB"   # the sizes a recipe's refused gpu_memory is told to write


def _dtype_named(name: str, choices: dict[str, torch.dtype], what: str) -> torch.dtype:
    if name not in choices:
        raise KLError(f"{what} {shown(name)} is not supported; choose one of {', '.join(choices)}")
    return choices[name]


def _memory_bytes(value: str | int | float, where: str) -> int:
    """A recipe's gpu_memory: a size such as '48GiB' or '80GB', or a number of bytes. A string is refused with
    parse_size's line, as --gpu-memory is: what was wrong (a unit it does not take, a size past SIZE_BOUND, a bare
    number of too few bytes), where 'is not a size' said nothing of it ('1PiB')."""
    if isinstance(value, str):
        size = parse_size(value, f"{where}: runtime.gpu_memory", examples=RECIPE_GPU_MEMORY_EXAMPLES)
        if size < LEAST_BARE_BYTES:   # '0GB', '1B': as few bytes as a number is refused for
            raise KLError(f"{where}: runtime.gpu_memory {shown(value)} is {binary_size_text(size)}, no GPU's memory; "
                          f"write e.g. {RECIPE_GPU_MEMORY_EXAMPLES}")
        return size
    if not 0 < value < float("inf"):   # NaN fails too
        raise KLError(f"{where}: runtime.gpu_memory should be a positive number of bytes, got {shown(value)}")
    if value >= SIZE_BOUND:
        raise KLError(f"{where}: runtime.gpu_memory {shown(value)} {PAST_SIZE_BOUND}; write e.g. "
                      f"{RECIPE_GPU_MEMORY_EXAMPLES}")
    if value < LEAST_BARE_BYTES:
        raise KLError(f"{where}: runtime.gpu_memory {value} is {binary_size_text(int(value))}, no GPU's memory; write "
                      f"{value}GB or {value}GiB")
    return int(value)


def check_runtime_settings(recipe: Recipe) -> None:
    """KLError naming the line for the first value of a recipe's runtime: section that a plan cannot take (the
    recipe reader checked the types), so that `klconvert quantize` does not write one into a folder that `klconvert
    plan` then refuses. The reader holds the counts positive; check_runtime_context the context to the model's
    length."""
    settings = RUNTIME_DEFAULTS | recipe.runtime
    if settings["batch"] > MAX_BATCH:
        raise KLError(f"{recipe.where('batch')}: runtime.batch {shown(settings['batch'])} is past the {MAX_BATCH:,} "
                      "sequences a plan sizes; fix the recipe")
    if "gpu_memory" in settings:
        _memory_bytes(settings["gpu_memory"], recipe.where("gpu_memory"))
    _dtype_named(settings["mla_cache_dtype"], MLA_CACHE_DTYPES, f"{recipe.where('mla_cache_dtype')}: MLA cache dtype")
    _dtype_named(settings["kda_state_dtype"], KDA_STATE_DTYPES, f"{recipe.where('kda_state_dtype')}: KDA state dtype")


def check_runtime_context(recipe: Recipe, config: KimiLinearConfig) -> None:
    """KLError naming the line when a recipe's runtime.max_context is past the model's length (which
    check_runtime_settings cannot know): a folder quantized with it would hold defaults that `klconvert plan` drops."""
    if recipe.runtime.get("max_context", 0) > config.model_max_length:
        raise KLError(f"{recipe.where('max_context')}: runtime.max_context {shown(recipe.runtime['max_context'])} is "
                      f"over the model's {config.model_max_length_name} {config.model_max_length:,}; set it to "
                      f"{config.model_max_length:,} or less")


def held_on_a_gpu(folder: Path) -> HeldPacked:
    """How the runtime on a GPU holds a folder's weights, read from its stored tensors (checked): packed where the
    Triton kernels take the stored scheme, the rest dequantized -- not what its recipe.yaml or config.json claims."""
    checkpoint = Checkpoint(folder)
    schemes = {n: s.scheme for n, s in checkpoint.sources.items() if isinstance(s, QuantizedSource)}
    return _held(checkpoint.config, schemes, checkpoint.scale_dtypes())


def _held(config: KimiLinearConfig, schemes: dict, scale_dtypes: dict | None = None) -> HeldPacked:
    """Of the stored schemes, those the runtime on a GPU keeps packed (bind.packed_choice), as a policy, their
    scales in `scale_dtypes` where known (a folder's)."""
    return HeldPacked(packed_choice(KimiLinear(config), schemes, triton=True), scale_dtypes)


def held_as_written(config: KimiLinearConfig, policy) -> HeldPacked:
    """How the runtime on a GPU would hold the weights a policy writes: packed where the Triton kernels take the
    scheme, the rest dequantized (groups finer than the kernels take, MLA's kv_b_proj) -- as held_on_a_gpu finds
    for a folder."""
    schemes = {spec.name: scheme for spec in expected_tensors(config).values()
               if (scheme := policy.scheme_for(spec.name, spec.shape)) is not None}
    return _held(config, schemes)


def folder_recipe(path: Path, config: KimiLinearConfig) -> Recipe | None:
    """A model folder's recipe.yaml, for its `runtime:` section alone (the plan's defaults): None where the folder has
    none. The file is provenance, which run and eval never read: one that cannot be read, is no YAML, or holds a
    runtime: section the plan cannot take is left out with a note on stderr saying why, not refused -- a plan of the
    folder is made as run would load it. A link out of the folder is refused, as for any file of a model folder."""
    if not os.path.lexists(path):
        return None
    refuse_link_out(path)
    try:
        with open_regular(path) as f:   # a FIFO's open would wait for a writer
            data = f.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise KLError(f"{path}: over {MAX_RECIPE_BYTES >> 10} KiB, far larger than a recipe")
        recipe = parse_runtime_section(data.decode("utf-8"), str(path))
        check_runtime_settings(recipe)
        check_runtime_context(recipe, config)
    except UnicodeDecodeError as e:
        problem = not_utf8(path, e.start)
    except OSError as e:
        problem = f"{path}: cannot read it ({e.strerror})"
    except KLError as e:
        problem = str(e)
    else:
        return recipe
    line = (f"{problem}; the plan leaves out the runtime: defaults of the folder's recipe.yaml (which run and eval do "
            "not read) -- fix or delete the file, or give the settings as flags")
    # on one line, what a terminal would act on escaped (the file's path and its parser's words come from the folder)
    click.echo("klconvert: note: " + "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(line.split())),
               err=True)
    return None


def _names_and_shapes_checked(policy: Policy, config: KimiLinearConfig) -> Policy:
    """policy.check_against the tensors of a checkpoint of `config`."""
    return policy.check_against((s.name, s.shape) for s in expected_tensors(config).values())


def plan_for(model: Path | None = None, preset: str | None = None, layers: int | None = None,
             recipe: Recipe | str | Path | None = None, batch: int | None = None, context: int | None = None,
             bits: int | None = None, group_size: int | None = None, memory_limit: int | None = None,
             mla_cache_dtype: str | None = None, kda_state_dtype: str | None = None,
             dtype: torch.dtype = torch.bfloat16) -> MemoryPlan:
    """The plan the runtime would make on a GPU for this model, weight policy, context and batch.

    Weights are sized as a GPU holds what the recipe's policy, or the default policy at `bits` (lm_head at 8 bits),
    writes (held_as_written), or, when neither is given, as a `model` folder stores them (held_on_a_gpu), or
    unquantized for a preset or at `bits` 16. A `model` folder's recipe.yaml gives only the runtime settings, where no
    `recipe` is given. Each setting given here wins over the recipe's `runtime:` section, which wins over
    RUNTIME_DEFAULTS (and no memory limit).
    """
    check_weight_flags(recipe, bits, group_size)
    stored = settings_from = None
    config, where = model_config(model, preset, layers)
    if model is not None and recipe is None:   # the folder's recipe.yaml gives the runtime settings, at --bits too
        settings_from = folder_recipe(Path(model) / RECIPE_FILE, config)
        if bits is None:
            stored = held_on_a_gpu(Path(model))   # the tensors say how they are stored
    check_model_size(config, where)
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    if stored is not None:
        policy = stored
    elif recipe is not None:  # every target must select a tensor of this model: a typo is an error, not a no-op
        policy = recipe.policy
        if model is None and layers is not None:
            # a preset cut to --layers is held to its whole model, as quantize holds a recipe to the checkpoint it
            # converts: the cut may lack a kind of layer a target is written for (--layers 1 keeps only layer 0,
            # whose MLP is dense: no routed experts), so there a target may select nothing
            _names_and_shapes_checked(policy, KimiLinearConfig.from_dict(preset_config(preset),
                                                                         where=f"preset {preset}"))
            policy = replace(policy, strict=False)
        policy = _names_and_shapes_checked(policy, config)
    elif bits in SUPPORTED_BITS:   # held to the model as quantize holds it: its group size must divide every weight
        policy = _names_and_shapes_checked(policy_from_options(bits, GROUP_SIZE if group_size is None else group_size),
                                           config)
    else:
        policy = None  # 16: unquantized, a folder's stored weights too
    if policy is not None and stored is None:  # as a GPU would hold the folder this policy writes
        policy = held_as_written(config, policy)

    if settings_from is None:
        settings_from = recipe
    settings = settings_from.runtime if settings_from is not None else {}
    if settings_from is not None:
        check_runtime_settings(settings_from)
    if batch is not None and not 1 <= batch <= MAX_BATCH:
        raise KLError(f"--batch {batch}: plan 1 to {MAX_BATCH:,} sequences")
    if memory_limit is None and "gpu_memory" in settings:
        memory_limit = _memory_bytes(settings["gpu_memory"], settings_from.where("gpu_memory"))
    runtime = RUNTIME_DEFAULTS | settings   # the recipe's over the defaults; a flag given here over both
    cache_name = mla_cache_dtype or runtime["mla_cache_dtype"]   # the recipe's were checked: only a flag's can fail
    state_name = kda_state_dtype or runtime["kda_state_dtype"]
    if context is None and "max_context" in settings:
        check_runtime_context(settings_from, config)
        context = settings["max_context"]
    elif context is not None and context > config.model_max_length:
        raise KLError(f"{flag_value('--max-context', context)} is over the model's {config.model_max_length_name} "
                      f"{config.model_max_length:,}; plan for {counted(config.model_max_length, 'token')} or fewer")
    return MemoryPlan(config, batch=batch or runtime["batch"],
                      context=context or min(runtime["max_context"], config.model_max_length),
                      weight_bytes=weight_bytes(config, dtype, policy), act_dtype=dtype,
                      kda_state_dtype=_dtype_named(state_name, KDA_STATE_DTYPES, "plan: KDA state dtype"),
                      mla_cache_dtype=_dtype_named(cache_name, MLA_CACHE_DTYPES, "plan: MLA cache dtype"),
                      memory_limit=memory_limit)


def render_plan(p: MemoryPlan, title: str) -> str:
    """The plan as an aligned text table."""
    rows: list[tuple[str, str]] = []
    for category, n in p.weight_bytes.items():
        if n:
            rows.append((f"  weights: {category}", binary_size_text(n)))
    rows += [
        ("weights total", binary_size_text(p.weights)),
        ("KDA recurrent state / sequence",
         f"{binary_size_text(p.kda_state_bytes_per_seq)} ({p.kda_state_bytes_per_seq / 1e6:.1f} MB)"),
        ("KDA conv tails / sequence", binary_size_text(p.conv_bytes_per_seq)),
        (f"state x batch {p.batch}", binary_size_text(p.state_bytes)),
        ("MLA latent cache / token", f"{p.mla_bytes_per_token:,} B"),
        (f"MLA latent cache @ {counted(p.context, 'token')} x {p.batch}", binary_size_text(p.mla_cache_bytes)),
        (f"workspace (a prompt's prefill segment, decode x {p.batch})", binary_size_text(p.workspace)),
        ("total", binary_size_text(p.total)),
    ]
    if p.memory_limit is not None:
        headroom = p.headroom
        rows += [("GPU memory", binary_size_text(p.memory_limit)),
                 ("headroom", ("-" + binary_size_text(-headroom) + "  (does NOT fit)") if headroom < 0
                  else f"{binary_size_text(headroom)} ({100 * headroom / p.memory_limit:.1f}%)"),
                 ("largest context that fits", counted(p.largest_context(), 'token'))]
    width = max(len(k) for k, _ in rows)
    head = (f"Memory plan for {title}: batch {p.batch}, context {p.context:,}, activations "
            f"{str(p.act_dtype).split('.')[-1]}, MLA cache {str(p.mla_cache_dtype).split('.')[-1]}, "
            f"KDA state {str(p.kda_state_dtype).split('.')[-1]}")
    if p.kda_state_dtype != MemoryPlan.kda_state_dtype:
        head += f" (sized only: the runtime keeps it in {str(MemoryPlan.kda_state_dtype).split('.')[-1]})"
    return "\n".join([head] + [f"{k:<{width}}  {v:>22}" for k, v in rows])
