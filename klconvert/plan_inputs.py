"""What a plan is made of before anything is sized -- its weight flags, the model's config -- read and checked
torch-free: `klconvert plan` refuses them before the planner (runtime/plan_report.py's plan_for, which reads them
through here again for the Python API) imports torch (~2 s of CPU)."""
from __future__ import annotations

from pathlib import Path

from klconvert.checkpoint.folder_files import CONFIG_FILE
from klconvert.config import KimiLinearConfig
from klconvert.errors import KLError, either
from klconvert.presets import preset_config
from klconvert.quant.defaults import GROUP_SIZE_FLAG
from klconvert.quant.group_rules import SUPPORTED_BITS, check_group_size
from klconvert.quant.recipe import Recipe


def check_weight_flags(recipe: Recipe | str | Path | None, bits: int | None, group_size: int | None) -> None:
    """KLError where the weight flags do not go together: a recipe and --bits or --group-size, --group-size without
    --bits 4 or 8, or a group size no int scheme takes."""
    # --group-size too: its own refusal below said "add --bits 4 or 8", which this one then refused
    given = [flag for flag, value in (("--bits", bits), ("--group-size", group_size)) if value is not None]
    if recipe is not None and given:
        raise KLError(f"give a recipe or {' and '.join(given)}, not both: the recipe already says how each tensor is "
                      "stored")
    if group_size is not None and bits not in SUPPORTED_BITS:
        raise KLError(f"--group-size {group_size} sizes the groups of --bits {either(SUPPORTED_BITS)} (without a "
                      f"recipe); add --bits {either(SUPPORTED_BITS)}, or drop --group-size")
    if group_size is not None:
        check_group_size(group_size, flag=GROUP_SIZE_FLAG)


def model_config(model: Path | None, preset: str | None, layers: int | None) -> tuple[KimiLinearConfig, str]:
    """The config a plan sizes, checked, and where it comes from as refusals name it: a `model` folder's config.json,
    or `preset`'s (cut to `layers`)."""
    if model is not None:
        return KimiLinearConfig.from_file(Path(model) / CONFIG_FILE), str(Path(model) / CONFIG_FILE)
    return KimiLinearConfig.from_dict(preset_config(preset, layers), where=f"preset {preset}"), f"preset {preset}"
