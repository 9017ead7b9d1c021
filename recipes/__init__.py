"""The recipes klconvert ships, one per GPU tier, installed beside the code as `klconvert.recipes`: `--recipe 48gb`
(or `recipes/48gb.yaml` where no such file is) names `48gb.yaml` here, wherever klconvert is installed."""
from __future__ import annotations

import os
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def shipped_names() -> list[str]:
    """The shipped recipes' names: 141gb, 32gb, 48gb, 80gb."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def shipped_recipe(given: Path) -> Path | None:
    """The shipped recipe a --recipe value names that is no file here (nor a link, even a broken one) -- `48gb`,
    `48gb.yaml` or `recipes/48gb.yaml`, relative -- or None. A folder of that name is no recipe, and hides none: a
    quantize output named after its recipe (`quantize SRC 32gb --recipe 32gb`) sits beside the next command."""
    if given.is_absolute() or given.parent not in (Path("."), Path("recipes")):
        return None
    if os.path.lexists(given) and not given.is_dir():
        return None
    name = given.name.removesuffix(".yaml")
    return FOLDER / f"{name}.yaml" if name in shipped_names() else None
